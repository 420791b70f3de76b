//! The VM's GSI routing table, MSI delivery and ioeventfds: what devices hold as
//! [`MsiRouter`], [`MsiSender`] and [`IoEventRegistry`].
//!
//! With the in-kernel irqchip, GSIs 0..24 route to KVM's PICs and IOAPIC. With a split irqchip
//! (`--iommu`), the IOAPIC is ferrovm's (devices/ioapic.rs): GSIs 0..24 then carry the MSI
//! message each IOAPIC pin sends now ([`KvmInterrupts::set_pin_routes`]), so an irqfd on a pin
//! still delivers without an exit, and KVM reports the EOIs of level-triggered pins. With an
//! IOMMU the MSI routes hold the remapped messages: the table keeps what each device
//! programmed and remaps it at every commit ([`KvmInterrupts::recommit`] after the guest
//! changes its remapping tables).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::dma::{InterruptRemap, MsiMessage, MsiSender};
use crate::devices::pci::{IoEvent, IoEventRegistry, MsiRouter, MsiVector};

/// First GSI handed out for MSI: GSIs 0..24 are the IOAPIC pins (0..16 also the PICs).
pub const FIRST_MSI_GSI: u32 = 24;
/// IOAPIC pins (KVM's in-kernel IOAPIC, or ferrovm's with a split irqchip).
pub const IOAPIC_PINS: usize = 24;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: u32 = 4096;

/// The VM's GSI routing table and ioeventfds, shared with devices as [`MsiRouter`] and
/// [`IoEventRegistry`]. The table holds the pin routes plus one MSI route per unmasked
/// vector; every change rewrites it with KVM_SET_GSI_ROUTING.
pub struct KvmInterrupts {
    fd: Arc<VmFd>,
    /// Split irqchip: pins are MSI routes the userspace IOAPIC sets.
    split: bool,
    /// The IOMMU's interrupt remapping, once one is attached.
    remap: OnceLock<Arc<dyn InterruptRemap>>,
    state: Mutex<RoutingState>,
}

#[derive(Default)]
struct RoutingState {
    next_gsi: u32,
    /// gsi -> (requester, message as the device programmed it) of unmasked MSI vectors.
    msi: BTreeMap<u32, (Option<u16>, MsiMessage)>,
    /// Split irqchip: what each IOAPIC pin sends (already remapped by the IOAPIC).
    pins: [Option<MsiMessage>; IOAPIC_PINS],
}

