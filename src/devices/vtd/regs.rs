//! The register file: what the guest reads and writes in the 4 KiB block, the global
//! commands, the fault recording register and the two event interrupts (fault event,
//! invalidation completion event). Queue processing is in `qi.rs`.
//!
//! Everything here runs under the device lock; interrupts to send and "the remapping may
//! have changed" are collected in [`Effects`] and acted on after the lock is released.

use vm_memory::GuestMemoryMmap;

use super::{LOG_ACCESS, MGAW};
use crate::devices::dma::MsiMessage;

// Register offsets.
pub(super) const VER: u64 = 0x00;
pub(super) const CAP: u64 = 0x08;
pub(super) const ECAP: u64 = 0x10;
pub(super) const GCMD: u64 = 0x18;
pub(super) const GSTS: u64 = 0x1c;
pub(super) const RTADDR: u64 = 0x20;
pub(super) const CCMD: u64 = 0x28;
pub(super) const FSTS: u64 = 0x34;
pub(super) const FECTL: u64 = 0x38;
pub(super) const FEDATA: u64 = 0x3c;
pub(super) const FEADDR: u64 = 0x40;
pub(super) const FEUADDR: u64 = 0x44;
pub(super) const IQH: u64 = 0x80;
pub(super) const IQT: u64 = 0x88;
pub(super) const IQA: u64 = 0x90;
pub(super) const ICS: u64 = 0x9c;
pub(super) const IECTL: u64 = 0xa0;
pub(super) const IEDATA: u64 = 0xa4;
pub(super) const IEADDR: u64 = 0xa8;
pub(super) const IEUADDR: u64 = 0xac;
pub(super) const IRTA: u64 = 0xb8;
/// Invalidate Address register (the IOTLB invalidation registers' first half).
pub(super) const IVA: u64 = 0x200;
/// IOTLB Invalidate register.
pub(super) const IOTLB: u64 = 0x208;
/// The single fault recording register (128 bits).
pub(super) const FRCD_LO: u64 = 0x220;
pub(super) const FRCD_HI: u64 = 0x228;

/// Version 1.0.
pub(super) const VER_VALUE: u32 = 0x10;

/// CAP: ND = 2 (256 domains), SAGAW 39- and 48-bit, MGAW, FRO, SLLPS 2 MiB + 1 GiB; NFR = 0
/// (one fault record), no PSI, CM = 0, RWBF = 0, no protected memory regions.
pub(super) const CAP_VALUE: u64 =
    2 | 0b0_0110 << 8 | ((MGAW as u64 - 1) << 16) | ((FRCD_LO / 16) << 24) | 0b0011 << 34;

/// ECAP: C (coherent walks), QI, IR, PT, IRO and MHMV = 15; no EIM, no device TLB.
pub(super) const ECAP_VALUE: u64 = 1 | 1 << 1 | 1 << 3 | 1 << 6 | (IVA / 16) << 8 | 0xf << 20;

// GCMD / GSTS bits (a status bit sits at its command bit's position).
pub(super) const GCMD_TE: u32 = 1 << 31;
pub(super) const GCMD_SRTP: u32 = 1 << 30;
pub(super) const GCMD_QIE: u32 = 1 << 26;
pub(super) const GCMD_IRE: u32 = 1 << 25;
pub(super) const GCMD_SIRTP: u32 = 1 << 24;
pub(super) const GCMD_CFI: u32 = 1 << 23;
/// The command bits whose status follows the last GCMD write.
const GCMD_PERSISTENT: u32 = GCMD_TE | GCMD_QIE | GCMD_IRE | GCMD_CFI;

// FSTS bits.
pub(super) const FSTS_PFO: u32 = 1 << 0;
pub(super) const FSTS_PPF: u32 = 1 << 1;
pub(super) const FSTS_IQE: u32 = 1 << 4;
pub(super) const FSTS_ICE: u32 = 1 << 5;
pub(super) const FSTS_ITE: u32 = 1 << 6;
const FSTS_W1C: u32 = FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE;
/// Conditions that keep a fault event pending: no new event while any is set.
const FSTS_EVENT: u32 = FSTS_W1C | FSTS_PPF;

