//! File I/O primitives shared by every disk format: vectored reads and writes straight into
//! guest memory, whole-file OFD locks, fallocate, and the bounded scatter/gather helpers used
//! when data goes through a host buffer (O_DIRECT bounce, qcow2 copy-on-write, decompression).

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

/// Alignment of [`AlignedBuf`]; covers 512-byte and 4 KiB logical block sizes.
pub(crate) const BOUNCE_ALIGN: usize = 4096;

pub(crate) fn lock_whole_file(file: &File, shared: bool) -> io::Result<()> {
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

pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
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
pub(crate) enum Dir {
    Read,
    Write,
}

/// preadv/pwritev over guest memory until every byte moved; a short transfer is retried from
/// where it stopped, an end of file (0 bytes) is an error.
pub(crate) fn rw_vectored(
    file: &File,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
    dir: Dir,
) -> io::Result<()> {
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

pub(crate) fn pread_all(file: &File, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
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

pub(crate) fn pwrite_all(file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, pos)
}

/// Copies `host` into the guest buffers starting `skip` bytes into their concatenation.
pub(crate) fn scatter(bufs: &[VolatileSlice<'_>], skip: usize, host: &[u8]) {
    let mut at = 0;
    for s in sub_bufs(bufs, skip, host.len()) {
        s.copy_from(&host[at..at + s.len()]);
        at += s.len();
    }
}

/// Copies from the guest buffers, starting `skip` bytes into their concatenation, into `host`.
pub(crate) fn gather(bufs: &[VolatileSlice<'_>], skip: usize, host: &mut [u8]) {
    let mut at = 0;
    for s in sub_bufs(bufs, skip, host.len()) {
        at += s.copy_to(&mut host[at..]);
    }
}

/// A zero-initialised heap buffer aligned for O_DIRECT.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), BOUNCE_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Self { ptr, layout })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live, initialised (zeroed) allocation of `layout.size()` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
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

/// The part `[skip, skip + len)` of the concatenation of `bufs`, as slices of the same memory.
/// Stops early if `bufs` is shorter.
pub(crate) fn sub_bufs<'a>(
    bufs: &[VolatileSlice<'a>],
    mut skip: usize,
    mut len: usize,
) -> Vec<VolatileSlice<'a>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(len);
        if let Ok(s) = b.subslice(skip, n) {
            out.push(s);
        }
        skip = 0;
        len -= n;
    }
    out
}

/// Fills every byte of `bufs` with zeros.
pub(crate) fn zero_fill(bufs: &[VolatileSlice<'_>]) {
    const ZEROS: [u8; 4096] = [0; 4096];
    for b in bufs {
        let mut off = 0;
        while off < b.len() {
            let n = (b.len() - off).min(ZEROS.len());
            if let Ok(s) = b.subslice(off, n) {
                s.copy_from(&ZEROS[..n]);
            }
            off += n;
        }
    }
}

/// Total length of `bufs` in bytes.
pub(crate) fn total_len(bufs: &[VolatileSlice<'_>]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// An `EIO` carrying `msg` (what failed and where), for errors a guest request sees.
pub(crate) fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}
