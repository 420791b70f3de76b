//! The VM file descriptor: memory slots, the in-kernel irqchip and PIT, irqfds and vCPU creation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::{IoEvent, IoEventRegistry, MsiRouter, MsiVector};

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
    /// Opens /dev/kvm and creates a VM with the IOAPIC/PIC/LAPIC and PIT in the kernel. KVM's
    /// TSS (3 pages) and identity-map page go at `tss_page` - 1 page .. `tss_page` + 3 pages
    /// ([`KVM_TSS_ADDRESS`](crate::arch::x86_64::layout::KVM_TSS_ADDRESS) for a direct boot, [`FW_KVM_TSS_ADDRESS`](crate::arch::x86_64::layout::FW_KVM_TSS_ADDRESS) when a
    /// firmware ROM of up to 16 MiB sits below 4 GiB).
    pub fn new(cpus: u8, tss_page: u64) -> Result<Self, VmError> {
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
        fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        let fd = Arc::new(fd);
        let interrupts = Arc::new(KvmInterrupts::new(fd.clone()));
        // Install the table KVM starts with through our own builder, so a failure shows now.
        interrupts.commit().map_err(VmError::GsiRouting)?;
        Ok(Self {
            kvm,
            fd,
            interrupts,
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
    pub fn set_pic_bios_state(&self) -> Result<(), VmError> {
        use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
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

/// First GSI handed out for MSI: GSIs 0..24 are the IOAPIC pins (0..16 also the PICs).
pub const FIRST_MSI_GSI: u32 = 24;
/// IOAPIC pins of KVM's in-kernel IOAPIC.
const IOAPIC_PINS: u32 = 24;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: u32 = 4096;

/// The VM's GSI routing table and ioeventfds, shared with devices as [`MsiRouter`] and
/// [`IoEventRegistry`]. The table always holds KVM's default PIC/IOAPIC pin routes plus one
/// MSI route per unmasked vector; every change rewrites it with KVM_SET_GSI_ROUTING.
pub struct KvmInterrupts {
    fd: Arc<VmFd>,
    state: Mutex<RoutingState>,
}

#[derive(Default)]
struct RoutingState {
    next_gsi: u32,
    /// gsi -> (address, data) of unmasked MSI vectors.
    msi: BTreeMap<u32, (u64, u32)>,
}

fn to_io(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

impl KvmInterrupts {
    fn new(fd: Arc<VmFd>) -> Self {
        Self {
            fd,
            state: Mutex::new(RoutingState {
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoutingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The routing entries for `msi`, pins first.
    fn entries(msi: &BTreeMap<u32, (u64, u32)>) -> Vec<kvm_irq_routing_entry> {
        let pin = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            e
        };
        let mut v = Vec::new();
        for gsi in 0..16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(pin(gsi, chip, gsi % 8));
        }
        for gsi in 0..IOAPIC_PINS {
            v.push(pin(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, &(addr, data)) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            v.push(e);
        }
        v
    }

    fn commit_locked(&self, st: &RoutingState) -> Result<(), kvm_ioctls::Error> {
        let entries = Self::entries(&st.msi);
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.fd.set_gsi_routing(&table)
    }

    fn commit(&self) -> Result<(), kvm_ioctls::Error> {
        let st = self.lock();
        self.commit_locked(&st)
    }
}

impl MsiRouter for KvmInterrupts {
    fn allocate(&self) -> std::io::Result<MsiVector> {
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

    fn update(&self, gsi: u32, addr: u64, data: u32, masked: bool) -> std::io::Result<()> {
        if !(FIRST_MSI_GSI..MAX_ROUTES).contains(&gsi) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut st = self.lock();
        let old = if masked {
            st.msi.remove(&gsi)
        } else {
            st.msi.insert(gsi, (addr, data))
        };
        let new = st.msi.get(&gsi).copied();
        if old == new {
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
        Ok(())
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
        let mut msi = BTreeMap::new();
        msi.insert(24, (0xfee0_0000u64, 0x4041u32));
        let e = KvmInterrupts::entries(&msi);
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
}
