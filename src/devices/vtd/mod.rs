//! An emulated Intel VT-d IOMMU: DMA remapping, interrupt remapping and queued invalidation,
//! as QEMU's `-device intel-iommu,intremap=on,eim=off` (aw-bits 39) presents it to a guest.
//! Written from the VT-d specification and the behaviour kvm-unit-tests' `intel-iommu` test
//! expects.
//!
//! One [`Vtd`] object is the MMIO device (the 4 KiB register block at [`VTD_BASE`]), the
//! [`DmaSpace`] PCI devices' DMA goes through, and the [`InterruptRemap`] their MSI
//! messages (and the IOAPIC's) go through. It caches nothing: every DMA page and every
//! remapped message reads the guest's tables, so the invalidation commands only complete.
//!
//! | offset | register | notes |
//! |---|---|---|
//! | 0x00 | VER | 1.0 |
//! | 0x08 | CAP | ND 256 domains, SAGAW 39/48-bit, MGAW 39, SLLPS 2M/1G, one fault record at 0x220 |
//! | 0x10 | ECAP | C, QI, IR, PT; IOTLB registers at 0x200; no EIM, no device TLB |
//! | 0x18 / 0x1c | GCMD / GSTS | TE, SRTP, WBF (no-op), QIE, IRE, SIRTP, CFI |
//! | 0x20 | RTADDR | legacy root table only (TTM = 0) |
//! | 0x28 | CCMD | completes at once |
//! | 0x34 .. 0x44 | FSTS, FECTL, FEDATA, FEADDR, FEUADDR | fault status and event |
//! | 0x80 .. 0x90 | IQH, IQT, IQA | invalidation queue (128-bit descriptors) |
//! | 0x9c .. 0xac | ICS, IECTL, IEDATA, IEADDR, IEUADDR | invalidation completion event |
//! | 0xb8 | IRTA | xAPIC mode only (EIME = 0) |
//! | 0x200 / 0x208 | IVA / IOTLB | completes at once |
//! | 0x220 | FRCD | the one fault recording register (128 bits) |
//!
//! Accesses are 32- or 64-bit at naturally aligned offsets; anything else reads 0 and is
//! ignored on write. A 64-bit register may be accessed as two 32-bit halves: CCMD and IOTLB
//! act on a write of their upper half, IQT on a write of its lower half.
//!
//! Locking: the registers sit behind one mutex, held only for an access. DMA and remapping
//! take a snapshot of what they need under it and walk the guest's tables without it.
//! Interrupts the IOMMU raises (fault and invalidation completion events) and the change
//! hook run after the lock is released: the hook calls [`InterruptRemap::remap`] back.
//!
//! Faults (unless the context entry's or IRTE's FPD is set) go to the single fault
//! recording register: fault info (the page address, or the interrupt index << 48 for
//! interrupt-remapping faults), SID, reason, T (a read), F. With F still set a new fault
//! only sets FSTS.PFO. A fault event (FEDATA/FEADDR) is sent when no fault condition was
//! pending; while FECTL.IM is set it stays pending (FECTL.IP) until unmasked.
//!
//! Not modelled: scalable mode, first-level tables, device TLBs / ATS, page requests,
//! posted interrupts, x2APIC (EIM), protected memory regions, advanced fault logging,
//! snoop control and execute permission.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::dma::{DmaError, DmaSpace, InterruptRemap, MsiMessage, MsiSender};
use crate::bus::BusDevice;
use crate::ratelimit::RateLimit;
use regs::{Effects, FaultRecord, Regs, GCMD_CFI, GCMD_IRE, GCMD_TE, PAGE_MASK};
use translate::DmaFault;

mod irte;
mod qi;
mod regs;
mod translate;

