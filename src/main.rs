//! The `ferrovm` command: parses options, runs the VM, maps the outcome to an exit status.
//!
//! Exit statuses (also in the README):
//! - 0: the guest powered off or rebooted, or ferrovm was stopped by SIGINT/SIGTERM or `C-a x`
//! - 1: ferrovm could not start or run the VM (bad option value, missing file, KVM error)
//! - 2: command-line syntax error
//! - 3: the guest crashed: triple fault, KVM internal error or failed VM entry
//! - 4: the guest kernel panicked
//! - 6: the firmware found no bootable device (it reset the machine after its retry wait)
//! - (V << 1) | 1: the guest wrote V to the isa-debug-exit port 0xf4

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferrovm::config::{self, VmConfig};
use ferrovm::vmm::{self, VmOutcome};

#[derive(Parser)]
#[command(
    name = "ferrovm",
    version,
    about = "A small KVM hypervisor that boots unmodified Linux"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM.
    Run(Box<RunArgs>),
    /// Check that /dev/kvm works: run a few real-mode instructions and verify the exits.
    Selftest,
    /// Measure the cost of each kind of VM exit, through ferrovm and through a bare KVM_RUN loop.
    BenchExits(BenchArgs),
    /// Disk images: describe one, or create a qcow2 image or overlay.
    #[command(subcommand)]
    Img(ImgCommand),
}

