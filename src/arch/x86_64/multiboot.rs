//! Multiboot (version 1) kernels, as QEMU's `-kernel` loads them: the hypervisor test kernels
//! written for QEMU (kvm-unit-tests style) boot this way.
//!
//! The header (magic 0x1BADB002, in the first 8 KiB, 4-byte aligned) either carries load
//! addresses (flag bit 16, "a.out kludge") or the file is an ELF (32- or 64-bit) whose PT_LOAD
//! segments are loaded at their physical addresses. The kernel is entered in 32-bit protected
//! mode without paging, EAX = 0x2BADB002, EBX = the multiboot information structure.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{e820_map, BootError};
use super::layout;

pub const HEADER_MAGIC: u32 = 0x1bad_b002;
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
const SEARCH_LEN: usize = 8192;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Header flags ferrovm can honour: page-align modules (0), memory info (1), a.out kludge (16).
/// Bit 2 (video mode) is accepted and ignored (there is no display).
const SUPPORTED_FLAGS: u32 = (1 << 0) | (1 << 1) | (1 << 2) | FLAG_AOUT_KLUDGE;

const MBI_FLAG_MEM: u32 = 1 << 0;
const MBI_FLAG_CMDLINE: u32 = 1 << 2;
const MBI_FLAG_MODS: u32 = 1 << 3;
const MBI_FLAG_MMAP: u32 = 1 << 6;
const MBI_FLAG_LOADER_NAME: u32 = 1 << 9;

/// A parsed multiboot header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Byte offset of the header in the file.
    pub offset: usize,
    pub flags: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// Size of a header with the a.out kludge fields (magic .. entry_addr).
const KLUDGE_HEADER_LEN: usize = 32;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The little-endian integer of `n` (at most 8) bytes at `off` in `b`, if all of it is in `b`.
fn le_at(b: &[u8], off: u64, n: usize) -> Option<u64> {
    let start = usize::try_from(off).ok()?;
    let bytes = b.get(start..start.checked_add(n)?)?;
    let mut v = [0u8; 8];
    v.get_mut(..n)?.copy_from_slice(bytes);
    Some(u64::from_le_bytes(v))
}

/// Finds a valid multiboot header (magic + flags + checksum == 0) in the first 8 KiB.
pub fn find_header(file: &[u8]) -> Option<Header> {
    let end = file.len().min(SEARCH_LEN);
    (0..end.saturating_sub(11)).step_by(4).find_map(|off| {
        let magic = u32_at(file, off)?;
        let flags = u32_at(file, off + 4)?;
        let sum = u32_at(file, off + 8)?;
        if magic != HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(sum) != 0 {
            return None;
        }
        // Missing fields read as 0; `load` rejects a kludge header the file cuts off.
        let field = |i: usize| u32_at(file, off + 12 + 4 * i).unwrap_or(0);
        Some(Header {
            offset: off,
            flags,
            header_addr: field(0),
            load_addr: field(1),
            load_end_addr: field(2),
            bss_end_addr: field(3),
            entry_addr: field(4),
        })
    })
}

