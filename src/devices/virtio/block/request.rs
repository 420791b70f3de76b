//! Parsing and executing virtio-blk requests. Everything here treats the descriptor chain as
//! hostile: lengths, addresses, directions and chain shape are all checked before the host
//! touches the image, and I/O goes straight between the image and guest memory (no buffer is
//! sized from a guest-supplied length).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::debug;

use crate::ratelimit::RateLimit;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use crate::devices::virtio::chain::{take_front, total, trim_back, walk};
use crate::disk::DiskBackend;

use super::{
    Counters, DESC_LEN_MAX, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SECTOR_SIZE, SEG_MAX,
};

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const DISCARD_SEG_LEN: usize = 16;
/// Descriptors a well-formed request may use: header, SEG_MAX data segments, status.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Descriptors walked before a chain is declared broken (an indirect table can hold 65535
/// entries; a loop is cut by virtio-queue at the table size).
const WALK_LIMIT: usize = 4 * MAX_DESCRIPTORS;

/// The queue could not be served any more; the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot read the available ring")]
    AvailRing(#[source] virtio_queue::Error),
    #[error("cannot add descriptor {head} to the used ring")]
    AddUsed {
        head: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("cannot update the queue notification state")]
    Notification(#[source] virtio_queue::Error),
    #[error("the available ring index moved but no descriptor chain could be read")]
    Stuck,
    #[error("io_uring_enter failed")]
    Uring(#[source] std::io::Error),
}

/// Serves one virtio-blk queue: pops chains, executes them against the image, fills the used
/// ring. The worker thread and the benchmark both drive the device through this type.
pub struct QueueHandler {
    disk: Arc<dyn DiskBackend>,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: Arc<Counters>,
    /// Reused across requests to walk chains without allocating.
    descs: Vec<Descriptor>,
    /// Guest-triggered warnings (bad heads, failing host I/O), rate-limited.
    log: RateLimit,
}

/// What a chain turned out to be.
enum Step<'m> {
    /// Completed (status written, or no status byte could be located): add a used entry of
    /// this length (data + status bytes that went to the guest; 0 without a status byte).
    Done(u32),
    /// Valid, in range, allowed: needs this file I/O before its status can be written.
    Io {
        status: VolatileSlice<'m>,
        io: Io<'m>,
    },
}

/// What [`QueueHandler::execute`] decided.
enum Plan<'m> {
    /// Finished without file I/O; this many payload bytes went to the guest.
    Done(u32),
    Io(Io<'m>),
}

/// File I/O a validated request needs. Every buffer is guest memory checked by `parse`, and
/// the range `[offset, offset + len)` lies inside the image.
pub(crate) enum Io<'m> {
    /// Fill `bufs` (device-writable guest memory) from the image.
    Read {
        bufs: Vec<VolatileSlice<'m>>,
        offset: u64,
        len: u64,
    },
    /// Write `bufs` (device-readable guest memory) to the image.
    Write {
        bufs: Vec<VolatileSlice<'m>>,
        offset: u64,
        len: u64,
    },
    /// Make every completed write durable.
    Flush,
}

/// A request waiting for its file I/O; [`QueueHandler::complete`] finishes it.
pub(crate) struct Pending<'m> {
    /// The chain's head descriptor, for the used ring.
    pub(crate) head: u16,
    /// The validated status byte.
    status: VolatileSlice<'m>,
    pub(crate) io: Io<'m>,
}

pub(crate) fn add_used(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    queue
        .add_used(mem, head, len)
        .map_err(|source| QueueError::AddUsed { head, source })
}

struct Parsed<'m> {
    /// Device-readable bytes after the header.
    readable: Vec<VolatileSlice<'m>>,
    /// Device-writable bytes before the status byte.
    writable: Vec<VolatileSlice<'m>>,
    header: [u8; HEADER_LEN],
}

/// Why a request got a non-OK status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    /// Malformed by the driver (counted as invalid): IOERR.
    Invalid,
    /// Host I/O failed or access refused: IOERR.
    Io,
    /// Unknown request type or flags: UNSUPP.
    Unsupported,
}

impl QueueHandler {
    /// A handler for `disk`, answering GET_ID with `id` and counting into `stats`.
    pub(crate) fn new(
        disk: Arc<dyn DiskBackend>,
        id: [u8; VIRTIO_BLK_ID_BYTES as usize],
        stats: Arc<Counters>,
    ) -> Self {
        Self {
            disk,
            id,
            stats,
            descs: Vec::with_capacity(MAX_DESCRIPTORS),
            log: RateLimit::new(10),
        }
    }