#[derive(Subcommand)]
enum ImgCommand {
    /// Print an image's format, virtual size, allocation, backing chain and problems found.
    Info {
        /// The image (opened read-only, with a shared lock).
        file: PathBuf,
        /// The format, instead of detecting it (raw, qcow2, vhd).
        #[arg(long, short = 'f')]
        format: Option<String>,
    },
    /// Create a qcow2 image: empty with --size, or an overlay of --backing (its size).
    Create {
        /// The new image (must not exist).
        file: PathBuf,
        /// Virtual size: bytes, or with a K/M/G/T suffix (powers of 1024).
        #[arg(long)]
        size: Option<String>,
        /// A base image the new one is an overlay of (stored as given; relative names
        /// resolve against the new image's folder, as in qemu-img).
        #[arg(long, short = 'b')]
        backing: Option<PathBuf>,
        /// Cluster size in bytes (512 to 2 MiB, a power of two).
        #[arg(long, default_value_t = 65536)]
        cluster_size: u64,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Round trips per repetition (rounded up to a multiple of 10).
    #[arg(short = 'n', long, default_value_t = 1000)]
    round_trips: u32,
    /// Repetitions per exit kind (median and p99 are over these).
    #[arg(short = 'r', long, default_value_t = 21)]
    reps: u32,
    /// Only these kinds (pio-out, pio-in, mmio-read, mmio-write, ioeventfd-pio,
    /// ioeventfd-mmio, cpuid, rdmsr, hlt-irqfd); repeatable.
    #[arg(long, value_name = "KIND")]
    only: Vec<String>,
    /// A built kvm-unit-tests checkout: add its x86/vmexit.flat rows to the report.
    #[arg(long, value_name = "DIR")]
    kvm_unit_tests: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel: a bzImage or an ELF vmlinux (PVH entry if it has the note); detected from the contents.
    #[arg(long, value_name = "PATH", conflicts_with = "firmware")]
    kernel: Option<PathBuf>,
    /// Boot through PC firmware instead of a kernel: bios (Debian's SeaBIOS), uefi (Debian's
    /// OVMF) or an image PATH. The default without --kernel when a --disk is given: bios.
    #[arg(long, value_name = "bios|uefi|PATH")]
    firmware: Option<String>,
    /// A CD-ROM drive with the ISO image PATH (read-only; a virtio-scsi CD-ROM the firmware
    /// boots El Torito from, /dev/sr0 in Linux). `path=PATH[,format=F][,bootindex=N]` sets
    /// its boot order; without bootindex, CD-ROMs boot after the --disk ones. Repeatable.
    #[arg(long, value_name = "PATH")]
    cdrom: Vec<String>,
    /// What a guest reboot does: exit (ferrovm ends, status 0) or restart (the VM starts
    /// again from its firmware or kernel, like a power cycle).
    #[arg(long, value_name = "exit|restart", default_value = "exit",
          value_parser = ["exit", "restart"])]
    reboot: String,
    /// Write the firmware's debug console (port 0x402, QEMU's isa-debugcon) to PATH.
    #[arg(long, value_name = "PATH")]
    firmware_log: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line (it may start with `-`). A multiboot kernel gets the kernel's path,
    /// a space and this, as QEMU and GRUB give it.
    #[arg(long, value_name = "STR", default_value = config::DEFAULT_CMDLINE,
          allow_hyphen_values = true)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest RAM with an optional K, M, G or T suffix, then `,thp=off` (no transparent huge
    /// pages) or `,hugepages=on` (hugetlbfs pages from the host's pool).
    #[arg(
        long,
        value_name = "SIZE[,thp=on|off][,hugepages=on|off]",
        default_value = "512M"
    )]
    memory: String,
    /// The guest's console device: `serial` (COM1, ttyS0) or `virtio` (a virtio console,
    /// hvc0, without an exit per character; the default command line then says
    /// console=hvc0). COM1 stays in the VM either way.
    #[arg(long, value_name = "serial|virtio", default_value = "serial")]
    console: String,
    /// System-call filters on every thread that runs while the guest does: `on` (a forbidden
    /// call stops ferrovm with one line naming it, status 5), `log` (allowed, logged by the
    /// kernel as audit type 1326) or `off`.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    seccomp: String,
    /// Guest serial console: stdio, off or file=PATH.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    serial: String,
    /// Verbose: debug logging and a register dump when the guest crashes.
    #[arg(short, long)]
    verbose: bool,
    /// Exit statistics when the VM ends: a table on stderr, or `=json:PATH`. Repeatable.
    /// SIGUSR1 and `C-a s` print live figures whether or not this is given.
    #[arg(long, value_name = "json:PATH", num_args = 0..=1, require_equals = true,
          default_missing_value = "table")]
    exit_stats: Vec<String>,
    /// Add a virtio-rng entropy device (virtio-pci) fed from the host's /dev/urandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-blk disk: path=FILE[,format=raw|qcow2|vhd][,readonly=on][,serial=ID]
    /// [,direct=on][,overlay=on][,backing=BASE]. Repeatable; the first is /dev/vda. The
    /// format is detected from the contents unless given. The image is locked against other
    /// writers (a qcow2's backing files are shared read-only). direct=on opens it O_DIRECT
    /// (raw images are then served through io_uring). overlay=on sends writes to a temporary
    /// qcow2 that vanishes at exit; backing=BASE makes FILE a persistent qcow2 overlay of
    /// BASE (created when missing).
    #[arg(long, value_name = "path=FILE[,...]")]
    disk: Vec<String>,
    /// A cloud-init NoCloud seed (a read-only disk labelled CIDATA after the --disk ones) with
    /// these files: user-data=FILE[,meta-data=FILE][,network-config=FILE]. Without
    /// meta-data, ferrovm writes one whose instance-id follows the contents.
    #[arg(long, value_name = "user-data=FILE[,...]")]
    cloud_init: Option<String>,
    /// A public key (.pub) for the cloud image's default user (a seed is made). Repeatable.
    #[arg(long, value_name = "PATH.pub")]
    ssh_key: Vec<PathBuf>,
    /// A password for the cloud image's default user, SSH password login on (a seed is made).
    #[arg(long, value_name = "PW")]
    password: Option<String>,
    /// A virtio-net NIC: on a TAP device (tap=NAME), or user-mode networking through passt
    /// (user: DHCP, DNS, NAT, no root; hostfwd=tcp:[ADDR]:PORT-:GUESTPORT forwards a host
    /// port, repeatable). Both take mac=MAC. Repeatable.
    #[arg(long, value_name = "tap=NAME|user[,hostfwd=...][,mac=MAC]")]
    net: Vec<String>,
    /// A host folder in the guest over virtio-fs: tag=NAME,path=DIR[,readonly=on] (ferrovm
    /// runs virtiofsd) or tag=NAME,socket=PATH (a running vhost-user-fs daemon). The guest
    /// mounts it with `mount -t virtiofs NAME /mnt`. Repeatable.
    #[arg(long, value_name = "tag=NAME,path=DIR[,readonly=on]")]
    fs: Vec<String>,
    /// A virtio-vsock device with guest CID N (3 or more). Host programs reach guest port P by
    /// connecting to the Unix socket PATH and writing "CONNECT P\n" (answered "OK <port>\n");
    /// guest connections to CID 2 port P go to the Unix socket PATH_P (Firecracker's and
    /// Cloud Hypervisor's hybrid vsock).
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<String>,
    /// CPU model and features in QEMU's spelling: host|max[,+FEATURE][,-FEATURE][,FEATURE=on|off].
    /// Both models are everything this host's KVM supports; adding a feature it cannot back is
    /// an error.
    #[arg(long, value_name = "MODEL[,+F,-F]", default_value = "host")]
    cpu: String,
    /// Attach QEMU's test devices for kvm-unit-tests: pc-testdev (ports 0xe0-0xeb and
    /// 0x2000-0x2017, MMIO 0xff000000-0xff00ffff; drives ISA interrupt lines) and pci-testdev
    /// (PCI 1b36:0005, a 4 KiB MMIO BAR and a 256-port I/O BAR) and edu (PCI 1234:11e8,
    /// QEMU's DMA and interrupt test device). Never in an ordinary VM.
    #[arg(long)]
    test_devices: bool,
    /// An emulated Intel IOMMU at 0xfed90000 (VT-d: DMA remapping for devices that use it,
    /// interrupt remapping for every MSI and the IOAPIC; QEMU's `-device
    /// intel-iommu,intremap=on,eim=off`), with a DMAR ACPI table. Puts the IOAPIC in ferrovm
    /// (KVM's split irqchip): there is no 8259 PIC and no PIT, so it needs a direct kernel
    /// boot (no --firmware).
    #[arg(long, conflicts_with = "firmware")]
    iommu: bool,
    /// Attach the bench device (ports 0x700-0x71f, MMIO 0xe1000000-0xe1001fff, GSI 23) that
    /// `bench-exits` and the exit-statistics test guests talk to. Never in an ordinary VM.
    #[arg(long)]
    bench_device: bool,
    /// With a command: the guest's root is the host's / (read-only, with a tmpfs overlay for
    /// writes). The default when neither --disk nor --initramfs is given.
    #[arg(long)]
    share_host: bool,
    /// Run CMD in a throwaway VM (after `--`): its stdout, stderr and exit status are
    /// ferrovm's, stdin is passed on unless it is a terminal, the working directory is shared
    /// read-write. The kernel defaults to /boot/vmlinuz-$(uname -r), else guest-images'.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
    /// With a command: also write the initramfs ferrovm made for it to PATH (to boot the same
    /// guest init under another VMM, or to look inside).
    #[arg(long, value_name = "PATH")]
    save_initramfs: Option<PathBuf>,
}

