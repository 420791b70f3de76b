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

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
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

/// What failed in a multiboot image.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    #[error(
        "multiboot kernel {0}: unsupported header flags {1:#x} (supported: {SUPPORTED_FLAGS:#x})"
    )]
    Flags(String, u32),
    #[error("multiboot kernel {0}: inconsistent load addresses in the header")]
    BadAddresses(String),
    #[error("multiboot kernel {0}: no a.out kludge and not a valid ELF file")]
    NotElf(String),
    #[error("multiboot kernel {0}: segment at {1:#x}+{2:#x} is outside guest RAM or below 1 MiB")]
    Segment(String, u64, u64),
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
    let name = || path.display().to_string();
    if h.flags & !SUPPORTED_FLAGS & 0xffff != 0 {
        return Err(MultibootError::Flags(name(), h.flags).into());
    }
    if h.flags & FLAG_AOUT_KLUDGE != 0 {
        // The file from (header offset - (header_addr - load_addr)) is loaded at load_addr.
        let bad = || BootError::from(MultibootError::BadAddresses(name()));
        let delta = h.header_addr.checked_sub(h.load_addr).ok_or_else(bad)? as usize;
        let start = h.offset.checked_sub(delta).ok_or_else(bad)?;
        let len = if h.load_end_addr == 0 {
            file.len().checked_sub(start).ok_or_else(bad)?
        } else {
            h.load_end_addr.checked_sub(h.load_addr).ok_or_else(bad)? as usize
        };
        let data = file.get(start..start + len).ok_or_else(bad)?;
        write_segment(mem, &name(), h.load_addr as u64, data, 0)?;
        let load_end = h.load_addr as u64 + len as u64;
        let bss_end = (h.bss_end_addr as u64).max(load_end);
        write_segment(mem, &name(), load_end, &[], bss_end - load_end)?;
        return Ok(Loaded {
            entry: h.entry_addr as u64,
            end: bss_end,
        });
    }
    load_elf(mem, &name(), file)
}

fn write_segment(
    mem: &GuestMemoryMmap,
    name: &str,
    addr: u64,
    data: &[u8],
    zero_len: u64,
) -> Result<(), BootError> {
    let total = data.len() as u64 + zero_len;
    let end = addr.checked_add(total);
    let in_ram = end.is_some_and(|e| {
        addr >= layout::HIMEM_START && e <= super::boot::low_ram_end(mem).max(layout::HIMEM_START)
    });
    if !in_ram {
        return Err(MultibootError::Segment(name.into(), addr, total).into());
    }
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| BootError::WriteGuest("multiboot segment", e))?;
    if zero_len > 0 {
        let zeros = vec![0u8; zero_len.min(1 << 20) as usize];
        let mut off = 0;
        while off < zero_len {
            let n = (zero_len - off).min(zeros.len() as u64);
            mem.write_slice(
                &zeros[..n as usize],
                GuestAddress(addr + data.len() as u64 + off),
            )
            .map_err(|e| BootError::WriteGuest("multiboot bss", e))?;
            off += n;
        }
    }
    Ok(())
}

/// Loads the PT_LOAD segments of an ELF32 or ELF64 file at their physical addresses.
fn load_elf(mem: &GuestMemoryMmap, name: &str, f: &[u8]) -> Result<Loaded, BootError> {
    let not_elf = || BootError::from(MultibootError::NotElf(name.into()));
    if f.get(..4) != Some(b"\x7fELF") || f.get(5) != Some(&1) {
        return Err(not_elf());
    }
    let class64 = match f.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(not_elf()),
    };
    let rd16 = |o: usize| -> Result<u64, BootError> {
        Ok(u16::from_le_bytes(
            f.get(o..o + 2)
                .ok_or_else(not_elf)?
                .try_into()
                .map_err(|_| not_elf())?,
        ) as u64)
    };
    let rd32 =
        |o: usize| -> Result<u64, BootError> { Ok(u32_at(f, o).ok_or_else(not_elf)? as u64) };
    let rd64 = |o: usize| -> Result<u64, BootError> {
        Ok(u64::from_le_bytes(
            f.get(o..o + 8)
                .ok_or_else(not_elf)?
                .try_into()
                .map_err(|_| not_elf())?,
        ))
    };
    let (entry, phoff, phentsize, phnum) = if class64 {
        (rd64(0x18)?, rd64(0x20)?, rd16(0x36)?, rd16(0x38)?)
    } else {
        (rd32(0x18)?, rd32(0x1c)?, rd16(0x2a)?, rd16(0x2c)?)
    };
    let mut end = 0u64;
    for i in 0..phnum {
        let ph = phoff as usize + (i * phentsize) as usize;
        let (ptype, offset, paddr, filesz, memsz) = if class64 {
            (
                rd32(ph)?,
                rd64(ph + 8)?,
                rd64(ph + 24)?,
                rd64(ph + 32)?,
                rd64(ph + 40)?,
            )
        } else {
            (
                rd32(ph)?,
                rd32(ph + 4)?,
                rd32(ph + 12)?,
                rd32(ph + 16)?,
                rd32(ph + 20)?,
            )
        };
        if ptype != 1 || memsz == 0 {
            continue;
        }
        let data = f
            .get(offset as usize..(offset + filesz) as usize)
            .ok_or_else(not_elf)?;
        write_segment(mem, name, paddr, data, memsz.saturating_sub(filesz))?;
        end = end.max(paddr + memsz);
    }
    Ok(Loaded { entry, end })
}

/// Writes the multiboot information structure at `layout::PVH_INFO_START` (the PVH area is
/// free for multiboot guests): memory sizes, command line, modules, memory map, loader name.
/// Returns its address (for EBX).
pub fn write_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    modules: &[(u64, u64)],
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
    // Layout after the 120-byte info: loader name, module list, memory map.
    let name_addr = base + 0x80;
    mem.write_slice(b"ferrovm\0", GuestAddress(name_addr))
        .map_err(|e| BootError::WriteGuest("multiboot info", e))?;
    let mods_addr = base + 0x90;
    for (i, &(start, size)) in modules.iter().enumerate() {
        let m = mods_addr + 16 * i as u64;
        w32(m, start as u32)?;
        w32(m + 4, (start + size) as u32)?;
        w32(m + 8, layout::CMDLINE_START as u32)?; // module string: reuse the command line
        w32(m + 12, 0)?;
    }
    let mmap_addr = mods_addr + 16 * modules.len() as u64;
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
        h.load_addr = 0x0ff000 - 8; // below 1 MiB
        h.header_addr = 0x0ff000;
        h.bss_end_addr = 0;
        assert!(load(&mem, p, &f, &h).is_err());
    }
}
