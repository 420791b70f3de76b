//! A type-0 configuration header with memory and I/O BARs and a capability list.
//!
//! The first 256 bytes are emulated; the extended space (256..4096, reachable through ECAM)
//! reads as zeros, so the guest finds no extended capabilities. Every access is byte-wise
//! underneath, so odd sizes and unaligned offsets behave consistently.

use super::PciError;

/// Size of the emulated (conventional) configuration space.
pub const CONFIG_SIZE: usize = 256;
/// Size of a function's configuration space through ECAM.
pub const EXT_CONFIG_SIZE: usize = 4096;
pub const NUM_BARS: usize = 6;

pub const REG_COMMAND: usize = 0x04;
pub const REG_STATUS: usize = 0x06;
pub const REG_BAR0: usize = 0x10;
pub const REG_CAP_PTR: usize = 0x34;
pub const REG_INTERRUPT_LINE: usize = 0x3c;
pub const REG_INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAP_LIST: u16 = 1 << 4;
/// First byte available for capabilities (after the type-0 header).
const CAP_START: usize = 0x40;

/// The kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    /// Occupies two BAR registers (`index` and `index + 1`).
    Mem64,
    /// Port I/O: 4 to 256 ports, decoded in the 16-bit port space.
    Io,
}

/// The largest I/O BAR a function may have (PCI's limit).
pub const MAX_IO_BAR: u64 = 256;

/// What a device asks for in one BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// A power of two: memory at least 16 bytes (4 KiB or more is recommended), I/O 4 to
    /// [`MAX_IO_BAR`] ports.
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    spec: BarSpec,
    /// Always aligned to the size (bits below are not writable).
    addr: u64,
}

/// Identity fields of a header.
#[derive(Debug, Clone, Copy, Default)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class code: base class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 = no INTx, 1 = INTA# .. 4 = INTD#.
    pub interrupt_pin: u8,
}

