//! The baseline: the same micro-guests run by a minimal KVM_RUN loop written directly on
//! kvm-ioctls. No bus, no exit statistics, no locks on the measured path: the bench
//! protocol is decoded inline. Setup reuses ferrovm's boot helpers (it is not measured).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{self, BenchLog, OFF_MARK, OFF_PARAM, OFF_TSC, READ_VALUE};
use super::BenchError;
use crate::arch::x86_64::{boot, cpuid, layout, regs};

/// Guest RAM of a raw bench VM.
const MEM_SIZE: u64 = 64 << 20;

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> BenchError {
    move |e| BenchError::Kvm(what, e)
}

/// Runs firmware `kernel` with `cmdline` to completion (ACPI power-off) in a bare VM.
/// Returns the log and KVM's TSC frequency (kHz).
pub fn run(kernel: &Path, cmdline: &str, mut log: BenchLog) -> Result<(BenchLog, u32), BenchError> {
    let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .map_err(|_| BenchError::Setup("cannot map guest memory".into()))?;
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().raw_value(),
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (both
        // are dropped at the end of this function, the VM first).
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(BenchError::Io)?);
    vm.register_irqfd(&irq, layout::BENCH_GSI)
        .map_err(kvm("KVM_IRQFD"))?;
    let mut ioeventfds = Vec::new();
    for addr in [
        IoEventAddress::Pio(u64::from(layout::BENCH_IOEVENTFD_PORT)),
        IoEventAddress::Mmio(layout::BENCH_IOEVENTFD_MMIO),
    ] {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(BenchError::Io)?;
        vm.register_ioevent(&fd, &addr, NoDatamatch)
            .map_err(kvm("KVM_IOEVENTFD"))?;
        ioeventfds.push(fd);
    }

    let k = boot::load_kernel(&mem, kernel).map_err(|e| BenchError::Setup(e.to_string()))?;
    boot::write_cmdline(&mem, cmdline, layout::CMDLINE_MAX_SIZE)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    boot::write_zero_page(
        &mem,
        &boot::BootInfo {
            kernel: &k,
            cmdline_len: cmdline.len(),
            initramfs: None,
            rsdp: 0,
            mem_size: MEM_SIZE,
        },
    )
    .map_err(|e| BenchError::Setup(e.to_string()))?;
    regs::write_boot_tables(&mem).map_err(|e| BenchError::Setup(e.to_string()))?;

    let mut vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
    let supported = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let features = cpuid::IrqchipFeatures {
        tsc_deadline: false,
    };
    vcpu.set_cpuid2(&cpuid::vcpu_cpuid(&supported, 0, 1, features))
        .map_err(kvm("KVM_SET_CPUID2"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    regs::set_lint_pins(&mut lapic.regs);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&regs::boot_sregs(sregs, k.entry))
        .map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs::boot_regs(k.entry))
        .map_err(kvm("KVM_SET_REGS"))?;
    let tsc_khz = vcpu.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;

    let base = u64::from(layout::BENCH_PORT);
    let pinger_stop = Arc::new(AtomicBool::new(false));
    let mut pinger = None;
    let result = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let port = u64::from(port);
                if port == u64::from(layout::ACPI_PM1A_CNT_PORT) {
                    break Ok(());
                } else if port == base + OFF_MARK {
                    match log.mark(device::le32(data)) {
                        3 if pinger.is_none() => {
                            let irq = irq.clone();
                            let raise = move || {
                                let _ = irq.write(1);
                            };
                            pinger = Some(
                                device::spawn_pinger(mem.clone(), raise, pinger_stop.clone())
                                    .map_err(BenchError::Io)?,
                            );
                        }
                        4 => pinger_stop.store(true, Ordering::Relaxed),
                        _ => {}
                    }
                } else if port == base + OFF_TSC {
                    log.tsc(device::le32(data));
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if u64::from(port) == base + OFF_PARAM {
                    let v = log.param().to_le_bytes();
                    for (d, s) in data.iter_mut().zip(v) {
                        *d = s;
                    }
                } else {
                    data.fill(READ_VALUE);
                }
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(READ_VALUE),
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Intr) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Ok(other) => break Err(BenchError::Guest(format!("raw loop: exit {other:?}"))),
            Err(e) => break Err(BenchError::Kvm("KVM_RUN", e)),
        }
    };
    pinger_stop.store(true, Ordering::Relaxed);
    if let Some(p) = pinger {
        let _ = p.join();
    }
    drop(ioeventfds);
    result.map(|()| (log, tsc_khz))
}
