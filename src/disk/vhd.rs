//! VHD (qemu's "vpc"): fixed and dynamic images, read and write.
//!
//! A fixed VHD is raw data followed by a 512-byte footer; ferrovm serves the data as a raw
//! image of the footer's size, so the footer is never written. A dynamic VHD has a copy of
//! the footer at offset 0, a dynamic header, a block allocation table (BAT) of big-endian
//! sector offsets, and blocks made of a sector bitmap (which sectors the block holds; the
//! others read as zeros) and the data. A write to an unallocated block appends a block where
//! the footer was (bitmap all ones, data sparse, so zeros), writes the footer after it and
//! then the BAT entry. Differencing VHDs are refused.
//!
//! The virtual size follows QEMU's reading of the footer: the CHS geometry for images made by
//! Virtual PC and older QEMU, the `current_size` field for Hyper-V, disk2vhd, XenServer and
//! QEMU's `qem2`, and for any image whose geometry is the maximum.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vm_memory::VolatileSlice;

use super::io::{eio, pread_all, pwrite_all, rw_vectored, sub_bufs, total_len, zero_fill, Dir};
use super::{file_size, DiskBackend, DiskError, DiskOptions, Format, RawDisk};

/// The footer's first eight bytes.
pub const COOKIE: [u8; 8] = *b"conectix";
const SPARSE_COOKIE: [u8; 8] = *b"cxsparse";
const FOOTER_LEN: u64 = 512;
const DYN_HEADER_LEN: usize = 1024;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
const UNALLOCATED: u32 = 0xffff_ffff;
/// CHS geometry that means "look at current_size" (65535 cylinders, 16 heads, 255 sectors).
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// Most BAT entries accepted (2^22 blocks of 2 MiB: 8 TiB).
const MAX_BAT_ENTRIES: u32 = 1 << 22;
/// Sector bitmaps kept in memory.
const BITMAP_CACHE: usize = 1024;

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// One's complement of the byte sum, with the checksum field (at `at`) counted as zero.
fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, x)| s.wrapping_add(u32::from(*x)));
    !sum
}

/// An open VHD image.
#[derive(Debug)]
pub enum Vhd {
    Fixed(RawDisk),
    Dynamic(Box<Dynamic>),
}

/// A dynamic VHD.
#[derive(Debug)]
pub struct Dynamic {
    path: PathBuf,
    size: u64,
    readonly: bool,
    block_size: u64,
    /// Bytes of the sector bitmap before each block's data (whole sectors).
    bitmap_len: u64,
    bat_offset: u64,
    state: Mutex<DynState>,
}

#[derive(Debug)]
struct DynState {
    file: File,
    bat: Vec<u32>,
    footer: [u8; 512],
    /// Where the trailing footer starts (new blocks go there).
    footer_at: u64,
    bitmaps: HashMap<u32, Vec<u8>>,
}

impl Vhd {
    /// Opens a VHD whose file is open and locked.
    pub fn open(file: File, opts: &DiskOptions) -> Result<Vhd, DiskError> {
        let path = opts.path.clone();
        let invalid = |reason: String| DiskError::Invalid {
            path: path.clone(),
            format: Format::Vhd,
            reason,
        };
        let len = file_size(&file, &path)?;
        if len < FOOTER_LEN {
            return Err(invalid("shorter than a footer".into()));
        }
        let mut footer = [0u8; 512];
        let read = |buf: &mut [u8], at| {
            pread_all(&file, buf, at).map_err(|source| DiskError::Read {
                path: path.clone(),
                source,
            })
        };
        read(&mut footer, len - FOOTER_LEN)?;
        if footer[..8] != COOKIE {
            // A dynamic image keeps a copy at the start (the end may be torn).
            read(&mut footer, 0)?;
        }
        let size = parse_footer(&footer).map_err(invalid)?;
        match be32(&footer, 60) {
            TYPE_FIXED => {
                if size > len - FOOTER_LEN {
                    return Err(invalid(format!(
                        "the footer says {size} bytes but the file holds {}",
                        len - FOOTER_LEN
                    )));
                }
                Ok(Vhd::Fixed(RawDisk::with_size(file, opts, size)))
            }
            TYPE_DYNAMIC => {
                Dynamic::open(file, opts, footer, size, len).map(|d| Vhd::Dynamic(Box::new(d)))
            }
            TYPE_DIFFERENCING => Err(DiskError::Unsupported {
                path,
                format: Format::Vhd,
                reason: "a differencing VHD".into(),
            }),
            t => Err(invalid(format!("disk type {t}"))),
        }
    }

    fn inner(&self) -> &dyn DiskBackend {
        match self {
            Vhd::Fixed(r) => r,
            Vhd::Dynamic(d) => d.as_ref(),
        }
    }
}