    /// A handler for the same image, id and counters (with its own scratch state).
    pub(crate) fn same_disk(&self) -> Self {
        Self::new(self.disk.clone(), self.id, self.stats.clone())
    }

    /// Serves every available request: disables notifications, processes, re-enables, and
    /// loops while the driver added more in between (EVENT_IDX-friendly). Returns whether the
    /// driver must be interrupted (`Queue::needs_notification`). I/O is synchronous: each
    /// request is executed and completed before the next one is popped.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, QueueError> {
        self.drain(mem, queue, 1, |h, mem, queue, batch| {
            for p in batch {
                let len = h.complete(p, h.run_sync(&p.io));
                add_used(mem, queue, p.head, len)?;
            }
            Ok(())
        })
    }

    /// The queue loop shared by the synchronous and the io_uring back ends. Requests that need
    /// no file I/O (and malformed ones) are completed here at once; the others are collected
    /// into batches of at most `batch_max` and handed to `run`, which must complete every one
    /// of them (status written and used entry added, in any order) before it returns.
    pub(crate) fn drain<'m, F>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        queue: &mut Queue,
        batch_max: usize,
        mut run: F,
    ) -> Result<bool, QueueError>
    where
        F: FnMut(
            &QueueHandler,
            &'m GuestMemoryMmap,
            &mut Queue,
            &[Pending<'m>],
        ) -> Result<(), QueueError>,
    {
        let batch_max = batch_max.max(1);
        let mut batch: Vec<Pending<'m>> = Vec::new();
        let mut added = false;
        let mut guard = crate::devices::virtio::DrainGuard::default();
        loop {
            queue
                .disable_notification(mem)
                .map_err(QueueError::Notification)?;
            let mut popped = 0usize;
            loop {
                let chain = {
                    let mut iter = queue.iter(mem).map_err(QueueError::AvailRing)?;
                    iter.next()
                };
                let Some(chain) = chain else { break };
                popped += 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    // Not a descriptor: cannot be returned through the used ring.
                    self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                    self.log.warn(|| {
                        format!(
                            "virtio-blk {}: available ring names descriptor {head} past the queue end",
                            self.disk.path().display()
                        )
                    });
                    continue;
                }
                match self.process_chain(mem, chain) {
                    Step::Done(len) => add_used(mem, queue, head, len)?,
                    Step::Io { status, io } => {
                        batch.push(Pending { head, status, io });
                        if batch.len() >= batch_max {
                            run(self, mem, queue, &batch)?;
                            batch.clear();
                        }
                    }
                }
                added = true;
            }
            if !batch.is_empty() {
                run(self, mem, queue, &batch)?;
                batch.clear();
            }
            let more = queue
                .enable_notification(mem)
                .map_err(QueueError::Notification)?;
            if !more {
                break;
            }
            if !guard.go_again(popped > 0) {
                // The index moved but the ring entry cannot be read.
                return Err(QueueError::Stuck);
            }
        }
        if !added {
            return Ok(false);
        }
        queue
            .needs_notification(mem)
            .map_err(QueueError::Notification)
    }

    /// Executes `io` synchronously (preadv/pwritev straight into guest memory, fdatasync).
    pub(crate) fn run_sync(&self, io: &Io<'_>) -> std::io::Result<()> {
        match io {
            Io::Read { bufs, offset, .. } => self.disk.read_at(bufs, *offset),
            Io::Write { bufs, offset, .. } => self.disk.write_at(bufs, *offset),
            Io::Flush => self.disk.flush(),
        }
    }

    /// Finishes a request whose I/O ended with `res`: counts it, writes the status byte and
    /// returns the used length.
    pub(crate) fn complete(&self, p: &Pending<'_>, res: std::io::Result<()>) -> u32 {
        let s = &self.stats;
        let (code, written) = match (res, &p.io) {
            (Ok(()), Io::Read { len, .. }) => {
                s.bytes_read.fetch_add(*len, Ordering::Relaxed);
                // len <= (SEG_MAX + 2) * DESC_LEN_MAX < 4 GiB (checked in parse).
                (VIRTIO_BLK_S_OK, u32::try_from(*len).unwrap_or(u32::MAX))
            }
            (Ok(()), Io::Write { len, .. }) => {
                s.bytes_written.fetch_add(*len, Ordering::Relaxed);
                (VIRTIO_BLK_S_OK, 0)
            }
            (Ok(()), Io::Flush) => (VIRTIO_BLK_S_OK, 0),
            (Err(e), io) => {
                let (op, offset) = match io {
                    Io::Read { offset, .. } => ("read", *offset),
                    Io::Write { offset, .. } => ("write", *offset),
                    Io::Flush => ("flush", 0),
                };
                let (fail, _) = self.io_err(op, offset, e);
                // A failed read may have written part of the buffer: report nothing.
                (self.fail_status(fail), 0)
            }
        };
        // `status` was validated when the chain was parsed.
        if p.status.write_obj(code as u8, 0).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    /// The image this handler serves.
    pub(crate) fn disk(&self) -> &dyn DiskBackend {
        self.disk.as_ref()
    }

    fn process_chain<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        chain: DescriptorChain<&'m GuestMemoryMmap>,
    ) -> Step<'m> {
        // Walk the chain once, bounded, before trusting anything in it.
        let mut descs = std::mem::take(&mut self.descs);
        let step = self.walk_and_run(mem, chain, &mut descs);
        self.descs = descs;
        step
    }

    fn walk_and_run<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        descs: &mut Vec<Descriptor>,
    ) -> Step<'m> {
        if !walk(chain, WALK_LIMIT, descs) {
            self.stats.invalid.fetch_add(1, Ordering::Relaxed);
            debug!("virtio-blk: looping, truncated or overlong descriptor chain");
            return Step::Done(0);
        }
        descs.retain(|d| d.len() > 0);

        // The status byte is the last byte of the last descriptor, which must be writable.
        let Some(status) = descs.last().filter(|d| d.is_write_only()).and_then(|d| {
            let addr = d.addr().checked_add(u64::from(d.len()) - 1)?;
            mem.get_slices(addr, 1, Permissions::Write)
                .ok()?
                .next()?
                .ok()
        }) else {
            self.stats.invalid.fetch_add(1, Ordering::Relaxed);
            debug!("virtio-blk: request without a writable status byte");
            return Step::Done(0);
        };

        let (code, written) = match self.parse(mem, descs) {
            Ok(req) => match self.execute(req) {
                Ok(Plan::Done(written)) => (VIRTIO_BLK_S_OK, written),
                Ok(Plan::Io(io)) => return Step::Io { status, io },
                Err((fail, written)) => (self.fail_status(fail), written),
            },
            Err(fail) => (self.fail_status(fail), 0),
        };
        // `status` was validated above; a failure here would mean guest memory vanished.
        if status.write_obj(code as u8, 0).is_err() {
            return Step::Done(0);
        }
        Step::Done(written.saturating_add(1))
    }

    fn fail_status(&self, fail: Fail) -> u32 {
        match fail {
            Fail::Invalid => {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                VIRTIO_BLK_S_IOERR
            }
            Fail::Io => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                VIRTIO_BLK_S_IOERR
            }
            Fail::Unsupported => {
                self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
                VIRTIO_BLK_S_UNSUPP
            }
        }
    }

    /// Splits the chain into header, readable payload and writable payload (status excluded).
    fn parse<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        descs: &[Descriptor],
    ) -> Result<Parsed<'m>, Fail> {
        if descs.len() > MAX_DESCRIPTORS {
            return Err(Fail::Invalid);
        }
        let mut readable = Vec::with_capacity(descs.len());
        let mut writable = Vec::with_capacity(descs.len());
        for d in descs {
            if d.len() > DESC_LEN_MAX {
                return Err(Fail::Invalid);
            }
            let perm = if d.is_write_only() {
                Permissions::Write
            } else {
                // Device-readable after device-writable breaks the virtio layout rule.
                if !writable.is_empty() {
                    return Err(Fail::Invalid);
                }
                Permissions::Read
            };
            let list = if d.is_write_only() {
                &mut writable
            } else {
                &mut readable
            };
            let slices = mem
                .get_slices(d.addr(), d.len() as usize, perm)
                .map_err(|_| Fail::Invalid)?;
            for s in slices {
                list.push(s.map_err(|_| Fail::Invalid)?);
            }
        }
        // Drop the status byte (the last writable byte, validated by the caller).
        trim_back(&mut writable, 1).ok_or(Fail::Invalid)?;
        let mut header = [0u8; HEADER_LEN];
        take_front(&mut readable, &mut header).ok_or(Fail::Invalid)?;
        Ok(Parsed {
            readable,
            writable,
            header,
        })
    }

    /// Runs a parsed request, or says which file I/O it needs ([`Plan::Io`], run by the back
    /// end). Returns the number of payload bytes written to the guest, also on failure.
    fn execute<'m>(&mut self, req: Parsed<'m>) -> Result<Plan<'m>, (Fail, u32)> {
        let kind = u32::from_le_bytes([req.header[0], req.header[1], req.header[2], req.header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&req.header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let s = &self.stats;
        match kind {
            VIRTIO_BLK_T_IN => {
                s.reads.fetch_add(1, Ordering::Relaxed);
                if !req.readable.is_empty() {
                    return Err((Fail::Invalid, 0));
                }
                let len = total(&req.writable);
                let offset = self.check_range(sector, len).map_err(|f| (f, 0))?;
                Ok(Plan::Io(Io::Read {
                    bufs: req.writable,
                    offset,
                    len,
                }))
            }
            VIRTIO_BLK_T_OUT => {
                s.writes.fetch_add(1, Ordering::Relaxed);
                if !req.writable.is_empty() {
                    return Err((Fail::Invalid, 0));
                }
                let len = total(&req.readable);
                let offset = self.check_range(sector, len).map_err(|f| (f, 0))?;
                if self.disk.readonly() {
                    return Err((Fail::Io, 0));
                }
                Ok(Plan::Io(Io::Write {
                    bufs: req.readable,
                    offset,
                    len,
                }))
            }
            VIRTIO_BLK_T_FLUSH => {
                s.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(Plan::Io(Io::Flush))
            }
            VIRTIO_BLK_T_GET_ID => {
                s.get_ids.fetch_add(1, Ordering::Relaxed);
                let mut rest: &[u8] = &self.id;
                let mut written = 0u32;
                for b in &req.writable {
                    if rest.is_empty() {
                        break;
                    }
                    let n = b.len().min(rest.len());
                    b.copy_from(&rest[..n]);
                    rest = &rest[n..];
                    written += n as u32;
                }
                Ok(Plan::Done(written))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = kind == VIRTIO_BLK_T_DISCARD;
                if discard {
                    s.discards.fetch_add(1, Ordering::Relaxed);
                } else {
                    s.write_zeroes.fetch_add(1, Ordering::Relaxed);
                }
                self.discard_or_zero(req, discard).map(|()| Plan::Done(0))
            }
            _ => {
                s.other.fetch_add(1, Ordering::Relaxed);
                Err((Fail::Unsupported, 0))
            }
        }
    }

    fn discard_or_zero(&mut self, mut req: Parsed<'_>, discard: bool) -> Result<(), (Fail, u32)> {
        // max_discard_seg = max_write_zeroes_seg = 1: exactly one segment.
        if total(&req.readable) != DISCARD_SEG_LEN as u64 || !req.writable.is_empty() {
            return Err((Fail::Invalid, 0));
        }
        let mut seg = [0u8; DISCARD_SEG_LEN];
        take_front(&mut req.readable, &mut seg).ok_or((Fail::Invalid, 0))?;
        let mut sb = [0u8; 8];
        sb.copy_from_slice(&seg[0..8]);
        let sector = u64::from_le_bytes(sb);
        let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Discard must not carry the unmap flag; write-zeroes knows only unmap.
        if (discard && flags != 0) || flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err((Fail::Unsupported, 0));
        }
        let max = if discard {
            MAX_DISCARD_SECTORS
        } else {
            MAX_WRITE_ZEROES_SECTORS
        };
        if num > max {
            return Err((Fail::Invalid, 0));
        }
        let len = u64::from(num) * SECTOR_SIZE;
        let offset = self.check_range(sector, len).map_err(|f| (f, 0))?;
        if self.disk.readonly() {
            return Err((Fail::Io, 0));
        }
        if len == 0 {
            return Ok(());
        }
        let res = if discard {
            self.disk.discard(offset, len)
        } else {
            self.disk.write_zeroes(offset, len, unmap)
        };
        res.map_err(|e| self.io_err(if discard { "discard" } else { "write-zeroes" }, offset, e))
    }

    /// Byte offset of `sector` if `[sector * 512, + len)` lies inside the image and `len` is a
    /// whole number of sectors.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, Fail> {
        if len % SECTOR_SIZE != 0 {
            return Err(Fail::Invalid);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Fail::Invalid)?;
        let end = offset.checked_add(len).ok_or(Fail::Invalid)?;
        if end > self.disk.size() {
            return Err(Fail::Invalid);
        }
        Ok(offset)
    }

    fn io_err(&self, op: &str, offset: u64, e: std::io::Error) -> (Fail, u32) {
        self.log.warn(|| {
            format!(
                "virtio-blk: {op} at offset {offset} of {} failed: {e}",
                self.disk.path().display()
            )
        });
        (Fail::Io, 0)
    }
}
