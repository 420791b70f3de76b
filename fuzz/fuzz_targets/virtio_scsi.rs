//! virtio-scsi with a CD-ROM: the fuzz input sets the driver-writable config (sense_size,
//! cdb_size), then lays out one queue (the request queue, or the control queue) with its
//! descriptor chains and the guest memory they point at: command headers with any LUN and
//! CDB, response and data-in buffers of any size and split. The device is activated
//! (through the worker pass, `worker::serve_inline`) and serves it against a 64 KiB ISO on tmpfs.
//! Input: 1 byte of options (bit 0 event_idx, bit 1 control queue, bit 2 set sense_size,
//! bit 3 set cdb_size; each set value is the next 4 bytes), then the queue layout (see
//! `ferrovm_fuzz::build_queue`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

use ferrovm::devices::virtio::block::DiskConfig;
use ferrovm::devices::virtio::scsi::{Scsi, CONTROL_QUEUE, REQUEST_QUEUE};
use ferrovm::devices::virtio::VirtioDevice;
use ferrovm_fuzz::{build_queue, queue_mem, run_device_once, scratch_file, Input};

const ISO_LEN: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let opts = inp.u8();
    let mut config = Vec::new();
    for (bit, offset) in [(4u8, 20u64), (8, 24)] {
        if opts & bit != 0 {
            config.push((offset, inp.u32()));
        }
    }
    let mem = queue_mem();
    let Some((_vq, q)) = build_queue(&mem, &mut inp, opts & 1 != 0) else {
        return;
    };
    // Read-only to the device, so written once per process.
    static ISO: OnceLock<std::path::PathBuf> = OnceLock::new();
    let path = ISO
        .get_or_init(|| {
            let iso: Vec<u8> = (0..ISO_LEN).map(|i| (i / 2048) as u8 ^ i as u8).collect();
            scratch_file("cd.iso", &iso)
        })
        .clone();
    let mut scsi = Scsi::new(&[DiskConfig::new(path)]).expect("open the scratch ISO");
    for (offset, v) in config {
        scsi.write_config(offset, &v.to_le_bytes());
    }
    let mut cfg = [0u8; 40];
    scsi.read_config(0, &mut cfg);
    let index = if opts & 2 != 0 {
        CONTROL_QUEUE
    } else {
        REQUEST_QUEUE
    };
    let features = if opts & 1 != 0 { 1u64 << 29 } else { 0 } | 1 << 32;
    run_device_once(Box::new(scsi), &mem, features, vec![(index, q)]);
});
