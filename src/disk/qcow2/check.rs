//! A consistency check in the manner of `qemu-img check`: count the references to every
//! host cluster (header, tables, data) and compare them with the refcounts.

use std::io;

use super::{Cluster, Qcow2, State, FLAG_COMPRESSED, FLAG_COPIED, OFFSET_MASK};

/// Images with more host clusters than this are not checked (the counts would need too
/// much memory).
const MAX_CHECKED_CLUSTERS: u64 = 1 << 26;

/// What a check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters with a refcount higher than their references (space lost, data safe).
    pub leaks: u64,
    /// Clusters with a refcount lower than their references, or references outside the
    /// file: the image is corrupt.
    pub errors: u64,
    /// The first few problems, described.
    pub details: Vec<String>,
}

impl CheckReport {
    pub fn summary(&self) -> String {
        if self.leaks == 0 && self.errors == 0 {
            return "none".into();
        }
        let mut s = format!("{} error(s), {} leaked cluster(s)", self.errors, self.leaks);
        for d in &self.details {
            s.push_str("; ");
            s.push_str(d);
        }
        s
    }

    fn note(&mut self, error: bool, what: String) {
        if error {
            self.errors += 1;
        } else {
            self.leaks += 1;
        }
        if self.details.len() < 5 {
            self.details.push(what);
        }
    }
}

impl Qcow2 {
    /// Checks the image's refcounts against its references.
    pub fn check(&self) -> io::Result<CheckReport> {
        self.lock()?.check()
    }
}

impl State {
    fn check(&mut self) -> io::Result<CheckReport> {
        let cs = self.cs;
        let n = self.file_len.div_ceil(cs).max(self.next_free);
        let mut rep = CheckReport::default();
        if n > MAX_CHECKED_CLUSTERS {
            rep.details.push(format!("not checked: {n} clusters"));
            return Ok(rep);
        }
        let mut refs = vec![0u32; n as usize];
        let mut add = |rep: &mut CheckReport, off: u64, len: u64, what: &str| {
            let (first, last) = (off / cs, (off + len.max(1) - 1) / cs);
            for c in first..=last {
                match refs.get_mut(c as usize) {
                    Some(r) => *r = r.saturating_add(1),
                    None => rep.note(true, format!("{what} at {off:#x} lies beyond the file")),
                }
            }
        };
        add(&mut rep, 0, cs, "header");
        add(
            &mut rep,
            self.h.l1_table_offset,
            u64::from(self.h.l1_size) * 8,
            "L1 table",
        );
        let rt = u64::from(self.h.refcount_table_clusters) * cs;
        add(&mut rep, self.h.refcount_table_offset, rt, "refcount table");
        for b in self.reftable.clone().into_iter().filter(|b| *b != 0) {
            add(&mut rep, b, cs, "refcount block");
        }
        for l1e in self.l1.clone() {
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            add(&mut rep, l2_off, cs, "L2 table");
            self.load_l2(l2_off)?;
            let entries = self.l2.get(l2_off).expect("loaded").data.clone();
            let stride = if self.h.extended_l2() { 2 } else { 1 };
            for pair in entries.chunks_exact(stride) {
                let e = pair[0];
                let kind = match pair.get(1) {
                    // The host cluster counts even when no subcluster is allocated.
                    Some(bitmap) => super::map::subclusters(e, *bitmap, cs)
                        .map_err(|m| self.io_err(m))
                        .and_then(|_| self.classify(e)),
                    None => self.classify(e),
                };
                match kind {
                    Ok(Cluster::Data { host, .. }) => add(&mut rep, host, cs, "data cluster"),
                    Ok(Cluster::Compressed(e)) => {
                        let shift = 62 - (self.h.cluster_bits - 8);
                        let host = (e & ((1u64 << shift) - 1)) & !511;
                        let sectors = ((e & !(FLAG_COPIED | FLAG_COMPRESSED)) >> shift) + 1;
                        add(&mut rep, host, sectors * 512, "compressed cluster");
                    }
                    Ok(_) => {}
                    Err(err) => rep.note(true, err.to_string()),
                }
            }
        }
        for (c, r) in refs.iter().enumerate() {
            let rc = self.refcount(c as u64)?;
            let r = u64::from(*r);
            if rc < r {
                rep.note(
                    true,
                    format!("cluster {c}: refcount {rc} but {r} reference(s)"),
                );
            } else if rc > r {
                rep.note(
                    false,
                    format!("cluster {c}: refcount {rc} but {r} reference(s)"),
                );
            }
        }
        Ok(rep)
    }
}
