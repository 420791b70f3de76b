//! qcow2 (versions 2 and 3), read and write, with backing chains.
//!
//! - [`header`]: the header and its extensions, every field checked at open.
//! - `map.rs`: guest offset → cluster mapping through the L1 table (in memory) and the L2
//!   tables (an LRU cache); reads, including compressed clusters (zlib or zstd) and the
//!   fall-through to the backing image.
//! - `write.rs`: writes, copy-on-write, WRITE_ZEROES / DISCARD mapped onto zero clusters and
//!   deallocation, and the flush order.
//! - `refcount.rs`: refcounts of any `refcount_order`, cluster allocation, new refcount
//!   blocks and the growth of the refcount table.
//!
//! ## Crash safety
//! Data clusters are allocated only beyond the end of the file (never reused), with their
//! refcount written at once. L2 and L1 changes stay in memory until the guest flushes (or a
//! dirty table is evicted, or the image is closed); then ferrovm (1) fdatasyncs, so the data
//! and refcounts the new entries point at are durable, (2) writes the changed L2 sectors and
//! L1 sectors, (3) fdatasyncs again, and (4) only then lowers the refcounts of clusters that
//! were unmapped since the last flush. A crash at any point leaves an image whose metadata
//! points only at clusters with refcounts, and whose flushed data is intact; what it can leave
//! behind is *leaked* clusters (refcount 1, referenced by nothing: allocated for writes that
//! were never flushed, or freed but not yet released), which `qemu-img check` reports as
//! leaks and `qemu-img check -r leaks` reclaims. The refcount table moves only after the new
//! one is durable (fdatasync before and after the header update).
//!
//! ## Extended L2 entries (subclusters)
//! Images made with `extended_l2=on` (incompatible bit 4) have 128-bit L2 entries: the
//! usual descriptor and a bitmap of the cluster's 32 subclusters (allocated here, reads as
//! zeros, or neither: from the backing image, zeros without one). ferrovm reads them, at
//! subcluster granularity, through backing chains; it does not write them: a writable open
//! refuses (open them `readonly=on`, or `overlay=on`, whose writes go to a standard qcow2
//! on top). A bitmap that contradicts itself or its descriptor fails that request.
//!
//! Not supported: internal snapshots for writing (read-only is fine), external data files,
//! writes to extended L2 images, encryption; images with the dirty or corrupt bit open
//! read-only only.

mod cache;
mod check;
pub mod header;
mod map;
mod refcount;
mod write;

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::hash::BuildHasherDefault;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use vm_memory::VolatileSlice;

use self::cache::{Cache, OffsetHasher};
pub use self::check::CheckReport;
pub use self::header::{Header, MAGIC};
use super::io::{eio, pread_all, pwrite_all};
use super::{DiskBackend, DiskError, DiskOptions, Format};

/// L1/L2 entry bits.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const FLAG_COPIED: u64 = 1 << 63;
const FLAG_COMPRESSED: u64 = 1 << 62;
const FLAG_ZERO: u64 = 1;
/// Backing chains longer than this refuse (as QEMU's limit).
pub const MAX_CHAIN: usize = 16;
/// Bytes of L2 tables kept in memory (32 MiB maps 256 GiB at 64 KiB clusters), at most this
/// many tables.
const L2_CACHE_BYTES: u64 = 32 << 20;
const L2_CACHE_TABLES: u64 = 4096;
/// Refcount blocks kept in memory.
const REFBLOCK_CACHE_TABLES: u64 = 256;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    path: PathBuf,
    size: u64,
    readonly: bool,
    state: Mutex<State>,
}

/// Everything a request may change, behind the image's mutex.
#[derive(Debug)]
pub(super) struct State {
    file: File,
    path: PathBuf,
    readonly: bool,
    h: Header,
    cs: u64,
    file_len: u64,
    l1: Vec<u64>,
    /// 512-byte sectors of the L1 table changed since the last flush.
    l1_dirty: BTreeSet<u64>,
    l2: Cache<u64>,
    reftable: Vec<u64>,
    refblocks: Cache<u8>,
    /// The next cluster index to try when allocating (beyond the end of the file).
    next_free: u64,
    /// Host clusters whose refcount drops at the next flush.
    pending_free: Vec<u64>,
    /// Offsets of every L2 table and refcount block: writes must never land on them.
    metadata: HashSet<u64, BuildHasherDefault<OffsetHasher>>,
    backing: Option<Box<dyn DiskBackend>>,
    /// The last decompressed cluster: (its L2 entry, its bytes).
    decompressed: Option<(u64, Vec<u8>)>,
}

