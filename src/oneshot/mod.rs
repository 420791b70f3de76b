//! `ferrovm run [OPTIONS] -- CMD [ARGS...]`: one command in a throwaway VM.
//!
//! ferrovm makes an initramfs holding its own guest init (`init.c`, built static by build.rs),
//! the kernel modules that init needs and the command; shares the host's `/` read-only and
//! the working directory read-write over virtio-fs (`--share-host`, the default without
//! `--disk`/`--initramfs`); and adds a vsock device whose ports 1-4 carry the command's
//! stdout, stderr, exit status and stdin ([`relay`]). The VM is an ordinary ferrovm VM: every
//! option still applies.
//!
//! Exit statuses: the command's own; 128+N when a signal N killed it (as a shell reports
//! it); 128+N when signal N (Ctrl-C: 130) stopped ferrovm; 124 when the guest kernel panicked
//! or crashed before the command ended; 125 when ferrovm or its guest init could not run the
//! command (one line on stderr says why); 126/127 when the command could not be executed or
//! was not found.

pub mod initramfs;
pub mod relay;

use std::path::{Path, PathBuf};

use crate::config::{VmConfig, DEFAULT_CMDLINE};
use crate::devices::virtio::daemon::PrivateDir;
use crate::devices::virtio::fs::{FsConfig, FsSource};
use crate::devices::virtio::vsock::VsockConfig;
use crate::vmm::{VmOutcome, VmmError};
use initramfs::{find_modules, Cpio, ModuleTree};

/// The guest init, built by build.rs (empty when the host had no static C library).
static INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferrovm-init"));

/// virtio-fs tags of the two shares (the guest init mounts them by these names).
pub const ROOT_TAG: &str = "ferrovm-root";
pub const CWD_TAG: &str = "ferrovm-cwd";
/// The guest's vsock CID.
const GUEST_CID: u64 = 3;
/// The kernel command line of a command run (unless `--cmdline` is given).
pub const COMMAND_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=k";

/// Exit statuses of their own (see the module documentation).
pub const STATUS_GUEST_DIED: u8 = 124;
pub const STATUS_CANNOT_RUN: u8 = 125;

/// What to run and how.
#[derive(Debug, Clone)]
pub struct CommandOptions {
    pub argv: Vec<String>,
    /// `--share-host`, or the default (no `--disk`/`--initramfs`).
    pub share_host: bool,
    /// `--save-initramfs`: a copy of the initramfs made.
    pub save_initramfs: Option<PathBuf>,
}

/// Why the command cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum OneshotError {
    #[error("this ferrovm was built without its guest init (the static C build failed): install gcc and libc6-dev and rebuild")]
    NoInit,
    #[error("--vsock cannot be combined with a command: ferrovm uses the vsock device for the command's streams")]
    VsockTaken,
    #[error("--fs tag {0:?} is reserved for the command's shares")]
    TagTaken(String),
    #[error("kernel {kernel}: module {module} is neither built in nor in {dir}/modules.dep")]
    MissingModule {
        kernel: PathBuf,
        module: String,
        dir: PathBuf,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OneshotError {
    let what = what.into();
    move |source| OneshotError::Io { what, source }
}

/// Where the command's root comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    Host,
    Initramfs,
    Disk,
}

impl Root {
    fn name(self) -> &'static str {
        match self {
            Root::Host => "host",
            Root::Initramfs => "initramfs",
            Root::Disk => "disk",
        }
    }
}

/// The kernel a command run boots when none is given: the host's own if readable, else the
/// guest-images default of this source tree (its PVH vmlinux: no decompression in the guest).
pub fn default_kernel() -> Option<PathBuf> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid utsname for the call.
    if unsafe { libc::uname(&mut u) } == 0 {
        // SAFETY: uname NUL-terminates `release`.
        let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
        let host = PathBuf::from(format!("/boot/vmlinuz-{}", release.to_string_lossy()));
        if std::fs::File::open(&host).is_ok() {
            return Some(host);
        }
    }
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-images/out/default");
    ["vmlinux", "bzImage"]
        .iter()
        .map(|k| ours.join(k))
        .find(|k| k.exists())
}

