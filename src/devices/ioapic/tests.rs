use std::sync::Mutex;

use super::*;
use crate::bus::BusDevice;
use crate::devices::dma::NoRemap;

#[derive(Default)]
struct Fake {
    routes: Mutex<Vec<[Option<MsiMessage>; IOAPIC_PINS]>>,
    sent: Mutex<Vec<MsiMessage>>,
}

impl PinRoutes for Fake {
    fn set_pin_routes(&self, pins: [Option<MsiMessage>; IOAPIC_PINS]) -> std::io::Result<()> {
        self.routes.lock().unwrap().push(pins);
        Ok(())
    }
}

impl MsiSender for Fake {
    fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
        self.sent.lock().unwrap().push(msg);
        Ok(())
    }
}

fn ioapic() -> (Arc<Fake>, Ioapic) {
    let f = Arc::new(Fake::default());
    let io = Ioapic::new(f.clone(), f.clone(), Arc::new(NoRemap));
    (f, io)
}

fn write_rte(io: &Ioapic, pin: u32, rte: u64) {
    io.write(0, &(REG_TABLE + 2 * pin + 1).to_le_bytes());
    io.write(0x10, &((rte >> 32) as u32).to_le_bytes());
    io.write(0, &(REG_TABLE + 2 * pin).to_le_bytes());
    io.write(0x10, &(rte as u32).to_le_bytes());
}

