//! The virtio 1.x PCI transport ("modern" virtio-pci, virtio 1.2 section 4.1).
//!
//! One 64-bit memory BAR (BAR 0) holds every structure:
//!
//! ```text
//! 0x0000  common configuration (0x38 bytes)
//! 0x1000  ISR status (1 byte, read-to-clear)
//! 0x2000  device-specific configuration
//! 0x3000  notifications: queue n at 0x3000 + 4 * n (notify_off_multiplier 4)
//! 0x4000  MSI-X table (one vector per queue + one for configuration changes)
//! 0x5000  MSI-X pending-bit array
//! ```
//!
//! Notification addresses are KVM ioeventfds (registered through an [`IoEventRegistry`] whenever
//! the BAR is decoded at a new address), so kicks do not exit to userspace; a notify write that
//! does reach userspace signals the same eventfd. Interrupts go to the queue's MSI-X vector when
//! MSI-X is enabled, otherwise to INTx with the ISR register (level-triggered, resampled).

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActiveQueue, Runner, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::devices::pci::config::{BarKind, BarSpec, COMMAND_INTX_DISABLE};
use crate::devices::pci::msix::{self, Msix};
use crate::devices::pci::{
    IntxLine, IoEventRegistry, MsiRouter, PciConfig, PciDevice, PciError, PciHeader,
};
use crate::ratelimit::RateLimit;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// "No MSI-X vector" in msix_config / queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// virtio PCI capability types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;

const REGION: u64 = 0x1000;
const COMMON_OFF: u64 = 0x0000;
const COMMON_LEN: usize = 0x38;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const NOTIFY_OFF: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFF: u64 = 0x4000;
const MSIX_PBA_OFF: u64 = 0x5000;
const BAR_SIZE: u64 = 0x8000;
const BAR: usize = 0;

/// Most queues a device may have here (the MSI-X table and notify area fit one page each).
pub const MAX_QUEUES: usize = 64;

/// Errors building a virtio-pci device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("a virtio device needs 1 to {MAX_QUEUES} queues, this one has {0}")]
    QueueCount(usize),
    #[error("queue {0}: maximum size {1} is not a power of two in 1..=32768")]
    QueueSize(usize, u16),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("cannot create the queue notification eventfds")]
    EventFd(#[source] io::Error),
    #[error("cannot allocate MSI-X vectors")]
    Msix(#[source] io::Error),
}

/// Interrupt state shared by the transport (vCPU threads) and the device's worker.
struct IrqState {
    msix: Msix,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    isr: u8,
    intx_disabled: bool,
}

/// How a virtio device behind this transport raises interrupts.
pub struct VirtioPciInterrupt {
    state: Mutex<IrqState>,
    intx: EventFd,
    /// Signalled by KVM at the guest's EOI of the INTx line; the device worker watches it.
    resample: EventFd,
}

impl VirtioPciInterrupt {
    fn lock(&self) -> MutexGuard<'_, IrqState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self, st: &mut IrqState, vector: u16, isr: u8) -> io::Result<()> {
        if st.msix.enabled() {
            if vector == NO_VECTOR {
                return Ok(());
            }
            return st.msix.trigger(usize::from(vector));
        }
        st.isr |= isr;
        if st.intx_disabled {
            return Ok(());
        }
        self.intx.write(1)
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        let mut st = self.lock();
        match kind {
            VirtioInterruptType::Queue(q) => {
                let v = st
                    .queue_vectors
                    .get(usize::from(q))
                    .copied()
                    .unwrap_or(NO_VECTOR);
                self.raise(&mut st, v, ISR_QUEUE)
            }
            VirtioInterruptType::Config => {
                let v = st.config_vector;
                self.raise(&mut st, v, ISR_CONFIG)
            }
        }
    }

    fn resample_event(&self) -> Option<&EventFd> {
        Some(&self.resample)
    }

    /// After an EOI of the INTx line: re-assert it while the ISR still has bits set.
    fn resample(&self) {
        let st = self.lock();
        if st.isr != 0 && !st.msix.enabled() && !st.intx_disabled {
            let _ = self.intx.write(1);
        }
    }
}

