//! Nested mode: build an L1 initramfs, boot it under QEMU-TCG (emulated AMD-V), run the
//! case scripts inside L1 (see tests/l1/init) and parse the markers on its serial console.

use super::cpio::CpioWriter;
use super::support::{self, KillOnDrop};
use super::{Case, CaseOutput, Config, Mode, Outcome, Reporter};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const L1_INIT: &str = include_str!("../l1/init");
const L1_HELPERS: &str = include_str!("../l1/helpers.sh");
const L1_FERROVM: &str = "/usr/local/bin/ferrovm";
/// Host-side slack on top of a case's own timeout before the host gives up on L1.
const CASE_GRACE: Duration = Duration::from_secs(60);
/// Max time between the end of one case and the begin marker of the next.
const BETWEEN_CASES: Duration = Duration::from_secs(60);
const TAIL_LINES: usize = 30;
/// L1's init prefixes every line a case prints with this (tests/l1/init); any other line on
/// L1's console is L1's own: its kernel's messages and init's markers.
const CASE_LINE: &str = "@@C ";

pub(crate) fn new_log_dir(cfg: &Config) -> Result<PathBuf, String> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir =
        cfg.state_dir
            .join("logs")
            .join(format!("{}-{}-{}", cfg.mode, secs, std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------
// L1 initramfs

enum Src {
    Host(PathBuf),
    Data(Vec<u8>),
}

/// Files for the initramfs: path in L1 -> (mode bits, source). Parent dirs are implied.
#[derive(Default)]
struct Tree {
    files: Vec<(String, u32, Src)>,
}

impl Tree {
    fn host(&mut self, l1: &str, perm: u32, src: &Path) {
        self.files
            .push((l1.to_string(), perm, Src::Host(src.to_path_buf())));
    }
    fn data(&mut self, l1: &str, perm: u32, data: impl Into<Vec<u8>>) {
        self.files
            .push((l1.to_string(), perm, Src::Data(data.into())));
    }
    fn write(
        &self,
        w: &mut CpioWriter<impl Write>,
        dirs: &mut BTreeSet<String>,
    ) -> std::io::Result<()> {
        for (path, perm, src) in &self.files {
            let path = path.trim_start_matches('/');
            let mut parent = String::new();
            for comp in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(comp);
                if dirs.insert(parent.clone()) {
                    w.dir(&parent)?;
                }
            }
            match src {
                Src::Host(p) => w.file(path, *perm, p)?,
                Src::Data(d) => w.bytes(path, *perm, d)?,
            }
        }
        Ok(())
    }
}

/// Module name ("kvm_amd") -> (path relative to modules/, deps), from modules.dep.
fn parse_modules_dep(text: &str) -> HashMap<String, (String, Vec<String>)> {
    let name_of = |p: &str| {
        let base = p.rsplit('/').next().unwrap_or(p);
        let base = base.split(".ko").next().unwrap_or(base);
        base.replace('-', "_")
    };
    let mut map = HashMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(name_of).collect();
        map.insert(name_of(path), (path.trim().to_string(), deps));
    }
    map
}

