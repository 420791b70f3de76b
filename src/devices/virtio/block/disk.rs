//! The host side of a virtio-blk disk: an image file (or block device) opened with the access
//! mode the user asked for, locked against a second writer, and the few I/O primitives the
//! request path needs (vectored reads/writes straight into guest memory, flush, discard, zero).

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

use super::{BlockError, DiskConfig, SECTOR_SIZE};

/// Size of the aligned bounce buffer used when O_DIRECT refuses guest buffers (misaligned) and
/// of the zero buffer used when the filesystem cannot zero a range itself.
const BOUNCE_SIZE: usize = 256 * 1024;
/// Alignment of the bounce buffer; covers 512-byte and 4 KiB logical block sizes.
const BOUNCE_ALIGN: usize = 4096;

/// An opened, locked disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: bool,
}

impl DiskImage {
    /// Opens `config.path` read-only (`readonly=on`) or read-write, with O_DIRECT when
    /// `direct=on`, and takes an OFD lock on the whole file (read lock when read-only, write
    /// lock otherwise) so that no second ferrovm can open the same image writable.
    pub fn open(config: &DiskConfig) -> Result<DiskImage, BlockError> {
        let path = config.path.clone();
        let mut opts = OpenOptions::new();
        opts.read(true).write(!config.readonly);
        let mut flags = libc::O_CLOEXEC;
        if config.direct {
            flags |= libc::O_DIRECT;
        }
        opts.custom_flags(flags);
        let mut file = opts.open(&path).map_err(|source| BlockError::Open {
            path: path.clone(),
            source,
        })?;

        lock_whole_file(&file, config.readonly).map_err(|source| {
            if matches!(
                source.raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EACCES)
            ) {
                BlockError::Locked { path: path.clone() }
            } else {
                BlockError::Lock {
                    path: path.clone(),
                    source,
                }
            }
        })?;

        // Seeking to the end works for regular files and block devices alike (the metadata
        // length of a block device is 0).
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::UnalignedSize { path, size });
        }

        Ok(DiskImage {
            file,
            path,
            size,
            readonly: config.readonly,
            direct: config.direct,
        })
    }

    /// The image path, as given by the user.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the image in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size of the image in 512-byte sectors (the virtio-blk capacity).
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// True when the image was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The image's file descriptor, open for the lifetime of `self`.
    pub(crate) fn raw_fd(&self) -> std::os::unix::io::RawFd {
        self.file.as_raw_fd()
    }

    /// True when the image was opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Reads exactly the total length of `bufs` from `offset` into `bufs` (guest memory).
    /// The caller has checked that the range lies inside the image.
    pub(crate) fn read_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        match rw_vectored(&self.file, bufs, offset, Dir::Read) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.bounce(bufs, offset, Dir::Read)
            }
            other => other,
        }
    }

    /// Writes all of `bufs` (guest memory) at `offset`. The caller has checked the range.
    pub(crate) fn write_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        match rw_vectored(&self.file, bufs, offset, Dir::Write) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.bounce(bufs, offset, Dir::Write)
            }
            other => other,
        }
    }

    /// Makes all completed writes durable (fdatasync).
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
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

    /// Zeroes `[offset, offset + len)`, deallocating it when `unmap` is set; falls back to
    /// writing zeros when the filesystem does not support the fallocate mode.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
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

