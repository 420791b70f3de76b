//! virtio-vsock packets: TX chains parsed by `vsock::packet::read_packet` (header split
//! across descriptors, payload length checks) and RX chains turned into `RxBuffer`s and
//! written (header + payload) back into guest memory, on a fuzzed split queue in a real
//! `GuestMemoryMmap`. (The whole device, `Vsock::new`, listens on host sockets: not here.)
#![no_main]
use libfuzzer_sys::fuzz_target;

use ferrovm::devices::virtio::vsock::packet::{read_packet, Header, RxBuffer, HDR_LEN};
use ferrovm_fuzz::{build_queue, queue_mem, Input};
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let mem = queue_mem();
    let Some((_vq, mut q)) = build_queue(&mem, &mut inp, false) else {
        return;
    };
    let mut payload = Vec::new();
    let mut last = Header::from_bytes(&[0u8; HDR_LEN]);
    for i in 0..8 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        if sel >> i & 1 == 0 {
            if let Ok(h) = read_packet(&mem, chain, &mut payload) {
                last = h;
            }
        } else if let Ok(rx) = RxBuffer::new(chain) {
            let _ = rx.payload_room();
            let _ = rx.write(&mem, &last, &payload);
        }
        let _ = q.add_used(&mem, head, 0);
    }
});
