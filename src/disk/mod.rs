//! Disk images: the formats a virtio-blk disk can be stored in, behind one interface.
//!
//! - [`DiskBackend`] is what the virtio-blk request path calls: vectored reads and writes
//!   straight into guest memory, flush, discard and write-zeroes, at guest (virtual) offsets.
//! - [`open`] opens and locks a file (one writer, or many readers), detects its format from
//!   the contents ([`probe`]) unless told, and returns the backend: [`raw::RawDisk`],
//!   [`qcow2::Qcow2`] (with its backing chain) or [`vhd::Vhd`] (with its parent chain).
//! - [`overlay`] creates qcow2 overlays over a base image (`backing=`, `overlay=on`);
//!   [`info`] describes an image for `ferrovm img info`.
//!
//! Every backend is used by one worker thread at a time, but the interface takes `&self` so
//! a device and its worker can share it through an `Arc`; formats with mutable metadata keep
//! it behind a mutex.

pub mod info;
pub(crate) mod io;
pub mod mem;
pub mod overlay;
pub mod qcow2;
pub mod raw;
#[cfg(test)]
mod test_util;
pub mod vfat;
pub mod vhd;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

pub use raw::RawDisk;

/// Disks count in 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

/// The image formats ferrovm reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Vhd,
}

impl Format {
    /// The name used in `format=` and in qemu-img.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vhd",
        }
    }

    /// Parses a `format=` value; qemu's name `vpc` is accepted for VHD.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "vhd" | "vpc" => Some(Format::Vhd),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The host side of a disk, at guest offsets. Callers check that every range lies inside
/// [`DiskBackend::size`]; backends still refuse one that does not (never a write outside).
pub trait DiskBackend: Send + Sync + std::fmt::Debug {
    /// The image path, as given by the user.
    fn path(&self) -> &Path;
    /// The format of the top image.
    fn format(&self) -> Format;
    /// The virtual size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// True when the image was opened read-only.
    fn readonly(&self) -> bool;
    /// True when the file was opened with O_DIRECT.
    fn direct(&self) -> bool {
        false
    }
    /// The file descriptor to run guest I/O on directly (io_uring), when guest offsets are
    /// file offsets: raw images only.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// The qcow2 image behind this backend, for `img info` and overlays.
    fn as_qcow2(&self) -> Option<&qcow2::Qcow2> {
        None
    }
    /// The VHD image behind this backend, for `img info` and differencing parents.
    fn as_vhd(&self) -> Option<&vhd::Vhd> {
        None
    }
    /// Reads exactly the total length of `bufs` from guest offset `offset`.
    fn read_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> std::io::Result<()>;
    /// Writes all of `bufs` at guest offset `offset`.
    fn write_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> std::io::Result<()>;
    /// Makes every completed write durable, metadata included.
    fn flush(&self) -> std::io::Result<()>;
    /// A hint that `[offset, offset + len)` is no longer needed; the range may read back as
    /// zeros or as its old contents.
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Zeroes `[offset, offset + len)`, deallocating it when `unmap` allows.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()>;
}

/// How to open an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub readonly: bool,
    /// O_DIRECT on the top image.
    pub direct: bool,
    /// The format, or `None` to detect it from the contents.
    pub format: Option<Format>,
}

/// Why an image could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "disk image {path} is in use by another process (locked); use readonly=on to share it read-only"
    )]
    Locked { path: PathBuf },
    #[error("cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot determine the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    UnalignedSize { path: PathBuf, size: u64 },
    #[error("cannot read disk image {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write disk image {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{format} image {path}: {reason}")]
    Invalid {
        path: PathBuf,
        format: Format,
        reason: String,
    },
    #[error("{format} image {path}: {reason} is not supported")]
    Unsupported {
        path: PathBuf,
        format: Format,
        reason: String,
    },
    #[error("{format} image {path}: {reason}")]
    Refused {
        path: PathBuf,
        format: Format,
        reason: String,
    },
    #[error("backing file of {path}")]
    Backing {
        path: PathBuf,
        #[source]
        source: Box<DiskError>,
    },
    #[error("{0}")]
    Other(String),
}

