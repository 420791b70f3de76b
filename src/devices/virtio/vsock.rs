//! virtio-vsock (virtio 1.2, 5.10) in userspace: stream sockets between the guest and host
//! programs, with no vhost-vsock module on the host. `--vsock cid=N,socket=PATH` uses the
//! "hybrid vsock" convention of Firecracker and Cloud Hypervisor ([`muxer`]): host programs
//! connect to PATH and write `CONNECT <port>\n`; guest connections to CID 2 port P reach the
//! Unix socket `PATH_P`.
//!
//! Three queues: RX (buffers the guest posts for packets to it), TX (its packets) and the
//! event queue (transport resets, which ferrovm never sends: the guest keeps its CID). The
//! handler moves packets between the queues and the [`muxer::Muxer`]; the muxer keeps its
//! connections across a device reset only as a listener (every connection is dropped).

pub mod muxer;
pub mod packet;
pub mod rx;

use std::os::fd::RawFd;
use std::path::PathBuf;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use self::muxer::{ListenError, Muxer, CTRL_GATE};
use self::packet::{read_packet, MAX_PAYLOAD};
use self::rx::Rx;
use super::{
    ActivateError, DeviceError, DrainGuard, VirtioDevice, VirtioHandler, WorkerCtx,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::ratelimit::RateLimit;

/// virtio device type of the socket device.
pub const TYPE_VSOCK: u32 = 19;
/// RX, TX, event.
const QUEUE_SIZES: [u16; 3] = [256, 256, 64];
const SLOT_RX: usize = 0;
const SLOT_TX: usize = 1;
/// TX chains served per kick before the other events get a turn.
const TX_BATCH: usize = 256;
/// Backend fds: the muxer's two epoll sets.
const BACKEND_RX: usize = 0;
const BACKEND_TX: usize = 1;

/// `--vsock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

/// A malformed `--vsock` option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockConfigError {
    #[error("--vsock {0:?}: missing cid=N")]
    MissingCid(String),
    #[error("--vsock {0:?}: missing socket=PATH")]
    MissingSocket(String),
    #[error("--vsock {input:?}: cid {value:?} must be a number from 3 to 4294967294 (0-2 are reserved, -1 is 'any')")]
    BadCid { input: String, value: String },
    #[error("--vsock {input:?}: unknown key {key:?} (expected cid=N,socket=PATH)")]
    UnknownKey { input: String, key: String },
    #[error("--vsock {input:?}: {key} given twice")]
    Duplicate { input: String, key: String },
    #[error("--vsock {0:?}: socket= is empty")]
    EmptySocket(String),
}

/// Parses `cid=N,socket=PATH`.
pub fn parse_vsock_option(s: &str) -> Result<VsockConfig, VsockConfigError> {
    let (mut cid, mut socket) = (None, None);
    for item in s.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        let slot = match key {
            "cid" => &mut cid,
            "socket" => &mut socket,
            _ => {
                return Err(VsockConfigError::UnknownKey {
                    input: s.into(),
                    key: key.into(),
                })
            }
        };
        if slot.replace(value.to_string()).is_some() {
            return Err(VsockConfigError::Duplicate {
                input: s.into(),
                key: key.into(),
            });
        }
    }
    let cid = cid.ok_or_else(|| VsockConfigError::MissingCid(s.into()))?;
    let socket = socket.ok_or_else(|| VsockConfigError::MissingSocket(s.into()))?;
    if socket.is_empty() {
        return Err(VsockConfigError::EmptySocket(s.into()));
    }
    let bad_cid = || VsockConfigError::BadCid {
        input: s.into(),
        value: cid.clone(),
    };
    let n: u64 = cid.parse().map_err(|_| bad_cid())?;
    if !(3..=0xFFFF_FFFE).contains(&n) {
        return Err(bad_cid());
    }
    Ok(VsockConfig {
        cid: n,
        socket: socket.into(),
    })
}

