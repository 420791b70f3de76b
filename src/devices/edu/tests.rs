use super::*;
use crate::devices::dma::{DirectDma, DmaError};
use crate::devices::pci::config::{COMMAND_MEMORY, REG_BAR0, REG_CAP_PTR, REG_INTERRUPT_PIN};
use crate::devices::pci::msi::{CAP_ADDRESS_HI, CAP_ADDRESS_LO, CAP_CONTROL, CAP_DATA, CAP_ID};
use crate::devices::pci::msix::tests::FakeRouter;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GSI: u32 = 10;
const SID: u16 = 0x0018; // 00:03.0
const MMIO: u64 = 0xc000_0000;

/// Records every level change.
#[derive(Default)]
struct FakeIrq(Mutex<Vec<(u32, bool)>>);

impl FakeIrq {
    fn take(&self) -> Vec<(u32, bool)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl IrqLevel for FakeIrq {
    fn set_level(&self, gsi: u32, high: bool) -> io::Result<()> {
        self.0.lock().unwrap().push((gsi, high));
        Ok(())
    }
}

/// An IOMMU stand-in: bus address `a` is guest-physical `a + base` for requester `SID`; with
/// `fail` set (or another requester) every request is blocked. Counts the requests.
struct FakeIommu {
    mem: DirectDma,
    base: u64,
    fail: AtomicBool,
    requests: Mutex<Vec<(u16, u64, usize)>>,
}

impl FakeIommu {
    fn new(mem: GuestMemoryMmap, base: u64) -> Self {
        Self {
            mem: DirectDma(mem),
            base,
            fail: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
        }
    }

