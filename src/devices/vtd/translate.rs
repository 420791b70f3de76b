//! DMA remapping: the walk from a requester ID and a bus address (IOVA) to a guest-physical
//! address through the legacy root table, the context table and the second-level page
//! tables. Nothing is cached: every page of every transfer walks the tables in guest memory.
//!
//! - Root entry (16 bytes at root + bus * 16): P bit 0, context-table pointer bits 63:12;
//!   bits 11:1 and the upper quadword reserved.
//! - Context entry (16 bytes at ctp + devfn * 16): P bit 0, FPD bit 1, TT bits 3:2 (0:
//!   second-level translation, 2: pass-through; 1 (device TLB, no ECAP.DT here) and 3 are
//!   invalid), SLPTPTR bits 63:12; AW bits
//!   66:64 (1: 3 levels, 2: 4 levels), DID bits 87:72; bits 11:4, 71 and 127:88 reserved.
//! - Second-level entry: R bit 0, W bit 1, SP bit 7 (a 2 MiB page at level 2, 1 GiB at
//!   level 3), address bits 51:12. The R (read) or W (write) bit must be set at every level.
//!
//! The input address must fit in min(AGAW, MGAW) bits: a 4-level table translates 39-bit
//! addresses like a 3-level one, since MGAW is 39.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::PAGE_MASK;
use super::MGAW;

// Fault reasons (VT-d spec, "non-recoverable fault conditions").
pub(super) const FR_ROOT_NOT_PRESENT: u8 = 0x1;
pub(super) const FR_CONTEXT_NOT_PRESENT: u8 = 0x2;
pub(super) const FR_CONTEXT_INVALID: u8 = 0x3;
pub(super) const FR_BEYOND_AGAW: u8 = 0x4;
pub(super) const FR_WRITE: u8 = 0x5;
pub(super) const FR_READ: u8 = 0x6;
pub(super) const FR_PAGING_ENTRY: u8 = 0x7;
pub(super) const FR_ROOT_ENTRY: u8 = 0x8;
pub(super) const FR_CONTEXT_ENTRY: u8 = 0x9;
pub(super) const FR_ROOT_RESERVED: u8 = 0xa;
pub(super) const FR_CONTEXT_RESERVED: u8 = 0xb;
pub(super) const FR_PAGING_RESERVED: u8 = 0xc;

const ENTRY_P: u64 = 1 << 0;
const CONTEXT_FPD: u64 = 1 << 1;
const PTE_R: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_SP: u64 = 1 << 7;
/// Address bits 51:12 of a second-level entry.
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Context entry reserved bits: low quadword 11:4; upper quadword 7 (bit 71) and 63:24.
const CONTEXT_LO_RESERVED: u64 = 0xff0;
const CONTEXT_HI_RESERVED: u64 = 1 << 7 | !0xff_ffff;

/// Why a walk failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DmaFault {
    pub reason: u8,
    /// The context entry's FPD: the fault is not recorded.
    pub fpd: bool,
}

fn fault(reason: u8) -> DmaFault {
    DmaFault { reason, fpd: false }
}

/// A 16-byte table entry at `addr`, or `None` when it is not guest RAM.
fn read_entry(mem: &GuestMemoryMmap, addr: u64) -> Option<(u64, u64)> {
    let lo: u64 = mem.read_obj(GuestAddress(addr)).ok()?;
    let hi: u64 = mem.read_obj(GuestAddress(addr.checked_add(8)?)).ok()?;
    Some((lo, hi))
}

/// Translates `iova` of requester `sid` with the root table at `root` (`None`: no valid
/// root table latched) for a read or a `write`.
pub(super) fn translate(
    mem: &GuestMemoryMmap,
    root: Option<u64>,
    sid: u16,
    iova: u64,
    write: bool,
) -> Result<u64, DmaFault> {
    let root = root.ok_or(fault(FR_ROOT_ENTRY))?;
    let bus = u64::from(sid >> 8);
    let devfn = u64::from(sid & 0xff);
    let (re_lo, re_hi) = read_entry(mem, root | (bus * 16)).ok_or(fault(FR_ROOT_ENTRY))?;
    if re_lo & ENTRY_P == 0 {
        return Err(fault(FR_ROOT_NOT_PRESENT));
    }
    if re_lo & 0xffe != 0 || re_hi != 0 {
        return Err(fault(FR_ROOT_RESERVED));
    }
    let ctp = re_lo & PAGE_MASK;
    let (ce_lo, ce_hi) = read_entry(mem, ctp | (devfn * 16)).ok_or(fault(FR_CONTEXT_ENTRY))?;
    // FPD counts whether the entry is present or not.
    let fpd = ce_lo & CONTEXT_FPD != 0;
    let ctx_fault = |reason| DmaFault { reason, fpd };
    if ce_lo & ENTRY_P == 0 {
        return Err(ctx_fault(FR_CONTEXT_NOT_PRESENT));
    }
    if ce_lo & CONTEXT_LO_RESERVED != 0 || ce_hi & CONTEXT_HI_RESERVED != 0 {
        return Err(ctx_fault(FR_CONTEXT_RESERVED));
    }
    // TT 1 (device TLB) needs ECAP.DT, which this unit does not offer: invalid like 3.
    match (ce_lo >> 2) & 3 {
        0 => {}
        2 => return Ok(iova), // pass-through
        _ => return Err(ctx_fault(FR_CONTEXT_INVALID)),
    }
    let levels = match ce_hi & 7 {
        1 => 3,
        2 => 4,
        _ => return Err(ctx_fault(FR_CONTEXT_INVALID)),
    };
    let width = (12 + 9 * levels).min(MGAW);
    if iova >> width != 0 {
        return Err(ctx_fault(FR_BEYOND_AGAW));
    }
    walk(mem, ce_lo & PAGE_MASK, levels, iova, write).map_err(ctx_fault)
}

/// The second-level walk from the table at `table` with `levels` levels.
fn walk(
    mem: &GuestMemoryMmap,
    mut table: u64,
    levels: u32,
    iova: u64,
    write: bool,
) -> Result<u64, u8> {
    let (perm, denied) = if write {
        (PTE_W, FR_WRITE)
    } else {
        (PTE_R, FR_READ)
    };
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (iova >> shift) & 0x1ff;
        // `table` has bits 11:0 clear, so adding at most 4088 cannot carry out of bit 63.
        let pte: u64 = mem
            .read_obj(GuestAddress(table | (index * 8)))
            .map_err(|_| FR_PAGING_ENTRY)?;
        if pte & perm == 0 {
            return Err(denied);
        }
        let addr = pte & PTE_ADDR;
        if level == 1 {
            return Ok(addr | (iova & 0xfff));
        }
        if pte & PTE_SP != 0 {
            let size = 1u64 << shift;
            // Superpages: 2 MiB (level 2) and 1 GiB (level 3) only, aligned.
            if level > 3 || addr & (size - 1) != 0 {
                return Err(FR_PAGING_RESERVED);
            }
            return Ok(addr | (iova & (size - 1)));
        }
        table = addr;
    }
    // `levels` is 3 or 4: the loop returned at level 1.
    Err(FR_PAGING_ENTRY)
}
