//! Nested-tier case groups beyond the boot cases in nested.rs.
pub mod blk;
pub mod exits;
pub mod fs;
pub mod fw;
pub mod img;
pub mod iommu;
pub mod net;
pub mod run;
pub mod soak;
pub mod vsock;

use crate::harness::CaseOutput;
use crate::value;

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

/// Fails unless the output's `KEY=N` line has N = `want`.
pub fn status(o: &CaseOutput, key: &str, want: i64) -> Result<(), String> {
    match value(o, key)? {
        v if v == want => Ok(()),
        v => Err(format!("{key}={v}, expected {want}")),
    }
}

/// Fails unless the md5 the guest printed for `file` (its `md5sum FILE` line) equals the
/// host's md5 of the file in the image (the line tagged `host-md5`): no synced data lost.
pub fn synced_file_intact(o: &CaseOutput, file: &str) -> Result<(), String> {
    let guest = o
        .output
        .lines()
        .find(|l| l.contains(file) && l.len() > 32)
        .and_then(|l| l.split_whitespace().next())
        .ok_or("no guest md5")?
        .to_string();
    let host = tagged_md5(o, "host-md5")?;
    if guest != host {
        return Err(format!("data lost: guest md5 {guest}, image md5 {host}"));
    }
    Ok(())
}
