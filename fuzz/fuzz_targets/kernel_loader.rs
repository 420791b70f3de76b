//! The kernel loaders: the fuzz input is the kernel file. ferrovm's `load_kernel` detects
//! the format (bzImage setup header, multiboot header in the first 8 KiB, ELF) and loads it
//! into a real `GuestMemoryMmap` (bzImage: the setup-header checks, then linux-loader;
//! ELF/PVH: linux-loader and the PVH note; multiboot: the a.out kludge or ELF loader), then
//! writes the boot data the entry mode needs (zero page, PVH start_info or multiboot info).
#![no_main]
use libfuzzer_sys::fuzz_target;

use std::sync::OnceLock;

use ferrovm::arch::x86_64::boot::{
    load_kernel, write_cmdline, write_pvh_info, write_zero_page, BootInfo, EntryMode,
};
use ferrovm::arch::x86_64::multiboot;
use ferrovm_fuzz::scratch_file;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// 24 MiB at 0 and 8 MiB at 4 GiB, made once (the loaders only write into it).
fn mem() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 24 << 20),
            (GuestAddress(1 << 32), 8 << 20),
        ])
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = mem();
    let path = scratch_file("kernel", data);
    let Ok(k) = load_kernel(mem, &path) else {
        return;
    };
    let cmdline = "console=ttyS0 reboot=k panic=1";
    let _ = write_cmdline(mem, cmdline, 2048);
    let info = BootInfo {
        kernel: &k,
        cmdline_len: cmdline.len() + 1,
        initramfs: Some((k.kernel_end & !0xfff, 0x1000)),
        rsdp: 0xe0000,
        mem_size: 24 << 20,
    };
    match k.entry {
        EntryMode::Linux64 { .. } => {
            let _ = write_zero_page(mem, &info);
        }
        EntryMode::Pvh { .. } => {
            let _ = write_pvh_info(mem, &info);
        }
        EntryMode::Multiboot { .. } => {
            let _ = multiboot::write_info(
                mem,
                24 << 20,
                cmdline.len(),
                &[(k.kernel_end, 0x1000, "initrd.img")],
            );
        }
    }
});