/// Paths (relative to modules/) of `wanted` and their dependencies, in load order.
fn resolve_modules(
    dep: &HashMap<String, (String, Vec<String>)>,
    wanted: &[&str],
) -> Result<Vec<String>, String> {
    fn visit(
        dep: &HashMap<String, (String, Vec<String>)>,
        m: &str,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) -> Result<(), String> {
        let m = m.replace('-', "_");
        if !seen.insert(m.clone()) {
            return Ok(());
        }
        let (path, deps) = dep
            .get(&m)
            .ok_or_else(|| format!("module {m} not in modules.dep"))?;
        for d in deps {
            visit(dep, d, seen, out)?;
        }
        out.push(path.clone());
        Ok(())
    }
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for m in wanted {
        visit(dep, m, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// Shared libraries of a dynamic executable, as (path used by the loader, file).
fn shared_libs(bin: &Path) -> Result<Vec<String>, String> {
    let out = support::output(Command::new("ldd").arg(bin)).map_err(|e| format!("ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success()
        || text.contains("not a dynamic executable")
        || text.contains("statically linked")
    {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(path.to_string());
        } else if line.contains("not found") {
            return Err(format!("ldd {}: {line}", bin.display()));
        }
    }
    Ok(libs)
}

fn build_initrd(cfg: &Config, cases: &[Case], out: &Path) -> Result<(), String> {
    let img = &cfg.images;
    let mut t = Tree::default();
    t.data("init", 0o755, L1_INIT);
    t.host("bin/busybox", 0o755, &img.join("busybox"));
    t.data("etc/ferrovm/helpers.sh", 0o644, L1_HELPERS);

    // kernel modules
    let dep_path = img.join("modules/modules.dep");
    let dep_text =
        std::fs::read_to_string(&dep_path).map_err(|e| format!("{}: {e}", dep_path.display()))?;
    let dep = parse_modules_dep(&dep_text);
    let mut wanted = vec!["kvm_amd"];
    wanted.extend(cfg.l1_modules.iter().map(String::as_str));
    if !cfg.l1_disks.is_empty() {
        wanted.extend(["virtio_pci", "virtio_blk"]);
    }
    let mods = resolve_modules(&dep, &wanted)
        .map_err(|e| format!("{e} ({}): run guest-images/build.sh", dep_path.display()))?;
    let mut mod_list = String::new();
    for m in &mods {
        let l1 = format!("/lib/modules-l1/{}", m.rsplit('/').next().unwrap());
        t.host(&l1, 0o644, &img.join("modules").join(m));
        mod_list += &l1;
        mod_list.push('\n');
    }
    t.data("etc/ferrovm/modules", 0o644, mod_list);

    // ferrovm + its shared libraries
    t.host(L1_FERROVM, 0o755, &cfg.ferrovm);
    let mut lib_dirs = BTreeSet::new();
    for lib in shared_libs(&cfg.ferrovm)? {
        if let Some((dir, _)) = lib.rsplit_once('/') {
            lib_dirs.insert(dir.to_string());
        }
        t.host(&lib, 0o755, Path::new(&lib));
    }

    // other host programs the cases use, with their libraries
    for prog in &cfg.l1_programs {
        let l1 = prog
            .to_str()
            .ok_or_else(|| format!("{}: not a UTF-8 path", prog.display()))?;
        t.host(l1.trim_start_matches('/'), 0o755, prog);
        for lib in shared_libs(prog)? {
            if let Some((dir, _)) = lib.rsplit_once('/') {
                lib_dirs.insert(dir.to_string());
            }
            t.host(&lib, 0o755, Path::new(&lib));
        }
    }

    // guest images
    for f in [
        "bzImage",
        "vmlinux",
        "initramfs.cpio.gz",
        "kernel-version",
        "manifest.txt",
    ] {
        let p = img.join(f);
        if p.exists() {
            t.host(&format!("images/{f}"), 0o644, &p);
        }
    }
    if cfg.rootfs_in_initrd {
        t.host("images/rootfs.ext4", 0o644, &img.join("rootfs.ext4"));
    }
    t.data("images/busybox", 0o755, Vec::new()); // replaced by a symlink below
    t.files.pop();
    for (src, l1) in &cfg.l1_extra {
        t.host(l1, 0o755, src);
    }

    let disks: Vec<String> = (0..cfg.l1_disks.len())
        .map(|i| format!("/dev/vd{}", (b'a' + i as u8) as char))
        .collect();
    let env = format!(
        "export FERROVM={L1_FERROVM} IMAGES=/images FERROVM_TEST_MODE=nested BUSYBOX=/bin/busybox \
         FERROVM_HELPERS=/etc/ferrovm/helpers.sh FERROVM_L1_DISKS=\"{}\" LD_LIBRARY_PATH={}\n",
        disks.join(" "),
        lib_dirs.into_iter().collect::<Vec<_>>().join(":"),
    );
    t.data("etc/ferrovm/env", 0o644, env);

    // cases
    let mut list = String::new();
    for c in cases {
        list += &format!("{} {}\n", c.name, c.timeout.as_secs().max(1));
        t.data(
            &format!("cases/{}/script.sh", c.name),
            0o755,
            c.script.as_str(),
        );
        for (src, name) in &c.files {
            t.host(&format!("cases/{}/files/{name}", c.name), 0o755, src);
        }
    }
    t.data("cases/list", 0o644, list);

    let io = |e: std::io::Error| format!("writing {}: {e}", out.display());
    let mut w = CpioWriter::create(out).map_err(io)?;
    let mut dirs = BTreeSet::new();
    for d in ["dev", "proc", "sys", "tmp", "run", "work", "root", "images"] {
        dirs.insert(d.to_string());
        w.dir(d).map_err(io)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1).map_err(io)?;
    w.symlink("images/busybox", "/bin/busybox").map_err(io)?;
    t.write(&mut w, &mut dirs).map_err(io)?;
    w.finish().map_err(io)?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// Running L1

enum Event {
    Line(String),
    Eof,
}

/// The running L1 (qemu is killed when this is dropped).
struct L1 {
    child: KillOnDrop,
    rx: mpsc::Receiver<Event>,
    qmp: PathBuf,
    /// Set when L1 goes: ends the keep-awake thread.
    keepalive: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for L1 {
    fn drop(&mut self) {
        self.keepalive
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs one human monitor command through the QMP socket at `sock`; its text output.
fn qmp_hmp(sock: &Path, command: &str) -> Result<String, String> {
    use std::os::unix::net::UnixStream;
    let s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let t = Some(Duration::from_secs(5));
    s.set_read_timeout(t).map_err(|e| e.to_string())?;
    s.set_write_timeout(t).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("greeting: {e}"))?;
    let cmd = serde_json::json!({"execute": "human-monitor-command",
        "arguments": {"command-line": command}});
    writeln!(w, "{{\"execute\":\"qmp_capabilities\"}}\n{cmd}").map_err(|e| e.to_string())?;
    // The capabilities reply, then (skipping events) the command's.
    let mut replies = 0;
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(|e| format!("reply: {e}"))? == 0 {
            return Err("QMP closed".into());
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if v.get("event").is_some() {
            continue;
        }
        replies += 1;
        if replies == 2 {
            return v
                .get("return")
                .and_then(|r| r.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("unexpected reply {line}"));
        }
    }
}

fn spawn_l1(
    cfg: &Config,
    initrd: &Path,
    start: usize,
    log_dir: &Path,
    boot_no: usize,
) -> Result<L1, String> {
    let mut append = format!("console=ttyS0 quiet panic=-1 ferrovm.start={start}");
    if !cfg.l1_append.is_empty() {
        append = format!("{append} {}", cfg.l1_append);
    }
    let mut cmd = Command::new(&cfg.qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-m")
    .arg(cfg.l1_mem_mb.to_string())
    .arg("-kernel")
    .arg(cfg.images.join("bzImage"))
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(&append);
    // For the post-mortem of a frozen L1 (see `L1::diagnose`).
    let qmp = log_dir.join(format!("qmp-{boot_no}.sock"));
    let _ = std::fs::remove_file(&qmp);
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    for d in &cfg.l1_disks {
        cmd.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            d.display()
        ));
    }
    let open_log = |name: &str| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(name))
            .map_err(|e| format!("{}: {e}", log_dir.join(name).display()))
    };
    let mut console = open_log("l1-console.log")?;
    let stderr_log = open_log("qemu-stderr.log")?;
    let _ = writeln!(console, "=== boot {boot_no}: {cmd:?}");
    let _ = writeln!(open_log("qemu-cmdline.txt")?, "{cmd:?}");
    let mut child = KillOnDrop::spawn_tied(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_log),
    )
    .map_err(|e| format!("cannot start {}: {e}", cfg.qemu))?;
    let keepalive = keep_awake(child.id(), qmp.clone(), log_dir.join("l1-keepalive.log"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = console.write_all(&buf);
                    let line = String::from_utf8_lossy(&buf);
                    let line: String = line
                        .chars()
                        .filter(|c| !c.is_control() || *c == '\t')
                        .collect();
                    if tx.send(Event::Line(line)).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Event::Eof);
    });
    Ok(L1 {
        child,
        rx,
        qmp,
        keepalive,
    })
}

/// How often L1 gets a key press (see [`keep_awake`]).
const KEEPALIVE: Duration = Duration::from_secs(10);

/// QEMU 7.2's TCG sometimes loses L1's timer interrupt: L1 then sits in HLT with interrupts
/// enabled and nothing pending (qemu at 0% CPU) until any other interrupt arrives, and every
/// timer in L1 (the case watchdogs too) stops. Seen as a 300 s harness timeout in about one
/// `pci_virtio_rng_msix` run in twenty under load; a QMP `sendkey` woke such an L1, which
/// then reported an RCU stall and finished the case. So L1 gets a shift key press every 10 s
/// (an i8042 interrupt; nothing reads the keyboard). Windows in which qemu used no CPU at all
/// are logged to `l1-keepalive.log`. The thread ends with qemu.
fn keep_awake(
    pid: u32,
    qmp: PathBuf,
    log: PathBuf,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let ticks = || -> Option<u64> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        };
        let mut last = ticks();
        while !flag.load(Ordering::Relaxed) {
            std::thread::sleep(KEEPALIVE);
            let now = ticks();
            if now.is_none() || flag.load(Ordering::Relaxed) {
                break;
            }
            if now == last {
                if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&log) {
                    let _ = writeln!(f, "qemu used no CPU for {}s: L1 woken", KEEPALIVE.as_secs());
                }
            }
            last = now;
            let _ = qmp_hmp(&qmp, "sendkey shift");
        }
    });
    stop
}

