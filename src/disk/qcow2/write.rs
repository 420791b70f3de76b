//! Writes, copy-on-write, zeroing and discard, and the flush that makes metadata durable in
//! the order described in the module documentation.

use std::io;

use vm_memory::VolatileSlice;

use super::super::io::{fallocate, gather, pwrite_all, rw_vectored, sub_bufs, total_len, Dir};
use super::{Cluster, State, FLAG_COPIED, FLAG_ZERO, OFFSET_MASK};

/// Clusters waiting for their refcount to drop; past this many a flush releases them.
const MAX_PENDING_FREE: usize = 1 << 16;

impl State {
    fn check_writable(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(self.io_err("the image is read-only".into()));
        }
        if !super::super::in_range(offset, len, self.h.size) {
            return Err(super::super::out_of_range(&self.path, offset, len));
        }
        Ok(())
    }

    fn set_l1(&mut self, i: usize, v: u64) {
        self.l1[i] = v;
        self.l1_dirty.insert(i as u64 / 64);
    }

    fn set_l2(&mut self, l2_off: u64, i: usize, v: u64) -> io::Result<()> {
        self.load_l2(l2_off)?;
        let t = self.l2.get(l2_off).expect("just loaded");
        t.data[i] = v;
        t.mark(i);
        Ok(())
    }

    /// The L2 table covering guest `off`, ready to be changed: allocated when missing.
    fn l2_for_write(&mut self, off: u64) -> io::Result<u64> {
        let (i1, _) = self.indices(off);
        let e = self.l1[i1];
        let l2_off = e & OFFSET_MASK;
        if l2_off == 0 {
            self.make_room_l2()?;
            let new = self.alloc_cluster()?;
            self.metadata.insert(new);
            let per = self.h.l2_entries() as usize;
            // Wholly dirty: written at the next flush; until then the cluster is a hole
            // (zeros, i.e. an empty table) in the file.
            self.l2.insert(new, vec![0; per], true);
            self.set_l1(i1, new | FLAG_COPIED);
            return Ok(new);
        }
        if e & FLAG_COPIED == 0 {
            let rc = self.refcount(l2_off / self.cs)?;
            if rc != 1 {
                return Err(self.io_err(format!(
                    "the L2 table at {l2_off:#x} has refcount {rc} (shared with a snapshot, or \
                     corrupt): not written"
                )));
            }
            self.set_l1(i1, e | FLAG_COPIED);
        }
        self.load_l2(l2_off)?;
        Ok(l2_off)
    }

    /// Whether the data cluster at `host` can be overwritten where it is (refcount 1).
    fn in_place(&mut self, host: u64) -> io::Result<bool> {
        if host >= self.file_len
            || self.metadata.contains(&host)
            || host < self.cs
            || self.overlaps_fixed_tables(host)
        {
            return Err(self.io_err(format!(
                "data cluster at {host:#x} lies beyond the end of the file or on metadata \
                 (corrupt image)"
            )));
        }
        match self.refcount(host / self.cs)? {
            0 => Err(self.io_err(format!(
                "data cluster at {host:#x} is in use but has refcount 0 (corrupt image; run \
                 qemu-img check -r all)"
            ))),
            1 => Ok(true),
            _ => Ok(false),
        }
    }

    fn overlaps_fixed_tables(&self, host: u64) -> bool {
        let cs = self.cs;
        let l1 = (self.h.l1_table_offset, u64::from(self.h.l1_size) * 8);
        let rt = (
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * cs,
        );
        [l1, rt]
            .iter()
            .any(|(s, l)| *l > 0 && host < s + l && *s < host + cs)
    }

    /// Bytes from guest `off` (data at `host`) that can be written in place in one call: the
    /// following contiguous data clusters of the same L2 table with refcount 1.
    fn in_place_run(&mut self, off: u64, host: u64, max: u64) -> io::Result<u64> {
        let cs = self.cs;
        let mut n = (cs - off % cs).min(max);
        while n < max {
            let next = off + n;
            let (kind, _) = self.map_run(next, cs)?;
            let want = host + (next - off + off % cs);
            match kind {
                Cluster::Data { host: h, .. } if h == want && self.in_place(h)? => {}
                _ => break,
            }
            n = (n + cs).min(max);
        }
        Ok(n)
    }

    /// Writes guest `[offset, offset + len(bufs))`.
    pub(super) fn write(&mut self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let total = total_len(bufs) as u64;
        self.check_writable(offset, total)?;
        let mut done = 0u64;
        while done < total {
            let off = offset + done;
            let l2_off = self.l2_for_write(off)?;
            let (_, i2) = self.indices(off);
            let e = self.l2.get(l2_off).expect("loaded").data[i2];
            let kind = self.classify(e)?;
            if let Cluster::Data { host, .. } = kind {
                if self.in_place(host)? {
                    let n = self.in_place_run(off, host, total - done)?;
                    let at = host + off % self.cs;
                    // A request inside one run (the usual case) needs no sub-slices.
                    let split;
                    let part = if n == total {
                        bufs
                    } else {
                        split = sub_bufs(bufs, done as usize, n as usize);
                        &split
                    };
                    rw_vectored(&self.file, part, at, Dir::Write)
                        .map_err(|e| self.io_err(format!("cannot write data at {at:#x}: {e}")))?;
                    self.file_len = self.file_len.max(at + n);
                    done += n;
                    continue;
                }
            }
            done += self.write_new_cluster(bufs, done, off, total - done, kind, (l2_off, i2))?;
        }
        Ok(())
    }

    /// Writes the part of `bufs` from `done` that falls in the cluster of guest `off` into a
    /// newly allocated cluster, copying the rest of the cluster from where it was (`kind`).
    fn write_new_cluster(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        done: u64,
        off: u64,
        left: u64,
        kind: Cluster,
        (l2_off, i2): (u64, usize),
    ) -> io::Result<u64> {
        let cs = self.cs;
        let in_off = off % cs;
        let start = off - in_off;
        let clen = cs.min(self.h.size - start);
        let n = (clen - in_off).min(left);
        let new = self.alloc_cluster()?;
        let part = sub_bufs(bufs, done as usize, n as usize);
        if in_off == 0 && n == clen {
            rw_vectored(&self.file, &part, new, Dir::Write)
        } else {
            let mut buf = vec![0u8; clen as usize];
            self.read_cluster(start, kind, &mut buf)?;
            gather(&part, 0, &mut buf[in_off as usize..(in_off + n) as usize]);
            pwrite_all(&self.file, &buf, new)
        }
        .map_err(|e| self.io_err(format!("cannot write a new cluster at {new:#x}: {e}")))?;
        self.file_len = self.file_len.max(new + clen);
        self.set_l2(l2_off, i2, new | FLAG_COPIED)?;
        self.free_later(kind)?;
        Ok(n)
    }

    /// Queues the host clusters behind `kind` for release at the next flush.
    fn free_later(&mut self, kind: Cluster) -> io::Result<()> {
        let cs = self.cs;
        match kind {
            Cluster::Data { host, .. } => self.pending_free.push(host / cs),
            Cluster::Compressed(e) => {
                let shift = 62 - (self.h.cluster_bits - 8);
                let host = (e & ((1u64 << shift) - 1)) & !511;
                let sectors = ((e & !(FLAG_COPIED | super::FLAG_COMPRESSED)) >> shift) + 1;
                let last = host + sectors * 512 - 1;
                self.pending_free.extend(host / cs..=last / cs);
            }
            Cluster::Zero | Cluster::Unallocated => {}
        }
        if self.pending_free.len() > MAX_PENDING_FREE {
            self.flush()?;
        }
        Ok(())
    }

    /// WRITE_ZEROES (`zero`) or DISCARD over guest `[offset, offset + len)`: whole clusters
    /// become unallocated (no backing image) or zero clusters (over a backing image, v3);
    /// partial clusters are written with zeros, or for a discard left as they are.
    pub(super) fn unmap(&mut self, offset: u64, len: u64, zero: bool) -> io::Result<()> {
        self.check_writable(offset, len)?;
        let cs = self.cs;
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let in_off = off % cs;
            let start = off - in_off;
            let clen = cs.min(self.h.size - start);
            let n = (clen - in_off).min(end - off);
            if in_off == 0 && n == clen {
                self.unmap_cluster(off, zero)?;
            } else if zero {
                self.zero_part(off, n)?;
            }
            off += n;
        }
        Ok(())
    }

    fn unmap_cluster(&mut self, off: u64, zero: bool) -> io::Result<()> {
        let e = self.l2_entry(off)?;
        let kind = self.classify(e)?;
        let backing = self.backing.is_some();
        let target = match (backing, self.h.version) {
            (false, _) => 0,
            (true, 3) => FLAG_ZERO,
            // A v2 image over a backing file cannot say "zeros": write them.
            (true, _) if zero => return self.zero_part(off, self.cs.min(self.h.size - off)),
            (true, _) => return Ok(()),
        };
        let already = match kind {
            Cluster::Unallocated => !backing,
            Cluster::Zero => true,
            _ => false,
        };
        if already {
            return Ok(());
        }
        let l2_off = self.l2_for_write(off)?;
        let (_, i2) = self.indices(off);
        self.set_l2(l2_off, i2, target)?;
        self.free_later(kind)
    }

    /// Writes `n` zero bytes at guest `off` (within one cluster) unless they read as zeros.
    fn zero_part(&mut self, off: u64, n: u64) -> io::Result<()> {
        let e = self.l2_entry(off)?;
        let kind = self.classify(e)?;
        if kind == Cluster::Zero || (kind == Cluster::Unallocated && self.backing.is_none()) {
            return Ok(());
        }
        let mut zeros = vec![0u8; n as usize];
        self.write(&[VolatileSlice::from(&mut zeros[..])], off)
    }

    /// Makes every completed write durable: data and refcounts, then the L2 and L1 changes,
    /// then releases the clusters unmapped since the last flush.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.write_metadata()?;
        self.sync()?;
        self.release_pending()
    }

    fn sync(&self) -> io::Result<()> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err(format!("fdatasync failed: {e}")))
    }

    /// Writes the changed L2 and L1 sectors, after an fdatasync of what they point at.
    pub(super) fn write_metadata(&mut self) -> io::Result<()> {
        if !self.l2.any_dirty() && self.l1_dirty.is_empty() {
            return Ok(());
        }
        self.sync()?;
        for off in self.l2.dirty_offsets() {
            let t = self.l2.get(off).expect("listed");
            let Some((a, b)) = t.take_dirty() else {
                continue;
            };
            // Whole 512-byte sectors (64 entries) around the changed entries.
            let (first, last) = (a / 64 * 64, ((b / 64 + 1) * 64).min(t.data.len()));
            let raw: Vec<u8> = t.data[first..last]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            let at = off + first as u64 * 8;
            if let Err(e) = pwrite_all(&self.file, &raw, at) {
                // Keep it dirty: the next flush tries again.
                if let Some(t) = self.l2.get(off) {
                    t.mark(a);
                    t.mark(b);
                }
                return Err(self.io_err(format!("cannot write the L2 table at {off:#x}: {e}")));
            }
            self.file_len = self.file_len.max(off + self.cs);
        }
        let sectors: Vec<u64> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
        for (k, s) in sectors.iter().enumerate() {
            let first = (*s * 64) as usize;
            let last = (first + 64).min(self.l1.len());
            let raw: Vec<u8> = self.l1[first..last]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            if let Err(e) = pwrite_all(&self.file, &raw, self.h.l1_table_offset + first as u64 * 8)
            {
                self.l1_dirty.extend(&sectors[k..]);
                return Err(self.io_err(format!("cannot write the L1 table: {e}")));
            }
        }
        Ok(())
    }

    /// Lowers the refcounts of the clusters unmapped before the last flush; a cluster that
    /// reaches 0 is punched out of the file.
    fn release_pending(&mut self) -> io::Result<()> {
        while let Some(c) = self.pending_free.pop() {
            if self.adjust_refcount(c, false)? == 0 {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // Only space is at stake: a filesystem without hole punching keeps it.
                let _ = fallocate(&self.file, mode, c * self.cs, self.cs);
            }
        }
        Ok(())
    }
}