    fn check(&self, sid: u16, addr: u64, len: usize) -> Result<u64, DmaError> {
        self.requests.lock().unwrap().push((sid, addr, len));
        if self.fail.load(Ordering::SeqCst) || sid != SID {
            return Err(DmaError::Blocked {
                sid,
                addr,
                reason: 2,
            });
        }
        Ok(addr + self.base)
    }
}

impl DmaSpace for FakeIommu {
    fn read(&self, sid: u16, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let a = self.check(sid, addr, buf.len())?;
        self.mem.read(sid, a, buf)
    }
    fn write(&self, sid: u16, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        let a = self.check(sid, addr, buf.len())?;
        self.mem.write(sid, a, buf)
    }
}

struct Rig {
    dev: Edu,
    irq: Arc<FakeIrq>,
    router: Arc<FakeRouter>,
    mem: GuestMemoryMmap,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn rig_with(dma: Arc<dyn DmaSpace>, mem: GuestMemoryMmap) -> Rig {
    let irq = Arc::new(FakeIrq::default());
    let router = Arc::new(FakeRouter::default());
    let mut dev = Edu::new(dma, SID, router.clone(), irq.clone(), GSI).unwrap();
    dev.assign_bar(BAR, MMIO);
    Rig {
        dev,
        irq,
        router,
        mem,
    }
}

/// The device over plain guest memory (no IOMMU).
fn rig() -> Rig {
    let mem = memory();
    rig_with(Arc::new(DirectDma(mem.clone())), mem)
}

fn rd(d: &mut Edu, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(BAR, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn rd32(d: &mut Edu, off: u64) -> u32 {
    rd(d, off, 4) as u32
}

fn wr32(d: &mut Edu, off: u64, v: u32) {
    d.bar_write(BAR, off, &v.to_le_bytes());
}

fn wr64(d: &mut Edu, off: u64, v: u64) {
    d.bar_write(BAR, off, &v.to_le_bytes());
}

fn cfg_rd(d: &mut Edu, off: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    d.config_read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn cfg_wr(d: &mut Edu, off: u16, v: u32, len: usize) {
    d.config_write(off, &v.to_le_bytes()[..len]);
}

/// kvm-unit-tests' edu_dma(): program the transfer, start it, poll the start bit.
fn edu_dma(d: &mut Edu, iova: u64, size: u64, dev_offset: u64, from_device: bool) {
    let (from, to, cmd) = if from_device {
        (DMA_START + dev_offset, iova, 1 | 2)
    } else {
        (iova, DMA_START + dev_offset, 1)
    };
    wr64(d, REG_DMA_SRC, from);
    wr64(d, REG_DMA_DST, to);
    wr64(d, REG_DMA_COUNT, size);
    wr32(d, REG_DMA_CMD, cmd);
    assert_eq!(rd32(d, REG_DMA_CMD) & 1, 0, "done at once");
}

fn ram_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

#[test]
fn identity_and_configuration() {
    let Rig { mut dev, .. } = rig();
    assert_eq!(cfg_rd(&mut dev, 0, 4), 0x11e8_1234);
    assert_eq!(
        cfg_rd(&mut dev, 8, 4),
        0xff00_0010,
        "class 'other', revision 0x10"
    );
    assert_eq!(cfg_rd(&mut dev, REG_INTERRUPT_PIN as u16, 1), 1, "INTA#");
    assert_eq!(cfg_rd(&mut dev, REG_INTERRUPT_LINE as u16, 1), GSI);
    assert_eq!(cfg_rd(&mut dev, REG_BAR0 as u16, 4), MMIO as u32);
    let cmd = cfg_rd(&mut dev, REG_COMMAND as u16, 2) as u16;
    assert_eq!(
        cmd & (COMMAND_MEMORY | COMMAND_BUS_MASTER),
        COMMAND_MEMORY | COMMAND_BUS_MASTER,
        "decoding and bus mastering on after assignment"
    );
    // BAR sizing: 1 MiB, 32-bit, not prefetchable.
    cfg_wr(&mut dev, REG_BAR0 as u16, 0xffff_ffff, 4);
    assert_eq!(cfg_rd(&mut dev, REG_BAR0 as u16, 4), 0xfff0_0000);
    cfg_wr(&mut dev, REG_BAR0 as u16, MMIO as u32, 4);
    // The capability list holds MSI, 64-bit.
    let cap = cfg_rd(&mut dev, REG_CAP_PTR as u16, 1) as u16;
    assert_eq!(cap, 0x40);
    assert_eq!(cfg_rd(&mut dev, cap, 1), u32::from(CAP_ID));
    assert_eq!(cfg_rd(&mut dev, cap + 1, 1), 0);
    assert_eq!(cfg_rd(&mut dev, cap + 2, 2), 0x80);
    assert_eq!(dev.msi().offset(), Some(0x40));

    assert_eq!(rd32(&mut dev, REG_ID), 0x0100_00ed);
    wr32(&mut dev, REG_ID, 0);
    assert_eq!(rd32(&mut dev, REG_ID), ID, "read-only");
}

#[test]
fn liveness() {
    let Rig { mut dev, .. } = rig();
    for v in [1u32, 2, 0, 0xdead_beef, u32::MAX] {
        wr32(&mut dev, REG_LIVENESS, v);
        assert_eq!(rd32(&mut dev, REG_LIVENESS), !v);
    }
}

#[test]
fn factorial_without_interrupt() {
    let Rig {
        mut dev,
        irq,
        router,
        ..
    } = rig();
    for (n, f) in [
        (0u32, 1u32),
        (1, 1),
        (5, 120),
        (10, 3_628_800),
        (12, 479_001_600),
    ] {
        wr32(&mut dev, REG_FACTORIAL, n);
        assert_eq!(rd32(&mut dev, REG_STATUS) & STATUS_COMPUTING, 0);
        assert_eq!(rd32(&mut dev, REG_FACTORIAL), f, "{n}!");
    }
    // Wrapping arithmetic, checked against the plain loop.
    for n in [13u32, 20, 33, 34, 35, 100, 1000, u32::MAX] {
        wr32(&mut dev, REG_FACTORIAL, n);
        let expect = (1..=n.min(5000)).fold(1u32, |a, k| a.wrapping_mul(k));
        assert_eq!(rd32(&mut dev, REG_FACTORIAL), expect, "{n}!");
    }
    assert_eq!(factorial(33), (1..=33).fold(1u32, |a, k| a.wrapping_mul(k)));
    assert_ne!(factorial(33), 0);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0);
    assert!(irq.take().is_empty());
    assert!(!router.fired(dev.msi().gsi()));
}

#[test]
fn factorial_with_interrupt() {
    let Rig { mut dev, irq, .. } = rig();
    // Only bit 7 of the status register is writable.
    wr32(&mut dev, REG_STATUS, 0xffff_ffff);
    assert_eq!(rd32(&mut dev, REG_STATUS), STATUS_IRQ_FACTORIAL);
    wr32(&mut dev, REG_FACTORIAL, 6);
    assert_eq!(rd32(&mut dev, REG_FACTORIAL), 720);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), IRQ_FACTORIAL);
    assert_eq!(irq.take(), vec![(GSI, true)]);
    wr32(&mut dev, REG_IRQ_ACK, IRQ_FACTORIAL);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0);
    assert_eq!(irq.take(), vec![(GSI, false)]);
    // Interrupt on completion turned off again.
    wr32(&mut dev, REG_STATUS, 0);
    assert_eq!(rd32(&mut dev, REG_STATUS), 0);
    wr32(&mut dev, REG_FACTORIAL, 3);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0);
    assert!(irq.take().is_empty());
}