/// How one guest cluster is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Not allocated here: read from the backing image, or zeros without one.
    Unallocated,
    /// Reads as zeros (the zero flag).
    Zero,
    /// At this host offset; `copied` when its refcount is known to be 1.
    Data { host: u64, copied: bool },
    /// Compressed: the whole L2 entry.
    Compressed(u64),
}

impl Qcow2 {
    /// Opens an image whose file is open and locked; `chain` holds the canonical paths of
    /// the images above it (to refuse loops).
    pub fn open(
        file: File,
        opts: &DiskOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Qcow2, DiskError> {
        let state = State::open(file, opts)?;
        let mut q = Qcow2 {
            path: opts.path.clone(),
            size: state.h.size,
            readonly: opts.readonly,
            state: Mutex::new(state),
        };
        let backing = q.open_backing(opts, chain)?;
        q.state_mut().backing = backing;
        Ok(q)
    }

    fn state_mut(&mut self) -> &mut State {
        self.state.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    /// The parsed header (as updated since open).
    pub fn header(&self) -> Header {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .h
            .clone()
    }

    /// The backing image, if any (for `img info`).
    pub fn with_backing<R>(&self, f: impl FnOnce(Option<&dyn DiskBackend>) -> R) -> R {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(s.backing.as_deref())
    }

    fn open_backing(
        &self,
        opts: &DiskOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Option<Box<dyn DiskBackend>>, DiskError> {
        let h = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .h
            .clone();
        let Some(name) = h.backing_file.as_deref() else {
            return Ok(None);
        };
        let me = std::fs::canonicalize(&opts.path).unwrap_or_else(|_| opts.path.clone());
        chain.push(me);
        if chain.len() > MAX_CHAIN {
            return Err(self.refused(format!(
                "the backing chain is longer than {MAX_CHAIN} images"
            )));
        }
        let path = resolve_backing(&opts.path, name);
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if chain.contains(&canon) {
            return Err(self.refused(format!(
                "the backing chain loops back to {}",
                canon.display()
            )));
        }
        let format = match h.backing_format.as_deref() {
            None => None,
            Some(f) => Some(Format::parse(f).ok_or_else(|| {
                self.refused(format!("backing file format `{f}` is not supported"))
            })?),
        };
        let bopts = DiskOptions {
            path,
            readonly: true,
            direct: opts.direct,
            format,
        };
        let backing = super::open_in_chain(&bopts, chain).map_err(|e| DiskError::Backing {
            path: opts.path.clone(),
            source: Box::new(e),
        })?;
        chain.pop();
        Ok(Some(backing))
    }

    fn refused(&self, reason: String) -> DiskError {
        DiskError::Refused {
            path: self.path.clone(),
            format: Format::Qcow2,
            reason,
        }
    }

    fn lock(&self) -> std::io::Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| {
            eio(format!(
                "{}: an earlier request panicked; the image is no longer served",
                self.path.display()
            ))
        })
    }
}

/// A backing file name resolves against the folder of the image naming it, as qemu does
/// (an absolute name stays as it is).
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

impl State {
    fn open(file: File, opts: &DiskOptions) -> Result<State, DiskError> {
        let path = opts.path.clone();
        let invalid = |reason: String| DiskError::Invalid {
            path: path.clone(),
            format: Format::Qcow2,
            reason,
        };
        let file_len = super::file_size(&file, &path)?;
        let first = read_first_cluster(&file, &path, file_len)?;
        let h = Header::parse(&first, file_len).map_err(invalid)?;
        if let Some(what) = h.unsupported() {
            return Err(DiskError::Unsupported {
                path,
                format: Format::Qcow2,
                reason: what,
            });
        }
        if !opts.readonly {
            if let Some(why) = h.refuses_writes() {
                return Err(DiskError::Refused {
                    path,
                    format: Format::Qcow2,
                    reason: why,
                });
            }
        }
        let cs = h.cluster_size();
        let read_err = |source| DiskError::Read {
            path: path.clone(),
            source,
        };
        let l1 = read_table(&file, h.l1_table_offset, h.l1_size as usize).map_err(read_err)?;
        let rt_len = (u64::from(h.refcount_table_clusters) * cs / 8) as usize;
        let reftable = read_table(&file, h.refcount_table_offset, rt_len).map_err(read_err)?;
        let l2_tables = (L2_CACHE_BYTES / cs).clamp(16, L2_CACHE_TABLES) as usize;
        let mut s = State {
            file,
            path: path.clone(),
            readonly: opts.readonly,
            cs,
            file_len,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: Cache::new(l2_tables),
            reftable,
            refblocks: Cache::new(REFBLOCK_CACHE_TABLES as usize),
            next_free: file_len.div_ceil(cs),
            pending_free: Vec::new(),
            metadata: HashSet::default(),
            backing: None,
            decompressed: None,
            h,
        };
        s.check_tables().map_err(invalid)?;
        if !opts.readonly && s.h.autoclear != 0 {
            // Bits we do not understand describe data our writes would make stale.
            s.h.autoclear = 0;
            pwrite_all(&s.file, &0u64.to_be_bytes(), 88).map_err(|source| DiskError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok(s)
    }

    /// Checks every L1 and refcount table entry: a cluster-aligned offset inside the file,
    /// clear of the header, the L1 and refcount tables and every other table.
    fn check_tables(&mut self) -> Result<(), String> {
        let cs = self.cs;
        let fixed = [
            (0u64, cs),
            (self.h.l1_table_offset, u64::from(self.h.l1_size) * 8),
            (
                self.h.refcount_table_offset,
                u64::from(self.h.refcount_table_clusters) * cs,
            ),
        ];
        let tables = self
            .l1
            .iter()
            .map(|e| ("L1", *e & OFFSET_MASK, *e & !(OFFSET_MASK | FLAG_COPIED)))
            .chain(self.reftable.iter().map(|e| ("refcount table", *e, 0)))
            .enumerate();
        let mut seen = HashSet::default();
        for (i, (what, off, reserved)) in tables {
            if off == 0 {
                continue;
            }
            if reserved != 0 || off % cs != 0 {
                return Err(format!("{what} entry {i} ({off:#x}) is malformed"));
            }
            if !super::in_range(off, cs, self.file_len) {
                return Err(format!(
                    "{what} entry {i} points at {off:#x}, beyond the end of the file"
                ));
            }
            if fixed.iter().any(|(s, l)| off < s + l && *s < off + cs) {
                return Err(format!(
                    "{what} entry {i} ({off:#x}) overlaps the header, the L1 table or the \
                     refcount table"
                ));
            }
            if !seen.insert(off) {
                return Err(format!("two tables share the cluster at {off:#x}"));
            }
        }
        self.metadata = seen;
        Ok(())
    }

    fn io_err(&self, msg: String) -> std::io::Error {
        eio(format!("{}: {msg}", self.path.display()))
    }
}

fn read_first_cluster(file: &File, path: &Path, file_len: u64) -> Result<Vec<u8>, DiskError> {
    let mut probe = [0u8; 24];
    let n = file_len.min(24) as usize;
    pread_all(file, &mut probe[..n], 0).map_err(|source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bits = u32::from_be_bytes([probe[20], probe[21], probe[22], probe[23]]);
    let cs = 1u64 << bits.clamp(header::MIN_CLUSTER_BITS, header::MAX_CLUSTER_BITS);
    let mut buf = vec![0u8; cs.min(file_len) as usize];
    pread_all(file, &mut buf, 0).map_err(|source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(buf)
}

/// Reads `n` big-endian u64 entries at `off`.
fn read_table(file: &File, off: u64, n: usize) -> std::io::Result<Vec<u64>> {
    let mut raw = vec![0u8; n * 8];
    pread_all(file, &mut raw, off)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

impl DiskBackend for Qcow2 {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn as_qcow2(&self) -> Option<&Qcow2> {
        Some(self)
    }

    fn read_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> std::io::Result<()> {
        self.lock()?.read(bufs, offset)
    }

    fn write_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> std::io::Result<()> {
        self.lock()?.write(bufs, offset)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.lock()?.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.lock()?.unmap(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> std::io::Result<()> {
        self.lock()?.unmap(offset, len, true)
    }
}

impl Drop for Qcow2 {
    /// Writes the metadata still in memory, as a guest flush would.
    fn drop(&mut self) {
        let s = self.state_mut();
        if s.readonly {
            return;
        }
        if let Err(e) = s.flush() {
            log::error!(
                "{}: cannot write qcow2 metadata at close: {e}",
                s.path.display()
            );
        }
    }
}

#[cfg(test)]
mod extl2_tests;
#[cfg(test)]
mod tests;
