//! Loading a kernel into guest memory and writing what the boot protocol hands it.
//!
//! Three entry paths, chosen from the file's contents (never from its name):
//! - **bzImage**: the protected-mode payload is loaded at 1 MiB and entered in 64-bit mode at
//!   `load + 0x200` with RSI pointing at the zero page (Linux 64-bit boot protocol).
//! - **ELF with a PVH note** (`XEN_ELFNOTE_PHYS32_ENTRY`): entered in 32-bit protected mode with
//!   EBX pointing at `hvm_start_info` (the PVH boot ABI).
//! - **ELF without a PVH note**: entered at `e_entry` in 64-bit mode with RSI pointing at a zero
//!   page, like a bzImage. This is how firmware/ test programs run (documented fallback).
//! - **Multiboot v1** (a valid multiboot header in the first 8 KiB, checked before ELF): entered
//!   in 32-bit protected mode with EAX = 0x2BADB002, EBX = multiboot info (see `multiboot`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{start_info, Elf};
use linux_loader::loader::{KernelLoader, PvhBootCapability};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout;

/// E820 memory types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// How the kernel wants to be entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, RSI = zero page.
    Linux64 { entry: u64 },
    /// 32-bit protected mode, EBX = hvm_start_info.
    Pvh { entry: u64 },
    /// 32-bit protected mode, EAX = multiboot magic, EBX = multiboot info.
    Multiboot { entry: u64 },
}

/// The kind of kernel image, detected from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
    Multiboot,
}

