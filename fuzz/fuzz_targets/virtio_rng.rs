//! virtio-rng: the fuzz input lays out the one queue in guest memory; the device (served by
//! ferrovm's worker pass, `worker::serve_inline`, on the fuzz thread) fills every writable
//! buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;

use ferrovm::devices::virtio::rng::Rng;
use ferrovm_fuzz::{build_queue, queue_mem, run_device_once, Input};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let features = if inp.bool() { 1u64 << 29 } else { 0 } | 1 << 32;
    let mem = queue_mem();
    let Some((_vq, q)) = build_queue(&mem, &mut inp, features & 1 << 29 != 0) else {
        return;
    };
    run_device_once(Box::new(Rng::new()), &mem, features, vec![(0, q)]);
});
