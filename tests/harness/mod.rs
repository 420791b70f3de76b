//! Test harness for ferrovm's Linux-guest tests.
//!
//! On a host with hardware virtualization (svm/vmx in /proc/cpuinfo) each case's shell
//! script runs directly on the host ("direct" mode).  Otherwise ("nested" mode) the
//! harness boots an L1 Linux under QEMU-TCG with emulated AMD-V, loads kvm/kvm-amd in it
//! and runs every case script inside L1, where ferrovm gets a real /dev/kvm.
//!
//! Scripts run under `sh` (cwd `$WORK`) with these variables set:
//! - `$FERROVM`: path of the ferrovm binary
//! - `$IMAGES`: the default flavor's guest image dir (bzImage, vmlinux, initramfs.cpio.gz,
//!   busybox, kernel-version, manifest.txt; in L1 rootfs.ext4 only with
//!   FERROVM_L1_ROOTFS=initrd)
//! - `$FILES`: dir holding the case's extra files (`Case::files`) by name
//! - `$WORK`: writable per-case scratch dir
//! - `$FERROVM_TEST_MODE`: `nested` or `direct`
//! - `$BUSYBOX`: a static busybox
//! - `$FERROVM_L1_DISKS`: (nested only) block devices of the extra virtio disks, in order
//!
//! Shell functions from tests/l1/helpers.sh are predefined (`mkinitrd_with_test SCRIPT
//! OUT [FILE...]`, `kvm_debugfs`, `wait_for_line`, `skip_case REASON`).
//!
//! A case that cannot run is skipped, never passed: either the host lacks a file it
//! `requires` (then it does not start), or its script calls `skip_case REASON` (prints
//! `SKIPPED: REASON`, exits with `SKIP_STATUS`). The harness prints one line
//! `SKIPPED: nested::<name>: <reason>` per skipped case (scripts/test counts these) and ends
//! with `nested: N passed, M failed, K skipped`.
//!
//! Environment knobs: FERROVM_TEST_MODE=nested|direct, FERROVM_TEST_VERBOSE=1,
//! FERROVM_IMAGES=<dir> (default guest-images/out/default), FERROVM_BIN=<path>,
//! FERROVM_QEMU=<qemu binary>, FERROVM_L1_MEM=<MiB>, FERROVM_L1_APPEND=<extra cmdline>,
//! FERROVM_L1_ROOTFS=initrd|disk (ship rootfs.ext4 in the initramfs, or attach it as a
//! read-only virtio disk), FERROVM_L1_DISKS=<path>[:<path>...] (more read-only disks),
//! FERROVM_KEEP_LOGS=1 (keep logs of passing runs), FERROVM_BOOT_TIMEOUT=<secs>.

#![allow(dead_code)]

mod cpio;
mod direct;
mod nested;
#[path = "../support/mod.rs"]
mod support;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Where a case ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nested,
    Direct,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Nested => "nested",
            Mode::Direct => "direct",
        })
    }
}

/// What a case produced.
#[derive(Clone, Debug)]
pub struct CaseOutput {
    /// Exit status of the script; `None` if the harness killed it on timeout.
    pub status: Option<i32>,
    /// stdout and stderr of the script, interleaved (in nested mode: the lines the case
    /// printed, with L1's own console lines between the case's begin and end markers, so
    /// L1 kernel messages can appear).
    pub output: String,
    pub mode: Mode,
}

pub type Check = Box<dyn Fn(&CaseOutput) -> Result<(), String>>;

/// One test case: a shell script plus a check of its result.
pub struct Case {
    /// `[A-Za-z0-9_.-]+`
    pub name: String,
    /// sh script, run in L1 (nested) or on the host (direct).
    pub script: String,
    pub timeout: Duration,
    /// (host path, name): made available as `$FILES/<name>`.
    pub files: Vec<(PathBuf, String)>,
    /// Harness self-test only: the case passes only if it timed out (and `check` passes).
    pub expect_timeout: bool,
    /// Called when the status is as expected (exited, or timed out if `expect_timeout`).
    pub check: Check,
    /// (host path, hint): the case is skipped, not run, when one of these does not exist.
    pub requires: Vec<(PathBuf, String)>,
}

