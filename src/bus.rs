//! The I/O buses: an ordered set of address ranges, each owned by one device.
//!
//! A vCPU that exits on port I/O or MMIO looks the address up here and calls the device's
//! `read`/`write` with the offset inside the device's range. One `Bus` serves port I/O and
//! another serves MMIO; they behave the same. The bus takes no lock: devices take `&self` and
//! lock what they must themselves ([`BusDevice`]); a simple register-file device implements
//! [`BusDeviceMut`] and sits behind its own `Mutex`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO, called concurrently from every vCPU thread.
///
/// `offset` is relative to the start of the range the device was inserted at. `data` has the
/// access size (1, 2, 4 or 8 bytes). Reads must fill every byte of `data`.
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// A device whose registers are plain state: it gets `&mut self`, and `Mutex<D>` is the
/// [`BusDevice`] on the bus (one lock per device, held only for the access).
pub trait BusDeviceMut: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl<D: BusDeviceMut> BusDevice for Mutex<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // A device that panicked once keeps serving (its state is plain data); the panic
        // itself was already reported.
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data)
    }
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} for {name} overlaps {other}")]
    Overlap {
        base: u64,
        len: u64,
        name: &'static str,
        other: &'static str,
    },
    #[error("bus range for {name} is empty or wraps around: {base:#x}+{len:#x}")]
    BadRange {
        base: u64,
        len: u64,
        name: &'static str,
    },
}

/// A device shared by the bus and whoever else holds it.
pub type SharedDevice = Arc<dyn BusDevice>;

#[derive(Clone)]
struct Entry {
    len: u64,
    name: &'static str,
    device: SharedDevice,
}

/// Ordered, non-overlapping address ranges. Built before the vCPUs start and immutable
/// afterwards, so lookups take no lock (each device has its own).
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

/// The result of looking an address up: which device, and where inside its range.
pub struct Resolved<'a> {
    pub name: &'static str,
    pub offset: u64,
    device: &'a SharedDevice,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &'static str,
        device: SharedDevice,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len, name })?;
        // The nearest range starting below `end` is the only one that can overlap.
        if let Some((&other_base, other)) = self.ranges.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    name,
                    other: other.name,
                });
            }
        }
        self.ranges.insert(base, Entry { len, name, device });
        Ok(())
    }

    /// Finds the device covering `addr`, if any.
    pub fn resolve(&self, addr: u64) -> Option<Resolved<'_>> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some(Resolved {
            name: entry.name,
            offset,
            device: &entry.device,
        })
    }

    /// Reads from the device at `addr`. Returns the device name, or `None` (and fills `data`
    /// with all-ones, as an unclaimed PC bus reads) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Option<&'static str> {
        match self.resolve(addr) {
            Some(r) => {
                r.device.read(r.offset, data);
                Some(r.name)
            }
            None => {
                data.fill(0xff);
                None
            }
        }
    }

    /// Writes to the device at `addr`. Returns the device name, or `None` when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<&'static str> {
        let r = self.resolve(addr)?;
        r.device.write(r.offset, data);
        Some(r.name)
    }

    /// Names and ranges, in address order (for logs and exit statistics).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, &'static str)> + '_ {
        self.ranges.iter().map(|(&b, e)| (b, e.len, e.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDeviceMut for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn dev(v: u8) -> SharedDevice {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn lookup_and_offsets() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, "com1", dev(0x10)).unwrap();
        bus.insert(0x60, 1, "i8042", dev(0x20)).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bus.read(0x3fa, &mut b), Some("com1"));
        assert_eq!(b[0], 0x12);
        assert_eq!(bus.read(0x400, &mut b), None);
        assert_eq!(b[0], 0xff);
        assert_eq!(bus.read(0x3f7, &mut b), None);
        assert_eq!(bus.write(0x60, &[5]), Some("i8042"));
        assert_eq!(bus.read(0x60, &mut b), Some("i8042"));
        assert_eq!(b[0], 5);
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, "a", dev(0)).unwrap();
        assert!(bus.insert(0x10f, 1, "b", dev(0)).is_err());
        assert!(bus.insert(0xf8, 0x9, "c", dev(0)).is_err());
        assert!(bus.insert(0xf8, 0x8, "d", dev(0)).is_ok());
        assert!(bus.insert(0x110, 0, "e", dev(0)).is_err());
        assert!(bus.insert(u64::MAX, 2, "f", dev(0)).is_err());
    }
}
