//! The IOAPIC in userspace, for a split irqchip (`--iommu`: KVM keeps only the local APICs).
//! An 82093AA-style IOAPIC (version 0x11, 24 pins, no EOI register) as KVM's in-kernel one
//! presents it, with one difference an IOMMU needs: a pin's interrupt is an MSI write built
//! from its redirection entry, and that write goes through interrupt remapping.
//!
//! - MMIO: IOREGSEL at offset 0x00, IOWIN at 0x10 (32-bit accesses). Registers: 0x00 ID
//!   (bits 27:24), 0x01 version (max redirection entry 23 in bits 23:16), 0x02 arbitration,
//!   0x10 + 2n / 0x11 + 2n the low / high half of pin n's redirection entry.
//! - The message of an entry: address 0xFEE0_0000 | entry[63:48] << 4 | entry[11] << 2,
//!   data vector | delivery mode << 8 | trigger << 15 (| 1 << 14 for level). In the
//!   remappable format (entry bit 48) those are exactly the handle bits the IOMMU decodes;
//!   in the compatibility format they are the destination and mode. The IOAPIC's messages
//!   carry no requester ID (as under QEMU).
//! - Lines driven by eventfds (serial, i8042, virtio-pci INTx) are irqfds on GSIs 0..23:
//!   each pin's current message is that GSI's KVM route ([`PinRoutes`]), so they deliver
//!   without an exit; masked or blocked pins have no route. Lines a device sets through
//!   [`IrqLevel`] (pc-testdev, edu INTx) are tracked here: edge pins send on a rising edge,
//!   level pins while high unless Remote IRR is set.
//! - EOI: KVM reports the EOI of a level-triggered vector ([`EoiTarget`]); the pins with
//!   that vector clear Remote IRR, signal their resample eventfds (a virtio-pci INTx device
//!   re-raises its line if its interrupt is still pending) and resend if still high.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::dma::{InterruptRemap, MsiMessage, MsiSender};
use super::IrqLevel;
use crate::kvm::vcpu::EoiTarget;
use crate::kvm::vm::IOAPIC_PINS;
use crate::ratelimit::RateLimit;

/// Size of the register window.
pub const IOAPIC_LEN: u64 = 0x1000;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);

const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASK: u64 = 1 << 16;
/// Bits the guest may write: all but delivery status, Remote IRR and reserved 47:17 (bits
/// 63:48 are the destination, or the remappable format's format bit and handle).
const RTE_WRITABLE: u64 = !(RTE_DELIVERY_STATUS | RTE_REMOTE_IRR | 0x0000_ffff_fffe_0000);

static LOG: RateLimit = RateLimit::new(10);

/// An MSI address no local APIC accepts (logical destination mode, destination 0).
const NO_CPU: u64 = 0xfee0_0004;

/// Where the pins' messages become KVM routes (GSI n = pin n).
pub trait PinRoutes: Send + Sync {
    fn set_pin_routes(&self, pins: [Option<MsiMessage>; IOAPIC_PINS]) -> std::io::Result<()>;
}

impl PinRoutes for crate::kvm::vm::KvmInterrupts {
    fn set_pin_routes(&self, pins: [Option<MsiMessage>; IOAPIC_PINS]) -> std::io::Result<()> {
        crate::kvm::vm::KvmInterrupts::set_pin_routes(self, pins)
    }
}

struct State {
    select: u32,
    id: u32,
    rte: [u64; IOAPIC_PINS],
    /// Levels of the lines driven through [`IrqLevel`].
    level: [bool; IOAPIC_PINS],
    /// Resample eventfds per pin (level-triggered irqfd sources).
    resample: Vec<(usize, Arc<EventFd>)>,
    /// Pins whose route reaches a CPU now.
    live: [bool; IOAPIC_PINS],
}

/// The IOAPIC: MMIO device, [`IrqLevel`] for level sources and [`EoiTarget`] for KVM's EOIs.
pub struct Ioapic {
    state: Mutex<State>,
    routes: Arc<dyn PinRoutes>,
    msi: Arc<dyn MsiSender>,
    remap: Arc<dyn InterruptRemap>,
}

