//! virtio-net: the TX queue (gathering a chain, the virtio-net header and its offload
//! fields as the TAP path checks them, the frame handed to the backend) and the RX queue
//! (filling guest buffers with host frames, with and without MRG_RXBUF, num_buffers) laid
//! out in guest memory from the input, served by the real device through ferrovm's worker
//! pass (`worker::serve_inline`). The host side is an in-memory backend that returns the
//! input's frames.
//! Input: features byte, backend byte, RX queue layout, TX queue layout, then frames.
#![no_main]
use libfuzzer_sys::fuzz_target;

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use ferrovm::devices::virtio::net::{self, Net, NetBackend};
use ferrovm_fuzz::{build_queue_at, queue_mem, run_device_once, Input};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct FakeTap {
    fd: EventFd,
    frames: VecDeque<Vec<u8>>,
    offloads: u32,
    tx_offloads: bool,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.frames.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, iov: &[&[u8]]) -> io::Result<usize> {
        Ok(iov.iter().map(|b| b.len()).sum())
    }
    fn supported_offloads(&self) -> u32 {
        self.offloads
    }
    fn accepts_tx_offloads(&self) -> bool {
        self.tx_offloads
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let feat = inp.u8();
    let back = inp.u8();
    let mut features = 1u64 << 32; // VERSION_1
    for (bit, f) in [
        (0, 1u64 << 29), // EVENT_IDX
        (1, net::VIRTIO_NET_F_MRG_RXBUF),
        (2, net::VIRTIO_NET_F_CSUM),
        (3, net::VIRTIO_NET_F_GUEST_CSUM),
        (4, net::VIRTIO_NET_F_HOST_TSO4 | net::VIRTIO_NET_F_HOST_TSO6),
        (5, net::VIRTIO_NET_F_GUEST_TSO4 | net::VIRTIO_NET_F_GUEST_UFO),
        (6, 1u64 << 28), // INDIRECT_DESC
    ] {
        if feat & 1 << bit != 0 {
            features |= f;
        }
    }
    let event_idx = feat & 1 != 0;
    let mem = queue_mem();
    let Some((_rxq, rx)) = build_queue_at(&mem, &mut inp, event_idx, 0, 0x2000) else {
        return;
    };
    let Some((_txq, tx)) = build_queue_at(&mem, &mut inp, event_idx, 0x800, 0x2000) else {
        return;
    };
    let mut frames = VecDeque::new();
    while !inp.is_empty() && frames.len() < 8 {
        let len = usize::from(inp.u16() % 4096);
        frames.push_back(inp.bytes(len).to_vec());
    }
    let tap = FakeTap {
        fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        frames,
        offloads: if back & 1 != 0 { 0x1f } else { 0 },
        tx_offloads: back & 2 != 0,
    };
    let dev = Net::with_backend("fuzz0", [0x52, 0x54, 0, 0x12, 0x34, 0x56], Box::new(tap));
    // Slots in either order (the device looks the queues up by index).
    let queues = if back & 4 != 0 {
        vec![(net::TX_QUEUE, tx), (net::RX_QUEUE, rx)]
    } else {
        vec![(net::RX_QUEUE, rx), (net::TX_QUEUE, tx)]
    };
    run_device_once(Box::new(dev), &mem, features, queues);
});
