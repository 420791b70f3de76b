//! Guest memory as PC firmware sees it at reset, and the shadow RAM it switches on.
//!
//! ```text
//! 0x0000_0000 .. 0x000a_0000  RAM
//! 0x000a_0000 .. 0x000c_0000  nothing (the VGA window; reads all-ones)
//! 0x000c_0000 .. 0x0010_0000  13 PAM segments: at reset 0xe0000.. shows the ROM's last 128 KiB
//!                             and 0xc0000..0xdffff nothing; the firmware makes them RAM
//! 0x0010_0000 .. low RAM end  RAM
//! 4 GiB - ROM size .. 4 GiB   the firmware image, read-only (writes exit and are dropped)
//! 4 GiB ..                    RAM above 4 GiB
//! ```
//!
//! A PAM segment that reads from the ROM side but writes to RAM (mode 2, which neither SeaBIOS
//! nor OVMF uses) is shown as the ROM; its writes are dropped.

use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::layout;
use crate::devices::pci::i440fx::{pam_segment, ShadowRam, PAM_SEGMENTS};
use crate::kvm::vm::{MemorySlots, SlotSource, VmError};

/// KVM slot numbers: RAM pieces, the ROM, then one per PAM segment.
const SLOT_LOW_RAM: u32 = 0;
const SLOT_MID_RAM: u32 = 1;
const SLOT_HIGH_RAM: u32 = 2;
const SLOT_ROM: u32 = 3;
const SLOT_PAM_FIRST: u32 = 4;

/// The firmware's view of memory: RAM, the ROM, and the PAM segments in between.
pub struct FirmwareMemory {
    slots: Arc<MemorySlots>,
    mem: GuestMemoryMmap,
    rom: Arc<MmapRegion>,
    rom_size: u64,
}

impl FirmwareMemory {
    /// Maps RAM (`below_4g` bytes from 0, `above_4g` from 4 GiB, both in `mem`) around the
    /// legacy holes, and `image` just below 4 GiB. The PAM segments stay unmapped until the
    /// host bridge sets them (at its reset).
    pub fn map(
        slots: Arc<MemorySlots>,
        mem: &GuestMemoryMmap,
        image: &[u8],
        below_4g: u64,
        above_4g: u64,
    ) -> Result<Self, VmError> {
        let ram = Some(SlotSource::Ram(mem));
        slots.set(SLOT_LOW_RAM, 0, layout::VGA_WINDOW_START, ram, false)?;
        let mid = below_4g.saturating_sub(layout::SHADOW_END);
        if mid > 0 {
            let ram = Some(SlotSource::Ram(mem));
            slots.set(SLOT_MID_RAM, layout::SHADOW_END, mid, ram, false)?;
        }
        if above_4g > 0 {
            let ram = Some(SlotSource::Ram(mem));
            slots.set(SLOT_HIGH_RAM, layout::HIGH_RAM_START, above_4g, ram, false)?;
        }
        let rom = slots.add_rom(image)?;
        let rom_size = image.len() as u64;
        let at = layout::HIGH_RAM_START - rom_size;
        slots.set(SLOT_ROM, at, rom_size, Some(SlotSource::Rom(&rom, 0)), true)?;
        Ok(Self {
            slots,
            mem: mem.clone(),
            rom,
            rom_size,
        })
    }

    /// Where the ROM starts (4 GiB minus its size).
    pub fn rom_start(&self) -> u64 {
        layout::HIGH_RAM_START - self.rom_size
    }

    fn map_segment(&self, seg: usize, read: bool, write: bool) -> Result<(), VmError> {
        let (start, len) = pam_segment(seg);
        let slot = SLOT_PAM_FIRST + seg as u32;
        if read {
            return self
                .slots
                .set(slot, start, len, Some(SlotSource::Ram(&self.mem)), !write);
        }
        // The ROM side: the image's last 128 KiB alias 0xe0000..0x100000.
        let rom_alias = layout::SHADOW_END - 0x2_0000;
        match (start >= rom_alias).then(|| self.rom_size.checked_sub(layout::SHADOW_END - start)) {
            Some(Some(off)) => self.slots.set(
                slot,
                start,
                len,
                Some(SlotSource::Rom(&self.rom, off)),
                true,
            ),
            _ => self.slots.set(slot, start, len, None, true),
        }
    }
}

impl ShadowRam for FirmwareMemory {
    fn set_pam(&self, seg: usize, read: bool, write: bool) {
        if seg >= PAM_SEGMENTS {
            return;
        }
        if let Err(e) = self.map_segment(seg, read, write) {
            // The guest keeps running with the segment as it was or unmapped; the guest decides how often
            // this is tried, so the message is rate-limited.
            static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new(10);
            LOG.warn(|| format!("PAM segment {:#x}: {e}", pam_segment(seg).0));
        }
    }
}