/// The MSI message redirection entry `rte` sends (before remapping).
pub fn rte_message(rte: u64) -> MsiMessage {
    let level = rte & RTE_LEVEL != 0;
    let addr = 0xfee0_0000 | ((rte >> 48) & 0xffff) << 4 | ((rte >> 11) & 1) << 2;
    let data =
        (rte & 0xff) | ((rte >> 8) & 7) << 8 | u64::from(level) << 15 | u64::from(level) << 14;
    MsiMessage {
        addr,
        data: data as u32,
    }
}

impl Ioapic {
    pub fn new(
        routes: Arc<dyn PinRoutes>,
        msi: Arc<dyn MsiSender>,
        remap: Arc<dyn InterruptRemap>,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                select: 0,
                id: 0,
                rte: [RTE_MASK; IOAPIC_PINS],
                level: [false; IOAPIC_PINS],
                resample: Vec::new(),
                live: [false; IOAPIC_PINS],
            }),
            routes,
            msi,
            remap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Signals `fd` at every EOI of pin `pin`'s vector while it is level-triggered.
    pub fn add_resample(&self, pin: usize, fd: Arc<EventFd>) {
        self.lock().resample.push((pin, fd));
    }

    /// What pin `pin` sends now: `None` while masked or blocked by the IOMMU (`record`: the
    /// IOMMU records a block as a fault; routes and EOI matching only look).
    fn pin_message(&self, rte: u64, record: bool) -> Option<MsiMessage> {
        if rte & RTE_MASK != 0 {
            return None;
        }
        match record {
            true => self.remap.remap(None, rte_message(rte)),
            false => self.remap.lookup(None, rte_message(rte)),
        }
    }

    /// The vector the local APIC gets from entry `rte` (the IRTE's with remapping).
    fn delivered_vector(&self, rte: u64) -> u8 {
        self.remap
            .lookup(None, rte_message(rte & !RTE_MASK))
            .map_or(rte as u8, |m| m.data as u8)
    }

    /// Pin `pin`'s KVM route. A masked or blocked level-triggered pin keeps a route that
    /// reaches no CPU (logical destination 0) with its vector and the trigger-mode bit: KVM
    /// only reports the EOI of a vector it finds in these routes, and an interrupt already
    /// in service when the guest masked the pin still gets its EOI (which clears Remote
    /// IRR), as on KVM's own IOAPIC.
    fn pin_route(&self, rte: u64) -> Option<MsiMessage> {
        if let Some(m) = self.pin_message(rte, false) {
            return Some(m);
        }
        (rte & RTE_LEVEL != 0).then(|| MsiMessage {
            addr: NO_CPU,
            data: u32::from(self.delivered_vector(rte)) | 1 << 15 | 1 << 14,
        })
    }

    /// Recomputes every pin's route (after an entry changed or the IOMMU's tables did).
    pub fn refresh_routes(&self) {
        let mut st = self.lock();
        self.sync_routes(&mut st);
    }

    /// Installs the pins' routes. A level-triggered pin that starts to reach a CPU again has
    /// its resample eventfds signalled: an irqfd device (virtio-pci INTx) whose interrupt
    /// KVM dropped while the pin had no CPU re-raises it if it is still pending.
    fn sync_routes(&self, st: &mut State) {
        let pins = st.rte.map(|rte| self.pin_route(rte));
        if let Err(e) = self.routes.set_pin_routes(pins) {
            LOG.warn(|| format!("ioapic: cannot update the pin routes: {e}"));
        }
        for (pin, route) in pins.iter().enumerate() {
            let live = route.is_some_and(|m| m.addr != NO_CPU);
            let was = std::mem::replace(&mut st.live[pin], live);
            if live && !was && st.rte[pin] & RTE_LEVEL != 0 {
                for (_, fd) in st.resample.iter().filter(|(p, _)| *p == pin) {
                    let _ = fd.write(1);
                }
            }
        }
    }

    /// Sends pin `pin`'s message now (a line driven through [`IrqLevel`]).
    fn deliver(&self, st: &mut State, pin: usize) {
        let rte = st.rte[pin];
        let Some(msg) = self.pin_message(rte, true) else {
            return;
        };
        if rte & RTE_LEVEL != 0 {
            st.rte[pin] |= RTE_REMOTE_IRR;
        }
        if let Err(e) = self.msi.send(msg) {
            LOG.warn(|| format!("ioapic: pin {pin}: cannot send {msg:x?}: {e}"));
        }
    }

    fn read_reg(&self, st: &State) -> u32 {
        match st.select {
            REG_ID => st.id,
            REG_VERSION => VERSION,
            REG_ARB => st.id,
            r => match table_index(r) {
                Some((pin, high)) if high => (st.rte[pin] >> 32) as u32,
                Some((pin, _)) => st.rte[pin] as u32,
                None => 0,
            },
        }
    }

    fn write_reg(&self, st: &mut State, v: u32) {
        match st.select {
            REG_ID => st.id = v & 0x0f00_0000,
            r => {
                let Some((pin, high)) = table_index(r) else {
                    return;
                };
                let old = st.rte[pin];
                let new = match high {
                    true => (old & 0xffff_ffff) | u64::from(v) << 32,
                    false => (old & !0xffff_ffff) | u64::from(v),
                };
                let new = (new & RTE_WRITABLE) | (old & !RTE_WRITABLE);
                // An edge pin has no Remote IRR.
                st.rte[pin] = match new & RTE_LEVEL {
                    0 => new & !RTE_REMOTE_IRR,
                    _ => new,
                };
                self.sync_routes(st);
                let rte = st.rte[pin];
                if rte != old && rte & RTE_MASK == 0 {
                    // The guest programmed an interrupt: an IOMMU that blocks it records so.
                    let _ = self.pin_message(rte, true);
                }
                // A line held high fires when its entry can deliver, as on KVM's IOAPIC.
                let ready = RTE_LEVEL | RTE_MASK | RTE_REMOTE_IRR;
                if rte & ready == RTE_LEVEL && st.level[pin] {
                    self.deliver(st, pin);
                }
            }
        }
    }
}