/// Exit status of a case script that cannot run (`skip_case` in tests/l1/helpers.sh); its
/// output must hold a `SKIPPED: <reason>` line.
pub const SKIP_STATUS: i32 = 77;

impl Case {
    /// A case with a 120 s timeout whose check is "exit status 0".
    pub fn new(name: &str, script: &str) -> Case {
        Case {
            name: name.to_string(),
            script: script.to_string(),
            timeout: Duration::from_secs(120),
            files: Vec::new(),
            expect_timeout: false,
            check: Box::new(expect_success),
            requires: Vec::new(),
        }
    }
    pub fn timeout(mut self, t: Duration) -> Case {
        self.timeout = t;
        self
    }
    pub fn file(mut self, host_path: impl Into<PathBuf>, name: &str) -> Case {
        self.files.push((host_path.into(), name.to_string()));
        self
    }
    pub fn expect_timeout(mut self) -> Case {
        self.expect_timeout = true;
        self
    }
    pub fn check(mut self, f: impl Fn(&CaseOutput) -> Result<(), String> + 'static) -> Case {
        self.check = Box::new(f);
        self
    }
    /// Skip the case (reporting `hint`, e.g. how to make the file) unless `host_path` exists.
    pub fn requires(mut self, host_path: impl Into<PathBuf>, hint: &str) -> Case {
        self.requires.push((host_path.into(), hint.to_string()));
        self
    }
    /// Why the case cannot run on this host, if it cannot.
    fn missing_requirement(&self) -> Option<String> {
        self.requires
            .iter()
            .find(|(p, _)| !p.exists())
            .map(|(p, hint)| format!("{} not found ({hint})", p.display()))
    }
}

/// The default check: exit status 0.
pub fn expect_success(o: &CaseOutput) -> Result<(), String> {
    expect_status(o, 0)
}

pub fn expect_status(o: &CaseOutput, want: i32) -> Result<(), String> {
    match o.status {
        Some(s) if s == want => Ok(()),
        Some(s) => Err(format!("exit status {s}, expected {want}")),
        None => Err("timed out".into()),
    }
}

/// Fails unless `o.output` contains `needle`.
pub fn expect_output(o: &CaseOutput, needle: &str) -> Result<(), String> {
    if o.output.contains(needle) {
        Ok(())
    } else {
        Err(format!("output does not contain {needle:?}"))
    }
}

/// Harness-wide settings; `Config::from_env()` is what `run` uses.
pub struct Config {
    pub mode: Mode,
    pub verbose: bool,
    pub keep_logs: bool,
    pub ferrovm: PathBuf,
    pub images: PathBuf,
    /// target/nested
    pub state_dir: PathBuf,
    pub qemu: String,
    pub l1_mem_mb: u32,
    pub l1_append: String,
    pub boot_timeout: Duration,
    /// Put `$IMAGES/rootfs.ext4` into the L1 initramfs (as $IMAGES/rootfs.ext4 in L1).
    pub rootfs_in_initrd: bool,
    /// Read-only virtio disks for L1 (`$FERROVM_L1_DISKS` lists their devices).
    pub l1_disks: Vec<PathBuf>,
    /// More host files for the L1 initramfs: (host path, absolute path in L1).
    pub l1_extra: Vec<(PathBuf, String)>,
    /// Host executables copied into L1 at the same path, with the shared libraries `ldd`
    /// lists (e.g. /sbin/e2fsck, /usr/bin/qemu-system-x86_64).
    pub l1_programs: Vec<PathBuf>,
    /// More L1 kernel modules by name (dependencies resolved from modules.dep), e.g. "tun".
    pub l1_modules: Vec<String>,
}