/// The driver-visible configuration of one queue.
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max: u16) -> Self {
        Self {
            max,
            size: max,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfig,
    msix_cap: usize,
    pci_cfg_cap: usize,
    device: Runner<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioPciInterrupt>,
    ioevents: Arc<dyn IoEventRegistry>,
    kicks: Vec<EventFd>,
    /// Where the kick ioeventfds are registered (BAR 0's address while decoded).
    notify_base: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    /// Guest-triggered warnings (failed activations, BARs moved onto taken addresses).
    log: RateLimit,
}

/// Does `[off, off + len)` overlap `r`?
fn overlaps(off: usize, len: usize, r: Range<usize>) -> bool {
    off < r.end && off.saturating_add(len) > r.start
}

fn class_of(device_type: u32) -> u32 {
    match device_type {
        super::TYPE_NET => 0x02_00_00,
        super::TYPE_BLOCK => 0x01_80_00,
        _ => 0xff_00_00,
    }
}

/// A virtio PCI capability body (after ID and next): cap_len, cfg_type, bar, id, padding,
/// offset, length, then `extra`.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, BAR as u8, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPciDevice {
    /// Wraps `device`. `intx` must be registered by the caller as an irqfd on the slot's INTx
    /// GSI whose resample eventfd is signalled at EOI (vmm/irqchip.rs); `router` allocates one MSI-X vector per queue plus one.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        router: Arc<dyn MsiRouter>,
        ioevents: Arc<dyn IoEventRegistry>,
        intx: IntxLine,
    ) -> Result<Self, VirtioPciError> {
        let maxes = device.queue_max_sizes().to_vec();
        let nq = maxes.len();
        if nq == 0 || nq > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(nq));
        }
        for (i, &m) in maxes.iter().enumerate() {
            if !m.is_power_of_two() || m > 32768 {
                return Err(VirtioPciError::QueueSize(i, m));
            }
        }
        let ty = device.device_type();
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(ty as u16),
            revision: 1,
            class: class_of(ty),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            interrupt_pin: 1,
        });
        config.add_bar(
            BAR,
            BarSpec {
                size: BAR_SIZE,
                kind: BarKind::Mem64,
                prefetchable: false,
            },
        )?;
        let msix = Msix::new(nq + 1, router).map_err(VirtioPciError::Msix)?;
        let caps: [(u8, u64, u64, Vec<u8>); 4] = [
            (CAP_COMMON, COMMON_OFF, COMMON_LEN as u64, vec![]),
            (
                CAP_NOTIFY,
                NOTIFY_OFF,
                nq as u64 * u64::from(NOTIFY_MULTIPLIER),
                NOTIFY_MULTIPLIER.to_le_bytes().to_vec(),
            ),
            (CAP_ISR, ISR_OFF, 1, vec![]),
            (CAP_DEVICE, DEVICE_OFF, REGION, vec![]),
        ];
        for (ty, off, len, extra) in caps {
            config.add_capability(CAP_VENDOR, &virtio_cap(ty, off, len, &extra), &[])?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window are writable.
        let mut wmask = vec![0u8; 18];
        wmask[2] = 0xff;
        wmask[6..18].fill(0xff);
        let pci_cfg_cap =
            config.add_capability(CAP_VENDOR, &virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]), &wmask)?;
        let (body, wmask) = msix.capability(BAR as u8, MSIX_TABLE_OFF as u32, MSIX_PBA_OFF as u32);
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &wmask)?;

        let kicks = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(VirtioPciError::EventFd)?;
        let interrupt = Arc::new(VirtioPciInterrupt {
            state: Mutex::new(IrqState {
                msix,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; nq],
                isr: 0,
                intx_disabled: false,
            }),
            intx: intx.irqfd,
            resample: intx.resample,
        });
        Ok(Self {
            config,
            msix_cap,
            pci_cfg_cap,
            device: Runner::new(device),
            mem,
            interrupt,
            ioevents,
            kicks,
            notify_base: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: maxes.into_iter().map(QueueConfig::new).collect(),
            log: RateLimit::new(5),
        })
    }

    /// What the transport offers: the device's features, always with VIRTIO_F_VERSION_1.
    fn device_features(&self) -> u64 {
        self.device.device().features() | VIRTIO_F_VERSION_1
    }

    /// The device status as the driver reads it: DEVICE_NEEDS_RESET is set when the device
    /// failed to start or its worker failed since.
    pub fn status(&self) -> u8 {
        let failed = self.status & STATUS_DRIVER_OK != 0 && self.device.needs_reset();
        self.status | if failed { STATUS_NEEDS_RESET } else { 0 }
    }

    fn queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// Back to the power-on state of the virtio device (MSI-X, a PCI feature, is untouched).
    fn reset(&mut self) {
        // The worker is stopped and joined; its clones of the kick eventfds go with it.
        drop(self.device.reset());
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max);
        }
        let mut st = self.interrupt.lock();
        st.config_vector = NO_VECTOR;
        st.queue_vectors.fill(NO_VECTOR);
        st.isr = 0;
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        let _ = self.interrupt.trigger(VirtioInterruptType::Config);
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = (v & !STATUS_NEEDS_RESET) | (old & STATUS_NEEDS_RESET);
        if new & old != old {
            log::debug!("virtio-pci: driver cleared status bits ({old:#x} -> {v:#x}), ignored");
            return;
        }
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                log::debug!(
                    "virtio-pci: refusing FEATURES_OK: driver features {:#x}, offered {offered:#x}",
                    self.driver_features
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        self.status = new;
        if added & STATUS_DRIVER_OK != 0 {
            if new & STATUS_FEATURES_OK == 0 {
                log::debug!("virtio-pci: DRIVER_OK without FEATURES_OK");
                self.needs_reset();
                return;
            }
            if let Err(e) = self.activate() {
                let name = self.device.device().name();
                self.log
                    .warn(|| format!("virtio-pci {name}: cannot activate the device: {e}"));
                self.needs_reset();
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready {
                continue;
            }
            let mut queue = Queue::new(q.max).map_err(|e| format!("queue {i}: {e:?}"))?;
            queue
                .try_set_size(q.size)
                .map_err(|e| format!("queue {i}: size {}: {e:?}", q.size))?;
            queue
                .try_set_desc_table_address(GuestAddress(q.desc))
                .map_err(|e| format!("queue {i}: descriptor table: {e:?}"))?;
            queue
                .try_set_avail_ring_address(GuestAddress(q.driver))
                .map_err(|e| format!("queue {i}: driver area: {e:?}"))?;
            queue
                .try_set_used_ring_address(GuestAddress(q.device))
                .map_err(|e| format!("queue {i}: device area: {e:?}"))?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(format!("queue {i}: rings outside guest memory"));
            }
            let kick = self.kicks[i]
                .try_clone()
                .map_err(|e| format!("queue {i}: {e}"))?;
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        self.device
            .activate(
                self.mem.clone(),
                self.driver_features,
                active,
                self.interrupt.clone(),
            )
            .map_err(|e| e.to_string())
    }

    /// The common configuration structure as the driver sees it now.
    fn common_image(&self) -> [u8; COMMON_LEN] {
        let mut b = [0u8; COMMON_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        let features = match self.device_feature_select {
            0 => self.device_features() as u32,
            1 => (self.device_features() >> 32) as u32,
            _ => 0,
        };
        let driver = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        let st = self.interrupt.lock();
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(0x04, &features.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(0x0c, &driver.to_le_bytes());
        put(0x10, &st.config_vector.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status(), self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        let sel = usize::from(self.queue_select);
        if let Some(q) = self.queues.get(sel) {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &st.queue_vectors[sel].to_le_bytes());
            put(0x1c, &u16::from(q.ready).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes()); // queue_notify_off
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.driver.to_le_bytes());
            put(0x30, &q.device.to_le_bytes());
        }
        b
    }

    fn common_read(&self, off: u64, data: &mut [u8]) {
        let img = self.common_image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = off
                .checked_add(i as u64)
                .and_then(|o| img.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A vector number the driver asked for, or NO_VECTOR when there is no such vector.
    fn valid_vector(&self, st: &IrqState, v: u16) -> u16 {
        if usize::from(v) < st.msix.count() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        v[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let v64 = u64::from_le_bytes(v);
        let (v32, v16, v8) = (v64 as u32, v64 as u16, v64 as u8);
        let queue_locked = self.status & STATUS_DRIVER_OK != 0
            || self
                .queues
                .get(usize::from(self.queue_select))
                .is_some_and(|q| q.ready);
        match (off, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(v32)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | u64::from(v32) << 32
                    }
                    _ => {}
                }
            }
            (0x10, 2) => {
                let mut st = self.interrupt.lock();
                st.config_vector = self.valid_vector(&st, v16);
            }
            (0x14, 1) => self.set_status(v8),
            (0x16, 2) => self.queue_select = v16,
            (0x18, 2) if !queue_locked => {
                if let Some(q) = self.queue() {
                    if v16.is_power_of_two() && v16 <= q.max {
                        q.size = v16;
                    } else {
                        log::debug!("virtio-pci: invalid queue size {v16} ignored");
                    }
                }
            }
            (0x1a, 2) => {
                let sel = usize::from(self.queue_select);
                let mut st = self.interrupt.lock();
                let vec = self.valid_vector(&st, v16);
                if let Some(slot) = st.queue_vectors.get_mut(sel) {
                    *slot = vec;
                }
            }
            (0x1c, 2) if !queue_locked && v16 == 1 => {
                if let Some(q) = self.queue() {
                    q.ready = true;
                }
            }
            (0x20..=0x37, 4 | 8) if !queue_locked && off % 4 == 0 => {
                let Some(q) = self.queue() else { return };
                let field = match off & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.driver,
                    _ => &mut q.device,
                };
                if data.len() == 8 {
                    *field = v64;
                } else if off % 8 == 0 {
                    *field = (*field & !0xffff_ffff) | u64::from(v32);
                } else {
                    *field = (*field & 0xffff_ffff) | u64::from(v32) << 32;
                }
            }
            _ => log::debug!(
                "virtio-pci: ignored common config write at {off:#x}, {} bytes",
                data.len()
            ),
        }
    }

    /// Registers the kick ioeventfds where BAR 0 is decoded now (and drops the old ones).
    fn sync_ioevents(&mut self) {
        let want = self
            .config
            .bar_addr(BAR)
            .filter(|a| *a != 0 && self.config.memory_enabled());
        if want == self.notify_base {
            return;
        }
        for (q, fd) in self.kicks.iter().enumerate() {
            let off = NOTIFY_OFF + q as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Some(old) = self.notify_base {
                let _ = self.ioevents.unregister(old + off, fd);
            }
            if let Some(new) = want {
                if let Err(e) = self.ioevents.register(new + off, fd) {
                    self.log.warn(|| {
                        format!(
                            "virtio-pci {}: queue {q}: no ioeventfd at {:#x}: {e}",
                            self.device.device().name(),
                            new + off
                        )
                    });
                }
            }
        }
        self.notify_base = want;
    }

    /// (bar, offset, length, data offset) of the VIRTIO_PCI_CAP_PCI_CFG window.
    fn pci_cfg_window(&self) -> (u8, u64, usize, usize) {
        let r = self.config.regs();
        let c = self.pci_cfg_cap;
        let u32_at = |o: usize| u32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
        (
            r[c + 4],
            u64::from(u32_at(c + 8)),
            u32_at(c + 12) as usize,
            c + 16,
        )
    }

    fn pci_cfg_access(&mut self, write: bool) {
        let (bar, off, len, data_off) = self.pci_cfg_window();
        if usize::from(bar) != BAR || !matches!(len, 1 | 2 | 4) {
            return;
        }
        let mut buf = [0u8; 4];
        if write {
            buf.copy_from_slice(&self.config.regs()[data_off..data_off + 4]);
            self.bar_write(BAR, off, &buf[..len]);
        } else {
            self.bar_read(BAR, off, &mut buf[..len]);
            self.config.set_regs(data_off, &buf);
        }
    }
}