/// Why the device could not be made.
#[derive(Debug, thiserror::Error)]
#[error("--vsock: {0}")]
pub struct VsockError(#[from] ListenError);

/// The socket device. The muxer (listener and connections) lives in the handler while the
/// driver runs the device and comes back here at reset.
pub struct Vsock {
    cid: u64,
    muxer: Option<Muxer>,
}

impl Vsock {
    /// Listens on the hybrid socket now, so host programs can connect before the guest boots
    /// (they wait for the guest's answer).
    pub fn new(cfg: &VsockConfig) -> Result<Vsock, VsockError> {
        Ok(Vsock {
            cid: cfg.cid,
            muxer: Some(Muxer::new(cfg.cid, &cfg.socket)?),
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn name(&self) -> String {
        format!("virtio-vsock-{}", self.cid)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // guest_cid, a 64-bit little-endian field (virtio 1.2, 5.10.4).
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<(u16, Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        let got = queues.len();
        let [rx, tx, _event]: [(u16, Queue); 3] =
            queues.try_into().map_err(|_| ActivateError::QueueCount {
                got,
                want: QUEUE_SIZES.len(),
            })?;
        let muxer = self.muxer.take().ok_or(ActivateError::AlreadyActive)?;
        Ok(Box::new(VsockHandler {
            mem,
            rx,
            tx,
            muxer,
            tx_gated: false,
            payload: Vec::with_capacity(MAX_PAYLOAD),
            scratch: vec![0u8; MAX_PAYLOAD],
            log: RateLimit::new(5),
        }))
    }

    fn deactivate(&mut self, handler: Box<dyn VirtioHandler>) {
        match super::worker::downcast::<VsockHandler>(handler) {
            Some(h) => {
                let mut muxer = h.muxer;
                muxer.reset();
                self.muxer = Some(muxer);
            }
            None => log::error!("{}: foreign handler given back", self.name()),
        }
    }
}

/// Serves the three queues and the muxer's host sockets.
struct VsockHandler {
    mem: GuestMemoryMmap,
    rx: (u16, Queue),
    tx: (u16, Queue),
    muxer: Muxer,
    /// TX processing waits: too many control packets wait for receive buffers.
    tx_gated: bool,
    payload: Vec<u8>,
    scratch: Vec<u8>,
    log: RateLimit,
}

fn ring(e: virtio_queue::Error) -> DeviceError {
    DeviceError::new(format!("vsock tx queue: {e:?}"))
}

impl VsockHandler {
    /// Sends the guest what the muxer has for it; stops watching host sockets while the
    /// guest posts no receive buffers.
    fn fill(&mut self, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let mut rx = Rx::new(&self.mem, &mut self.rx.1);
        let more_room = self.muxer.fill_rx(&mut rx, &mut self.scratch)?;
        let notify = rx.used_any && rx.needs_notification()?;
        ctx.watch_backend(BACKEND_RX, more_room)
            .map_err(DeviceError::new)?;
        if notify {
            ctx.signal_used(self.rx.0).map_err(DeviceError::new)?;
        }
        // The backlog that stopped TX went out: serve TX again (the guest will not kick for
        // chains it already published).
        if self.tx_gated && self.muxer.ctrl_backlog() < CTRL_GATE {
            self.tx_gated = false;
            ctx.rerun(SLOT_TX);
        }
        Ok(())
    }

    /// Hands the guest's packets to the muxer. Returns whether chains are left (batch limit).
    fn drain_tx(&mut self, ctx: &mut WorkerCtx) -> Result<bool, DeviceError> {
        let (index, queue) = (&mut self.tx.0, &mut self.tx.1);
        let mut guard = DrainGuard::default();
        let (mut served, mut used) = (0usize, false);
        let left = loop {
            if self.muxer.ctrl_backlog() >= CTRL_GATE {
                self.tx_gated = true;
                break false;
            }
            if served >= TX_BATCH {
                break true;
            }
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                if !queue.enable_notification(&self.mem).map_err(ring)? {
                    break false;
                }
                if !guard.go_again(false) {
                    return Err(DeviceError::new(
                        "vsock tx queue: available index ahead of readable chains",
                    ));
                }
                continue;
            };
            guard.popped();
            served += 1;
            let head = chain.head_index();
            match read_packet(&self.mem, chain, &mut self.payload) {
                Ok(h) => self.muxer.guest_packet(&h, &self.payload),
                Err(e) => {
                    self.log
                        .warn(|| format!("vsock: dropped a malformed TX packet: {e}"));
                }
            }
            queue.add_used(&self.mem, head, 0).map_err(ring)?;
            used = true;
        };
        if used && queue.needs_notification(&self.mem).map_err(ring)? {
            ctx.signal_used(*index).map_err(DeviceError::new)?;
        }
        Ok(left)
    }

    fn serve_tx(&mut self, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        self.tx_gated = false;
        if self.drain_tx(ctx)? {
            ctx.rerun(SLOT_TX);
        }
        self.fill(ctx)
    }
}

impl VirtioHandler for VsockHandler {
    fn queue_event(&mut self, slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        match slot {
            SLOT_RX => self.fill(ctx),
            SLOT_TX => self.serve_tx(ctx),
            // The event queue: buffers for transport resets, which are never sent.
            _ => Ok(()),
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        self.muxer.fds().to_vec()
    }

    fn backend_event(&mut self, id: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let polled = match id {
            BACKEND_RX => self.muxer.poll_rx(),
            BACKEND_TX => self.muxer.poll_tx(),
            _ => Ok(()),
        };
        polled.map_err(|e| DeviceError::new(format!("vsock: polling host sockets: {e}")))?;
        self.fill(ctx)
    }
}

#[cfg(test)]
mod tests;