fn read_reg(io: &Ioapic, reg: u32) -> u32 {
    io.write(0, &reg.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(0x10, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn version_and_masked_reset_state() {
    let (_, io) = ioapic();
    assert_eq!(read_reg(&io, REG_VERSION), 0x0017_0011);
    assert_eq!(read_reg(&io, REG_TABLE + 2 * 5), RTE_MASK as u32);
}

#[test]
fn compatibility_entry_becomes_the_pin_route() {
    let (f, io) = ioapic();
    // Vector 0x31, fixed, physical, edge, destination APIC 2.
    write_rte(&io, 4, 0x0200_0000_0000_0031);
    let last = *f.routes.lock().unwrap().last().unwrap();
    assert_eq!(
        last[4],
        Some(MsiMessage {
            addr: 0xfee0_2000,
            data: 0x31
        })
    );
    assert!(last.iter().enumerate().all(|(p, m)| p == 4 || m.is_none()));
}

#[test]
fn remappable_entry_carries_the_handle_bits() {
    // kvm-unit-tests' vtd_setup_ioapic_irq: vector 0xed, edge, format 1, index 1.
    let rte = 0xed | 1u64 << 48 | 1u64 << 49;
    let m = rte_message(rte);
    assert_eq!(m.addr, 0xfee0_0000 | 1 << 4 | 1 << 5);
    assert_eq!(m.data, 0xed);
    // Through the registers: every handle bit (63:49) and the format bit stay.
    let (f, io) = ioapic();
    let rte = 0xed | 1u64 << 48 | 0x7fffu64 << 49;
    write_rte(&io, 7, rte);
    assert_eq!(read_reg(&io, REG_TABLE + 15), (rte >> 32) as u32);
    let last = *f.routes.lock().unwrap().last().unwrap();
    assert_eq!(last[7], Some(rte_message(rte)));
}

#[test]
fn level_pin_waits_for_eoi_and_resends_while_high() {
    let (f, io) = ioapic();
    write_rte(&io, 10, 0x41 | RTE_LEVEL);
    io.set_level(10, true).unwrap();
    io.set_level(10, true).unwrap();
    assert_eq!(
        f.sent.lock().unwrap().len(),
        1,
        "Remote IRR holds the second"
    );
    assert_ne!(read_reg(&io, REG_TABLE + 20) & RTE_REMOTE_IRR as u32, 0);
    io.eoi(0x41);
    assert_eq!(f.sent.lock().unwrap().len(), 2, "still high: sent again");
    io.set_level(10, false).unwrap();
    io.eoi(0x41);
    assert_eq!(f.sent.lock().unwrap().len(), 2);
    assert_eq!(read_reg(&io, REG_TABLE + 20) & RTE_REMOTE_IRR as u32, 0);
    let m = f.sent.lock().unwrap()[0];
    assert_eq!(m.data, 0x41 | 1 << 15 | 1 << 14);
}

#[test]
fn edge_pin_sends_on_rising_edges_only_and_not_while_masked() {
    let (f, io) = ioapic();
    io.set_level(3, true).unwrap(); // masked at reset
    assert!(f.sent.lock().unwrap().is_empty());
    io.set_level(3, false).unwrap();
    write_rte(&io, 3, 0x33);
    io.set_level(3, true).unwrap();
    io.set_level(3, true).unwrap();
    io.set_level(3, false).unwrap();
    io.set_level(3, true).unwrap();
    assert_eq!(f.sent.lock().unwrap().len(), 2);
}

#[test]
fn eoi_signals_resample_of_level_pins() {
    let (_, io) = ioapic();
    let fd = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
    io.add_resample(11, fd.clone());
    write_rte(&io, 11, 0x51 | RTE_LEVEL);
    assert_eq!(fd.read().unwrap(), 1, "the pin became deliverable");
    io.eoi(0x52);
    assert!(fd.read().is_err(), "another vector");
    io.eoi(0x51);
    assert_eq!(fd.read().unwrap(), 1);
}

#[test]
fn hostile_accesses_never_panic() {
    let (_, io) = ioapic();
    let mut x: u64 = 0x1234_5678;
    for _ in 0..100_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % 0x40;
        let len = [1, 2, 4, 8][(x >> 8) as usize % 4];
        let bytes = (x >> 32).to_le_bytes();
        match x & 3 {
            0 => io.read(off, &mut [0u8; 8][..len]),
            1 => io.write(off, &bytes[..len]),
            2 => io.eoi(x as u8),
            _ => {
                let _ = io.set_level((x >> 40) as u32 % 30, x & 4 != 0);
            }
        }
    }
}

#[test]
fn masked_level_pin_keeps_a_route_to_no_cpu_so_its_eoi_still_counts() {
    let (f, io) = ioapic();
    write_rte(&io, 14, 0x61 | RTE_LEVEL);
    io.set_level(14, true).unwrap();
    assert_eq!(f.sent.lock().unwrap().len(), 1);
    // The handler masks the pin, then EOIs (kvm-unit-tests' level_retrigger_mask, Linux's
    // IRQ migration).
    write_rte(&io, 14, 0x61 | RTE_LEVEL | RTE_MASK);
    let last = *f.routes.lock().unwrap().last().unwrap();
    assert_eq!(
        last[14],
        Some(MsiMessage {
            addr: NO_CPU,
            data: 0x61 | 1 << 15 | 1 << 14
        })
    );
    io.eoi(0x61);
    assert_eq!(read_reg(&io, REG_TABLE + 28) & RTE_REMOTE_IRR as u32, 0);
    // Unmasked with the line still high: delivered again.
    write_rte(&io, 14, 0x61 | RTE_LEVEL);
    assert_eq!(f.sent.lock().unwrap().len(), 2);
    // A masked edge pin has no route at all.
    write_rte(&io, 3, 0x33 | RTE_MASK);
    assert_eq!(f.routes.lock().unwrap().last().unwrap()[3], None);
}

#[test]
fn level_pin_that_can_deliver_again_signals_its_resample() {
    let (_, io) = ioapic();
    let fd = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
    io.add_resample(16, fd.clone());
    write_rte(&io, 16, 0x71 | RTE_LEVEL | RTE_MASK);
    assert!(fd.read().is_err(), "masked: no CPU to deliver to");
    write_rte(&io, 16, 0x71 | RTE_LEVEL);
    assert_eq!(fd.read().unwrap(), 1, "unmasked: the device may re-raise");
    write_rte(&io, 16, 0x72 | RTE_LEVEL);
    assert!(fd.read().is_err(), "still live: nothing to replay");
}