// FECTL / IECTL bits.
pub(super) const CTL_IM: u32 = 1 << 31;
pub(super) const CTL_IP: u32 = 1 << 30;

// ICS bit.
pub(super) const ICS_IWC: u32 = 1 << 0;

// CCMD and IOTLB register fields.
const CCMD_ICC: u64 = 1 << 63;
const CCMD_CIRG_SHIFT: u32 = 61;
const CCMD_CAIG_SHIFT: u32 = 59;
const IOTLB_IVT: u64 = 1 << 63;
const IOTLB_IIRG_SHIFT: u32 = 60;
const IOTLB_IAIG_SHIFT: u32 = 57;

/// Fault recording register, upper quadword: F (bit 127) and T (bit 126, a read).
pub(super) const FRCD_F: u64 = 1 << 63;
pub(super) const FRCD_T: u64 = 1 << 62;

/// Bits 63:12 of a register holding a 4 KiB-aligned address.
pub(super) const PAGE_MASK: u64 = !0xfff;
/// RTADDR: address and TTM (bits 11:10).
const RTADDR_MASK: u64 = PAGE_MASK | 0xc00;
/// IQA: address, DW (bit 11), QS (bits 2:0).
const IQA_MASK: u64 = PAGE_MASK | 1 << 11 | 0x7;
/// IRTA: address, EIME (bit 11), S (bits 3:0).
const IRTA_MASK: u64 = PAGE_MASK | 1 << 11 | 0xf;
const IRTA_EIME: u64 = 1 << 11;
/// IQT / IQH: the descriptor index (bits 18:4) and, for IQT, the must-be-zero bits 3:0.
pub(super) const IQT_MASK: u64 = 0x7_ffff;

/// What a register access asks the caller to do once the lock is released.
#[derive(Debug, Default)]
pub(super) struct Effects {
    /// Interrupt messages the IOMMU itself raises (fault and invalidation events).
    pub msis: Vec<MsiMessage>,
    /// What `remap` returns may have changed: run the change hook.
    pub ir_changed: bool,
}

/// The interrupt remapping table latched by SIRTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IrTable {
    pub base: u64,
    /// 2^(S+1) entries.
    pub entries: u32,
}

impl IrTable {
    /// The table IRTA describes; `None` with EIME set (x2APIC mode is not offered).
    fn from_irta(irta: u64) -> Option<Self> {
        (irta & IRTA_EIME == 0).then_some(Self {
            base: irta & PAGE_MASK,
            entries: 2 << (irta & 0xf),
        })
    }
}

/// A fault to record in the fault recording register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FaultRecord {
    /// Fault info (bits 63:12): the page address, or the interrupt index << 48.
    pub info: u64,
    pub sid: u16,
    pub reason: u8,
    /// A DMA read (the T bit); false for writes and interrupt requests.
    pub read: bool,
}

/// The guest-visible register state.
#[derive(Debug, Clone)]
pub(super) struct Regs {
    pub gsts: u32,
    pub rtaddr: u64,
    /// The root table SRTP latched: `None` before the first latch or when RTADDR.TTM was
    /// not 0 (only the legacy root table is supported).
    pub root: Option<u64>,
    pub ccmd: u64,
    /// PFO, IQE, ICE, ITE: PPF comes from the fault record's F bit.
    pub fsts: u32,
    pub fectl: u32,
    pub fedata: u32,
    pub feaddr: u32,
    pub feuaddr: u32,
    pub iqh: u64,
    pub iqt: u64,
    pub iqa: u64,
    pub ics: u32,
    pub iectl: u32,
    pub iedata: u32,
    pub ieaddr: u32,
    pub ieuaddr: u32,
    pub irta: u64,
    /// The table SIRTP latched (`None` before the first latch or with EIME set).
    pub ir_table: Option<IrTable>,
    pub iva: u64,
    pub iotlb: u64,
    pub frcd: [u64; 2],
}

