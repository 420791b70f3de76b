//! Initramfs placement: `load_initramfs` picks the highest page-aligned address below the
//! limit and low RAM's end, above the kernel and 1 MiB, and reads the file into guest
//! memory. The input chooses the RAM layout, the kernel end, the limit, the file size (a
//! sparse scratch file, at most 4 MiB) and its first bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

use ferrovm::arch::x86_64::boot::{load_initramfs, low_ram_end};
use ferrovm_fuzz::{scratch_file, Input};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let low = (u64::from(inp.u16() % 4096) + 1) << 12; // 4 KiB .. 16 MiB
    let extra = inp.u8();
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if extra & 1 != 0 {
        ranges.push((GuestAddress(1 << 32), 1 << 20));
    }
    if extra & 2 != 0 {
        // A region just above low RAM, with a gap.
        ranges.push((GuestAddress(low + 0x10_0000), 0x10_0000));
    }
    let Ok(mem) = GuestMemoryMmap::from_ranges(&ranges) else {
        return;
    };
    let kernel_end = match inp.u8() & 3 {
        0 => u64::from(inp.u32()),
        1 => inp.u64(),
        _ => low_ram_end(&mem) / 2,
    };
    let limit = match inp.u8() & 3 {
        0 => u64::from(inp.u32()),
        1 => inp.u64(),
        _ => u64::MAX,
    };
    let size = u64::from(inp.u32() % (4 << 20));
    let head = inp.rest();
    let path = scratch_file("initrd", head);
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
        let _ = f.set_len(size.max(head.len() as u64));
    }
    if let Ok((addr, len)) = load_initramfs(&mem, &path, kernel_end, limit) {
        assert!(addr % 4096 == 0, "initramfs at {addr:#x} is not page aligned");
        assert!(addr >= 0x10_0000 && addr >= kernel_end, "initramfs at {addr:#x} below its floor");
        assert!(addr + len <= low_ram_end(&mem).min(limit), "initramfs past its limit");
        let mut b = [0u8; 1];
        let _ = mem.read_slice(&mut b, GuestAddress(addr));
    }
});