fn build_config(a: RunArgs) -> Result<VmConfig, config::ConfigError> {
    let exit_stats = a
        .exit_stats
        .iter()
        .map(|s| {
            ferrovm::exit_stats::parse_output(s)
                .ok_or_else(|| config::ConfigError::ExitStats(s.clone()))
        })
        .collect::<Result<_, _>>()?;
    let disks: Vec<_> = a
        .disk
        .iter()
        .map(|s| {
            ferrovm::devices::virtio::block::parse_disk_option(s)
                .map_err(|e| config::ConfigError::Disk(s.clone(), e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let cdroms: Vec<_> = a
        .cdrom
        .iter()
        .map(|s| {
            ferrovm::devices::virtio::scsi::parse_cdrom_option(s)
                .map_err(|e| config::ConfigError::Cdrom(s.clone(), e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let nets = a
        .net
        .iter()
        .map(|s| {
            ferrovm::devices::virtio::net::parse_net_option(s)
                .map_err(|e| config::ConfigError::Net(s.clone(), e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let fs: Vec<_> =
        a.fs.iter()
            .map(|s| ferrovm::devices::virtio::fs::parse_fs_option(s))
            .collect::<Result<_, _>>()
            .map_err(|e| config::ConfigError::Fs(e.to_string()))?;
    ferrovm::devices::virtio::fs::check_fs_list(&fs)
        .map_err(|e| config::ConfigError::Fs(e.to_string()))?;
    let vsock = a
        .vsock
        .as_deref()
        .map(ferrovm::devices::virtio::vsock::parse_vsock_option)
        .transpose()
        .map_err(|e| config::ConfigError::Vsock(e.to_string()))?;
    let cloud_init_seed = cloud_init_seed(&a)?;
    let firmware = match (&a.kernel, &a.firmware, disks.is_empty()) {
        // (--kernel with --firmware, and neither without a disk, are usage errors: clap.)
        (Some(_), _, _) => None,
        (None, Some(f), _) => Some(f.as_str()),
        (None, None, _) => Some("bios"),
    }
    .map(ferrovm::fwboot::resolve)
    .transpose()
    .map_err(|e| config::ConfigError::Boot(e.to_string()))?;
    if a.firmware_log.is_some() && firmware.is_none() {
        return Err(config::ConfigError::Boot(
            "--firmware-log needs a firmware boot".into(),
        ));
    }
    let (mem_size, mem_backing) = config::parse_memory_spec(&a.memory)?;
    let virtio_console = match a.console.as_str() {
        "serial" => false,
        "virtio" => true,
        other => return Err(config::ConfigError::Console(other.into())),
    };
    Ok(VmConfig {
        firmware,
        firmware_log: a.firmware_log,
        cloud_init_seed,
        exit_stats,
        mem_size,
        mem_backing,
        cpus: config::parse_cpus(a.cpus)?,
        serial: config::parse_serial(&a.serial)?,
        initramfs: a.initramfs,
        cmdline: match virtio_console && a.cmdline == config::DEFAULT_CMDLINE {
            true => config::DEFAULT_CMDLINE_HVC.into(),
            false => a.cmdline,
        },
        virtio_console,
        seccomp: ferrovm::seccomp::SeccompMode::parse(&a.seccomp)
            .ok_or_else(|| config::ConfigError::Seccomp(a.seccomp.clone()))?,
        verbose: a.verbose,
        rng: a.rng,
        bench_device: a.bench_device,
        test_devices: a.test_devices,
        iommu: a.iommu,
        disks,
        cdroms,
        nets,
        fs,
        vsock,
        cpu: ferrovm::arch::x86_64::cpu_features::CpuFeatures::parse(&a.cpu)?,
        ..VmConfig::with_kernel(a.kernel.unwrap_or_default())
    })
}

/// The seed image when any cloud-init option is given.
fn cloud_init_seed(a: &RunArgs) -> Result<Option<Vec<u8>>, config::ConfigError> {
    use ferrovm::cloudinit::{self, CloudInit};
    if a.cloud_init.is_none() && a.ssh_key.is_empty() && a.password.is_none() {
        return Ok(None);
    }
    let one_line = |e: cloudinit::CloudInitError| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg += &format!(": {s}");
            src = s.source();
        }
        config::ConfigError::CloudInit(msg)
    };
    let mut ci = CloudInit {
        ssh_keys: a.ssh_key.clone(),
        password: a.password.clone(),
        ..CloudInit::default()
    };
    if let Some(s) = &a.cloud_init {
        cloudinit::parse_option(s, &mut ci).map_err(one_line)?;
    }
    cloudinit::seed_image(&ci).map(Some).map_err(one_line)
}

/// Prints an error and its whole chain of causes on one line.
fn report(err: &dyn std::error::Error) {
    eprintln!("ferrovm: error: {}", ferrovm::error_chain(err));
}

fn main() -> ExitCode {
    ferrovm::START.get_or_init(std::time::Instant::now);
    let cli = Cli::parse();
    match cli.command {
        Command::Selftest => match ferrovm::kvm::selftest::run() {
            Ok(r) => {
                println!(
                    "selftest: ok (KVM API {}; exits: {})",
                    r.api_version,
                    r.exits.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::from(1)
            }
        },
        Command::BenchExits(a) => {
            let opts = ferrovm::bench::BenchOptions {
                round_trips: a.round_trips,
                reps: a.reps,
                only: a.only,
                kvm_unit_tests: a.kvm_unit_tests,
            };
            let unknown: Vec<&String> = opts
                .only
                .iter()
                .filter(|o| !ferrovm::bench::KINDS.iter().any(|k| k.name == o.as_str()))
                .collect();
            if !unknown.is_empty() {
                eprintln!("ferrovm: error: unknown exit kind(s) {unknown:?}");
                return ExitCode::from(2);
            }
            let mut progress = |k: &str| eprintln!("bench-exits: {k}");
            match ferrovm::bench::run(&opts, &mut progress) {
                Ok(r) => {
                    print!("{}", r.table());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report(&e);
                    ExitCode::from(1)
                }
            }
        }
        Command::Img(c) => match img(c) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                report(e.as_ref());
                ExitCode::from(1)
            }
        },
        Command::Run(args) if !args.command.is_empty() => run_command(args),
        Command::Run(args) => {
            if args.kernel.is_none()
                && args.firmware.is_none()
                && args.disk.is_empty()
                && args.cdrom.is_empty()
            {
                use clap::CommandFactory;
                Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "nothing to boot: give --kernel PATH, or a --disk for the firmware to boot (--firmware bios|uefi|PATH)",
                    )
                    .exit();
            }
            let verbose = args.verbose;
            let restart = args.reboot == "restart";
            init_logger(verbose);
            let cfg = match build_config(*args) {
                Ok(c) => c,
                Err(e) => {
                    report(&e);
                    return ExitCode::from(1);
                }
            };
            loop {
                match vmm::run(cfg.clone()) {
                    Ok(VmOutcome::Reset) if restart => {
                        eprintln!("ferrovm: guest rebooted; restarting the VM (--reboot restart)");
                    }
                    Ok(outcome) => return outcome_status(&outcome, verbose),
                    Err(e) => {
                        ferrovm::console::restore_terminal();
                        report(&e);
                        return ExitCode::from(1);
                    }
                }
            }
        }
    }
}

fn init_logger(verbose: bool) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if verbose {
        "debug"
    } else {
        "warn"
    }))
    .format_timestamp(None)
    .init();
}

/// `ferrovm run [OPTIONS] -- CMD [ARGS...]` (see `ferrovm::oneshot` for the exit statuses).
fn run_command(mut args: Box<RunArgs>) -> ExitCode {
    use ferrovm::oneshot::{self, CommandOptions, STATUS_CANNOT_RUN};
    init_logger(args.verbose);
    let fail = |msg: String| {
        eprintln!("ferrovm: error: {msg}");
        ExitCode::from(STATUS_CANNOT_RUN)
    };
    if args.firmware.is_some() {
        return fail(
            "a command runs on a kernel ferrovm boots directly: --firmware does not apply".into(),
        );
    }
    if args.kernel.is_none() {
        args.kernel = oneshot::default_kernel();
        if args.kernel.is_none() {
            return fail(
                "no kernel: /boot/vmlinuz-$(uname -r) is not readable and guest-images/out/default/vmlinux \
                 is not built; give --kernel PATH"
                    .into(),
            );
        }
    }
    let share_host = args.share_host
        || (args.disk.is_empty() && args.cdrom.is_empty() && args.initramfs.is_none());
    // The kernel's console is not the command's output: off, or on stderr with -v.
    if args.serial == "stdio" {
        args.serial = if args.verbose {
            "file=/dev/stderr"
        } else {
            "off"
        }
        .into();
    }
    let opts = CommandOptions {
        argv: std::mem::take(&mut args.command),
        share_host,
        save_initramfs: args.save_initramfs.take(),
    };
    let mut cfg = match build_config(*args) {
        Ok(c) => c,
        Err(e) => return fail(ferrovm::error_chain(&e)),
    };
    let prepared = match oneshot::prepare(&opts, &mut cfg) {
        Ok(p) => p,
        Err(e) => return fail(ferrovm::error_chain(&e)),
    };
    let outcome = vmm::run(cfg);
    ExitCode::from(oneshot::finish(prepared, &outcome))
}

fn img(c: ImgCommand) -> Result<(), Box<dyn std::error::Error>> {
    use ferrovm::disk::{self, overlay, Format};
    let format = |f: Option<String>| -> Result<Option<Format>, String> {
        f.map(|f| Format::parse(&f).ok_or(format!("unknown format `{f}` (raw, qcow2, vhd)")))
            .transpose()
    };
    match c {
        ImgCommand::Info { file, format: f } => {
            print!("{}", disk::info::describe(&file, format(f)?)?);
        }
        ImgCommand::Create {
            file,
            size,
            backing,
            cluster_size,
        } => {
            let bits = cluster_size.trailing_zeros();
            if !cluster_size.is_power_of_two() {
                return Err(format!("cluster size {cluster_size} is not a power of two").into());
            }
            let backing = match &backing {
                None => None,
                Some(b) => {
                    let base = ferrovm::disk::qcow2::resolve_backing(&file, &b.to_string_lossy());
                    let d = disk::open(&disk::DiskOptions {
                        path: base,
                        readonly: true,
                        direct: false,
                        format: None,
                    })?;
                    Some((b.to_string_lossy().into_owned(), d.format(), d.size()))
                }
            };
            let size = match (size, &backing) {
                (Some(s), _) => config::parse_memory(&s)
                    .map_err(|_| format!("size `{s}`: expected bytes or a K/M/G/T suffix"))?,
                (None, Some((_, _, base))) => *base,
                (None, None) => return Err("give --size or --backing".into()),
            };
            let img = overlay::NewQcow2 {
                size,
                cluster_bits: bits,
                backing: backing.map(|(n, f, _)| (n, f)),
            };
            overlay::create_qcow2(&file, &img)?;
        }
    }
    Ok(())
}

fn outcome_status(outcome: &VmOutcome, verbose: bool) -> ExitCode {
    let (status, msg): (u8, Option<String>) = match outcome {
        VmOutcome::PowerOff => (0, None),
        VmOutcome::Reset => (0, Some("guest rebooted; ferrovm exits (status 0)".into())),
        VmOutcome::Stopped(why) => (0, Some(format!("stopped: {why}"))),
        VmOutcome::DebugExit(v) => ((((*v) << 1) | 1) as u8, None),
        VmOutcome::GuestPanic => (4, Some("guest kernel panic".into())),
        VmOutcome::NoBootableDevice => (
            6,
            Some("the firmware found no bootable device (no disk with a boot loader)".into()),
        ),
        VmOutcome::Crash { reason, dump } => {
            if verbose && !dump.is_empty() {
                eprint!("{dump}");
            }
            (3, Some(format!("guest crashed: {reason}")))
        }
    };
    if let Some(m) = msg {
        eprintln!("ferrovm: {m}");
    }
    ExitCode::from(status)
}
