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
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

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
    #[error(
        "bzImage {path} is too short for its setup header ({len} bytes, {BZ_HEADER_END} needed)"
    )]
    BzImageHeaderTruncated { path: PathBuf, len: usize },
    #[error("bzImage {path}: setup_sects {setup_sects} puts the payload at {offset:#x}, past the end of the file ({file_len} bytes)")]
    SetupBeyondFile {
        path: PathBuf,
        setup_sects: u8,
        offset: u64,
        file_len: u64,
    },
    #[error("bzImage {path}: init_size {init_size:#x} at load address {load:#x} overflows")]
    InitSizeOverflow {
        path: PathBuf,
        init_size: u64,
        load: u64,
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
    #[error("initramfs at {addr:#x}+{size:#x} does not fit the zero page's 32-bit ramdisk_image/ramdisk_size fields")]
    RamdiskAbove4G { addr: u64, size: u64 },
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
        KernelFormat::BzImage => load_bzimage(mem, path, &mut f),
        KernelFormat::Multiboot => load_multiboot(mem, path, f),
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

/// Loads a bzImage's protected-mode payload at 1 MiB. The kernel decompresses itself in place
/// and needs `init_size` bytes from its load address, so that is where the kernel ends.
fn load_bzimage(
    mem: &GuestMemoryMmap,
    path: &Path,
    f: &mut File,
) -> Result<LoadedKernel, BootError> {
    let init_size = check_bzimage(f, path)?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let r = BzImage::load(mem, himem, f, himem).map_err(|e| map_load_error(path, mem, e))?;
    let load = r.kernel_load.raw_value();
    let init_end = load
        .checked_add(init_size)
        .ok_or_else(|| BootError::InitSizeOverflow {
            path: path.into(),
            init_size,
            load,
        })?;
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        entry: EntryMode::Linux64 {
            // `load` is HIMEM_START (asked for above), far from overflowing.
            entry: load + 0x200,
        },
        kernel_end: r.kernel_end.max(init_end),
        setup_header: r.setup_header,
    })
}

/// Reads a multiboot kernel (at most as much as fits in low RAM) and loads it.
fn load_multiboot(mem: &GuestMemoryMmap, path: &Path, f: File) -> Result<LoadedKernel, BootError> {
    let limit = low_ram_end(mem);
    let mut file = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut file)
        .map_err(|e| BootError::ReadKernel(path.into(), e))?;
    if file.len() as u64 > limit {
        return Err(BootError::KernelTooBig {
            path: path.into(),
            mem_size: limit,
        });
    }
    let header = super::multiboot::find_header(&file)
        .ok_or_else(|| BootError::UnknownFormat(path.into()))?;
    let loaded = super::multiboot::load(mem, path, &file, &header)?;
    Ok(LoadedKernel {
        format: KernelFormat::Multiboot,
        entry: EntryMode::Multiboot {
            entry: loaded.entry,
        },
        kernel_end: loaded.end,
        setup_header: None,
    })
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

/// End of the setup header fields ferrovm reads (`init_size` at 0x260, boot protocol 2.10+).
pub const BZ_HEADER_END: usize = 0x264;

/// Rejects bzImages that are truncated or cannot be entered in 64-bit mode, before loading.
/// Returns the header's `init_size`.
fn check_bzimage(f: &mut File, path: &Path) -> Result<u64, BootError> {
    let read_err = |e| BootError::ReadKernel(path.into(), e);
    let mut head = [0u8; BZ_HEADER_END];
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let n = read_up_to(f, &mut head).map_err(read_err)?;
    if n < BZ_HEADER_END {
        return Err(BootError::BzImageHeaderTruncated {
            path: path.into(),
            len: n,
        });
    }
    // Fixed offsets inside the fixed-size buffer: no index depends on the file.
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    let setup_sects = head[0x1f1];
    let sects = if setup_sects == 0 {
        4
    } else {
        u64::from(setup_sects)
    };
    // Both fit easily in u64: (255 + 1) * 512 and u32::MAX * 16.
    let offset = (sects + 1) * 512;
    let syssize = u64::from(u32_at(0x1f4)) * 16;
    let version = u16_at(0x206);
    let xloadflags = u16_at(0x236);
    let file_len = f.seek(SeekFrom::End(0)).map_err(read_err)?;
    let payload = file_len
        .checked_sub(offset)
        .ok_or_else(|| BootError::SetupBeyondFile {
            path: path.into(),
            setup_sects,
            offset,
            file_len,
        })?;
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
    Ok(u64::from(u32_at(0x260)))
}