impl Default for Regs {
    fn default() -> Self {
        Self {
            gsts: 0,
            rtaddr: 0,
            root: None,
            ccmd: 0,
            fsts: 0,
            fectl: CTL_IM, // events masked at reset
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            iectl: CTL_IM,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
            irta: 0,
            ir_table: None,
            iva: 0,
            iotlb: 0,
            frcd: [0; 2],
        }
    }
}

/// A write of `val` to FECTL or IECTL (`ctl`): IM is the guest's, IP read-only. True when
/// this unmasked a pending event: the caller sends it (and IP is cleared).
fn unmask(ctl: &mut u32, val: u32) -> bool {
    let send = *ctl & CTL_IP != 0 && val & CTL_IM == 0;
    *ctl = (*ctl & CTL_IP) | (val & CTL_IM);
    if send {
        *ctl &= !CTL_IP;
    }
    send
}

/// The 64-bit registers (accessed as a quadword or as two doublewords).
fn is_reg64(off: u64) -> bool {
    matches!(
        off,
        CAP | ECAP | RTADDR | CCMD | IQH | IQT | IQA | IRTA | IVA | IOTLB | FRCD_LO | FRCD_HI
    )
}

impl Regs {
    /// FSTS as the guest reads it (FRI is always 0: there is one record).
    pub fn fsts_value(&self) -> u32 {
        let ppf = if self.frcd[1] & FRCD_F != 0 {
            FSTS_PPF
        } else {
            0
        };
        self.fsts | ppf
    }

    /// A read of `len` (4 or 8) bytes at `off` (aligned to `len`).
    pub fn read(&self, off: u64, len: u64) -> u64 {
        if len == 8 {
            if is_reg64(off) {
                return self.read64(off);
            }
            return u64::from(self.read32(off)) | u64::from(self.read32(off + 4)) << 32;
        }
        let quad = off & !7;
        if is_reg64(quad) {
            return (self.read64(quad) >> ((off & 4) * 8)) & 0xffff_ffff;
        }
        u64::from(self.read32(off))
    }

    fn read64(&self, off: u64) -> u64 {
        match off {
            CAP => CAP_VALUE,
            ECAP => ECAP_VALUE,
            RTADDR => self.rtaddr,
            CCMD => self.ccmd,
            IQH => self.iqh,
            IQT => self.iqt,
            IQA => self.iqa,
            IRTA => self.irta,
            IVA => self.iva,
            IOTLB => self.iotlb,
            FRCD_LO => self.frcd[0],
            FRCD_HI => self.frcd[1],
            _ => 0,
        }
    }

    fn read32(&self, off: u64) -> u32 {
        match off {
            VER => VER_VALUE,
            GSTS => self.gsts,
            FSTS => self.fsts_value(),
            FECTL => self.fectl,
            FEDATA => self.fedata,
            FEADDR => self.feaddr,
            FEUADDR => self.feuaddr,
            ICS => self.ics,
            IECTL => self.iectl,
            IEDATA => self.iedata,
            IEADDR => self.ieaddr,
            IEUADDR => self.ieuaddr,
            _ => 0, // GCMD is write-only; reserved and unimplemented registers read 0
        }
    }

    /// A write of `len` (4 or 8) bytes at `off` (aligned to `len`).
    pub fn write(&mut self, off: u64, len: u64, val: u64, mem: &GuestMemoryMmap, fx: &mut Effects) {
        if len == 8 {
            if is_reg64(off) {
                self.write64(off, val, u64::MAX, mem, fx);
            } else {
                self.write32(off, val as u32, mem, fx);
                self.write32(off + 4, (val >> 32) as u32, mem, fx);
            }
            return;
        }
        let quad = off & !7;
        if is_reg64(quad) {
            let shift = (off & 4) * 8;
            self.write64(quad, val << shift, 0xffff_ffff << shift, mem, fx);
        } else {
            self.write32(off, val as u32, mem, fx);
        }
    }

