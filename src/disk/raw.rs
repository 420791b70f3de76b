//! Raw images: guest offset = file offset. A regular file or a block device, read and
//! written with preadv/pwritev straight into guest memory; with O_DIRECT, guest buffers that
//! the kernel refuses (misaligned) go through an aligned bounce buffer.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

use super::io::{fallocate, gather, pread_all, pwrite_all, rw_vectored, scatter, AlignedBuf, Dir};
use super::{file_size, DiskBackend, DiskError, DiskOptions, Format, SECTOR_SIZE};

/// Size of the aligned bounce buffer used when O_DIRECT refuses guest buffers (misaligned) and
/// of the zero buffer used when the filesystem cannot zero a range itself.
const BOUNCE_SIZE: usize = 256 * 1024;

/// An opened, locked raw image.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: bool,
}

impl RawDisk {
    /// Opens and locks `opts.path` as a raw image (see [`super::open_locked`]).
    pub fn open(opts: &DiskOptions) -> Result<RawDisk, DiskError> {
        let file = super::open_locked(&opts.path, opts.readonly, opts.direct)?;
        RawDisk::from_file(file, opts)
    }

    /// A raw image over an already opened and locked file.
    pub fn from_file(file: File, opts: &DiskOptions) -> Result<RawDisk, DiskError> {
        let path = opts.path.clone();
        let size = file_size(&file, &path)?;
        if size % SECTOR_SIZE != 0 {
            return Err(DiskError::UnalignedSize { path, size });
        }
        Ok(RawDisk {
            file,
            path,
            size,
            readonly: opts.readonly,
            direct: opts.direct,
        })
    }

    /// A raw image of `size` bytes at the start of `file` (a fixed VHD: the data before its
    /// footer).
    pub(crate) fn with_size(file: File, opts: &DiskOptions, size: u64) -> RawDisk {
        RawDisk {
            file,
            path: opts.path.clone(),
            size,
            readonly: opts.readonly,
            direct: opts.direct,
        }
    }

    /// Deallocates `[offset, offset + len)`; reads of the range return zeros afterwards.
    pub(crate) fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if super::in_range(offset, len, self.size) {
            Ok(())
        } else {
            Err(super::out_of_range(&self.path, offset, len))
        }
    }

    fn rw(&self, bufs: &[VolatileSlice<'_>], offset: u64, dir: Dir) -> io::Result<()> {
        self.check(offset, super::io::total_len(bufs) as u64)?;
        match rw_vectored(&self.file, bufs, offset, dir) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.bounce(bufs, offset, dir)
            }
            other => other,
        }
    }
}

impl DiskBackend for RawDisk {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn direct(&self) -> bool {
        self.direct
    }

    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn read_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.rw(bufs, offset, Dir::Read)
    }

    fn write_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.rw(bufs, offset, Dir::Write)
    }

    /// fdatasync.
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Punches a hole; a filesystem that cannot keeps the data (discard is a hint).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        match self.punch_hole(offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }

    /// fallocate (punch a hole when `unmap`, zero the range otherwise); falls back to writing
    /// zeros when the filesystem does not support the mode.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check(offset, len)?;
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.file, mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeroes_slow(offset, len)
            }
            other => other,
        }
    }
}

impl RawDisk {
    fn write_zeroes_slow(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = AlignedBuf::new(BOUNCE_SIZE)?;
        let mut done = 0u64;
        while done < len {
            let chunk = usize::try_from(len - done).map_or(BOUNCE_SIZE, |r| r.min(BOUNCE_SIZE));
            let pos = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            pwrite_all(&self.file, &zeros.as_slice()[..chunk], pos)?;
            done += chunk as u64;
        }
        Ok(())
    }

