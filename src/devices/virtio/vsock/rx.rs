//! The receive queue as the muxer sees it: buffers to pop, fill and return.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::packet::{Header, RxBuffer};
use crate::devices::virtio::{DeviceError, DrainGuard};

/// The guest's receive queue during one fill.
pub struct Rx<'a> {
    mem: &'a GuestMemoryMmap,
    queue: &'a mut Queue,
    guard: DrainGuard,
    /// Whether any buffer was returned (the caller then may owe an interrupt).
    pub used_any: bool,
}

fn ring(e: virtio_queue::Error) -> DeviceError {
    DeviceError::new(format!("vsock rx queue: {e:?}"))
}

impl<'a> Rx<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, queue: &'a mut Queue) -> Self {
        Rx {
            mem,
            queue,
            guard: DrainGuard::default(),
            used_any: false,
        }
    }

    /// The next usable receive buffer; None when the guest has posted none (notifications
    /// are then enabled, so its next post kicks the device). Malformed chains are returned
    /// empty and skipped.
    pub fn pop(&mut self) -> Result<Option<(u16, RxBuffer)>, DeviceError> {
        loop {
            let Some(chain) = self.queue.pop_descriptor_chain(self.mem) else {
                if !self.queue.enable_notification(self.mem).map_err(ring)? {
                    return Ok(None);
                }
                if !self.guard.go_again(false) {
                    return Err(DeviceError::new(
                        "vsock rx queue: available index ahead of readable chains",
                    ));
                }
                continue;
            };
            self.guard.popped();
            let head = chain.head_index();
            match RxBuffer::new(chain) {
                Ok(buf) => return Ok(Some((head, buf))),
                Err(_) => self.discard(head)?,
            }
        }
    }

    /// Puts the last popped buffer back (nothing to write into it after all).
    pub fn undo(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Returns a buffer with nothing written.
    pub fn discard(&mut self, head: u16) -> Result<(), DeviceError> {
        self.queue.add_used(self.mem, head, 0).map_err(ring)?;
        self.used_any = true;
        Ok(())
    }

    /// Writes one packet into `buf` and returns it to the guest.
    pub fn deliver(
        &mut self,
        head: u16,
        buf: &RxBuffer,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<(), DeviceError> {
        let len = buf.write(self.mem, hdr, payload).unwrap_or(0);
        self.queue.add_used(self.mem, head, len).map_err(ring)?;
        self.used_any = true;
        Ok(())
    }

    /// Whether the guest wants an interrupt for the buffers returned.
    pub fn needs_notification(&mut self) -> Result<bool, DeviceError> {
        self.queue.needs_notification(self.mem).map_err(ring)
    }
}
