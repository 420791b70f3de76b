//! virtio devices and the transport-independent interface between a device model (block, net)
//! and its transport (virtio-pci).
//!
//! The transport owns the feature negotiation, the device status state machine and the queue
//! configuration registers. When the driver sets DRIVER_OK it hands the device its queues,
//! each with the eventfd the guest kicks (a KVM ioeventfd, so kicks never exit to userspace)
//! and an interrupt handle (an irqfd behind MSI-X or INTx). The device serves requests on its
//! own worker thread, off the vCPU threads. On reset the transport takes everything back.

pub mod block;
pub mod chain;
pub mod console;
pub mod daemon;
pub mod fs;

pub mod net;
pub mod passt;
pub mod pci;
pub mod rng;
pub mod scsi;
pub mod tap;
pub mod vhost_user;
pub mod vsock;
pub mod worker;

pub use worker::{DeviceError, Runner, VirtioHandler, WorkerCtx};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// virtio device type IDs (virtio 1.x, 5 "Device Types").
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

/// Feature bits common to all devices.
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Bounds a queue drain loop against a driver whose available index runs ahead of any chain
/// that can be popped. After a pass, when the queue announces more work: a pass that popped
/// nothing once is a normal race (the driver published a chain between the last pop and
/// re-enabling notifications; the next pass gets it), twice in a row is a ring no chain backs,
/// and the device must stop rather than spin.
#[derive(Debug, Default)]
pub struct DrainGuard {
    empty_passes: u8,
}

impl DrainGuard {
    /// Call when the queue announces more work after a pass that popped `popped_any`.
    /// Returns false when the loop must stop: the ring is stuck.
    pub fn go_again(&mut self, popped_any: bool) -> bool {
        if popped_any {
            self.popped();
        } else {
            self.empty_passes += 1;
        }
        self.empty_passes < 2
    }

    /// Records a successful pop (for loops that check after each pop, not each pass).
    pub fn popped(&mut self) {
        self.empty_passes = 0;
    }
}

/// Copies `data.len()` bytes of a device's configuration space from `offset`; bytes past its
/// end read as 0 (what a driver reading a wider field than exists gets).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Which interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// A used buffer was added to queue `n`.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// How a device raises interrupts; implemented by the transport (MSI-X vector or INTx + ISR).
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()>;
    /// For a level-triggered line: signalled at the guest's EOI; the worker then calls
    /// [`VirtioInterrupt::resample`].
    fn resample_event(&self) -> Option<&EventFd> {
        None
    }
    /// Re-asserts the line if the interrupt condition still holds.
    fn resample(&self) {}
}

/// One configured queue, handed to the device at activation.
pub struct ActiveQueue {
    /// The queue index (0-based).
    pub index: u16,
    /// The ring addresses, size, and EVENT_IDX state as the driver configured them.
    pub queue: virtio_queue::Queue,
    /// Written by KVM when the guest writes this queue's notify address.
    pub kick: EventFd,
}

/// Descriptor chains for device unit tests.
#[cfg(test)]
pub mod test_chains {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    /// Writes a chain of (addr, len, device-writable) descriptors at table index `start` and
    /// makes it available.
    pub fn add_chain(q: &MockSplitQueue<GuestMemoryMmap>, start: u16, descs: &[(u64, u32, bool)]) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, start + i as u16 + 1))
            })
            .collect();
        q.add_desc_chains(&raw, start).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::DrainGuard;

    #[test]
    fn drain_guard_allows_one_empty_pass_in_a_row() {
        let mut g = DrainGuard::default();
        assert!(g.go_again(true));
        assert!(g.go_again(false), "one empty pass is a race");
        assert!(g.go_again(true), "a pop resets the count");
        assert!(g.go_again(false));
        assert!(!g.go_again(false), "two empty passes in a row: stuck");
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver configured {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("cannot start the device worker")]
    Worker(#[source] std::io::Error),
    #[error("the device is already active")]
    AlreadyActive,
    #[error("queue {index} is not usable (not ready, or rings outside guest memory)")]
    InvalidQueue { index: u16 },
}

/// A virtio device model (block, net, rng), independent of the transport. It owns no thread:
/// on activation it returns a [`VirtioHandler`] that the one worker lifecycle ([`Runner`]) runs.
pub trait VirtioDevice: Send {
    /// The virtio device type (`TYPE_BLOCK`, ...).
    fn device_type(&self) -> u32;
    /// A short name for logs and the worker thread (`virtio-blk-0`, ...).
    fn name(&self) -> String;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Builds the handler that serves `queues` (virtio index, configured queue) with the
    /// features the driver accepted. The worker calls it with the queue's position in this list.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<(u16, virtio_queue::Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError>;
    /// Takes the handler back after its worker stopped (a device keeps its backend this way).
    fn deactivate(&mut self, _handler: Box<dyn VirtioHandler>) {}
}
