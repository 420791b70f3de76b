//! MSI-X: the capability, the vector table and the pending-bit array.
//!
//! Each vector is a GSI with an irqfd ([`MsiVector`]). The table lives in a BAR of the device;
//! every guest change of an entry, of the function mask or of the enable bit recomputes the
//! vector's route through the [`MsiRouter`]. Masking is enforced here: a trigger on a masked
//! vector sets its pending bit instead of writing the irqfd, and unmasking delivers it.

use std::io;
use std::sync::Arc;

use super::{MsiRouter, MsiVector};

/// MSI-X capability ID.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: usize = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// Offset of the message control word inside the capability.
pub const CAP_CONTROL: usize = 2;

/// Most vectors one function may have (the table size field holds N - 1 in 11 bits).
pub const MAX_VECTORS: usize = 2048;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Route {
    addr: u64,
    data: u32,
    masked: bool,
}

/// The MSI-X state of one function.
/// Route failures are guest-triggered (one per table write): rate-limited for all devices.
static ROUTE_LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new(5);

pub struct Msix {
    /// Raw table bytes, `ENTRY_SIZE` per vector.
    table: Vec<u8>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<MsiVector>,
    /// What the router was last told per vector.
    routed: Vec<Option<Route>>,
    router: Arc<dyn MsiRouter>,
}

