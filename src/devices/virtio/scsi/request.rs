//! Walking and answering virtio-scsi requests. The chain is hostile: it is walked once with a
//! bound, its readable part must come before its writable part, and every length comes
//! from the chain itself, never from a buffer sized by the guest. A chain that cannot even
//! hold a response is returned unanswered (used length 0); anything else gets a response.

use std::sync::Arc;

use log::debug;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use super::cdrom::{Reply, Sense};
use super::{Target, SEG_MAX};
use crate::devices::virtio::block::DESC_LEN_MAX;
use crate::devices::virtio::chain::{sub_range, take_front, total, walk, write_front};
use crate::devices::virtio::{DeviceError, DrainGuard};
use crate::ratelimit::RateLimit;

/// Descriptors walked before a chain is declared broken.
const WALK_LIMIT: usize = 4 * (SEG_MAX as usize + 2);
/// `lun`, `tag`, `task_attr`, `prio`, `crn` before the CDB.
const CMD_HEADER: usize = 19;
/// `sense_len`, `resid`, `status_qualifier`, `status`, `response` before the sense bytes.
const RESP_HEADER: usize = 12;

/// virtio-scsi response codes (virtio 1.x 5.6.6.1).
const S_OK: u8 = 0;
const S_OVERRUN: u8 = 1;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;
const S_FUNCTION_REJECTED: u8 = 11;
/// Task management: FUNCTION COMPLETE is 0, like S_OK.
const S_FUNCTION_COMPLETE: u8 = 0;
/// SCSI status codes.
const STATUS_GOOD: u8 = 0x00;
const STATUS_CHECK_CONDITION: u8 = 0x02;
/// Control request types.
const T_TMF: u32 = 0;
const T_AN_QUERY: u32 = 1;
const T_AN_SUBSCRIBE: u32 = 2;
/// The highest task-management subtype defined (QUERY TASK SET).
const TMF_MAX: u32 = 7;

/// The sizes the driver configured, fixed for one activation.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub sense: usize,
    pub cdb: usize,
}

/// Which queue a chain came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Command,
    Control,
}

/// Answers requests for a set of targets.
pub struct Server {
    targets: Arc<Vec<Target>>,
    sizes: Sizes,
    descs: Vec<Descriptor>,
    log: RateLimit,
}

/// The readable and writable parts of a chain.
struct Parts<'m> {
    readable: Vec<VolatileSlice<'m>>,
    writable: Vec<VolatileSlice<'m>>,
}

/// A decoded 8-byte virtio-scsi LUN: target and LUN, or None for an address this
/// controller does not have (not the single-level format, or a bus other than 1).
fn decode_lun(lun: &[u8]) -> Option<(u8, u16)> {
    if lun[0] != 1 || lun[2] >> 6 > 1 || lun[4..8].iter().any(|&b| b != 0) {
        return None;
    }
    Some((lun[1], u16::from(lun[2] & 0x3f) << 8 | u16::from(lun[3])))
}

impl Server {
    pub fn new(targets: Arc<Vec<Target>>, sizes: Sizes) -> Server {
        Server {
            targets,
            sizes,
            descs: Vec::new(),
            log: RateLimit::new(5),
        }
    }