/// Where the VMM maps the register block (QEMU's Q35 address).
pub const VTD_BASE: u64 = 0xfed9_0000;
/// Size of the register block.
pub const VTD_LEN: u64 = 0x1000;
/// The address width in bits: the maximum guest address width (MGAW) DMA can use, and the
/// host address width the DMAR table reports.
pub const ADDRESS_WIDTH: u8 = 39;
/// The DMAR table's Host Address Width field (the width minus one).
pub const DMAR_HOST_ADDRESS_WIDTH: u8 = ADDRESS_WIDTH - 1;
/// DMAR table flags: bit 0 INTR_REMAP (interrupt remapping is supported), bit 1
/// X2APIC_OPT_OUT (the unit has no extended interrupt mode: xAPIC destinations only).
pub const DMAR_FLAGS: u8 = 0b11;
/// DRHD flags: bit 0 INCLUDE_PCI_ALL (every PCI device of segment 0 is behind this unit).
pub const DRHD_FLAGS: u8 = 1;
/// The IOAPIC's requester ID for the DRHD's IOAPIC device scope (bus 0xff, device 0,
/// function 0, as QEMU's Q35). Linux enables interrupt remapping only when the DRHD lists
/// the IOAPIC. The IOAPIC's own requests come without a SID ([`InterruptRemap::remap`] with
/// `None`); this SID is what their fault records show.
pub const IOAPIC_SID: u16 = 0xff00;

/// MGAW as the register and walk code use it.
const MGAW: u32 = ADDRESS_WIDTH as u32;

static LOG_ACCESS: RateLimit = RateLimit::new(10);
static LOG_QUEUE: RateLimit = RateLimit::new(10);
static LOG_FAULT: RateLimit = RateLimit::new(10);
static LOG_MSI: RateLimit = RateLimit::new(10);

type ChangeHook = Arc<dyn Fn() + Send + Sync>;

/// The IOMMU: MMIO register block, DMA space and interrupt remapper.
pub struct Vtd {
    mem: GuestMemoryMmap,
    msi: Arc<dyn MsiSender>,
    regs: Mutex<Regs>,
    hook: Mutex<Option<ChangeHook>>,
}

impl Vtd {
    /// An IOMMU reading its tables from `mem` and raising its own interrupts through `msi`,
    /// in its reset state (translation and remapping off).
    pub fn new(mem: GuestMemoryMmap, msi: Arc<dyn MsiSender>) -> Arc<Self> {
        Arc::new(Self {
            mem,
            msi,
            regs: Mutex::new(Regs::default()),
            hook: Mutex::new(None),
        })
    }

    /// Back to the reset state (a VM reset): translation and remapping off.
    pub fn reset(&self) {
        *self.regs() = Regs::default();
        self.finish(Effects {
            msis: Vec::new(),
            ir_changed: true,
        });
    }

    fn regs(&self) -> MutexGuard<'_, Regs> {
        // The registers are plain data: a panic elsewhere leaves them usable.
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Acts on what a locked operation asked for. Must be called without the lock.
    fn finish(&self, fx: Effects) {
        for msg in fx.msis {
            if let Err(e) = self.msi.send(msg) {
                LOG_MSI.warn(|| format!("vtd: cannot send the event interrupt {msg:x?}: {e}"));
            }
        }
        if fx.ir_changed {
            let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(hook) = hook {
                hook();
            }
        }
    }

    fn record(&self, fault: FaultRecord) {
        let mut fx = Effects::default();
        self.regs().record_fault(&fault, &mut fx);
        self.finish(fx);
    }

    /// A DMA fault on `iova`: recorded unless FPD, and the error for the caller.
    fn dma_fault(&self, sid: u16, iova: u64, write: bool, f: DmaFault) -> DmaError {
        LOG_FAULT.log(|| {
            let dir = if write { "write" } else { "read" };
            format!(
                "vtd: DMA {dir} by {sid:04x} at {iova:#x} blocked, reason {:#x}",
                f.reason
            )
        });
        if !f.fpd {
            self.record(FaultRecord {
                info: iova & PAGE_MASK,
                sid,
                reason: f.reason,
                read: !write,
            });
        }
        DmaError::Blocked {
            sid,
            addr: iova,
            reason: f.reason,
        }
    }