/// Opens `opts.path`, locks it (shared when read-only, exclusive otherwise), detects or checks
/// its format and returns the backend. A qcow2 image opens its backing chain too.
pub fn open(opts: &DiskOptions) -> Result<Box<dyn DiskBackend>, DiskError> {
    open_in_chain(opts, &mut Vec::new())
}

/// Opens one image of a backing chain; `chain` holds the canonical paths of the images above.
pub(crate) fn open_in_chain(
    opts: &DiskOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn DiskBackend>, DiskError> {
    let file = open_locked(&opts.path, opts.readonly, opts.direct)?;
    let detected = probe(&file, &opts.path)?;
    let format = match opts.format {
        Some(Format::Raw) if detected != Format::Raw => {
            log::warn!(
                "disk image {} looks like {detected} but format=raw was given: the guest sees \
                 (and can overwrite) the {detected} metadata",
                opts.path.display()
            );
            Format::Raw
        }
        Some(f) if f != Format::Raw && f != detected => {
            return Err(DiskError::Invalid {
                path: opts.path.clone(),
                format: f,
                reason: format!("the file is not a {f} image (it looks like {detected})"),
            })
        }
        Some(f) => f,
        None => detected,
    };
    Ok(match format {
        Format::Raw => Box::new(RawDisk::from_file(file, opts)?),
        Format::Qcow2 => Box::new(qcow2::Qcow2::open(file, opts, chain)?),
        Format::Vhd => Box::new(vhd::Vhd::open(file, opts, chain)?),
    })
}

/// Opens `path` read-only or read-write (O_DIRECT when asked) and takes an OFD lock on the
/// whole file: a read lock when read-only, a write lock otherwise, so that no second ferrovm
/// (or QEMU, which takes the same kind of lock) writes an image that is in use.
pub(crate) fn open_locked(path: &Path, readonly: bool, direct: bool) -> Result<File, DiskError> {
    let mut o = OpenOptions::new();
    o.read(true).write(!readonly);
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    o.custom_flags(flags);
    let file = o.open(path).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    io::lock_whole_file(&file, readonly).map_err(|source| {
        if matches!(
            source.raw_os_error(),
            Some(libc::EAGAIN) | Some(libc::EACCES)
        ) {
            DiskError::Locked {
                path: path.to_path_buf(),
            }
        } else {
            DiskError::Lock {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    Ok(file)
}

/// The size of an open file or block device (seeking to the end works for both).
pub(crate) fn file_size(file: &File, path: &Path) -> Result<u64, DiskError> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0)).map_err(|source| DiskError::Size {
        path: path.to_path_buf(),
        source,
    })
}

/// Detects the format of an open image from its first sector (qcow2 magic) and its last
/// sector (VHD footer cookie); anything else is raw.
pub fn probe(file: &File, path: &Path) -> Result<Format, DiskError> {
    let size = file_size(file, path)?;
    let mut buf = io::AlignedBuf::new(SECTOR_SIZE as usize).map_err(|e| DiskError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    if size >= SECTOR_SIZE {
        read_sector(file, path, buf.as_mut_slice(), 0)?;
        if buf.as_slice()[..4] == qcow2::MAGIC {
            return Ok(Format::Qcow2);
        }
        if buf.as_slice()[..8] == vhd::COOKIE {
            // A dynamic VHD starts with a copy of its footer.
            return Ok(Format::Vhd);
        }
        read_sector(file, path, buf.as_mut_slice(), size - SECTOR_SIZE)?;
        if buf.as_slice()[..8] == vhd::COOKIE {
            return Ok(Format::Vhd);
        }
    }
    Ok(Format::Raw)
}

fn read_sector(file: &File, path: &Path, buf: &mut [u8], pos: u64) -> Result<(), DiskError> {
    io::pread_all(file, buf, pos).map_err(|source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// The error for a request outside the disk (the request path checks first; this is the
/// backend's own guard).
pub(crate) fn out_of_range(path: &Path, offset: u64, len: u64) -> std::io::Error {
    io::eio(format!(
        "{}: request [{offset}, +{len}) lies outside the disk",
        path.display()
    ))
}
