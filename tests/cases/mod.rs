//! Nested-tier case groups beyond the boot cases in nested.rs.
pub mod blk;
pub mod img;
pub mod net;

use crate::harness::CaseOutput;

/// The checksum on the output line ending in `tag` (`md5sum | sed 's/ .*/ TAG/'` prints
/// `<sum> TAG`).
pub fn tagged_md5(o: &CaseOutput, tag: &str) -> Result<String, String> {
    o.output
        .lines()
        .find(|l| l.trim_end().ends_with(tag))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
        .ok_or_else(|| format!("no {tag} line"))
}
