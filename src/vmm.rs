//! The boot recipe: everything that happens between `ferrovm run` and the guest's first
//! instruction, in order, in one function ([`run`]). Then wait for the VM to end and say why.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::acpi::{self, AcpiConfig, PciAcpi};
use crate::arch::x86_64::boot::{self, BootInfo, EntryMode};
use crate::arch::x86_64::{layout, multiboot, regs};
use crate::bus::{BusDeviceMut, SharedDevice};
use crate::config::{SerialMode, VmConfig};
use crate::devices::pci::{IntxLine, PciConfigIo, PciEcam, PciError, PciMmioWindow, PciRoot};
use crate::devices::virtio::console::{ConsoleInbox, ConsoleOut, SharedOut};
use crate::devices::virtio::pci::{VirtioPci, VirtioPciDevice, VirtioPciError};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{self, IrqLine, StopRequest, VmControl};
use crate::exit_stats::{self, ExitStats, StatsOutput};
use crate::fwboot::{self, files::BootDevice};
use crate::kvm::vcpu::{Vcpu, VcpuStop};
use crate::kvm::vm::Vm;
use crate::resources::{Buses, PlaceError, Resources, Sharing, Space};
use crate::seccomp;
use crate::{console, console_watch};

mod irqchip;
mod test_devices;

use irqchip::Irqchip;

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// ACPI power-off.
    PowerOff,
    /// The guest rebooted (i8042, ACPI reset register, port 0xcf9, triple fault after `reboot`).
    Reset,
    /// The host stopped the VM (signal, console escape).
    Stopped(String),
    /// isa-debug-exit: ferrovm exits with `(value << 1) | 1`.
    DebugExit(u32),
    /// The guest kernel panicked (seen on its console before it reset or stopped).
    GuestPanic,
    /// The firmware found nothing to boot and reset the machine.
    NoBootableDevice,
    /// Triple fault, KVM internal error, failed entry.
    Crash { reason: String, dump: String },
}

