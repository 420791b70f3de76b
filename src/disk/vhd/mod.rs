//! VHD (qemu's "vpc"): fixed, dynamic and differencing images, read and write.
//!
//! A fixed VHD is raw data followed by a 512-byte footer; ferrovm serves the data as a raw
//! image of the footer's size, so the footer is never written. A dynamic VHD has a copy of
//! the footer at offset 0, a dynamic header, a block allocation table (BAT) of big-endian
//! sector offsets, and blocks made of a sector bitmap (which sectors the block holds) and the
//! data. A write to an unallocated block appends a block where the footer was, writes the
//! footer after it and then the BAT entry (`dynamic.rs`).
//!
//! A differencing VHD (disk type 4) is a dynamic VHD over a parent VHD (`parent.rs`): a
//! sector whose bitmap bit is clear, and every sector of an unallocated block, reads from the
//! parent. The parent is found through the header's parent locators (W2ru: a relative
//! Windows path, resolved against the child's folder; W2ku: an absolute one; MacX: a UTF-8
//! file URL) and then the header's parent name; it must be a VHD whose footer carries the
//! unique id the child's header names. It is opened read-only with a shared lock; chains
//! (also through qcow2 images) refuse loops and more than 16 levels. A write to an
//! unallocated block of a differencing VHD allocates the block with an all-clear bitmap and
//! copies nothing from the parent; every write sets the bits of the sectors it wrote (a write
//! that does not cover whole sectors is completed with the current contents first).
//!
//! The virtual size follows QEMU's reading of the footer: the CHS geometry for images made by
//! Virtual PC and older QEMU, the `current_size` field for Hyper-V, disk2vhd, XenServer and
//! QEMU's `qem2`, and for any image whose geometry is the maximum.

mod dynamic;
mod parent;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

pub use self::dynamic::Dynamic;
use super::io::pread_all;
use super::{file_size, DiskBackend, DiskError, DiskOptions, Format, RawDisk};

/// The footer's first eight bytes.
pub const COOKIE: [u8; 8] = *b"conectix";
const FOOTER_LEN: u64 = 512;
const DYN_HEADER_LEN: usize = 1024;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
/// CHS geometry that means "look at current_size" (65535 cylinders, 16 heads, 255 sectors).
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// One's complement of the byte sum, with the checksum field (at `at`) counted as zero.
fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, x)| s.wrapping_add(u32::from(*x)));
    !sum
}

/// A VHD unique id (footer bytes 68..84), as `img info` prints it.
fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// An open VHD image.
#[derive(Debug)]
pub struct Vhd {
    /// The footer's unique id (what a differencing child names its parent by).
    uuid: [u8; 16],
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Fixed(RawDisk),
    Dynamic(Box<Dynamic>),
}

impl Vhd {
    /// Opens a VHD whose file is open and locked; `chain` holds the canonical paths of the
    /// images above it (to refuse loops through parents).
    pub fn open(
        file: File,
        opts: &DiskOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Vhd, DiskError> {
        let path = opts.path.clone();
        let invalid = |reason: String| DiskError::Invalid {
            path: path.clone(),
            format: Format::Vhd,
            reason,
        };
        let len = file_size(&file, &path)?;
        if len < FOOTER_LEN {
            return Err(invalid("shorter than a footer".into()));
        }
        let mut footer = [0u8; 512];
        let read = |buf: &mut [u8], at| {
            pread_all(&file, buf, at).map_err(|source| DiskError::Read {
                path: path.clone(),
                source,
            })
        };
        read(&mut footer, len - FOOTER_LEN)?;
        if footer[..8] != COOKIE {
            // A dynamic image keeps a copy at the start (the end may be torn).
            read(&mut footer, 0)?;
        }
        let size = parse_footer(&footer).map_err(invalid)?;
        let uuid: [u8; 16] = footer[68..84].try_into().expect("16 bytes");
        let inner = match be32(&footer, 60) {
            TYPE_FIXED => {
                if size > len - FOOTER_LEN {
                    return Err(invalid(format!(
                        "the footer says {size} bytes but the file holds {}",
                        len - FOOTER_LEN
                    )));
                }
                Inner::Fixed(RawDisk::with_size(file, opts, size))
            }
            t @ (TYPE_DYNAMIC | TYPE_DIFFERENCING) => {
                let diff = (t == TYPE_DIFFERENCING).then_some(&mut *chain);
                let d = Dynamic::open(file, opts, footer, size, len, diff)?;
                Inner::Dynamic(Box::new(d))
            }
            t => return Err(invalid(format!("disk type {t}"))),
        };
        Ok(Vhd { uuid, inner })
    }

    fn inner(&self) -> &dyn DiskBackend {
        match &self.inner {
            Inner::Fixed(r) => r,
            Inner::Dynamic(d) => d.as_ref(),
        }
    }

    /// The footer's unique id, formatted.
    pub fn unique_id(&self) -> String {
        uuid_string(&self.uuid)
    }

    /// "fixed", "dynamic" or "differencing".
    pub fn disk_type(&self) -> &'static str {
        match &self.inner {
            Inner::Fixed(_) => "fixed",
            Inner::Dynamic(d) if d.parent().is_some() => "differencing",
            Inner::Dynamic(_) => "dynamic",
        }
    }

    /// The block size of a dynamic or differencing image.
    pub fn block_size(&self) -> Option<u64> {
        match &self.inner {
            Inner::Fixed(_) => None,
            Inner::Dynamic(d) => Some(d.block_size()),
        }
    }

    /// The parent of a differencing image: the image, and how it was found (for `img info`).
    pub fn parent(&self) -> Option<(&dyn DiskBackend, &str)> {
        match &self.inner {
            Inner::Dynamic(d) => d.parent().map(|p| (p.disk.as_ref(), p.found_by.as_str())),
            Inner::Fixed(_) => None,
        }
    }
}

/// Checks the footer; returns the virtual size.
fn parse_footer(f: &[u8; 512]) -> Result<u64, String> {
    if f[..8] != COOKIE {
        return Err("no footer (cookie \"conectix\" not found)".into());
    }
    let want = be32(f, 64);
    if checksum(f, 64) != want {
        return Err(format!(
            "footer checksum {want:#x} does not match its contents"
        ));
    }
    let cyls = u64::from(u16::from_be_bytes([f[56], f[57]]));
    let chs = cyls * u64::from(f[58]) * u64::from(f[59]);
    let app = &f[28..32];
    let uses_size = [b"win ", b"qem2", b"d2v ", b"CTXS"]
        .iter()
        .any(|a| app == *a)
        || app[..3] == *b"tap";
    let size = if uses_size || chs == MAX_GEOMETRY {
        be64(f, 48)
    } else {
        chs * 512
    };
    if size % 512 != 0 {
        return Err(format!("virtual size {size} is not a multiple of 512"));
    }
    Ok(size)
}

impl DiskBackend for Vhd {
    fn path(&self) -> &Path {
        self.inner().path()
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn size(&self) -> u64 {
        self.inner().size()
    }

    fn readonly(&self) -> bool {
        self.inner().readonly()
    }

    fn direct(&self) -> bool {
        self.inner().direct()
    }

    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.inner().raw_fd()
    }

    fn as_vhd(&self) -> Option<&Vhd> {
        Some(self)
    }

    fn read_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.inner().read_at(bufs, offset)
    }

    fn write_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.inner().write_at(bufs, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner().discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner().write_zeroes(offset, len, unmap)
    }
}

#[cfg(test)]
mod diff_tests;
#[cfg(test)]
mod tests;
