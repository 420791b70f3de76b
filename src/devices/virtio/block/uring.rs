//! An io_uring back end for the virtio-blk queue: each queue drain submits its reads, writes
//! and flushes as one batch (readv / writev / fsync(DATASYNC) straight on guest memory, one
//! `io_uring_enter`), then reaps the completions as they arrive, in any order, writing each
//! request's status and adding its used entry when its own completion comes in.
//!
//! Parsing and validation are the synchronous handler's ([`QueueHandler::drain`]): only
//! requests already checked against guest memory and the image size reach the ring.
//! Requests without file I/O (GET_ID, discard, write-zeroes, malformed ones) are completed
//! inline. A failed or short transfer is retried once through the synchronous path, which
//! gives the authoritative result (O_DIRECT bounce for misaligned buffers, EOF as an error).

use std::io;
use std::os::unix::io::RawFd;

use io_uring::{opcode, types, IoUring};
use virtio_queue::Queue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryMmap, VolatileSlice};

use super::request::{add_used, Io, Pending};
use super::{QueueError, QueueHandler, QUEUE_SIZE};

/// A [`QueueHandler`] whose file I/O goes through an io_uring.
pub struct UringQueueHandler {
    handler: QueueHandler,
    ring: IoUring,
    fd: RawFd,
    /// Set when `io_uring_enter` failed for good: nothing more is submitted.
    broken: bool,
}

impl UringQueueHandler {
    /// Sets up a ring (see [`setup_ring`]) and wraps `handler`.
    pub fn new(handler: QueueHandler) -> io::Result<Self> {
        Self::with_ring(handler, setup_ring()?)
    }

    /// Wraps `handler` around a ring made by [`setup_ring`] on the thread that will use it.
    /// Only raw images qualify: their guest offsets are file offsets.
    pub(crate) fn with_ring(handler: QueueHandler, ring: IoUring) -> io::Result<Self> {
        let fd = handler.disk().raw_fd().ok_or_else(|| {
            io::Error::other(format!(
                "{} is a {} image; io_uring serves raw images only",
                handler.disk().path().display(),
                handler.disk().format()
            ))
        })?;
        Ok(Self {
            handler,
            ring,
            fd,
            broken: false,
        })
    }

    /// Like [`QueueHandler::process_queue`], with the file I/O of each drain batched.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, QueueError> {
        if self.broken {
            return Err(QueueError::Uring(io::Error::from_raw_os_error(libc::EIO)));
        }
        let Self {
            handler,
            ring,
            fd,
            broken,
        } = self;
        let batch_max = ring.params().sq_entries() as usize;
        handler.drain(mem, queue, batch_max, |h, mem, queue, batch| {
            run_batch(ring, *fd, h, mem, queue, batch).inspect_err(|e| {
                if matches!(e, QueueError::Uring(_)) {
                    *broken = true;
                }
            })
        })
    }
}

/// A ring with one submission slot per queue entry, for the calling thread only
/// (SINGLE_ISSUER | DEFER_TASKRUN where the kernel has them, 6.1+). Fails where io_uring is not
/// available (old kernel, seccomp, `kernel.io_uring_disabled`) or lacks
/// IORING_FEAT_SUBMIT_STABLE (iovec arrays must only live until submission returns).
pub(crate) fn setup_ring() -> io::Result<IoUring> {
    let entries = u32::from(QUEUE_SIZE);
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| IoUring::new(entries))?;
    if !ring.params().is_feature_submit_stable() {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    Ok(ring)
}

fn bufs_of<'a, 'm>(io: &'a Io<'m>) -> &'a [VolatileSlice<'m>] {
    match io {
        Io::Read { bufs, .. } | Io::Write { bufs, .. } => bufs,
        Io::Flush => &[],
    }
}

/// Times `io_uring_enter` is retried (with a short back-off) before it counts as failed for good.
const WAIT_RETRIES: u32 = 4;