/// What failed in a multiboot image. Every variant names the file (or the module) and the
/// header field whose value is unusable.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    #[error(
        "multiboot kernel {0}: unsupported header flags {1:#x} (supported: {SUPPORTED_FLAGS:#x})"
    )]
    Flags(String, u32),
    #[error("multiboot kernel {0}: the a.out kludge header at offset {1:#x} is cut off by the end of the file")]
    KludgeTruncated(String, usize),
    #[error("multiboot kernel {0}: header_addr {1:#x} is below load_addr {2:#x}")]
    HeaderAddrBelowLoadAddr(String, u32, u32),
    #[error("multiboot kernel {0}: load_addr {1:#x} puts the start of the image before the beginning of the file")]
    LoadAddrBeforeFile(String, u32),
    #[error("multiboot kernel {0}: load_end_addr {1:#x} is below load_addr {2:#x}")]
    LoadEndBelowLoadAddr(String, u32, u32),
    #[error(
        "multiboot kernel {0}: load_end_addr {1:#x} reaches past the end of the file ({2} bytes)"
    )]
    LoadEndPastFile(String, u32, usize),
    #[error("multiboot kernel {0}: load_addr {1:#x} + image size {2:#x} overflows")]
    LoadEndOverflow(String, u32, u64),
    #[error(
        "multiboot kernel {0}: bss_end_addr {1:#x} is below the end of the loaded image {2:#x}"
    )]
    BssEndBelowLoadEnd(String, u32, u64),
    #[error("multiboot kernel {0}: no a.out kludge and not a valid ELF file")]
    NotElf(String),
    #[error("multiboot kernel {0}: ELF e_entry {1:#x} is above 4 GiB (multiboot kernels start in 32-bit mode)")]
    ElfEntry(String, u64),
    #[error(
        "multiboot kernel {0}: ELF e_phentsize {1} is smaller than a program header ({2} bytes)"
    )]
    ElfPhentsize(String, u64, u64),
    #[error("multiboot kernel {0}: ELF program header table (e_phoff {1:#x}, e_phnum {2}, e_phentsize {3}) lies outside the file")]
    ElfPhdrTable(String, u64, u64, u64),
    #[error("multiboot kernel {0}: ELF program header {1}: p_offset {2:#x} + p_filesz {3:#x} lies outside the file ({4} bytes)")]
    ElfSegmentOutsideFile(String, u64, u64, u64, usize),
    #[error(
        "multiboot kernel {0}: ELF program header {1}: p_filesz {2:#x} exceeds p_memsz {3:#x}"
    )]
    ElfFileszAboveMemsz(String, u64, u64, u64),
    #[error(
        "multiboot kernel {0}: ELF program header {1}: p_paddr {2:#x} + p_memsz {3:#x} overflows"
    )]
    ElfPaddrOverflow(String, u64, u64, u64),
    #[error("multiboot kernel {0}: segment at {1:#x}+{2:#x} is outside guest RAM")]
    Segment(String, u64, u64),
    #[error("multiboot kernel {0}: segment at {1:#x}+{2:#x} overlaps {3} ({4:#x}-{5:#x}), which ferrovm places there")]
    SegmentOverlap(String, u64, u64, &'static str, u64, u64),
    #[error("multiboot module at {0:#x}+{1:#x} ends above 4 GiB (the info structure holds 32-bit addresses)")]
    ModuleAbove4G(u64, u64),
    #[error("the strings of {0} multiboot modules do not fit after the command line (or one holds a NUL)")]
    ModuleStrings(usize),
    #[error("{0} multiboot modules do not fit in the multiboot information area")]
    TooManyModules(usize),
}

/// A loaded multiboot kernel.
pub struct Loaded {
    pub entry: u64,
    /// First byte after everything loaded (modules go above this).
    pub end: u64,
}

/// Loads the multiboot kernel `file` (read from `path`) into `mem`.
pub fn load(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &[u8],
    h: &Header,
) -> Result<Loaded, BootError> {
    let name = path.display().to_string();
    if h.flags & !SUPPORTED_FLAGS & 0xffff != 0 {
        return Err(MultibootError::Flags(name, h.flags).into());
    }
    if h.flags & FLAG_AOUT_KLUDGE != 0 {
        return load_kludge(mem, &name, file, h);
    }
    load_elf(mem, &name, file)
}

