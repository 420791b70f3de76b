//! A bounded cache of metadata tables (L2 tables, refcount blocks), keyed by their offset in
//! the image, evicting the least recently used. Tables remember which entries changed since
//! they were last written, so a flush writes only those sectors.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes table offsets for the cache's map. Every guest request looks its L2 table up, and
/// SipHash (the default) cost more than the rest of a cached lookup: this is one multiply.
/// The keys are offsets of tables the image names, checked at open (cluster-aligned, inside
/// the file, no two alike), so a hostile image can at worst make its own lookups slower.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Offsets are multiples of 512: drop those bits, spread the rest over the whole word
        // (the map takes its bucket from the low bits and a tag from the high ones).
        let p = (n >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = p ^ (p >> 29);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One cached table.
#[derive(Debug)]
pub(super) struct Table<T> {
    pub data: Vec<T>,
    /// The changed entries, `[first, last]`, not yet in the file.
    dirty: Option<(usize, usize)>,
    used: u64,
}

impl<T> Table<T> {
    /// Records that entry `i` changed.
    pub fn mark(&mut self, i: usize) {
        self.dirty = Some(match self.dirty {
            None => (i, i),
            Some((a, b)) => (a.min(i), b.max(i)),
        });
    }

    /// The changed range, cleared.
    pub fn take_dirty(&mut self) -> Option<(usize, usize)> {
        self.dirty.take()
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.is_some()
    }
}

/// The cache: at most `cap` tables.
#[derive(Debug)]
pub(super) struct Cache<T> {
    map: HashMap<u64, Table<T>, BuildHasherDefault<OffsetHasher>>,
    cap: usize,
    clock: u64,
}

impl<T> Cache<T> {
    pub fn new(cap: usize) -> Self {
        Cache {
            map: HashMap::default(),
            cap: cap.max(2),
            clock: 0,
        }
    }

    pub fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }

    /// The table at `off`, marked as just used.
    pub fn get(&mut self, off: u64) -> Option<&mut Table<T>> {
        self.clock += 1;
        let clock = self.clock;
        let t = self.map.get_mut(&off)?;
        t.used = clock;
        Some(t)
    }

    /// The table that the next insertion would evict, when the cache is full.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.map.len() < self.cap {
            return None;
        }
        self.map
            .iter()
            .min_by_key(|(_, t)| t.used)
            .map(|(off, t)| (*off, t.is_dirty()))
    }

    /// Drops the table at `off` (it must be clean or no longer needed).
    pub fn remove(&mut self, off: u64) -> Option<Table<T>> {
        self.map.remove(&off)
    }

    /// Inserts a table read from (or about to be written to) `off`; `dirty` marks all of it
    /// as changed. The caller made room first (see [`Cache::victim`]).
    pub fn insert(&mut self, off: u64, data: Vec<T>, dirty: bool) -> &mut Table<T> {
        self.clock += 1;
        let n = data.len();
        let t = Table {
            data,
            dirty: (dirty && n > 0).then(|| (0, n - 1)),
            used: self.clock,
        };
        self.map.insert(off, t);
        self.map.get_mut(&off).expect("just inserted")
    }

    /// Offsets of the tables with unwritten changes.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, t)| t.is_dirty())
            .map(|(o, _)| *o)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn any_dirty(&self) -> bool {
        self.map.values().any(|t| t.is_dirty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_tracks_dirty_ranges() {
        let mut c: Cache<u64> = Cache::new(2);
        c.insert(0, vec![0; 4], false);
        c.insert(64, vec![0; 4], false);
        c.get(0);
        assert_eq!(c.victim(), Some((64, false)));
        let t = c.get(0).unwrap();
        t.mark(3);
        t.mark(1);
        assert_eq!(c.dirty_offsets(), vec![0]);
        c.get(64);
        assert_eq!(c.victim(), Some((0, true)));
        assert_eq!(c.get(0).unwrap().take_dirty(), Some((1, 3)));
        assert!(!c.any_dirty());
        c.remove(64);
        assert_eq!(c.victim(), None);
    }

    #[test]
    fn offset_hasher_spreads_cluster_aligned_offsets() {
        use std::hash::BuildHasher;
        let b = BuildHasherDefault::<OffsetHasher>::default();
        // 4096 tables 64 KiB apart: their low 12 hash bits (a map's bucket index) and their
        // top 7 bits (its tag) must both vary.
        let hashes: Vec<u64> = (0..4096u64).map(|i| b.hash_one((i + 1) << 16)).collect();
        let low: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 4095).collect();
        let top: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(low.len() > 2048, "{} distinct buckets", low.len());
        assert_eq!(top.len(), 128);
        let mut c: Cache<u64> = Cache::new(4096);
        for i in 0..4096u64 {
            c.insert(i << 16, vec![i], false);
        }
        assert!((0..4096u64).all(|i| c.get(i << 16).unwrap().data == [i]));
    }
}