    /// Answers every available chain of `queue`. Returns whether the driver wants an
    /// interrupt.
    pub fn drain(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        kind: Kind,
    ) -> Result<bool, DeviceError> {
        let ring = |e: virtio_queue::Error| DeviceError::new(format!("queue: {e:?}"));
        let mut guard = DrainGuard::default();
        loop {
            queue.disable_notification(mem).map_err(ring)?;
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped = true;
                let head = chain.head_index();
                let mut descs = std::mem::take(&mut self.descs);
                let whole = walk(chain, WALK_LIMIT, &mut descs);
                let used = match split(mem, &descs) {
                    Some(parts) if whole => self.answer(kind, parts),
                    _ => {
                        self.log
                            .log(|| "virtio-scsi: malformed descriptor chain".into());
                        0
                    }
                };
                self.descs = descs;
                queue.add_used(mem, head, used).map_err(ring)?;
            }
            if !queue.enable_notification(mem).map_err(ring)? {
                break;
            }
            if !guard.go_again(popped) {
                return Err(DeviceError::new("available index ahead of readable chains"));
            }
        }
        queue.needs_notification(mem).map_err(ring)
    }

    fn answer(&self, kind: Kind, parts: Parts<'_>) -> u32 {
        match kind {
            Kind::Command => self.command(parts),
            Kind::Control => self.control(parts),
        }
    }

    /// A command request. Returns the bytes written to the guest.
    fn command(&self, mut p: Parts<'_>) -> u32 {
        let mut header = vec![0u8; CMD_HEADER + self.sizes.cdb];
        let resp_len = RESP_HEADER + self.sizes.sense;
        if total(&p.writable) < resp_len as u64
            || take_front(&mut p.readable, &mut header).is_none()
        {
            debug!("virtio-scsi: command chain too short for its header or response");
            return 0;
        }
        let Some(data_in) = sub_range(
            &p.writable,
            resp_len as u64,
            total(&p.writable) - resp_len as u64,
        ) else {
            return 0;
        };
        let room = total(&data_in);
        let target = decode_lun(&header[..8])
            .and_then(|(t, lun)| Some((self.targets.get(usize::from(t))?, lun)));
        let Some((target, lun)) = target else {
            return respond(&p.writable, resp_len, S_BAD_TARGET, STATUS_GOOD, None, room);
        };
        let mut cdb = [0u8; 16];
        let n = self.sizes.cdb.min(16);
        cdb[..n].copy_from_slice(&header[CMD_HEADER..CMD_HEADER + n]);
        match target.unit.command(lun, &cdb) {
            Reply::Good => respond(&p.writable, resp_len, S_OK, STATUS_GOOD, None, room),
            Reply::Check(sense) => respond(
                &p.writable,
                resp_len,
                S_OK,
                STATUS_CHECK_CONDITION,
                Some(sense),
                room,
            ),
            Reply::Data(d) => {
                let n = write_front(&data_in, &d) as u64;
                let head = respond(&p.writable, resp_len, S_OK, STATUS_GOOD, None, room - n);
                head + n as u32
            }
            Reply::Read { offset, len } => {
                if room < len {
                    return respond(&p.writable, resp_len, S_OVERRUN, STATUS_GOOD, None, room);
                }
                let Some(bufs) = sub_range(&data_in, 0, len) else {
                    return 0;
                };
                if let Err(e) = target.disk.read_at(&bufs, offset) {
                    self.log.warn(|| {
                        format!(
                            "virtio-scsi: read of {len} bytes at {offset} from {}: {e}",
                            target.disk.path().display()
                        )
                    });
                    let sense = Some(Sense::READ_ERROR);
                    return respond(
                        &p.writable,
                        resp_len,
                        S_OK,
                        STATUS_CHECK_CONDITION,
                        sense,
                        room,
                    );
                }
                let head = respond(&p.writable, resp_len, S_OK, STATUS_GOOD, None, room - len);
                head + len as u32
            }
        }
    }

    /// A control request: task management or an asynchronous-notification query.
    fn control(&self, mut p: Parts<'_>) -> u32 {
        let mut kind = [0u8; 4];
        if take_front(&mut p.readable, &mut kind).is_none() {
            return 0;
        }
        match u32::from_le_bytes(kind) {
            T_TMF => {
                // subtype, lun[8], tag; response: one byte.
                let mut rest = [0u8; 20];
                if take_front(&mut p.readable, &mut rest).is_none() {
                    return 0;
                }
                let subtype = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let known = decode_lun(&rest[4..12])
                    .is_some_and(|(t, _)| usize::from(t) < self.targets.len());
                let code = match (known, subtype <= TMF_MAX) {
                    (false, _) => S_BAD_TARGET,
                    // Nothing is ever in flight: every abort or reset is already complete.
                    (true, true) => S_FUNCTION_COMPLETE,
                    (true, false) => S_FUNCTION_REJECTED,
                };
                write_front(&p.writable, &[code]) as u32
            }
            T_AN_QUERY | T_AN_SUBSCRIBE => {
                // lun[8], event_requested; response: event_actual (none), response.
                let mut rest = [0u8; 12];
                if take_front(&mut p.readable, &mut rest).is_none() {
                    return 0;
                }
                write_front(&p.writable, &[0, 0, 0, 0, S_OK]) as u32
            }
            _ => write_front(&p.writable, &[S_FAILURE]) as u32,
        }
    }
}

/// Writes the response header (and sense for a CHECK CONDITION) at the start of the writable
/// part; returns its length.
fn respond(
    writable: &[VolatileSlice<'_>],
    resp_len: usize,
    response: u8,
    status: u8,
    sense: Option<Sense>,
    resid: u64,
) -> u32 {
    let mut r = vec![0u8; resp_len];
    let fixed = sense.map(|s| s.fixed());
    let sense_bytes = fixed.as_ref().map_or(&[][..], |f| &f[..]);
    let sense_len = sense_bytes.len().min(resp_len - RESP_HEADER);
    r[0..4].copy_from_slice(&(sense_len as u32).to_le_bytes());
    r[4..8].copy_from_slice(&(resid.min(u64::from(u32::MAX)) as u32).to_le_bytes());
    r[10] = status;
    r[11] = response;
    r[RESP_HEADER..RESP_HEADER + sense_len].copy_from_slice(&sense_bytes[..sense_len]);
    write_front(writable, &r) as u32
}

/// Splits a walked chain into its readable and writable slices; None for a chain that
/// breaks the layout (readable after writable, an oversized descriptor, memory outside RAM).
fn split<'m>(mem: &'m GuestMemoryMmap, descs: &[Descriptor]) -> Option<Parts<'m>> {
    let mut parts = Parts {
        readable: Vec::new(),
        writable: Vec::new(),
    };
    for d in descs.iter().filter(|d| d.len() > 0) {
        if d.len() > DESC_LEN_MAX || (!d.is_write_only() && !parts.writable.is_empty()) {
            return None;
        }
        let (perm, list) = if d.is_write_only() {
            (Permissions::Write, &mut parts.writable)
        } else {
            (Permissions::Read, &mut parts.readable)
        };
        for s in mem.get_slices(d.addr(), d.len() as usize, perm).ok()? {
            list.push(s.ok()?);
        }
    }
    Some(parts)
}
