use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::irte::*;
use super::regs::*;
use super::translate::*;
use super::*;

const MEM_SIZE: u64 = 16 << 20;
const ROOT: u64 = 0x10000;
const IRT: u64 = 0x20000;
const IQ: u64 = 0x30_0000;
/// Page tables and context tables are allocated from here.
const ALLOC: u64 = 0x12_0000; // after the 1 MiB interrupt remapping table
/// kvm-unit-tests' edu device at 00:03.0.
const EDU_SID: u16 = 0x18;
const FPD: u64 = 1 << 1;
const PTE_R: u64 = 1;
const PTE_W: u64 = 2;
const PTE_RW: u64 = 3;
const PTE_SP: u64 = 1 << 7;
const WAIT: u64 = 5;
const SW: u64 = 1 << 5;
const IF: u64 = 1 << 4;

#[derive(Default)]
struct FakeMsi {
    sent: Mutex<Vec<MsiMessage>>,
}

impl MsiSender for FakeMsi {
    fn send(&self, msg: MsiMessage) -> io::Result<()> {
        self.sent.lock().unwrap().push(msg);
        Ok(())
    }
}

impl FakeMsi {
    fn take(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

fn msg(addr: u64, data: u32) -> MsiMessage {
    MsiMessage { addr, data }
}

struct Rig {
    vtd: Arc<Vtd>,
    msi: Arc<FakeMsi>,
    mem: GuestMemoryMmap,
    next: Cell<u64>,
}

impl Rig {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let msi = Arc::new(FakeMsi::default());
        let vtd = Vtd::new(mem.clone(), msi.clone());
        Self {
            vtd,
            msi,
            mem,
            next: Cell::new(ALLOC),
        }
    }

    fn alloc(&self) -> u64 {
        let page = self.next.get();
        self.next.set(page + 0x1000);
        page
    }

    fn put(&self, addr: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    fn get(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        BusDevice::read(&*self.vtd, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn r64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        BusDevice::read(&*self.vtd, off, &mut b);
        u64::from_le_bytes(b)
    }

    fn w32(&self, off: u64, v: u32) {
        BusDevice::write(&*self.vtd, off, &v.to_le_bytes());
    }

    fn w64(&self, off: u64, v: u64) {
        BusDevice::write(&*self.vtd, off, &v.to_le_bytes());
    }

    /// kvm-unit-tests' vtd_gcmd_or: GSTS | bit into GCMD, then the bit shows in GSTS.
    fn gcmd_or(&self, bit: u32) {
        let status = self.r32(GSTS);
        self.w32(GCMD, status | bit);
        assert_ne!(self.r32(GSTS) & bit, 0, "GSTS bit {bit:#x}");
    }

    fn gcmd_clear(&self, bit: u32) {
        // Without the one-shot status bits, which would latch again.
        let status = self.r32(GSTS) & !(GCMD_SRTP | GCMD_SIRTP);
        self.w32(GCMD, status & !bit);
        assert_eq!(self.r32(GSTS) & bit, 0);
    }

    /// kvm-unit-tests' vtd_init.
    fn kut_init(&self) {
        self.gcmd_or(GCMD_QIE);
        self.w64(RTADDR, ROOT);
        self.gcmd_or(GCMD_SRTP);
        self.w64(IRTA, IRT | 0xf);
        self.gcmd_or(GCMD_SIRTP);
        self.gcmd_or(GCMD_TE);
        self.gcmd_or(GCMD_IRE);
    }

    /// Writes the context entry of `sid` (allocating its bus's context table).
    fn context(&self, sid: u16, lo: u64, hi: u64) {
        let re = ROOT + u64::from(sid >> 8) * 16;
        if self.get(re) & 1 == 0 {
            self.put(re, self.alloc() | 1);
        }
        let ce = (self.get(re) & !0xfff) + u64::from(sid & 0xff) * 16;
        self.put(ce, lo);
        self.put(ce + 8, hi);
    }

    /// A translated context for `sid` with a `levels`-level table; returns the table.
    fn translated(&self, sid: u16, levels: u32) -> u64 {
        let slpt = self.alloc();
        let aw = u64::from(levels - 2);
        self.context(sid, slpt | 1, aw | u64::from(sid) << 8);
        slpt
    }

    /// Maps `iova` to `gpa` with a leaf at `leaf` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
    fn map(&self, slpt: u64, levels: u32, iova: u64, gpa: u64, leaf: u32, perm: u64) {
        let index = |level: u32| (iova >> (12 + 9 * (level - 1))) & 0x1ff;
        let mut table = slpt;
        for level in (leaf + 1..=levels).rev() {
            let at = table + index(level) * 8;
            if self.get(at) & PTE_RW == 0 {
                self.put(at, self.alloc() | PTE_RW);
            }
            table = self.get(at) & !0xfff;
        }
        let sp = if leaf > 1 { PTE_SP } else { 0 };
        self.put(table + index(leaf) * 8, gpa | perm | sp);
    }

    fn dma_read(&self, sid: u16, iova: u64, len: usize) -> Result<Vec<u8>, DmaError> {
        let mut buf = vec![0u8; len];
        DmaSpace::read(&*self.vtd, sid, iova, &mut buf).map(|_| buf)
    }

    /// The reason of a blocked DMA read.
    fn read_fault(&self, sid: u16, iova: u64) -> u8 {
        match self.dma_read(sid, iova, 4) {
            Err(DmaError::Blocked { reason, .. }) => reason,
            other => panic!("expected a fault, got {other:?}"),
        }
    }

    /// The fault record (lo, hi), then clears F and PFO.
    fn take_record(&self) -> (u64, u64) {
        let rec = (self.r64(FRCD_LO), self.r64(FRCD_HI));
        self.w32(FRCD_HI + 4, 1 << 31);
        self.w32(FSTS, FSTS_PFO);
        rec
    }

    fn unmask_faults(&self) {
        self.w32(FEDATA, 0x4021);
        self.w32(FEADDR, 0xfee0_0000);
        self.w32(FECTL, 0);
    }

    fn irte(&self, index: u64, lo: u64, hi: u64) {
        self.put(IRT + index * 16, lo);
        self.put(IRT + index * 16 + 8, hi);
    }

    fn remap(&self, sid: Option<u16>, m: MsiMessage) -> Option<MsiMessage> {
        self.vtd.remap(sid, m)
    }

    /// Puts descriptor `index` of the queue at `base`.
    fn desc(&self, base: u64, index: u64, lo: u64, hi: u64) {
        self.put(base + index * 16, lo);
        self.put(base + index * 16 + 8, hi);
    }

    fn queue(&self, iqa: u64) {
        self.w64(IQA, iqa);
        self.gcmd_or(GCMD_QIE);
        assert_eq!(self.r64(IQH), 0);
    }
}

/// An IRTE like kvm-unit-tests' vtd_setup_irte: present, FPD, fixed, physical, full SID check.
fn kut_irte(vector: u64, dest: u64, sid: u16) -> (u64, u64) {
    (
        1 | FPD | vector << 16 | dest << 32,
        u64::from(sid) | 1 << 18,
    )
}

/// A remappable-format address for `handle`.
fn handle_addr(handle: u64) -> u64 {
    0xfee0_0000 | (handle & 0x7fff) << 5 | 1 << 4 | (handle >> 15) << 2
}

#[test]
fn kut_init_sequence_and_capabilities() {
    let r = Rig::new();
    assert_eq!(r.r32(VER), 0x10);
    let cap = r.r64(CAP);
    assert_eq!(cap & 7, 2, "ND: 256 domains");
    assert_eq!((cap >> 8) & 0x1f, 0b0110, "SAGAW 39 and 48 bits");
    assert_eq!((cap >> 16) & 0x3f, 38, "MGAW");
    assert_eq!(((cap >> 24) & 0x3ff) * 16, FRCD_LO);
    assert_eq!((cap >> 34) & 0xf, 0b0011, "SLLPS 2M and 1G");
    assert_eq!((cap >> 40) & 0xff, 0, "NFR: one record");
    assert_eq!(cap & (1 << 39 | 1 << 7 | 1 << 4), 0, "no PSI, CM, RWBF");
    let ecap = r.r64(ECAP);
    assert_eq!(ecap & 0x1f, 0b1011, "C, QI, IR; no DT, EIM");
    assert_ne!(ecap & 1 << 6, 0, "PT");
    assert_eq!(((ecap >> 8) & 0x3ff) * 16, IVA);
    assert_eq!(u64::from(r.r32(CAP + 4)), cap >> 32);

    r.kut_init();
    assert_eq!(r.r32(FSTS), 0);
    let gsts = r.r32(GSTS);
    for bit in [GCMD_QIE, GCMD_SRTP, GCMD_SIRTP, GCMD_TE, GCMD_IRE] {
        assert_ne!(gsts & bit, 0, "{bit:#x}");
    }
    assert_eq!(gsts & GCMD_CFI, 0);
    assert_ne!(r.r64(CAP) & (0x2 << 8), 0, "kvm-unit-tests' VTD_CAP_SAGAW");
    assert_ne!(r.r64(CAP) & (3 << 34), 0, "kvm-unit-tests' VTD_CAP_SLLPS");
    assert_eq!(r.r64(RTADDR) & !0xfff, ROOT);
    assert_eq!(r.r64(IRTA), IRT | 0xf);
    assert_eq!(r.r32(GCMD), 0, "GCMD is write-only");
    assert_eq!(
        r.r64(GCMD),
        u64::from(gsts) << 32,
        "GCMD:GSTS as one quadword"
    );
    assert!(r.msi.take().is_empty());
    assert_eq!(DMAR_HOST_ADDRESS_WIDTH, 38);
    assert_eq!(DMAR_FLAGS & 1, 1, "INTR_REMAP");
}

#[test]
fn three_level_walk_with_4k_pages() {
    let r = Rig::new();
    r.kut_init();
    let slpt = r.translated(EDU_SID, 3);
    r.map(slpt, 3, 0, 0x20_0000, 1, PTE_RW);
    r.map(slpt, 3, 0x1000, 0x20_5000, 1, PTE_RW);
    // kvm-unit-tests' vtd_test_dmar: DMA the word at IOVA 0 to IOVA 4.
    r.mem
        .write_obj(0x1234_5678u32, GuestAddress(0x20_0000))
        .unwrap();
    let word = r.dma_read(EDU_SID, 0, 4).unwrap();
    DmaSpace::write(&*r.vtd, EDU_SID, 4, &word).unwrap();
    let copied: u32 = r.mem.read_obj(GuestAddress(0x20_0004)).unwrap();
    assert_eq!(copied, 0x1234_5678);
    // A transfer across the page boundary lands in two unrelated pages.
    DmaSpace::write(&*r.vtd, EDU_SID, 0xffc, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let mut lo = [0u8; 4];
    let mut hi = [0u8; 4];
    r.mem.read_slice(&mut lo, GuestAddress(0x20_0ffc)).unwrap();
    r.mem.read_slice(&mut hi, GuestAddress(0x20_5000)).unwrap();
    assert_eq!((lo, hi), ([1, 2, 3, 4], [5, 6, 7, 8]));
    assert_eq!(
        r.dma_read(EDU_SID, 0xffc, 8).unwrap(),
        [1, 2, 3, 4, 5, 6, 7, 8]
    );
    // The third page is not mapped: a fault after the first two pages moved.
    assert_eq!(r.read_fault(EDU_SID, 0x2000), FR_READ);
    assert_eq!(r.r32(FSTS), FSTS_PPF);
}

#[test]
fn four_level_walk_and_the_mgaw_limit() {
    let r = Rig::new();
    r.kut_init();
    let sid = 0x0108; // 01:01.0
    let slpt = r.translated(sid, 4);
    let iova = 0x40_1234_5000; // below 2^39
    r.map(slpt, 4, iova, 0x20_6000, 1, PTE_RW);
    r.mem.write_obj(0xabcdu16, GuestAddress(0x20_6010)).unwrap();
    assert_eq!(r.dma_read(sid, iova + 0x10, 2).unwrap(), [0xcd, 0xab]);
    // MGAW is 39 bits: a 4-level table cannot reach further.
    assert_eq!(r.read_fault(sid, 1 << 39), FR_BEYOND_AGAW);
    r.take_record();
    let slpt3 = r.translated(EDU_SID, 3);
    r.map(slpt3, 3, 0, 0x20_0000, 1, PTE_RW);
    assert_eq!(r.read_fault(EDU_SID, 1 << 39), FR_BEYOND_AGAW);
    assert_eq!(r.read_fault(EDU_SID, u64::MAX - 1), FR_BEYOND_AGAW);
}

#[test]
fn superpages() {
    let r = Rig::new();
    r.kut_init();
    let slpt = r.translated(EDU_SID, 3);
    r.map(slpt, 3, 0x4000_0000, 0x40_0000, 2, PTE_RW); // 2 MiB
    r.mem.write_obj(0x77u8, GuestAddress(0x41_2345)).unwrap();
    assert_eq!(r.dma_read(EDU_SID, 0x4001_2345, 1).unwrap(), [0x77]);
    r.map(slpt, 3, 0x40_0000_0000, 0, 3, PTE_RW); // 1 GiB at guest-physical 0
    r.mem.write_obj(0x99u8, GuestAddress(0x20_1000)).unwrap();
    assert_eq!(r.dma_read(EDU_SID, 0x40_0020_1000, 1).unwrap(), [0x99]);
    // A misaligned superpage address is reserved bits set.
    r.map(slpt, 3, 0x8000_0000, 0x40_1000, 2, PTE_RW);
    assert_eq!(r.read_fault(EDU_SID, 0x8000_0000), FR_PAGING_RESERVED);
    r.take_record();
    // No superpage at level 4.
    let sid = 0x0200;
    let slpt4 = r.translated(sid, 4);
    r.put(slpt4, PTE_RW | PTE_SP);
    assert_eq!(r.read_fault(sid, 0x1000), FR_PAGING_RESERVED);
}

#[test]
fn permission_faults_record_and_raise_the_fault_event() {
    let r = Rig::new();
    r.kut_init();
    r.unmask_faults();
    let slpt = r.translated(EDU_SID, 3);
    r.map(slpt, 3, 0x1000, 0x20_0000, 1, PTE_R);
    r.map(slpt, 3, 0x2000, 0x20_1000, 1, PTE_W);
    assert!(r.dma_read(EDU_SID, 0x1000, 8).is_ok());
    let err = DmaSpace::write(&*r.vtd, EDU_SID, 0x1234, &[0; 4]).unwrap_err();
    assert_eq!(
        err,
        DmaError::Blocked {
            sid: EDU_SID,
            addr: 0x1234,
            reason: FR_WRITE
        }
    );
    assert_eq!(r.r64(FRCD_LO), 0x1000);
    let hi = r.r64(FRCD_HI);
    assert_eq!(hi, u64::from(EDU_SID) | u64::from(FR_WRITE) << 32 | FRCD_F);
    assert_eq!(r.r32(FSTS), FSTS_PPF);
    assert_eq!(r.msi.take(), [msg(0xfee0_0000, 0x4021)]);
    // The record is taken: the next fault overflows, without an event.
    assert_eq!(r.read_fault(EDU_SID, 0x2000), FR_READ);
    assert_eq!(r.r32(FSTS), FSTS_PPF | FSTS_PFO);
    assert_eq!(r.r64(FRCD_HI), hi);
    assert!(r.msi.take().is_empty());
    // F is write-1-to-clear; PPF follows it. PFO too.
    r.w32(FRCD_HI + 4, 1 << 31);
    assert_eq!(r.r32(FSTS), FSTS_PFO);
    r.w32(FSTS, FSTS_PFO | FSTS_PPF);
    assert_eq!(r.r32(FSTS), 0);
    // A read fault sets T.
    assert_eq!(r.read_fault(EDU_SID, 0x2abc), FR_READ);
    assert_eq!(r.r64(FRCD_LO), 0x2000);
    assert_eq!(
        r.r64(FRCD_HI),
        u64::from(EDU_SID) | 6 << 32 | FRCD_T | FRCD_F
    );
    assert_eq!(r.msi.take().len(), 1);
}

#[test]
fn fault_event_waits_while_masked() {
    let r = Rig::new();
    r.kut_init();
    r.w32(FEDATA, 0x30);
    r.w32(FEADDR, 0xfee0_1000);
    assert_eq!(r.r32(FECTL), CTL_IM, "masked at reset");
    assert_eq!(r.read_fault(0x0500, 0), FR_ROOT_NOT_PRESENT);
    assert!(r.msi.take().is_empty());
    assert_eq!(r.r32(FECTL), CTL_IM | CTL_IP);
    r.w32(FECTL, 0);
    assert_eq!(r.msi.take(), [msg(0xfee0_1000, 0x30)]);
    assert_eq!(r.r32(FECTL), 0);
    // Serviced while masked: nothing left to send.
    r.take_record();
    r.w32(FECTL, CTL_IM);
    assert_eq!(r.read_fault(0x0500, 0), FR_ROOT_NOT_PRESENT);
    assert_eq!(r.r32(FECTL), CTL_IM | CTL_IP);
    r.take_record();
    assert_eq!(r.r32(FECTL), CTL_IM);
    r.w32(FECTL, 0);
    assert!(r.msi.take().is_empty());
}

#[test]
fn context_not_present_and_fpd() {
    let r = Rig::new();
    r.kut_init();
    r.context(EDU_SID, FPD, 0); // not present, fault processing disabled
    assert_eq!(r.read_fault(EDU_SID, 0), FR_CONTEXT_NOT_PRESENT);
    assert_eq!(r.r32(FSTS), 0);
    assert_eq!(r.r64(FRCD_HI), 0);
    r.context(0x20, 0, 0);
    assert_eq!(r.read_fault(0x20, 0x5000), FR_CONTEXT_NOT_PRESENT);
    let (lo, hi) = r.take_record();
    assert_eq!((lo, hi), (0x5000, 0x20 | 2 << 32 | FRCD_T | FRCD_F));
    assert_eq!(r.read_fault(0x0300, 0), FR_ROOT_NOT_PRESENT);
}

#[test]
fn invalid_entries_and_tables_outside_ram() {
    let r = Rig::new();
    r.kut_init();
    let page = r.alloc();
    let cases: [(u64, u64, u8); 6] = [
        (page | 1 | 3 << 2, 1, FR_CONTEXT_INVALID), // TT 3
        (page | 1, 0, FR_CONTEXT_INVALID),          // AW 0 (2 levels)
        (page | 1, 3, FR_CONTEXT_INVALID),          // AW 3 (5 levels)
        (page | 1 | 1 << 4, 1, FR_CONTEXT_RESERVED),
        (page | 1, 1 | 1 << 40, FR_CONTEXT_RESERVED),
        (0x4000_0000 | 1, 1, FR_PAGING_ENTRY), // table beyond RAM
    ];
    for (lo, hi, reason) in cases {
        r.context(EDU_SID, lo, hi);
        assert_eq!(r.read_fault(EDU_SID, 0), reason, "{lo:#x} {hi:#x}");
        let (_, rec) = r.take_record();
        assert_eq!((rec >> 32) as u8, reason);
    }
    // TT 1 (device TLB) is invalid without ECAP.DT, even with a good table under it.
    r.context(EDU_SID, page | 1 | 1 << 2, 1);
    r.map(page, 3, 0, 0x20_0000, 1, PTE_RW);
    assert_eq!(r.read_fault(EDU_SID, 0), FR_CONTEXT_INVALID);
    r.take_record();
    r.context(EDU_SID, page | 1, 1);
    assert!(r.dma_read(EDU_SID, 0, 4).is_ok());
    // Root entries: reserved bits, context table beyond RAM.
    r.put(ROOT + 7 * 16 + 8, 1);
    r.put(ROOT + 7 * 16, 0x11000 | 1);
    assert_eq!(r.read_fault(0x0700, 0), FR_ROOT_RESERVED);
    r.take_record();
    r.put(ROOT + 8 * 16, 0xf000_0000 | 1);
    assert_eq!(r.read_fault(0x0800, 0), FR_CONTEXT_ENTRY);
    r.take_record();
    // A root table beyond RAM, then one with TTM != 0.
    r.w64(RTADDR, 0x1_0000_0000);
    r.gcmd_or(GCMD_SRTP);
    assert_eq!(r.read_fault(EDU_SID, 0), FR_ROOT_ENTRY);
    r.take_record();
    r.w64(RTADDR, ROOT | 1 << 10);
    r.gcmd_or(GCMD_SRTP);
    assert_eq!(r.read_fault(EDU_SID, 0), FR_ROOT_ENTRY);
}

#[test]
fn identity_when_off_and_pass_through() {
    let r = Rig::new();
    r.mem.write_obj(0x5au8, GuestAddress(0x20_0123)).unwrap();
    assert_eq!(r.dma_read(EDU_SID, 0x20_0123, 1).unwrap(), [0x5a]);
    assert_eq!(
        r.dma_read(EDU_SID, MEM_SIZE, 1),
        Err(DmaError::NotRam {
            sid: EDU_SID,
            addr: MEM_SIZE
        })
    );
    r.kut_init();
    r.context(EDU_SID, 1 | 2 << 2, 1); // pass-through
    assert_eq!(r.dma_read(EDU_SID, 0x20_0123, 1).unwrap(), [0x5a]);
    r.gcmd_clear(GCMD_TE);
    assert_eq!(r.dma_read(0x0900, 0x20_0123, 1).unwrap(), [0x5a]);
    assert_eq!(r.dma_read(0x0900, 0, 0).unwrap(), [0u8; 0]);
}

#[test]
fn remappable_msi_becomes_the_irte_message() {
    let r = Rig::new();
    r.kut_init();
    // kvm-unit-tests' vtd_setup_msi(edu, 0xee, 0): index 1.
    let (lo, hi) = kut_irte(0xee, 0, EDU_SID);
    r.irte(1, lo, hi);
    let input = msg(0xfee0_0030, 0);
    assert_eq!(input.addr, handle_addr(1));
    assert_eq!(r.remap(Some(EDU_SID), input), Some(msg(0xfee0_0000, 0xee)));
    // xAPIC destination in DST bits 15:8; DM, RH, lowest priority.
    r.irte(
        3,
        1 | 1 << 2 | 1 << 3 | 1 << 5 | 0x41 << 16 | 0x0300 << 32,
        0,
    );
    assert_eq!(
        r.remap(Some(7), msg(handle_addr(3), 0)),
        Some(msg(0xfee0_300c, 0x141))
    );
    // vtd_setup_ioapic_irq with a level trigger: the IOAPIC's message has no SID.
    let (lo, hi) = kut_irte(0xed, 0, EDU_SID);
    r.irte(2, lo | 1 << 4, hi);
    let out = r.remap(None, msg(handle_addr(2), 0xed | 1 << 15));
    assert_eq!(out, Some(msg(0xfee0_0000, 0xed | 1 << 15 | 1 << 14)));
    assert_eq!(r.r32(FSTS), 0);
}

#[test]
fn subhandle_and_handle_bit_15() {
    let r = Rig::new();
    r.kut_init();
    r.irte(10, 1 | 0x51 << 16, 0);
    r.irte(0x8000, 1 | 0x52 << 16, 0);
    let shv = 1 << 3;
    assert_eq!(
        r.remap(None, msg(handle_addr(8) | shv, 2)),
        Some(msg(0xfee0_0000, 0x51))
    );
    // Without SHV the data is not added.
    assert_eq!(
        r.remap(None, msg(handle_addr(10), 0x7)),
        Some(msg(0xfee0_0000, 0x51))
    );
    assert_eq!(handle_addr(0x8000), 0xfee0_0014);
    assert_eq!(
        r.remap(None, msg(handle_addr(0x8000), 0)),
        Some(msg(0xfee0_0000, 0x52))
    );
    // Handle + subhandle past the table (65536 entries).
    assert_eq!(r.remap(None, msg(handle_addr(0xffff) | shv, 1)), None);
    let (lo, hi) = r.take_record();
    assert_eq!((hi >> 32) as u8, FR_IR_INDEX);
    assert_eq!(lo, 0, "index 0x10000 truncated to 16 bits");
}

#[test]
fn source_id_validation() {
    let r = Rig::new();
    r.kut_init();
    let entry = |sid: u64, sq: u64, svt: u64| sid | sq << 16 | svt << 18;
    let check = |hi: u64, sid: u16| {
        r.irte(4, 1 | 0x60 << 16, hi);
        r.remap(Some(sid), msg(handle_addr(4), 0)).is_some()
    };
    assert!(check(entry(0x0118, 0, 1), 0x0118));
    assert!(!check(entry(0x0118, 0, 1), 0x0119));
    let (lo, hi) = r.take_record();
    assert_eq!(lo, 4 << 48);
    assert_eq!(hi, 0x0119 | u64::from(FR_IR_SID) << 32 | FRCD_F);
    assert!(check(entry(0x0118, 1, 1), 0x011c));
    assert!(!check(entry(0x0118, 1, 1), 0x0119));
    assert!(check(entry(0x0118, 2, 1), 0x011e));
    assert!(!check(entry(0x0118, 2, 1), 0x0119));
    assert!(check(entry(0x0118, 3, 1), 0x011f));
    assert!(!check(entry(0x0118, 3, 1), 0x0120));
    assert!(check(entry(0x0204, 0, 2), 0x0300));
    assert!(check(entry(0x0204, 0, 2), 0x04ff));
    assert!(!check(entry(0x0204, 0, 2), 0x0500));
    assert!(!check(entry(0x0204, 0, 2), 0x0100));
    assert!(check(entry(0x0118, 0, 0), 0x1234));
    // No requester ID: no validation.
    r.irte(4, 1 | 0x60 << 16, entry(0x0118, 0, 1));
    assert!(r.remap(None, msg(handle_addr(4), 0)).is_some());
    // SVT 3 is reserved, SID or not.
    r.take_record();
    r.irte(4, 1 | 0x60 << 16, entry(0, 0, 3));
    assert!(r.remap(None, msg(handle_addr(4), 0)).is_none());
    let (_, hi) = r.take_record();
    assert_eq!(
        hi,
        u64::from(IOAPIC_SID) | u64::from(FR_IR_RESERVED) << 32 | FRCD_F
    );
}

#[test]
fn compatibility_format_needs_cfi() {
    let r = Rig::new();
    let compat = msg(0xfee0_1000, 0x31);
    let remappable = msg(handle_addr(5), 0);
    assert_eq!(r.remap(Some(EDU_SID), compat), Some(compat), "IRE off");
    assert_eq!(r.remap(Some(EDU_SID), remappable), Some(remappable));
    r.kut_init();
    assert_eq!(r.remap(Some(EDU_SID), compat), None);
    let (lo, hi) = r.take_record();
    assert_eq!((lo, hi), (0, 0x18 | u64::from(FR_IR_COMPAT) << 32 | FRCD_F));
    r.gcmd_or(GCMD_CFI);
    assert_eq!(r.remap(Some(EDU_SID), compat), Some(compat));
    r.gcmd_clear(GCMD_CFI);
    assert_eq!(r.remap(Some(EDU_SID), compat), None);
    r.gcmd_clear(GCMD_IRE);
    assert_eq!(r.remap(Some(EDU_SID), compat), Some(compat));
}

#[test]
fn interrupt_remapping_faults() {
    let r = Rig::new();
    r.kut_init();
    let blocked = |lo: u64, hi: u64| {
        r.irte(6, lo, hi);
        assert_eq!(r.remap(None, msg(handle_addr(6), 0)), None);
        (r.take_record().1 >> 32) as u8
    };
    assert_eq!(blocked(0, 0), FR_IR_NOT_PRESENT);
    assert_eq!(blocked(1 | 1 << 15, 0), FR_IR_RESERVED, "posted");
    assert_eq!(blocked(1 | 1 << 12, 0), FR_IR_RESERVED);
    assert_eq!(blocked(1 | 1 << 32, 0), FR_IR_RESERVED, "DST bits 7:0");
    assert_eq!(blocked(1, 1 << 20), FR_IR_RESERVED);
    // FPD: blocked, not recorded.
    r.irte(6, FPD, 0);
    assert_eq!(r.remap(None, msg(handle_addr(6), 0)), None);
    assert_eq!(r.r32(FSTS), 0);
    // A 2-entry table.
    r.w64(IRTA, IRT);
    r.gcmd_or(GCMD_SIRTP);
    r.irte(2, 1, 0);
    assert_eq!(r.remap(None, msg(handle_addr(2), 0)), None);
    let (lo, hi) = r.take_record();
    assert_eq!((lo, (hi >> 32) as u8), (2 << 48, FR_IR_INDEX));
    // EIME is not offered; a table beyond RAM.
    for irta in [IRT | 1 << 11, 0xfff_f000 | 0xf] {
        r.w64(IRTA, irta);
        r.gcmd_or(GCMD_SIRTP);
        assert_eq!(r.remap(None, msg(handle_addr(1), 0)), None);
        assert_eq!((r.take_record().1 >> 32) as u8, FR_IR_TABLE);
    }
}

#[test]
fn wait_descriptor_writes_its_status() {
    let r = Rig::new();
    r.queue(IQ);
    r.desc(IQ, 0, WAIT | SW | 0xdead_beef << 32, 0x5004);
    r.w64(IQT, 0x10);
    assert_eq!(r.get(0x5000) >> 32, 0xdead_beef);
    assert_eq!(r.r64(IQH), 0x10);
    assert_eq!(r.r32(FSTS), 0);
    assert_eq!(r.r32(ICS), 0, "no IF");
    // Linux writes IQT with 32-bit accesses.
    r.desc(IQ, 1, WAIT | SW | 1 << 32, 0x5008);
    r.w32(IQT, 0x20);
    assert_eq!(r.get(0x5008), 1);
    assert_eq!(r.r64(IQH), 0x20);
}

#[test]
fn wait_descriptor_interrupt_completion() {
    let r = Rig::new();
    r.queue(IQ);
    r.w32(IEDATA, 0x41);
    r.w32(IEADDR, 0xfee0_0000);
    assert_eq!(r.r32(IECTL), CTL_IM, "masked at reset");
    r.w32(IECTL, 0);
    r.desc(IQ, 0, WAIT | IF, 0);
    r.desc(IQ, 1, WAIT | IF, 0);
    r.w64(IQT, 0x20);
    assert_eq!(r.r32(ICS), ICS_IWC);
    assert_eq!(
        r.msi.take(),
        [msg(0xfee0_0000, 0x41)],
        "one event while IWC is set"
    );
    r.w32(ICS, ICS_IWC);
    assert_eq!(r.r32(ICS), 0);
    r.w32(IECTL, CTL_IM);
    r.desc(IQ, 2, WAIT | IF | SW | 9 << 32, 0x6000);
    r.w64(IQT, 0x30);
    assert_eq!(r.get(0x6000), 9);
    assert!(r.msi.take().is_empty());
    assert_eq!(r.r32(IECTL), CTL_IM | CTL_IP);
    r.w32(IECTL, 0);
    assert_eq!(r.msi.take(), [msg(0xfee0_0000, 0x41)]);
    assert_eq!(r.r32(IECTL), 0);
}

/// A change hook that counts its calls and calls `remap` back (no deadlock).
fn counting_hook(r: &Rig) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let weak = Arc::downgrade(&r.vtd);
    let c = count.clone();
    r.vtd.set_change_hook(Box::new(move || {
        c.fetch_add(1, Ordering::SeqCst);
        if let Some(vtd) = weak.upgrade() {
            let _ = vtd.remap(None, msg(handle_addr(1), 0));
        }
    }));
    count
}

#[test]
fn change_hook_runs_after_ir_changes() {
    let r = Rig::new();
    let count = counting_hook(&r);
    let calls = || count.load(Ordering::SeqCst);
    r.gcmd_or(GCMD_QIE);
    r.gcmd_clear(GCMD_QIE);
    r.gcmd_or(GCMD_TE);
    assert_eq!(calls(), 0, "QI and TE do not change remapping");
    r.w64(IRTA, IRT | 0xf);
    r.gcmd_or(GCMD_SIRTP);
    assert_eq!(calls(), 1);
    r.gcmd_or(GCMD_IRE); // GSTS carries IRTPS: SIRTP latches again too
    assert_eq!(calls(), 2);
    r.gcmd_clear(GCMD_IRE);
    assert_eq!(calls(), 3);
    r.gcmd_clear(GCMD_CFI);
    assert_eq!(calls(), 3, "no change");
    r.gcmd_or(GCMD_CFI);
    assert_eq!(calls(), 4);
    r.vtd.reset();
    assert_eq!(calls(), 5);
    assert_eq!(r.r32(GSTS), 0);
}

#[test]
fn invalidation_descriptors_and_the_iec_hook() {
    let r = Rig::new();
    r.kut_init();
    r.w64(IQA, IQ);
    r.gcmd_clear(GCMD_QIE);
    r.gcmd_or(GCMD_QIE);
    let count = counting_hook(&r);
    r.desc(IQ, 0, 1 | 1 << 4, 0); // context cache, global
    r.desc(IQ, 1, 2 | 2 << 4 | 5 << 16, 0); // IOTLB, domain 5
    r.desc(IQ, 2, 2 | 3 << 4 | 1 << 6 | 1 << 7, 0x4000 | 1 << 6); // IOTLB page, IH
    r.desc(IQ, 3, 3 | 0x18 << 32, 0x1000); // device IOTLB
    r.w64(IQT, 0x40);
    assert_eq!(r.r64(IQH), 0x40);
    assert_eq!(count.load(Ordering::SeqCst), 0);
    r.desc(IQ, 4, 4, 0); // IEC, global
    r.desc(IQ, 5, 4 | 1 << 4 | 3 << 27 | 8 << 32, 0); // IEC, index 8, mask 3
    r.w64(IQT, 0x60);
    assert_eq!(r.r64(IQH), 0x60);
    // (The hook's own remap call records faults: only IQE matters here.)
    assert_eq!(r.r32(FSTS) & FSTS_IQE, 0);
    assert_eq!(count.load(Ordering::SeqCst), 1, "once per IQT write");
    // Granularity 0 is reserved.
    r.desc(IQ, 6, 1, 0);
    r.w64(IQT, 0x70);
    assert_ne!(r.r32(FSTS) & FSTS_IQE, 0);
    assert_eq!(r.r64(IQH), 0x60);
}

#[test]
fn bad_descriptors_stop_the_queue_with_iqe() {
    let r = Rig::new();
    r.unmask_faults();
    r.queue(IQ);
    // Slot 0 is all zeroes: type 0.
    r.w64(IQT, 0x10);
    assert_eq!(r.r32(FSTS), FSTS_IQE);
    assert_eq!(r.r64(IQH), 0);
    assert_eq!(r.msi.take(), [msg(0xfee0_0000, 0x4021)]);
    // Stopped until IQE is cleared; then it resumes at the (fixed) descriptor.
    r.desc(IQ, 0, WAIT | SW | 3 << 32, 0x5000);
    r.w64(IQT, 0x10);
    assert_eq!(r.get(0x5000), 0);
    r.w32(FSTS, FSTS_IQE);
    assert_eq!(r.get(0x5000), 3);
    assert_eq!((r.r64(IQH), r.r32(FSTS)), (0x10, 0));
    for (lo, hi) in [
        (WAIT | 1 << 7, 0),    // reserved bit
        (WAIT | SW, 0x5002),   // misaligned status address
        (WAIT | SW, MEM_SIZE), // status address not RAM
        (9, 0),                // unknown type
        (4, 1),                // IEC reserved upper quadword
    ] {
        r.desc(IQ, 1, lo, hi);
        r.w64(IQT, 0x20);
        assert_eq!(r.r32(FSTS), FSTS_IQE, "{lo:#x} {hi:#x}");
        assert_eq!(r.r64(IQH), 0x10);
        r.w64(IQT, 0x10);
        r.w32(FSTS, FSTS_IQE);
    }
    assert_eq!(r.msi.take().len(), 5);
}

#[test]
fn hostile_queue_registers() {
    let r = Rig::new();
    r.queue(IQ); // 256 entries
    for iqt in [256 << 4, 0x18, 0x7_fff0] {
        r.w64(IQT, iqt);
        assert_eq!(r.r32(FSTS), FSTS_IQE, "IQT {iqt:#x}");
        assert_eq!(r.r64(IQH), 0);
        r.w64(IQT, 0);
        r.w32(FSTS, FSTS_IQE);
    }
    // 256-bit descriptors are not offered.
    r.w64(IQA, IQ | 1 << 11);
    r.w64(IQT, 0x10);
    assert_eq!(r.r32(FSTS), FSTS_IQE);
    r.w64(IQT, 0);
    r.w32(FSTS, FSTS_IQE);
    // The biggest queue (QS 7) entirely outside RAM.
    r.w64(IQA, 0xff00_0000 | 0xff);
    assert_eq!(r.r64(IQA), 0xff00_0007, "reserved bits dropped");
    r.w64(IQT, 0x7_fff0);
    assert_eq!(r.r32(FSTS), FSTS_IQE);
    assert_eq!(r.r64(IQH), 0);
    r.w64(IQT, 0);
    r.w32(FSTS, FSTS_IQE);
    // A queue that runs off the end of RAM: 256 descriptors fit.
    let base = MEM_SIZE - 0x1000;
    for i in 0..256 {
        r.desc(base, i, 4, 0);
    }
    r.w64(IQA, base | 7);
    r.w64(IQT, 300 << 4);
    assert_eq!(r.r32(FSTS), FSTS_IQE);
    assert_eq!(r.r64(IQH), 256 << 4);
}

#[test]
fn queue_wraps_around() {
    let r = Rig::new();
    r.queue(IQ);
    for i in 0..256 {
        r.desc(IQ, i, WAIT | SW | i << 32, 0x8000 + i * 4);
    }
    r.w64(IQT, 250 << 4);
    assert_eq!(r.r64(IQH), 250 << 4);
    r.w64(IQT, 5 << 4); // wraps: 250..=255, 0..5
    assert_eq!(r.r64(IQH), 5 << 4);
    assert_eq!(r.r32(FSTS), 0);
    let status: u32 = r.mem.read_obj(GuestAddress(0x8000 + 255 * 4)).unwrap();
    assert_eq!(status, 255);
    r.w64(IQT, 5 << 4); // IQT = IQH: nothing to do
    assert_eq!(r.r64(IQH), 5 << 4);
    // The largest queue, full: 32767 descriptors in one pass.
    let big = 0x40_0000;
    for i in 0..32768 {
        r.desc(big, i, 4, 0);
    }
    r.w64(IQA, big | 7);
    r.gcmd_clear(GCMD_QIE);
    r.gcmd_or(GCMD_QIE);
    r.w64(IQT, 32767 << 4);
    assert_eq!(r.r64(IQH), 32767 << 4);
    r.w64(IQT, 0);
    assert_eq!((r.r64(IQH), r.r32(FSTS)), (0, 0));
}

#[test]
fn register_commands_complete_at_once() {
    let r = Rig::new();
    r.w64(CCMD, 1 << 63 | 1 << 61); // global
    assert_eq!(r.r64(CCMD), 1 << 61 | 1 << 59, "ICC clear, CAIG global");
    r.w32(CCMD, 0x0005); // DID, no action yet
    r.w32(CCMD + 4, (1 << 31) | (2 << 29)); // ICC, domain
    assert_eq!(r.r64(CCMD), 2 << 59 | 2 << 61 | 5);
    r.w64(IVA, 0x1234_5000);
    r.w64(IOTLB, 1 << 63 | 2 << 60 | 7 << 32);
    assert_eq!(r.r64(IOTLB), 2 << 60 | 2 << 57 | 7 << 32);
    assert_eq!(r.r64(IVA), 0x1234_5000);
    r.w32(IOTLB + 4, (1 << 31) | (1 << 28));
    assert_eq!((r.r64(IOTLB) >> 57) & 3, 1);
    r.gcmd_or(GCMD_QIE);
    r.w32(GCMD, r.r32(GSTS) | 1 << 27); // WBF: a no-op
    assert_eq!(r.r32(GSTS), GCMD_QIE);
}

#[test]
fn odd_accesses_read_zero_and_write_nothing() {
    let r = Rig::new();
    for len in [1usize, 2, 3, 16] {
        let mut b = vec![0xffu8; len];
        BusDevice::read(&*r.vtd, 0, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{len}-byte read");
        BusDevice::write(&*r.vtd, GCMD, &vec![0xff; len]);
    }
    let mut b = [0xffu8; 4];
    BusDevice::read(&*r.vtd, 0x02, &mut b);
    assert_eq!(b, [0; 4]);
    let mut q = [0xffu8; 8];
    BusDevice::read(&*r.vtd, 0x0c, &mut q);
    assert_eq!(q, [0; 8], "misaligned quadword");
    BusDevice::read(&*r.vtd, VTD_LEN, &mut b);
    BusDevice::read(&*r.vtd, u64::MAX - 3, &mut b);
    assert_eq!(b, [0; 4]);
    BusDevice::write(&*r.vtd, 0x1a, &[0xff; 4]);
    BusDevice::write(&*r.vtd, u64::MAX - 7, &[0xff; 8]);
    assert_eq!(r.r32(GSTS), 0);
    // Read-only registers.
    r.w64(CAP, 0);
    r.w64(IQH, 0x50);
    assert_eq!(r.r64(CAP), CAP_VALUE);
    assert_eq!(r.r64(IQH), 0);
    assert_eq!(r.r32(0x300), 0, "unimplemented");
}

/// A small LCG (Knuth's MMIX constants).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }
}

#[test]
fn random_accesses_never_panic() {
    let r = Rig::new();
    let _count = counting_hook(&r);
    let mut rng = Lcg(0x5eed);
    let regs = [
        GCMD, RTADDR, CCMD, FSTS, FECTL, FEDATA, FEADDR, IQT, IQA, ICS, IECTL, IRTA, IVA, IOTLB,
        FRCD_HI,
    ];
    for i in 0..100_000 {
        let v = rng.next();
        let off = if v & 1 == 0 {
            regs[(v >> 1) as usize % regs.len()] + ((v >> 8) & 4)
        } else {
            (v >> 1) % 0x1100
        };
        let len = [1usize, 2, 4, 8, 8, 4, 3, 0][(v >> 20) as usize & 7];
        let mut val = rng.next().to_le_bytes();
        if val[7] & 1 == 0 {
            // Mostly addresses inside RAM so walks and queues get somewhere.
            val[3..].fill(0);
        }
        if i % 3 == 0 {
            BusDevice::read(&*r.vtd, off, &mut val[..len]);
        } else {
            BusDevice::write(&*r.vtd, off, &val[..len]);
        }
        if i % 7 == 0 {
            let sid = rng.next() as u16;
            let addr = rng.next() & 0xff_ffff;
            let mut buf = [0u8; 64];
            let _ = DmaSpace::read(&*r.vtd, sid, addr, &mut buf);
            let _ = DmaSpace::write(&*r.vtd, sid, addr ^ 0x800, &buf);
            let m = msg(0xfee0_0000 | (rng.next() & 0xf_ffff), rng.next() as u32);
            let _ = r.vtd.remap(Some(sid).filter(|_| i % 2 == 0), m);
        }
        // Random guest memory under the tables too.
        if i % 101 == 0 {
            let at = rng.next() % (MEM_SIZE - 8);
            r.put(at, rng.next());
        }
    }
    r.vtd.reset();
    assert_eq!(r.r32(GSTS), 0);
}

#[test]
fn concurrent_access_does_not_deadlock() {
    let r = Rig::new();
    let _count = counting_hook(&r);
    r.kut_init();
    let slpt = r.translated(EDU_SID, 3);
    r.map(slpt, 3, 0, 0x20_0000, 1, PTE_RW);
    let vtd = r.vtd.clone();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let vtd = vtd.clone();
            s.spawn(move || {
                for i in 0..2000u64 {
                    let mut b = [0u8; 16];
                    let _ = DmaSpace::read(&*vtd, EDU_SID, (i * 16) & 0x1fff, &mut b);
                    let _ = vtd.remap(None, msg(handle_addr(i & 3), 0));
                    let bit = if (i + t) % 2 == 0 { GCMD_IRE } else { 0 };
                    let gsts = {
                        let mut g = [0u8; 4];
                        BusDevice::read(&*vtd, GSTS, &mut g);
                        u32::from_le_bytes(g)
                    };
                    let cmd = (gsts & !GCMD_IRE) | bit;
                    BusDevice::write(&*vtd, GCMD, &cmd.to_le_bytes());
                }
            });
        }
    });
    assert!(r.dma_read(EDU_SID, 0, 4).is_ok());
}