#[test]
fn dma_round_trip_direct() {
    let Rig { mut dev, mem, .. } = rig();
    let page = 0x3_0000;
    mem.write_obj(0x1234_5678u32, GuestAddress(page)).unwrap();
    edu_dma(&mut dev, page, 4, 0, false);
    edu_dma(&mut dev, page + 4, 4, 0, true);
    assert_eq!(ram_u32(&mem, page + 4), 0x1234_5678);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0, "no interrupt asked for");

    // A whole buffer, with the completion interrupt.
    let data: Vec<u8> = (0..DMA_SIZE).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&data, GuestAddress(0x4_0000)).unwrap();
    wr64(&mut dev, REG_DMA_SRC, 0x4_0000);
    wr64(&mut dev, REG_DMA_DST, DMA_START);
    wr64(&mut dev, REG_DMA_COUNT, DMA_SIZE as u64);
    wr32(&mut dev, REG_DMA_CMD, (DMA_CMD_START | DMA_CMD_IRQ) as u32);
    assert_eq!(rd(&mut dev, REG_DMA_CMD, 8), DMA_CMD_IRQ, "start bit clear");
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), IRQ_DMA);
    wr32(&mut dev, REG_IRQ_ACK, IRQ_DMA);
    edu_dma(&mut dev, 0x6_0000, DMA_SIZE as u64, 0, true);
    let mut back = vec![0u8; DMA_SIZE];
    mem.read_slice(&mut back, GuestAddress(0x6_0000)).unwrap();
    assert_eq!(back, data);
    // The last bytes of the buffer, alone.
    edu_dma(&mut dev, 0x7_0000, 2, DMA_SIZE as u64 - 2, true);
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(0x7_0000)).unwrap(),
        u16::from_le_bytes([data[DMA_SIZE - 2], data[DMA_SIZE - 1]])
    );
}

#[test]
fn dma_round_trip_through_iommu_like_intel_iommu_test() {
    let mem = memory();
    let page = 0x5_0000;
    let iommu = Arc::new(FakeIommu::new(mem.clone(), page));
    let Rig { mut dev, .. } = rig_with(iommu.clone(), mem.clone());
    mem.write_obj(0x1234_5678u32, GuestAddress(page)).unwrap();
    // IOVA 0 maps the page.
    edu_dma(&mut dev, 0, 4, 0, false);
    edu_dma(&mut dev, 4, 4, 0, true);
    assert_eq!(ram_u32(&mem, page + 4), 0x1234_5678);
    assert_eq!(
        *iommu.requests.lock().unwrap(),
        vec![(SID, 0, 4), (SID, 4, 4)],
        "bus addresses with the device's requester ID"
    );
}