impl Config {
    pub fn from_env() -> Config {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let ferrovm = env("FERROVM_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ferrovm")));
        // target/<profile>/ferrovm -> target/nested
        let state_dir = ferrovm
            .parent()
            .and_then(Path::parent)
            .filter(|_| env("FERROVM_BIN").is_none())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| manifest.join("target"))
            .join("nested");
        let images = env("FERROVM_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join("guest-images/out/default"));
        let mode = match env("FERROVM_TEST_MODE").as_deref() {
            Some("nested") => Mode::Nested,
            Some("direct") => Mode::Direct,
            Some(other) => {
                eprintln!(
                    "warning: FERROVM_TEST_MODE={other:?} is not nested|direct; autodetecting"
                );
                detect_mode()
            }
            None => detect_mode(),
        };
        let rootfs = env("FERROVM_L1_ROOTFS");
        let mut l1_disks: Vec<PathBuf> = Vec::new();
        if rootfs.as_deref() == Some("disk") {
            l1_disks.push(images.join("rootfs.ext4"));
        }
        if let Some(d) = env("FERROVM_L1_DISKS") {
            l1_disks.extend(d.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
        }
        Config {
            mode,
            verbose: env("FERROVM_TEST_VERBOSE").is_some_and(|v| v != "0"),
            keep_logs: env("FERROVM_KEEP_LOGS").is_some_and(|v| v != "0"),
            ferrovm,
            images,
            state_dir,
            qemu: env("FERROVM_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into()),
            l1_mem_mb: env("FERROVM_L1_MEM")
                .and_then(|v| v.parse().ok())
                .unwrap_or(3072),
            l1_append: env("FERROVM_L1_APPEND").unwrap_or_default(),
            boot_timeout: Duration::from_secs(
                env("FERROVM_BOOT_TIMEOUT")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(180),
            ),
            rootfs_in_initrd: rootfs.as_deref() == Some("initrd"),
            l1_disks,
            l1_extra: Vec::new(),
            l1_programs: Vec::new(),
            l1_modules: Vec::new(),
        }
    }
}

/// The guest kernel modules `ferrovm run -- CMD` loads, for `Config::l1_extra`: at
/// /images/modules in L1, the `modules/` folder beside /images/bzImage where ferrovm looks.
pub fn command_run_modules(images: &Path) -> Vec<(PathBuf, String)> {
    let dir = images.join("modules");
    let Ok(tree) = ferrovm::oneshot::initramfs::ModuleTree::open(&dir) else {
        return Vec::new(); // command runs then fail: the guest has no vsock
    };
    let wanted = ferrovm::oneshot::all_modules();
    let mut files = tree.resolve(&wanted).unwrap_or_default();
    files.extend(["modules.dep".to_string(), "modules.builtin".to_string()]);
    files
        .into_iter()
        .map(|rel| (dir.join(&rel), format!("/images/modules/{rel}")))
        .filter(|(p, _)| p.exists())
        .collect()
}

/// The guest's AF_VSOCK netcat, built static (busybox nc has no vsock). If gcc fails the file
/// is missing and the case reports SKIPPED with the reason (which CI counts as a failure).
pub fn vsock_nc() -> PathBuf {
    guest_program("vsock-nc")
}

/// tests/guest/NAME.c built static with gcc into the target's temporary folder (rebuilt when
/// the source is newer). If gcc fails the file is missing: the case's `requires` reports it.
pub fn guest_program(name: &str) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/guest/{name}.c"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let fresh = match (std::fs::metadata(&src), std::fs::metadata(&out)) {
        (Ok(s), Ok(o)) => o.modified().ok() >= s.modified().ok(),
        _ => false,
    };
    if !fresh {
        let _ = std::fs::remove_file(&out);
        let built = std::process::Command::new("gcc")
            .args(["-static", "-Os", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .status();
        if !matches!(built, Ok(s) if s.success()) {
            let _ = std::fs::remove_file(&out);
        }
    }
    out
}

/// svm or vmx in /proc/cpuinfo => direct, else nested.
/// QEMU firmware images by file name, for `Config::l1_extra`: each found one goes to
/// `/qemu/share/<name>` in L1 (use `qemu-system-x86_64 -L /qemu/share`). Debian keeps the
/// SeaBIOS images in /usr/share/seabios and the rest in /usr/share/qemu.
pub fn qemu_firmware(names: &[&str]) -> Vec<(PathBuf, String)> {
    names
        .iter()
        .filter_map(|f| {
            ["/usr/share/qemu", "/usr/share/seabios"]
                .iter()
                .find_map(|d| std::fs::canonicalize(format!("{d}/{f}")).ok())
                .map(|p| (p, format!("/qemu/share/{f}")))
        })
        .collect()
}

pub fn detect_mode() -> Mode {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "svm" || f == "vmx"));
    if hw {
        Mode::Direct
    } else {
        Mode::Nested
    }
}

