//! Command-line options and their validation: `ferrovm run ...` becomes a [`VmConfig`].

use std::path::PathBuf;

/// Largest vCPU count accepted (KVM's limit is checked again at VM creation).
pub const MAX_VCPUS: u32 = 254;
/// Smallest guest accepted: Linux needs a few MiB to decompress itself.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest accepted (guest RAM is mapped lazily, so this is about address space).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors in user-supplied options.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("invalid memory size '{0}': expected a number with an optional K, M, G or T suffix")]
    MemorySyntax(String),
    #[error("memory size {0} is too small: at least 16M is needed to boot Linux")]
    MemoryTooSmall(String),
    #[error("memory size {0} is too large: at most 1T is supported")]
    MemoryTooLarge(String),
    #[error("invalid --memory '{0}': {1}")]
    MemoryOption(String, String),
    #[error("--cpus {0} is out of range: 1 to {MAX_VCPUS}")]
    Cpus(u32),
    #[error("invalid --disk '{0}': {1}")]
    Disk(String, String),
    #[error("invalid --cdrom '{0}': {1}")]
    Cdrom(String, String),
    #[error("invalid --net '{0}': {1}")]
    Net(String, String),
    #[error("{0}")]
    Fs(String),
    #[error("{0}")]
    Vsock(String),
    #[error("invalid --seccomp '{0}': expected on, log or off")]
    Seccomp(String),
    #[error("invalid --console '{0}': expected serial or virtio")]
    Console(String),
    #[error("invalid --serial '{0}': expected stdio, off or file=PATH")]
    Serial(String),
    #[error("invalid --exit-stats '{0}': expected --exit-stats or --exit-stats=json:PATH")]
    ExitStats(String),
    #[error(transparent)]
    Cpu(#[from] crate::arch::x86_64::cpu_features::CpuError),
    /// What to boot (`--kernel`, `--firmware`), its whole message.
    #[error("{0}")]
    Boot(String),
    /// The cloud-init seed (`--cloud-init`, `--ssh-key`, `--password`), its whole message.
    #[error("{0}")]
    CloudInit(String),
}

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    Stdio,
    Off,
    File(PathBuf),
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel of a direct boot (unused when `firmware` is set).
    pub kernel: PathBuf,
    /// `--firmware`: boot through this firmware image instead of a kernel.
    pub firmware: Option<PathBuf>,
    /// `--firmware-log`: where the firmware's debug console (port 0x402) goes.
    pub firmware_log: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub mem_size: u64,
    /// `--memory SIZE,thp=..,hugepages=..`: how guest RAM is backed (`shared` is decided by
    /// the devices: a vhost-user share needs it).
    pub mem_backing: crate::memory::RamBacking,
    pub serial: SerialMode,
    /// `--console virtio`: add a virtio console (hvc0) beside the serial port; both write
    /// where `serial` says, and typed input goes to the virtio console.
    pub virtio_console: bool,
    /// `--seccomp`: the system-call filters of the VM's threads.
    pub seccomp: crate::seccomp::SeccompMode,
    pub verbose: bool,
    /// `--exit-stats`: where the end-of-run exit statistics go (any number of outputs).
    pub exit_stats: Vec<crate::exit_stats::StatsOutput>,
    /// Record exit statistics (on by default; `bench-exits` turns it off to measure the cost).
    pub record_exits: bool,
    /// The bench device's log (`bench-exits`, which implies the device).
    pub bench: Option<std::sync::Arc<std::sync::Mutex<crate::bench::device::BenchLog>>>,
    /// `--bench-device`: attach the bench device (test and benchmark guests only).
    pub bench_device: bool,
    /// Add a virtio-rng entropy device (virtio-pci).
    pub rng: bool,
    /// `--disk`: virtio-blk disks, in PCI slot order (the first is /dev/vda).
    pub disks: Vec<crate::devices::virtio::block::DiskConfig>,
    /// `--cdrom`: read-only CD-ROMs, targets 0.. of one virtio-scsi controller after the disks.
    pub cdroms: Vec<crate::devices::virtio::block::DiskConfig>,
    /// `--net`: virtio-net NICs on TAP devices, in PCI slot order after the disks.
    pub nets: Vec<crate::devices::virtio::net::NetConfig>,
    /// `--fs`: virtio-fs shares (vhost-user, virtiofsd), in PCI slot order after the NICs.
    pub fs: Vec<crate::devices::virtio::fs::FsConfig>,
    /// `--vsock`: a virtio-vsock device (hybrid vsock over Unix sockets), after the shares.
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
    /// `--test-devices`: QEMU's pc-testdev and pci-testdev (kvm-unit-tests); never in an
    /// ordinary VM.
    pub test_devices: bool,
    /// `--iommu`: an emulated Intel IOMMU (VT-d DMA and interrupt remapping, QEMU's
    /// `-device intel-iommu,intremap=on`) on a split irqchip (ferrovm's IOAPIC, no PIC, no
    /// PIT). Direct kernel boots only.
    pub iommu: bool,
    /// `--cpu`: CPUID feature changes over what KVM supports.
    pub cpu: crate::arch::x86_64::cpu_features::CpuFeatures,
    /// The cloud-init NoCloud seed image (`--cloud-init`, `--ssh-key`, `--password`): a
    /// read-only virtio-blk disk after the `--disk` ones.
    pub cloud_init_seed: Option<Vec<u8>>,
}

