//! virtio-net (virtio 1.x, 5.1) backed by a host TAP device.
//!
//! Two queues: receive (index [`RX_QUEUE`]) and transmit (index [`TX_QUEUE`]). The virtio
//! worker (`virtio-net-<tap>`, see [`super::worker`]) waits on the TAP and both kicks. Frames are copied
//! through bounded buffers; every frame carries a 12-byte `virtio_net_hdr_v1`, which the TAP
//! (IFF_VNET_HDR) understands, so checksum and segmentation offloads pass straight through.
//!
//! The guest is not trusted: malformed chains are returned with length 0 and counted, oversized
//! frames are dropped and counted, and nothing here panics or allocates on guest input.

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net as vnet;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

mod config;
pub use config::*;

use super::passt::Passt;
pub use super::tap::VNET_HDR_LEN;
use super::tap::{self, Tap, TapError};
use super::{
    ActivateError, DeviceError, DrainGuard, VirtioDevice, VirtioHandler, WorkerCtx, TYPE_NET,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::kvm::vcpu::RateLimit;

/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame (without the virtio-net header) accepted in either direction: a 64 KiB GSO
/// packet plus an Ethernet header and VLAN tag.
pub const MAX_FRAME_LEN: usize = 65550;
/// Frame buffer size: header + frame.
const MAX_BUF_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Frames handled per wake-up before the worker looks at its other events.
const BATCH: usize = 256;

const fn bit(b: u32) -> u64 {
    1u64 << b
}

pub const VIRTIO_NET_F_CSUM: u64 = bit(vnet::VIRTIO_NET_F_CSUM);
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = bit(vnet::VIRTIO_NET_F_GUEST_CSUM);
pub const VIRTIO_NET_F_MAC: u64 = bit(vnet::VIRTIO_NET_F_MAC);
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = bit(vnet::VIRTIO_NET_F_GUEST_TSO4);
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = bit(vnet::VIRTIO_NET_F_GUEST_TSO6);
pub const VIRTIO_NET_F_GUEST_ECN: u64 = bit(vnet::VIRTIO_NET_F_GUEST_ECN);
pub const VIRTIO_NET_F_GUEST_UFO: u64 = bit(vnet::VIRTIO_NET_F_GUEST_UFO);
pub const VIRTIO_NET_F_HOST_TSO4: u64 = bit(vnet::VIRTIO_NET_F_HOST_TSO4);
pub const VIRTIO_NET_F_HOST_TSO6: u64 = bit(vnet::VIRTIO_NET_F_HOST_TSO6);
pub const VIRTIO_NET_F_HOST_ECN: u64 = bit(vnet::VIRTIO_NET_F_HOST_ECN);
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = bit(vnet::VIRTIO_NET_F_MRG_RXBUF);
pub const VIRTIO_NET_F_STATUS: u64 = bit(vnet::VIRTIO_NET_F_STATUS);

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Size of the configuration space we expose: mac[6], status, max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

/// The host side of the device: one frame (virtio-net header + Ethernet frame) per call.
/// Both calls must not block; `read_frame` returns `WouldBlock` when nothing is queued, and
/// the fd becomes readable when a frame is.
pub trait NetBackend: AsRawFd + Send {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_frame(&mut self, iov: &[&[u8]]) -> io::Result<usize>;
    /// TUN_F_* offloads the backend can hand to the guest (default: none).
    fn supported_offloads(&self) -> u32 {
        0
    }
    /// Applies the TUN_F_* offloads the guest accepted.
    fn set_offload(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
    /// Whether frames may carry checksum and segmentation offloads in their virtio-net header
    /// (the TAP does them); a backend without them gets complete, checksummed frames only.
    fn accepts_tx_offloads(&self) -> bool {
        false
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
    fn write_frame(&mut self, iov: &[&[u8]]) -> io::Result<usize> {
        self.writev(iov)
    }
    fn supported_offloads(&self) -> u32 {
        Tap::supported_offloads(self)
    }
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        Tap::set_offload(self, tun_flags)
    }
    fn accepts_tx_offloads(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Device counters (relaxed atomics, shared with the worker).
#[derive(Debug, Default)]
pub struct NetStats {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    rx_dropped_too_big: AtomicU64,
    rx_dropped_runt: AtomicU64,
    rx_malformed_chains: AtomicU64,
    rx_errors: AtomicU64,
    tx_dropped_malformed: AtomicU64,
    tx_dropped_oversized: AtomicU64,
    tx_dropped_too_short: AtomicU64,
    tx_dropped_bad_header: AtomicU64,
    tx_errors: AtomicU64,
    queue_errors: AtomicU64,
    interrupt_errors: AtomicU64,
}

/// A copy of the counters. Byte counts exclude the virtio-net header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStatsSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames larger than the guest's buffer (no MRG_RXBUF), or than all its buffers together.
    pub rx_dropped_too_big: u64,
    /// Reads from the TAP shorter than a virtio-net header.
    pub rx_dropped_runt: u64,
    /// RX chains with device-readable descriptors, bad addresses or no room, returned empty.
    pub rx_malformed_chains: u64,
    /// TAP read errors other than "nothing queued".
    pub rx_errors: u64,
    /// TX chains with device-writable descriptors or bad addresses.
    pub tx_dropped_malformed: u64,
    /// TX frames above [`MAX_FRAME_LEN`].
    pub tx_dropped_oversized: u64,
    /// TX chains shorter than the virtio-net header.
    pub tx_dropped_too_short: u64,
    /// TX headers asking for an offload the driver did not negotiate.
    pub tx_dropped_bad_header: u64,
    /// TAP write errors.
    pub tx_errors: u64,
    /// Unreadable/unwritable rings.
    pub queue_errors: u64,
    pub interrupt_errors: u64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl NetStats {
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStatsSnapshot {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            rx_dropped_too_big: l(&self.rx_dropped_too_big),
            rx_dropped_runt: l(&self.rx_dropped_runt),
            rx_malformed_chains: l(&self.rx_malformed_chains),
            rx_errors: l(&self.rx_errors),
            tx_dropped_malformed: l(&self.tx_dropped_malformed),
            tx_dropped_oversized: l(&self.tx_dropped_oversized),
            tx_dropped_too_short: l(&self.tx_dropped_too_short),
            tx_dropped_bad_header: l(&self.tx_dropped_bad_header),
            tx_errors: l(&self.tx_errors),
            queue_errors: l(&self.queue_errors),
            interrupt_errors: l(&self.interrupt_errors),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame path (no threads, no epoll: unit-testable against guest memory and a fake backend)
// ---------------------------------------------------------------------------------------------

/// A frame read from the backend, partly delivered into guest buffers (MRG_RXBUF).
struct PendingRx {
    len: usize,
    written: usize,
    /// Chains filled so far and the bytes written into each; published when the frame is done.
    used: Vec<(u16, u32)>,
    /// Guest addresses of the two `num_buffers` bytes.
    num_buffers_at: [Option<GuestAddress>; 2],
}

/// What an RX pass ended on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RxStatus {
    /// Used buffers were added to the RX ring.
    pub used: bool,
    /// The guest has no (more) RX buffers: stop polling the backend until the RX kick.
    pub starved: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxDrop {
    Malformed,
    Oversized,
    TooShort,
    BadHeader,
}

enum ChainWrite {
    /// Bytes written into the chain.
    Wrote(usize),
    /// Device-readable descriptor or an address outside guest memory.
    Malformed,
}

pub(crate) struct NetQueues {
    mem: Arc<GuestMemoryMmap>,
    rx: Queue,
    tx: Queue,
    backend: Box<dyn NetBackend>,
    acked: u64,
    stats: Arc<NetStats>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    rx_pending: Option<PendingRx>,
    log: RateLimit,
}

impl NetQueues {
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        mut rx: Queue,
        mut tx: Queue,
        backend: Box<dyn NetBackend>,
        acked: u64,
        stats: Arc<NetStats>,
    ) -> Self {
        let event_idx = acked & VIRTIO_F_RING_EVENT_IDX != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        Self {
            mem: Arc::new(mem),
            rx,
            tx,
            backend,
            acked,
            stats,
            rx_buf: vec![0; MAX_BUF_LEN],
            tx_buf: vec![0; MAX_BUF_LEN],
            rx_pending: None,
            log: RateLimit::new(10),
        }
    }

    fn mrg_rxbuf(&self) -> bool {
        self.acked & VIRTIO_NET_F_MRG_RXBUF != 0
    }

    fn queue_error(&mut self, what: &str, e: impl std::fmt::Display) {
        inc(&self.stats.queue_errors);
        self.log.log(|| format!("virtio-net: {what}: {e}"));
    }

    /// Sends every frame the guest queued for transmission (at most [`BATCH`]).
    /// Returns (used buffers added, more chains may be pending).
    pub(crate) fn process_tx(&mut self) -> (bool, bool) {
        let mut used = false;
        let mut budget = BATCH;
        let mut guard = DrainGuard::default();
        loop {
            if let Err(e) = self.tx.disable_notification(&*self.mem) {
                self.queue_error("tx ring", e);
                return (used, false);
            }
            let mem = Arc::clone(&self.mem);
            let budget_at_start = budget;
            while budget > 0 {
                let Some(chain) = self.tx.pop_descriptor_chain(&*mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                match self.gather_tx(chain) {
                    Ok(len) => self.send_tx(len),
                    Err(reason) => self.count_tx_drop(reason),
                }
                if let Err(e) = self.tx.add_used(&*self.mem, head, 0) {
                    self.queue_error("tx used ring", e);
                    return (used, false);
                }
                used = true;
            }
            if budget == 0 {
                return (used, true);
            }
            match self.tx.enable_notification(&*self.mem) {
                Ok(true) => {
                    if !guard.go_again(budget != budget_at_start) {
                        self.queue_error("tx ring", "available index ahead of readable chains");
                        return (used, false);
                    }
                }
                Ok(false) => return (used, false),
                Err(e) => {
                    self.queue_error("tx ring", e);
                    return (used, false);
                }
            }
        }
    }

    fn gather_tx(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<usize, TxDrop> {
        let mut len = 0usize;
        for desc in chain {
            if desc.is_write_only() {
                return Err(TxDrop::Malformed);
            }
            let n = desc.len() as usize;
            let end = len.checked_add(n).ok_or(TxDrop::Oversized)?;
            let dst = self.tx_buf.get_mut(len..end).ok_or(TxDrop::Oversized)?;
            self.mem
                .read_slice(dst, desc.addr())
                .map_err(|_| TxDrop::Malformed)?;
            len = end;
        }
        if len < VNET_HDR_LEN {
            return Err(TxDrop::TooShort);
        }
        self.check_tx_header()?;
        Ok(len)
    }

    /// Rejects headers asking for offloads the driver did not negotiate (the kernel validates
    /// the rest of the header when the frame is written to the TAP).
    fn check_tx_header(&self) -> Result<(), TxDrop> {
        let flags = u32::from(self.tx_buf[0]);
        let gso = u32::from(self.tx_buf[1]);
        let has = |f: u64| self.acked & f != 0;
        if flags & vnet::VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_CSUM) {
            return Err(TxDrop::BadHeader);
        }
        if gso & vnet::VIRTIO_NET_HDR_GSO_ECN != 0 && !has(VIRTIO_NET_F_HOST_ECN) {
            return Err(TxDrop::BadHeader);
        }
        let ok = match gso & !vnet::VIRTIO_NET_HDR_GSO_ECN {
            vnet::VIRTIO_NET_HDR_GSO_NONE => true,
            vnet::VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
            vnet::VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(TxDrop::BadHeader)
        }
    }

    fn send_tx(&mut self, len: usize) {
        match self.backend.write_frame(&[&self.tx_buf[..len]]) {
            Ok(_) => {
                inc(&self.stats.tx_frames);
                self.stats
                    .tx_bytes
                    .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                inc(&self.stats.tx_errors);
                self.log
                    .log(|| format!("virtio-net: TAP write of {len} bytes failed: {e}"));
            }
        }
    }

    fn count_tx_drop(&mut self, reason: TxDrop) {
        let s = &self.stats;
        inc(match reason {
            TxDrop::Malformed => &s.tx_dropped_malformed,
            TxDrop::Oversized => &s.tx_dropped_oversized,
            TxDrop::TooShort => &s.tx_dropped_too_short,
            TxDrop::BadHeader => &s.tx_dropped_bad_header,
        });
        self.log
            .log(|| format!("virtio-net: dropped a TX chain: {reason:?}"));
    }

    /// True when the guest offered RX buffers we have not used yet. When it has none, asks
    /// it to kick when it adds some.
    fn rx_has_buffers(&mut self) -> bool {
        loop {
            match self.rx.avail_idx(&*self.mem, Ordering::Acquire) {
                Ok(idx) if idx != Wrapping(self.rx.next_avail()) => return true,
                Ok(_) => {}
                Err(e) => {
                    self.queue_error("rx ring", e);
                    return false;
                }
            }
            match self.rx.enable_notification(&*self.mem) {
                Ok(true) => continue,
                Ok(false) => return false,
                Err(e) => {
                    self.queue_error("rx ring", e);
                    return false;
                }
            }
        }
    }

    /// Moves frames from the backend into the guest's RX buffers, reading a frame only when
    /// there is a buffer for it.
    pub(crate) fn process_rx(&mut self) -> RxStatus {
        let mut status = RxStatus::default();
        let mut budget = BATCH;
        loop {
            if self.rx_pending.is_none() {
                if budget == 0 {
                    return status;
                }
                if !self.rx_has_buffers() {
                    status.starved = true;
                    return status;
                }
                budget -= 1;
                match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n < VNET_HDR_LEN || n > self.rx_buf.len() => {
                        inc(&self.stats.rx_dropped_runt);
                        continue;
                    }
                    Ok(n) => {
                        self.rx_pending = Some(PendingRx {
                            len: n,
                            written: 0,
                            used: Vec::new(),
                            num_buffers_at: [None; 2],
                        });
                        self.rx_buf[NUM_BUFFERS_OFFSET..VNET_HDR_LEN]
                            .copy_from_slice(&1u16.to_le_bytes());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return status,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Do not spin on a broken backend: wait for the next RX kick.
                        inc(&self.stats.rx_errors);
                        self.log.log(|| format!("virtio-net: TAP read failed: {e}"));
                        status.starved = true;
                        return status;
                    }
                }
            }
            if !self.deliver_pending(&mut status) {
                status.starved = true;
                return status;
            }
        }
    }

    /// Delivers (or drops) the pending frame. Returns false when it needs more RX buffers.
    fn deliver_pending(&mut self, status: &mut RxStatus) -> bool {
        let Some(mut p) = self.rx_pending.take() else {
            return true;
        };
        let mrg = self.mrg_rxbuf();
        let mem = Arc::clone(&self.mem);
        let mut guard = DrainGuard::default();
        while p.written < p.len {
            if p.used.len() >= usize::from(self.rx.size()) {
                // Every buffer the ring can hold is not enough: give them back empty.
                inc(&self.stats.rx_dropped_too_big);
                for &(head, _) in &p.used {
                    self.add_rx_used(head, 0, status);
                }
                return true;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&*mem) else {
                // Re-arms the RX kick (EVENT_IDX) before giving up, closing the race with a
                // driver that adds buffers right now.
                if self.rx_has_buffers() {
                    if guard.go_again(false) {
                        continue;
                    }
                    self.queue_error("rx ring", "available index ahead of readable chains");
                }
                self.rx_pending = Some(p);
                return false;
            };
            guard.popped();
            let head = chain.head_index();
            match self.write_rx_chain(chain, &mut p) {
                ChainWrite::Wrote(n) if n > 0 && (mrg || p.written + n == p.len) => {
                    p.written += n;
                    p.used.push((head, n as u32));
                }
                ChainWrite::Wrote(n) if n > 0 => {
                    // Without MRG_RXBUF a frame must fit one buffer; keep the buffer.
                    self.rx.go_to_previous_position();
                    inc(&self.stats.rx_dropped_too_big);
                    self.log.log(|| {
                        format!(
                            "virtio-net: dropped a {}-byte RX frame: the guest buffer holds {n}",
                            p.len
                        )
                    });
                    return true;
                }
                ChainWrite::Wrote(_) | ChainWrite::Malformed => {
                    inc(&self.stats.rx_malformed_chains);
                    self.log
                        .log(|| "virtio-net: returned a malformed RX chain".to_string());
                    self.add_rx_used(head, 0, status);
                }
            }
        }
        if p.used.len() > 1 {
            // The header sits in the first buffer; fix up num_buffers in guest memory.
            let count = (p.used.len() as u16).to_le_bytes();
            for (addr, byte) in p.num_buffers_at.iter().zip(count) {
                if let Some(addr) = addr {
                    if let Err(e) = self.mem.write_obj(byte, *addr) {
                        self.queue_error("rx num_buffers", e);
                    }
                }
            }
        }
        for &(head, len) in &p.used {
            self.add_rx_used(head, len, status);
        }
        inc(&self.stats.rx_frames);
        self.stats
            .rx_bytes
            .fetch_add((p.len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        true
    }

    fn add_rx_used(&mut self, head: u16, len: u32, status: &mut RxStatus) {
        match self.rx.add_used(&*self.mem, head, len) {
            Ok(()) => status.used = true,
            Err(e) => self.queue_error("rx used ring", e),
        }
    }

    /// Copies the rest of the pending frame into one chain; returns how much fit.
    fn write_rx_chain(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        p: &mut PendingRx,
    ) -> ChainWrite {
        let mut off = p.written;
        let mut nb_at = p.num_buffers_at;
        for desc in chain {
            if off == p.len {
                break;
            }
            if !desc.is_write_only() {
                return ChainWrite::Malformed;
            }
            let n = (desc.len() as usize).min(p.len - off);
            if self
                .mem
                .write_slice(&self.rx_buf[off..off + n], desc.addr())
                .is_err()
            {
                return ChainWrite::Malformed;
            }
            for (i, slot) in nb_at.iter_mut().enumerate() {
                let at = NUM_BUFFERS_OFFSET + i;
                if (off..off + n).contains(&at) {
                    *slot = desc.addr().checked_add((at - off) as u64);
                }
            }
            off += n;
        }
        p.num_buffers_at = nb_at;
        ChainWrite::Wrote(off - p.written)
    }

    /// Raises the queue interrupt if the driver wants one.
    fn notify(&mut self, index: u16, raise: &dyn Fn(u16) -> io::Result<()>) {
        let q = if index == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        match q.needs_notification(&*self.mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = raise(index) {
                    inc(&self.stats.interrupt_errors);
                    self.log
                        .log(|| format!("virtio-net: interrupt for queue {index} failed: {e}"));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the worker runs
// ---------------------------------------------------------------------------------------------

/// The queues and the backend of one activation, served by the virtio worker: the TAP is its
/// one backend fd (watched only while the guest has receive buffers).
pub(crate) struct NetHandler {
    queues: NetQueues,
    /// Worker slots (positions in the activation's queue list) of RX and TX.
    rx_slot: usize,
    tx_slot: usize,
}

impl NetHandler {
    fn serve_rx(&mut self, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let st = self.queues.process_rx();
        if st.used {
            self.queues.notify(RX_QUEUE, &|i| ctx.signal_used(i));
        }
        ctx.watch_backend(0, !st.starved)
            .map_err(|e| DeviceError::new(format!("virtio-net: epoll on the TAP: {e}")))
    }
}

impl VirtioHandler for NetHandler {
    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.queues.backend.as_raw_fd()]
    }

    fn queue_event(&mut self, slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        if slot == self.tx_slot {
            let (used, more) = self.queues.process_tx();
            if used {
                self.queues.notify(TX_QUEUE, &|i| ctx.signal_used(i));
            }
            if more {
                ctx.rerun(slot);
            }
            Ok(())
        } else if slot == self.rx_slot {
            self.serve_rx(ctx)
        } else {
            Ok(())
        }
    }

    fn backend_event(&mut self, _id: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        self.serve_rx(ctx)
    }
}

// ---------------------------------------------------------------------------------------------
// The device
// ---------------------------------------------------------------------------------------------

/// Why the network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Config(#[from] NetConfigError),
    #[error(transparent)]
    Passt(#[from] super::passt::PasstError),
}

/// A virtio-net device.
pub struct Net {
    name: String,
    mac: [u8; 6],
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    /// The TAP while no worker has it (between activations).
    backend: Option<Box<dyn NetBackend>>,
    stats: Arc<NetStats>,
}

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

impl Net {
    /// Opens (or creates) the TAP, or starts passt, and builds the device.
    pub fn new(cfg: &NetConfig) -> Result<Net, NetError> {
        let (name, default_mac) = match &cfg.attach {
            NetAttach::Tap(name) => (name.as_str(), mac_from_name(name)),
            NetAttach::User { .. } => ("user", USER_NET_DEFAULT_MAC),
        };
        let mac = cfg.mac.unwrap_or(default_mac);
        if mac[0] & 1 != 0 {
            return Err(NetConfigError::MulticastMac {
                mac: format_mac(&mac),
            }
            .into());
        }
        let backend: Box<dyn NetBackend> = match &cfg.attach {
            NetAttach::Tap(name) => Box::new(Tap::open(name)?),
            NetAttach::User { hostfwd } => Box::new(Passt::spawn(hostfwd)?),
        };
        Ok(Self::with_backend(name, mac, backend))
    }

    /// Builds the device on any backend (tests, other host back ends).
    pub fn with_backend(name: &str, mac: [u8; 6], backend: Box<dyn NetBackend>) -> Net {
        let off = backend.supported_offloads();
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MRG_RXBUF;
        if backend.accepts_tx_offloads() {
            features |= VIRTIO_NET_F_CSUM
                | VIRTIO_NET_F_HOST_TSO4
                | VIRTIO_NET_F_HOST_TSO6
                | VIRTIO_NET_F_HOST_ECN;
        }
        if off & tap::TUN_F_CSUM != 0 {
            features |= VIRTIO_NET_F_GUEST_CSUM;
            if off & tap::TUN_F_TSO4 != 0 {
                features |= VIRTIO_NET_F_GUEST_TSO4;
            }
            if off & tap::TUN_F_TSO6 != 0 {
                features |= VIRTIO_NET_F_GUEST_TSO6;
            }
            if off & tap::TUN_F_TSO_ECN != 0 && off & (tap::TUN_F_TSO4 | tap::TUN_F_TSO6) != 0 {
                features |= VIRTIO_NET_F_GUEST_ECN;
            }
            if off & tap::TUN_F_UFO != 0 {
                features |= VIRTIO_NET_F_GUEST_UFO;
            }
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(vnet::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Net {
            name: name.to_string(),
            mac,
            avail_features: features,
            config,
            backend: Some(backend),
            stats: Arc::new(NetStats::default()),
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> NetStatsSnapshot {
        self.stats.snapshot()
    }

    /// TUN_F_* flags matching the guest offloads the driver accepted.
    fn tun_offloads(acked: u64) -> u32 {
        let mut f = 0;
        for (feature, flag) in [
            (VIRTIO_NET_F_GUEST_CSUM, tap::TUN_F_CSUM),
            (VIRTIO_NET_F_GUEST_TSO4, tap::TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, tap::TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_ECN, tap::TUN_F_TSO_ECN),
            (VIRTIO_NET_F_GUEST_UFO, tap::TUN_F_UFO),
        ] {
            if acked & feature != 0 {
                f |= flag;
            }
        }
        f
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn name(&self) -> String {
        format!("virtio-net-{}", self.name)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR (legacy drivers only).
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<(u16, Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        let got = queues.len();
        let slot_of = |index| queues.iter().position(|(i, _)| *i == index);
        let (Some(rx_slot), Some(tx_slot), 2) = (slot_of(RX_QUEUE), slot_of(TX_QUEUE), got) else {
            return Err(ActivateError::QueueCount {
                got,
                want: QUEUE_SIZES.len(),
            });
        };
        let mut backend = self.backend.take().ok_or_else(|| {
            ActivateError::Worker(io::Error::other("the network backend is in use"))
        })?;
        let acked = acked_features & self.avail_features;
        let offloads = Self::tun_offloads(acked);
        if let Err(e) = backend.set_offload(offloads) {
            // Once per activation, which the guest can repeat at will.
            static OFFLOAD_LOG: RateLimit = RateLimit::new(3);
            OFFLOAD_LOG.warn(|| {
                format!(
                    "virtio-net {}: TUNSETOFFLOAD {offloads:#x} failed: {e}",
                    self.name
                )
            });
        }
        let mut qs = queues.into_iter().map(|(_, q)| q);
        let (Some(a), Some(b)) = (qs.next(), qs.next()) else {
            self.backend = Some(backend);
            return Err(ActivateError::QueueCount { got, want: 2 });
        };
        let (rx, tx) = if rx_slot == 0 { (a, b) } else { (b, a) };
        Ok(Box::new(NetHandler {
            queues: NetQueues::new(mem, rx, tx, backend, acked, self.stats.clone()),
            rx_slot,
            tx_slot,
        }))
    }

    fn deactivate(&mut self, handler: Box<dyn VirtioHandler>) {
        match super::worker::downcast::<NetHandler>(handler) {
            Some(h) => self.backend = Some(h.queues.backend),
            None => log::error!("virtio-net {}: foreign handler given back", self.name),
        }
    }
}

#[cfg(test)]
mod tests;