    /// A write of the bytes of `val` selected by `mask` to the 64-bit register at `off`.
    fn write64(&mut self, off: u64, val: u64, mask: u64, mem: &GuestMemoryMmap, fx: &mut Effects) {
        let merge = |old: u64| (old & !mask) | (val & mask);
        let low_half = mask & 0xffff_ffff != 0;
        let high_half = mask >> 32 != 0;
        match off {
            RTADDR => self.rtaddr = merge(self.rtaddr) & RTADDR_MASK,
            CCMD => {
                self.ccmd = merge(self.ccmd);
                if high_half {
                    self.context_command();
                }
            }
            IQT => {
                self.iqt = merge(self.iqt) & IQT_MASK;
                if low_half {
                    self.process_queue(mem, fx);
                }
            }
            IQA => self.iqa = merge(self.iqa) & IQA_MASK,
            IRTA => self.irta = merge(self.irta) & IRTA_MASK,
            IVA => self.iva = merge(self.iva),
            IOTLB => {
                self.iotlb = merge(self.iotlb);
                if high_half {
                    self.iotlb_command();
                }
            }
            FRCD_HI if val & mask & FRCD_F != 0 => {
                self.frcd[1] &= !FRCD_F;
                self.status_cleared();
            }
            _ => {
                LOG_ACCESS.log(|| format!("vtd: write {val:#x} to read-only register {off:#x}"));
            }
        }
    }

    fn write32(&mut self, off: u64, val: u32, mem: &GuestMemoryMmap, fx: &mut Effects) {
        match off {
            GCMD => self.global_command(val, mem, fx),
            FSTS => {
                let clear = val & FSTS_W1C & self.fsts;
                self.fsts &= !clear;
                self.status_cleared();
                if clear & FSTS_IQE != 0 {
                    // The queue stopped at the bad descriptor; fetching resumes there.
                    self.process_queue(mem, fx);
                }
            }
            FECTL => {
                if unmask(&mut self.fectl, val) {
                    fx.msis.push(self.fault_message());
                }
            }
            FEDATA => self.fedata = val & 0xffff,
            FEADDR => self.feaddr = val & !3,
            FEUADDR => self.feuaddr = val,
            ICS => {
                if val & ICS_IWC != 0 {
                    self.ics &= !ICS_IWC;
                    self.iectl &= !CTL_IP;
                }
            }
            IECTL => {
                if unmask(&mut self.iectl, val) {
                    fx.msis.push(self.completion_message());
                }
            }
            IEDATA => self.iedata = val & 0xffff,
            IEADDR => self.ieaddr = val & !3,
            IEUADDR => self.ieuaddr = val,
            _ => {
                LOG_ACCESS.log(|| format!("vtd: write {val:#x} to register {off:#x} ignored"));
            }
        }
    }

    /// GCMD: the persistent bits take effect at once, the one-shot bits latch.
    fn global_command(&mut self, val: u32, mem: &GuestMemoryMmap, fx: &mut Effects) {
        let old = self.gsts;
        self.gsts = (old & !GCMD_PERSISTENT) | (val & GCMD_PERSISTENT);
        if val & GCMD_SRTP != 0 {
            // Only the legacy root table (TTM = 0): anything else blocks every DMA request.
            self.root = (self.rtaddr & 0xc00 == 0).then_some(self.rtaddr & PAGE_MASK);
            self.gsts |= GCMD_SRTP; // RTPS
        }
        if val & GCMD_SIRTP != 0 {
            self.ir_table = IrTable::from_irta(self.irta);
            self.gsts |= GCMD_SIRTP; // IRTPS
            fx.ir_changed = true;
        }
        // WBF (bit 27): there is no write buffer (CAP.RWBF = 0), WBFS stays 0. SFL: no advanced
        // fault logging (CAP.AFL = 0).
        let changed = old ^ self.gsts;
        if changed & (GCMD_IRE | GCMD_CFI) != 0 {
            fx.ir_changed = true;
        }
        if changed & self.gsts & GCMD_QIE != 0 {
            self.iqh = 0;
            self.process_queue(mem, fx);
        }
    }