impl VirtioPciDevice {
    /// Is this BAR write the driver's device reset (device_status = 0 while not reset)?
    fn is_reset_write(&self, bar: usize, off: u64, data: &[u8]) -> bool {
        bar == BAR && off == COMMON_OFF + 0x14 && data == [0] && self.status != 0
    }
}

/// A [`VirtioPciDevice`] as bus 0 holds it: its own lock, and a driver reset that stops the
/// device worker *outside* that lock, so a vCPU reading this device's registers meanwhile
/// (or the worker raising an interrupt) is never stuck behind a slow disk. (A reset written
/// through the VIRTIO_PCI_CAP_PCI_CFG window, which only firmware uses, still joins under the
/// lock: it arrives as a configuration write.)
pub struct VirtioPci {
    state: Mutex<VirtioPciDevice>,
}

impl VirtioPci {
    pub fn new(dev: VirtioPciDevice) -> Self {
        Self {
            state: Mutex::new(dev),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VirtioPciDevice> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::devices::pci::PciFunction for VirtioPci {
    fn config_read(&self, reg: u16, data: &mut [u8]) {
        self.lock().config_read(reg, data)
    }
    fn config_write(&self, reg: u16, data: &[u8]) {
        self.lock().config_write(reg, data)
    }
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        self.lock().bar_read(bar, offset, data)
    }
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        let mut st = self.lock();
        if st.is_reset_write(bar, offset, data) {
            if let Some(worker) = st.device.take_worker() {
                // The status stays as it was until the reset below completes.
                drop(st);
                let handler = worker.stop();
                st = self.lock();
                st.device.park(handler);
            }
        }
        st.bar_write(bar, offset, data)
    }
    fn bar_specs(&self) -> Vec<(usize, BarSpec)> {
        self.lock().config.bar_specs()
    }
    fn assign_bar(&self, bar: usize, addr: u64) {
        self.lock().assign_bar(bar, addr)
    }
    fn decoded_bars(&self) -> Vec<crate::devices::pci::DecodedBar> {
        crate::devices::pci::decoded_bars(&self.lock().config)
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        let reg = usize::from(reg);
        let window = self.pci_cfg_cap + 16..self.pci_cfg_cap + 20;
        if overlaps(reg, data.len(), window) {
            self.pci_cfg_access(false);
        }
        self.config.read(reg, data);
    }

    fn config_write(&mut self, reg: u16, data: &[u8]) {
        let reg = usize::from(reg);
        self.config.write(reg, data);
        let ctrl_at = self.msix_cap + msix::CAP_CONTROL;
        let r = self.config.regs();
        let ctrl = u16::from_le_bytes([r[ctrl_at], r[ctrl_at + 1]]);
        let intx_disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
        {
            let mut st = self.interrupt.lock();
            st.msix.set_control(ctrl);
            st.intx_disabled = intx_disabled;
        }
        if overlaps(
            reg,
            data.len(),
            self.pci_cfg_cap + 16..self.pci_cfg_cap + 20,
        ) {
            self.pci_cfg_access(true);
        }
        self.sync_ioevents();
    }

    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if bar != BAR || off.checked_add(len).is_none_or(|e| e > BAR_SIZE) {
            return;
        }
        let region = off & !(REGION - 1);
        let rel = off - region;
        if rel + len > REGION {
            return; // crosses a structure boundary
        }
        match region {
            COMMON_OFF => self.common_read(rel, data),
            ISR_OFF if rel == 0 => {
                let mut st = self.interrupt.lock();
                data[0] = st.isr;
                st.isr = 0;
            }
            DEVICE_OFF => self.device.device().read_config(rel, data),
            MSIX_TABLE_OFF => self.interrupt.lock().msix.table_read(rel, data),
            MSIX_PBA_OFF => self.interrupt.lock().msix.pba_read(rel, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        let len = data.len() as u64;
        if bar != BAR || off.checked_add(len).is_none_or(|e| e > BAR_SIZE) {
            return;
        }
        let region = off & !(REGION - 1);
        let rel = off - region;
        if rel + len > REGION {
            return;
        }
        match region {
            COMMON_OFF => self.common_write(rel, data),
            DEVICE_OFF => self.device.device_mut().write_config(rel, data),
            NOTIFY_OFF if rel % u64::from(NOTIFY_MULTIPLIER) == 0 => {
                let q = (rel / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            MSIX_TABLE_OFF => self.interrupt.lock().msix.table_write(rel, data),
            _ => {}
        }
    }

    fn assign_bar(&mut self, bar: usize, addr: u64) {
        self.config.set_bar_addr(bar, addr);
        self.sync_ioevents();
    }
}

#[cfg(test)]
mod tests;
