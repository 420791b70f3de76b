//! Guest offset → cluster mapping, and reads.

use std::io::{self, Read};

use vm_memory::VolatileSlice;

use super::super::io::{pread_all, rw_vectored, scatter, sub_bufs, total_len, zero_fill, Dir};
use super::header::Compression;
use super::{Cluster, State, FLAG_COMPRESSED, FLAG_COPIED, FLAG_ZERO, OFFSET_MASK};

impl State {
    /// (L1 index, L2 index) of the cluster holding guest offset `off`.
    pub(super) fn indices(&self, off: u64) -> (usize, usize) {
        let cluster = off / self.cs;
        let per = self.h.l2_entries();
        ((cluster / per) as usize, (cluster % per) as usize)
    }

    /// Makes sure the L2 table at `off` is cached, evicting (after writing the metadata, if
    /// the victim has unwritten changes) the least recently used one.
    pub(super) fn load_l2(&mut self, off: u64) -> io::Result<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        self.make_room_l2()?;
        let mut raw = vec![0u8; self.cs as usize];
        pread_all(&self.file, &mut raw, off)
            .map_err(|e| self.io_err(format!("cannot read the L2 table at {off:#x}: {e}")))?;
        let data = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        self.l2.insert(off, data, false);
        Ok(())
    }

    pub(super) fn make_room_l2(&mut self) -> io::Result<()> {
        if let Some((victim, dirty)) = self.l2.victim() {
            if dirty {
                self.write_metadata()?;
            }
            self.l2.remove(victim);
        }
        Ok(())
    }

    /// What an L2 entry says about its cluster.
    pub(super) fn classify(&self, e: u64) -> io::Result<Cluster> {
        classify(e, self.h.version, self.cs).map_err(|m| self.io_err(m))
    }

    /// The L2 entry for guest offset `off` (0 when no L2 table covers it).
    pub(super) fn l2_entry(&mut self, off: u64) -> io::Result<u64> {
        let (i1, i2) = self.indices(off);
        let l2_off = self.l1.get(i1).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(0);
        }
        self.load_l2(l2_off)?;
        let stride = if self.h.extended_l2() { 2 } else { 1 };
        Ok(self.l2.get(l2_off).expect("just loaded").data[i2 * stride])
    }

    /// How the bytes from `off` are stored, and for how many of the next `max` bytes that
    /// holds (contiguous data clusters, or a run of the same kind, within one L2 table).
    pub(super) fn map_run(&mut self, off: u64, max: u64) -> io::Result<(Cluster, u64)> {
        let cs = self.cs;
        let first = cs - off % cs;
        let (i1, i2) = self.indices(off);
        let l2_off = self.l1.get(i1).copied().unwrap_or(0) & OFFSET_MASK;
        let per = self.h.l2_entries() as usize;
        if l2_off == 0 {
            let n = first + (per - 1 - i2) as u64 * cs;
            return Ok((Cluster::Unallocated, n.min(max)));
        }
        self.load_l2(l2_off)?;
        if self.h.extended_l2() {
            return self.map_subclusters(l2_off, i2, off, max);
        }
        let (version, path) = (self.h.version, &self.path);
        let err = |m: String| super::super::io::eio(format!("{}: {m}", path.display()));
        let entries = &self.l2.get(l2_off).expect("just loaded").data[i2..];
        let kind = classify(entries[0], version, cs).map_err(err)?;
        if let Cluster::Compressed(_) = kind {
            return Ok((kind, first.min(max)));
        }
        let mut n = first;
        let mut k = 1;
        while n < max && k < entries.len() {
            let next = match (kind, classify(entries[k], version, cs).map_err(err)?) {
                (Cluster::Data { host, .. }, Cluster::Data { host: h2, .. }) => {
                    h2 == host + k as u64 * cs
                }
                (a, b) => a == b,
            };
            if !next {
                break;
            }
            n += cs;
            k += 1;
        }
        Ok((kind, n.min(max)))
    }

    /// [`State::map_run`] for extended L2 entries: how the subcluster holding `off` is
    /// stored, and for how many bytes that holds (a run of subclusters of the same kind,
    /// within the cluster). The L2 table at `l2_off` is cached.
    fn map_subclusters(
        &mut self,
        l2_off: u64,
        i2: usize,
        off: u64,
        max: u64,
    ) -> io::Result<(Cluster, u64)> {
        let cs = self.cs;
        let data = &self.l2.get(l2_off).expect("cached by the caller").data;
        let (desc, bitmap) = (data[2 * i2], data[2 * i2 + 1]);
        let kinds = subclusters(desc, bitmap, cs).map_err(|m| self.io_err(m))?;
        let sub = cs / 32;
        let first = ((off % cs) / sub) as usize;
        let kind = kinds[first];
        let mut n = sub - off % sub;
        if let Cluster::Compressed(_) = kind {
            n = cs - off % cs;
        } else {
            n += kinds[first + 1..]
                .iter()
                .take_while(|k| **k == kind)
                .count() as u64
                * sub;
        }
        Ok((kind, n.min(max)))
    }

    /// Reads guest `[offset, offset + len(bufs))`.
    pub(super) fn read(&mut self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let total = total_len(bufs) as u64;
        if !super::super::in_range(offset, total, self.h.size) {
            return Err(super::super::out_of_range(&self.path, offset, total));
        }
        let mut done = 0u64;
        while done < total {
            let off = offset + done;
            let (kind, n) = self.map_run(off, total - done)?;
            // A request inside one run (the usual case) needs no sub-slices.
            let split;
            let part = if n == total {
                bufs
            } else {
                split = sub_bufs(bufs, done as usize, n as usize);
                &split
            };
            match kind {
                Cluster::Data { host, .. } => self.read_data(part, host + off % self.cs)?,
                Cluster::Zero => zero_fill(part),
                Cluster::Unallocated => self.read_backing(part, off)?,
                Cluster::Compressed(e) => {
                    let at = (off % self.cs) as usize;
                    let data = self.decompress(e)?;
                    scatter(part, 0, &data[at..at + n as usize]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads host data; what lies beyond the end of the file reads as zeros (as in QEMU).
    fn read_data(&self, bufs: &[VolatileSlice<'_>], host: u64) -> io::Result<()> {
        let n = total_len(bufs) as u64;
        let inside = self.file_len.saturating_sub(host).min(n);
        if inside == n {
            return rw_vectored(&self.file, bufs, host, Dir::Read)
                .map_err(|e| self.io_err(format!("cannot read data at {host:#x}: {e}")));
        }
        if inside > 0 {
            rw_vectored(
                &self.file,
                &sub_bufs(bufs, 0, inside as usize),
                host,
                Dir::Read,
            )
            .map_err(|e| self.io_err(format!("cannot read data at {host:#x}: {e}")))?;
        }
        if inside < n {
            zero_fill(&sub_bufs(bufs, inside as usize, (n - inside) as usize));
        }
        Ok(())
    }

    /// Reads guest `off..` from the backing image (zeros without one, and past its end).
    pub(super) fn read_backing(&self, bufs: &[VolatileSlice<'_>], off: u64) -> io::Result<()> {
        let n = total_len(bufs) as u64;
        let Some(b) = &self.backing else {
            zero_fill(bufs);
            return Ok(());
        };
        let inside = b.size().saturating_sub(off).min(n);
        if inside > 0 {
            b.read_at(&sub_bufs(bufs, 0, inside as usize), off)?;
        }
        if inside < n {
            zero_fill(&sub_bufs(bufs, inside as usize, (n - inside) as usize));
        }
        Ok(())
    }

    /// The bytes of the compressed cluster with L2 entry `e` (cached: the last one).
    pub(super) fn decompress(&mut self, e: u64) -> io::Result<&[u8]> {
        if self.decompressed.as_ref().is_some_and(|(k, _)| *k == e) {
            return Ok(&self.decompressed.as_ref().expect("checked").1);
        }
        let cb = self.h.cluster_bits;
        let shift = 62 - (cb - 8);
        let host = e & ((1u64 << shift) - 1);
        let sectors = ((e & !(FLAG_COPIED | FLAG_COMPRESSED)) >> shift) + 1;
        let len = (sectors * 512 - (host & 511)).min(self.file_len.saturating_sub(host));
        if len == 0 {
            return Err(self.io_err(format!(
                "compressed cluster at {host:#x} lies beyond the end of the file"
            )));
        }
        let mut input = vec![0u8; len as usize];
        pread_all(&self.file, &mut input, host).map_err(|err| {
            self.io_err(format!(
                "cannot read compressed cluster at {host:#x}: {err}"
            ))
        })?;
        let mut out = vec![0u8; self.cs as usize];
        let ok = match self.h.compression {
            Compression::Zlib => inflate_raw(&input, &mut out),
            Compression::Zstd => unzstd(&input, &mut out),
        };
        if !ok {
            return Err(self.io_err(format!(
                "compressed cluster at {host:#x} does not decompress to {} bytes",
                self.cs
            )));
        }
        self.decompressed = Some((e, out));
        Ok(&self.decompressed.as_ref().expect("just set").1)
    }

    /// The current contents of the guest cluster starting at `start` (stored as `kind`),
    /// into `buf` (the cluster's length, shorter at the end of the disk).
    pub(super) fn read_cluster(
        &mut self,
        start: u64,
        kind: Cluster,
        buf: &mut [u8],
    ) -> io::Result<()> {
        match kind {
            Cluster::Zero => buf.fill(0),
            Cluster::Unallocated => self.read_backing(&[VolatileSlice::from(&mut *buf)], start)?,
            Cluster::Data { host, .. } => {
                self.read_data(&[VolatileSlice::from(&mut *buf)], host)?
            }
            Cluster::Compressed(e) => {
                let n = buf.len();
                buf.copy_from_slice(&self.decompress(e)?[..n]);
            }
        }
        Ok(())
    }
}

/// What L2 entry `e` of an image of `version` with clusters of `cs` bytes says.
fn classify(e: u64, version: u32, cs: u64) -> Result<Cluster, String> {
    if e & FLAG_COMPRESSED != 0 {
        return Ok(Cluster::Compressed(e));
    }
    if e & FLAG_ZERO != 0 {
        if version < 3 {
            return Err(format!("L2 entry {e:#x} has the zero flag in a v2 image"));
        }
        return Ok(Cluster::Zero);
    }
    let host = e & OFFSET_MASK;
    if host == 0 {
        return Ok(Cluster::Unallocated);
    }
    if host % cs != 0 {
        return Err(format!(
            "L2 entry {e:#x}: data offset not aligned to a cluster (corrupt image)"
        ));
    }
    Ok(Cluster::Data {
        host,
        copied: e & FLAG_COPIED != 0,
    })
}

/// What each of the 32 subclusters of a cluster with extended L2 entry (`desc`, `bitmap`)
/// holds; every entry of a compressed cluster is the same `Compressed`. Bit x of the bitmap's
/// low half says subcluster x is allocated (at the cluster's host offset), bit 32 + x that it
/// reads as zeros; neither sends it to the backing image.
pub(super) fn subclusters(desc: u64, bitmap: u64, cs: u64) -> Result<[Cluster; 32], String> {
    if desc & FLAG_COMPRESSED != 0 {
        if bitmap != 0 {
            return Err(format!(
                "extended L2 entry {desc:#x}: a compressed cluster with subcluster bitmap \
                 {bitmap:#x} (must be 0; corrupt image)"
            ));
        }
        return Ok([Cluster::Compressed(desc); 32]);
    }
    let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
    if alloc & zero != 0 || desc & FLAG_ZERO != 0 {
        return Err(format!(
            "extended L2 entry {desc:#x} with bitmap {bitmap:#x}: subclusters both allocated \
             and zero, or the zero flag set (corrupt image)"
        ));
    }
    let data = match classify(desc, 3, cs)? {
        Cluster::Data { host, copied } => Some(Cluster::Data { host, copied }),
        Cluster::Unallocated if alloc == 0 => None,
        _ => {
            return Err(format!(
                "extended L2 entry {desc:#x}: allocated subclusters ({alloc:#x}) but no host \
                 cluster (corrupt image)"
            ))
        }
    };
    let mut out = [Cluster::Unallocated; 32];
    for (x, k) in out.iter_mut().enumerate() {
        match (alloc & (1 << x) != 0, data) {
            (true, Some(d)) => *k = d,
            _ if zero & (1 << x) != 0 => *k = Cluster::Zero,
            _ => {}
        }
    }
    Ok(out)
}

/// Raw deflate (no zlib header), as QEMU writes compressed clusters; true when `out` is full.
fn inflate_raw(input: &[u8], out: &mut [u8]) -> bool {
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) => d.total_out() as usize == out.len(),
        Err(_) => false,
    }
}

/// A zstd stream (one or more frames); true when `out` is full.
fn unzstd(input: &[u8], out: &mut [u8]) -> bool {
    let mut src = input;
    // A cluster is at most 2 MiB: no valid frame needs a larger window (the default limit,
    // 128 MiB, would let a hostile image make us allocate that much).
    let window = (out.len() as u64).max(1 << 20);
    let Ok(mut dec) =
        ruzstd::decoding::StreamingDecoder::new_with_max_window_size(&mut src, window)
    else {
        return false;
    };
    dec.read_exact(out).is_ok()
}