/// The a.out kludge: the file from (header offset - (header_addr - load_addr)) up to
/// load_end_addr (or the end of the file) is loaded at load_addr, then zeroed up to bss_end_addr.
fn load_kludge(
    mem: &GuestMemoryMmap,
    name: &str,
    file: &[u8],
    h: &Header,
) -> Result<Loaded, BootError> {
    use MultibootError as E;
    let n = || name.to_string();
    let header_end = h.offset.checked_add(KLUDGE_HEADER_LEN);
    if header_end.is_none_or(|e| e > file.len()) {
        return Err(E::KludgeTruncated(n(), h.offset).into());
    }
    let delta = h
        .header_addr
        .checked_sub(h.load_addr)
        .ok_or_else(|| E::HeaderAddrBelowLoadAddr(n(), h.header_addr, h.load_addr))?;
    let start = usize::try_from(delta)
        .ok()
        .and_then(|d| h.offset.checked_sub(d))
        .ok_or_else(|| E::LoadAddrBeforeFile(n(), h.load_addr))?;
    let len = if h.load_end_addr == 0 {
        file.len()
            .checked_sub(start)
            .ok_or_else(|| E::LoadAddrBeforeFile(n(), h.load_addr))?
    } else {
        let len = h
            .load_end_addr
            .checked_sub(h.load_addr)
            .ok_or_else(|| E::LoadEndBelowLoadAddr(n(), h.load_end_addr, h.load_addr))?;
        usize::try_from(len).map_err(|_| E::LoadEndPastFile(n(), h.load_end_addr, file.len()))?
    };
    let data = start
        .checked_add(len)
        .and_then(|end| file.get(start..end))
        .ok_or_else(|| E::LoadEndPastFile(n(), h.load_end_addr, file.len()))?;
    let len = data.len() as u64; // usize -> u64 is lossless on every supported host
    let load_end = u64::from(h.load_addr)
        .checked_add(len)
        .ok_or_else(|| E::LoadEndOverflow(n(), h.load_addr, len))?;
    let bss_end = match u64::from(h.bss_end_addr) {
        0 => load_end,
        b if b < load_end => {
            return Err(E::BssEndBelowLoadEnd(n(), h.bss_end_addr, load_end).into())
        }
        b => b,
    };
    write_segment(mem, name, h.load_addr.into(), data, bss_end - load_end)?;
    Ok(Loaded {
        entry: h.entry_addr.into(),
        end: bss_end,
    })
}

/// Writes `data` at `addr` followed by `zero_len` zero bytes, all of it in RAM below the MMIO
/// hole and clear of what ferrovm writes there itself ([`layout::MULTIBOOT_RESERVED`]).
fn write_segment(
    mem: &GuestMemoryMmap,
    name: &str,
    addr: u64,
    data: &[u8],
    zero_len: u64,
) -> Result<(), BootError> {
    let data_len = data.len() as u64;
    let total = data_len.checked_add(zero_len);
    let end = total.and_then(|t| addr.checked_add(t));
    let ram_end = super::boot::low_ram_end(mem).max(layout::HIMEM_START);
    let (Some(total), Some(end)) = (total, end) else {
        return Err(
            MultibootError::Segment(name.into(), addr, data_len.saturating_add(zero_len)).into(),
        );
    };
    if end > ram_end {
        return Err(MultibootError::Segment(name.into(), addr, total).into());
    }
    if let Some(&(start, stop, what)) = layout::MULTIBOOT_RESERVED
        .iter()
        .find(|&&(start, stop, _)| addr < stop && start < end)
    {
        let e = MultibootError::SegmentOverlap(name.into(), addr, total, what, start, stop - 1);
        return Err(e.into());
    }
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| BootError::WriteGuest("multiboot segment", e))?;
    // Bounded: end <= ram_end, so none of the additions below can overflow.
    let zeros = vec![0u8; zero_len.min(1 << 20) as usize];
    let mut off = 0;
    while off < zero_len {
        let n = (zero_len - off).min(zeros.len() as u64);
        mem.write_slice(&zeros[..n as usize], GuestAddress(addr + data_len + off))
            .map_err(|e| BootError::WriteGuest("multiboot bss", e))?;
        off += n;
    }
    Ok(())
}

/// Field offsets of one ELF class: (e_entry, e_phoff, e_phentsize, e_phnum) in the file header
/// and (p_offset, p_paddr, p_filesz, p_memsz) in a program header, and the width of the
/// address-sized fields.
struct ElfClass {
    ehdr: [u64; 4],
    phdr: [u64; 4],
    word: usize,
    phdr_size: u64,
}

