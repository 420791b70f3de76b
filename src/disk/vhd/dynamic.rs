//! Dynamic and differencing VHDs: the dynamic header, the BAT, sector bitmaps, block
//! allocation, and for a differencing image the reads that fall through to the parent.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vm_memory::VolatileSlice;

use super::super::io::{
    eio, gather, pread_all, pwrite_all, rw_vectored, sub_bufs, total_len, zero_fill, Dir,
};
use super::super::{in_range, out_of_range, DiskBackend, DiskError, DiskOptions, Format};
use super::parent::{self, Parent};
use super::{be32, be64, checksum, DYN_HEADER_LEN, FOOTER_LEN};

const SPARSE_COOKIE: [u8; 8] = *b"cxsparse";
const UNALLOCATED: u32 = 0xffff_ffff;
/// Most BAT entries accepted (2^22 blocks of 2 MiB: 8 TiB).
const MAX_BAT_ENTRIES: u32 = 1 << 22;
/// Sector bitmaps kept in memory.
const BITMAP_CACHE: usize = 1024;

/// A dynamic VHD, or a differencing one (with a parent).
#[derive(Debug)]
pub struct Dynamic {
    path: PathBuf,
    size: u64,
    readonly: bool,
    block_size: u64,
    /// Bytes of the sector bitmap before each block's data (whole sectors).
    bitmap_len: u64,
    bat_offset: u64,
    /// The parent of a differencing image (read-only, outside the mutex).
    parent: Option<Parent>,
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

impl Dynamic {
    /// Opens the dynamic part of a VHD; `diff` (the chain above) for a differencing image,
    /// whose parent is opened too.
    pub(super) fn open(
        file: File,
        opts: &DiskOptions,
        footer: [u8; 512],
        size: u64,
        len: u64,
        diff: Option<&mut Vec<PathBuf>>,
    ) -> Result<Dynamic, DiskError> {
        let path = opts.path.clone();
        let invalid = |reason: String| DiskError::Invalid {
            path: path.clone(),
            format: Format::Vhd,
            reason,
        };
        let h = read_header(&file, &path, be64(&footer, 16), len)?;
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
        if !in_range(bat_offset, bat_bytes, len) {
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
        let parent = match diff {
            Some(chain) => Some(parent::open(&file, len, &h, opts, chain)?),
            None => None,
        };
        let bitmap_len = (block_size / 512).div_ceil(8).div_ceil(512) * 512;
        Ok(Dynamic {
            path,
            size,
            readonly: opts.readonly,
            block_size,
            bitmap_len,
            bat_offset,
            parent,
            state: Mutex::new(DynState {
                file,
                bat,
                footer,
                footer_at: len - FOOTER_LEN,
                bitmaps: HashMap::new(),
            }),
        })
    }

    pub(super) fn parent(&self) -> Option<&Parent> {
        self.parent.as_ref()
    }

    pub(super) fn block_size(&self) -> u64 {
        self.block_size
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
        if !in_range(start, self.bitmap_len + self.block_size, s.footer_at) {
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

    /// What lies under this image at guest `off..`: the parent's data (zeros past its end),
    /// or zeros for a dynamic image.
    fn read_under(&self, bufs: &[VolatileSlice<'_>], off: u64) -> io::Result<()> {
        let Some(p) = &self.parent else {
            zero_fill(bufs);
            return Ok(());
        };
        let n = total_len(bufs) as u64;
        let inside = p.disk.size().saturating_sub(off).min(n);
        if inside > 0 {
            p.disk.read_at(&sub_bufs(bufs, 0, inside as usize), off)?;
        }
        if inside < n {
            zero_fill(&sub_bufs(bufs, inside as usize, (n - inside) as usize));
        }
        Ok(())
    }

    /// Reads one piece inside block `b`: sectors the bitmap marks absent read from what lies
    /// under the image.
    fn read_piece(&self, s: &mut DynState, bufs: &[VolatileSlice<'_>], off: u64) -> io::Result<()> {
        let b = off / self.block_size;
        let Some(data) = self.block_data(s, b)? else {
            return self.read_under(bufs, off);
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
                self.read_under(&part, off + done)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Appends block `b` where the footer was: its bitmap (a dynamic image: every sector
    /// present, the data sparse, so zeros; a differencing one: none, so the parent's), then
    /// the footer after the data, then the BAT entry.
    fn allocate(&self, s: &mut DynState, b: u64) -> io::Result<u64> {
        let start = s.footer_at;
        let sector = u32::try_from(start / 512)
            .ok()
            .filter(|v| *v != UNALLOCATED)
            .ok_or_else(|| self.err("the image cannot grow past 2 TiB".into()))?;
        let fill = if self.parent.is_some() { 0 } else { 0xff };
        let bm = vec![fill; self.bitmap_len as usize];
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
        let n = total_len(bufs) as u64;
        if self.parent.is_some() && (off % 512 != 0 || n % 512 != 0) {
            return self.write_whole_sectors(s, bufs, off);
        }
        let b = off / self.block_size;
        let data = match self.block_data(s, b)? {
            Some(d) => d,
            None => self.allocate(s, b)?,
        };
        let in_block = off % self.block_size;
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

    /// A write that does not cover whole sectors, in a differencing image: the sectors it
    /// touches are read (from this image or the parent), patched and written whole, so that
    /// setting their bits does not hide the parent's bytes around the write.
    fn write_whole_sectors(
        &self,
        s: &mut DynState,
        bufs: &[VolatileSlice<'_>],
        off: u64,
    ) -> io::Result<()> {
        let start = off / 512 * 512;
        let end = (off + total_len(bufs) as u64).div_ceil(512) * 512;
        let mut buf = vec![0u8; (end - start) as usize];
        self.read_piece(s, &[VolatileSlice::from(&mut buf[..])], start)?;
        let at = (off - start) as usize;
        gather(bufs, 0, &mut buf[at..at + total_len(bufs)]);
        self.write_piece(s, &[VolatileSlice::from(&mut buf[..])], start)
    }

    /// Splits `[offset, offset + len(bufs))` at block boundaries.
    fn each_piece(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        mut f: impl FnMut(&mut DynState, &[VolatileSlice<'_>], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let total = total_len(bufs) as u64;
        if !in_range(offset, total, self.size) {
            return Err(out_of_range(&self.path, offset, total));
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

/// Reads and checks the dynamic header at `at` of a file of `len` bytes.
fn read_header(
    file: &File,
    path: &Path,
    at: u64,
    len: u64,
) -> Result<[u8; DYN_HEADER_LEN], DiskError> {
    let invalid = |reason: String| DiskError::Invalid {
        path: path.to_path_buf(),
        format: Format::Vhd,
        reason,
    };
    let mut h = [0u8; DYN_HEADER_LEN];
    if !in_range(at, DYN_HEADER_LEN as u64, len) {
        return Err(invalid(format!(
            "dynamic header offset {at:#x} is outside the file"
        )));
    }
    pread_all(file, &mut h, at).map_err(|source| DiskError::Read {
        path: path.to_path_buf(),
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
    Ok(h)
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
        if !in_range(offset, len, self.size) {
            return Err(out_of_range(&self.path, offset, len));
        }
        Ok(())
    }

    /// Writes zeros into allocated blocks; unallocated ones of a dynamic image already read
    /// as zeros (of a differencing image, they read the parent: zeros are written there too).
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        if !in_range(offset, len, self.size) {
            return Err(out_of_range(&self.path, offset, len));
        }
        let mut off = offset;
        while off < offset + len {
            let n = (self.block_size - off % self.block_size).min(offset + len - off);
            let needed = self.parent.is_some() || {
                let s = self.lock()?;
                self.block_data(&s, off / self.block_size)?.is_some()
            };
            if needed {
                let mut zeros = vec![0u8; n as usize];
                self.write_at(&[VolatileSlice::from(&mut zeros[..])], off)?;
            }
            off += n;
        }
        Ok(())
    }
}