/// A command run being set up or running: its private folder and the relay of its streams.
pub struct Prepared {
    relay: relay::Relay,
    _dir: PrivateDir,
}

/// Turns `cfg` into the VM of a command run and starts the relay of its streams.
pub fn prepare(opts: &CommandOptions, cfg: &mut VmConfig) -> Result<Prepared, OneshotError> {
    if INIT.is_empty() {
        return Err(OneshotError::NoInit);
    }
    if cfg.vsock.is_some() {
        return Err(OneshotError::VsockTaken);
    }
    if let Some(f) = cfg
        .fs
        .iter()
        .find(|f| f.tag == ROOT_TAG || f.tag == CWD_TAG)
    {
        return Err(OneshotError::TagTaken(f.tag.clone()));
    }
    let root = match (opts.share_host, &cfg.initramfs, cfg.disks.is_empty()) {
        (true, _, _) => Root::Host,
        (false, Some(_), _) => Root::Initramfs,
        (false, None, false) => Root::Disk,
        (false, None, true) => Root::Host,
    };
    let cwd = std::env::current_dir().map_err(io_err("the current directory"))?;
    // From `/` the working directory is the root: it stays the read-only overlay.
    let cwd_share = (cwd != Path::new("/")).then_some(cwd.as_path());
    let dir = PrivateDir::create("run").map_err(io_err("a temporary directory"))?;
    let image = build_initramfs(opts, cfg, root, cwd_share)?;
    let path = dir.path().join("initramfs.cpio");
    for p in [Some(&path), opts.save_initramfs.as_ref()]
        .into_iter()
        .flatten()
    {
        std::fs::write(p, &image).map_err(io_err(format!("writing {}", p.display())))?;
    }
    cfg.initramfs = Some(path);
    if root == Root::Host {
        cfg.fs.push(share(ROOT_TAG, Path::new("/"), true));
    }
    if let Some(cwd) = cwd_share {
        cfg.fs.push(share(CWD_TAG, cwd, false));
    }
    let socket = dir.path().join("vsock");
    cfg.vsock = Some(VsockConfig {
        cid: GUEST_CID,
        socket: socket.clone(),
    });
    if cfg.cmdline == DEFAULT_CMDLINE {
        cfg.cmdline = COMMAND_CMDLINE.into();
    }
    cfg.cmdline.push_str(" rdinit=/init");
    if cfg.verbose {
        cfg.cmdline.push_str(" ferrovm.trace");
    }
    crate::seccomp::set_mode(cfg.seccomp); // the relay thread filters itself as the VM's will
    let relay = relay::Relay::start(&socket).map_err(io_err("the command's stream sockets"))?;
    Ok(Prepared { relay, _dir: dir })
}

/// A share ferrovm starts virtiofsd for; the read-only root is an overlay's lower layer.
fn share(tag: &str, path: &Path, readonly: bool) -> FsConfig {
    FsConfig {
        tag: tag.into(),
        source: FsSource::Dir {
            path: path.into(),
            readonly,
            submounts: !readonly,
        },
    }
}

/// Kernel modules the guest init loads, (name, required): always, and for each kind of root.
const MODULES: [(&str, bool); 3] = [
    ("virtio_pci", true),
    ("vmw_vsock_virtio_transport", true),
    ("virtiofs", true),
];
const HOST_ROOT_MODULES: [(&str, bool); 1] = [("overlay", true)];
const DISK_ROOT_MODULES: [(&str, bool); 2] = [("virtio_blk", true), ("ext4", false)];

/// The modules the guest init needs for `root`.
fn wanted_modules(root: Root) -> Vec<(&'static str, bool)> {
    let extra: &[(&str, bool)] = match root {
        Root::Host => &HOST_ROOT_MODULES,
        Root::Disk => &DISK_ROOT_MODULES,
        Root::Initramfs => &[],
    };
    MODULES.iter().chain(extra).copied().collect()
}