/// Loads the initramfs as high as possible below `limit` (and below the MMIO hole), page
/// aligned, above the kernel and 1 MiB. Returns (address, size). A regular file is read
/// straight into guest memory once its size is known to fit; anything else (a pipe) is read
/// only up to the room there is.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |e| BootError::ReadInitramfs(path.into(), e);
    let mut f = File::open(path).map_err(read_err)?;
    let meta = f.metadata().map_err(read_err)?;
    let top = limit.min(low_ram_end(mem));
    let floor = kernel_end.max(layout::HIMEM_START);
    let too_big = |size| BootError::InitramfsTooBig {
        path: path.into(),
        size,
        limit: top,
    };
    let piped = if meta.is_file() {
        None
    } else {
        let mut data = Vec::new();
        let room = top.saturating_sub(floor);
        (&mut f)
            .take(room.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(read_err)?;
        Some(data)
    };
    let size = piped.as_ref().map_or(meta.len(), |d| d.len() as u64);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= floor)
        .ok_or_else(|| too_big(size))?;
    match piped {
        Some(data) => mem.write_slice(&data, GuestAddress(addr)),
        None => {
            let len = usize::try_from(size).map_err(|_| too_big(size))?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        }
    }
    .map_err(|e| BootError::ReadInitramfs(path.into(), std::io::Error::other(e)))?;
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