    /// Translates `[addr, addr + len)` page by page and calls `f` with each guest-physical
    /// address and the part of the buffer it covers.
    fn pages(
        &self,
        sid: u16,
        addr: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(u64, Range<usize>) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        if len == 0 {
            return Ok(());
        }
        let root = {
            let regs = self.regs();
            (regs.gsts & GCMD_TE != 0).then_some(regs.root)
        };
        let Some(root) = root else {
            return f(addr, 0..len); // translation off: identity
        };
        let mut done = 0;
        while done < len {
            let Some(iova) = addr.checked_add(done as u64) else {
                let f = DmaFault {
                    reason: translate::FR_BEYOND_AGAW,
                    fpd: false,
                };
                return Err(self.dma_fault(sid, addr, write, f));
            };
            let n = (len - done).min(0x1000 - (iova & 0xfff) as usize);
            let gpa = translate::translate(&self.mem, root, sid, iova, write)
                .map_err(|fault| self.dma_fault(sid, iova, write, fault))?;
            f(gpa, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

/// A register access the block decodes: 4 or 8 bytes, naturally aligned, inside it.
fn access_ok(offset: u64, len: u64) -> bool {
    (len == 4 || len == 8) && offset % len == 0 && offset < VTD_LEN
}

impl BusDevice for Vtd {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if !access_ok(offset, len) {
            LOG_ACCESS.log(|| format!("vtd: {len}-byte read at {offset:#x} reads 0"));
            return;
        }
        let val = self.regs().read(offset, len);
        data.copy_from_slice(&val.to_le_bytes()[..data.len()]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !access_ok(offset, len) {
            LOG_ACCESS.log(|| format!("vtd: {len}-byte write at {offset:#x} ignored"));
            return;
        }
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let val = u64::from_le_bytes(bytes);
        let mut fx = Effects::default();
        self.regs().write(offset, len, val, &self.mem, &mut fx);
        // The lock is released: the hook may call `remap`.
        self.finish(fx);
    }
}

impl DmaSpace for Vtd {
    fn read(&self, sid: u16, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mem = &self.mem;
        self.pages(sid, addr, buf.len(), false, |gpa, range| {
            mem.read_slice(&mut buf[range], GuestAddress(gpa))
                .map_err(|_| DmaError::NotRam { sid, addr: gpa })
        })
    }

    fn write(&self, sid: u16, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        let mem = &self.mem;
        self.pages(sid, addr, buf.len(), true, |gpa, range| {
            mem.write_slice(&buf[range], GuestAddress(gpa))
                .map_err(|_| DmaError::NotRam { sid, addr: gpa })
        })
    }
}

impl Vtd {
    /// Interrupt remapping; a blocked request is recorded (unless its IRTE says FPD) only
    /// with `record`.
    fn remap_request(&self, sid: Option<u16>, msg: MsiMessage, record: bool) -> Option<MsiMessage> {
        let st = {
            let regs = self.regs();
            if regs.gsts & GCMD_IRE == 0 {
                return Some(msg);
            }
            irte::IrState {
                cfis: regs.gsts & GCMD_CFI != 0,
                table: regs.ir_table,
            }
        };
        let fault = match irte::remap(&self.mem, &st, sid, msg) {
            Ok(out) => return Some(out),
            Err(_) if !record => return None,
            Err(fault) => fault,
        };
        LOG_FAULT.log(|| {
            format!(
                "vtd: interrupt {msg:x?} from {sid:04x?} blocked, reason {:#x}",
                fault.reason
            )
        });
        if !fault.fpd {
            self.record(FaultRecord {
                info: u64::from(fault.index & 0xffff) << 48,
                sid: sid.unwrap_or(IOAPIC_SID),
                reason: fault.reason,
                read: false,
            });
        }
        None
    }
}

impl InterruptRemap for Vtd {
    fn remap(&self, sid: Option<u16>, msg: MsiMessage) -> Option<MsiMessage> {
        self.remap_request(sid, msg, true)
    }

    fn lookup(&self, sid: Option<u16>, msg: MsiMessage) -> Option<MsiMessage> {
        self.remap_request(sid, msg, false)
    }

    fn set_change_hook(&self, hook: Box<dyn Fn() + Send + Sync>) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::from(hook));
    }
}

#[cfg(test)]
mod tests;