/// Submits every request of `batch` (at most `sq_entries`) and completes each one as its CQE
/// arrives. Returns only once nothing of the batch is in flight any more, except when
/// `io_uring_enter` itself fails for good: then guest memory stays mapped for the rest of the
/// process (see the error path), so the kernel's late writes still land in guest RAM.
fn run_batch(
    ring: &mut IoUring,
    fd: RawFd,
    h: &QueueHandler,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    batch: &[Pending<'_>],
) -> Result<(), QueueError> {
    // The guards keep the (possibly dirty-tracked) mappings valid while the kernel uses them.
    let guards: Vec<Vec<_>> = batch
        .iter()
        .map(|p| bufs_of(&p.io).iter().map(|b| b.ptr_guard_mut()).collect())
        .collect();
    let iovs: Vec<Vec<libc::iovec>> = guards
        .iter()
        .zip(batch)
        .map(|(g, p)| {
            g.iter()
                .zip(bufs_of(&p.io))
                .map(|(g, b)| libc::iovec {
                    iov_base: g.as_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect()
        })
        .collect();

    let mut in_flight = 0usize;
    let mut sync: Vec<usize> = Vec::new();
    {
        let mut sq = ring.submission();
        for (i, (p, iov)) in batch.iter().zip(&iovs).enumerate() {
            let entry = match &p.io {
                Io::Read { offset, .. } => {
                    opcode::Readv::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                        .offset(*offset)
                        .build()
                }
                Io::Write { offset, .. } => {
                    opcode::Writev::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                        .offset(*offset)
                        .build()
                }
                Io::Flush => opcode::Fsync::new(types::Fd(fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            };
            // SAFETY: the iovecs point into guest memory validated by `parse` (kept mapped
            // by `guards` and by `mem`, which outlive every completion: this function waits
            // for all of them, or leaks a `mem` handle when it cannot), each with its exact
            // length; the iovec array lives until the
            // end of this function, after submission (IORING_FEAT_SUBMIT_STABLE, checked at
            // setup); `fd` is the image's, open for the handler's lifetime.
            match unsafe { sq.push(&entry.user_data(i as u64)) } {
                Ok(()) => in_flight += 1,
                // Cannot happen (batch <= sq_entries, and the ring is empty between batches);
                // serve the request synchronously all the same.
                Err(_) => sync.push(i),
            }
        }
    }

    let mut first_err: Option<QueueError> = None;
    let mut complete = |i: usize, res: io::Result<()>, first_err: &mut Option<QueueError>| {
        let p = &batch[i];
        let len = h.complete(p, res);
        if let Err(e) = add_used(mem, queue, p.head, len) {
            first_err.get_or_insert(e);
        }
    };
    for i in sync {
        complete(i, h.run_sync(&batch[i].io), &mut first_err);
    }
    let mut failures = 0u32;
    while in_flight > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => failures = 0,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) => {}
            Err(e) if failures < WAIT_RETRIES => {
                failures += 1;
                log::debug!("io_uring_enter failed ({e}), retrying");
                std::thread::sleep(std::time::Duration::from_millis(1 << failures));
            }
            Err(e) => {
                // The kernel may still write into guest memory for the requests in flight,
                // and nothing tells us when it is done. Keep guest RAM mapped for the life
                // of the process, so no later mapping can sit where those writes land; the
                // device is marked NEEDS_RESET by the worker, and the guest never sees
                // these requests completed.
                log::error!(
                    "io_uring_enter failed for good with {in_flight} requests in flight: {e}"
                );
                std::mem::forget(mem.clone());
                return Err(QueueError::Uring(e));
            }
        }
        for cqe in ring.completion() {
            let Some(p) = usize::try_from(cqe.user_data())
                .ok()
                .and_then(|i| batch.get(i).map(|p| (i, p)))
            else {
                continue;
            };
            in_flight -= 1;
            let (i, p) = p;
            let res = cqe.result();
            let want = match &p.io {
                Io::Read { len, .. } | Io::Write { len, .. } => *len,
                Io::Flush => 0,
            };
            let result = if u64::try_from(res).ok() == Some(want) {
                if let Io::Read { bufs, .. } = &p.io {
                    for b in bufs {
                        b.bitmap().mark_dirty(0, b.len());
                    }
                }
                Ok(())
            } else {
                // An error (EAGAIN, EINVAL for misaligned O_DIRECT buffers, a real I/O error)
                // or a short transfer: redo it synchronously, which resumes short transfers,
                // bounces misaligned buffers and reports real errors.
                h.run_sync(&p.io)
            };
            complete(i, result, &mut first_err);
        }
    }
    drop(iovs);
    drop(guards);
    first_err.map_or(Ok(()), Err)
}
