//! Queued invalidation: the guest writes 128-bit descriptors into a ring in its memory (IQA)
//! and moves the tail (IQT); the IOMMU executes them from the head (IQH) on, synchronously,
//! inside the IQT write. The model caches nothing, so context-cache, IOTLB and device-IOTLB
//! invalidations only need to be well formed; an interrupt-entry-cache invalidation tells
//! the change hook; an invalidation wait writes its status and/or raises the completion
//! event.
//!
//! A bad descriptor (unknown type, reserved bits, not in guest RAM, a status address that is
//! not RAM), a bad tail (beyond the queue, bits 3:0 set) or 256-bit descriptors (IQA.DW) set
//! FSTS.IQE and stop the queue at that descriptor: IQH keeps pointing at it, and fetching
//! resumes there once the guest clears IQE. A pass executes at most one queue's worth of
//! descriptors, so it always ends.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::{Effects, Regs, FSTS_IQE, GCMD_QIE, IQT_MASK, PAGE_MASK};
use super::LOG_QUEUE;

/// Descriptor types (bits 3:0 of the low quadword).
const TYPE_CONTEXT: u64 = 1;
const TYPE_IOTLB: u64 = 2;
const TYPE_DEV_IOTLB: u64 = 3;
const TYPE_IEC: u64 = 4;
const TYPE_WAIT: u64 = 5;

/// Invalidation wait: IF (bit 4), SW (bit 5); FN (bit 6) needs nothing here.
const WAIT_IF: u64 = 1 << 4;
const WAIT_SW: u64 = 1 << 5;

/// The bits 2:0 of IQA: the queue holds 2^QS pages of 256 descriptors.
const IQA_QS: u64 = 0x7;
/// IQA.DW: 256-bit descriptors (scalable mode only, not offered).
const IQA_DW: u64 = 1 << 11;
const DESC_SIZE: u64 = 16;

/// Bits `hi..=lo` set.
const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// Why a descriptor was refused (for the log).
type DescError = &'static str;

impl Regs {
    /// Executes the descriptors from IQH up to IQT while QI is on and no queue error is
    /// pending.
    pub(super) fn process_queue(&mut self, mem: &GuestMemoryMmap, fx: &mut Effects) {
        if self.gsts & GCMD_QIE == 0 || self.fsts & FSTS_IQE != 0 || self.iqt == self.iqh {
            return; // off, stopped, or nothing to fetch
        }
        let entries = 256u64 << (self.iqa & IQA_QS);
        let head = (self.iqh & IQT_MASK) >> 4;
        let tail = (self.iqt & IQT_MASK) >> 4;
        let setup_error = if self.iqa & IQA_DW != 0 {
            Some("256-bit descriptors (IQA.DW) are not supported")
        } else if self.iqt & 0xf != 0 {
            Some("IQT bits 3:0 are not 0")
        } else if tail >= entries || head >= entries {
            Some("IQT or IQH beyond the queue")
        } else {
            None
        };
        if let Some(why) = setup_error {
            LOG_QUEUE.log(|| format!("vtd: invalidation queue error: {why} (IQT {:#x})", self.iqt));
            self.queue_error(fx);
            return;
        }
        let base = self.iqa & PAGE_MASK;
        let mut head = head;
        // At most `entries - 1` steps: each moves the head one slot towards the tail.
        for _ in 0..entries {
            if head == tail {
                break;
            }
            if let Err(why) = self.run_slot(mem, base, head, fx) {
                LOG_QUEUE
                    .log(|| format!("vtd: invalidation queue error at descriptor {head}: {why}"));
                self.queue_error(fx);
                break;
            }
            head = (head + 1) % entries;
        }
        self.iqh = head << 4;
    }

    /// Fetches and executes the descriptor in slot `index` of the queue at `base`.
    fn run_slot(
        &mut self,
        mem: &GuestMemoryMmap,
        base: u64,
        index: u64,
        fx: &mut Effects,
    ) -> Result<(), DescError> {
        let mut desc = [0u8; 16];
        base.checked_add(index * DESC_SIZE)
            .and_then(|at| mem.read_slice(&mut desc, GuestAddress(at)).ok())
            .ok_or("descriptor not in guest RAM")?;
        let lo = u64::from_le_bytes(desc[..8].try_into().unwrap_or_default());
        let hi = u64::from_le_bytes(desc[8..].try_into().unwrap_or_default());
        self.run_descriptor(mem, lo, hi, fx)
    }

    /// Executes one descriptor.
    fn run_descriptor(
        &mut self,
        mem: &GuestMemoryMmap,
        lo: u64,
        hi: u64,
        fx: &mut Effects,
    ) -> Result<(), DescError> {
        let granularity = (lo >> 4) & 3;
        match lo & 0xf {
            TYPE_CONTEXT => {
                // G 5:4, DID 31:16, SID 47:32, FM 49:48.
                check(lo & (bits(15, 6) | bits(63, 50)) == 0 && hi == 0)?;
                granular(granularity)
            }
            TYPE_IOTLB => {
                // G 5:4, DW 6, DR 7, DID 31:16; AM 69:64, IH 70, ADDR 127:76.
                check(lo & (bits(15, 8) | bits(63, 32)) == 0 && hi & bits(11, 7) == 0)?;
                granular(granularity)
            }
            TYPE_DEV_IOTLB => {
                // SID 47:32 (and PFSID / MIP fields later revisions define); S 64, ADDR 127:76.
                check(lo & bits(11, 4) == 0 && hi & bits(11, 1) == 0)
            }
            TYPE_IEC => {
                // G 4, IM 31:27, IIDX 47:32: any of them may change what `remap` returns.
                check(lo & (bits(26, 5) | bits(63, 48)) == 0 && hi == 0)?;
                fx.ir_changed = true;
                Ok(())
            }
            TYPE_WAIT => self.wait(mem, lo, hi, fx),
            _ => Err("unknown descriptor type"),
        }
    }

    /// Invalidation wait: everything before it is done, so it completes at once.
    fn wait(
        &mut self,
        mem: &GuestMemoryMmap,
        lo: u64,
        hi: u64,
        fx: &mut Effects,
    ) -> Result<(), DescError> {
        // IF 4, SW 5, FN 6, status data 63:32; status address 127:66.
        check(lo & bits(31, 7) == 0 && hi & 3 == 0)?;
        if lo & WAIT_SW != 0 {
            mem.write_obj((lo >> 32) as u32, GuestAddress(hi))
                .map_err(|_| "status address not in guest RAM")?;
        }
        if lo & WAIT_IF != 0 {
            self.wait_completion(fx);
        }
        Ok(())
    }
}

/// Granularity 0 is reserved in context-cache and IOTLB invalidations.
fn granular(granularity: u64) -> Result<(), DescError> {
    if granularity == 0 {
        return Err("reserved granularity");
    }
    Ok(())
}

fn check(ok: bool) -> Result<(), DescError> {
    ok.then_some(()).ok_or("reserved bits set")
}
