//! New qcow2 images: empty ones and overlays over a base image, persistent (`backing=BASE`)
//! or throwaway (`overlay=on`, QEMU's `-snapshot`: a temporary qcow2 deleted as soon as it is
//! open, so nothing is left behind even if ferrovm is killed).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::qcow2::header::{Compression, Header, MAX_L1_BYTES};
use super::{DiskBackend, DiskError, DiskOptions, Format};

/// ferrovm's default cluster size (64 KiB, as qemu-img's).
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// What to create.
#[derive(Debug, Clone)]
pub struct NewQcow2 {
    pub size: u64,
    pub cluster_bits: u32,
    /// Backing file name (as stored: relative names resolve against the new image's folder)
    /// and its format.
    pub backing: Option<(String, Format)>,
}

/// Creates a qcow2 v3 image at `path` (which must not exist): header, a one-cluster refcount
/// table, refcount blocks for the initial clusters and an empty L1 table.
pub fn create_qcow2(path: &Path, img: &NewQcow2) -> Result<(), DiskError> {
    let err = |reason: String| DiskError::Invalid {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        reason,
    };
    let cb = img.cluster_bits;
    if !(9..=21).contains(&cb) {
        return Err(err(format!("cluster size 2^{cb} (512 B to 2 MiB allowed)")));
    }
    let cs = 1u64 << cb;
    let per_l1 = cs * (cs / 8);
    let l1_size = img.size.div_ceil(per_l1).max(1);
    if l1_size * 8 > MAX_L1_BYTES || img.size % 512 != 0 {
        return Err(err(format!(
            "virtual size {} (a multiple of 512 that {cs}-byte clusters can map)",
            img.size
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let per_block = cs * 8 / 16;
    // Header, refcount table, refcount block(s), L1 table.
    let mut blocks = 1u64;
    while (2 + blocks + l1_clusters).div_ceil(per_block) > blocks {
        blocks += 1;
    }
    let total = 2 + blocks + l1_clusters;
    if blocks > cs / 8 {
        return Err(err(
            "too many clusters for one refcount table cluster".into()
        ));
    }
    let h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cb,
        size: img.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: (2 + blocks) * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: 4,
        header_length: super::qcow2::header::V3_HEADER_LEN,
        compression: Compression::Zlib,
        backing_file: img.backing.as_ref().map(|(n, _)| n.clone()),
        backing_format: img.backing.as_ref().map(|(_, f)| f.name().to_string()),
    };
    let mut image = vec![0u8; (total * cs) as usize];
    let first = h.serialize_v3().map_err(err)?;
    image[..first.len()].copy_from_slice(&first);
    for b in 0..blocks {
        let at = (cs + b * 8) as usize;
        image[at..at + 8].copy_from_slice(&((2 + b) * cs).to_be_bytes());
    }
    for c in 0..total {
        // 16-bit big-endian refcounts of 1, in the blocks starting at cluster 2.
        let at = (2 * cs + c * 2) as usize;
        image[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let write_err = |source| DiskError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all(&image).map_err(write_err)?;
    f.sync_all().map_err(write_err)
}

/// `--disk path=NEW,backing=BASE`: opens NEW, creating it first as an overlay of BASE when it
/// does not exist. An existing NEW must be a qcow2 image whose backing file is BASE.
pub fn open_persistent(opts: &DiskOptions, base: &Path) -> Result<Box<dyn DiskBackend>, DiskError> {
    if !opts.path.exists() {
        let (size, format) = base_info(base)?;
        let name = absolute(base)?;
        create_qcow2(
            &opts.path,
            &NewQcow2 {
                size,
                cluster_bits: DEFAULT_CLUSTER_BITS,
                backing: Some((name.to_string_lossy().into_owned(), format)),
            },
        )?;
    }
    let disk = super::open(&DiskOptions {
        format: Some(Format::Qcow2),
        ..opts.clone()
    })?;
    let want = absolute(base)?;
    let backing = backing_path(disk.as_ref());
    if backing.as_deref() != Some(want.as_path()) {
        return Err(DiskError::Refused {
            path: opts.path.clone(),
            format: Format::Qcow2,
            reason: format!(
                "it exists and is not an overlay of {} (its backing file is {})",
                base.display(),
                backing.map_or("none".into(), |p| p.display().to_string())
            ),
        });
    }
    Ok(disk)
}

/// `--disk path=BASE,overlay=on`: a temporary qcow2 over BASE in `$TMPDIR` (default
/// /var/tmp), open read-write and already unlinked; BASE is opened read-only.
pub fn open_throwaway(opts: &DiskOptions) -> Result<Box<dyn DiskBackend>, DiskError> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let (size, format) = match opts.format {
        Some(f) => (base_info(&opts.path)?.0, f),
        None => base_info(&opts.path)?,
    };
    let dir = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let tmp = dir.join(format!(
        "ferrovm-overlay-{}-{}.qcow2",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let name = absolute(&opts.path)?;
    create_qcow2(
        &tmp,
        &NewQcow2 {
            size,
            cluster_bits: DEFAULT_CLUSTER_BITS,
            backing: Some((name.to_string_lossy().into_owned(), format)),
        },
    )?;
    let opened = super::open(&DiskOptions {
        path: tmp.clone(),
        readonly: false,
        direct: opts.direct,
        format: Some(Format::Qcow2),
    });
    // Gone from the folder now; the open file lives until ferrovm exits.
    let _ = std::fs::remove_file(&tmp);
    opened
}

/// The virtual size and format of an image, opened read-only for a moment.
fn base_info(path: &Path) -> Result<(u64, Format), DiskError> {
    let d = super::open(&DiskOptions {
        path: path.to_path_buf(),
        readonly: true,
        direct: false,
        format: None,
    })?;
    Ok((d.size(), d.format()))
}

fn absolute(path: &Path) -> Result<PathBuf, DiskError> {
    std::fs::canonicalize(path).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// The resolved backing file of a qcow2 image, canonical when it exists.
pub fn backing_path(disk: &dyn DiskBackend) -> Option<PathBuf> {
    let q = disk.as_qcow2()?;
    let name = q.header().backing_file?;
    let p = super::qcow2::resolve_backing(disk.path(), &name);
    Some(std::fs::canonicalize(&p).unwrap_or(p))
}
