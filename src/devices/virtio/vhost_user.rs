//! The frontend side of vhost-user (rust-vmm `vhost` crate): a device whose queues another
//! process serves (virtiofsd), on the same worker lifecycle as every other device.
//!
//! At activation the backend gets the guest memory table (the memfd of each RAM region: guest
//! RAM is shared when a vhost-user device exists), the rings (as addresses in ferrovm's own
//! address space, as the protocol wants), and two eventfds per queue: one it waits on for
//! kicks, one it signals when it has used buffers. The worker relays: a guest kick (the KVM
//! ioeventfd) becomes a write to the backend's kick eventfd, a backend call becomes the
//! transport's interrupt (MSI-X or INTx + ISR, which an eventfd alone could not do). It also
//! watches the socket: a backend that exits is a device failure, not a hang.
//!
//! On reset, GET_VRING_BASE stops each ring (the protocol's "stop"); the next activation
//! sends everything again.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ratelimit::RateLimit;

use super::{
    DeviceError, VirtioHandler, WorkerCtx, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
};

/// How long one request to the backend may take before it is given up as dead.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Virtio features ferrovm's transport can pass through to a vhost-user backend (split rings).
const PASSTHROUGH_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX;

/// A vhost-user request that failed.
#[derive(Debug, thiserror::Error)]
#[error("vhost-user {what}: {source}")]
pub struct VhostUserError {
    pub what: String,
    #[source]
    pub source: vhost::Error,
}

fn vu_err(what: impl Into<String>) -> impl FnOnce(vhost::Error) -> VhostUserError {
    let what = what.into();
    move |source| VhostUserError { what, source }
}

/// A connected, negotiated vhost-user backend.
pub struct VhostUserBackend {
    frontend: Frontend,
    /// A second handle on the socket, for the worker to notice the backend hanging up.
    sock: UnixStream,
    /// Virtio features the backend offers that ferrovm can pass on.
    features: u64,
    protocol_features: bool,
}

impl VhostUserBackend {
    /// Takes ownership of the backend (SET_OWNER) and reads its features.
    pub fn connect(stream: UnixStream, queues: usize) -> Result<Self, VhostUserError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: io::Error| VhostUserError {
                what,
                source: vhost::Error::IOError(e),
            }
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(io("socket timeout"))?;
        let sock = stream.try_clone().map_err(io("socket"))?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        frontend.set_owner().map_err(vu_err("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vu_err("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol_features = offered & protocol_bit != 0;
        if protocol_features {
            let theirs = frontend
                .get_protocol_features()
                .map_err(vu_err("GET_PROTOCOL_FEATURES"))?;
            let ours = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ;
            frontend
                .set_protocol_features(theirs & ours)
                .map_err(vu_err("SET_PROTOCOL_FEATURES"))?;
        }
        Ok(Self {
            frontend,
            sock,
            features: offered & PASSTHROUGH_FEATURES,
            protocol_features,
        })
    }

    /// The virtio features to offer the driver.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Hands the backend guest memory and the rings; returns the worker's relay. `orphan`
    /// completes the requests of a backend that died (None: the device fails instead).
    pub fn start(
        &mut self,
        name: &str,
        mem: GuestMemoryMmap,
        acked: u64,
        queues: Vec<(u16, Queue)>,
        orphan: Option<Box<dyn OrphanedRequests>>,
    ) -> Result<VhostUserRelay, VhostUserError> {
        let mut features = acked & self.features;
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(vu_err("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(vu_err("guest RAM is not shareable"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(vu_err("SET_MEM_TABLE"))?;
        let mut relay = VhostUserRelay {
            indices: Vec::new(),
            kicks: Vec::new(),
            calls: Vec::new(),
            sock: self.sock.try_clone().map_err(|e| VhostUserError {
                what: "socket".into(),
                source: vhost::Error::IOError(e),
            })?,
            queues: Vec::new(),
            event_idx: features & VIRTIO_F_RING_EVENT_IDX != 0,
            orphan,
            orphaned: false,
            mem,
            name: name.to_string(),
        };
        for (index, queue) in queues {
            let (kick, call) = self.start_ring(&relay.mem, index, &queue)?;
            relay.indices.push(index);
            relay.kicks.push(kick);
            relay.calls.push(call);
            relay.queues.push(queue);
        }
        Ok(relay)
    }

    fn start_ring(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        q: &Queue,
    ) -> Result<(EventFd, EventFd), VhostUserError> {
        let i = usize::from(index);
        let at = |what: &str| format!("queue {index}: {what}");
        let hva = |gpa: u64, what: &str| -> Result<u64, VhostUserError> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| VhostUserError {
                    what: at(&format!("{what} ring at {gpa:#x} is outside guest RAM")),
                    source: vhost::Error::InvalidGuestMemory,
                })
        };
        let ring = VringConfigData {
            queue_max_size: q.max_size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: hva(q.desc_table(), "descriptor")?,
            used_ring_addr: hva(q.used_ring(), "used")?,
            avail_ring_addr: hva(q.avail_ring(), "available")?,
            log_addr: None,
        };
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK).map_err(|e| VhostUserError {
                what: at("eventfd"),
                source: vhost::Error::IOError(e),
            })
        };
        let (kick, call) = (eventfd()?, eventfd()?);
        let f = &mut self.frontend;
        f.set_vring_num(i, q.size())
            .map_err(vu_err(at("SET_VRING_NUM")))?;
        f.set_vring_addr(i, &ring)
            .map_err(vu_err(at("SET_VRING_ADDR")))?;
        f.set_vring_base(i, q.next_avail())
            .map_err(vu_err(at("SET_VRING_BASE")))?;
        f.set_vring_call(i, &call)
            .map_err(vu_err(at("SET_VRING_CALL")))?;
        f.set_vring_kick(i, &kick)
            .map_err(vu_err(at("SET_VRING_KICK")))?;
        if self.protocol_features {
            f.set_vring_enable(i, true)
                .map_err(vu_err(at("SET_VRING_ENABLE")))?;
        }
        Ok((kick, call))
    }

    /// Stops the rings of `relay` (GET_VRING_BASE); errors only logged: the device is being
    /// reset, and a dead backend has nothing left to stop.
    pub fn stop(&mut self, relay: &VhostUserRelay) {
        for &index in &relay.indices {
            if let Err(e) = self.frontend.get_vring_base(usize::from(index)) {
                log::debug!("vhost-user: GET_VRING_BASE {index}: {e}");
            }
        }
    }
}

