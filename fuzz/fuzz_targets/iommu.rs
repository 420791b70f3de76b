//! iommu: the VT-d unit, ferrovm's IOAPIC on top of its interrupt remapping and edu's DMA
//! through it, driven by a sequence of operations: register accesses to the unit (mostly at
//! its real registers, any size), IOAPIC register accesses, line levels and EOIs, edu BAR
//! accesses, direct DMA and remap requests with any requester ID. Guest RAM (root, context
//! and page tables, IRTEs, the invalidation queue) comes from the input; the change hook
//! refreshes the IOAPIC's routes as in the VMM, so the lock order is exercised too.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

use ferrovm::bus::BusDevice;
use ferrovm::devices::dma::{DmaSpace, InterruptRemap, MsiMessage, MsiSender};
use ferrovm::devices::edu::Edu;
use ferrovm::devices::ioapic::{Ioapic, PinRoutes};
use ferrovm::devices::pci::PciDevice;
use ferrovm::devices::vtd::Vtd;
use ferrovm::devices::IrqLevel;
use ferrovm::kvm::vcpu::EoiTarget;
use ferrovm::kvm::vm::IOAPIC_PINS;
use ferrovm_fuzz::{access_size, fakes, Input};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct Sink;
impl MsiSender for Sink {
    fn send(&self, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}
impl PinRoutes for Sink {
    fn set_pin_routes(&self, _p: [Option<MsiMessage>; IOAPIC_PINS]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Register offsets the unit decodes (the rest of the 4 KiB block is mostly reserved).
const REGS: [u64; 24] = [
    0x00, 0x08, 0x10, 0x18, 0x1c, 0x20, 0x28, 0x34, 0x38, 0x3c, 0x40, 0x44, 0x80, 0x88, 0x90,
    0x9c, 0xa0, 0xa4, 0xa8, 0xb8, 0x200, 0x208, 0x220, 0x228,
];

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    // 64 KiB of RAM at 0 and 4 KiB at 1 MiB: tables may point into the hole between.
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x10_0000), 0x1000),
    ])
    .unwrap();
    // The op list first, then guest RAM: a short input still does something.
    let ops_len = usize::from(inp.u16() % 2048);
    let mut ops = Input::new(inp.bytes(ops_len));
    let ram = inp.rest();
    let _ = mem.write_slice(&ram[..ram.len().min(0x1_0000)], GuestAddress(0));
    let vtd = Vtd::new(mem.clone(), Arc::new(Sink));
    let ioapic = Arc::new(Ioapic::new(Arc::new(Sink), Arc::new(Sink), vtd.clone()));
    let io = Arc::downgrade(&ioapic);
    vtd.set_change_hook(Box::new(move || {
        if let Some(io) = io.upgrade() {
            io.refresh_routes();
        }
    }));
    let mut edu = Edu::new(vtd.clone(), 0x10, Arc::new(fakes::Router::default()), ioapic.clone(), 18)
        .unwrap();
    edu.assign_bar(0, 0xc000_0000);
    let inp = &mut ops;
    while !inp.is_empty() {
        let kind = inp.u8();
        let size = access_size(kind >> 4);
        let sel = inp.u16();
        let value = inp.u64();
        let mut buf = [0u8; 8];
        match kind & 7 {
            0 | 1 => {
                let off = match sel & 0x8000 {
                    0 => REGS[usize::from(sel) % REGS.len()] + u64::from(sel >> 12 & 4),
                    _ => u64::from(sel) % 0x1000,
                };
                match kind & 1 {
                    0 => BusDevice::read(&*vtd, off, &mut buf[..size]),
                    _ => BusDevice::write(&*vtd, off, &value.to_le_bytes()[..size]),
                }
            }
            2 => match sel & 1 {
                0 => ioapic.read(u64::from(sel >> 1) % 0x20, &mut buf[..size]),
                _ => ioapic.write(u64::from(sel >> 1) % 0x20, &value.to_le_bytes()[..size]),
            },
            3 => {
                let _ = ioapic.set_level(u32::from(sel) % 26, value & 1 != 0);
                ioapic.eoi(value as u8 >> 1);
            }
            4 => match sel & 1 {
                0 => edu.bar_read(0, u64::from(sel >> 1) & 0xff, &mut buf[..size]),
                _ => edu.bar_write(0, u64::from(sel >> 1) & 0xff, &value.to_le_bytes()[..size]),
            },
            5 => {
                let mut b = vec![0u8; usize::from(sel) % 0x2100];
                let _ = DmaSpace::read(&*vtd, value as u16, value >> 16, &mut b);
            }
            6 => {
                let b = vec![0x5a; usize::from(sel) % 0x2100];
                let _ = DmaSpace::write(&*vtd, value as u16, value >> 16, &b);
            }
            _ => {
                let sid = (sel & 0x8000 == 0).then_some(sel);
                let msg = MsiMessage {
                    addr: 0xfee0_0000 | (value & 0xf_fffc),
                    data: (value >> 32) as u32,
                };
                let _ = vtd.remap(sid, msg);
            }
        }
        // Guest RAM changes under the unit too.
        if kind & 8 != 0 {
            let at = u64::from(inp.u16()) % 0x1_0000;
            let _ = mem.write_obj(inp.u64(), GuestAddress(at & !7));
        }
    }
});
