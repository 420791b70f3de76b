//! Refcounts: reading and writing entries of any width (1 to 64 bits, `refcount_order` 0-6),
//! allocating clusters at the end of the file, creating refcount blocks and growing the
//! refcount table. Refcount changes are written through at once (see the crash-safety notes
//! in the module above).

use std::io;

use super::super::io::{pread_all, pwrite_all};
use super::header::MAX_REFTABLE_BYTES;
use super::State;

/// Allocation gives up after skipping this many clusters that have a refcount but lie beyond
/// the end of the file (a corrupt or hostile refcount table).
const MAX_SKIP: u64 = 1 << 20;

/// Entry `i` of a refcount block of `order`.
pub(super) fn get(block: &[u8], i: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = i * bits;
        return u64::from(block[bit / 8] >> (bit % 8)) & ((1 << bits) - 1);
    }
    let n = bits / 8;
    block[i * n..(i + 1) * n]
        .iter()
        .fold(0u64, |v, b| (v << 8) | u64::from(*b))
}

/// Sets entry `i`; returns the byte range of the block that changed.
pub(super) fn set(block: &mut [u8], i: usize, order: u32, v: u64) -> (usize, usize) {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = i * bits;
        let mask = ((1u16 << bits) - 1) as u8;
        let b = &mut block[bit / 8];
        *b = (*b & !(mask << (bit % 8))) | (((v as u8) & mask) << (bit % 8));
        return (bit / 8, 1);
    }
    let n = bits / 8;
    let bytes = v.to_be_bytes();
    block[i * n..(i + 1) * n].copy_from_slice(&bytes[8 - n..]);
    (i * n, n)
}

impl State {
    fn refcount_bits(&self) -> u32 {
        1 << self.h.refcount_order
    }

    fn max_refcount(&self) -> u64 {
        match self.refcount_bits() {
            64 => u64::MAX,
            b => (1u64 << b) - 1,
        }
    }

    /// Entries in one refcount block.
    fn per_block(&self) -> u64 {
        self.cs * 8 / u64::from(self.refcount_bits())
    }

    /// Makes sure the refcount block at `off` is cached.
    fn load_refblock(&mut self, off: u64) -> io::Result<()> {
        if self.refblocks.contains(off) {
            return Ok(());
        }
        if let Some((victim, _)) = self.refblocks.victim() {
            // Refcount blocks are written through, so they are never dirty.
            self.refblocks.remove(victim);
        }
        let mut data = vec![0u8; self.cs as usize];
        pread_all(&self.file, &mut data, off)
            .map_err(|e| self.io_err(format!("cannot read the refcount block at {off:#x}: {e}")))?;
        self.refblocks.insert(off, data, false);
        Ok(())
    }

    /// The refcount of host cluster `cluster` (0 where no refcount block covers it).
    pub(super) fn refcount(&mut self, cluster: u64) -> io::Result<u64> {
        let per = self.per_block();
        let Some(&block) = self.reftable.get((cluster / per) as usize) else {
            return Ok(0);
        };
        if block == 0 {
            return Ok(0);
        }
        self.load_refblock(block)?;
        let order = self.h.refcount_order;
        let t = self.refblocks.get(block).expect("just loaded");
        Ok(get(&t.data, (cluster % per) as usize, order))
    }

    /// Sets the refcount of `cluster`, creating its refcount block (and growing the refcount
    /// table) when there is none.
    pub(super) fn set_refcount(&mut self, cluster: u64, value: u64) -> io::Result<()> {
        if value > self.max_refcount() {
            return Err(self.io_err(format!(
                "refcount of cluster {cluster} would overflow {} bits",
                self.refcount_bits()
            )));
        }
        let per = self.per_block();
        let index = cluster / per;
        if index >= self.reftable.len() as u64 {
            if value == 0 {
                return Ok(());
            }
            self.grow_reftable(index + 1)?;
        }
        if self.reftable[index as usize] == 0 {
            if value == 0 {
                return Ok(());
            }
            self.new_refblock(index)?;
        }
        let block = self.reftable[index as usize];
        self.load_refblock(block)?;
        let order = self.h.refcount_order;
        let t = self.refblocks.get(block).expect("just loaded");
        let (start, len) = set(&mut t.data, (cluster % per) as usize, order, value);
        let bytes = t.data[start..start + len].to_vec();
        pwrite_all(&self.file, &bytes, block + start as u64).map_err(|e| {
            self.io_err(format!(
                "cannot write the refcount block at {block:#x}: {e}"
            ))
        })
    }

    /// Adds `delta` (+1 or -1) to the refcount of `cluster`.
    pub(super) fn adjust_refcount(&mut self, cluster: u64, up: bool) -> io::Result<u64> {
        let old = self.refcount(cluster)?;
        let new = if up {
            old.checked_add(1)
        } else {
            old.checked_sub(1)
        }
        .ok_or_else(|| {
            self.io_err(format!(
                "refcount of cluster {cluster} is already {old} (corrupt image; run qemu-img \
                 check -r all)"
            ))
        })?;
        self.set_refcount(cluster, new)?;
        Ok(new)
    }