impl L1 {
    fn kill(&mut self) {
        self.child.kill();
    }

    /// Before killing an L1 that stopped answering: is qemu spinning (its CPU time over two
    /// seconds) and where is L1's vCPU (`info registers` through QMP, saved to
    /// `l1-freeze-<boot>.txt`)? Tells an L1 frozen in QEMU/TCG or its kernel from a slow case.
    fn diagnose(&mut self, log_dir: &Path, boot_no: usize) -> String {
        let cpu_ticks = |pid: u32| -> Option<u64> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        };
        let pid = self.child.id();
        let t0 = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(2));
        let busy = match (t0, cpu_ticks(pid)) {
            (Some(a), Some(b)) => format!("qemu used {}% of a CPU over 2 s", (b - a) / 2),
            _ => "qemu's CPU time unknown".into(),
        };
        let regs = qmp_hmp(&self.qmp, "info registers").unwrap_or_else(|e| format!("QMP: {e}"));
        let file = log_dir.join(format!("l1-freeze-{boot_no}.txt"));
        let _ = std::fs::write(&file, format!("{busy}\n{regs}\n"));
        let rip = regs
            .split_whitespace()
            .find(|w| w.starts_with("RIP=") || w.starts_with("EIP="))
            .unwrap_or("RIP=?");
        let hlt = regs
            .split_whitespace()
            .find(|w| w.starts_with("HLT="))
            .unwrap_or("");
        format!("{busy}; L1 vCPU {rip} {hlt} ({})", file.display())
    }
    /// Waits for qemu to exit by itself, killing it after `grace`.
    fn finish(&mut self, grace: Duration) -> String {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return format!("{st}"),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    self.kill();
                    return "killed by the harness".into();
                }
            }
        }
    }
}