fn lock_whole_file(file: &File, shared: bool) -> io::Result<()> {
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value (l_start = l_len = 0
    // means "the whole file", l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if shared { libc::F_RDLCK } else { libc::F_WRLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: the fd is open for the lifetime of `file` and `fl` is a valid flock the kernel
    // only reads.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len =
        libc::off64_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only takes integers; the fd is valid for the lifetime of `file`.
    let ret = unsafe { libc::fallocate64(file.as_raw_fd(), mode, off, len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// preadv/pwritev over guest memory until every byte moved; a short transfer is retried from
/// where it stopped, an end of file (0 bytes) is an error.
fn rw_vectored(file: &File, bufs: &[VolatileSlice<'_>], offset: u64, dir: Dir) -> io::Result<()> {
    // The guards keep the (possibly dirty-tracked) mappings valid while the kernel uses them.
    let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .zip(bufs)
        .filter(|(_, b)| !b.is_empty())
        .map(|(g, b)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0usize;
    let mut pos = offset;
    while first < iovs.len() {
        let rest = &iovs[first..];
        let cnt = libc::c_int::try_from(rest.len().min(libc::UIO_MAXIOV as usize))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let off =
            libc::off64_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let ret = match dir {
            // SAFETY: every iovec points into guest memory validated by `get_slices` (kept
            // mapped by `guards`) with its exact length; the fd is valid.
            Dir::Read => unsafe { libc::preadv64(file.as_raw_fd(), rest.as_ptr(), cnt, off) },
            // SAFETY: as above; the kernel only reads the buffers.
            Dir::Write => unsafe { libc::pwritev64(file.as_raw_fd(), rest.as_ptr(), cnt, off) },
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let mut n = ret as usize;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        pos += n as u64;
        while n > 0 && first < iovs.len() {
            let iov = &mut iovs[first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: `n < iov_len`, so the advanced pointer stays inside the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
    if let Dir::Read = dir {
        for b in bufs {
            b.bitmap().mark_dirty(0, b.len());
        }
    }
    Ok(())
}

fn pread_all(file: &File, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    while !buf.is_empty() {
        match file.read_at(buf, pos) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => {
                buf = &mut buf[n..];
                pos += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn pwrite_all(file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, pos)
}

/// Copies `host` into the guest buffers starting `skip` bytes into their concatenation.
fn scatter(bufs: &[VolatileSlice<'_>], mut skip: usize, mut host: &[u8]) {
    for b in bufs {
        if host.is_empty() {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let Ok(tail) = b.offset(skip) else { break };
        skip = 0;
        let n = tail.len().min(host.len());
        tail.copy_from(&host[..n]);
        host = &host[n..];
    }
}

/// Copies from the guest buffers, starting `skip` bytes into their concatenation, into `host`.
fn gather(bufs: &[VolatileSlice<'_>], mut skip: usize, mut host: &mut [u8]) {
    for b in bufs {
        if host.is_empty() {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let Ok(tail) = b.offset(skip) else { break };
        skip = 0;
        let n = tail.copy_to(host);
        host = &mut host[n..];
    }
}

/// A zero-initialised heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), BOUNCE_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Self { ptr, layout })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live, initialised (zeroed) allocation of `layout.size()` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `new` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
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

    fn cfg(t: &TempFile, readonly: bool) -> DiskConfig {
        DiskConfig {
            path: t.as_path().to_path_buf(),
            readonly,
            serial: None,
            direct: false,
        }
    }

    #[test]
    fn open_reports_size_and_mode() {
        let t = image(4096);
        let d = DiskImage::open(&cfg(&t, false)).unwrap();
        assert_eq!(d.size(), 4096);
        assert_eq!(d.sectors(), 8);
        assert!(!d.readonly());
        assert_eq!(d.path(), t.as_path());
    }

    #[test]
    fn open_missing_file_names_path() {
        let c = DiskConfig {
            path: PathBuf::from("/nonexistent/ferrovm/disk.img"),
            readonly: false,
            serial: None,
            direct: false,
        };
        let err = DiskImage::open(&c).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/ferrovm/disk.img"));
    }

    #[test]
    fn unaligned_size_is_rejected() {
        let t = image(1000);
        let err = DiskImage::open(&cfg(&t, false)).unwrap_err();
        assert!(matches!(err, BlockError::UnalignedSize { size: 1000, .. }));
        let msg = err.to_string();
        assert!(msg.contains("1000") && msg.contains(&t.as_path().display().to_string()));
    }

    #[test]
    fn second_writer_is_locked_out() {
        let t = image(4096);
        let _first = DiskImage::open(&cfg(&t, false)).unwrap();
        // OFD locks belong to the open file description, so a second open in the same process
        // conflicts just like a second ferrovm would.
        let err = DiskImage::open(&cfg(&t, false)).unwrap_err();
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("in use by another process"), "{msg}");
        assert!(msg.contains("readonly=on"), "{msg}");
        // A reader cannot join a writer either.
        assert!(matches!(
            DiskImage::open(&cfg(&t, true)).unwrap_err(),
            BlockError::Locked { .. }
        ));
    }

    #[test]
    fn readers_share_but_exclude_writers() {
        let t = image(4096);
        let _a = DiskImage::open(&cfg(&t, true)).unwrap();
        let _b = DiskImage::open(&cfg(&t, true)).unwrap();
        assert!(matches!(
            DiskImage::open(&cfg(&t, false)).unwrap_err(),
            BlockError::Locked { .. }
        ));
    }

    #[test]
    fn lock_released_on_drop() {
        let t = image(4096);
        drop(DiskImage::open(&cfg(&t, false)).unwrap());
        DiskImage::open(&cfg(&t, false)).unwrap();
    }

    #[test]
    fn vectored_io_and_zeroing() {
        let t = image(8192);
        let d = DiskImage::open(&cfg(&t, false)).unwrap();
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
        d.punch_hole(0, 512).unwrap();
        d.read_at(&rb, 0).unwrap();
        assert!(r[..512].iter().all(|&x| x == 0));
        d.flush().unwrap();
        // Reading past the end is an error, not a silent short read.
        assert!(d.read_at(&rb, 8192 - 512).is_err());
    }

    #[test]
    fn bounce_path_round_trips() {
        let t = image(8192);
        let d = DiskImage::open(&cfg(&t, false)).unwrap();
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
