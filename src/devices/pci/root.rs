//! Bus 0: the host bridge, the slots, and the three ways in (CF8/CFC, ECAM, the MMIO window).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::config::{BarKind, PciConfig, PciHeader, EXT_CONFIG_SIZE};
use super::{ConfigOnly, DecodedBar, PciError, PciFunction};
use crate::bus::BusDevice;

/// Slots on bus 0.
pub const NUM_SLOTS: usize = 32;

pub type SharedPciDevice = Arc<dyn PciFunction>;

/// The host bridge at 00:00.0 of a direct boot (Red Hat's "QEMU PCIe host bridge" ID,
/// class 06/00): configuration space only.
pub fn generic_host_bridge() -> ConfigOnly {
    ConfigOnly::new(PciConfig::new(&PciHeader {
        vendor_id: 0x1b36,
        device_id: 0x0008,
        class: 0x06_00_00,
        ..Default::default()
    }))
}

/// The port window I/O BARs are allocated from (and decode in): QEMU's PC uses the same,
/// SeaBIOS allocates from 0xC000.
pub const PIO_WINDOW: (u64, u64) = (0xc000, 0x4000);

/// Bus 0 and the BAR allocator of the 32-bit MMIO window and the port window. Built before the
/// vCPUs start; shared (`Arc`) afterwards. Each function locks itself; the root keeps a cache of
/// where every BAR decodes, refreshed after each configuration write to that function (the guest
/// may move BARs), so an access finds its function without touching any other.
pub struct PciRoot {
    /// Indexed by devfn (slot << 3 | function).
    functions: Vec<Option<SharedPciDevice>>,
    mmio_start: u64,
    mmio_end: u64,
    next_mmio: u64,
    next_pio: u64,
    /// (devfn, BAR) ranges that decode now.
    decode: RwLock<Vec<(u8, DecodedBar)>>,
}

/// Functions per slot.
const FUNCTIONS: usize = 8;

impl PciRoot {
    /// A bus with `host_bridge` in slot 0 (the generic one when None); BARs are allocated in
    /// `[mmio_start, +mmio_size)`.
    pub fn with_host_bridge(
        mmio_start: u64,
        mmio_size: u64,
        host_bridge: Option<SharedPciDevice>,
    ) -> Self {
        let mut functions: Vec<Option<SharedPciDevice>> = vec![None; NUM_SLOTS * FUNCTIONS];
        functions[0] =
            Some(host_bridge.unwrap_or_else(|| Arc::new(Mutex::new(generic_host_bridge()))));
        Self {
            functions,
            mmio_start,
            mmio_end: mmio_start.saturating_add(mmio_size),
            next_mmio: mmio_start,
            next_pio: PIO_WINDOW.0,
            decode: RwLock::new(Vec::new()),
        }
    }

    /// A bus with the generic host bridge in slot 0.
    pub fn new(mmio_start: u64, mmio_size: u64) -> Self {
        Self::with_host_bridge(mmio_start, mmio_size, None)
    }

    /// The first slot none of whose functions is taken.
    pub fn free_slot(&self) -> Result<u8, PciError> {
        (0..NUM_SLOTS)
            .find(|s| {
                self.functions[s * FUNCTIONS..(s + 1) * FUNCTIONS]
                    .iter()
                    .all(Option::is_none)
            })
            .map(|s| s as u8)
            .ok_or(PciError::NoSlot)
    }

    /// Puts `dev` in function 0 of `slot` and assigns its BARs from the MMIO window.
    pub fn insert(&mut self, slot: u8, dev: SharedPciDevice) -> Result<(), PciError> {
        self.insert_function(slot, 0, dev)
    }