/// What went wrong while loading the kernel, initramfs or boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    #[error("cannot read kernel {0}")]
    ReadKernel(PathBuf, #[source] std::io::Error),
    #[error("kernel {0} is neither a bzImage nor an ELF image (file too short or wrong magic)")]
    UnknownFormat(PathBuf),
    #[error("bzImage {path} is truncated: the header announces {expected} bytes of payload, the file has {actual}")]
    TruncatedBzImage {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("bzImage {0} does not support the 64-bit boot protocol (boot protocol 2.12+ with XLF_KERNEL_64 needed)")]
    Not64Bit(PathBuf),
    #[error("cannot load kernel {0}")]
    Load(PathBuf, #[source] linux_loader::loader::Error),
    #[error("kernel {path} does not fit in guest memory ({mem_size} bytes)")]
    KernelTooBig { path: PathBuf, mem_size: u64 },
    #[error("cannot read initramfs {0}")]
    ReadInitramfs(PathBuf, #[source] std::io::Error),
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel")]
    InitramfsTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel command line is too long ({len} bytes, the kernel accepts {max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error(transparent)]
    Multiboot(#[from] super::multiboot::MultibootError),
    #[error("cannot write {0} into guest memory")]
    WriteGuest(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// Detects the format of the kernel at `path`.
pub fn detect_format(path: &Path) -> Result<KernelFormat, BootError> {
    let mut f = File::open(path).map_err(|e| BootError::OpenKernel(path.into(), e))?;
    let mut head = [0u8; 8192];
    let n = read_up_to(&mut f, &mut head).map_err(|e| BootError::ReadKernel(path.into(), e))?;
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    if super::multiboot::find_header(&head[..n]).is_some() {
        return Ok(KernelFormat::Multiboot);
    }
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    Err(BootError::UnknownFormat(path.into()))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The result of loading a kernel.
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: EntryMode,
    /// First byte after the kernel image in guest memory.
    pub kernel_end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<linux_loader::bootparam::setup_header>,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let format = detect_format(path)?;
    let mut f = File::open(path).map_err(|e| BootError::OpenKernel(path.into(), e))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    match format {
        KernelFormat::BzImage => {
            check_bzimage(&mut f, path)?;
            let r = BzImage::load(mem, Some(GuestAddress(layout::HIMEM_START)), &mut f, himem)
                .map_err(|e| map_load_error(path, mem, e))?;
            Ok(LoadedKernel {
                format,
                entry: EntryMode::Linux64 {
                    entry: r.kernel_load.raw_value() + 0x200,
                },
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        KernelFormat::Multiboot => {
            let size = f
                .metadata()
                .map_err(|e| BootError::ReadKernel(path.into(), e))?
                .len();
            let mem_size: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
            if size > mem_size {
                return Err(BootError::KernelTooBig {
                    path: path.into(),
                    mem_size,
                });
            }
            let file = std::fs::read(path).map_err(|e| BootError::ReadKernel(path.into(), e))?;
            let header = super::multiboot::find_header(&file)
                .ok_or_else(|| BootError::UnknownFormat(path.into()))?;
            let loaded = super::multiboot::load(mem, path, &file, &header)?;
            Ok(LoadedKernel {
                format,
                entry: EntryMode::Multiboot {
                    entry: loaded.entry,
                },
                kernel_end: loaded.end,
                setup_header: None,
            })
        }
        KernelFormat::Elf => {
            let r =
                Elf::load(mem, None, &mut f, himem).map_err(|e| map_load_error(path, mem, e))?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryMode::Pvh {
                    entry: addr.raw_value(),
                },
                _ => EntryMode::Linux64 {
                    entry: r.kernel_load.raw_value(),
                },
            };
            Ok(LoadedKernel {
                format,
                entry,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
    }
}

fn map_load_error(path: &Path, mem: &GuestMemoryMmap, e: linux_loader::loader::Error) -> BootError {
    use linux_loader::loader::Error as L;
    let too_big = matches!(
        e,
        L::Bzimage(linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel)
            | L::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
    );
    if too_big {
        use vm_memory::GuestMemoryBackend;
        return BootError::KernelTooBig {
            path: path.into(),
            mem_size: mem.iter().map(vm_memory::GuestMemoryRegion::len).sum(),
        };
    }
    BootError::Load(path.into(), e)
}

/// Rejects bzImages that are truncated or cannot be entered in 64-bit mode, before loading.
fn check_bzimage(f: &mut File, path: &Path) -> Result<(), BootError> {
    let rd = |f: &mut File, off: u64, buf: &mut [u8]| -> Result<(), BootError> {
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(buf))
            .map_err(|e| BootError::ReadKernel(path.into(), e))
    };
    let mut b1 = [0u8; 1];
    let mut b2 = [0u8; 2];
    let mut b4 = [0u8; 4];
    rd(f, 0x1f1, &mut b1)?;
    let setup_sects = if b1[0] == 0 { 4 } else { b1[0] as u64 };
    rd(f, 0x1f4, &mut b4)?;
    let syssize = u32::from_le_bytes(b4) as u64 * 16;
    rd(f, 0x206, &mut b2)?;
    let version = u16::from_le_bytes(b2);
    rd(f, 0x236, &mut b2)?;
    let xloadflags = u16::from_le_bytes(b2);
    let file_len = f
        .seek(SeekFrom::End(0))
        .map_err(|e| BootError::ReadKernel(path.into(), e))?;
    let payload = file_len.saturating_sub((setup_sects + 1) * 512);
    if payload < syssize {
        return Err(BootError::TruncatedBzImage {
            path: path.into(),
            expected: syssize,
            actual: payload,
        });
    }
    if version < 0x020c || xloadflags & 1 == 0 {
        return Err(BootError::Not64Bit(path.into()));
    }
    Ok(())
}

/// Loads the initramfs as high as possible below `limit` (and below the MMIO hole), page
/// aligned, above the kernel. Returns (address, size).
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|e| BootError::ReadInitramfs(path.into(), e))?;
    let size = data.len() as u64;
    let top = limit.min(low_ram_end(mem));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end => a,
        _ => {
            return Err(BootError::InitramfsTooBig {
                path: path.into(),
                size,
                limit: top,
            })
        }
    };
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::WriteGuest("initramfs", e))?;
    Ok((addr, size))
}

/// End of the RAM region that starts at 0 (RAM below the MMIO hole).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0)
}

/// The e820 map for a guest with `mem_size` bytes of RAM: low RAM up to the EBDA, reserved
/// BIOS area up to 1 MiB, RAM up to the MMIO hole, reserved PCI ECAM, the rest above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for (start, len) in layout::ram_regions(mem_size) {
        let start = start.max(layout::HIMEM_START);
        let end = if start >= layout::HIGH_RAM_START {
            start + len
        } else {
            len.min(layout::MMIO_HOLE_START)
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    // PCI ECAM, reserved as firmware does, so the kernel's early MMCONFIG check accepts it.
    map.push((layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE, E820_RESERVED));
    map.sort_by_key(|e| e.0);
    map
}

/// Writes the command line (NUL-terminated) at `layout::CMDLINE_START`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max.saturating_sub(1),
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|e| BootError::WriteGuest("command line", e))
}

/// Everything the zero page / start_info carries.
pub struct BootInfo<'a> {
    pub kernel: &'a LoadedKernel,
    pub cmdline_len: usize,
    pub initramfs: Option<(u64, u64)>,
    pub rsdp: u64,
    pub mem_size: u64,
}

/// Writes the Linux zero page (`boot_params`) at `layout::ZERO_PAGE_START`.
pub fn write_zero_page(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = info.kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.loadflags |= 0x01 | 0x80; // LOADED_HIGH, CAN_USE_HEAP
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    params.hdr.kernel_alignment = params.hdr.kernel_alignment.max(0x20_0000);
    if let Some((addr, size)) = info.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp;
    let map = e820_map(info.mem_size);
    for (i, &(addr, size, kind)) in map.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|e| BootError::WriteGuest("zero page", e))
}

/// `hvm_start_info` as a ByteValued wrapper.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(start_info::hvm_start_info);
// SAFETY: plain-old-data C struct of integers with no padding holes that matter.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(start_info::hvm_memmap_table_entry);
// SAFETY: plain-old-data C struct of integers.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(start_info::hvm_modlist_entry);
// SAFETY: plain-old-data C struct of integers.
unsafe impl ByteValued for ModlistEntry {}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes the PVH `hvm_start_info`, its memory map and module list (the initramfs).
pub fn write_pvh_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let map = e820_map(info.mem_size);
    let map = &map[..map.len().min(layout::PVH_MEMMAP_MAX)];
    let mut addr = layout::PVH_MEMMAP_START;
    for &(a, size, kind) in map {
        let e = MemmapEntry(start_info::hvm_memmap_table_entry {
            addr: a,
            size,
            type_: kind,
            reserved: 0,
        });
        mem.write_obj(e, GuestAddress(addr))
            .map_err(|e| BootError::WriteGuest("PVH memory map", e))?;
        addr += std::mem::size_of::<MemmapEntry>() as u64;
    }
    let mut si = start_info::hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: info.rsdp,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = info.initramfs {
        let modlist = addr;
        mem.write_obj(
            ModlistEntry(start_info::hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }),
            GuestAddress(modlist),
        )
        .map_err(|e| BootError::WriteGuest("PVH module list", e))?;
        si.nr_modules = 1;
        si.modlist_paddr = modlist;
    }
    mem.write_obj(StartInfo(si), GuestAddress(layout::PVH_INFO_START))
        .map_err(|e| BootError::WriteGuest("PVH start_info", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_and_large() {
        let m = e820_map(256 << 20);
        assert_eq!(m[0], (0, layout::EBDA_START, E820_RAM));
        assert_eq!(
            m[2],
            (
                layout::HIMEM_START,
                (256 << 20) - layout::HIMEM_START,
                E820_RAM
            )
        );
        let m = e820_map(4 << 30);
        assert_eq!(
            m[2],
            (
                layout::HIMEM_START,
                layout::MMIO_HOLE_START - layout::HIMEM_START,
                E820_RAM
            )
        );
        assert_eq!(
            m[3],
            (layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE, E820_RESERVED)
        );
        assert_eq!(m[4], (layout::HIGH_RAM_START, 1 << 30, E820_RAM));
        let total: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(
            total,
            (4 << 30) - (layout::HIMEM_START - layout::EBDA_START)
        );
    }

    #[test]
    fn detects_formats_and_rejects_text() {
        let dir = std::env::temp_dir().join(format!("ferrovm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("text");
        std::fs::write(&text, "hello, I am not a kernel\n").unwrap();
        assert!(matches!(
            detect_format(&text),
            Err(BootError::UnknownFormat(_))
        ));
        let elf = dir.join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        assert_eq!(detect_format(&elf).unwrap(), KernelFormat::Elf);
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = dir.join("bz");
        std::fs::write(&bzp, &bz).unwrap();
        assert_eq!(detect_format(&bzp).unwrap(), KernelFormat::BzImage);
        assert!(matches!(
            detect_format(&dir.join("missing")),
            Err(BootError::OpenKernel(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
