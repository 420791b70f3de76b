//! A bounded cache of metadata tables (L2 tables, refcount blocks), keyed by their offset in
//! the image, evicting the least recently used. Tables remember which entries changed since
//! they were last written, so a flush writes only those sectors.

use std::collections::HashMap;

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
    map: HashMap<u64, Table<T>>,
    cap: usize,
    clock: u64,
}

impl<T> Cache<T> {
    pub fn new(cap: usize) -> Self {
        Cache {
            map: HashMap::new(),
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
}