enum Phase {
    Booting,
    Between,
    InCase {
        idx: usize,
        begin: Instant,
        output: Vec<String>,
    },
}

pub(crate) fn run(
    cfg: &Config,
    cases: &[Case],
    rep: &mut Reporter,
) -> Result<Option<PathBuf>, String> {
    let log_dir = new_log_dir(cfg)?;
    let t0 = Instant::now();
    let initrd = cfg
        .state_dir
        .join(format!("l1-initrd-{}.cpio", std::process::id()));
    let res = build_initrd(cfg, cases, &initrd);
    let size = std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    if let Err(e) = res {
        let _ = std::fs::remove_file(&initrd);
        return Err(e);
    }
    println!(
        "L1 initramfs: {:.0} MiB, built in {:.1}s; logs in {}",
        size as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64(),
        log_dir.display()
    );
    let res = run_boots(cfg, cases, rep, &initrd, &log_dir);
    let _ = std::fs::remove_file(&initrd);
    res.map(|()| Some(log_dir))
}

fn run_boots(
    cfg: &Config,
    cases: &[Case],
    rep: &mut Reporter,
    initrd: &Path,
    log_dir: &Path,
) -> Result<(), String> {
    let n = cases.len();
    let mut next = 0;
    let mut boot_no = 0;
    let logs_hint = format!("logs: {}", log_dir.display());
    let report =
        |rep: &mut Reporter, idx: usize, result: Result<CaseOutput, String>, elapsed: Duration| {
            if let Ok(o) = &result {
                let _ = std::fs::write(log_dir.join(format!("{}.log", cases[idx].name)), &o.output);
            }
            rep.report(&cases[idx], Outcome { result, elapsed });
        };
    while next < n {
        boot_no += 1;
        let spawned = Instant::now();
        let mut l1 = spawn_l1(cfg, initrd, next, log_dir, boot_no)?;
        let mut phase = Phase::Booting;
        let mut deadline = spawned + cfg.boot_timeout;
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut panic_line: Option<String> = None;
        let mut began_any = false;
        let mut all_done = false;
        // Why this boot ended early (None: L1 finished normally).
        let ended: Option<String> = loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = match l1.rx.recv_timeout(wait) {
                Ok(Event::Line(l)) => l,
                Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                    let st = l1.finish(Duration::from_secs(5));
                    break Some(format!("qemu exited ({st})"));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let state = l1.diagnose(log_dir, boot_no);
                    l1.kill();
                    let what = match &phase {
                        Phase::Booting => format!("L1 not ready after {}s", cfg.boot_timeout.as_secs()),
                        Phase::Between => "L1 stopped responding between cases".to_string(),
                        Phase::InCase { idx, .. } => format!(
                            "timeout: no end marker from L1 within {}s (case timeout + {}s); qemu killed",
                            (cases[*idx].timeout + CASE_GRACE).as_secs(),
                            CASE_GRACE.as_secs()
                        ),
                    };
                    let what = format!("{what} [{state}]");
                    break Some(what);
                }
            };
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.clone());
            // A panic printed by a case (a guest's console, shown by the case's ferrovm) is
            // that case's business; only an unprefixed one is L1's.
            let case_line = line.strip_prefix(CASE_LINE);
            if case_line.is_none() && line.contains("Kernel panic") && panic_line.is_none() {
                panic_line = Some(line.clone());
            }
            let line = case_line.unwrap_or(&line);
            // A marker can follow a case's last line when that line has no newline.
            let (text, marker) = match line.find("@@FERROVM-") {
                Some(p) => (&line[..p], Some(&line[p + "@@FERROVM-".len()..])),
                None => (line, None),
            };
            if let Phase::InCase { output, .. } = &mut phase {
                if marker.is_none() || !text.is_empty() {
                    output.push(text.to_string());
                }
            }
            let Some(marker) = marker else { continue };
            let mut words = marker.split_whitespace();
            match words.next().unwrap_or("") {
                "L1-READY" => {
                    let info = words.collect::<Vec<_>>().join(" ");
                    println!(
                        "L1 ready after {:.1}s ({info})",
                        spawned.elapsed().as_secs_f64()
                    );
                    if info.contains("kvm=no") {
                        println!("warning: /dev/kvm missing in L1 (kvm-amd did not load?); see {logs_hint}");
                    }
                    phase = Phase::Between;
                    deadline = Instant::now() + BETWEEN_CASES;
                }
                "CASE-BEGIN" => {
                    let name = words.next().unwrap_or("");
                    let Some(idx) = (next..n).find(|&i| cases[i].name == name) else {
                        l1.kill();
                        break Some(format!(
                            "protocol error: unexpected begin marker for {name:?}"
                        ));
                    };
                    for i in next..idx {
                        report(
                            rep,
                            i,
                            Err("did not run (skipped by L1 init?)".into()),
                            Duration::ZERO,
                        );
                    }
                    began_any = true;
                    next = idx;
                    deadline = Instant::now() + cases[idx].timeout + CASE_GRACE;
                    phase = Phase::InCase {
                        idx,
                        begin: Instant::now(),
                        output: Vec::new(),
                    };
                }
                "CASE-END" => {
                    let name = words.next().unwrap_or("");
                    let status = words
                        .next()
                        .and_then(|s| s.strip_prefix("status="))
                        .unwrap_or("");
                    let Phase::InCase { idx, begin, output } =
                        std::mem::replace(&mut phase, Phase::Between)
                    else {
                        continue;
                    };
                    if cases[idx].name != name {
                        l1.kill();
                        break Some(format!(
                            "protocol error: end marker for {name:?} inside {}",
                            cases[idx].name
                        ));
                    }
                    let status = match status {
                        "timeout" => None,
                        s => match s.parse() {
                            Ok(v) => Some(v),
                            Err(_) => {
                                l1.kill();
                                break Some(format!("protocol error: bad status {s:?} for {name}"));
                            }
                        },
                    };
                    let mut text = output.join("\n");
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    report(
                        rep,
                        idx,
                        Ok(CaseOutput {
                            status,
                            output: text,
                            mode: Mode::Nested,
                        }),
                        begin.elapsed(),
                    );
                    next = idx + 1;
                    deadline = Instant::now() + BETWEEN_CASES;
                }
                "ALL-DONE" => {
                    all_done = true;
                    l1.finish(Duration::from_secs(15));
                    break None;
                }
                _ => {} // L1-BOOTED, L1-WARN: informational (in the console log)
            }
        };
        let Some(why) = ended else {
            if all_done && next < n {
                for i in next..n {
                    report(
                        rep,
                        i,
                        Err("did not run (L1 finished without running it)".into()),
                        Duration::ZERO,
                    );
                }
                next = n;
            }
            continue;
        };
        let mut reason = why;
        if let Some(p) = &panic_line {
            reason = format!("L1 kernel panic: {p} ({reason})");
        }
        let stderr = std::fs::read_to_string(log_dir.join("qemu-stderr.log")).unwrap_or_default();
        let mut detail = format!("{reason}\n{logs_hint}");
        let last: Vec<&String> = match &phase {
            Phase::InCase { output, .. } => {
                detail += "\nlast lines of the case's output:";
                output.iter().rev().take(TAIL_LINES).collect()
            }
            _ => {
                detail += "\nlast L1 console lines:";
                tail.iter().rev().collect()
            }
        };
        for l in last.into_iter().rev() {
            detail += &format!("\n  {l}");
        }
        if !stderr.trim().is_empty() {
            detail += "\nqemu stderr:";
            for l in stderr
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                detail += &format!("\n  {l}");
            }
        }
        match phase {
            Phase::InCase { idx, begin, output } => {
                let _ = std::fs::write(
                    log_dir.join(format!("{}.log", cases[idx].name)),
                    output.join("\n"),
                );
                report(rep, idx, Err(detail), begin.elapsed());
                next = idx + 1;
                if next < n {
                    println!("note: restarting L1 for the remaining {} case(s)", n - next);
                }
            }
            Phase::Booting | Phase::Between => {
                let msg = if began_any {
                    detail
                } else {
                    format!("L1 failed before running the case: {detail}")
                };
                for i in next..n {
                    report(rep, i, Err(msg.clone()), Duration::ZERO);
                }
                next = n;
            }
        }
    }
    Ok(())
}