/// Result of one case as seen by the runner.
pub(crate) struct Outcome {
    /// Ok(output) if the case ran to an end marker / exit (or a timeout the runner saw);
    /// Err(reason) if the harness could not get a result.
    pub result: Result<CaseOutput, String>,
    pub elapsed: Duration,
}

struct Filter {
    patterns: Vec<String>,
    skip: Vec<String>,
    exact: bool,
    list: bool,
}

fn parse_args() -> Filter {
    let mut f = Filter {
        patterns: vec![],
        skip: vec![],
        exact: false,
        list: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--exact" => f.exact = true,
            "--list" => f.list = true,
            "--skip" => f.skip.extend(args.next()),
            // libtest options that take a value
            "--test-threads" | "--color" | "--format" | "--logfile" | "-Z" | "--report-time" => {
                args.next();
            }
            s if s.starts_with("--skip=") => f.skip.push(s["--skip=".len()..].to_string()),
            s if s.starts_with('-') => {} // --nocapture, --test-threads=N, -q, ...
            s => f.patterns.push(s.to_string()),
        }
    }
    f
}

impl Filter {
    fn matches(&self, name: &str) -> bool {
        let full = format!("nested::{name}");
        let hit = |p: &String| {
            if self.exact {
                p == name || *p == full
            } else {
                full.contains(p.as_str())
            }
        };
        (self.patterns.is_empty() || self.patterns.iter().any(hit))
            && !self.skip.iter().any(|s| full.contains(s.as_str()))
    }
}

/// Runs the cases matching the command-line filter, prints one line per case and a
/// final `nested: N passed, N failed` line. Failure exit code if any case failed.
pub fn run(cases: Vec<Case>) -> ExitCode {
    run_with(cases, Config::from_env())
}