#[test]
fn blocked_dma_is_abandoned() {
    let mem = memory();
    let iommu = Arc::new(FakeIommu::new(mem.clone(), 0));
    let Rig { mut dev, irq, .. } = rig_with(iommu.clone(), mem.clone());
    mem.write_obj(0xaaaa_aaaau32, GuestAddress(0x1000)).unwrap();
    edu_dma(&mut dev, 0x1000, 4, 0, false);

    iommu.fail.store(true, Ordering::SeqCst);
    // RAM to device: the buffer keeps its contents.
    mem.write_obj(0x5555_5555u32, GuestAddress(0x2000)).unwrap();
    wr64(&mut dev, REG_DMA_SRC, 0x2000);
    wr64(&mut dev, REG_DMA_DST, DMA_START);
    wr64(&mut dev, REG_DMA_COUNT, 4);
    wr32(&mut dev, REG_DMA_CMD, 1);
    assert_eq!(rd32(&mut dev, REG_DMA_CMD) & 1, 0, "start bit clears");
    // Device to RAM: nothing written.
    mem.write_obj(0u32, GuestAddress(0x3000)).unwrap();
    wr64(&mut dev, REG_DMA_SRC, DMA_START);
    wr64(&mut dev, REG_DMA_DST, 0x3000);
    wr32(
        &mut dev,
        REG_DMA_CMD,
        (DMA_CMD_START | DMA_CMD_TO_RAM | DMA_CMD_IRQ) as u32,
    );
    assert_eq!(rd32(&mut dev, REG_DMA_CMD) & 1, 0);
    assert_eq!(ram_u32(&mem, 0x3000), 0);
    // The command still completes, as under QEMU.
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), IRQ_DMA);
    assert_eq!(irq.take(), vec![(GSI, true)]);

    iommu.fail.store(false, Ordering::SeqCst);
    edu_dma(&mut dev, 0x3000, 4, 0, true);
    assert_eq!(
        ram_u32(&mem, 0x3000),
        0xaaaa_aaaa,
        "buffer unchanged by the failed read"
    );
}

#[test]
fn direct_dma_outside_ram_is_abandoned() {
    let Rig { mut dev, .. } = rig();
    // 0x20_0000 is below the DMA mask but past the 1 MiB of RAM.
    edu_dma(&mut dev, 0x20_0000, 16, 0, true);
    edu_dma(&mut dev, 0xf_fffe, 16, 0, false);
}

#[test]
fn dma_outside_the_buffer_is_rejected() {
    let mem = memory();
    let iommu = Arc::new(FakeIommu::new(mem.clone(), 0));
    let Rig { mut dev, .. } = rig_with(iommu.clone(), mem.clone());
    let end = DMA_START + DMA_SIZE as u64;
    let cases = [
        // (device address, count)
        (DMA_START - 1, 4),
        (DMA_START + 0x1000, 1),
        (end - 3, 4),
        (DMA_START, DMA_SIZE as u64 + 1),
        (DMA_START, u64::MAX),
        (u64::MAX - 1, 4),
        (0, 4),
    ];
    for (dev_addr, count) in cases {
        for to_ram in [false, true] {
            let (src, dst) = if to_ram {
                (dev_addr, 0x1000)
            } else {
                (0x1000, dev_addr)
            };
            wr64(&mut dev, REG_DMA_SRC, src);
            wr64(&mut dev, REG_DMA_DST, dst);
            wr64(&mut dev, REG_DMA_COUNT, count);
            let cmd = DMA_CMD_START | if to_ram { DMA_CMD_TO_RAM } else { 0 };
            wr32(&mut dev, REG_DMA_CMD, cmd as u32);
            assert_eq!(rd32(&mut dev, REG_DMA_CMD) & 1, 0);
        }
    }
    assert!(
        iommu.requests.lock().unwrap().is_empty(),
        "no transfer tried"
    );
    // A zero-length transfer at the end of the buffer is in range (and moves nothing).
    wr64(&mut dev, REG_DMA_SRC, end);
    wr64(&mut dev, REG_DMA_COUNT, 0);
    wr32(
        &mut dev,
        REG_DMA_CMD,
        (DMA_CMD_START | DMA_CMD_TO_RAM) as u32,
    );
    assert_eq!(*iommu.requests.lock().unwrap(), vec![(SID, 0x1000, 0)]);
}