    /// O_DIRECT fallback for guest buffers that do not meet the alignment rules: copy through
    /// an aligned host buffer, one bounded chunk at a time.
    fn bounce(&self, bufs: &[VolatileSlice<'_>], offset: u64, dir: Dir) -> io::Result<()> {
        let mut bounce = AlignedBuf::new(BOUNCE_SIZE)?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0usize;
        while done < total {
            let chunk = (total - done).min(BOUNCE_SIZE);
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let host = &mut bounce.as_mut_slice()[..chunk];
            match dir {
                Dir::Read => {
                    pread_all(&self.file, host, pos)?;
                    scatter(bufs, done, host);
                }
                Dir::Write => {
                    gather(bufs, done, host);
                    pwrite_all(&self.file, host, pos)?;
                }
            }
            done += chunk;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    fn image(len: usize) -> TempFile {
        let t = TempFile::new_with_prefix("/var/tmp/ferrovm-disk-test").unwrap();
        t.as_file().write_all(&vec![0xabu8; len]).unwrap();
        t
    }

    fn cfg(t: &TempFile, readonly: bool) -> DiskOptions {
        DiskOptions {
            path: t.as_path().to_path_buf(),
            readonly,
            direct: false,
            format: None,
        }
    }

    #[test]
    fn open_reports_size_and_mode() {
        let t = image(4096);
        let d = RawDisk::open(&cfg(&t, false)).unwrap();
        assert_eq!(d.size(), 4096);
        assert!(!d.readonly());
        assert_eq!(d.path(), t.as_path());
    }

    #[test]
    fn open_missing_file_names_path() {
        let c = DiskOptions {
            path: PathBuf::from("/nonexistent/ferrovm/disk.img"),
            readonly: false,
            direct: false,
            format: None,
        };
        let err = RawDisk::open(&c).unwrap_err();
        assert!(matches!(err, DiskError::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/ferrovm/disk.img"));
    }

    #[test]
    fn unaligned_size_is_rejected() {
        let t = image(1000);
        let err = RawDisk::open(&cfg(&t, false)).unwrap_err();
        assert!(matches!(err, DiskError::UnalignedSize { size: 1000, .. }));
        let msg = err.to_string();
        assert!(msg.contains("1000") && msg.contains(&t.as_path().display().to_string()));
    }

    #[test]
    fn second_writer_is_locked_out() {
        let t = image(4096);
        let _first = RawDisk::open(&cfg(&t, false)).unwrap();
        // OFD locks belong to the open file description, so a second open in the same process
        // conflicts just like a second ferrovm would.
        let err = RawDisk::open(&cfg(&t, false)).unwrap_err();
        assert!(matches!(err, DiskError::Locked { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("in use by another process"), "{msg}");
        assert!(msg.contains("readonly=on"), "{msg}");
        // A reader cannot join a writer either.
        assert!(matches!(
            RawDisk::open(&cfg(&t, true)).unwrap_err(),
            DiskError::Locked { .. }
        ));
    }

    #[test]
    fn readers_share_but_exclude_writers() {
        let t = image(4096);
        let _a = RawDisk::open(&cfg(&t, true)).unwrap();
        let _b = RawDisk::open(&cfg(&t, true)).unwrap();
        assert!(matches!(
            RawDisk::open(&cfg(&t, false)).unwrap_err(),
            DiskError::Locked { .. }
        ));
    }

    #[test]
    fn lock_released_on_drop() {
        let t = image(4096);
        drop(RawDisk::open(&cfg(&t, false)).unwrap());
        RawDisk::open(&cfg(&t, false)).unwrap();
    }

    #[test]
    fn vectored_io_and_zeroing() {
        let t = image(8192);
        let d = RawDisk::open(&cfg(&t, false)).unwrap();
        let mut a = [1u8; 512];
        let mut b = [2u8; 1024];
        // SAFETY: the slices point at live stack arrays of the given lengths.
        let bufs = unsafe {
            [
                VolatileSlice::new(a.as_mut_ptr(), a.len()),
                VolatileSlice::new(b.as_mut_ptr(), b.len()),
            ]
        };
        d.write_at(&bufs, 512).unwrap();
        let mut r = [0u8; 1536];
        // SAFETY: as above.
        let rb = unsafe { [VolatileSlice::new(r.as_mut_ptr(), r.len())] };
        d.read_at(&rb, 512).unwrap();
        assert!(r[..512].iter().all(|&x| x == 1));
        assert!(r[512..].iter().all(|&x| x == 2));

        d.write_zeroes(512, 512, false).unwrap();
        d.write_zeroes_slow(1024, 512).unwrap();
        d.read_at(&rb, 512).unwrap();
        assert!(r[..1024].iter().all(|&x| x == 0));
        d.discard(0, 512).unwrap();
        d.read_at(&rb, 0).unwrap();
        assert!(r[..512].iter().all(|&x| x == 0));
        d.flush().unwrap();
        // Reading past the end is an error, not a silent short read.
        assert!(d.read_at(&rb, 8192 - 512).is_err());
    }

    #[test]
    fn bounce_path_round_trips() {
        let t = image(8192);
        let d = RawDisk::open(&cfg(&t, false)).unwrap();
        let mut a = [7u8; 100];
        let mut b = [8u8; 412];
        // SAFETY: live stack arrays of the given lengths.
        let bufs = unsafe {
            [
                VolatileSlice::new(a.as_mut_ptr(), a.len()),
                VolatileSlice::new(b.as_mut_ptr(), b.len()),
            ]
        };
        d.bounce(&bufs, 1024, Dir::Write).unwrap();
        a.fill(0);
        b.fill(0);
        d.bounce(&bufs, 1024, Dir::Read).unwrap();
        assert!(a.iter().all(|&x| x == 7) && b.iter().all(|&x| x == 8));
    }
}