fn to_io(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.addr as u32;
    e.u.msi.address_hi = (m.addr >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

fn pin_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl KvmInterrupts {
    pub(super) fn new(fd: Arc<VmFd>, split: bool) -> Self {
        Self {
            fd,
            split,
            remap: OnceLock::new(),
            state: Mutex::new(RoutingState {
                next_gsi: FIRST_MSI_GSI,
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoutingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the IOAPIC and PICs are ferrovm's (KVM has only the local APICs).
    pub fn split(&self) -> bool {
        self.split
    }

    /// Sends every MSI route through `remap` from now on (the IOMMU, attached once).
    pub fn set_remap(&self, remap: Arc<dyn InterruptRemap>) {
        let _ = self.remap.set(remap);
    }

    /// The routing entries: pins first, then the (remapped) MSI routes; a vector the IOMMU
    /// blocks has no route.
    fn entries(&self, st: &RoutingState) -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::new();
        if self.split {
            for (gsi, m) in st.pins.iter().enumerate() {
                if let Some(m) = m {
                    v.push(msi_entry(gsi as u32, *m));
                }
            }
        } else {
            for gsi in 0..16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                v.push(pin_entry(gsi, chip, gsi % 8));
            }
            for gsi in 0..IOAPIC_PINS as u32 {
                v.push(pin_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            }
        }
        for (&gsi, &(sid, m)) in &st.msi {
            let m = match self.remap.get() {
                Some(r) => match r.lookup(sid, m) {
                    Some(m) => m,
                    None => continue,
                },
                None => m,
            };
            v.push(msi_entry(gsi, m));
        }
        v
    }

    fn commit_locked(&self, st: &RoutingState) -> Result<(), kvm_ioctls::Error> {
        let entries = self.entries(st);
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.fd.set_gsi_routing(&table)
    }

    pub(super) fn commit(&self) -> Result<(), kvm_ioctls::Error> {
        let st = self.lock();
        self.commit_locked(&st)
    }

    /// Rewrites the table after the guest changed its interrupt remapping.
    pub fn recommit(&self) -> std::io::Result<()> {
        self.commit().map_err(to_io)
    }

    /// Split irqchip: the messages the IOAPIC pins send now (`None`: masked or blocked).
    pub fn set_pin_routes(&self, pins: [Option<MsiMessage>; IOAPIC_PINS]) -> std::io::Result<()> {
        let mut st = self.lock();
        if st.pins == pins {
            return Ok(());
        }
        let old = std::mem::replace(&mut st.pins, pins);
        if let Err(e) = self.commit_locked(&st) {
            st.pins = old;
            return Err(to_io(e));
        }
        Ok(())
    }

    fn allocate_gsi(&self) -> std::io::Result<MsiVector> {
        let mut st = self.lock();
        if st.next_gsi >= MAX_ROUTES {
            return Err(std::io::Error::other("no GSI left for MSI"));
        }
        let gsi = st.next_gsi;
        let irqfd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
        self.fd.register_irqfd(&irqfd, gsi).map_err(to_io)?;
        st.next_gsi += 1;
        Ok(MsiVector { gsi, irqfd })
    }

    fn update_msi(
        &self,
        gsi: u32,
        sid: Option<u16>,
        msg: Option<MsiMessage>,
    ) -> std::io::Result<()> {
        if !(FIRST_MSI_GSI..MAX_ROUTES).contains(&gsi) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut st = self.lock();
        let old = match msg {
            None => st.msi.remove(&gsi),
            Some(m) => st.msi.insert(gsi, (sid, m)),
        };
        if old == st.msi.get(&gsi).copied() {
            return Ok(());
        }
        if let Err(e) = self.commit_locked(&st) {
            // Keep the table we track equal to KVM's.
            match old {
                Some(o) => st.msi.insert(gsi, o),
                None => st.msi.remove(&gsi),
            };
            return Err(to_io(e));
        }
        // The device programmed (or unmasked) this vector: the IOMMU records it if it blocks
        // it (the route itself was computed with a lookup, which records nothing).
        if let (Some(r), Some(m)) = (self.remap.get(), msg) {
            let _ = r.remap(sid, m);
        }
        Ok(())
    }

    /// Sends MSI messages with this VM's fd only: for the IOMMU's own interrupts (it must
    /// not hold the routing table, which holds it).
    pub fn msi_sender(&self) -> Arc<dyn MsiSender> {
        Arc::new(VmMsi(self.fd.clone()))
    }
}

/// KVM_SIGNAL_MSI on one VM.
struct VmMsi(Arc<VmFd>);

impl MsiSender for VmMsi {
    fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
        let m = kvm_msi {
            address_lo: msg.addr as u32,
            address_hi: (msg.addr >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.0.signal_msi(m).map(|_| ()).map_err(to_io)
    }
}

impl MsiRouter for KvmInterrupts {
    fn allocate(&self) -> std::io::Result<MsiVector> {
        self.allocate_gsi()
    }

    fn update(&self, gsi: u32, addr: u64, data: u32, masked: bool) -> std::io::Result<()> {
        let msg = (!masked).then_some(MsiMessage { addr, data });
        self.update_msi(gsi, None, msg)
    }
}

/// The MSI routes of one PCI function: with an IOMMU its messages are remapped with its
/// requester ID (`bus << 8 | devfn`).
pub struct SourcedRouter {
    pub(super) sid: u16,
    pub(super) irqs: Arc<KvmInterrupts>,
}

impl MsiRouter for SourcedRouter {
    fn allocate(&self) -> std::io::Result<MsiVector> {
        self.irqs.allocate_gsi()
    }

    fn update(&self, gsi: u32, addr: u64, data: u32, masked: bool) -> std::io::Result<()> {
        let msg = (!masked).then_some(MsiMessage { addr, data });
        self.irqs.update_msi(gsi, Some(self.sid), msg)
    }
}

impl crate::devices::IrqLevel for KvmInterrupts {
    fn set_level(&self, gsi: u32, high: bool) -> std::io::Result<()> {
        self.fd.set_irq_line(gsi, high).map_err(to_io)
    }
}

impl IoEventRegistry for KvmInterrupts {
    fn register_event(&self, ev: IoEvent, fd: &EventFd) -> std::io::Result<()> {
        let addr = ioevent_address(&ev);
        match ev.datamatch {
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
            Some(v) => self.fd.register_ioevent(fd, &addr, v),
        }
        .map_err(to_io)
    }

    fn unregister_event(&self, ev: IoEvent, fd: &EventFd) -> std::io::Result<()> {
        let addr = ioevent_address(&ev);
        match ev.datamatch {
            None => self.fd.unregister_ioevent(fd, &addr, NoDatamatch),
            Some(v) => self.fd.unregister_ioevent(fd, &addr, v),
        }
        .map_err(to_io)
    }
}

fn ioevent_address(ev: &IoEvent) -> IoEventAddress {
    match ev.pio {
        true => IoEventAddress::Pio(ev.addr),
        false => IoEventAddress::Mmio(ev.addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table_keeps_the_pins() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let irqs = KvmInterrupts::new(Arc::new(kvm.create_vm().unwrap()), false);
        let mut st = RoutingState::default();
        let m = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x4041,
        };
        st.msi.insert(24, (None, m));
        let e = irqs.entries(&st);
        assert_eq!(e.len(), 16 + 24 + 1);
        // SAFETY: reading the union members these entries were built with.
        unsafe {
            assert_eq!(
                (e[9].gsi, e[9].u.irqchip.irqchip, e[9].u.irqchip.pin),
                (9, 1, 1)
            );
            assert_eq!((e[20].gsi, e[20].u.irqchip.irqchip), (4, 2));
            assert_eq!(e[40].type_, KVM_IRQ_ROUTING_MSI);
            assert_eq!(
                (e[40].gsi, e[40].u.msi.address_lo, e[40].u.msi.data),
                (24, 0xfee0_0000, 0x4041)
            );
        }
    }

    /// Blocks requester 0x10 and moves everything else to vector 0x99.
    struct Remapper;
    impl InterruptRemap for Remapper {
        fn remap(&self, sid: Option<u16>, msg: MsiMessage) -> Option<MsiMessage> {
            (sid != Some(0x10)).then_some(MsiMessage { data: 0x99, ..msg })
        }
        fn lookup(&self, sid: Option<u16>, msg: MsiMessage) -> Option<MsiMessage> {
            self.remap(sid, msg)
        }
        fn set_change_hook(&self, _hook: Box<dyn Fn() + Send + Sync>) {}
    }

    #[test]
    fn split_table_has_pin_messages_and_remapped_msi() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let irqs = KvmInterrupts::new(Arc::new(kvm.create_vm().unwrap()), true);
        irqs.set_remap(Arc::new(Remapper));
        let m = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        let mut st = RoutingState::default();
        st.pins[4] = Some(m);
        st.msi.insert(24, (Some(0x08), m));
        st.msi.insert(25, (Some(0x10), m));
        let e = irqs.entries(&st);
        assert_eq!(
            e.len(),
            2,
            "one pin, one MSI (the blocked one has no route)"
        );
        // SAFETY: reading the union members these entries were built with.
        unsafe {
            assert_eq!(
                (e[0].gsi, e[0].type_, e[0].u.msi.data),
                (4, KVM_IRQ_ROUTING_MSI, 0x41)
            );
            assert_eq!((e[1].gsi, e[1].u.msi.data), (24, 0x99));
        }
    }
}