pub fn run_with(cases: Vec<Case>, cfg: Config) -> ExitCode {
    let filter = parse_args();
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        if c.name.is_empty()
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch))
        {
            return fatal(&format!(
                "invalid case name {:?} (allowed: [A-Za-z0-9_.-]+)",
                c.name
            ));
        }
        if !names.insert(c.name.clone()) {
            return fatal(&format!("duplicate case name {:?}", c.name));
        }
    }
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|c| filter.matches(&c.name))
        .collect();
    if filter.list {
        for c in &cases {
            println!("nested::{}: test", c.name);
        }
        return ExitCode::SUCCESS;
    }
    let mut reporter = Reporter {
        cfg: &cfg,
        passed: 0,
        failed: 0,
        skipped: 0,
        log_dir: None,
    };
    let (cases, unrunnable): (Vec<Case>, Vec<Case>) = cases
        .into_iter()
        .partition(|c| c.missing_requirement().is_none());
    for c in &unrunnable {
        reporter.skip(c, &c.missing_requirement().unwrap_or_default());
    }
    if cases.is_empty() {
        println!("running 0 tests");
        println!("nested: 0 passed, 0 failed, {} skipped", reporter.skipped);
        return ExitCode::SUCCESS;
    }
    if let Err(e) = preflight(&cfg, &cases) {
        return fatal(&e);
    }
    println!("running {} tests (mode: {})", cases.len(), cfg.mode);
    let t0 = Instant::now();
    let log_dir = match cfg.mode {
        Mode::Nested => nested::run(&cfg, &cases, &mut reporter),
        Mode::Direct => direct::run(&cfg, &cases, &mut reporter),
    };
    let log_dir = match log_dir {
        Ok(d) => d,
        Err(e) => return fatal(&e),
    };
    let (passed, failed, skipped) = (reporter.passed, reporter.failed, reporter.skipped);
    if let Some(dir) = log_dir {
        if failed > 0 || cfg.keep_logs {
            println!("logs: {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    println!("finished in {:.1}s", t0.elapsed().as_secs_f64());
    println!("nested: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn fatal(msg: &str) -> ExitCode {
    println!("error: {msg}");
    ExitCode::FAILURE
}

fn preflight(cfg: &Config, cases: &[Case]) -> Result<(), String> {
    if !cfg.ferrovm.is_file() {
        return Err(format!(
            "ferrovm binary not found at {} (cargo build, or set FERROVM_BIN)",
            cfg.ferrovm.display()
        ));
    }
    if !cfg.images.is_dir() {
        return Err(format!(
            "guest images not found at {}: run guest-images/build.sh",
            cfg.images.display()
        ));
    }
    let mut need: Vec<&str> = vec![
        "bzImage",
        "vmlinux",
        "initramfs.cpio.gz",
        "busybox",
        "kernel-version",
    ];
    if cfg.mode == Mode::Nested {
        need.push("modules/modules.dep");
    }
    if cfg.rootfs_in_initrd {
        need.push("rootfs.ext4");
    }
    for n in need {
        if !cfg.images.join(n).exists() {
            return Err(format!(
                "guest images incomplete at {}: {n} missing: run guest-images/build.sh",
                cfg.images.display()
            ));
        }
    }
    for c in cases {
        for (p, name) in &c.files {
            if !p.exists() {
                return Err(format!("case {}: file {} not found", c.name, p.display()));
            }
            if name.is_empty() || name.contains('/') {
                return Err(format!("case {}: bad file name {name:?}", c.name));
            }
        }
    }
    if cfg.mode == Mode::Nested {
        for d in &cfg.l1_disks {
            if !d.is_file() {
                return Err(format!("L1 disk image {} not found", d.display()));
            }
        }
        if find_in_path(&cfg.qemu).is_none() {
            return Err(format!(
                "{} not found: apt-get install qemu-system-x86",
                cfg.qemu
            ));
        }
    }
    Ok(())
}

pub(crate) fn find_in_path(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Some(PathBuf::from(prog)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Prints per-case result lines as results arrive.
pub(crate) struct Reporter<'a> {
    cfg: &'a Config,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub log_dir: Option<PathBuf>,
}

/// The reason on a case's `SKIPPED: <reason>` line.
fn skip_reason(output: &str) -> Option<&str> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("SKIPPED:"))
        .map(str::trim)
        .filter(|r| !r.is_empty())
}

impl Reporter<'_> {
    /// Counts a case that could not run and prints its `SKIPPED:` line.
    pub fn skip(&mut self, case: &Case, reason: &str) {
        self.skipped += 1;
        println!(
            "SKIPPED: nested::{}: {reason} ({})",
            case.name, self.cfg.mode
        );
    }

    pub fn report(&mut self, case: &Case, outcome: Outcome) {
        let mode = self.cfg.mode;
        let secs = outcome.elapsed.as_secs_f64();
        if let Ok(out) = &outcome.result {
            if out.status == Some(SKIP_STATUS) && !case.expect_timeout {
                if let Some(reason) = skip_reason(&out.output) {
                    return self.skip(case, reason);
                }
            }
        }
        let verdict = match &outcome.result {
            Err(e) => Err(e.clone()),
            Ok(out) => match (out.status, case.expect_timeout) {
                (Some(SKIP_STATUS), false) => Err(format!(
                    "exit status {SKIP_STATUS} (skipped) without a \"SKIPPED: <reason>\" line"
                )),
                (None, false) => Err(format!("timed out after {}s", case.timeout.as_secs())),
                (Some(s), true) => {
                    Err(format!("expected a timeout, but it exited with status {s}"))
                }
                _ => (case.check)(out),
            },
        };
        let output = match &outcome.result {
            Ok(o) => o.output.as_str(),
            Err(_) => "",
        };
        match &verdict {
            Ok(()) => {
                self.passed += 1;
                println!("test nested::{} ... ok ({mode}, {secs:.1}s)", case.name);
            }
            Err(reason) => {
                self.failed += 1;
                let mut lines = reason.lines();
                println!(
                    "test nested::{} ... FAILED ({mode}, {secs:.1}s): {}",
                    case.name,
                    lines.next().unwrap_or("")
                );
                for l in lines {
                    println!("    | {l}");
                }
            }
        }
        if (verdict.is_err() || self.cfg.verbose) && !output.is_empty() {
            println!("    --- output of {} ---", case.name);
            for l in output.lines() {
                println!("    {l}");
            }
            println!("    --- end of output ---");
        }
    }
}