    /// CCMD with ICC set: there is no context cache, the invalidation completes at once at
    /// the granularity asked for.
    fn context_command(&mut self) {
        if self.ccmd & CCMD_ICC == 0 {
            return;
        }
        let cirg = (self.ccmd >> CCMD_CIRG_SHIFT) & 3;
        self.ccmd &= !(CCMD_ICC | 3 << CCMD_CAIG_SHIFT);
        self.ccmd |= cirg << CCMD_CAIG_SHIFT;
    }

    /// IOTLB register with IVT set: completes at once (no IOTLB).
    fn iotlb_command(&mut self) {
        if self.iotlb & IOTLB_IVT == 0 {
            return;
        }
        let iirg = (self.iotlb >> IOTLB_IIRG_SHIFT) & 3;
        self.iotlb &= !(IOTLB_IVT | 3 << IOTLB_IAIG_SHIFT);
        self.iotlb |= iirg << IOTLB_IAIG_SHIFT;
    }

    /// After the guest cleared a status bit: with nothing left to service, the pending
    /// fault event (IP) is dropped.
    fn status_cleared(&mut self) {
        if self.fsts_value() & FSTS_EVENT == 0 {
            self.fectl &= !CTL_IP;
        }
    }

    fn fault_message(&self) -> MsiMessage {
        // FEUADDR only matters with x2APIC destinations (ECAP.EIM = 0 here).
        MsiMessage {
            addr: u64::from(self.feaddr),
            data: self.fedata,
        }
    }

    fn completion_message(&self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.ieaddr),
            data: self.iedata,
        }
    }

    /// A fault condition arose while FSTS read `pre`: an event unless one is pending.
    fn fault_event(&mut self, pre: u32, fx: &mut Effects) {
        if pre & FSTS_EVENT != 0 || self.fectl & CTL_IP != 0 {
            return;
        }
        if self.fectl & CTL_IM != 0 {
            self.fectl |= CTL_IP;
        } else {
            fx.msis.push(self.fault_message());
        }
    }

    /// Records a primary fault in the one fault recording register, or sets PFO when it is
    /// still taken.
    pub fn record_fault(&mut self, f: &FaultRecord, fx: &mut Effects) {
        let pre = self.fsts_value();
        if self.frcd[1] & FRCD_F != 0 {
            self.fsts |= FSTS_PFO;
            return; // PPF is set: the event for it is pending
        }
        let t = if f.read { FRCD_T } else { 0 };
        self.frcd = [
            f.info & PAGE_MASK,
            u64::from(f.sid) | u64::from(f.reason) << 32 | t | FRCD_F,
        ];
        self.fault_event(pre, fx);
    }

    /// An invalidation queue error: IQE and a fault event.
    pub fn queue_error(&mut self, fx: &mut Effects) {
        let pre = self.fsts_value();
        self.fsts |= FSTS_IQE;
        self.fault_event(pre, fx);
    }

    /// An invalidation wait descriptor with IF: IWC and, on its 0 -> 1 edge, the
    /// completion event.
    pub fn wait_completion(&mut self, fx: &mut Effects) {
        if self.ics & ICS_IWC != 0 {
            return;
        }
        self.ics |= ICS_IWC;
        if self.iectl & CTL_IM != 0 {
            self.iectl |= CTL_IP;
        } else {
            fx.msis.push(self.completion_message());
        }
    }
}
