//! virtio-rng (entropy device, type 4): one queue; every device-writable buffer the driver
//! posts is filled from the host's /dev/urandom. Small, and exercises the whole transport.

use std::fs::File;
use std::io::Read;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{
    ActivateError, DeviceError, DrainGuard, VirtioDevice, VirtioHandler, WorkerCtx,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// virtio device type of the entropy device.
pub const TYPE_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most (the rest of a larger buffer is left untouched).
const MAX_REQUEST: usize = 64 << 10;

/// The entropy device. It owns nothing but its configuration: each activation gets a fresh
/// handle on /dev/urandom.
pub struct Rng {
    name: String,
}

impl Rng {
    pub fn new() -> Self {
        let n = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            name: format!("virtio-rng-{n}"),
        }
    }
}

static INSTANCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        mut queues: Vec<(u16, Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 1,
            });
        }
        let (index, queue) = queues.remove(0);
        let urandom = File::open("/dev/urandom").map_err(ActivateError::Worker)?;
        Ok(Box::new(RngHandler {
            mem,
            queue,
            index,
            urandom,
            buf: vec![0u8; MAX_REQUEST],
        }))
    }
}

/// Serves the one queue from /dev/urandom.
struct RngHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    index: u16,
    urandom: File,
    buf: Vec<u8>,
}

impl VirtioHandler for RngHandler {
    fn queue_event(&mut self, _slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        if drain(&self.mem, &mut self.queue, &mut self.urandom, &mut self.buf)? {
            ctx.signal_used(self.index).map_err(DeviceError::new)?;
        }
        Ok(())
    }
}

/// Answers every available buffer. Returns whether the driver wants an interrupt.
fn drain(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    urandom: &mut File,
    buf: &mut [u8],
) -> Result<bool, DeviceError> {
    let ring = |e: virtio_queue::Error| DeviceError::new(format!("queue: {e:?}"));
    let mut guard = DrainGuard::default();
    loop {
        queue.disable_notification(mem).map_err(ring)?;
        let mut popped = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped += 1;
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                if !desc.is_write_only() || written >= buf.len() {
                    continue;
                }
                let n = (desc.len() as usize).min(buf.len() - written);
                let chunk = &mut buf[..n];
                if urandom.read_exact(chunk).is_err()
                    || mem.write_slice(chunk, desc.addr()).is_err()
                {
                    break;
                }
                written += n;
            }
            queue.add_used(mem, head, written as u32).map_err(ring)?;
        }
        if !queue.enable_notification(mem).map_err(ring)? {
            break;
        }
        if !guard.go_again(popped > 0) {
            return Err(DeviceError::new("available index ahead of readable chains"));
        }
    }
    queue.needs_notification(mem).map_err(ring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn fills_buffers_and_stops_on_an_avail_index_no_chain_backs() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let d = RawDescriptor::from(SplitDescriptor::new(
            0x8000,
            64,
            VRING_DESC_F_WRITE as u16,
            0,
        ));
        vq.add_desc_chains(&[d], 0).unwrap();
        let mut q = vq.create_queue().unwrap();
        let mut urandom = File::open("/dev/urandom").unwrap();
        let mut buf = vec![0u8; MAX_REQUEST];
        drain(&mem, &mut q, &mut urandom, &mut buf).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 64);
        // A hostile driver moves the index far past the ring: an error, not a spin.
        vq.avail().idx().store(1000);
        assert!(drain(&mem, &mut q, &mut urandom, &mut buf).is_err());
    }
}