impl Msix {
    /// `count` vectors (1..=MAX_VECTORS), each with a GSI from `router`; all masked at reset.
    pub fn new(count: usize, router: Arc<dyn MsiRouter>) -> io::Result<Self> {
        if count == 0 || count > MAX_VECTORS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "MSI-X vector count out of range",
            ));
        }
        let vectors = (0..count)
            .map(|_| router.allocate())
            .collect::<io::Result<Vec<_>>>()?;
        let mut m = Self {
            table: vec![0; count * ENTRY_SIZE],
            pending: vec![false; count],
            enabled: false,
            function_masked: false,
            vectors,
            routed: vec![None; count],
            router,
        };
        m.reset();
        Ok(m)
    }

    /// Back to the power-on state: disabled, every vector masked with an empty message.
    pub fn reset(&mut self) {
        self.table.fill(0);
        for v in 0..self.pending.len() {
            self.table[v * ENTRY_SIZE + 12] = VECTOR_MASKED as u8;
        }
        self.pending.fill(false);
        self.enabled = false;
        self.function_masked = false;
        self.sync_routes();
    }

    pub fn count(&self) -> usize {
        self.pending.len()
    }

    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// Bytes of the pending-bit array (a whole number of qwords).
    pub fn pba_len(&self) -> usize {
        self.count().div_ceil(64) * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The capability body after ID/next: (bytes, write mask). The table and PBA are at
    /// `table_off`/`pba_off` of BAR `bar` (offsets 8-byte aligned).
    pub fn capability(&self, bar: u8, table_off: u32, pba_off: u32) -> ([u8; 10], [u8; 10]) {
        let mut b = [0u8; 10];
        let ctrl = (self.count() - 1) as u16;
        b[0..2].copy_from_slice(&ctrl.to_le_bytes());
        b[2..6].copy_from_slice(&(table_off | u32::from(bar & 7)).to_le_bytes());
        b[6..10].copy_from_slice(&(pba_off | u32::from(bar & 7)).to_le_bytes());
        let mut w = [0u8; 10];
        w[1] = ((CTRL_ENABLE | CTRL_FUNCTION_MASK) >> 8) as u8;
        (b, w)
    }

    /// The guest wrote the message control word.
    pub fn set_control(&mut self, ctrl: u16) {
        let enabled = ctrl & CTRL_ENABLE != 0;
        let masked = ctrl & CTRL_FUNCTION_MASK != 0;
        if (enabled, masked) != (self.enabled, self.function_masked) {
            self.enabled = enabled;
            self.function_masked = masked;
            self.sync_routes();
            self.deliver_pending();
        }
    }

    fn entry_u32(&self, v: usize, field: usize) -> u32 {
        let o = v * ENTRY_SIZE + field;
        u32::from_le_bytes([
            self.table[o],
            self.table[o + 1],
            self.table[o + 2],
            self.table[o + 3],
        ])
    }

    fn vector_masked(&self, v: usize) -> bool {
        self.entry_u32(v, 12) & VECTOR_MASKED != 0
    }

    /// True when vector `v` cannot be delivered now.
    pub fn masked(&self, v: usize) -> bool {
        !self.enabled || self.function_masked || self.vector_masked(v)
    }

    fn route(&self, v: usize) -> Route {
        Route {
            addr: u64::from(self.entry_u32(v, 0)) | u64::from(self.entry_u32(v, 4)) << 32,
            data: self.entry_u32(v, 8),
            masked: self.masked(v),
        }
    }

    fn sync_route(&mut self, v: usize) {
        let r = self.route(v);
        if self.routed[v] == Some(r) {
            return;
        }
        let gsi = self.vectors[v].gsi;
        match self.router.update(gsi, r.addr, r.data, r.masked) {
            Ok(()) => self.routed[v] = Some(r),
            Err(e) => {
                ROUTE_LOG.warn(|| format!("MSI-X: cannot route GSI {gsi} (vector {v}): {e}"));
            }
        }
    }

    fn sync_routes(&mut self) {
        for v in 0..self.count() {
            self.sync_route(v);
        }
    }

    fn deliver_pending(&mut self) {
        for v in 0..self.count() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                let _ = self.vectors[v].irqfd.write(1);
            }
        }
    }

    /// Reads the table at `off` (any size; bytes outside the table read as zero).
    pub fn table_read(&self, off: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(off)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.table.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes the table at `off` (any size; bytes outside the table are dropped).
    pub fn table_write(&mut self, off: u64, data: &[u8]) {
        let Ok(off) = usize::try_from(off) else {
            return;
        };
        let mut touched = Vec::new();
        for (i, b) in data.iter().enumerate() {
            let Some(o) = off.checked_add(i).filter(|o| *o < self.table.len()) else {
                continue;
            };
            self.table[o] = *b;
            let v = o / ENTRY_SIZE;
            if !touched.contains(&v) {
                touched.push(v);
            }
        }
        for v in touched {
            self.sync_route(v);
        }
        self.deliver_pending();
    }

    /// Reads the pending-bit array (read-only to the guest).
    pub fn pba_read(&self, off: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = off.saturating_add(i as u64);
            let mut v = 0u8;
            for bit in 0..8u64 {
                let n = byte.saturating_mul(8).saturating_add(bit);
                if usize::try_from(n)
                    .ok()
                    .and_then(|n| self.pending.get(n))
                    .copied()
                    .unwrap_or(false)
                {
                    v |= 1 << bit;
                }
            }
            *b = v;
        }
    }

    /// Raises vector `v`: delivered now, or left pending while masked. Out-of-range vectors
    /// are ignored.
    pub fn trigger(&mut self, v: usize) -> io::Result<()> {
        if v >= self.count() {
            return Ok(());
        }
        if self.masked(v) {
            self.pending[v] = true;
            return Ok(());
        }
        self.vectors[v].irqfd.write(1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Records the routes it is given and keeps a copy of every irqfd it hands out, so tests
    /// can see a device fire them. `fail` makes `update` fail. GSIs start at 24.
    #[derive(Default)]
    pub struct FakeRouter {
        pub next: Mutex<u32>,
        pub routes: Mutex<Vec<(u32, u64, u32, bool)>>,
        pub irqfds: Mutex<Vec<(u32, EventFd)>>,
        pub fail: std::sync::atomic::AtomicBool,
    }

    impl FakeRouter {
        /// True (once per write) if the irqfd of `gsi` was written.
        pub fn fired(&self, gsi: u32) -> bool {
            self.irqfds
                .lock()
                .unwrap()
                .iter()
                .find(|(g, _)| *g == gsi)
                .is_some_and(|(_, fd)| fd.read().is_ok())
        }

        pub fn take_routes(&self) -> Vec<(u32, u64, u32, bool)> {
            std::mem::take(&mut *self.routes.lock().unwrap())
        }
    }

    impl MsiRouter for FakeRouter {
        fn allocate(&self) -> io::Result<MsiVector> {
            let mut n = self.next.lock().unwrap();
            *n += 1;
            let gsi = 23 + *n;
            let irqfd = EventFd::new(EFD_NONBLOCK)?;
            self.irqfds.lock().unwrap().push((gsi, irqfd.try_clone()?));
            Ok(MsiVector { gsi, irqfd })
        }
        fn update(&self, gsi: u32, addr: u64, data: u32, masked: bool) -> io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::other("no route"));
            }
            self.routes.lock().unwrap().push((gsi, addr, data, masked));
            Ok(())
        }
    }

    fn fired(m: &Msix, v: usize) -> bool {
        m.vectors[v].irqfd.read().is_ok()
    }

    fn write_entry(m: &mut Msix, v: usize, addr: u64, data: u32, ctrl: u32) {
        let base = (v * ENTRY_SIZE) as u64;
        m.table_write(base, &(addr as u32).to_le_bytes());
        m.table_write(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &ctrl.to_le_bytes());
    }

    #[test]
    fn masking_and_pending_bits() {
        let router = Arc::new(FakeRouter::default());
        let mut m = Msix::new(3, router.clone()).unwrap();
        assert_eq!((m.table_len(), m.pba_len()), (48, 8));
        let (cap, wmask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([cap[0], cap[1]]), 2);
        assert_eq!(&cap[2..6], &0x4000u32.to_le_bytes());
        assert_eq!(wmask[1], 0xc0);

        // Disabled: triggers stay pending.
        write_entry(&mut m, 1, 0xfee0_0000, 0x41, 0);
        m.trigger(1).unwrap();
        assert!(!fired(&m, 1));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b010);

        // Enabling delivers the pending vector and routes it.
        m.set_control(CTRL_ENABLE);
        assert!(fired(&m, 1));
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(router
            .routes
            .lock()
            .unwrap()
            .contains(&(25, 0xfee0_0000, 0x41, false)));

        // Function mask: pending, then delivered on unmask.
        m.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        m.trigger(1).unwrap();
        assert!(!fired(&m, 1));
        m.set_control(CTRL_ENABLE);
        assert!(fired(&m, 1));

        // Per-vector mask.
        m.table_write(16 + 12, &[1]);
        m.trigger(1).unwrap();
        assert!(!fired(&m, 1));
        m.table_write(16 + 12, &[0]);
        assert!(fired(&m, 1));

        // Vector 0 was never unmasked; vector 7 does not exist.
        m.trigger(0).unwrap();
        assert!(!fired(&m, 0));
        m.trigger(7).unwrap();
    }

    #[test]
    fn hostile_table_accesses() {
        let router = Arc::new(FakeRouter::default());
        let mut m = Msix::new(2, router).unwrap();
        let mut b = [0u8; 8];
        for off in [0u64, 3, 15, 30, 31, 32, 1 << 40, u64::MAX - 1] {
            for len in [1usize, 2, 4, 8] {
                m.table_write(off, &[0xaa; 8][..len]);
                m.table_read(off, &mut b[..len]);
                m.pba_read(off, &mut b[..len]);
            }
        }
        m.table_read(28, &mut b);
        assert_eq!(&b[4..], &[0; 4]);
        assert!(Msix::new(0, Arc::new(FakeRouter::default())).is_err());
    }
}