#[test]
fn dma_needs_bus_mastering_and_masks_addresses() {
    let mem = memory();
    let iommu = Arc::new(FakeIommu::new(mem.clone(), 0));
    let Rig { mut dev, .. } = rig_with(iommu.clone(), mem.clone());
    cfg_wr(&mut dev, REG_COMMAND as u16, u32::from(COMMAND_MEMORY), 2);
    edu_dma(&mut dev, 0x1000, 4, 0, true);
    assert!(iommu.requests.lock().unwrap().is_empty());
    cfg_wr(
        &mut dev,
        REG_COMMAND as u16,
        u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER),
        2,
    );
    // 28 address bits by default.
    edu_dma(&mut dev, 0x1_1000_1000, 4, 0, true);
    dev.set_dma_mask(u64::MAX);
    edu_dma(&mut dev, 0x1_1000_1000, 4, 0, true);
    assert_eq!(
        *iommu.requests.lock().unwrap(),
        vec![(SID, 0x1000, 4), (SID, 0x1_1000_1000, 4)]
    );
}

#[test]
fn intx_raise_and_acknowledge() {
    let Rig {
        mut dev,
        irq,
        router,
        ..
    } = rig();
    let pci_status = |d: &mut Edu| cfg_rd(d, PCI_REG_STATUS as u16, 2) as u16;
    wr32(&mut dev, REG_IRQ_RAISE, 0x1);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0x1);
    assert_eq!(irq.take(), vec![(GSI, true)]);
    assert_ne!(pci_status(&mut dev) & PCI_STATUS_INTERRUPT, 0);
    wr32(&mut dev, REG_IRQ_RAISE, 0x30);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0x31);
    assert!(irq.take().is_empty(), "already high");
    wr32(&mut dev, REG_IRQ_ACK, 0x11);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0x20);
    assert!(irq.take().is_empty(), "still pending");
    wr32(&mut dev, REG_IRQ_ACK, 0xffff_ffff);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0);
    assert_eq!(irq.take(), vec![(GSI, false)]);
    assert_eq!(pci_status(&mut dev) & PCI_STATUS_INTERRUPT, 0);
    // Raising nothing raises nothing (the intel-iommu test does this).
    wr32(&mut dev, REG_IRQ_RAISE, 0);
    assert!(irq.take().is_empty());

    // Interrupt Disable: the line drops while set and comes back when cleared.
    wr32(&mut dev, REG_IRQ_RAISE, 0x4);
    assert_eq!(irq.take(), vec![(GSI, true)]);
    let cmd = cfg_rd(&mut dev, REG_COMMAND as u16, 2);
    cfg_wr(
        &mut dev,
        REG_COMMAND as u16,
        cmd | u32::from(COMMAND_INTX_DISABLE),
        2,
    );
    assert_eq!(irq.take(), vec![(GSI, false)]);
    assert_ne!(
        pci_status(&mut dev) & PCI_STATUS_INTERRUPT,
        0,
        "still requested"
    );
    wr32(&mut dev, REG_IRQ_RAISE, 0x8);
    assert!(irq.take().is_empty(), "disabled");
    cfg_wr(&mut dev, REG_COMMAND as u16, cmd, 2);
    assert_eq!(irq.take(), vec![(GSI, true)]);
    cfg_wr(
        &mut dev,
        REG_COMMAND as u16,
        cmd | u32::from(COMMAND_INTX_DISABLE),
        2,
    );
    wr32(&mut dev, REG_IRQ_ACK, 0xc);
    assert_eq!(irq.take(), vec![(GSI, false)]);
    cfg_wr(&mut dev, REG_COMMAND as u16, cmd, 2);
    assert!(irq.take().is_empty(), "nothing pending any more");
    assert!(!router.fired(dev.msi().gsi()));
}

