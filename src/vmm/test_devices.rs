//! QEMU's test devices for kvm-unit-tests (`--test-devices`), never in an ordinary VM: they
//! let the guest drive interrupt lines and DMA engines.
//!
//! - pc-testdev: ports 0xe0-0xeb and 0x2000-0x2017, MMIO 0xff000000, ISA interrupt lines;
//! - pci-testdev (1b36:0005): ioeventfd exits for vmexit.flat's pci rows;
//! - edu (1234:11e8): DMA (through the IOMMU with `--iommu`), INTx and MSI.

use std::sync::{Arc, Mutex};

use super::{shared, Irqchip, VmmError};
use crate::bus::SharedDevice;
use crate::devices::pci::PciRoot;
use crate::devices::{self, IrqLevel};
use crate::kvm::vm::Vm;
use crate::resources::{Buses, PlaceError, Resources, Sharing, Space};

/// pc-testdev: its ports, its MMIO window and its interrupt lines (`lines`: the IOAPIC's
/// or KVM's).
pub(super) fn attach_isa(lines: &Arc<dyn IrqLevel>, buses: &mut Buses) -> Result<(), VmmError> {
    use devices::testdev as t;
    for gsi in t::TEST_IRQS {
        buses
            .claims
            .claim_gsi(gsi, "pc-testdev", Sharing::Exclusive)
            .map_err(PlaceError::from)?;
    }
    let ports: [(Space, u64, u64, &'static str, SharedDevice); 3] = [
        (
            Space::Pio,
            u64::from(t::PORT_DATA),
            t::PORT_DATA_LEN,
            "pc-testdev",
            shared(t::PcTestPorts::default()),
        ),
        (
            Space::Pio,
            u64::from(t::PORT_IRQ),
            t::PORT_IRQ_LEN,
            "pc-testdev-irq",
            shared(t::PcTestIrq::new(lines.clone())),
        ),
        (
            Space::Mmio,
            t::IOMEM_START,
            t::IOMEM_LEN,
            "pc-testdev-iomem",
            shared(t::PcTestIomem::default()),
        ),
    ];
    for (space, base, len, name, dev) in ports {
        buses.add(space, base, len, name, dev)?;
    }
    Ok(())
}

/// pci-testdev (no interrupt pin: nothing to claim but its BARs) and edu (INTA on its slot's
/// GSI; DMA and MSI through the IOMMU when there is one).
pub(super) fn attach_pci(
    vm: &Vm,
    irqchip: &Irqchip,
    pci: &mut PciRoot,
    claims: &mut Resources,
) -> Result<(), VmmError> {
    let dev = devices::pci_testdev::PciTestDev::new(vm.interrupts())?;
    pci.insert(pci.free_slot()?, Arc::new(Mutex::new(dev)))?;
    let (slot, gsi) = super::claim_slot_intx(pci, claims, " (edu)")?;
    let sid = u16::from(slot) << 3;
    let edu = devices::edu::Edu::new(
        irqchip.dma(),
        sid,
        vm.msi_router(sid),
        irqchip.levels(vm),
        gsi,
    )?;
    pci.insert(slot, Arc::new(Mutex::new(edu)))?;
    Ok(())
}