/// What failed while building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vm(#[from] crate::kvm::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::kvm::vcpu::VcpuError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("cannot write the boot page tables and GDT")]
    BootTables(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] crate::arch::x86_64::cpu_features::CpuError),
    #[error("cannot place a device")]
    Place(#[from] PlaceError),
    #[error("cannot build the PCI bus")]
    Pci(#[from] PciError),
    #[error("cannot set up a virtio-pci device")]
    VirtioPci(#[from] VirtioPciError),
    #[error("cannot open serial output file {0}")]
    SerialFile(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot set up the terminal or signal handlers")]
    Terminal(#[source] std::io::Error),
    #[error("cannot register the vCPU kick signal handler")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::BlockError),
    #[error(transparent)]
    Cdrom(#[from] devices::virtio::scsi::CdromError),
    #[error(transparent)]
    Net(#[from] devices::virtio::net::NetError),
    #[error(transparent)]
    Fs(#[from] devices::virtio::fs::FsError),
    #[error(transparent)]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    #[error(transparent)]
    Firmware(#[from] crate::fwboot::FirmwareError),
    #[error("cannot create the firmware log {0}")]
    FirmwareLog(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot hand the firmware its configuration")]
    FwCfg(#[from] devices::fw_cfg::FwCfgError),
    #[error("--iommu needs a direct kernel boot (--kernel): its split irqchip has no PIT or 8259 PIC for firmware")]
    IommuWithFirmware,
    #[error("cannot start vCPU thread {0}")]
    SpawnVcpu(u8, #[source] std::io::Error),
}

/// Boots the VM described by `cfg` and runs it until it ends.
pub fn run(cfg: VmConfig) -> Result<VmOutcome, VmmError> {
    seccomp::set_mode(cfg.seccomp);
    // 1. KVM: a VM with the in-kernel irqchip and PIT (KVM's TSS below a firmware ROM).
    let firmware = cfg.firmware.as_deref().map(fwboot::load).transpose()?;
    let tss = match firmware {
        Some(_) => layout::FW_KVM_TSS_ADDRESS,
        None => layout::KVM_TSS_ADDRESS,
    };
    if cfg.iommu && firmware.is_some() {
        return Err(VmmError::IommuWithFirmware);
    }
    // `--iommu`: a split irqchip (the IOAPIC is ferrovm's, so the IOMMU can remap it).
    let vm = Vm::new(cfg.cpus, tss, cfg.iommu)?;

    // 2. Guest RAM, mapped lazily (MAP_NORESERVE), split around the 32-bit MMIO hole; shared
    //    (memfd) when a vhost-user backend must map it too.
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(cfg.mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let backing = crate::memory::RamBacking {
        shared: !cfg.fs.is_empty(),
        ..cfg.mem_backing
    };
    // Declared first, dropped last: unmaps guest RAM once every user of it is gone.
    let (_ram, mem) = crate::memory::guest_ram(&ranges, backing)?;
    let (below_4g, above_4g) = layout::ram_split(cfg.mem_size);
    // Firmware: RAM around the legacy holes, the ROM below 4 GiB, PAM shadow segments.
    let fw_memory = match &firmware {
        Some(image) => Some(Arc::new(fwboot::memory::FirmwareMemory::map(
            vm.slots()?,
            &mem,
            image,
            below_4g,
            above_4g,
        )?)),
        None => {
            vm.register_memory(&mem)?;
            None
        }
    };

    // 3. Devices, on the port I/O bus; interrupts through irqfds.
    let control = VmControl::new().map_err(VmmError::EventFd)?;
    let seen = Arc::new(console_watch::Seen::default());
    let serial_irq = IrqLine::new().map_err(VmmError::EventFd)?;
    vm.register_irqfd(serial_irq.eventfd(), layout::COM1_IRQ)?;
    // (COM1's line is claimed with the other fixed platform lines in `claim_platform`.)
    let serial_out = serial_output(&cfg.serial, seen.clone())?;
    // With a virtio console, COM1 and hvc0 write to the same place; typed input goes to hvc0.
    let (serial_out, virtio_console) = match cfg.virtio_console {
        true => {
            let out: ConsoleOut = Arc::new(Mutex::new(serial_out));
            let inbox = ConsoleInbox::new().map_err(VmmError::EventFd)?;
            let writer: Box<dyn std::io::Write + Send> = Box::new(SharedOut(out.clone()));
            (writer, Some((out, inbox)))
        }
        false => (serial_out, None),
    };
    let serial = Arc::new(Mutex::new(devices::serial::SerialDevice::new(
        serial_irq, serial_out,
    )));
    // Every device asks the resource map for its lines and ranges (resources.rs).
    let mut buses = Buses::new();
    claim_platform(&mut buses.claims, below_4g, above_4g)?;
    let irqchip = Irqchip::new(&vm, &mem, &mut buses, cfg.iommu)?;
    if let Some(f) = &fw_memory {
        let rom = (f.rom_start(), layout::HIGH_RAM_START - f.rom_start());
        buses
            .claims
            .claim(Space::Mmio, rom.0, rom.1, "firmware ROM")
            .map_err(PlaceError::from)?;
    }
    // Firmware probes a PS/2 keyboard (SeaBIOS waits a second for one); a direct boot has
    // none, so Linux's atkbd probe finds nothing and costs nothing.
    let i8042 = match &fw_memory {
        Some(_) => {
            let irq = IrqLine::new().map_err(VmmError::EventFd)?;
            vm.register_irqfd(irq.eventfd(), layout::I8042_IRQ)?;
            buses
                .claims
                .claim_gsi(layout::I8042_IRQ, "i8042 keyboard", Sharing::Exclusive)
                .map_err(PlaceError::from)?;
            shared(devices::i8042::I8042::with_keyboard(control.clone(), irq))
        }
        None => shared(devices::i8042::I8042::new(control.clone())),
    };
    let fw_cfg = Arc::new(Mutex::new(devices::fw_cfg::FwCfg::new(
        cfg.mem_size,
        cfg.cpus.into(),
        Some(mem.clone()),
    )));
    // Kept typed: they are the S3 wake sources (sleep.rs).
    let cmos = Arc::new(Mutex::new(devices::cmos::Cmos::new(below_4g, above_4g)));
    let acpi_pm = Arc::new(Mutex::new(devices::acpi_pm::AcpiPm::new(control.clone())));
    let pio_devices: [(u16, u64, &'static str, SharedDevice); 8] = [
        (layout::COM1_PORT, 8, "com1", serial.clone()),
        (layout::I8042_PORT, 5, "i8042", i8042),
        (layout::CMOS_PORT, 2, "cmos", cmos.clone()),
        (
            layout::ACPI_PM1A_EVT_PORT,
            devices::acpi_pm::ACPI_PM_LEN,
            "acpi-pm",
            acpi_pm.clone(),
        ),
        (
            0xcf9,
            1,
            "reset",
            shared(devices::acpi_pm::ResetPort::new(control.clone())),
        ),
        (
            layout::DEBUG_EXIT_PORT,
            devices::debug_exit::DEBUG_EXIT_LEN,
            "debug-exit",
            shared(devices::debug_exit::DebugExit::new(control.clone())),
        ),
        (0x80, 1, "post", shared(PostPort)),
        (
            devices::fw_cfg::FW_CFG_PORT,
            devices::fw_cfg::FW_CFG_LEN,
            "fw_cfg",
            fw_cfg.clone(),
        ),
    ];
    for (port, len, name, dev) in pio_devices {
        buses.add(Space::Pio, u64::from(port), len, name, dev)?;
    }
    // The bench device only where asked for: it lets the guest start host threads.
    let _bench_fds = match (&cfg.bench, cfg.bench_device) {
        (Some(log), _) => Some(log.clone()),
        (None, true) => Some(Arc::default()),
        (None, false) => None,
    }
    .map(|log| crate::bench::device::attach(&vm, &mem, &mut buses, &control, log))
    .transpose()?;
    if cfg.test_devices {
        test_devices::attach_isa(&irqchip.levels(&vm), &mut buses)?;
    }
    if let Some(path) = &cfg.firmware_log {
        let log = File::create(path).map_err(|e| VmmError::FirmwareLog(path.clone(), e))?;
        let port = devices::debugcon::DEBUGCON_PORT;
        let dev = shared(devices::debugcon::DebugCon::new(Box::new(log)));
        buses.add(Space::Pio, u64::from(port), 1, "debugcon", dev)?;
    }

    // 3b. PCI bus 0: the host bridge (with the i440FX chipset functions for firmware), then
    //     virtio devices behind the virtio-pci transport.
    let mut pci = match &fw_memory {
        Some(f) => fwboot::i440fx_bus(f.clone())?,
        None => PciRoot::new(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
    };
    let boot_devices = add_boot_media(&cfg, &mut pci, &mut buses.claims, &vm, &irqchip, &mem)?;
    // The other virtio functions, in slot order.
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(seed) = &cfg.cloud_init_seed {
        let disk = crate::disk::mem::MemDisk::new("cloud-init seed", seed.clone());
        let block = devices::virtio::block::Block::with_disk(Box::new(disk), Some("cidata"))?;
        virtio.push(Box::new(block));
    }
    for nic in &cfg.nets {
        virtio.push(Box::new(devices::virtio::net::Net::new(nic)?));
    }
    for share in &cfg.fs {
        virtio.push(Box::new(devices::virtio::fs::Fs::new(share)?));
    }
    if let Some(v) = &cfg.vsock {
        virtio.push(Box::new(devices::virtio::vsock::Vsock::new(v)?));
    }
    if cfg.rng {
        virtio.push(Box::new(devices::virtio::rng::Rng::new()));
    }
    if let Some((out, inbox)) = &virtio_console {
        let console = devices::virtio::console::Console::new(out.clone(), inbox.clone());
        virtio.push(Box::new(console));
    }
    for dev in virtio {
        add_virtio_pci(&mut pci, &mut buses.claims, &vm, &irqchip, &mem, dev)?;
    }
    if cfg.test_devices {
        test_devices::attach_pci(&vm, &irqchip, &mut pci, &mut buses.claims)?;
    }
    let windows = match &fw_memory {
        Some(_) => PciWindows::firmware(below_4g, above_4g, vm.phys_bits()),
        None => PciWindows::direct(&pci),
    };
    let pci_acpi = install_pci(pci, &windows, &mut buses)?;
    let Buses { pio, mmio, .. } = buses;
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);

    // 4-5. What the guest starts with: a kernel, its command line and the tables it reads in
    //      RAM (ACPI, zero page or PVH start_info, page tables); or the firmware, with the
    //      memory map, boot order and ACPI tables in fw_cfg.
    let start = match &fw_memory {
        None => load_kernel(&cfg, &vm, &mem, pci_acpi)?,
        Some(_) => {
            let info = FirmwareStart {
                pci: pci_acpi,
                boot_devices: &boot_devices,
                below_4g,
                above_4g,
            };
            load_firmware(&cfg, &info, &mut lock(&fw_cfg))?
        }
    };

    // 6. vCPUs: CPUID, MSRs, FPU, LAPIC for all; entry registers for the boot processor.
    let supported = vm.supported_cpuid()?;
    let chip_features = vm.irqchip_features();
    cfg.cpu.check(&supported, chip_features)?;
    let mut vcpus = Vec::new();
    for i in 0..cfg.cpus {
        let mut v = Vcpu::new(
            vm.create_vcpu(i)?,
            i,
            pio.clone(),
            mmio.clone(),
            control.clone(),
        );
        if let Some(t) = irqchip.eoi_target() {
            v.set_eoi_target(t);
        }
        if !cfg.record_exits {
            v.set_stats_recording(false);
        }
        v.configure(&supported, chip_features, cfg.cpus, &cfg.cpu)?;
        if let (0, Start::Kernel { entry, .. }) = (i, &start) {
            v.set_boot_registers(*entry)?;
        }
        vcpus.push(v);
    }
    log::debug!(
        "booting {start:?}, {} vCPUs, {} MiB",
        cfg.cpus,
        cfg.mem_size >> 20
    );

    let kernel_stats = crate::kvm::stats::KernelStats {
        vm: vm.stats().ok(),
        vcpus: vcpus
            .iter()
            .filter_map(|v| crate::kvm::stats::KvmStats::open(v.fd()).ok())
            .collect(),
    };
    let stats = ExitStats::new(
        vcpus.iter().map(|v| v.stats.clone()).collect(),
        pio.ranges(),
    )
    .with_kernel(kernel_stats);

    // 7. The console and host signals, then start the vCPUs.
    console::install_panic_hook();
    // Guards, dropped in reverse order on every return: the stdin reader is joined first,
    // then the terminal restored, then this VM leaves the stop-signal registry.
    let _signals = console::StopSignals::register(control.clone()).map_err(VmmError::Terminal)?;
    let stdio = cfg.serial == SerialMode::Stdio;
    let raw = stdio
        .then(console::RawTerminal::new)
        .transpose()
        .map_err(VmmError::Terminal)?;
    let console_input: Arc<dyn console::ConsoleInput> = match &virtio_console {
        Some((_, inbox)) => inbox.clone(),
        None => serial.clone(),
    };
    let stdin_reader = if stdio {
        Some(
            console::spawn_stdin_reader(console_input, control.clone(), {
                let stats = stats.clone();
                Box::new(move || print_live_stats(&stats, "C-a s"))
            })
            .map_err(VmmError::Terminal)?,
        )
    } else {
        None
    };
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(VmmError::KickSignal)?;
    let stats_event = exit_stats::sigusr1_event().map_err(VmmError::Terminal)?;
    let stops: Arc<Mutex<Vec<(u8, VcpuStop)>>> = Arc::default();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for mut v in vcpus {
        let index = threads.len() as u8;
        let stops = stops.clone();
        let vcpu_control = control.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // Before the first guest instruction.
                let stop = match seccomp::install(seccomp::ThreadKind::Vcpu) {
                    Ok(()) => v.run(),
                    Err(e) => VcpuStop::Failed {
                        reason: e.to_string(),
                        dump: String::new(),
                    },
                };
                if stop != VcpuStop::Requested {
                    stops
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((index, stop));
                }
                vcpu_control.stop();
            })
            .map_err(|e| VmmError::SpawnVcpu(index, e));
        match t {
            Ok(t) => threads.push(t),
            Err(e) => {
                control.stop();
                stop_vcpus(threads);
                return Err(e);
            }
        }
    }

    // 8. Wait until something stops the VM (suspend/wake cycles on the way), then stop every
    //    vCPU and say why it ended.
    let wake = crate::sleep::WakeSources {
        pm: &acpi_pm,
        cmos: &cmos,
        mem: &mem,
        waking_vector: match start {
            Start::Kernel { facs, .. } => GuestAddress(facs.0 + acpi::FACS_WAKING_VECTOR_OFFSET),
            // No \_S3 is offered: a guest that enters S3 anyway wakes at vector 0.
            Start::Firmware => GuestAddress(0),
        },
    };
    // The loop runs on a thread of its own, under the event-loop filter; this thread keeps
    // its rights (it may build the VM again) and only waits.
    std::thread::scope(|s| {
        let run = || {
            if let Err(e) = seccomp::install(seccomp::ThreadKind::EventLoop) {
                eprintln!("ferrovm: {e}");
                control.stop();
                return;
            }
            event_loop(&control, stats_event, &stats, &threads, &wake);
        };
        let spawned = std::thread::Builder::new()
            .name("vm-events".into())
            .spawn_scoped(s, run);
        match spawned {
            Ok(t) => {
                let _ = t.join();
            }
            Err(e) => {
                eprintln!("ferrovm: cannot start the event-loop thread: {e}");
                control.stop();
            }
        }
    });
    control.stop();
    stop_vcpus(threads);
    report_exit_stats(&stats, &cfg.exit_stats);
    if let Some(r) = stdin_reader {
        let _ = r.join();
    }
    drop(raw);
    let stops = std::mem::take(&mut *stops.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(outcome(control.request(), &stops, &seen))
}

/// Waits until something stops the VM; prints live statistics on SIGUSR1 and takes the VM
/// through S3 suspend and wake on the way.
fn event_loop(
    control: &VmControl,
    stats_event: &EventFd,
    stats: &ExitStats,
    vcpus: &[JoinHandle<()>],
    wake: &crate::sleep::WakeSources,
) {
    loop {
        if wait_readable(control.event(), stats_event) {
            let _ = stats_event.read();
            print_live_stats(stats, "SIGUSR1");
            continue;
        }
        let _ = control.event().read(); // drained: what it signalled is in `control`
        if control.is_stopping() {
            return;
        }
        if control.is_suspended() {
            crate::sleep::suspend(control, vcpus, wake);
        }
    }
}

/// Where the boot processor starts.
#[derive(Debug)]
enum Start {
    /// At the kernel's entry, with the FACS (S3 waking vector) where ferrovm put it.
    Kernel {
        entry: EntryMode,
        facs: GuestAddress,
    },
    /// At the reset vector, in the firmware.
    Firmware,
}

/// Steps 4-5 of a direct kernel boot: the kernel, its initramfs and command line, the ACPI
/// tables, then the zero page or PVH start_info (or multiboot information), GDT and page tables.
fn load_kernel(
    cfg: &VmConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    pci_acpi: PciAcpi,
) -> Result<Start, VmmError> {
    let kernel = boot::load_kernel(mem, &cfg.kernel)?;
    let (cmdline, max_cmdline) = match (kernel.entry, kernel.setup_header) {
        // As QEMU and GRUB do: the kernel's path first, so the guest's argv[0] is its name.
        (EntryMode::Multiboot { .. }, _) => (
            format!("{} {}", cfg.kernel.display(), cfg.cmdline),
            layout::CMDLINE_MAX_SIZE,
        ),
        (_, Some(h)) if h.version >= 0x0206 && h.cmdline_size > 0 => {
            (cfg.cmdline.clone(), h.cmdline_size as usize + 1)
        }
        _ => (cfg.cmdline.clone(), 2048),
    };
    boot::write_cmdline(mem, &cmdline, max_cmdline.min(layout::CMDLINE_MAX_SIZE))?;
    let initrd_limit = match kernel.setup_header {
        Some(h) if h.initrd_addr_max != 0 => h.initrd_addr_max as u64 + 1,
        _ => layout::MMIO_HOLE_START,
    };
    let initramfs = match &cfg.initramfs {
        Some(p) => Some(boot::load_initramfs(
            mem,
            p,
            kernel.kernel_end,
            initrd_limit,
        )?),
        None => None,
    };

    let acpi_tables = acpi::create_acpi_tables(
        mem,
        &AcpiConfig {
            num_cpus: cfg.cpus,
            pci: Some(pci_acpi),
            s3: true,
            iommu: cfg.iommu,
        },
    )?;
    let info = BootInfo {
        kernel: &kernel,
        cmdline_len: cmdline.len(),
        initramfs,
        rsdp: acpi_tables.rsdp.0,
        mem_size: cfg.mem_size,
    };
    match kernel.entry {
        EntryMode::Linux64 { .. } => boot::write_zero_page(mem, &info)?,
        EntryMode::Pvh { .. } => boot::write_pvh_info(mem, &info)?,
        EntryMode::Multiboot { .. } => {
            vm.set_pic_bios_state()?;
            // The initramfs is the one module; its string is its path, as QEMU gives it.
            let name = cfg.initramfs.as_ref().map(|p| p.display().to_string());
            let modules: Vec<(u64, u64, &str)> = info
                .initramfs
                .zip(name.as_deref())
                .map(|((start, size), name)| (start, size, name))
                .into_iter()
                .collect();
            multiboot::write_info(mem, cfg.mem_size, cmdline.len(), &modules)?;
        }
    }
    match kernel.entry {
        // A multiboot kernel may own the page-table pages (layout::MULTIBOOT_RESERVED).
        EntryMode::Multiboot { .. } => regs::write_gdt(mem),
        _ => regs::write_boot_tables(mem),
    }
    .map_err(VmmError::BootTables)?;

    Ok(Start::Kernel {
        entry: kernel.entry,
        facs: acpi_tables.facs,
    })
}

/// What the firmware's fw_cfg files describe.
struct FirmwareStart<'a> {
    pci: PciAcpi,
    boot_devices: &'a [BootDevice],
    below_4g: u64,
    above_4g: u64,
}

/// Steps 4-5 of a firmware boot: ACPI tables, memory map and boot order into fw_cfg.
fn load_firmware(
    cfg: &VmConfig,
    info: &FirmwareStart,
    fw_cfg: &mut devices::fw_cfg::FwCfg,
) -> Result<Start, VmmError> {
    let mmio64_start = info.pci.mmio64.map_or(0, |(start, _)| start);
    let acpi = acpi::build_tables(&AcpiConfig {
        num_cpus: cfg.cpus,
        pci: Some(info.pci.clone()),
        s3: false,
        iommu: false,
    })?;
    let files = fwboot::files::FirmwareInfo {
        below_4g: info.below_4g,
        above_4g: info.above_4g,
        boot_devices: info.boot_devices,
        mmio64_start,
        acpi: &acpi,
    };
    fwboot::files::install(fw_cfg, &files)?;
    Ok(Start::Firmware)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decides how the VM ended from the guest's request and the vCPUs' exits.
fn outcome(
    request: Option<StopRequest>,
    stops: &[(u8, VcpuStop)],
    seen: &console_watch::Seen,
) -> VmOutcome {
    let panicked = seen.panicked();
    match request {
        Some(StopRequest::PowerOff) => return VmOutcome::PowerOff,
        Some(StopRequest::DebugExit(v)) => return VmOutcome::DebugExit(v),
        Some(StopRequest::Reset) if panicked => return VmOutcome::GuestPanic,
        Some(StopRequest::Reset) if seen.found_no_boot_device() => {
            return VmOutcome::NoBootableDevice
        }
        Some(StopRequest::Reset) => return VmOutcome::Reset,
        None => {}
    }
    match stops.first() {
        Some((_, VcpuStop::SystemEvent { kind: 1 })) => VmOutcome::PowerOff,
        Some((_, VcpuStop::SystemEvent { kind: 3 })) => VmOutcome::GuestPanic,
        Some(_) if panicked => VmOutcome::GuestPanic,
        Some((_, VcpuStop::SystemEvent { kind: 2 })) => VmOutcome::Reset,
        Some((i, VcpuStop::SystemEvent { kind })) => VmOutcome::Crash {
            reason: format!("vCPU {i}: unknown KVM system event {kind}"),
            dump: String::new(),
        },
        Some((i, VcpuStop::TripleFault { dump })) => VmOutcome::Crash {
            reason: format!("vCPU {i}: triple fault (KVM_EXIT_SHUTDOWN)"),
            dump: dump.clone(),
        },
        Some((i, VcpuStop::Failed { reason, dump })) => VmOutcome::Crash {
            reason: format!("vCPU {i}: {reason}"),
            dump: dump.clone(),
        },
        Some((_, VcpuStop::Requested)) | None if panicked => VmOutcome::GuestPanic,
        Some((_, VcpuStop::Requested)) | None => {
            VmOutcome::Stopped("host request (signal or console escape)".into())
        }
    }
}

/// The `--disk` images (virtio-blk, one PCI function each) and the `--cdrom` images (CD-ROMs
/// on one virtio-scsi controller after the disks). Returns the firmware's boot order:
/// `bootindex` first, then disks in `--disk` order, then CD-ROMs in `--cdrom` order.
fn add_boot_media(
    cfg: &VmConfig,
    pci: &mut PciRoot,
    claims: &mut Resources,
    vm: &Vm,
    irqchip: &Irqchip,
    mem: &GuestMemoryMmap,
) -> Result<Vec<BootDevice>, VmmError> {
    let mut boot = Vec::new();
    for disk in &cfg.disks {
        let block = devices::virtio::block::Block::new(disk)?;
        let slot = add_virtio_pci(pci, claims, vm, irqchip, mem, Box::new(block))?;
        boot.push((disk.bootindex, BootDevice::Disk { slot }));
    }
    if !cfg.cdroms.is_empty() {
        let scsi = devices::virtio::scsi::Scsi::new(&cfg.cdroms)?;
        let slot = add_virtio_pci(pci, claims, vm, irqchip, mem, Box::new(scsi))?;
        for (target, cd) in cfg.cdroms.iter().enumerate() {
            let target = target as u8; // at most MAX_CDROMS, checked by Scsi::new
            boot.push((cd.bootindex, BootDevice::Cdrom { slot, target }));
        }
    }
    // The sort is stable: without bootindex, the order above.
    boot.sort_by_key(|(index, _)| index.unwrap_or(u32::MAX));
    Ok(boot.into_iter().map(|(_, d)| d).collect())
}

/// Adds `device` behind the virtio-pci transport in the next free slot of bus 0: its INTx line
/// (an irqfd on the slot's GSI, resampled by KVM's IOAPIC or, with a split irqchip, by
/// ferrovm's at EOI; [`Irqchip::register_intx`]), MSI-X vectors and kick ioeventfds go
/// through KVM.
/// Returns the slot.
fn add_virtio_pci(
    pci: &mut PciRoot,
    claims: &mut Resources,
    vm: &Vm,
    irqchip: &Irqchip,
    mem: &GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
) -> Result<u8, VmmError> {
    let (slot, gsi) = claim_slot_intx(pci, claims, "")?;
    let intx = IntxLine::new().map_err(VmmError::EventFd)?;
    irqchip.register_intx(vm, &intx, gsi)?;
    let msi = vm.msi_router(u16::from(slot) << 3);
    let dev = VirtioPciDevice::new(device, mem.clone(), msi, vm.interrupts(), intx)?;
    pci.insert(slot, Arc::new(VirtioPci::new(dev)))?;
    log::debug!("virtio-pci device in slot {slot}");
    Ok(slot)
}

/// The next free slot of bus 0 and its INTA line's GSI, claimed for the function there
/// (`what` follows the claim's name in a clash message).
fn claim_slot_intx(
    pci: &PciRoot,
    claims: &mut Resources,
    what: &str,
) -> Result<(u8, u32), VmmError> {
    let slot = pci.free_slot()?;
    let gsi = layout::pci_intx_gsi(slot, 0);
    claims
        .claim_gsi(
            gsi,
            &format!("PCI 00:{slot:02x}.0 INTA{what}"),
            Sharing::PciIntx,
        )
        .map_err(PlaceError::from)?;
    Ok((slot, gsi))
}

/// Where bus 0 is reachable besides the config ports: ECAM and the windows BARs may use.
struct PciWindows {
    ecam: Option<u64>,
    mmio32: (u64, u64),
    mmio64: Option<(u64, u64)>,
}

impl PciWindows {
    /// A direct boot: ECAM, and BARs only where ferrovm allocates them.
    fn direct(pci: &PciRoot) -> Self {
        Self {
            ecam: Some(layout::PCI_ECAM_START),
            mmio32: pci.mmio_window(),
            mmio64: None,
        }
    }

    /// A firmware boot (i440FX, no ECAM): QEMU's PC holes, from the end of low RAM to the
    /// IOAPIC, and 64-bit from above RAM (1 GiB aligned) up to the CPU's physical address
    /// limit (SeaBIOS puts 64-bit BARs at the top of it when the guest has RAM above 4 GiB),
    /// at most 2^44 as SeaBIOS caps it.
    fn firmware(below_4g: u64, above_4g: u64, phys_bits: u8) -> Self {
        let start64 = (layout::HIGH_RAM_START + above_4g).next_multiple_of(1 << 30);
        let top = 1u64 << phys_bits.clamp(36, 44);
        Self {
            ecam: None,
            mmio32: (below_4g, layout::PCI_HOLE32_END - below_4g),
            mmio64: Some((
                start64,
                top.saturating_sub(start64).max(layout::PCI_HOLE64_SIZE),
            )),
        }
    }
}

/// Puts bus 0 on the buses: CONFIG_ADDRESS/CONFIG_DATA ports, ECAM and the BAR windows.
fn install_pci(pci: PciRoot, w: &PciWindows, buses: &mut Buses) -> Result<PciAcpi, VmmError> {
    let root = Arc::new(pci);
    let (address, data) = PciConfigIo::pair(root.clone());
    // 0xcf9 is the reset register: CONFIG_ADDRESS is a one-port range taking dword accesses.
    buses.add(
        Space::Pio,
        0xcf8,
        1,
        "pci-config-address",
        Arc::new(address),
    )?;
    buses.add(Space::Pio, 0xcfc, 4, "pci-config-data", Arc::new(data))?;
    if let Some(ecam) = w.ecam {
        let dev = Arc::new(PciEcam::new(root.clone()));
        buses.add(Space::Mmio, ecam, layout::PCI_ECAM_SIZE, "pci-ecam", dev)?;
    }
    let io = root.has_io_bars().then_some(devices::pci::root::PIO_WINDOW);
    if let Some((start, size)) = io {
        let dev = Arc::new(devices::pci::PciIoWindow::new(root.clone()));
        buses.add(Space::Pio, start, size, "pci-io", dev)?;
    }
    let (start, size) = w.mmio32;
    let window = Arc::new(PciMmioWindow::at(root.clone(), start));
    buses.add(Space::Mmio, start, size, "pci-mmio", window)?;
    if let Some((start, size)) = w.mmio64 {
        let window = Arc::new(PciMmioWindow::at(root, start));
        buses.add(Space::Mmio, start, size, "pci-mmio64", window)?;
    }
    Ok(PciAcpi {
        ecam_base: w.ecam,
        mmio_start: w.mmio32.0,
        mmio_size: w.mmio32.1,
        mmio64: w.mmio64,
        io,
    })
}

/// Claims what the platform itself uses: guest RAM, the interrupt controllers' MMIO pages and
/// the fixed ISA interrupt lines.
fn claim_platform(claims: &mut Resources, below_4g: u64, above_4g: u64) -> Result<(), PlaceError> {
    claims.claim(Space::Mmio, 0, below_4g, "guest RAM")?;
    if above_4g > 0 {
        claims.claim(
            Space::Mmio,
            layout::HIGH_RAM_START,
            above_4g,
            "guest RAM above 4 GiB",
        )?;
    }
    claims.claim(Space::Mmio, layout::IOAPIC_START, 0x1000, "IOAPIC")?;
    claims.claim(Space::Mmio, layout::APIC_START, 0x1000, "local APIC")?;
    for (gsi, owner) in [
        (0, "PIT"),
        (2, "PIT (IOAPIC override)"),
        (layout::COM1_IRQ, "com1"),
        (layout::ACPI_SCI_IRQ, "ACPI SCI"),
    ] {
        claims.claim_gsi(gsi, owner, Sharing::Exclusive)?;
    }
    Ok(())
}

/// A register-file device behind its own lock, as the bus holds it.
pub(crate) fn shared<D: BusDeviceMut + 'static>(d: D) -> crate::bus::SharedDevice {
    Arc::new(Mutex::new(d))
}

/// Port 0x80: the POST code port, written by Linux as an I/O delay. Writes are dropped.
struct PostPort;
impl BusDeviceMut for PostPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The serial output sink, wrapped to notice a guest kernel panic or a firmware that found
/// nothing to boot.
fn serial_output(
    mode: &SerialMode,
    seen: Arc<console_watch::Seen>,
) -> Result<Box<dyn Write + Send>, VmmError> {
    let inner: Box<dyn Write + Send> = match mode {
        SerialMode::Stdio => Box::new(std::io::stdout()),
        SerialMode::Off => Box::new(std::io::sink()),
        SerialMode::File(p) => {
            Box::new(File::create(p).map_err(|e| VmmError::SerialFile(p.clone(), e))?)
        }
    };
    Ok(Box::new(console_watch::ConsoleWatch::new(inner, seen)))
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Stops every vCPU thread: each is signalled until it leaves KVM_RUN and exits.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        while !t.is_finished() {
            let _ = t.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = t.join();
    }
}

/// Blocks until `stop` or `stats` is readable (EINTR is retried). Returns true for `stats`
/// (live statistics asked for), false for `stop`.
fn wait_readable(stop: &EventFd, stats: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        let mut p = [stop.as_raw_fd(), stats.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `p` is an array of two valid pollfds for the duration of the call.
        let r = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
        if r > 0 {
            return p[0].revents == 0;
        }
    }
}

/// Prints the live exit statistics on stderr (with `\r\n` while the terminal is raw).
fn print_live_stats(stats: &ExitStats, why: &str) {
    let table = stats.snapshot().table(&format!("live, {why}"));
    let table = if console::raw_mode_active() {
        table.replace('\n', "\r\n")
    } else {
        table
    };
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(table.as_bytes());
    let _ = err.flush();
}

/// The end-of-run report (`--exit-stats`). Failures are reported and do not change the
/// VM's outcome.
fn report_exit_stats(stats: &ExitStats, outputs: &[StatsOutput]) {
    if outputs.is_empty() {
        return;
    }
    let snap = stats.snapshot();
    for out in outputs {
        match out {
            StatsOutput::Table => eprint!("{}", snap.table("end of run")),
            StatsOutput::Json(path) => {
                if let Err(e) = std::fs::write(path, snap.json()) {
                    eprintln!(
                        "ferrovm: cannot write exit statistics to {}: {e}",
                        path.display()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn seen(panic: bool, no_boot: bool) -> console_watch::Seen {
        let s = console_watch::Seen::default();
        s.panic.store(panic, Ordering::SeqCst);
        s.no_boot_device.store(no_boot, Ordering::SeqCst);
        s
    }

    #[test]
    fn outcomes() {
        let quiet = seen(false, false);
        let panic = seen(true, false);
        assert_eq!(
            outcome(Some(StopRequest::PowerOff), &[], &quiet),
            VmOutcome::PowerOff
        );
        assert_eq!(
            outcome(Some(StopRequest::Reset), &[], &quiet),
            VmOutcome::Reset
        );
        assert_eq!(
            outcome(Some(StopRequest::Reset), &[], &panic),
            VmOutcome::GuestPanic
        );
        assert_eq!(
            outcome(Some(StopRequest::Reset), &[], &seen(false, true)),
            VmOutcome::NoBootableDevice
        );
        assert_eq!(
            outcome(Some(StopRequest::DebugExit(3)), &[], &quiet),
            VmOutcome::DebugExit(3)
        );
        let tf = [(0, VcpuStop::TripleFault { dump: "d".into() })];
        assert!(matches!(
            outcome(None, &tf, &quiet),
            VmOutcome::Crash { .. }
        ));
        assert_eq!(outcome(None, &tf, &panic), VmOutcome::GuestPanic);
        assert!(matches!(outcome(None, &[], &quiet), VmOutcome::Stopped(_)));
    }
}
