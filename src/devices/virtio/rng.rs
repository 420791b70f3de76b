//! virtio-rng (entropy device, type 4): one queue; every device-writable buffer the driver
//! posts is filled from the host's /dev/urandom. Small, and exercises the whole transport.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, ActiveQueue, DrainGuard, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// virtio device type of the entropy device.
pub const TYPE_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most (the rest of a larger buffer is left untouched).
const MAX_REQUEST: usize = 64 << 10;

struct Worker {
    stop: EventFd,
    thread: JoinHandle<Vec<EventFd>>,
}

/// The entropy device.
pub struct Rng {
    worker: Option<Worker>,
}

impl Rng {
    pub fn new() -> Self {
        Self { worker: None }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
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
        mut queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 1,
            });
        }
        let q = queues.remove(0);
        let urandom = File::open("/dev/urandom").map_err(ActivateError::Worker)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let stop2 = stop.try_clone().map_err(ActivateError::Worker)?;
        let thread = std::thread::Builder::new()
            .name("virtio-rng".into())
            .spawn(move || {
                let ActiveQueue {
                    index,
                    mut queue,
                    kick,
                } = q;
                serve(&mem, &mut queue, index, &kick, &stop2, urandom, &*interrupt);
                vec![kick]
            })
            .map_err(ActivateError::Worker)?;
        self.worker = Some(Worker { stop, thread });
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<EventFd>> {
        let w = self.worker.take()?;
        let _ = w.stop.write(1);
        w.thread.join().ok()
    }
}

/// Waits for kicks (or `stop`) and answers every available buffer.
fn serve(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    index: u16,
    kick: &EventFd,
    stop: &EventFd,
    mut urandom: File,
    interrupt: &dyn VirtioInterrupt,
) {
    let mut buf = vec![0u8; MAX_REQUEST];
    // After a queue error (a broken ring from the driver) kicks are ignored until reset.
    let mut broken = false;
    loop {
        // Buffers may already be waiting (the driver can kick before DRIVER_OK lands).
        if !broken {
            if let Err(e) = drain(mem, queue, &mut urandom, &mut buf, index, interrupt) {
                log::warn!("virtio-rng: queue error, ignoring the queue until reset: {e}");
                broken = true;
            }
        }
        let mut fds = [
            libc::pollfd {
                fd: kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            continue; // EINTR
        }
        if fds[1].revents != 0 {
            return;
        }
        let _ = kick.read();
    }
}

fn drain(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    urandom: &mut File,
    buf: &mut [u8],
    index: u16,
    interrupt: &dyn VirtioInterrupt,
) -> Result<(), String> {
    let mut guard = DrainGuard::default();
    loop {
        queue
            .disable_notification(mem)
            .map_err(|e| format!("{e:?}"))?;
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
            queue
                .add_used(mem, head, written as u32)
                .map_err(|e| format!("{e:?}"))?;
        }
        if !queue
            .enable_notification(mem)
            .map_err(|e| format!("{e:?}"))?
        {
            break;
        }
        if !guard.go_again(popped > 0) {
            return Err("available index ahead of readable chains".into());
        }
    }
    if queue
        .needs_notification(mem)
        .map_err(|e| format!("{e:?}"))?
    {
        interrupt
            .trigger(VirtioInterruptType::Queue(index))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    struct Count(std::sync::atomic::AtomicU32);
    impl VirtioInterrupt for Count {
        fn trigger(&self, _: VirtioInterruptType) -> std::io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }

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
        let irq = Count(Default::default());
        let mut urandom = File::open("/dev/urandom").unwrap();
        let mut buf = vec![0u8; MAX_REQUEST];
        drain(&mem, &mut q, &mut urandom, &mut buf, 0, &irq).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 64);
        // A hostile driver moves the index far past the ring: an error, not a spin.
        vq.avail().idx().store(1000);
        assert!(drain(&mem, &mut q, &mut urandom, &mut buf, 0, &irq).is_err());
    }
}
