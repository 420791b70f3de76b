//! The VM's interrupt controllers and IOMMU, as the boot recipe wires them: KVM's in-kernel
//! PICs, IOAPIC and PIT; or, with `--iommu`, a split irqchip (local APICs in KVM, ferrovm's
//! IOAPIC on the MMIO bus) with the emulated VT-d unit that remaps every MSI and IOAPIC
//! message and translates the DMA of devices that go through it.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::VmmError;
use crate::arch::x86_64::layout;
use crate::devices::dma::{DirectDma, DmaSpace, InterruptRemap, NoRemap};
use crate::devices::ioapic::{Ioapic, IOAPIC_LEN};
use crate::devices::pci::IntxLine;
use crate::devices::vtd::{Vtd, VTD_BASE, VTD_LEN};
use crate::devices::IrqLevel;
use crate::kvm::vcpu::EoiTarget;
use crate::kvm::vm::Vm;
use crate::resources::{Buses, PlaceError, Space};

static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new(10);

/// What devices connect their interrupts and DMA to.
pub struct Irqchip {
    /// Split irqchip only.
    ioapic: Option<Arc<Ioapic>>,
    vtd: Option<Arc<Vtd>>,
    mem: GuestMemoryMmap,
}

impl Irqchip {
    /// The in-kernel irqchip (nothing to add), or with `vm` split: the IOAPIC and, with
    /// `iommu`, the VT-d unit on the MMIO bus.
    pub fn new(
        vm: &Vm,
        mem: &GuestMemoryMmap,
        buses: &mut Buses,
        iommu: bool,
    ) -> Result<Self, VmmError> {
        let irqs = vm.interrupts();
        if !irqs.split() {
            return Ok(Self {
                ioapic: None,
                vtd: None,
                mem: mem.clone(),
            });
        }
        let vtd = iommu.then(|| Vtd::new(mem.clone(), irqs.msi_sender()));
        let remap: Arc<dyn InterruptRemap> = match &vtd {
            Some(v) => v.clone(),
            None => Arc::new(NoRemap),
        };
        irqs.set_remap(remap.clone());
        let ioapic = Arc::new(Ioapic::new(irqs.clone(), irqs.msi_sender(), remap.clone()));
        // (The IOAPIC's page is claimed with the platform's in `claim_platform`.)
        buses
            .mmio
            .insert(layout::IOAPIC_START, IOAPIC_LEN, "ioapic", ioapic.clone())
            .map_err(PlaceError::from)?;
        if let Some(v) = &vtd {
            buses.add(Space::Mmio, VTD_BASE, VTD_LEN, "vt-d", v.clone())?;
            // Weak: the IOAPIC and the routing table hold the unit (no reference cycle).
            let (io, irqs) = (Arc::downgrade(&ioapic), Arc::downgrade(&irqs));
            remap.set_change_hook(Box::new(move || {
                if let Some(io) = io.upgrade() {
                    io.refresh_routes();
                }
                if let Err(e) = irqs.upgrade().map_or(Ok(()), |i| i.recommit()) {
                    LOG.warn(|| format!("vt-d: cannot rewrite the MSI routes: {e}"));
                }
            }));
        }
        ioapic.refresh_routes();
        Ok(Self {
            ioapic: Some(ioapic),
            vtd,
            mem: mem.clone(),
        })
    }

    /// Level-triggered lines set by GSI (pc-testdev, edu INTx): ferrovm's IOAPIC, or KVM's.
    pub fn levels(&self, vm: &Vm) -> Arc<dyn IrqLevel> {
        match &self.ioapic {
            Some(io) => io.clone(),
            None => vm.interrupts(),
        }
    }

    /// Connects a resampled INTx line to `gsi`: KVM's resampling irqfd, or with a split
    /// irqchip a plain irqfd on the pin's MSI route plus the IOAPIC's resample at EOI.
    pub fn register_intx(&self, vm: &Vm, intx: &IntxLine, gsi: u32) -> Result<(), VmmError> {
        let Some(io) = &self.ioapic else {
            vm.register_irqfd_with_resample(&intx.irqfd, &intx.resample, gsi)?;
            return Ok(());
        };
        vm.register_irqfd(&intx.irqfd, gsi)?;
        let resample = intx.resample.try_clone().map_err(VmmError::EventFd)?;
        io.add_resample(gsi as usize, Arc::new(resample));
        Ok(())
    }

    /// Where the DMA of a device that goes through the IOMMU lands.
    pub fn dma(&self) -> Arc<dyn DmaSpace> {
        match &self.vtd {
            Some(v) => v.clone(),
            None => Arc::new(DirectDma(self.mem.clone())),
        }
    }

    /// Where the vCPUs send KVM_EXIT_IOAPIC_EOI (split irqchip).
    pub fn eoi_target(&self) -> Option<Arc<dyn EoiTarget>> {
        self.ioapic.clone().map(|io| io as Arc<dyn EoiTarget>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// Nothing of an `--iommu` VM outlives it: the unit, the IOAPIC and the routing table
    /// refer to each other only one way (a cycle would keep the VM fd and guest RAM alive,
    /// once per `--reboot restart`).
    #[test]
    fn an_iommu_vm_frees_everything() {
        let vm = Vm::new(1, layout::KVM_TSS_ADDRESS, true).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut buses = Buses::new();
        let chip = Irqchip::new(&vm, &mem, &mut buses, true).unwrap();
        let vtd = Arc::downgrade(chip.vtd.as_ref().unwrap());
        let ioapic = Arc::downgrade(chip.ioapic.as_ref().unwrap());
        let irqs = Arc::downgrade(&vm.interrupts());
        drop((chip, buses, vm));
        assert!(vtd.upgrade().is_none(), "the VT-d unit leaked");
        assert!(ioapic.upgrade().is_none(), "the IOAPIC leaked");
        assert!(
            irqs.upgrade().is_none(),
            "the routing table (and the VM fd) leaked"
        );
    }
}