/// Every module a command run may load, whatever its root (for test beds that copy a
/// kernel's modules).
pub fn all_modules() -> Vec<(&'static str, bool)> {
    let mut all = wanted_modules(Root::Host);
    all.extend(DISK_ROOT_MODULES);
    all
}

fn nul_list(items: impl IntoIterator<Item = String>) -> Vec<u8> {
    items
        .into_iter()
        .flat_map(|s| s.into_bytes().into_iter().chain([0]))
        .collect()
}

fn build_initramfs(
    opts: &CommandOptions,
    cfg: &VmConfig,
    root: Root,
    cwd: Option<&Path>,
) -> Result<Vec<u8>, OneshotError> {
    let mut c = Cpio::default();
    for d in [
        "dev", "proc", "sys", "tmp", "run", "lower", "upper", "newroot", "ferrovm",
    ] {
        c.dir(d);
    }
    c.dir("ferrovm/modules.d");
    c.char_dev("dev/console", 5, 1);
    c.file("init", 0o755, INIT);
    c.file("ferrovm/argv", 0o644, &nul_list(opts.argv.iter().cloned()));
    let env = std::env::vars_os().map(|(k, v)| {
        let mut kv = k;
        kv.push("=");
        kv.push(v);
        kv.to_string_lossy().into_owned()
    });
    c.file("ferrovm/env", 0o644, &nul_list(env));
    if let Some(cwd) = cwd {
        c.file("ferrovm/cwd", 0o644, cwd.to_string_lossy().as_bytes());
    }
    c.file("ferrovm/root", 0o644, root.name().as_bytes());
    let mut list = String::new();
    if let Some(dir) = find_modules(&cfg.kernel) {
        let tree = ModuleTree::open(&dir).map_err(io_err(dir.display().to_string()))?;
        let paths =
            tree.resolve(&wanted_modules(root))
                .map_err(|module| OneshotError::MissingModule {
                    kernel: cfg.kernel.clone(),
                    module,
                    dir: tree.dir.clone(),
                })?;
        for (i, rel) in paths.iter().enumerate() {
            let src = tree.dir.join(rel);
            let data = std::fs::read(&src).map_err(io_err(src.display().to_string()))?;
            let base = rel.rsplit('/').next().unwrap_or(rel);
            let name = format!("ferrovm/modules.d/{i:02}-{base}");
            c.file(&name, 0o644, &data);
            list += &format!("/{name}\n");
        }
    }
    c.file("ferrovm/modules", 0o644, list.as_bytes());
    let ours = c.finish();
    let Some(user) = cfg.initramfs.as_ref().filter(|_| root == Root::Initramfs) else {
        return Ok(ours);
    };
    // The user's initramfs first, then ours (the kernel unpacks both; later files win).
    let mut image = std::fs::read(user).map_err(io_err(user.display().to_string()))?;
    while image.len() % 4 != 0 {
        image.push(0);
    }
    image.extend(ours);
    Ok(image)
}

/// The exit status the guest init's status line gives ("exit N", "signal N", "error MSG").
fn reported_status(line: &str) -> Option<u8> {
    let (word, rest) = line.split_once(' ')?;
    match word {
        "exit" => Some(rest.trim().parse().unwrap_or(STATUS_CANNOT_RUN)),
        "signal" => Some(128u8.saturating_add(rest.trim().parse().unwrap_or(0))),
        "error" => {
            eprintln!("ferrovm: the guest could not run the command: {rest}");
            Some(STATUS_CANNOT_RUN)
        }
        _ => None,
    }
}