/// Pin and half of redirection-table register `r`.
fn table_index(r: u32) -> Option<(usize, bool)> {
    let i = r.checked_sub(REG_TABLE)? as usize;
    (i < 2 * IOAPIC_PINS).then_some((i / 2, i % 2 == 1))
}

impl crate::bus::BusDevice for Ioapic {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        let v = match offset {
            0x00 => st.select,
            0x10 => self.read_reg(&st),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(bytes);
        let mut st = self.lock();
        match offset {
            0x00 => st.select = v & 0xff,
            0x10 => self.write_reg(&mut st, v),
            _ => {
                LOG.log(|| format!("ioapic: write to offset {offset:#x} ignored"));
            }
        }
    }
}

impl IrqLevel for Ioapic {
    fn set_level(&self, gsi: u32, high: bool) -> std::io::Result<()> {
        let pin = gsi as usize;
        if pin >= IOAPIC_PINS {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut st = self.lock();
        let was = std::mem::replace(&mut st.level[pin], high);
        let rte = st.rte[pin];
        let fire = match rte & RTE_LEVEL {
            0 => high && !was,
            _ => high && rte & RTE_REMOTE_IRR == 0,
        };
        if fire {
            self.deliver(&mut st, pin);
        }
        Ok(())
    }
}

impl EoiTarget for Ioapic {
    /// `vector` is the one the local APIC received: with remapping, the IRTE's (Linux then
    /// puts the pin number in the entry's vector field, so the entry's own vector only
    /// matches without remapping).
    fn eoi(&self, vector: u8) {
        let mut st = self.lock();
        for pin in 0..IOAPIC_PINS {
            let rte = st.rte[pin];
            if rte & RTE_LEVEL == 0 {
                continue;
            }
            if rte as u8 != vector && self.delivered_vector(rte) != vector {
                continue;
            }
            st.rte[pin] &= !RTE_REMOTE_IRR;
            for (_, fd) in st.resample.iter().filter(|(p, _)| *p == pin) {
                let _ = fd.write(1);
            }
            if st.level[pin] && rte & RTE_MASK == 0 {
                self.deliver(&mut st, pin);
            }
        }
    }
}

#[cfg(test)]
mod tests;
