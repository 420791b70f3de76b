//! fw_cfg: a sequence of port accesses (selector at 0, data at 1, DMA address at 4/8, with
//! any access size) on a device with the usual items and a few files, DMA into a real
//! `GuestMemoryMmap` whose contents (the FWCfgDmaAccess structures) come from the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

use ferrovm::bus::BusDeviceMut;
use ferrovm::devices::fw_cfg::FwCfg;
use ferrovm_fuzz::{access_size, Input};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8000),
        (GuestAddress(0x8000), 0x8000),
    ])
    .unwrap();
    let nops = usize::from(inp.u8() % 64);
    let ops = inp.bytes(nops * 10);
    let _ = mem.write_slice(inp.bytes(0x1000), GuestAddress(0));
    let with_dma = ops.first().is_none_or(|b| b & 0x80 == 0);
    let mut fw = FwCfg::new(1 << 30, 2, with_dma.then(|| mem.clone()));
    let _ = fw.add_file("etc/fuzz", (0..300u16).map(|i| i as u8).collect());
    let _ = fw.add_file("opt/empty", Vec::new());
    let _ = fw.add_file("etc/table-loader", vec![1; 4096]);
    let mut ops = Input::new(ops);
    while !ops.is_empty() {
        let kind = ops.u8();
        let size = access_size(kind >> 1);
        let offset = u64::from(ops.u8() % 16);
        let value = ops.u64().to_le_bytes();
        if kind & 1 == 0 {
            let mut buf = [0u8; 8];
            fw.read(offset, &mut buf[..size]);
        } else {
            fw.write(offset, &value[..size]);
        }
    }
});
