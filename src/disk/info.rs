//! `ferrovm img info FILE`: format, virtual size, allocation, the backing chain (qcow2
//! backing files, VHD parents) and the problems found, in the spirit of `qemu-img info`.

use std::fmt::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{DiskBackend, DiskError, DiskOptions, Format};

/// Opens `path` read-only (shared lock: works while a VM runs it read-only, refuses while a
/// VM writes it) and describes it and its backing chain.
pub fn describe(path: &Path, format: Option<Format>) -> Result<String, DiskError> {
    let disk = super::open(&DiskOptions {
        path: path.to_path_buf(),
        readonly: true,
        direct: false,
        format,
    })?;
    let mut out = String::new();
    describe_one(disk.as_ref(), &mut out);
    let mut depth = 0;
    chain(disk.as_ref(), &mut out, &mut depth);
    Ok(out)
}

fn describe_one(d: &dyn DiskBackend, out: &mut String) {
    let alloc = std::fs::metadata(d.path()).map_or(0, |m| m.blocks() * 512);
    let _ = writeln!(out, "image: {}", d.path().display());
    let _ = writeln!(out, "file format: {}", d.format());
    let _ = writeln!(
        out,
        "virtual size: {} ({} bytes)",
        human(d.size()),
        d.size()
    );
    let _ = writeln!(out, "disk size: {}", human(alloc));
    if let Some(q) = d.as_qcow2() {
        let h = q.header();
        let _ = writeln!(out, "cluster_size: {}", h.cluster_size());
        let _ = writeln!(out, "version: {}", h.version);
        let _ = writeln!(out, "refcount bits: {}", 1u32 << h.refcount_order);
        let _ = writeln!(
            out,
            "compression type: {}",
            format!("{:?}", h.compression).to_lowercase()
        );
        let _ = writeln!(out, "extended L2: {}", extended_l2(&h));
        if let Some(b) = &h.backing_file {
            let fmt = h.backing_format.as_deref().unwrap_or("probed");
            let _ = writeln!(out, "backing file: {b} (format {fmt})");
        }
        let bits = h.incompatible_names();
        let problems = match q.check() {
            Ok(report) => report.summary(),
            Err(e) => format!("cannot check: {e}"),
        };
        if !bits.is_empty() {
            let _ = writeln!(out, "incompatible features: {}", bits.join(", "));
        }
        if h.nb_snapshots > 0 {
            let _ = writeln!(out, "internal snapshots: {}", h.nb_snapshots);
        }
        let _ = writeln!(out, "problems: {problems}");
    }
    if let Some(v) = d.as_vhd() {
        describe_vhd(v, out);
    }
}

/// "off", or the subclusters of an image with extended L2 entries.
fn extended_l2(h: &super::qcow2::Header) -> String {
    if !h.extended_l2() {
        return "off".into();
    }
    format!(
        "on (32 subclusters of {} bytes per cluster; ferrovm reads, does not write)",
        h.cluster_size() / 32
    )
}

fn describe_vhd(v: &super::vhd::Vhd, out: &mut String) {
    let _ = writeln!(out, "vhd type: {}", v.disk_type());
    if let Some(bs) = v.block_size() {
        let _ = writeln!(out, "block size: {bs}");
    }
    let _ = writeln!(out, "unique id: {}", v.unique_id());
    if let Some((p, how)) = v.parent() {
        let _ = writeln!(out, "parent: {} (found by {how})", p.path().display());
    }
}

fn chain(d: &dyn DiskBackend, out: &mut String, depth: &mut usize) {
    let mut next = |b: Option<&dyn DiskBackend>, what: &str| {
        if let Some(b) = b {
            *depth += 1;
            let _ = writeln!(out, "\n{what} image {depth}:");
            describe_one(b, out);
            chain(b, out, depth);
        }
    };
    if let Some(q) = d.as_qcow2() {
        q.with_backing(|b| next(b, "backing"));
    } else if let Some(v) = d.as_vhd() {
        next(v.parent().map(|(p, _)| p), "parent");
    }
}

/// 1536 -> "1.5 KiB".
fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000 ", " ")
    }
}