/// kvm-unit-tests' pci_setup_msi(): address low/high, data as a dword, then the enable bit.
fn setup_msi(d: &mut Edu, addr: u64, data: u32) {
    let cap = d.msi().offset().unwrap() as u16;
    cfg_wr(d, cap + CAP_ADDRESS_LO as u16, addr as u32, 4);
    cfg_wr(d, cap + CAP_ADDRESS_HI as u16, (addr >> 32) as u32, 4);
    cfg_wr(d, cap + CAP_DATA as u16, data, 4);
    let ctrl = cfg_rd(d, cap + CAP_CONTROL as u16, 2);
    cfg_wr(d, cap + CAP_CONTROL as u16, ctrl | 1, 2);
}

#[test]
fn msi_replaces_intx() {
    let Rig {
        mut dev,
        irq,
        router,
        ..
    } = rig();
    let gsi = dev.msi().gsi();
    // INTx asserted first, then the guest switches to MSI: INTx drops.
    wr32(&mut dev, REG_IRQ_RAISE, 1);
    assert_eq!(irq.take(), vec![(GSI, true)]);
    setup_msi(&mut dev, 0xfee0_0000, 0x40ee);
    assert!(dev.msi().enabled());
    assert_eq!(irq.take(), vec![(GSI, false)]);
    assert_eq!(
        router.take_routes().last(),
        Some(&(gsi, 0xfee0_0000, 0x40ee, false))
    );
    wr32(&mut dev, REG_IRQ_ACK, 1);
    assert!(!router.fired(gsi));

    // Raising sends the message, never INTx; acknowledging does nothing to the lines.
    wr32(&mut dev, REG_IRQ_RAISE, 1);
    assert!(router.fired(gsi));
    assert!(!router.fired(gsi));
    wr32(&mut dev, REG_IRQ_RAISE, 2);
    assert!(router.fired(gsi), "every raise sends a message");
    wr32(&mut dev, REG_IRQ_ACK, 3);
    assert!(!router.fired(gsi));
    // A DMA completion interrupt goes the same way.
    wr64(&mut dev, REG_DMA_SRC, 0x1000);
    wr64(&mut dev, REG_DMA_DST, DMA_START);
    wr64(&mut dev, REG_DMA_COUNT, 4);
    wr32(&mut dev, REG_DMA_CMD, (DMA_CMD_START | DMA_CMD_IRQ) as u32);
    assert!(router.fired(gsi));
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), IRQ_DMA);
    wr32(&mut dev, REG_IRQ_ACK, IRQ_DMA);
    assert!(irq.take().is_empty());

    // No bus mastering, no message.
    let cmd = cfg_rd(&mut dev, REG_COMMAND as u16, 2);
    cfg_wr(&mut dev, REG_COMMAND as u16, u32::from(COMMAND_MEMORY), 2);
    wr32(&mut dev, REG_IRQ_RAISE, 1);
    assert!(!router.fired(gsi));
    wr32(&mut dev, REG_IRQ_ACK, 1);
    cfg_wr(&mut dev, REG_COMMAND as u16, cmd, 2);

    // MSI off again: back to INTx, and the route is masked.
    let cap = dev.msi().offset().unwrap() as u16;
    cfg_wr(&mut dev, cap + CAP_CONTROL as u16, 0, 2);
    assert!(!dev.msi().enabled());
    assert_eq!(router.take_routes(), vec![(gsi, 0xfee0_0000, 0x40ee, true)]);
    wr32(&mut dev, REG_IRQ_RAISE, 1);
    assert_eq!(irq.take(), vec![(GSI, true)]);
    assert!(!router.fired(gsi));
}