/// Configuration space of one type-0 function.
pub struct PciConfig {
    regs: [u8; CONFIG_SIZE],
    /// Bits the guest may change (everything else is read-only).
    wmask: [u8; CONFIG_SIZE],
    /// BAR `i` (for a 64-bit BAR, `i` is its lower register).
    bars: [Option<Bar>; NUM_BARS],
    /// Register `i` is the upper half of the 64-bit BAR `i - 1`.
    upper: [bool; NUM_BARS],
    /// Offset of the last capability (to chain the next one).
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfig {
    pub fn new(h: &PciHeader) -> Self {
        let mut c = Self {
            regs: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            bars: [None; NUM_BARS],
            upper: [false; NUM_BARS],
            last_cap: None,
            next_cap: CAP_START,
        };
        c.set_u16(0x00, h.vendor_id);
        c.set_u16(0x02, h.device_id);
        c.regs[0x08] = h.revision;
        c.regs[0x09] = h.class as u8;
        c.regs[0x0a] = (h.class >> 8) as u8;
        c.regs[0x0b] = (h.class >> 16) as u8;
        c.regs[0x0e] = 0; // header type 0, single function
        c.set_u16(0x2c, h.subsystem_vendor_id);
        c.set_u16(0x2e, h.subsystem_id);
        c.regs[REG_INTERRUPT_PIN] = h.interrupt_pin;
        // Command: I/O, memory, bus master; INTx disable. Decoding starts off, as at reset.
        let cmd = 0x0007 | COMMAND_INTX_DISABLE;
        c.wmask[REG_COMMAND..REG_COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        c.wmask[0x0c] = 0xff; // cache line size
        c.wmask[0x0d] = 0xff; // latency timer
        c.wmask[REG_INTERRUPT_LINE] = 0xff;
        c
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.regs[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Declares BAR `index`. Its address starts at 0 until [`PciConfig::set_bar_addr`].
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        let regs = if spec.kind == BarKind::Mem64 { 2 } else { 1 };
        let size_ok = match spec.kind {
            BarKind::Mem32 => (16..=1 << 31).contains(&spec.size),
            BarKind::Mem64 => spec.size >= 16,
            BarKind::Io => (4..=MAX_IO_BAR).contains(&spec.size) && !spec.prefetchable,
        };
        let ok = index + regs <= NUM_BARS
            && spec.size.is_power_of_two()
            && size_ok
            && (index..index + regs).all(|i| self.bars[i].is_none() && !self.upper[i]);
        if !ok {
            return Err(PciError::BadBar(index));
        }
        self.bars[index] = Some(Bar { spec, addr: 0 });
        if regs == 2 {
            self.upper[index + 1] = true;
        }
        Ok(())
    }

    /// The BARs declared, by index.
    pub fn bar_specs(&self) -> Vec<(usize, BarSpec)> {
        (0..NUM_BARS)
            .filter_map(|i| self.bars[i].map(|b| (i, b.spec)))
            .collect()
    }

    /// Sets BAR `index`'s address (truncated to its alignment); ignored for an absent BAR.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        if let Some(Some(b)) = self.bars.get_mut(index) {
            b.addr = addr & !(b.spec.size - 1);
            if b.spec.kind != BarKind::Mem64 {
                b.addr &= 0xffff_ffff;
            }
        }
    }

    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        self.bars.get(index).copied().flatten().map(|b| b.addr)
    }

    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.regs[REG_COMMAND], self.regs[REG_COMMAND + 1]])
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO != 0
    }

    /// Turns decoding on as firmware leaves it after assigning the BARs (command bits set
    /// device-side: a direct boot has no firmware, and a test kernel does not set them).
    pub fn enable_decoding(&mut self, io: bool, memory: bool) {
        let mut cmd = self.command();
        if io {
            cmd |= COMMAND_IO;
        }
        if memory {
            cmd |= COMMAND_MEMORY;
        }
        self.set_u16(REG_COMMAND, cmd);
    }

    /// True when BAR `b` decodes now: its address is set and its kind of decoding is on.
    fn decodes(&self, b: &Bar) -> bool {
        b.addr != 0
            && match b.spec.kind {
                BarKind::Io => self.io_enabled(),
                BarKind::Mem32 | BarKind::Mem64 => self.memory_enabled(),
            }
    }

    /// The BARs that decode now: (index, kind, address, size).
    pub fn decoded(&self) -> Vec<(usize, BarKind, u64, u64)> {
        (0..NUM_BARS)
            .filter_map(|i| {
                let b = self.bars[i].filter(|b| self.decodes(b))?;
                Some((i, b.spec.kind, b.addr, b.spec.size))
            })
            .collect()
    }

    /// The memory BAR decoding `addr` (memory decoding enabled), and the offset inside it.
    pub fn bar_at(&self, addr: u64) -> Option<(usize, u64)> {
        self.decoded()
            .into_iter()
            .find_map(|(i, kind, start, size)| {
                let off = addr.checked_sub(start)?;
                (kind != BarKind::Io && off < size).then_some((i, off))
            })
    }

    /// Appends a capability: `body` follows the ID and next-pointer bytes; `body_wmask` (same
    /// length or shorter; missing bytes are read-only) says which bits the guest may write.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        body_wmask: &[u8],
    ) -> Result<usize, PciError> {
        let len = body.len() + 2;
        let off = self.next_cap;
        if off + len > CONFIG_SIZE {
            return Err(PciError::CapabilitySpace(len));
        }
        self.regs[off] = id;
        self.regs[off + 1] = 0;
        self.regs[off + 2..off + len].copy_from_slice(body);
        for (i, m) in body_wmask.iter().take(body.len()).enumerate() {
            self.wmask[off + 2 + i] = *m;
        }
        match self.last_cap {
            Some(prev) => self.regs[prev + 1] = off as u8,
            None => {
                self.regs[REG_CAP_PTR] = off as u8;
                let st = u16::from_le_bytes([self.regs[REG_STATUS], self.regs[REG_STATUS + 1]])
                    | STATUS_CAP_LIST;
                self.set_u16(REG_STATUS, st);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len).next_multiple_of(4);
        Ok(off)
    }

    /// Makes the bits of `mask` writable by the guest at `off..` (chipset registers).
    pub fn set_wmask(&mut self, off: usize, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            if let Some(w) = self.wmask.get_mut(off + i) {
                *w = *m;
            }
        }
    }

    /// Marks function 0 of a multi-function device (header type bit 7).
    pub fn set_multifunction(&mut self) {
        self.regs[0x0e] |= 0x80;
    }

    /// The raw registers (for devices that interpret their capabilities).
    pub fn regs(&self) -> &[u8; CONFIG_SIZE] {
        &self.regs
    }

    /// Overwrites raw register bytes (device-side updates of read-only fields); out-of-range
    /// bytes are dropped.
    pub fn set_regs(&mut self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(r) = self.regs.get_mut(off + i) {
                *r = *b;
            }
        }
    }

    /// The 32-bit value of BAR register `i`.
    fn bar_dword(&self, i: usize) -> u32 {
        if self.upper[i] {
            return self.bars[i - 1].map_or(0, |b| (b.addr >> 32) as u32);
        }
        match self.bars[i] {
            Some(b) if b.spec.kind == BarKind::Io => (b.addr as u32 & !0x3) | 1,
            Some(b) => {
                let mut flags = 0u32;
                if b.spec.kind == BarKind::Mem64 {
                    flags |= 0b100;
                }
                if b.spec.prefetchable {
                    flags |= 0b1000;
                }
                (b.addr as u32 & !0xf) | flags
            }
            None => 0,
        }
    }

    fn write_bar_dword(&mut self, i: usize, v: u32) {
        if self.upper[i] {
            if let Some(b) = &mut self.bars[i - 1] {
                let mask = !(b.spec.size - 1);
                b.addr = ((b.addr & 0xffff_ffff) | (u64::from(v) << 32)) & mask;
            }
        } else if let Some(b) = &mut self.bars[i] {
            let mask = !(b.spec.size - 1);
            b.addr = ((b.addr & !0xffff_ffff) | u64::from(v)) & mask;
        }
    }

    fn read_byte(&self, off: usize) -> u8 {
        if (REG_BAR0..REG_BAR0 + 4 * NUM_BARS).contains(&off) {
            let i = (off - REG_BAR0) / 4;
            return self.bar_dword(i).to_le_bytes()[(off - REG_BAR0) % 4];
        }
        self.regs.get(off).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes at `off`: anything past the emulated header reads as zero,
    /// anything past 4 KiB as all-ones.
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = off.saturating_add(i);
            *b = if o < EXT_CONFIG_SIZE {
                self.read_byte(o)
            } else {
                0xff
            };
        }
    }

    /// Writes `data` at `off`, honouring the write masks; BAR registers keep their size alignment
    /// (so writing all-ones and reading back gives the size mask).
    pub fn write(&mut self, off: usize, data: &[u8]) {
        let bar_range = REG_BAR0..REG_BAR0 + 4 * NUM_BARS;
        // BAR registers are merged per dword and written as a whole.
        let mut bar_dwords: [Option<[u8; 4]>; NUM_BARS] = [None; NUM_BARS];
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = off.checked_add(i).filter(|o| *o < CONFIG_SIZE) else {
                continue;
            };
            if bar_range.contains(&o) {
                let r = (o - REG_BAR0) / 4;
                let cur = bar_dwords[r].get_or_insert(self.bar_dword(r).to_le_bytes());
                cur[(o - REG_BAR0) % 4] = b;
            } else {
                self.regs[o] = (self.regs[o] & !self.wmask[o]) | (b & self.wmask[o]);
            }
        }
        for (r, v) in bar_dwords.iter().enumerate() {
            if let Some(v) = v {
                self.write_bar_dword(r, u32::from_le_bytes(*v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        let mut c = PciConfig::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class: 0xff0000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            interrupt_pin: 1,
        });
        c.add_bar(
            0,
            BarSpec {
                size: 0x8000,
                kind: BarKind::Mem64,
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            BarSpec {
                size: 0x1000,
                kind: BarKind::Mem32,
                prefetchable: true,
            },
        )
        .unwrap();
        c.set_bar_addr(0, 0xc000_0000);
        c.set_bar_addr(2, 0xc001_0000);
        c
    }

    fn r32(c: &PciConfig, off: usize) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(c: &mut PciConfig, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_and_read_only_fields() {
        let mut c = cfg();
        assert_eq!(r32(&c, 0), 0x1044_1af4);
        assert_eq!(r32(&c, 8), 0xff00_0001);
        w32(&mut c, 0, 0xdead_beef);
        assert_eq!(r32(&c, 0), 0x1044_1af4);
        assert_eq!(r32(&c, 0x2c), 0x1100_1af4);
        assert_eq!(c.regs()[REG_INTERRUPT_PIN], 1);
        c.write(REG_INTERRUPT_LINE, &[0x0b]);
        assert_eq!(c.regs()[REG_INTERRUPT_LINE], 0x0b);
        c.write(REG_COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), 0x0407);
        assert!(c.memory_enabled());
    }

    #[test]
    fn bar_sizing_and_relocation() {
        let mut c = cfg();
        assert_eq!(r32(&c, 0x10), 0xc000_0004);
        assert_eq!(r32(&c, 0x14), 0);
        assert_eq!(r32(&c, 0x18), 0xc001_0008);
        // Size probe of the 64-bit BAR: all-ones into both halves.
        w32(&mut c, 0x10, 0xffff_ffff);
        w32(&mut c, 0x14, 0xffff_ffff);
        assert_eq!(r32(&c, 0x10), 0xffff_8004);
        assert_eq!(r32(&c, 0x14), 0xffff_ffff);
        // Restore and move.
        w32(&mut c, 0x10, 0xc000_8000);
        w32(&mut c, 0x14, 0);
        assert_eq!(c.bar_addr(0), Some(0xc000_8000));
        w32(&mut c, 0x18, 0xffff_ffff);
        assert_eq!(r32(&c, 0x18), 0xffff_f008);
        // Unimplemented BARs and the ROM read zero whatever is written.
        for off in [0x20, 0x24, 0x30] {
            w32(&mut c, off, 0xffff_ffff);
            assert_eq!(r32(&c, off), 0, "{off:#x}");
        }
        // Byte writes into a BAR merge with the rest of the dword.
        c.write(0x13, &[0xd0]);
        assert_eq!(c.bar_addr(0), Some(0xd000_8000));
    }

    #[test]
    fn bar_decoding_needs_memory_enable() {
        let mut c = cfg();
        assert_eq!(c.bar_at(0xc000_0010), None);
        c.write(REG_COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_at(0xc000_0010), Some((0, 0x10)));
        assert_eq!(c.bar_at(0xc001_0fff), Some((2, 0xfff)));
        assert_eq!(c.bar_at(0xc001_1000), None);
        assert_eq!(c.bar_at(0xbfff_ffff), None);
    }

    #[test]
    fn rejects_bad_bars() {
        let mut c = cfg();
        let s = |size, kind| BarSpec {
            size,
            kind,
            prefetchable: false,
        };
        assert!(c.add_bar(1, s(0x1000, BarKind::Mem32)).is_err()); // upper half of BAR 0
        assert!(c.add_bar(2, s(0x1000, BarKind::Mem32)).is_err()); // taken
        assert!(c.add_bar(5, s(0x1000, BarKind::Mem64)).is_err()); // no room for the upper half
        assert!(c.add_bar(3, s(0x1800, BarKind::Mem32)).is_err()); // not a power of two
        assert!(c.add_bar(3, s(8, BarKind::Mem32)).is_err());
        assert!(c.add_bar(6, s(0x1000, BarKind::Mem32)).is_err());
        assert!(c.add_bar(3, s(0x1000, BarKind::Mem32)).is_ok());
    }

    #[test]
    fn capability_list_walk() {
        let mut c = cfg();
        let a = c.add_capability(0x09, &[4, 1, 2], &[]).unwrap();
        let b = c.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(r32(&c, 4) >> 16 & 0x10, 0, "status: capability list");
        let mut ids = vec![];
        let mut p = c.regs()[REG_CAP_PTR] as usize;
        while p != 0 {
            ids.push(c.regs()[p]);
            p = c.regs()[p + 1] as usize;
        }
        assert_eq!(ids, vec![0x09, 0x11]);
        // Only the masked bits of a capability are writable.
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(&c.regs()[b + 2..b + 4], &[0, 0xc0]);
        c.write(a, &[0, 0]);
        assert_eq!(c.regs()[a], 0x09);
        // Running out of space fails cleanly.
        assert!(c.add_capability(0x09, &[0; 250], &[]).is_err());
    }

    #[test]
    fn hostile_accesses() {
        let mut c = cfg();
        let mut big = [0u8; 8];
        for off in [
            0usize,
            1,
            3,
            0x11,
            0xfd,
            0xff,
            0x100,
            0xffd,
            0xfff,
            0x1000,
            usize::MAX - 2,
        ] {
            for len in [1usize, 2, 3, 4, 8] {
                c.read(off, &mut big[..len]);
                c.write(off, &[0xff; 8][..len]);
            }
        }
        c.read(0x100, &mut big[..4]);
        assert_eq!(&big[..4], &[0; 4], "extended space reads zero");
        c.read(0xffe, &mut big[..4]);
        assert_eq!(&big[..4], &[0, 0, 0xff, 0xff]);
        assert_eq!(r32(&c, 0), 0x1044_1af4);
    }

    #[test]
    fn io_bars_size_and_decode_with_io_enable() {
        let mut c = cfg();
        let io = |size| BarSpec {
            size,
            kind: BarKind::Io,
            prefetchable: false,
        };
        assert!(c.add_bar(3, io(512)).is_err(), "larger than PCI allows");
        assert!(c.add_bar(3, io(2)).is_err());
        let prefetchable = BarSpec {
            prefetchable: true,
            ..io(16)
        };
        assert!(c.add_bar(3, prefetchable).is_err());
        c.add_bar(3, io(0x40)).unwrap();
        c.set_bar_addr(3, 0xc07f);
        assert_eq!(r32(&c, 0x1c), 0xc041);
        w32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(r32(&c, 0x1c), 0xffff_ffc1);
        w32(&mut c, 0x1c, 0xd000);
        assert_eq!(c.bar_addr(3), Some(0xd000));
        c.write(REG_COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert!(c.decoded().iter().all(|d| d.1 != BarKind::Io));
        c.enable_decoding(true, false);
        assert!(c.io_enabled() && c.memory_enabled());
        assert!(c.decoded().contains(&(3, BarKind::Io, 0xd000, 0x40)));
        assert_eq!(c.bar_at(0xd000), None, "bar_at is memory only");
    }
}