    /// Puts `dev` at `slot`.`func` and assigns its BARs, naturally aligned, from the MMIO
    /// window (I/O BARs from [`PIO_WINDOW`]). (A multi-function slot's function 0 says so in
    /// its header type.)
    pub fn insert_function(
        &mut self,
        slot: u8,
        func: u8,
        dev: SharedPciDevice,
    ) -> Result<(), PciError> {
        let devfn = usize::from(slot) * FUNCTIONS + usize::from(func);
        if usize::from(func) >= FUNCTIONS || !matches!(self.functions.get(devfn), Some(None)) {
            return Err(PciError::SlotTaken(slot));
        }
        let specs = dev.bar_specs();
        let (mut next, mut next_pio) = (self.next_mmio, self.next_pio);
        let pio_end = PIO_WINDOW.0 + PIO_WINDOW.1;
        let mut assigned = Vec::new();
        for (i, spec) in specs {
            let (cursor, end, err): (&mut u64, u64, fn(u64) -> PciError) = match spec.kind {
                BarKind::Io => (&mut next_pio, pio_end, PciError::PioExhausted),
                _ => (&mut next, self.mmio_end, PciError::MmioExhausted),
            };
            let addr = cursor
                .checked_next_multiple_of(spec.size)
                .filter(|a| a.checked_add(spec.size).is_some_and(|e| e <= end))
                .ok_or(err(spec.size))?;
            assigned.push((i, addr));
            *cursor = addr + spec.size;
        }
        for (i, addr) in assigned {
            dev.assign_bar(i, addr);
        }
        (self.next_mmio, self.next_pio) = (next, next_pio);
        self.functions[devfn] = Some(dev);
        self.refresh_decode(devfn as u8);
        Ok(())
    }

    /// Re-reads where the BARs of function `devfn` decode.
    fn refresh_decode(&self, devfn: u8) {
        let now = match self.functions.get(usize::from(devfn)) {
            Some(Some(d)) => d.decoded_bars(),
            _ => Vec::new(),
        };
        let mut cache = self.decode.write().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(s, _)| *s != devfn);
        cache.extend(now.into_iter().map(|b| (devfn, b)));
    }

    /// The window BARs are allocated from (for the ACPI description).
    pub fn mmio_window(&self) -> (u64, u64) {
        (self.mmio_start, self.mmio_end - self.mmio_start)
    }

    /// True when some function has an I/O BAR (then the port window goes on the bus).
    pub fn has_io_bars(&self) -> bool {
        self.functions.iter().flatten().any(|f| {
            f.bar_specs()
                .iter()
                .any(|(_, spec)| spec.kind == BarKind::Io)
        })
    }

    /// Occupied slots.
    pub fn slots(&self) -> impl Iterator<Item = u8> + '_ {
        (0..NUM_SLOTS)
            .filter(|s| {
                self.functions[s * FUNCTIONS..(s + 1) * FUNCTIONS]
                    .iter()
                    .any(Option::is_some)
            })
            .map(|s| s as u8)
    }

    fn devfn(bus: u8, dev: u8, func: u8) -> Option<u8> {
        (bus == 0 && usize::from(dev) < NUM_SLOTS && usize::from(func) < FUNCTIONS)
            .then_some(dev << 3 | func)
    }

    fn function(&self, devfn: u8) -> Option<&SharedPciDevice> {
        self.functions.get(usize::from(devfn))?.as_ref()
    }

    /// Configuration read of bus/dev/func at `reg`; absent functions read all-ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg: u16, data: &mut [u8]) {
        let f = Self::devfn(bus, dev, func).and_then(|d| self.function(d));
        match f {
            Some(d) if usize::from(reg) + data.len() <= EXT_CONFIG_SIZE => d.config_read(reg, data),
            _ => data.fill(0xff),
        }
    }

    pub fn config_write(&self, bus: u8, dev: u8, func: u8, reg: u16, data: &[u8]) {
        let Some(devfn) = Self::devfn(bus, dev, func) else {
            return;
        };
        if let Some(d) = self.function(devfn) {
            if usize::from(reg) + data.len() <= EXT_CONFIG_SIZE {
                d.config_write(reg, data);
                // BAR addresses and the command register may have changed.
                self.refresh_decode(devfn);
            }
        }
    }

    /// The function and (BAR, offset) decoding `addr` in port space (`io`) or memory, from
    /// the cache.
    fn bar_device(&self, io: bool, addr: u64) -> Option<(&SharedPciDevice, usize, u64)> {
        let (devfn, bar, off) = {
            let cache = self.decode.read().unwrap_or_else(|e| e.into_inner());
            cache.iter().find_map(|(devfn, b)| {
                let off = addr
                    .checked_sub(b.addr)
                    .filter(|o| *o < b.len && b.io == io)?;
                Some((*devfn, b.bar, off))
            })?
        };
        Some((self.function(devfn)?, bar, off))
    }

    /// A guest access to `addr` in the MMIO window; unclaimed reads return all-ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.bar_read(false, addr, data)
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.bar_write(false, addr, data)
    }

    /// A guest access to `port` in the port window; unclaimed reads return all-ones.
    pub fn pio_read(&self, port: u64, data: &mut [u8]) {
        self.bar_read(true, port, data)
    }

    pub fn pio_write(&self, port: u64, data: &[u8]) {
        self.bar_write(true, port, data)
    }

    fn bar_read(&self, io: bool, addr: u64, data: &mut [u8]) {
        match self.bar_device(io, addr) {
            Some((d, bar, off)) => d.bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }

    fn bar_write(&self, io: bool, addr: u64, data: &[u8]) {
        if let Some((d, bar, off)) = self.bar_device(io, addr) {
            d.bar_write(bar, off, data);
        }
    }
}

