//! QEMU's `pc-testdev`, the ISA test device kvm-unit-tests probes; attached only with
//! `--test-devices`, never in an ordinary VM (it lets the guest drive interrupt lines).
//!
//! - ports 0xE0-0xE3: a 32-bit scratch register (byte lanes; string I/O arrives one element
//!   at a time from the vCPU loop), aliased at 0xE8-0xEB;
//! - port 0xE4: "flush page" (`outl` of a guest-physical address). QEMU re-protects the page
//!   so KVM must fault it in again; ferrovm accepts the write and does nothing (the guest sees
//!   no difference, the test only loses that EPT/NPT fault);
//! - ports 0x2000-0x2017: a byte written at port 0x2000 + N sets ISA interrupt line N to
//!   level `byte != 0` (through [`IrqLevel`], i.e. KVM_IRQ_LINE, before the vCPU runs on); a
//!   wider write sets consecutive lines, one per byte, as QEMU splits it (realmode.flat does
//!   `outl` to 0x200b). Only the lines in [`TEST_IRQS`] are driven (the others belong to
//!   real devices);
//! - MMIO 0xFF00_0000, 64 KiB: RAM-like storage that always exits (no memory slot), for the
//!   instruction emulator tests.

use std::sync::Arc;

use super::IrqLevel;
use crate::bus::BusDeviceMut;
use crate::ratelimit::RateLimit;

/// Port bases and lengths.
pub const PORT_DATA: u16 = 0xe0;
pub const PORT_DATA_LEN: u64 = 12; // 0xe0 data, 0xe4 flush, 0xe8 data alias
pub const PORT_IRQ: u16 = 0x2000;
pub const PORT_IRQ_LEN: u64 = 24;
/// The MMIO window.
pub const IOMEM_START: u64 = 0xff00_0000;
pub const IOMEM_LEN: u64 = 0x1_0000;
/// The interrupt lines the guest may drive: the ISA lines no other ferrovm device has
/// (kvm-unit-tests uses 11 and 13-15). The VMM claims them in the resource map.
pub const TEST_IRQS: [u32; 9] = [3, 5, 6, 7, 10, 11, 13, 14, 15];

static LOG: RateLimit = RateLimit::new(10);

/// The byte of the scratch register at port offset `o` (0xE0-0xE3, or its alias 0xE8-0xEB).
fn lane(o: u64) -> Option<usize> {
    match o {
        0..=3 => Some(o as usize),
        8..=11 => Some(o as usize - 8),
        _ => None,
    }
}

/// The scratch register and flush port at 0xE0.
#[derive(Default)]
pub struct PcTestPorts {
    data: [u8; 4],
}

impl BusDeviceMut for PcTestPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = lane(offset + i as u64).map_or(0, |l| self.data[l]);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 {
            return; // flush page: nothing to do (see the module comment)
        }
        for (i, &b) in data.iter().enumerate() {
            if let Some(l) = lane(offset + i as u64) {
                self.data[l] = b;
            }
        }
    }
}

/// The interrupt-line ports at 0x2000.
pub struct PcTestIrq {
    lines: Arc<dyn IrqLevel>,
}

impl PcTestIrq {
    pub fn new(lines: Arc<dyn IrqLevel>) -> Self {
        Self { lines }
    }
}

impl BusDeviceMut for PcTestIrq {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &level) in data.iter().enumerate() {
            let line = offset + i as u64; // offset < PORT_IRQ_LEN, data.len() <= 4
            if line >= PORT_IRQ_LEN {
                break;
            }
            let line = line as u32;
            if !TEST_IRQS.contains(&line) {
                LOG.warn(|| format!("pc-testdev: line {line} is not a test line: ignored"));
                continue;
            }
            if let Err(e) = self.lines.set_level(line, level != 0) {
                LOG.warn(|| format!("pc-testdev: setting line {line} failed: {e}"));
            }
        }
    }
}

/// The 64 KiB MMIO window.
pub struct PcTestIomem {
    bytes: Vec<u8>,
}

impl Default for PcTestIomem {
    fn default() -> Self {
        Self {
            bytes: vec![0; IOMEM_LEN as usize],
        }
    }
}

impl BusDeviceMut for PcTestIomem {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset + i as u64).unwrap_or(usize::MAX);
            *b = self.bytes.get(at).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = usize::try_from(offset + i as u64).unwrap_or(usize::MAX);
            if let Some(slot) = self.bytes.get_mut(at) {
                *slot = b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(u32, bool)>>);
    impl IrqLevel for Lines {
        fn set_level(&self, gsi: u32, high: bool) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, high));
            Ok(())
        }
    }

    #[test]
    fn scratch_register_has_byte_lanes_and_an_alias() {
        let mut p = PcTestPorts::default();
        p.write(0, &0x1122_3344u32.to_le_bytes());
        p.write(1, &[0x99]);
        let mut b = [0u8; 4];
        p.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1122_9944);
        p.read(8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1122_9944);
        p.write(4, &0x1000u32.to_le_bytes()); // flush: no change
        p.read(2, &mut b[..2]);
        assert_eq!(&b[..2], &[0x22, 0x11]);
    }

    #[test]
    fn irq_ports_drive_only_test_lines_one_per_byte() {
        let lines = Arc::new(Lines::default());
        let mut d = PcTestIrq::new(lines.clone());
        d.write(14, &[1]);
        d.write(14, &[0]);
        d.write(15, &[7]);
        d.write(4, &[1]); // COM1's line: refused
        d.write(11, &[1, 0, 0, 0]); // outl at 0x200b: lines 11 (set), 12 (not ours), 13, 14
        d.write(23, &[1, 1]); // runs past the last port
        let expected = [
            (14, true),
            (14, false),
            (15, true),
            (11, true),
            (13, false),
            (14, false),
        ];
        assert_eq!(*lines.0.lock().unwrap(), expected);
    }

    #[test]
    fn iomem_stores_bytes() {
        let mut m = PcTestIomem::default();
        m.write(0xfffe, &[1, 2, 3, 4]); // runs off the end: the tail is dropped
        let mut b = [0u8; 4];
        m.read(0xfffe, &mut b);
        assert_eq!(b, [1, 2, 0xff, 0xff]);
        m.write(u64::MAX, &[1]);
    }
}