/// Writes the command line (NUL-terminated) at `layout::CMDLINE_START`; `max` (the kernel's
/// limit, NUL included) is capped at `layout::CMDLINE_MAX_SIZE`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let max = max.min(layout::CMDLINE_MAX_SIZE);
    if cmdline.len().checked_add(1).is_none_or(|n| n > max) {
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
    params.hdr.cmdline_size =
        u32::try_from(info.cmdline_len).map_err(|_| BootError::CmdlineTooLong {
            len: info.cmdline_len,
            max: u32::MAX as usize,
        })?;
    params.hdr.kernel_alignment = params.hdr.kernel_alignment.max(0x20_0000);
    if let Some((addr, size)) = info.initramfs {
        let fields = u32::try_from(addr).and_then(|a| Ok((a, u32::try_from(size)?)));
        let (image, len) = fields.map_err(|_| BootError::RamdiskAbove4G { addr, size })?;
        params.hdr.ramdisk_image = image;
        params.hdr.ramdisk_size = len;
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

    fn mem16() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// A scratch directory for one test, removed when dropped.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("ferrovm-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
        fn file(&self, name: &str, data: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, data).unwrap();
            p
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn put(f: &mut [u8], off: usize, v: u64, n: usize) {
        f[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    /// A 64-bit-capable bzImage: one setup sector after the boot sector, then `payload` bytes.
    fn bzimage(syssize: u32, init_size: u32, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 1024 + payload];
        f[0x1f1] = 1; // setup_sects
        put(&mut f, 0x1f4, syssize.into(), 4);
        f[0x202..0x206].copy_from_slice(b"HdrS");
        put(&mut f, 0x206, 0x020f, 2); // version
        f[0x211] = 1; // loadflags: LOADED_HIGH
        put(&mut f, 0x214, layout::HIMEM_START, 4); // code32_start
        put(&mut f, 0x236, 1, 2); // xloadflags: XLF_KERNEL_64
        put(&mut f, 0x260, init_size.into(), 4);
        f
    }

    #[test]
    fn every_firmware_program_still_loads() {
        let d = TempDir::new("firmware");
        let mem = mem16();
        for (name, elf) in crate::firmware::ALL {
            let k = load_kernel(&mem, &d.file(name, elf));
            assert!(k.is_ok(), "{name}: {}", k.err().unwrap());
        }
    }

    #[test]
    fn bzimage_kernel_end_covers_init_size() {
        let d = TempDir::new("bz-ok");
        let k = load_kernel(&mem16(), &d.file("bz", &bzimage(1, 0x40_0000, 16))).unwrap();
        assert_eq!(k.kernel_end, layout::HIMEM_START + 0x40_0000);
        assert_eq!(
            k.entry,
            EntryMode::Linux64 {
                entry: layout::HIMEM_START + 0x200
            }
        );
    }

    #[test]
    fn bzimage_cut_off_in_its_header_is_an_error() {
        let d = TempDir::new("bz-short");
        let p = d.file("bz", &bzimage(0, 0, 0)[..0x210]);
        assert!(matches!(
            load_kernel(&mem16(), &p),
            Err(BootError::BzImageHeaderTruncated { len: 0x210, .. })
        ));
    }

    #[test]
    fn bzimage_setup_sects_past_the_file_is_an_error() {
        let d = TempDir::new("bz-sects");
        let mut f = bzimage(0, 0, 0);
        f[0x1f1] = 0xff;
        assert!(matches!(
            load_kernel(&mem16(), &d.file("bz", &f)),
            Err(BootError::SetupBeyondFile {
                setup_sects: 0xff,
                ..
            })
        ));
    }

    #[test]
    fn bzimage_huge_syssize_is_an_error() {
        let d = TempDir::new("bz-syssize");
        let p = d.file("bz", &bzimage(u32::MAX, 0, 16));
        assert!(matches!(
            load_kernel(&mem16(), &p),
            Err(BootError::TruncatedBzImage {
                expected: 0xf_ffff_fff0,
                actual: 16,
                ..
            })
        ));
    }

    #[test]
    fn bzimage_huge_init_size_leaves_no_room_for_the_initramfs() {
        let d = TempDir::new("bz-init-size");
        let mem = mem16();
        let k = load_kernel(&mem, &d.file("bz", &bzimage(1, u32::MAX, 16))).unwrap();
        assert_eq!(k.kernel_end, layout::HIMEM_START + u64::from(u32::MAX));
        let initrd = d.file("initrd", &[1; 64]);
        assert!(matches!(
            load_initramfs(&mem, &initrd, k.kernel_end, u64::MAX),
            Err(BootError::InitramfsTooBig { .. })
        ));
    }

    #[test]
    fn initramfs_goes_to_the_top_page_aligned() {
        let d = TempDir::new("initrd-ok");
        let mem = mem16();
        let p = d.file("initrd", &[7; 0x1800]);
        let (addr, size) = load_initramfs(&mem, &p, 0x20_0000, u64::MAX).unwrap();
        assert_eq!((addr, size), ((16 << 20) - 0x2000, 0x1800));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 0x17ff)).unwrap(), 7);
    }

    #[test]
    fn initramfs_larger_than_ram_is_refused_before_reading() {
        let d = TempDir::new("initrd-huge");
        let p = d.0.join("initrd");
        // Sparse: 1 TiB that was never written. Reading it into a Vec would exhaust the host.
        File::create(&p).unwrap().set_len(1 << 40).unwrap();
        assert!(matches!(
            load_initramfs(&mem16(), &p, 0, u64::MAX),
            Err(BootError::InitramfsTooBig { size, .. }) if size == 1 << 40
        ));
    }

    #[test]
    fn endless_initramfs_stream_is_read_only_up_to_the_room() {
        // Not a regular file, so its size is unknown: the read must stop past the free RAM.
        assert!(matches!(
            load_initramfs(&mem16(), Path::new("/dev/zero"), 0, u64::MAX),
            Err(BootError::InitramfsTooBig { size, .. }) if size == (15 << 20) + 1
        ));
    }

    #[test]
    fn initramfs_below_1mib_is_refused() {
        let d = TempDir::new("initrd-low");
        let p = d.file("initrd", &[1; 16]);
        // A header's initrd_addr_max of 0x7ffff would put it over the EBDA and ACPI tables.
        assert!(matches!(
            load_initramfs(&mem16(), &p, 0, 0x8_0000),
            Err(BootError::InitramfsTooBig { .. })
        ));
    }

    #[test]
    fn cmdline_limit_is_capped() {
        let mem = mem16();
        write_cmdline(&mem, "console=ttyS0", usize::MAX).unwrap();
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&mem, &long, usize::MAX),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn ramdisk_above_4g_is_an_error() {
        let kernel = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: EntryMode::Linux64 { entry: 0 },
            kernel_end: 0,
            setup_header: None,
        };
        let mut info = BootInfo {
            kernel: &kernel,
            cmdline_len: 0,
            initramfs: Some((1 << 32, 16)),
            rsdp: 0,
            mem_size: 16 << 20,
        };
        let mem = mem16();
        assert!(matches!(
            write_zero_page(&mem, &info),
            Err(BootError::RamdiskAbove4G { .. })
        ));
        info.initramfs = Some((0x20_0000, 1 << 32));
        assert!(matches!(
            write_zero_page(&mem, &info),
            Err(BootError::RamdiskAbove4G { .. })
        ));
        info.initramfs = Some((0x20_0000, 16));
        write_zero_page(&mem, &info).unwrap();
    }

    /// An ELF64 with one program header (type, offset, paddr, filesz, memsz) and, at 120, a
    /// note header (namesz, descsz, type) followed by 16 bytes.
    fn elf64(ph: [u64; 5], note: [u32; 3]) -> Vec<u8> {
        let mut f = vec![0u8; 120 + 12 + 16];
        f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        put(&mut f, 0x18, layout::HIMEM_START, 8); // e_entry
        put(&mut f, 0x20, 64, 8); // e_phoff
        put(&mut f, 0x36, 56, 2); // e_phentsize
        put(&mut f, 0x38, 1, 2); // e_phnum
        put(&mut f, 64, ph[0], 4);
        for (off, v) in [(8, ph[1]), (24, ph[2]), (32, ph[3]), (40, ph[4])] {
            put(&mut f, 64 + off, v, 8);
        }
        for (i, v) in note.into_iter().enumerate() {
            put(&mut f, 120 + 4 * i, v.into(), 4);
        }
        f
    }

    #[test]
    fn elf_hostile_program_headers_are_errors() {
        let d = TempDir::new("elf-hostile");
        let mem = mem16();
        let cases = [
            ("note-namesz", elf64([4, 120, 0, 28, 28], [u32::MAX, 0, 18])),
            ("note-descsz", elf64([4, 120, 0, 28, 28], [4, u32::MAX, 1])),
            ("note-offset", elf64([4, u64::MAX - 4, 0, 28, 28], [0; 3])),
            (
                "load-offset",
                elf64([1, u64::MAX - 4, 1 << 20, 16, 16], [0; 3]),
            ),
            ("load-paddr", elf64([1, 120, u64::MAX - 4, 16, 16], [0; 3])),
            (
                "load-filesz",
                elf64([1, 120, 1 << 20, 1 << 40, 1 << 40], [0; 3]),
            ),
        ];
        for (name, f) in cases {
            let r = load_kernel(&mem, &d.file(name, &f));
            assert!(r.is_err(), "{name}: loaded");
        }
        let ok = elf64([1, 120, 1 << 20, 16, 32], [0; 3]);
        let k = load_kernel(&mem, &d.file("ok", &ok)).unwrap();
        assert_eq!(k.kernel_end, (1 << 20) + 32);
    }
}
