//! The multiboot loader on its own (no file round trip): header search in the first 8 KiB,
//! the a.out kludge (load/load_end/bss_end/entry checks) and the ELF path, into a real
//! `GuestMemoryMmap` whose size the input picks; then the multiboot information.
#![no_main]
use libfuzzer_sys::fuzz_target;

use std::path::Path;

use ferrovm::arch::x86_64::multiboot::{find_header, load, write_info};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, file)) = data.split_first() else {
        return;
    };
    let Some(h) = find_header(file) else {
        return;
    };
    // 2..16 MiB of low RAM, sometimes with RAM above 4 GiB.
    let low = (2 + usize::from(sel & 0xf)) << 20;
    let mut ranges = vec![(GuestAddress(0), low)];
    if sel & 0x10 != 0 {
        ranges.push((GuestAddress(1 << 32), 1 << 20));
    }
    let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    if let Ok(l) = load(&mem, Path::new("fuzz.mb"), file, &h) {
        let _ = write_info(&mem, low as u64, 16, &[(l.end, 0x1000, "mod0"), (l.end + 0x1000, 0, "")]);
    }
});