    /// The next cluster index at or after `next_free` with refcount 0, which it passes.
    fn next_unused(&mut self) -> io::Result<u64> {
        for _ in 0..MAX_SKIP {
            let c = self.next_free;
            self.next_free += 1;
            if self.refcount(c)? == 0 {
                return Ok(c);
            }
        }
        Err(self.io_err(
            "no free cluster after the end of the file (corrupt refcounts; run qemu-img check)"
                .into(),
        ))
    }

    /// Allocates one cluster beyond the end of the file; returns its offset. Its refcount is
    /// 1 before this returns.
    pub(super) fn alloc_cluster(&mut self) -> io::Result<u64> {
        let c = self.next_unused()?;
        self.set_refcount(c, 1)?;
        Ok(c * self.cs)
    }

    /// Takes an unused cluster and writes `cs` zero bytes there (a new table); the caller
    /// sets its refcount.
    fn alloc_zeroed(&mut self) -> io::Result<u64> {
        let off = self.next_unused()? * self.cs;
        pwrite_all(&self.file, &vec![0u8; self.cs as usize], off)
            .map_err(|e| self.io_err(format!("cannot write a new table at {off:#x}: {e}")))?;
        self.file_len = self.file_len.max(off + self.cs);
        Ok(off)
    }

    /// Creates the (missing) refcount block for refcount table entry `index`. The block is a
    /// new zeroed cluster at the end of the file; its own refcount goes wherever it falls
    /// (often into itself).
    fn new_refblock(&mut self, index: u64) -> io::Result<()> {
        let block = self.alloc_zeroed()?;
        self.metadata.insert(block);
        self.reftable[index as usize] = block;
        self.write_reftable_entry(index)?;
        self.set_refcount(block / self.cs, 1)
    }

    fn write_reftable_entry(&self, index: u64) -> io::Result<()> {
        let v = self.reftable[index as usize].to_be_bytes();
        pwrite_all(&self.file, &v, self.h.refcount_table_offset + index * 8)
            .map_err(|e| self.io_err(format!("cannot write refcount table entry {index}: {e}")))
    }

    /// Moves the refcount table to a larger copy at the end of the file, holding at least
    /// `min_entries` entries and enough to cover itself.
    fn grow_reftable(&mut self, min_entries: u64) -> io::Result<()> {
        let per = self.per_block();
        let cs = self.cs;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        let start = self.next_free;
        let mut entries = min_entries.max(self.reftable.len() as u64 * 2);
        let clusters = loop {
            let clusters = (entries * 8).div_ceil(cs);
            // The new table and up to one new refcount block per covered range after it.
            let end = start + clusters + clusters.div_ceil(per) + 2;
            if end.div_ceil(per) <= entries {
                break clusters;
            }
            entries = end.div_ceil(per).max(entries + 1);
        };
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(self.io_err(format!(
                "the refcount table would exceed {MAX_REFTABLE_BYTES} bytes (image too large)"
            )));
        }
        for c in start..start + clusters {
            if self.refcount(c)? != 0 {
                return Err(self.io_err(format!(
                    "cluster {c} after the end of the file has a refcount (corrupt image)"
                )));
            }
        }
        let new_off = start * cs;
        self.next_free = start + clusters;
        let mut table = std::mem::take(&mut self.reftable);
        table.resize((clusters * cs / 8) as usize, 0);
        self.reftable = table;
        self.h.refcount_table_offset = new_off;
        self.h.refcount_table_clusters = clusters as u32;
        for c in start..start + clusters {
            self.set_refcount(c, 1)?;
        }
        let mut raw = Vec::with_capacity(self.reftable.len() * 8);
        for e in &self.reftable {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        let sync = |s: &Self| {
            s.file
                .sync_data()
                .map_err(|e| s.io_err(format!("fdatasync: {e}")))
        };
        pwrite_all(&self.file, &raw, new_off)
            .map_err(|e| self.io_err(format!("cannot write the new refcount table: {e}")))?;
        self.file_len = self.file_len.max(new_off + clusters * cs);
        sync(self)?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        pwrite_all(&self.file, &hdr, 48)
            .map_err(|e| self.io_err(format!("cannot update the header: {e}")))?;
        sync(self)?;
        for c in old_off / cs..old_off / cs + old_clusters {
            self.adjust_refcount(c, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 64];
            let n = 64 * 8 / bits as usize;
            for i in 0..n {
                set(&mut block, i, order, (i as u64) & max);
            }
            set(&mut block, 3, order, max);
            for i in 0..n {
                let want = if i == 3 { max } else { (i as u64) & max };
                assert_eq!(get(&block, i, order), want, "order {order} entry {i}");
            }
        }
        // 16-bit entries are big-endian, 1-bit entries fill a byte from its low bit.
        let mut b = vec![0u8; 4];
        set(&mut b, 1, 4, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
        let mut b = vec![0u8; 1];
        set(&mut b, 0, 0, 1);
        set(&mut b, 7, 0, 1);
        assert_eq!(b, [0x81]);
    }
}
