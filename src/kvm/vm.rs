//! The VM file descriptor: memory slots, the in-kernel irqchip and PIT, irqfds and vCPU creation.

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_SPLIT_IRQCHIP,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use super::interrupts::{KvmInterrupts, SourcedRouter, FIRST_MSI_GSI, IOAPIC_PINS};
use crate::devices::pci::MsiRouter;

/// What failed while setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is the kvm module loaded and do you have read-write access to /dev/kvm?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (12 expected)")]
    ApiVersion(i32),
    #[error("KVM_GET/SET_IRQCHIP (8259 PIC) failed")]
    Pic(#[source] kvm_ioctls::Error),
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
    #[error("KVM_CREATE_IRQCHIP (or enabling the split irqchip) failed")]
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
    #[error("KVM lacks KVM_CAP_READONLY_MEM, which firmware ROM and shadow RAM need")]
    NoReadonlyMem,
    #[error("cannot allocate {0} bytes for the firmware ROM")]
    RomAlloc(usize, #[source] vm_memory::mmap::MmapRegionError),
    #[error("KVM_IRQFD failed for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    #[error("KVM_IOEVENTFD failed for {0}")]
    Ioeventfd(String, #[source] kvm_ioctls::Error),
    #[error("KVM_IRQFD with resample failed for GSI {0}")]
    IrqfdResample(u32, #[source] kvm_ioctls::Error),
    #[error("KVM_SET_GSI_ROUTING failed")]
    GsiRouting(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VCPU failed for vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
}

/// A KVM VM with its in-kernel interrupt controllers.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    interrupts: Arc<KvmInterrupts>,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with the IOAPIC/PIC/LAPIC and PIT in the kernel, or with
    /// `split`, only the local APICs there (the IOAPIC is ferrovm's; no PIC, no PIT). KVM's
    /// TSS (3 pages) and identity-map page go at `tss_page` - 1 page .. `tss_page` + 3 pages
    /// ([`KVM_TSS_ADDRESS`](crate::arch::x86_64::layout::KVM_TSS_ADDRESS) for a direct boot, [`FW_KVM_TSS_ADDRESS`](crate::arch::x86_64::layout::FW_KVM_TSS_ADDRESS) when a
    /// firmware ROM of up to 16 MiB sits below 4 GiB).
    pub fn new(cpus: u8, tss_page: u64, split: bool) -> Result<Self, VmError> {
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
        fd.set_tss_address(tss_page as usize)
            .map_err(VmError::SetTss)?;
        fd.set_identity_map_address(tss_page - 0x1000)
            .map_err(VmError::SetIdentityMap)?;
        if split {
            Self::enable_split_irqchip(&kvm, &fd)?;
        } else {
            fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        }
        let fd = Arc::new(fd);
        let interrupts = Arc::new(KvmInterrupts::new(fd.clone(), split));
        // Install the table KVM starts with through our own builder, so a failure shows now.
        interrupts.commit().map_err(VmError::GsiRouting)?;
        Ok(Self {
            kvm,
            fd,
            interrupts,
        })
    }

    /// Local APICs in the kernel, IOAPIC in userspace: KVM reserves the first
    /// [`IOAPIC_PINS`] GSIs for the IOAPIC's MSI routes and reports their EOIs.
    fn enable_split_irqchip(kvm: &Kvm, fd: &VmFd) -> Result<(), VmError> {
        if !kvm.check_extension(Cap::SplitIrqchip) {
            return Err(VmError::MissingCap("KVM_CAP_SPLIT_IRQCHIP"));
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = IOAPIC_PINS as u64;
        fd.enable_cap(&cap).map_err(VmError::CreateIrqchip)
    }

    /// The MSI routes of PCI function `sid` (`bus << 8 | devfn`), remapped with that
    /// requester ID once an IOMMU is attached.
    pub fn msi_router(&self, sid: u16) -> Arc<dyn MsiRouter> {
        Arc::new(SourcedRouter {
            sid,
            irqs: self.interrupts.clone(),
        })
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

    /// The guest's physical address width (CPUID 0x80000008 EAX[7:0] as KVM supports it;
    /// 40 when KVM does not say).
    pub fn phys_bits(&self) -> u8 {
        self.supported_cpuid()
            .ok()
            .and_then(|c| {
                c.as_slice()
                    .iter()
                    .find(|e| e.function == 0x8000_0008)
                    .map(|e| e.eax as u8)
            })
            .filter(|b| *b >= 32)
            .unwrap_or(40)
    }

    /// The handle that maps firmware ROM and shadow RAM into memory slots at run time.
    pub fn slots(&self) -> Result<Arc<MemorySlots>, VmError> {
        if !self.kvm.check_extension(Cap::ReadonlyMem) {
            return Err(VmError::NoReadonlyMem);
        }
        Ok(Arc::new(MemorySlots {
            fd: self.fd.clone(),
            roms: Mutex::new(Vec::new()),
            live: Mutex::default(),
        }))
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

    /// Connects `fd` to the level-triggered line `gsi`: writing `fd` asserts it; at the guest's
    /// EOI KVM deasserts it and signals `resample` (the device re-asserts if still pending).
    pub fn register_irqfd_with_resample(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_irqfd_with_resample(fd, resample, gsi)
            .map_err(|e| VmError::IrqfdResample(gsi, e))
    }

    /// MSI routes and ioeventfds, as the handle devices hold ([`MsiRouter`], [`IoEventRegistry`]).
    pub fn interrupts(&self) -> Arc<KvmInterrupts> {
        self.interrupts.clone()
    }

    /// Leaves the two 8259 PICs as a PC BIOS does before it starts a boot loader: initialised
    /// (ICW1-4: edge mode, cascade on line 2, 8086 mode), interrupts 0-7 at vectors 0x08-0x0f
    /// and 8-15 at 0x70-0x77, no line masked. A multiboot kernel (entered where QEMU's BIOS
    /// would hand over) may rely on that; Linux programs the PICs itself.
    /// A split irqchip has no PICs: nothing to do.
    pub fn set_pic_bios_state(&self) -> Result<(), VmError> {
        use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
        if self.interrupts.split() {
            return Ok(());
        }
        for (chip, base) in [
            (KVM_IRQCHIP_PIC_MASTER, 0x08),
            (KVM_IRQCHIP_PIC_SLAVE, 0x70),
        ] {
            let mut c = kvm_irqchip {
                chip_id: chip,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map_err(VmError::Pic)?;
            // SAFETY: chip_id names a PIC, so KVM filled (and reads back) the `pic` member.
            let pic = unsafe { &mut c.chip.pic };
            pic.irq_base = base;
            pic.imr = 0;
            pic.init_state = 0;
            pic.init4 = 1;
            pic.auto_eoi = 0;
            self.fd.set_irqchip(&c).map_err(VmError::Pic)?;
        }
        Ok(())
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

    /// This VM's KVM statistics (`Err`: this KVM has none).
    pub fn stats(&self) -> std::io::Result<super::stats::KvmStats> {
        super::stats::KvmStats::open(&*self.fd)
    }

    /// Creates vCPU `index` (its APIC ID).
    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(index as u64)
            .map_err(|e| VmError::CreateVcpu(index, e))
    }
}

/// Memory slots that change while the VM runs: firmware ROM (read-only, owned here) and
/// pieces of guest RAM mapped read-write, read-only or not at all (the i440FX's PAM shadow
/// RAM). A guest write to a read-only slot exits as MMIO.
pub struct MemorySlots {
    fd: Arc<VmFd>,
    /// ROM images; kept alive as long as any slot may point into them.
    roms: Mutex<Vec<Arc<vm_memory::mmap::MmapRegion>>>,
    /// Slots that exist now (KVM refuses to delete one that does not).
    live: Mutex<std::collections::BTreeSet<u32>>,
}

/// Where a slot's bytes come from.
pub enum SlotSource<'a> {
    /// Guest RAM at the slot's own guest address.
    Ram(&'a GuestMemoryMmap),
    /// A ROM from [`MemorySlots::add_rom`], from this offset.
    Rom(&'a Arc<vm_memory::mmap::MmapRegion>, u64),
}

impl MemorySlots {
    /// Copies `image` into a new host mapping that slots can show read-only.
    pub fn add_rom(&self, image: &[u8]) -> Result<Arc<vm_memory::mmap::MmapRegion>, VmError> {
        let rom = vm_memory::mmap::MmapRegion::new(image.len())
            .map_err(|e| VmError::RomAlloc(image.len(), e))?;
        // SAFETY: the region was just mapped with image.len() writable bytes and nothing else
        // refers to it yet.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), rom.as_ptr(), image.len()) };
        let rom = Arc::new(rom);
        self.roms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rom.clone());
        Ok(rom)
    }

    /// Points slot `slot` at `[gpa, gpa + len)` of `source` (replacing what it showed), or
    /// removes it when `source` is None. A ROM slot is always read-only.
    pub fn set(
        &self,
        slot: u32,
        gpa: u64,
        len: u64,
        source: Option<SlotSource>,
        readonly: bool,
    ) -> Result<(), VmError> {
        let err = |source| VmError::SetMemory {
            start: gpa,
            len,
            source,
        };
        let host = match &source {
            None => None,
            Some(SlotSource::Ram(mem)) => Some(
                mem.get_host_address(vm_memory::GuestAddress(gpa))
                    .ok()
                    .filter(|_| {
                        GuestMemoryBackend::check_range(
                            *mem,
                            vm_memory::GuestAddress(gpa),
                            len as usize,
                        )
                    })
                    .ok_or_else(|| err(kvm_ioctls::Error::new(libc::EFAULT)))?
                    as u64,
            ),
            Some(SlotSource::Rom(rom, off)) => {
                if off.checked_add(len).is_none_or(|e| e > rom.size() as u64) {
                    return Err(err(kvm_ioctls::Error::new(libc::EFAULT)));
                }
                Some(rom.as_ptr() as u64 + off)
            }
        };
        let readonly = readonly || matches!(source, Some(SlotSource::Rom(..)));
        // KVM cannot change a slot's flags in place: delete it first.
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.remove(&slot) {
            let delete = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: gpa,
                ..Default::default()
            };
            // SAFETY: deleting a slot (size 0) makes KVM drop its reference to host memory.
            unsafe { self.fd.set_user_memory_region(delete) }.map_err(err)?;
        }
        let Some(host) = host else { return Ok(()) };
        let r = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
        };
        // SAFETY: `host..host + len` lies in guest RAM (kept alive by the VMM until the VM is
        // dropped) or in a ROM held in `self.roms` for the VM's lifetime; checked above.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(err)?;
        live.insert(slot);
        Ok(())
    }
}