/// Ports 0xCF8 (CONFIG_ADDRESS, dword) and 0xCFC..0xCFF (CONFIG_DATA): two bus entries sharing
/// one address register. 0xCF9 is the reset register, so CONFIG_ADDRESS is a 1-port range that
/// takes dword accesses.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: Arc<AtomicU32>,
    is_data: bool,
}

impl PciConfigIo {
    /// (the 0xCF8 device, the 0xCFC device)
    pub fn pair(root: Arc<PciRoot>) -> (Self, Self) {
        let address = Arc::new(AtomicU32::new(0));
        (
            Self {
                root: root.clone(),
                address: address.clone(),
                is_data: false,
            },
            Self {
                root,
                address,
                is_data: true,
            },
        )
    }

    /// (bus, dev, func, reg) of the current address plus `offset`, if enabled. As on QEMU's
    /// PC, CONFIG_ADDRESS bits 1:0 are kept and ORed into the register (kvm-unit-tests reads
    /// the device ID with CF8 = ...|2 and a word read at 0xCFC); Linux leaves them 0.
    fn target(&self, offset: u64, len: usize) -> Option<(u8, u8, u8, u16)> {
        let a = self.address.load(Ordering::SeqCst);
        let reg = (a & 0xff) as u16 | offset as u16;
        if a & 0x8000_0000 == 0 || offset > 3 || u64::from(reg & 3) + len as u64 > 4 {
            return None;
        }
        Some((
            (a >> 16) as u8,
            (a >> 11 & 0x1f) as u8,
            (a >> 8 & 7) as u8,
            reg,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if !self.is_data {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.load(Ordering::SeqCst).to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        match self.target(offset, data.len()) {
            Some((b, d, f, r)) => self.root.config_read(b, d, f, r, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if !self.is_data {
            if let (0, Ok(v)) = (offset, <[u8; 4]>::try_from(data)) {
                self.address
                    .store(u32::from_le_bytes(v) & 0x80ff_ffff, Ordering::SeqCst);
            }
            return;
        }
        if let Some((b, d, f, r)) = self.target(offset, data.len()) {
            self.root.config_write(b, d, f, r, data);
        }
    }
}

/// ECAM: 4 KiB of configuration space per function, bus 0 only (1 MiB).
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> (u8, u8, u8, u16) {
        (
            (offset >> 20) as u8,
            (offset >> 15 & 0x1f) as u8,
            (offset >> 12 & 7) as u8,
            (offset & 0xfff) as u16,
        )
    }
}

impl BusDevice for PciEcam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (b, d, f, r) = Self::decode(offset);
        self.root.config_read(b, d, f, r, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (b, d, f, r) = Self::decode(offset);
        self.root.config_write(b, d, f, r, data);
    }
}

/// A PCI MMIO window: accesses go to whichever BAR decodes them now.
pub struct PciMmioWindow {
    root: Arc<PciRoot>,
    base: u64,
}

impl PciMmioWindow {
    /// The window at the root's allocation window.
    pub fn new(root: Arc<PciRoot>) -> Self {
        let base = root.mmio_window().0;
        Self { root, base }
    }

    /// A window inserted on the MMIO bus at `base` (firmware may put BARs anywhere in the PCI
    /// holes, not only where ferrovm allocates them).
    pub fn at(root: Arc<PciRoot>, base: u64) -> Self {
        Self { root, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.root.mmio_read(self.base + offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.root.mmio_write(self.base + offset, data);
    }
}

/// The PCI port window ([`PIO_WINDOW`]): accesses go to whichever I/O BAR decodes them now.
pub struct PciIoWindow {
    root: Arc<PciRoot>,
}

impl PciIoWindow {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }
}

impl BusDevice for PciIoWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.root.pio_read(PIO_WINDOW.0 + offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.root.pio_write(PIO_WINDOW.0 + offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{BarSpec, COMMAND_MEMORY, REG_COMMAND};
    use super::super::PciError;
    use super::*;
    use crate::devices::pci::PciDevice;

    /// A device with one 64-bit BAR that remembers the last BAR write.
    struct Dummy {
        config: PciConfig,
        last: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_read(&mut self, reg: u16, data: &mut [u8]) {
            self.config.read(reg.into(), data)
        }
        fn config_write(&mut self, reg: u16, data: &[u8]) {
            self.config.write(reg.into(), data)
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last = Some((bar, offset, data.to_vec()));
        }
        fn assign_bar(&mut self, bar: usize, addr: u64) {
            self.config.set_bar_addr(bar, addr);
        }
    }

    fn root() -> (Arc<PciRoot>, Arc<Mutex<Dummy>>) {
        let mut r = PciRoot::new(0xc000_0000, 0x2000_0000);
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            ..Default::default()
        });
        config
            .add_bar(
                0,
                BarSpec {
                    size: 0x4000,
                    kind: BarKind::Mem64,
                    prefetchable: false,
                },
            )
            .unwrap();
        let d = Arc::new(Mutex::new(Dummy { config, last: None }));
        assert_eq!(r.free_slot().unwrap(), 1);
        r.insert(1, d.clone()).unwrap();
        assert!(r.insert(1, d.clone()).is_err());
        assert!(r.insert(32, d.clone()).is_err());
        (Arc::new(r), d)
    }

    fn cf8_read(a: &mut PciConfigIo, d: &mut PciConfigIo, addr: u32, off: u64, len: usize) -> u32 {
        a.write(0, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        d.read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn cf8_and_ecam_agree() {
        let (root, _) = root();
        let (mut a, mut d) = PciConfigIo::pair(root.clone());
        let ecam = PciEcam::new(root.clone());
        for dev in [0u32, 1, 2, 31] {
            for reg in (0..0x40u32).step_by(4) {
                let via_io = cf8_read(&mut a, &mut d, 0x8000_0000 | dev << 11 | reg, 0, 4);
                let mut b = [0u8; 4];
                ecam.read(u64::from(dev << 15 | reg), &mut b);
                assert_eq!(via_io, u32::from_le_bytes(b), "dev {dev} reg {reg:#x}");
            }
        }
        // Host bridge and device identities; empty slots and other functions read all-ones.
        assert_eq!(cf8_read(&mut a, &mut d, 0x8000_0000, 0, 4), 0x0008_1b36);
        assert_eq!(
            cf8_read(&mut a, &mut d, 0x8000_0000 | 1 << 11, 2, 2),
            0x1044
        );
        assert_eq!(
            cf8_read(&mut a, &mut d, 0x8000_0000 | 2 << 11, 0, 4),
            0xffff_ffff
        );
        assert_eq!(
            cf8_read(&mut a, &mut d, 0x8000_0000 | 1 << 11 | 1 << 8, 0, 4),
            0xffff_ffff
        );
        assert_eq!(cf8_read(&mut a, &mut d, 0x8001_0000, 0, 4), 0xffff_ffff);
        // Disabled CONFIG_ADDRESS reads all-ones; CONFIG_ADDRESS reads back.
        assert_eq!(cf8_read(&mut a, &mut d, 0x0000_0000, 0, 4), 0xffff_ffff);
        a.write(0, &0x8000_0803u32.to_le_bytes());
        let mut b = [0u8; 4];
        a.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0803);
        // CONFIG_ADDRESS bits 1:0 are ORed into the register, as QEMU does: a word read at
        // 0xCFC with CF8 = ...|2 is the device ID; one that would cross the dword is refused.
        assert_eq!(cf8_read(&mut a, &mut d, 0x8000_0802, 0, 2), 0x1044);
        assert_eq!(cf8_read(&mut a, &mut d, 0x8000_0803, 0, 2), 0xffff);
        // A write through ECAM is seen through CF8.
        ecam.write(1 << 15 | 0x3c, &[0x0b]);
        assert_eq!(cf8_read(&mut a, &mut d, 0x8000_083c, 0, 1), 0x0b);
        // Hostile: crossing the data port or the 4 KiB function space.
        d.read(3, &mut b);
        assert_eq!(b, [0xff; 4]);
        d.write(2, &[0; 4]);
        ecam.read(1 << 15 | 0xffe, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.write(1 << 15 | 0xffe, &[0; 4]);
        a.write(0, &[1]);
        a.read(0, &mut b[..2]);
        ecam.read(0xf_ffff, &mut b[..1]);
    }

    #[test]
    fn bars_are_assigned_and_decoded() {
        let (root, dev) = root();
        let win = PciMmioWindow::new(root.clone());
        let ecam = PciEcam::new(root.clone());
        let bar = dev.lock().unwrap().config().bar_addr(0).unwrap();
        assert_eq!(bar, 0xc000_0000);
        let mut b = [0u8; 4];
        // Memory decoding off: nothing answers.
        win.read(0x10, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.write(1 << 15 | REG_COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        win.read(0x10, &mut b);
        assert_eq!(b, [0x10; 4]);
        win.write(0x20, &[1, 2]);
        assert_eq!(dev.lock().unwrap().last, Some((0, 0x20, vec![1, 2])));
        // The guest moves the BAR: the window follows.
        ecam.write(1 << 15 | 0x10, &0xc010_0000u32.to_le_bytes());
        win.read(0x10, &mut b);
        assert_eq!(b, [0xff; 4]);
        win.read(0x10_0010, &mut b);
        assert_eq!(b, [0x10; 4]);
    }

    #[test]
    fn window_exhaustion_is_an_error() {
        let mut r = PciRoot::new(0xc000_0000, 0x1000);
        let mut config = PciConfig::new(&PciHeader::default());
        config
            .add_bar(
                0,
                BarSpec {
                    size: 0x2000,
                    kind: BarKind::Mem32,
                    prefetchable: false,
                },
            )
            .unwrap();
        let d = Arc::new(Mutex::new(Dummy { config, last: None }));
        assert!(matches!(
            r.insert(1, d),
            Err(PciError::MmioExhausted(0x2000))
        ));
    }

    /// An I/O BAR comes from the port window, decodes only with I/O decoding on, and the
    /// port window and the MMIO window never see each other's BARs.
    #[test]
    fn io_bars_decode_in_the_port_window() {
        let mut r = PciRoot::new(0xc000_0000, 0x1000_0000);
        let mut config = PciConfig::new(&PciHeader::default());
        let spec = |size, kind| BarSpec {
            size,
            kind,
            prefetchable: false,
        };
        config.add_bar(0, spec(0x1000, BarKind::Mem32)).unwrap();
        config.add_bar(1, spec(0x100, BarKind::Io)).unwrap();
        let d = Arc::new(Mutex::new(Dummy { config, last: None }));
        assert!(!r.has_io_bars());
        r.insert(1, d.clone()).unwrap();
        assert!(r.has_io_bars());
        let root = Arc::new(r);
        assert_eq!(d.lock().unwrap().config().bar_addr(1), Some(PIO_WINDOW.0));
        let ecam = PciEcam::new(root.clone());
        let pio = PciIoWindow::new(root.clone());
        let mmio = PciMmioWindow::new(root.clone());
        let mut b = [0u8; 2];
        ecam.write(1 << 15 | REG_COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        pio.read(4, &mut b);
        assert_eq!(b, [0xff; 2], "I/O decoding off");
        ecam.write(1 << 15 | REG_COMMAND as u64, &[3, 0]);
        pio.read(4, &mut b);
        assert_eq!(b, [1 + 4; 2], "BAR 1, offset 4");
        pio.write(0xff, &[7]);
        assert_eq!(d.lock().unwrap().last, Some((1, 0xff, vec![7])));
        pio.read(0x100, &mut b);
        assert_eq!(b, [0xff; 2], "past the I/O BAR");
        mmio.write(4, &[9]);
        assert_eq!(
            d.lock().unwrap().last,
            Some((0, 4, vec![9])),
            "the memory BAR"
        );
    }

    #[test]
    fn port_window_exhaustion_is_an_error() {
        let mut r = PciRoot::new(0xc000_0000, 0x1000_0000);
        for slot in 1..=(PIO_WINDOW.1 / 0x100) as u8 + 1 {
            let mut config = PciConfig::new(&PciHeader::default());
            let spec = BarSpec {
                size: 0x100,
                kind: BarKind::Io,
                prefetchable: false,
            };
            config.add_bar(0, spec).unwrap();
            let d = Arc::new(Mutex::new(Dummy { config, last: None }));
            let res = r.insert_function(slot / 8, slot % 8, d);
            if u64::from(slot) <= PIO_WINDOW.1 / 0x100 {
                res.unwrap();
            } else {
                assert!(matches!(res, Err(PciError::PioExhausted(0x100))));
            }
        }
    }
}
