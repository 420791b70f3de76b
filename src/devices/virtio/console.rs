//! virtio-console (device type 3), one port: the guest's `hvc0` (`--console virtio`).
//!
//! A console without an exit per character: the guest hands its output over in whole
//! buffers on the transmit queue (1), and typed input arrives in buffers it posted on the
//! receive queue (0). No optional feature is offered (no multiport, no size, no emergency
//! write), so the configuration space is all zeros.
//!
//! Output goes to the same writer as the serial port's (stdout, a file, or nowhere, and the
//! console watch that spots a kernel panic). Input comes from the console's stdin reader
//! through a [`ConsoleInbox`]: a bounded byte queue with an eventfd that wakes the worker;
//! when it is full the reader waits, so a guest that never reads costs at most its bound.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, DeviceError, DrainGuard, VirtioDevice, VirtioHandler, WorkerCtx,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// virtio device type of the console.
pub const TYPE_CONSOLE: u32 = 3;
const QUEUE_SIZE: u16 = 256;
const RX: u16 = 0;
const TX: u16 = 1;
/// Guest-bound bytes held at most (the stdin reader waits beyond this).
const INBOX_LEN: usize = 4096;
/// Bytes of one transmit chain written out at most (the rest is dropped, the chain used).
const MAX_TX_CHAIN: usize = 64 << 10;

/// The console's output: shared with the serial port, which writes to it too.
pub type ConsoleOut = Arc<Mutex<Box<dyn Write + Send>>>;

/// A [`Write`] over a shared console output (what the serial port is given).
pub struct SharedOut(pub ConsoleOut);

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// Typed input on its way to the guest.
pub struct ConsoleInbox {
    bytes: Mutex<VecDeque<u8>>,
    ready: EventFd,
}

impl ConsoleInbox {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            bytes: Mutex::new(VecDeque::new()),
            ready: EventFd::new(EFD_NONBLOCK)?,
        }))
    }
}

impl crate::console::ConsoleInput for ConsoleInbox {
    /// Queues what fits of `bytes` and wakes the worker; returns how many were taken.
    fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut q = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let n = (INBOX_LEN - q.len()).min(bytes.len());
        q.extend(&bytes[..n]);
        drop(q);
        if n > 0 {
            let _ = self.ready.write(1);
        }
        n
    }
}

/// The console device.
pub struct Console {
    out: ConsoleOut,
    inbox: Arc<ConsoleInbox>,
    name: String,
}

