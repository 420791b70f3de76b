//! Interrupt remapping: an MSI write (address 0xFEEx_xxxx, 32-bit data) in the remappable
//! format selects an interrupt remapping table entry (IRTE), which holds the message the
//! local APICs receive. xAPIC mode only (no EIM): the destination is an 8-bit APIC ID.
//!
//! - Request: address bit 4 is the format (1: remappable), the handle is address bits 19:5
//!   with bit 2 as handle bit 15; with SHV (address bit 3) the data's bits 15:0 (the
//!   subhandle) are added. A compatibility-format request passes unchanged only with CFI.
//! - IRTE (16 bytes at the table base + 16 * index): P 0, FPD 1, DM 2, RH 3, TM 4, DLM 7:5,
//!   (bits 11:8 available to software), IM 15, vector 23:16, DST 63:32 (xAPIC: the APIC ID
//!   in bits 15:8, the rest reserved), SID 79:64, SQ 81:80, SVT 83:82; every other bit is
//!   reserved. IM = 1 (posted) is reserved too, as posted interrupts are not offered.
//! - Source validation (when the request carries a requester ID): SVT 1 compares the SID
//!   with the bits SQ leaves (0: all, 1: not bit 2, 2: not bits 2:1, 3: not bits 2:0); SVT 2
//!   wants the requester's bus within SID bits 15:8 ..= SID bits 7:0; SVT 3 is reserved.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::IrTable;
use crate::devices::dma::MsiMessage;

// Fault reasons (VT-d spec, interrupt-remapping fault conditions).
pub(super) const FR_IR_INDEX: u8 = 0x21;
pub(super) const FR_IR_NOT_PRESENT: u8 = 0x22;
pub(super) const FR_IR_TABLE: u8 = 0x23;
pub(super) const FR_IR_RESERVED: u8 = 0x24;
pub(super) const FR_IR_COMPAT: u8 = 0x25;
pub(super) const FR_IR_SID: u8 = 0x26;

const ADDR_FORMAT: u64 = 1 << 4;
const ADDR_SHV: u64 = 1 << 3;

const IRTE_P: u64 = 1 << 0;
const IRTE_FPD: u64 = 1 << 1;
/// Low quadword reserved bits in xAPIC mode: 14:12, IM (15, posted), 31:24, DST 39:32 and
/// DST 63:48.
const IRTE_LO_RESERVED: u64 = 0x7 << 12 | 1 << 15 | 0xff << 24 | 0xff << 32 | 0xffff << 48;
/// Upper quadword reserved bits: 63:20.
const IRTE_HI_RESERVED: u64 = !0xf_ffff;

/// What interrupt remapping looks like now (a snapshot taken under the device lock).
#[derive(Debug, Clone, Copy)]
pub(super) struct IrState {
    /// GSTS.CFIS: compatibility-format requests pass.
    pub cfis: bool,
    /// The latched table (`None`: none valid).
    pub table: Option<IrTable>,
}

/// Why a request was blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IrFault {
    pub reason: u8,
    /// The interrupt index the request computed (0 for compatibility format).
    pub index: u32,
    /// The IRTE's FPD: the fault is not recorded.
    pub fpd: bool,
}

/// The message `msg` from `sid` becomes, with remapping enabled.
pub(super) fn remap(
    mem: &GuestMemoryMmap,
    st: &IrState,
    sid: Option<u16>,
    msg: MsiMessage,
) -> Result<MsiMessage, IrFault> {
    if msg.addr & ADDR_FORMAT == 0 {
        return if st.cfis {
            Ok(msg)
        } else {
            Err(IrFault {
                reason: FR_IR_COMPAT,
                index: 0,
                fpd: false,
            })
        };
    }
    let mut index = ((msg.addr >> 5) & 0x7fff) as u32 | (((msg.addr >> 2) & 1) as u32) << 15;
    if msg.addr & ADDR_SHV != 0 {
        index += msg.data & 0xffff;
    }
    let early = |reason| IrFault {
        reason,
        index,
        fpd: false,
    };
    let table = st.table.ok_or(early(FR_IR_TABLE))?;
    if index >= table.entries {
        return Err(early(FR_IR_INDEX));
    }
    let (lo, hi) = read_irte(mem, table.base, index).ok_or(early(FR_IR_TABLE))?;
    let fpd = lo & IRTE_FPD != 0; // counts whether the entry is present or not
    let entry_fault = |reason| IrFault { reason, index, fpd };
    if lo & IRTE_P == 0 {
        return Err(entry_fault(FR_IR_NOT_PRESENT));
    }
    let svt = (hi >> 18) & 3;
    if lo & IRTE_LO_RESERVED != 0 || hi & IRTE_HI_RESERVED != 0 || svt == 3 {
        return Err(entry_fault(FR_IR_RESERVED));
    }
    if let Some(sid) = sid {
        if !source_valid(sid, hi) {
            return Err(entry_fault(FR_IR_SID));
        }
    }
    Ok(message(lo))
}

/// IRTE `index` of the table at `base`, or `None` when it is not guest RAM.
fn read_irte(mem: &GuestMemoryMmap, base: u64, index: u32) -> Option<(u64, u64)> {
    let at = base.checked_add(u64::from(index) * 16)?;
    let lo: u64 = mem.read_obj(GuestAddress(at)).ok()?;
    let hi: u64 = mem.read_obj(GuestAddress(at.checked_add(8)?)).ok()?;
    Some((lo, hi))
}

/// Whether requester `sid` may use the IRTE whose upper quadword is `hi` (SVT 0..=2).
fn source_valid(sid: u16, hi: u64) -> bool {
    let irte_sid = (hi & 0xffff) as u16;
    let sq = (hi >> 16) & 3;
    match (hi >> 18) & 3 {
        1 => {
            // SQ masks out function-number bits.
            let ignore: u16 = [0, 0b100, 0b110, 0b111][sq as usize];
            (sid ^ irte_sid) & !ignore == 0
        }
        2 => {
            let bus = sid >> 8;
            ((irte_sid >> 8)..=(irte_sid & 0xff)).contains(&bus)
        }
        _ => true, // 0: no validation
    }
}

/// The message the IRTE with low quadword `lo` delivers.
fn message(lo: u64) -> MsiMessage {
    let dm = (lo >> 2) & 1;
    let rh = (lo >> 3) & 1;
    let tm = ((lo >> 4) & 1) as u32;
    let dlm = ((lo >> 5) & 7) as u32;
    let vector = ((lo >> 16) & 0xff) as u32;
    let apic_id = (lo >> 40) & 0xff;
    MsiMessage {
        addr: 0xfee0_0000 | apic_id << 12 | rh << 3 | dm << 2,
        // A level-triggered message is an assert (bit 14).
        data: vector | dlm << 8 | tm << 15 | tm << 14,
    }
}
