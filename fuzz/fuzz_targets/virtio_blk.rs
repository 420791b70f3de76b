//! virtio-blk request chains: the fuzz input lays out the descriptor table (addresses,
//! lengths, NEXT/WRITE/INDIRECT flags, next links), the available ring and the guest memory
//! the descriptors point at (request headers, payloads, indirect tables) in a real
//! `GuestMemoryMmap`; ferrovm's `QueueHandler::process_queue` serves them against a raw
//! image on tmpfs (read-write or read-only) or an in-memory disk.
//! Input: 1 byte of options, then the queue layout (see `ferrovm_fuzz::build_queue`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

use ferrovm::devices::virtio::block::{Block, DiskConfig};
use ferrovm::disk::mem::MemDisk;
use ferrovm_fuzz::{build_queue, queue_mem, scratch_file, Input};

const DISK_LEN: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let opts = inp.u8();
    let mem = queue_mem();
    let Some((_vq, mut q)) = build_queue(&mem, &mut inp, opts & 1 != 0) else {
        return;
    };
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    let pattern = PATTERN
        .get_or_init(|| (0..DISK_LEN).map(|i| (i / 512) as u8 ^ i as u8).collect())
        .clone();
    let serial = (opts & 2 != 0).then_some("fuzz-serial-01234567");
    let blk = match opts >> 2 & 3 {
        0 => Block::with_disk(Box::new(MemDisk::new("mem", pattern)), serial),
        r => {
            let path = scratch_file("blk.raw", &pattern);
            Block::new(&DiskConfig {
                readonly: r == 1,
                serial: serial.map(str::to_string),
                ..DiskConfig::new(path)
            })
        }
    }
    .expect("open the scratch disk");
    let mut h = blk.queue_handler();
    // Twice: the second pass sees the used ring and the state the first one left.
    for _ in 0..2 {
        if h.process_queue(&mem, &mut q).is_err() {
            break;
        }
    }
    let _ = blk.stats();
});