impl VmConfig {
    /// A VM booting `kernel` with every other option at its default (1 vCPU, 512 MiB, serial
    /// on stdio, no devices). Callers set fields with struct update syntax.
    pub fn with_kernel(kernel: PathBuf) -> Self {
        Self {
            kernel,
            firmware: None,
            firmware_log: None,
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            mem_size: 512 << 20,
            mem_backing: Default::default(),
            serial: SerialMode::Stdio,
            virtio_console: false,
            seccomp: Default::default(),
            verbose: false,
            exit_stats: Vec::new(),
            record_exits: true,
            bench: None,
            bench_device: false,
            rng: false,
            disks: Vec::new(),
            cdroms: Vec::new(),
            nets: Vec::new(),
            fs: Vec::new(),
            vsock: None,
            cpu: Default::default(),
            test_devices: false,
            iommu: false,
            cloud_init_seed: None,
        }
    }
}

/// The default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// The default kernel command line with `--console virtio`.
pub const DEFAULT_CMDLINE_HVC: &str = "console=hvc0 reboot=k panic=1";

/// Parses `512M`, `4G`, `1T`, `65536K` or a plain byte count.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(ConfigError::MemorySyntax(s.into())),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError::MemorySyntax(s.into()))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| ConfigError::MemoryTooLarge(s.into()))?;
    if bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(s.into()));
    }
    if bytes > MAX_MEMORY {
        return Err(ConfigError::MemoryTooLarge(s.into()));
    }
    Ok(bytes)
}

/// Parses `--memory SIZE[,thp=on|off][,hugepages=on|off]`.
pub fn parse_memory_spec(s: &str) -> Result<(u64, crate::memory::RamBacking), ConfigError> {
    let mut parts = s.split(',');
    let size = parse_memory(parts.next().unwrap_or_default())?;
    let mut backing = crate::memory::RamBacking::default();
    let mut seen: Vec<&str> = Vec::new();
    let bad = |why: String| ConfigError::MemoryOption(s.into(), why);
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("'{kv}' is not key=value")))?;
        if seen.contains(&k) {
            return Err(bad(format!("'{k}' given twice")));
        }
        seen.push(k);
        let on = match v {
            "on" | "yes" | "true" => true,
            "off" | "no" | "false" => false,
            _ => return Err(bad(format!("{k}={v}: expected on or off"))),
        };
        match k {
            "thp" => backing.thp = on,
            "hugepages" => backing.hugetlb = on,
            _ => return Err(bad(format!("unknown key '{k}' (thp, hugepages)"))),
        }
    }
    if backing.hugetlb && size % crate::memory::RAM_ALIGN as u64 != 0 {
        return Err(bad(
            "hugepages=on needs a size that is a multiple of 2M".into()
        ));
    }
    Ok((size, backing))
}

/// Checks a vCPU count.
pub fn parse_cpus(n: u32) -> Result<u8, ConfigError> {
    if n == 0 || n > MAX_VCPUS {
        return Err(ConfigError::Cpus(n));
    }
    Ok(n as u8)
}

/// Parses `stdio`, `off` or `file=PATH`.
pub fn parse_serial(s: &str) -> Result<SerialMode, ConfigError> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "off" | "none" => Ok(SerialMode::Off),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(ConfigError::Serial(s.into())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        let def = crate::memory::RamBacking::default();
        assert_eq!(parse_memory_spec("256M"), Ok((256 << 20, def)));
        let (_, b) = parse_memory_spec("1G,thp=off,hugepages=on").unwrap();
        assert!(!b.thp && b.hugetlb && !b.shared);
        for bad in [
            "256M,thp",
            "256M,thp=maybe",
            "256M,thp=on,thp=off",
            "256M,huge=on",
            "17M,hugepages=on",
        ] {
            let e = parse_memory_spec(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid --memory"), "{bad}: {e}");
        }
        assert!(matches!(
            parse_memory_spec("12X,thp=on"),
            Err(ConfigError::MemorySyntax(_))
        ));
        assert_eq!(parse_memory("4g"), Ok(4 << 30));
        assert_eq!(parse_memory("1T"), Ok(1 << 40));
        assert_eq!(parse_memory("65536K"), Ok(64 << 20));
        assert_eq!(parse_memory("268435456"), Ok(256 << 20));
        assert!(matches!(
            parse_memory("0"),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            parse_memory("2T"),
            Err(ConfigError::MemoryTooLarge(_))
        ));
        assert!(matches!(
            parse_memory("99999999999999999999G"),
            Err(ConfigError::MemorySyntax(_))
        ));
        assert!(matches!(
            parse_memory("18446744073709551615G"),
            Err(ConfigError::MemorySyntax(_) | ConfigError::MemoryTooLarge(_))
        ));
        assert!(matches!(
            parse_memory("12X"),
            Err(ConfigError::MemorySyntax(_))
        ));
        assert!(matches!(
            parse_memory(""),
            Err(ConfigError::MemorySyntax(_))
        ));
        assert!(matches!(
            parse_memory("M"),
            Err(ConfigError::MemorySyntax(_))
        ));
    }

    #[test]
    fn cpus_and_serial() {
        assert_eq!(parse_cpus(1), Ok(1));
        assert_eq!(parse_cpus(0), Err(ConfigError::Cpus(0)));
        assert_eq!(parse_cpus(10000), Err(ConfigError::Cpus(10000)));
        assert_eq!(parse_serial("stdio"), Ok(SerialMode::Stdio));
        assert_eq!(parse_serial("off"), Ok(SerialMode::Off));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("pty").is_err());
    }
}