/// Checks the footer; returns the virtual size.
fn parse_footer(f: &[u8; 512]) -> Result<u64, String> {
    if f[..8] != COOKIE {
        return Err("no footer (cookie \"conectix\" not found)".into());
    }
    let want = be32(f, 64);
    if checksum(f, 64) != want {
        return Err(format!(
            "footer checksum {want:#x} does not match its contents"
        ));
    }
    let cyls = u64::from(u16::from_be_bytes([f[56], f[57]]));
    let chs = cyls * u64::from(f[58]) * u64::from(f[59]);
    let app = &f[28..32];
    let uses_size = [b"win ", b"qem2", b"d2v ", b"CTXS"]
        .iter()
        .any(|a| app == *a)
        || app[..3] == *b"tap";
    let size = if uses_size || chs == MAX_GEOMETRY {
        be64(f, 48)
    } else {
        chs * 512
    };
    if size % 512 != 0 {
        return Err(format!("virtual size {size} is not a multiple of 512"));
    }
    Ok(size)
}

impl Dynamic {
    fn open(
        file: File,
        opts: &DiskOptions,
        footer: [u8; 512],
        size: u64,
        len: u64,
    ) -> Result<Dynamic, DiskError> {
        let path = opts.path.clone();
        let invalid = |reason: String| DiskError::Invalid {
            path: path.clone(),
            format: Format::Vhd,
            reason,
        };
        let hdr_off = be64(&footer, 16);
        let mut h = [0u8; DYN_HEADER_LEN];
        if !super::in_range(hdr_off, DYN_HEADER_LEN as u64, len) {
            return Err(invalid(format!(
                "dynamic header offset {hdr_off:#x} is outside the file"
            )));
        }
        pread_all(&file, &mut h, hdr_off).map_err(|source| DiskError::Read {
            path: path.clone(),
            source,
        })?;
        if h[..8] != SPARSE_COOKIE {
            return Err(invalid(
                "no dynamic header (cookie \"cxsparse\" not found)".into(),
            ));
        }
        if checksum(&h, 36) != be32(&h, 36) {
            return Err(invalid("dynamic header checksum does not match".into()));
        }
        let bat_offset = be64(&h, 16);
        let entries = be32(&h, 28);
        let block_size = u64::from(be32(&h, 32));
        if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
            return Err(invalid(format!("block size {block_size}")));
        }
        if entries > MAX_BAT_ENTRIES || u64::from(entries) * block_size < size {
            return Err(invalid(format!(
                "{entries} BAT entries of {block_size} bytes for a {size}-byte disk"
            )));
        }
        let bat_bytes = u64::from(entries) * 4;
        if !super::in_range(bat_offset, bat_bytes, len) {
            return Err(invalid(format!(
                "the BAT at {bat_offset:#x} lies outside the file"
            )));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        pread_all(&file, &mut raw, bat_offset).map_err(|source| DiskError::Read {
            path: path.clone(),
            source,
        })?;
        let bat = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
        let bitmap_len = (block_size / 512).div_ceil(8).div_ceil(512) * 512;
        Ok(Dynamic {
            path,
            size,
            readonly: opts.readonly,
            block_size,
            bitmap_len,
            bat_offset,
            state: Mutex::new(DynState {
                file,
                bat,
                footer,
                footer_at: len - FOOTER_LEN,
                bitmaps: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, DynState>> {
        self.state.lock().map_err(|_| {
            eio(format!(
                "{}: an earlier request panicked",
                self.path.display()
            ))
        })
    }

    fn err(&self, msg: String) -> io::Error {
        eio(format!("{}: {msg}", self.path.display()))
    }

    /// Where block `b`'s data starts in the file, or `None` when unallocated.
    fn block_data(&self, s: &DynState, b: u64) -> io::Result<Option<u64>> {
        let e = s.bat[b as usize];
        if e == UNALLOCATED {
            return Ok(None);
        }
        let start = u64::from(e) * 512;
        if !super::in_range(start, self.bitmap_len + self.block_size, s.footer_at) {
            return Err(self.err(format!(
                "BAT entry {b} points at {start:#x}, beyond the file"
            )));
        }
        Ok(Some(start + self.bitmap_len))
    }

    fn bitmap<'s>(&self, s: &'s mut DynState, b: u64, data: u64) -> io::Result<&'s mut Vec<u8>> {
        if !s.bitmaps.contains_key(&(b as u32)) {
            if s.bitmaps.len() >= BITMAP_CACHE {
                s.bitmaps.clear();
            }
            let mut bm = vec![0u8; self.bitmap_len as usize];
            pread_all(&s.file, &mut bm, data - self.bitmap_len)
                .map_err(|e| self.err(format!("cannot read the bitmap of block {b}: {e}")))?;
            s.bitmaps.insert(b as u32, bm);
        }
        Ok(s.bitmaps.get_mut(&(b as u32)).expect("just inserted"))
    }

    /// Reads one piece inside block `b`: sectors the bitmap marks absent read as zeros.
    fn read_piece(&self, s: &mut DynState, bufs: &[VolatileSlice<'_>], off: u64) -> io::Result<()> {
        let b = off / self.block_size;
        let Some(data) = self.block_data(s, b)? else {
            zero_fill(bufs);
            return Ok(());
        };
        let in_block = off % self.block_size;
        let total = total_len(bufs) as u64;
        let bm = self.bitmap(s, b, data)?.clone();
        let present = |sector: u64| bm[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0;
        let mut done = 0;
        while done < total {
            let first = (in_block + done) / 512;
            let here = present(first);
            let mut n = 512 - (in_block + done) % 512;
            while done + n < total && present((in_block + done + n) / 512) == here {
                n += 512;
            }
            let n = n.min(total - done);
            let part = sub_bufs(bufs, done as usize, n as usize);
            if here {
                rw_vectored(&s.file, &part, data + in_block + done, Dir::Read)?;
            } else {
                zero_fill(&part);
            }
            done += n;
        }
        Ok(())
    }

    /// Appends block `b` where the footer was: its bitmap (all sectors present), then the
    /// footer after the (sparse) data, then the BAT entry.
    fn allocate(&self, s: &mut DynState, b: u64) -> io::Result<u64> {
        let start = s.footer_at;
        let sector = u32::try_from(start / 512)
            .ok()
            .filter(|v| *v != UNALLOCATED)
            .ok_or_else(|| self.err("the image cannot grow past 2 TiB".into()))?;
        let bm = vec![0xffu8; self.bitmap_len as usize];
        pwrite_all(&s.file, &bm, start)?;
        let end = start + self.bitmap_len + self.block_size;
        pwrite_all(&s.file, &s.footer, end)?;
        s.footer_at = end;
        s.bat[b as usize] = sector;
        pwrite_all(&s.file, &sector.to_be_bytes(), self.bat_offset + b * 4)?;
        s.bitmaps.insert(b as u32, bm);
        Ok(start + self.bitmap_len)
    }

    fn write_piece(
        &self,
        s: &mut DynState,
        bufs: &[VolatileSlice<'_>],
        off: u64,
    ) -> io::Result<()> {
        let b = off / self.block_size;
        let data = match self.block_data(s, b)? {
            Some(d) => d,
            None => self.allocate(s, b)?,
        };
        let in_block = off % self.block_size;
        let n = total_len(bufs) as u64;
        rw_vectored(&s.file, bufs, data + in_block, Dir::Write)?;
        let bm_at = data - self.bitmap_len;
        let bm = self.bitmap(s, b, data)?;
        let (first, last) = (in_block / 512, (in_block + n - 1) / 512);
        let mut changed = false;
        for sec in first..=last {
            let (byte, bit) = ((sec / 8) as usize, 0x80u8 >> (sec % 8));
            changed |= bm[byte] & bit == 0;
            bm[byte] |= bit;
        }
        if changed {
            let bm = bm.clone();
            pwrite_all(&s.file, &bm, bm_at)?;
        }
        Ok(())
    }

    /// Splits `[offset, offset + len(bufs))` at block boundaries.
    fn each_piece(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        mut f: impl FnMut(&mut DynState, &[VolatileSlice<'_>], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let total = total_len(bufs) as u64;
        if !super::in_range(offset, total, self.size) {
            return Err(super::out_of_range(&self.path, offset, total));
        }
        let mut s = self.lock()?;
        let mut done = 0;
        while done < total {
            let off = offset + done;
            let n = (self.block_size - off % self.block_size).min(total - done);
            f(&mut s, &sub_bufs(bufs, done as usize, n as usize), off)?;
            done += n;
        }
        Ok(())
    }
}

impl DiskBackend for Dynamic {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn read_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.each_piece(bufs, offset, |s, part, off| self.read_piece(s, part, off))
    }

    fn write_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(self.err("the image is read-only".into()));
        }
        self.each_piece(bufs, offset, |s, part, off| self.write_piece(s, part, off))
    }

    fn flush(&self) -> io::Result<()> {
        self.lock()?.file.sync_data()
    }

    /// A hint ferrovm does not act on (blocks are never freed).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !super::in_range(offset, len, self.size) {
            return Err(super::out_of_range(&self.path, offset, len));
        }
        Ok(())
    }

    /// Writes zeros into allocated blocks; unallocated ones already read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        if !super::in_range(offset, len, self.size) {
            return Err(super::out_of_range(&self.path, offset, len));
        }
        let mut off = offset;
        while off < offset + len {
            let n = (self.block_size - off % self.block_size).min(offset + len - off);
            let allocated = {
                let s = self.lock()?;
                self.block_data(&s, off / self.block_size)?.is_some()
            };
            if allocated {
                let mut zeros = vec![0u8; n as usize];
                self.write_at(&[VolatileSlice::from(&mut zeros[..])], off)?;
            }
            off += n;
        }
        Ok(())
    }
}

impl DiskBackend for Vhd {
    fn path(&self) -> &Path {
        self.inner().path()
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn size(&self) -> u64 {
        self.inner().size()
    }

    fn readonly(&self) -> bool {
        self.inner().readonly()
    }

    fn direct(&self) -> bool {
        self.inner().direct()
    }

    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.inner().raw_fd()
    }

    fn read_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.inner().read_at(bufs, offset)
    }

    fn write_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.inner().write_at(bufs, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner().discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner().write_zeroes(offset, len, unmap)
    }
}

#[cfg(test)]
mod tests;
