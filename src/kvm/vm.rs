//! The VM file descriptor: memory slots, the in-kernel irqchip and PIT, irqfds and vCPU creation.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;

/// What failed while setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is the kvm module loaded and do you have read-write access to /dev/kvm?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (12 expected)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("--cpus {requested}: KVM on this host supports at most {max} vCPUs")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM_SET_TSS_ADDR failed")]
    SetTss(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION failed for guest range {start:#x}+{len:#x}")]
    SetMemory {
        start: u64,
        len: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD failed for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    #[error("KVM_IOEVENTFD failed for {0}")]
    Ioeventfd(String, #[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VCPU failed for vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
}

/// A KVM VM with its in-kernel interrupt controllers.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with the IOAPIC/PIC/LAPIC and PIT in the kernel.
    pub fn new(cpus: u8) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if cpus as usize > max {
            return Err(VmError::TooManyVcpus {
                requested: cpus,
                max,
            });
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTss)?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetIdentityMap)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Self { kvm, fd })
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let start = region.start_addr().raw_value();
            let len = region.len();
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: start,
                memory_size: len,
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the VMM keeps alive
            // until the VM (and every vCPU) is dropped.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(|source| VmError::SetMemory {
                start,
                len,
                source,
            })?;
        }
        Ok(())
    }

    /// Connects `fd` to interrupt line `gsi`: writing the eventfd raises the interrupt.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|e| VmError::Irqfd(gsi, e))
    }

    /// Makes guest writes to `addr` (any value, any size) signal `fd` inside KVM, without an
    /// exit to userspace.
    pub fn register_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> Result<(), VmError> {
        self.fd
            .register_ioevent(fd, &addr, NoDatamatch)
            .map_err(|e| VmError::Ioeventfd(format!("{addr:?}"), e))
    }

    /// KVM's supported CPUID.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)
    }

    /// What the in-kernel irqchip offers beyond the supported CPUID.
    pub fn irqchip_features(&self) -> crate::arch::x86_64::cpuid::IrqchipFeatures {
        crate::arch::x86_64::cpuid::IrqchipFeatures {
            tsc_deadline: self.kvm.check_extension(Cap::TscDeadlineTimer),
        }
    }

    /// Creates vCPU `index` (its APIC ID).
    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(index as u64)
            .map_err(|e| VmError::CreateVcpu(index, e))
    }
}