#[test]
fn access_sizes() {
    let Rig { mut dev, .. } = rig();
    wr32(&mut dev, REG_LIVENESS, 0x1234_5678);
    // Only 4-byte accesses below 0x80.
    assert_eq!(rd(&mut dev, REG_LIVENESS, 1), 0);
    assert_eq!(rd(&mut dev, REG_LIVENESS, 2), 0);
    assert_eq!(rd(&mut dev, REG_ID, 8), 0);
    dev.bar_write(BAR, REG_LIVENESS, &[1, 2]);
    dev.bar_write(BAR, REG_LIVENESS, &[1; 8]);
    assert_eq!(rd32(&mut dev, REG_LIVENESS), !0x1234_5678);
    // Unaligned: not a register.
    assert_eq!(rd(&mut dev, 0x02, 4), 0);
    // An aligned access with no register behind it reads all-ones.
    assert_eq!(rd32(&mut dev, 0x10), u32::MAX);
    assert_eq!(rd(&mut dev, 0xa0, 8), u64::MAX);
    assert_eq!(rd32(&mut dev, BAR_SIZE - 4), u32::MAX);
    // DMA registers: 8 bytes, or 4 bytes that set the whole register.
    wr64(&mut dev, REG_DMA_SRC, 0x1122_3344_5566_7788);
    assert_eq!(rd(&mut dev, REG_DMA_SRC, 8), 0x1122_3344_5566_7788);
    assert_eq!(rd(&mut dev, REG_DMA_SRC, 4), 0x5566_7788);
    assert_eq!(
        rd(&mut dev, REG_DMA_SRC + 4, 4),
        u64::from(u32::MAX),
        "no register there"
    );
    wr32(&mut dev, REG_DMA_SRC, 0xabcd);
    assert_eq!(rd(&mut dev, REG_DMA_SRC, 8), 0xabcd);
    dev.bar_write(BAR, REG_DMA_SRC, &[0xff; 2]);
    assert_eq!(rd(&mut dev, REG_DMA_SRC, 8), 0xabcd);
    // A command without the start bit is ignored.
    wr32(&mut dev, REG_DMA_CMD, DMA_CMD_IRQ as u32);
    assert_eq!(rd(&mut dev, REG_DMA_CMD, 8), 0);
    // Empty accesses.
    dev.bar_read(BAR, REG_ID, &mut []);
    dev.bar_write(BAR, REG_IRQ_RAISE, &[]);
    dev.config_read(0, &mut []);
    dev.config_write(0x40, &[]);
    // Other BARs do not exist.
    let mut b = [0xffu8; 4];
    dev.bar_read(1, 0, &mut b);
    assert_eq!(b, [0; 4]);
    dev.bar_write(1, REG_IRQ_RAISE, &[1, 0, 0, 0]);
    assert_eq!(rd32(&mut dev, REG_IRQ_STATUS), 0);
}

#[test]
fn random_accesses_never_panic() {
    let Rig { mut dev, .. } = rig();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x
    };
    let mut buf = [0u8; 8];
    for i in 0..100_000u32 {
        let r = next();
        let len = [1usize, 2, 4, 8][(r & 3) as usize];
        let val = next().to_le_bytes();
        let offset = match (r >> 2) & 3 {
            0 => (r >> 8) % 0x100,       // the registers
            1 => (r >> 8) % BAR_SIZE,    // the whole BAR
            2 => (r >> 8) & !0x7 & 0xff, // aligned registers
            _ => r >> 8,                 // anything
        };
        let cfg_off = ((r >> 40) % 0x1100) as u16;
        let write = (r >> 4) & 1 != 0;
        if (r >> 5) & 1 != 0 {
            let bar = if i % 97 == 0 {
                (r >> 50) as usize % 8
            } else {
                BAR
            };
            if write {
                dev.bar_write(bar, offset, &val[..len]);
            } else {
                dev.bar_read(bar, offset, &mut buf[..len]);
            }
        } else if write {
            // Keep the BAR and the command register mostly in place.
            if !(0x04..0x14).contains(&cfg_off) || i % 13 == 0 {
                dev.config_write(cfg_off, &val[..len]);
            }
        } else {
            dev.config_read(cfg_off, &mut buf[..len]);
        }
    }
    assert_eq!(rd32(&mut dev, REG_ID), ID);
    assert_eq!(cfg_rd(&mut dev, 0, 4), 0x11e8_1234);
}