impl Console {
    pub fn new(out: ConsoleOut, inbox: Arc<ConsoleInbox>) -> Self {
        Self {
            out,
            inbox,
            name: "virtio-console-0".into(),
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // cols, rows, max_nr_ports, emerg_wr: none offered
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<(u16, Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        let got = queues.len();
        let mut it = queues.into_iter();
        let (Some((RX, rx)), Some((TX, tx)), None) = (it.next(), it.next(), it.next()) else {
            return Err(ActivateError::QueueCount { got, want: 2 });
        };
        Ok(Box::new(ConsoleHandler {
            mem,
            rx,
            tx,
            out: self.out.clone(),
            inbox: self.inbox.clone(),
            buf: vec![0u8; MAX_TX_CHAIN],
        }))
    }
}

struct ConsoleHandler {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    out: ConsoleOut,
    inbox: Arc<ConsoleInbox>,
    buf: Vec<u8>,
}

fn ring(e: virtio_queue::Error) -> DeviceError {
    DeviceError::new(format!("queue: {e:?}"))
}

impl ConsoleHandler {
    /// Writes every transmit chain out. Returns whether the driver wants an interrupt.
    fn transmit(&mut self) -> Result<bool, DeviceError> {
        let mut guard = DrainGuard::default();
        let mem = &self.mem;
        loop {
            self.tx.disable_notification(mem).map_err(ring)?;
            let mut popped = 0;
            while let Some(chain) = self.tx.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let mut len = 0usize;
                for desc in chain {
                    if desc.is_write_only() || len >= self.buf.len() {
                        continue;
                    }
                    let n = (desc.len() as usize).min(self.buf.len() - len);
                    if mem
                        .read_slice(&mut self.buf[len..len + n], desc.addr())
                        .is_err()
                    {
                        break; // outside guest RAM: what came before is still written
                    }
                    len += n;
                }
                let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
                let _ = out.write_all(&self.buf[..len]);
                let _ = out.flush();
                drop(out);
                self.tx.add_used(mem, head, 0).map_err(ring)?;
            }
            if !self.tx.enable_notification(mem).map_err(ring)? {
                break;
            }
            if !guard.go_again(popped > 0) {
                return Err(DeviceError::new(
                    "transmit queue: available index ahead of chains",
                ));
            }
        }
        self.tx.needs_notification(mem).map_err(ring)
    }

    /// Moves queued input into receive buffers while both exist. Returns whether the driver
    /// wants an interrupt.
    fn receive(&mut self) -> Result<bool, DeviceError> {
        let mem = &self.mem;
        let mut used = false;
        let mut q = self.inbox.bytes.lock().unwrap_or_else(|e| e.into_inner());
        while !q.is_empty() {
            let Some(chain) = self.rx.pop_descriptor_chain(mem) else {
                break; // the bytes wait for the next buffer the guest posts
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain {
                if !desc.is_write_only() || q.is_empty() {
                    continue;
                }
                let n = (desc.len() as usize).min(q.len());
                let chunk: Vec<u8> = q.iter().take(n).copied().collect();
                if mem.write_slice(&chunk, desc.addr()).is_err() {
                    break;
                }
                q.drain(..n);
                written += n as u32;
            }
            self.rx.add_used(mem, head, written).map_err(ring)?;
            used = true;
        }
        drop(q);
        if !used {
            return Ok(false);
        }
        self.rx.needs_notification(mem).map_err(ring)
    }
}

impl VirtioHandler for ConsoleHandler {
    fn queue_event(&mut self, slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let (notify, index) = match slot as u16 {
            RX => (self.receive()?, RX),
            _ => (self.transmit()?, TX),
        };
        if notify {
            ctx.signal_used(index).map_err(DeviceError::new)?;
        }
        Ok(())
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.inbox.ready.as_raw_fd()]
    }

    fn backend_event(&mut self, _id: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let _ = self.inbox.ready.read();
        if self.receive()? {
            ctx.signal_used(RX).map_err(DeviceError::new)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::ConsoleInput;
    use crate::devices::virtio::test_chains::add_chain;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn handler(
        mem: &GuestMemoryMmap,
        rxq: Queue,
        txq: Queue,
    ) -> (ConsoleHandler, Arc<Mutex<Vec<u8>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out: ConsoleOut = Arc::new(Mutex::new(Box::new(Capture(seen.clone()))));
        let inbox = ConsoleInbox::new().unwrap();
        let mut dev = Console::new(out, inbox);
        let h = dev
            .activate(mem.clone(), 0, vec![(RX, rxq), (TX, txq)])
            .unwrap();
        let h = crate::devices::virtio::worker::downcast::<ConsoleHandler>(h).unwrap();
        (*h, seen)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn transmit_writes_whole_chains_and_skips_what_is_outside_ram() {
        let m = mem();
        let rx = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&m, GuestAddress(0x4000), 16);
        m.write_slice(b"hello ", GuestAddress(0x10000)).unwrap();
        m.write_slice(b"hvc0\n", GuestAddress(0x11000)).unwrap();
        add_chain(&tx, 0, &[(0x10000, 6, false), (0x11000, 5, false)]);
        // A descriptor far outside guest RAM: the chain is used, nothing is written for it.
        add_chain(&tx, 2, &[(0xffff_0000, 100, false)]);
        let (mut h, seen) = handler(&m, rx.create_queue().unwrap(), tx.create_queue().unwrap());
        h.transmit().unwrap();
        assert_eq!(&*seen.lock().unwrap(), b"hello hvc0\n");
        assert_eq!(tx.used().idx().load(), 2);
    }

    #[test]
    fn input_waits_for_buffers_and_the_inbox_is_bounded() {
        let m = mem();
        let rx = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&m, GuestAddress(0x4000), 16);
        let (mut h, _) = handler(&m, rx.create_queue().unwrap(), tx.create_queue().unwrap());
        assert_eq!(h.inbox.enqueue_input(b"ls\r"), 3);
        assert!(!h.receive().unwrap(), "no buffer yet: nothing used");
        assert_eq!(h.inbox.enqueue_input(&[b'x'; 8192]), INBOX_LEN - 3);
        assert_eq!(h.inbox.enqueue_input(b"y"), 0, "full");
        add_chain(&rx, 0, &[(0x20000, 2, true)]);
        add_chain(&rx, 1, &[(0x21000, 1, true)]);
        h.receive().unwrap();
        let mut got = [0u8; 3];
        m.read_slice(&mut got[..2], GuestAddress(0x20000)).unwrap();
        m.read_slice(&mut got[2..], GuestAddress(0x21000)).unwrap();
        assert_eq!(&got, b"ls\r");
        assert_eq!(rx.used().idx().load(), 2);
        assert_eq!(h.inbox.enqueue_input(b"abc"), 3, "room again");
    }
}