/// The exit status of a command run, from what the guest init reported and how the VM ended.
pub fn finish(p: Prepared, outcome: &Result<VmOutcome, VmmError>) -> u8 {
    let since_start = || crate::START.get().map_or(0, |s| s.elapsed().as_millis());
    log::debug!("command run: the VM ended {} ms after start", since_start());
    let reported = p.relay.finish();
    log::debug!("command run: streams done {} ms after start", since_start());
    if let Some(code) = reported.as_deref().and_then(reported_status) {
        return code;
    }
    let (code, why) = match outcome {
        Err(e) => (STATUS_CANNOT_RUN, crate::error_chain(e)),
        Ok(VmOutcome::Stopped(why)) => match crate::console::stop_signal() {
            Some(sig) => (128u8.saturating_add(sig as u8), format!("stopped by signal {sig}")),
            None => (STATUS_CANNOT_RUN, format!("stopped: {why}")),
        },
        Ok(VmOutcome::GuestPanic) => (STATUS_GUEST_DIED, "the guest kernel panicked".into()),
        Ok(VmOutcome::Crash { reason, .. }) => {
            (STATUS_GUEST_DIED, format!("the guest crashed: {reason}"))
        }
        Ok(other) => (
            STATUS_CANNOT_RUN,
            format!("the guest ended ({other:?}) before its init reported; --serial file=PATH shows its console"),
        ),
    };
    eprintln!("ferrovm: {why}");
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_map_to_exit_statuses() {
        assert_eq!(reported_status("exit 7"), Some(7));
        assert_eq!(reported_status("exit 0"), Some(0));
        assert_eq!(reported_status("signal 9"), Some(137));
        assert_eq!(reported_status("signal 200"), Some(255), "saturates");
        assert_eq!(reported_status("exit 999"), Some(STATUS_CANNOT_RUN));
        assert_eq!(
            reported_status("error cannot mount x"),
            Some(STATUS_CANNOT_RUN)
        );
        assert_eq!(reported_status("garbage"), None);
        assert_eq!(reported_status("hello world"), None);
    }

    fn opts(argv: &[&str]) -> CommandOptions {
        CommandOptions {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            share_host: true,
            save_initramfs: None,
        }
    }

    #[test]
    fn a_command_run_gets_its_shares_vsock_and_initramfs() {
        if INIT.is_empty() {
            return crate::test_support::skipped(
                "a_command_run_gets_its_shares_vsock_and_initramfs",
                "built without the guest init",
            );
        }
        let mut cfg = VmConfig::with_kernel("/nonexistent/bzImage".into());
        let p = prepare(&opts(&["sh", "-c", "echo hi"]), &mut cfg).unwrap();
        let tags: Vec<&str> = cfg.fs.iter().map(|f| f.tag.as_str()).collect();
        assert_eq!(tags, [ROOT_TAG, CWD_TAG]);
        assert!(cfg.cmdline.ends_with(" rdinit=/init"));
        assert!(cfg.cmdline.starts_with(COMMAND_CMDLINE));
        let image = std::fs::read(cfg.initramfs.as_ref().unwrap()).unwrap();
        let needle = b"sh\0-c\0echo hi\0";
        assert!(image.windows(needle.len()).any(|w| w == needle));
        let mut stdout_port = cfg.vsock.as_ref().unwrap().socket.clone().into_os_string();
        stdout_port.push("_1");
        assert!(
            Path::new(&stdout_port).exists(),
            "the relay listens for stdout"
        );
        drop(p);
        assert!(
            !cfg.initramfs.as_ref().unwrap().exists(),
            "the private folder goes"
        );
    }

    #[test]
    fn conflicting_options_are_refused() {
        let mut cfg = VmConfig::with_kernel("/nonexistent/bzImage".into());
        cfg.vsock = Some(VsockConfig {
            cid: 3,
            socket: "/tmp/x".into(),
        });
        let e = prepare(&opts(&["true"]), &mut cfg)
            .err()
            .unwrap()
            .to_string();
        if INIT.is_empty() {
            return;
        }
        assert!(e.contains("--vsock"), "{e}");
        let mut cfg = VmConfig::with_kernel("/nonexistent/bzImage".into());
        cfg.fs.push(share(CWD_TAG, Path::new("/tmp"), false));
        let e = prepare(&opts(&["true"]), &mut cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("reserved"), "{e}");
    }
}