const ELF32: ElfClass = ElfClass {
    ehdr: [0x18, 0x1c, 0x2a, 0x2c],
    phdr: [4, 12, 16, 20],
    word: 4,
    phdr_size: 32,
};
const ELF64: ElfClass = ElfClass {
    ehdr: [0x18, 0x20, 0x36, 0x38],
    phdr: [8, 24, 32, 40],
    word: 8,
    phdr_size: 56,
};

/// One PT_LOAD program header.
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Loads the PT_LOAD segments of an ELF32 or ELF64 file at their physical addresses.
fn load_elf(mem: &GuestMemoryMmap, name: &str, f: &[u8]) -> Result<Loaded, BootError> {
    use MultibootError as E;
    let not_elf = || BootError::from(E::NotElf(name.into()));
    if f.get(..4) != Some(b"\x7fELF") || f.get(5) != Some(&1) {
        return Err(not_elf());
    }
    let c = match f.get(4) {
        Some(1) => &ELF32,
        Some(2) => &ELF64,
        _ => return Err(not_elf()),
    };
    let [entry, phoff, phentsize, phnum] =
        [(0, c.word), (1, c.word), (2, 2), (3, 2)].map(|(i, n)| le_at(f, c.ehdr[i], n));
    let (Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (entry, phoff, phentsize, phnum)
    else {
        return Err(not_elf());
    };
    if u32::try_from(entry).is_err() {
        return Err(E::ElfEntry(name.into(), entry).into());
    }
    if phnum > 0 && phentsize < c.phdr_size {
        return Err(E::ElfPhentsize(name.into(), phentsize, c.phdr_size).into());
    }
    let table_end = phnum
        .checked_mul(phentsize)
        .and_then(|len| phoff.checked_add(len));
    if table_end.is_none_or(|e| e > f.len() as u64) {
        return Err(E::ElfPhdrTable(name.into(), phoff, phnum, phentsize).into());
    }
    let mut end = 0u64;
    for i in 0..phnum {
        // In the file: the whole table is, and phentsize covers every field read.
        let ph = phoff + i * phentsize;
        let rd = |field: usize, n: usize| {
            le_at(f, ph + c.phdr[field], n)
                .ok_or_else(|| E::ElfPhdrTable(name.into(), phoff, phnum, phentsize))
        };
        let ptype = le_at(f, ph, 4).ok_or_else(not_elf)?;
        let seg = Segment {
            offset: rd(0, c.word)?,
            paddr: rd(1, c.word)?,
            filesz: rd(2, c.word)?,
            memsz: rd(3, c.word)?,
        };
        if ptype != 1 || seg.memsz == 0 {
            continue;
        }
        end = end.max(load_segment(mem, name, f, i, &seg)?);
    }
    Ok(Loaded { entry, end })
}

/// Loads program header `i`; returns the end of its memory image.
fn load_segment(
    mem: &GuestMemoryMmap,
    name: &str,
    f: &[u8],
    i: u64,
    s: &Segment,
) -> Result<u64, BootError> {
    use MultibootError as E;
    let outside = || E::ElfSegmentOutsideFile(name.into(), i, s.offset, s.filesz, f.len());
    let data = s
        .offset
        .checked_add(s.filesz)
        .and_then(|end| {
            let start = usize::try_from(s.offset).ok()?;
            f.get(start..usize::try_from(end).ok()?)
        })
        .ok_or_else(outside)?;
    let zero_len = s
        .memsz
        .checked_sub(s.filesz)
        .ok_or_else(|| E::ElfFileszAboveMemsz(name.into(), i, s.filesz, s.memsz))?;
    let end = s
        .paddr
        .checked_add(s.memsz)
        .ok_or_else(|| E::ElfPaddrOverflow(name.into(), i, s.paddr, s.memsz))?;
    write_segment(mem, name, s.paddr, data, zero_len)?;
    Ok(end)
}

/// Writes the multiboot information structure at `layout::PVH_INFO_START` (the PVH area is
/// free for multiboot guests): memory sizes, command line, modules, memory map, loader name.
/// Returns its address (for EBX).
/// Each module is (start, size, string); the strings go into the command-line area after the
/// command line (`cmdline_len` bytes and its NUL).
pub fn write_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline_len: usize,
    modules: &[(u64, u64, &str)],
) -> Result<u64, BootError> {
    let base = layout::PVH_INFO_START;
    let w32 = |addr: u64, v: u32| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| BootError::WriteGuest("multiboot info", e))
    };
    let map = e820_map(mem_size);
    let mem_upper_kb = map
        .iter()
        .find(|e| e.0 == layout::HIMEM_START)
        .map(|e| e.1 / 1024)
        .unwrap_or(0);
    // Layout after the 120-byte info: loader name, module list, memory map; all of it below
    // the zero page.
    let name_addr = base + 0x80;
    let mods_addr = base + 0x90;
    let mmap_addr = (modules.len() as u64)
        .checked_mul(16)
        .and_then(|len| mods_addr.checked_add(len))
        .filter(|&a| a + 24 * map.len() as u64 <= layout::ZERO_PAGE_START)
        .ok_or(MultibootError::TooManyModules(modules.len()))?;
    mem.write_slice(b"ferrovm\0", GuestAddress(name_addr))
        .map_err(|e| BootError::WriteGuest("multiboot info", e))?;
    let strings_end = layout::CMDLINE_START + layout::CMDLINE_MAX_SIZE as u64;
    let mut string_at = layout::CMDLINE_START + cmdline_len as u64 + 1;
    for (i, &(start, size, string)) in modules.iter().enumerate() {
        let string_len = string.len() as u64 + 1;
        if string.contains('\0') || string_at + string_len > strings_end {
            return Err(MultibootError::ModuleStrings(modules.len()).into());
        }
        mem.write_slice(string.as_bytes(), GuestAddress(string_at))
            .and_then(|_| mem.write_obj(0u8, GuestAddress(string_at + string_len - 1)))
            .map_err(|e| BootError::WriteGuest("multiboot module string", e))?;
        let too_high = || MultibootError::ModuleAbove4G(start, size);
        let end = start.checked_add(size).ok_or_else(too_high)?;
        let start32 = u32::try_from(start).map_err(|_| too_high())?;
        let end32 = u32::try_from(end).map_err(|_| too_high())?;
        let m = mods_addr + 16 * i as u64;
        w32(m, start32)?;
        w32(m + 4, end32)?;
        w32(m + 8, string_at as u32)?; // below CMDLINE_START + CMDLINE_MAX_SIZE
        w32(m + 12, 0)?;
        string_at += string_len;
    }
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        let e = mmap_addr + 24 * i as u64;
        w32(e, 20)?;
        mem.write_obj(addr, GuestAddress(e + 4))
            .and_then(|_| mem.write_obj(size, GuestAddress(e + 12)))
            .map_err(|e| BootError::WriteGuest("multiboot memory map", e))?;
        w32(e + 20, kind)?;
    }
    let mut flags = MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MMAP | MBI_FLAG_LOADER_NAME;
    if !modules.is_empty() {
        flags |= MBI_FLAG_MODS;
    }
    w32(base, flags)?;
    w32(base + 4, (layout::EBDA_START / 1024) as u32)?; // mem_lower
    w32(base + 8, mem_upper_kb.min(u32::MAX as u64) as u32)?; // mem_upper
    w32(base + 16, layout::CMDLINE_START as u32)?;
    // Both fit: the module list ends below the zero page.
    w32(base + 20, modules.len() as u32)?;
    w32(base + 24, mods_addr as u32)?;
    w32(base + 44, 24 * map.len() as u32)?; // mmap_length
    w32(base + 48, mmap_addr as u32)?;
    w32(base + 64, name_addr as u32)?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[8..12].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        f[12..16].copy_from_slice(&flags.to_le_bytes());
        f[16..20]
            .copy_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)).to_le_bytes());
        f
    }

    #[test]
    fn finds_only_valid_headers() {
        let f = header(0x10003);
        let h = find_header(&f).unwrap();
        assert_eq!((h.offset, h.flags), (8, 0x10003));
        let mut bad = f.clone();
        bad[16] ^= 1; // checksum
        assert!(find_header(&bad).is_none());
        let mut late = vec![0u8; SEARCH_LEN];
        late.extend_from_slice(&f);
        assert!(find_header(&late).is_none(), "only the first 8 KiB count");
        assert!(find_header(&[]).is_none());
        assert!(find_header(&f[..10]).is_none());
    }

    #[test]
    fn hostile_kludge_addresses_are_errors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let f = header(FLAG_AOUT_KLUDGE);
        let p = Path::new("k");
        let mut h = find_header(&f).unwrap();
        h.header_addr = 0x100000;
        h.load_addr = 0x200000; // load_addr above header_addr
        assert!(load(&mem, p, &f, &h).is_err());
        h.load_addr = 0x100000 - 0x1000; // file offset would be negative
        assert!(load(&mem, p, &f, &h).is_err());
        h.load_addr = 0x100000 - 8;
        h.header_addr = 0x100000;
        h.load_end_addr = 0xffff_ffff; // past the end of the file
        assert!(load(&mem, p, &f, &h).is_err());
        h.load_end_addr = 0;
        h.bss_end_addr = 0xffff_f000; // bss beyond RAM
        assert!(load(&mem, p, &f, &h).is_err());
        h.load_addr = 0x0ff000 - 8; // on the ACPI tables
        h.header_addr = 0x0ff000;
        h.bss_end_addr = 0;
        let e = load(&mem, p, &f, &h).err().unwrap().to_string();
        assert!(
            e.contains("overlaps the ACPI tables (0xe0000-0xfffff)"),
            "{e}"
        );
    }

    #[test]
    fn segments_below_1mib_load_unless_they_overlap_ferrovms_own() {
        let mem = mem16();
        // realmode.flat's segments: 0x8000+0x286c and 0xb000+0x2a30.
        write_segment(&mem, "k", 0x8000, &[0xaa; 0x286c], 0).unwrap();
        write_segment(&mem, "k", 0xb000, &[0xbb; 16], 0x2a20).unwrap();
        write_segment(&mem, "k", 0, &[1; 0x500], 0).unwrap();
        for (addr, len, what) in [
            (0x4f8, 16, "GDT"),
            (0x6fff, 1, "multiboot information"),
            (0x1_0000, 0x1_0001, "command line"),
            (0xf_fff0, 0x20, "ACPI"),
        ] {
            let e = write_segment(&mem, "k", addr, &vec![0; len], 0).unwrap_err();
            assert!(e.to_string().contains(what), "{addr:#x}: {e}");
        }
        // Zeroed bss counts too.
        assert!(write_segment(&mem, "k", 0x7000, &[], 0x19001).is_err());
    }

    fn mem16() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn put(f: &mut [u8], off: usize, v: u64, n: usize) {
        f[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    /// An ELF file of class `class64` with one PT_LOAD header (offset, paddr, filesz, memsz)
    /// and 16 bytes of payload after the headers.
    fn elf(class64: bool, seg: [u64; 4]) -> Vec<u8> {
        let c = if class64 { &ELF64 } else { &ELF32 };
        let ehsize = if class64 { 64 } else { 52 };
        let mut f = vec![0u8; ehsize + c.phdr_size as usize + 16];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = if class64 { 2 } else { 1 };
        f[5] = 1;
        put(&mut f, c.ehdr[0] as usize, 0x10_0000, c.word);
        put(&mut f, c.ehdr[1] as usize, ehsize as u64, c.word);
        put(&mut f, c.ehdr[2] as usize, c.phdr_size, 2);
        put(&mut f, c.ehdr[3] as usize, 1, 2);
        put(&mut f, ehsize, 1, 4); // PT_LOAD
        for (i, v) in seg.into_iter().enumerate() {
            put(&mut f, ehsize + c.phdr[i] as usize, v, c.word);
        }
        f
    }

    fn load_elf_file(f: &[u8]) -> Result<Loaded, BootError> {
        load_elf(&mem16(), "k", f)
    }

    #[test]
    fn elf_segments_load() {
        for class64 in [false, true] {
            let off = if class64 { 64 + 56 } else { 52 + 32 };
            let l = load_elf_file(&elf(class64, [off, 0x10_0000, 16, 0x100])).unwrap();
            assert_eq!((l.entry, l.end), (0x10_0000, 0x10_0100));
        }
    }

    #[test]
    fn elf_offset_plus_filesz_overflow_is_an_error() {
        let f = elf(true, [u64::MAX - 1, 0x10_0000, 16, 16]);
        let e = load_elf_file(&f).err().unwrap().to_string();
        assert!(e.contains("p_offset") && e.contains("k"), "{e}");
    }

    #[test]
    fn elf32_segment_past_the_file_is_an_error() {
        let f = elf(false, [0xffff_ffff, 0x10_0000, 0xffff_ffff, 0xffff_ffff]);
        assert!(matches!(
            load_elf_file(&f),
            Err(BootError::Multiboot(MultibootError::ElfSegmentOutsideFile(
                ..
            )))
        ));
    }

    #[test]
    fn elf_huge_filesz_is_refused_without_allocating() {
        let f = elf(true, [64 + 56, 0x10_0000, 1 << 40, 1 << 40]);
        assert!(matches!(
            load_elf_file(&f),
            Err(BootError::Multiboot(MultibootError::ElfSegmentOutsideFile(
                ..
            )))
        ));
    }

    #[test]
    fn elf_paddr_plus_memsz_overflow_is_an_error() {
        let f = elf(true, [64 + 56, u64::MAX - 4, 16, 16]);
        assert!(matches!(
            load_elf_file(&f),
            Err(BootError::Multiboot(MultibootError::ElfPaddrOverflow(..)))
        ));
    }

    #[test]
    fn elf_filesz_above_memsz_is_an_error() {
        let f = elf(true, [64 + 56, 0x10_0000, 16, 8]);
        assert!(matches!(
            load_elf_file(&f),
            Err(BootError::Multiboot(MultibootError::ElfFileszAboveMemsz(
                ..
            )))
        ));
    }

    #[test]
    fn elf_phoff_overflow_is_an_error() {
        let mut f = elf(true, [64 + 56, 0x10_0000, 16, 16]);
        put(&mut f, 0x20, u64::MAX - 8, 8); // e_phoff: phoff + i * phentsize would wrap
        assert!(matches!(
            load_elf_file(&f),
            Err(BootError::Multiboot(MultibootError::ElfPhdrTable(..)))
        ));
    }

    #[test]
    fn elf_phdr_table_past_the_file_is_an_error() {
        let mut f = elf(false, [52 + 32, 0x10_0000, 16, 16]);
        put(&mut f, 0x2c, 0xffff, 2); // e_phnum
        put(&mut f, 0x2a, 0xffff, 2); // e_phentsize
        assert!(matches!(
            load_elf_file(&f),
            Err(BootError::Multiboot(MultibootError::ElfPhdrTable(..)))
        ));
    }

    #[test]
    fn elf_short_phentsize_is_an_error() {
        let mut f = elf(true, [64 + 56, 0x10_0000, 16, 16]);
        put(&mut f, 0x36, 8, 2); // e_phentsize smaller than a program header
        assert!(matches!(
            load_elf_file(&f),
            Err(BootError::Multiboot(MultibootError::ElfPhentsize(..)))
        ));
    }

    #[test]
    fn elf64_entry_above_4g_is_an_error() {
        let mut f = elf(true, [64 + 56, 0x10_0000, 16, 16]);
        put(&mut f, 0x18, 1 << 32, 8);
        assert!(matches!(
            load_elf_file(&f),
            Err(BootError::Multiboot(MultibootError::ElfEntry(..)))
        ));
    }

    #[test]
    fn segment_length_overflow_is_an_error() {
        assert!(matches!(
            write_segment(&mem16(), "k", 0x10_0000, &[1], u64::MAX),
            Err(BootError::Multiboot(MultibootError::Segment(..)))
        ));
    }

    fn kludge_file() -> (Vec<u8>, Header) {
        let mut f = header(FLAG_AOUT_KLUDGE);
        f.resize(64, 0);
        let mut h = find_header(&f).unwrap();
        h.header_addr = 0x10_0008;
        h.load_addr = 0x10_0000;
        (f, h)
    }

    #[test]
    fn kludge_loads_and_zeroes_bss() {
        let (f, mut h) = kludge_file();
        h.bss_end_addr = 0x10_1000;
        h.entry_addr = 0x10_0020;
        let l = load(&mem16(), Path::new("k"), &f, &h).unwrap();
        assert_eq!((l.entry, l.end), (0x10_0020, 0x10_1000));
    }

    #[test]
    fn truncated_kludge_header_is_an_error() {
        let (f, h) = kludge_file();
        assert!(matches!(
            load(&mem16(), Path::new("k"), &f[..30], &h),
            Err(BootError::Multiboot(MultibootError::KludgeTruncated(..)))
        ));
    }

    #[test]
    fn kludge_load_end_overflowing_the_file_is_an_error() {
        let (f, mut h) = kludge_file();
        h.load_addr = 0;
        h.header_addr = 8;
        h.load_end_addr = u32::MAX; // start + len would pass the end of the file
        assert!(matches!(
            load(&mem16(), Path::new("k"), &f, &h),
            Err(BootError::Multiboot(MultibootError::LoadEndPastFile(..)))
        ));
    }

    #[test]
    fn kludge_load_end_below_load_addr_is_an_error() {
        let (f, mut h) = kludge_file();
        h.load_end_addr = 0xf_0000;
        assert!(matches!(
            load(&mem16(), Path::new("k"), &f, &h),
            Err(BootError::Multiboot(MultibootError::LoadEndBelowLoadAddr(
                ..
            )))
        ));
    }

    #[test]
    fn kludge_bss_end_below_load_end_is_an_error() {
        let (f, mut h) = kludge_file();
        h.bss_end_addr = 0x10_0010; // the image runs to 0x10_0040
        assert!(matches!(
            load(&mem16(), Path::new("k"), &f, &h),
            Err(BootError::Multiboot(MultibootError::BssEndBelowLoadEnd(..)))
        ));
    }

    #[test]
    fn module_above_4g_is_an_error() {
        let mem = mem16();
        assert!(matches!(
            write_info(&mem, 16 << 20, 0, &[(0xffff_f000, 0x2000, "m")]),
            Err(BootError::Multiboot(MultibootError::ModuleAbove4G(..)))
        ));
        assert!(matches!(
            write_info(&mem, 16 << 20, 0, &[(u64::MAX, 2, "m")]),
            Err(BootError::Multiboot(MultibootError::ModuleAbove4G(..)))
        ));
        assert!(matches!(
            write_info(&mem, 16 << 20, 0, &vec![(0x20_0000, 16, "m"); 1000]),
            Err(BootError::Multiboot(MultibootError::TooManyModules(1000)))
        ));
        let long = "m".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_info(&mem, 16 << 20, 10, &[(0x20_0000, 16, long.as_str())]),
            Err(BootError::Multiboot(MultibootError::ModuleStrings(1)))
        ));
        assert_eq!(
            write_info(&mem, 16 << 20, 10, &[(0x20_0000, 16, "initrd.img")]).unwrap(),
            layout::PVH_INFO_START
        );
        let at: u32 = mem
            .read_obj(GuestAddress(layout::PVH_INFO_START + 0x90 + 8))
            .unwrap();
        assert_eq!(u64::from(at), layout::CMDLINE_START + 11);
        let mut name = [0u8; 11];
        mem.read_slice(&mut name, GuestAddress(at.into())).unwrap();
        assert_eq!(&name, b"initrd.img\0");
    }
}