/// Completes, for a device whose backend died, the requests it will never serve.
pub trait OrphanedRequests: Send {
    /// Answers one request (e.g. with an I/O error); returns the bytes written for the driver.
    fn fail(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32;
}

/// What the worker runs for a vhost-user device: kicks and calls relayed, the socket watched.
pub struct VhostUserRelay {
    /// Virtio queue index of each slot.
    indices: Vec<u16>,
    /// Written on each guest kick; the backend waits on them.
    kicks: Vec<EventFd>,
    /// Signalled by the backend when it has used buffers.
    calls: Vec<EventFd>,
    sock: UnixStream,
    /// The rings as configured (served here only once the backend is gone).
    queues: Vec<Queue>,
    event_idx: bool,
    orphan: Option<Box<dyn OrphanedRequests>>,
    /// The backend is gone and `orphan` answers the queues.
    orphaned: bool,
    mem: GuestMemoryMmap,
    /// The device's name, for the log.
    name: String,
}

impl VhostUserRelay {
    /// True when the backend closed its socket (it exited).
    fn backend_gone(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: recv into one valid byte of our own, with MSG_PEEK | MSG_DONTWAIT: it neither
        // consumes data nor blocks.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
    }

    /// Takes the queues over from a dead backend: the used index in guest memory says how far
    /// it got (it served each queue in order), everything after that is answered here.
    fn adopt_queues(&mut self, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        self.orphaned = true;
        for slot in 0..self.queues.len() {
            let q = &mut self.queues[slot];
            let used = q
                .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                .map_err(|e| DeviceError::new(format!("vhost-user: used ring: {e}")))?;
            q.set_next_avail(used.0);
            q.set_next_used(used.0);
            q.set_event_idx(self.event_idx);
            self.serve_orphaned(slot, ctx)?;
        }
        Ok(())
    }

    /// Answers what is available on queue `slot` (at most a ring's worth per call), then
    /// re-arms the guest's kicks (with EVENT_IDX the driver only kicks past `avail_event`,
    /// which the dead backend no longer moves).
    fn serve_orphaned(&mut self, slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let (Some(q), Some(orphan), Some(&index)) = (
            self.queues.get_mut(slot),
            self.orphan.as_mut(),
            self.indices.get(slot),
        ) else {
            return Ok(());
        };
        let err =
            |e: virtio_queue::Error| DeviceError::new(format!("vhost-user queue {index}: {e}"));
        let mut used = false;
        let mut budget = q.size();
        loop {
            q.disable_notification(&self.mem).map_err(err)?;
            while budget > 0 {
                let Some(chain) = q.pop_descriptor_chain(&self.mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let len = orphan.fail(&self.mem, chain);
                q.add_used(&self.mem, head, len).map_err(err)?;
                used = true;
            }
            if budget == 0 {
                ctx.rerun(slot);
                break;
            }
            // True: more arrived meanwhile (a chain that cannot be popped ends with budget 0).
            if !q.enable_notification(&self.mem).map_err(err)? {
                break;
            }
            budget = budget.saturating_sub(1);
        }
        if used && q.needs_notification(&self.mem).unwrap_or(true) {
            ctx.signal_used(index)
                .map_err(|e| DeviceError::new(format!("vhost-user: interrupt {index}: {e}")))?;
        }
        Ok(())
    }
}

impl VirtioHandler for VhostUserRelay {
    fn backend_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.calls.iter().map(|c| c.as_raw_fd()).collect();
        fds.push(self.sock.as_raw_fd());
        fds
    }

    fn queue_event(&mut self, slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        if self.orphaned {
            return self.serve_orphaned(slot, ctx);
        }
        match self.kicks.get(slot) {
            Some(k) => k
                .write(1)
                .map_err(|e| DeviceError::new(format!("vhost-user: kick queue {slot}: {e}"))),
            None => Ok(()),
        }
    }

    fn backend_event(&mut self, id: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        if let (Some(call), Some(&index)) = (self.calls.get(id), self.indices.get(id)) {
            let _ = call.read();
            return ctx
                .signal_used(index)
                .map_err(|e| DeviceError::new(format!("vhost-user: interrupt {index}: {e}")));
        }
        if self.backend_gone() {
            let _ = ctx.watch_backend(id, false);
            if self.orphan.is_none() {
                return Err(DeviceError::new(
                    "vhost-user: the backend closed its socket",
                ));
            }
            if self.orphaned {
                return Ok(());
            }
            static GONE: RateLimit = RateLimit::new(8);
            GONE.warn(|| format!("{}: the backend exited; its requests now fail", self.name));
            return self.adopt_queues(ctx);
        }
        // Unsolicited bytes on the request channel: leave them to the next request.
        ctx.watch_backend(id, false)
            .map_err(|e| DeviceError::new(format!("vhost-user: epoll: {e}")))
    }
}
