//! Boot benchmark: ferrovm against QEMU (`-M microvm` and `-M q35`) and, when given, the
//! Firecracker and Cloud Hypervisor binaries; same kernel, same initramfs, same command line,
//! to the same init marker (`FERROVM-BOOT-OK`).
//!
//! `cargo bench --bench boot` (as root, after `scripts/setup-host`). Runs through the nested
//! harness (one L1 boot for everything) unless the CPU has svm/vmx. Per VMM and repetition:
//! (a) wall time from VMM start to the marker, (b) KVM exits until the marker from L1's KVM
//! debugfs (one VM runs at a time), split into userspace port I/O (`io_exits`), userspace
//! MMIO (`mmio_exits`) and exits KVM handled in the kernel (the rest), with the in-kernel
//! counters that explain them, (c) VMM memory that is not guest RAM (Rss of every mapping in
//! /proc/PID/smaps smaller than guest RAM, at the marker). Then, on the host directly with a
//! firmware guest: process start to first KVM_RUN and peak resident memory of `ferrovm run`.
//!
//! Peers by path (built by hand from their public repositories, never committed):
//! `FERROVM_BENCH_FIRECRACKER=/path/firecracker`, `FERROVM_BENCH_CLOUD_HYPERVISOR=/path/...`.
//! `FERROVM_BENCH_BASELINE=/path/ferrovm` adds the PVH and bzImage boots with another ferrovm
//! build (an older commit) as `baseline-pvh` / `baseline-bzimage`, to measure a change side
//! by side. `FERROVM_BENCH_REPS=N` sets the repetitions (default 3).

mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use common::{median, per_round, Results};

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MEM_MIB: u64 = 256;
/// L1's KVM debugfs counters sampled around each boot (the first three split the exits).
const COUNTERS: [&str; 10] = [
    "exits",
    "io_exits",
    "mmio_exits",
    "pf_fixed",
    "pf_taken",
    "irq_window_exits",
    "halt_exits",
    "irq_exits",
    "insn_emulation",
    "hypercalls",
];

fn reps() -> usize {
    std::env::var("FERROVM_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3)
}

/// The runs: (name, L1 command). The same kernel command line for all.
fn runs(peers: &Peers) -> Vec<(&'static str, String)> {
    let fr = |bin: &str, mem: &str, kernel: &str| {
        format!(
            "{bin} run --initramfs initrd.img --memory ${{MEM}}M{mem} \
             --cmdline \"$CMDLINE\" --kernel \"$IMAGES/{kernel}\""
        )
    };
    let q = "$QEMU -L /qemu/share -accel kvm -cpu host -m ${MEM}M -smp 1 -nodefaults \
             -no-user-config -display none -serial stdio -initrd initrd.img -append \"$CMDLINE\"";
    let mut v = vec![
        ("ferrovm-pvh", fr("\"$FERROVM\"", "", "vmlinux")),
        ("ferrovm-bzimage", fr("\"$FERROVM\"", "", "bzImage")),
        (
            "ferrovm-pvh-thp-off",
            fr("\"$FERROVM\"", ",thp=off", "vmlinux"),
        ),
        (
            "qemu-microvm",
            format!("{q} -M microvm -kernel \"$IMAGES/bzImage\""),
        ),
        (
            "qemu-q35",
            format!("{q} -M q35 -kernel \"$IMAGES/bzImage\""),
        ),
    ];
    if peers.baseline.is_some() {
        let base = "/peers/ferrovm-baseline";
        v.push(("baseline-pvh", fr(base, "", "vmlinux")));
        v.push(("baseline-bzimage", fr(base, "", "bzImage")));
    }
    if peers.firecracker.is_some() {
        v.push((
            "firecracker-pvh",
            "/peers/firecracker --no-api --config-file fc.json".into(),
        ));
    }
    if peers.cloud_hypervisor.is_some() {
        v.push((
            "cloud-hypervisor-pvh",
            "/peers/cloud-hypervisor --kernel \"$IMAGES/vmlinux\" --initramfs initrd.img \
             --cmdline \"$CMDLINE\" --memory size=${MEM}M --cpus boot=1 --serial tty \
             --console off"
                .into(),
        ));
    }
    v
}

/// The L1 script: boots each VMM `reps` times, alternating, one BENCH line per boot.
fn script(runs: &[(&'static str, String)], reps: usize) -> String {
    let counters = COUNTERS.join(" ");
    let mut measures = String::new();
    for (name, cmd) in runs {
        measures += &format!("    measure {name} {cmd}\n");
    }
    format!(
        r#"set -e
printf 'sleep 2\n' > t.sh
mkinitrd_with_test t.sh initrd.img
QEMU=/usr/bin/qemu-system-x86_64
MEM={MEM_MIB}
CMDLINE="console=ttyS0 panic=-1 ferrovm.test=/test.sh"
cat > fc.json <<EOF
{{"boot-source": {{"kernel_image_path": "$IMAGES/vmlinux", "initrd_path": "initrd.img",
  "boot_args": "$CMDLINE"}},
 "machine-config": {{"vcpu_count": 1, "mem_size_mib": $MEM}}, "drives": []}}
EOF
mem_kb=$(($MEM * 1024))
K=/sys/kernel/debug/kvm
echo "L1 THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
uptime_ms() {{ awk '{{ printf "%d", $1 * 1000 }}' /proc/uptime; }}
# One process reads every counter (a loop of cats costs seconds in L1's emulated userspace).
sample() {{ (cd $K && awk '{{ printf "%s ", $1 }}' {counters}); }}
measure() {{
    name=$1; shift
    rm -f out.log
    s0=$(sample)
    t0=$(uptime_ms)
    : > out.log
    "$@" </dev/null >out.log 2>&1 &
    pid=$!
    while ! grep -q FERROVM-BOOT-OK out.log; do
        kill -0 $pid 2>/dev/null || {{ echo "BENCH-FAIL $name"; tail -20 out.log; return 1; }}
        sleep 0.01
    done
    t1=$(uptime_ms)
    s1=$(sample)
    rss=$(awk -v ram=$mem_kb '/^Size:/ {{ size = $2 }} /^Rss:/ {{ if (size < ram) t += $2 }} END {{ print t + 0 }}' /proc/$pid/smaps 2>/dev/null || echo nan)
    p2m=$(cat $K/pages_2m 2>/dev/null || echo 0)
    console_bytes=$(wc -c < out.log)
    kill $pid 2>/dev/null || true
    wait $pid || true
    deltas=$(echo "$s0 / $s1" | awk -v names="{counters}" '{{ n = split(names, k, " "); for (i = 1; i <= n; i++) printf "%s=%d ", k[i], $(i + n + 1) - $i }}')
    echo "BENCH $name boot round=$i ms=$((t1 - t0)) $deltas pages_2m=$p2m console_bytes=$console_bytes overhead_kb=$rss"
}}
i=0
while [ $i -lt {reps} ]; do
{measures}    i=$((i + 1))
done
# Start-up to the first KVM_RUN inside L1 (real KVM), with a firmware guest.
for j in 1 2 3 4 5; do
    "$FERROVM" run -v --kernel "$FILES/hello.elf" </dev/null 2>&1 | grep -o 'first KVM_RUN [0-9]* us' || true
done
"#
    )
}

/// Peer VMM binaries given by path.
#[derive(Default)]
struct Peers {
    baseline: Option<PathBuf>,
    firecracker: Option<PathBuf>,
    cloud_hypervisor: Option<PathBuf>,
}

impl Peers {
    fn from_env() -> Peers {
        let get = |k: &str| {
            let p = PathBuf::from(std::env::var_os(k)?);
            if !p.is_file() {
                eprintln!("boot bench: {k}={} is not a file: left out", p.display());
                return None;
            }
            Some(p)
        };
        Peers {
            baseline: get("FERROVM_BENCH_BASELINE"),
            firecracker: get("FERROVM_BENCH_FIRECRACKER"),
            cloud_hypervisor: get("FERROVM_BENCH_CLOUD_HYPERVISOR"),
        }
    }
}

/// The median over the rounds of `key` for run `name`.
fn med(r: &Results, name: &str, key: &str) -> f64 {
    median(&per_round(r, name, "boot", &|m| m.get(key).copied()))
}

/// The median of a derived figure: exits KVM handled in the kernel.
fn med_kernel(r: &Results, name: &str) -> f64 {
    median(&per_round(r, name, "boot", &|m| {
        Some(m.get("exits")? - m.get("io_exits")? - m.get("mmio_exits")?)
    }))
}

fn print_tables(r: &Results, runs: &[(&'static str, String)]) {
    let base_ms = med(r, "qemu-microvm", "ms");
    let base_exits = med(r, "qemu-microvm", "exits");
    println!("| VMM | wall ms | KVM exits | userspace I/O | userspace MMIO | in-kernel | VMM memory besides guest RAM (KiB) | wall vs microvm | exits vs microvm |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, _) in runs {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            med(r, name, "ms"),
            med(r, name, "exits"),
            med(r, name, "io_exits"),
            med(r, name, "mmio_exits"),
            med_kernel(r, name),
            med(r, name, "overhead_kb"),
            med(r, name, "ms") / base_ms,
            med(r, name, "exits") / base_exits,
        );
    }
    println!("\nIn-kernel counters (medians; pages_2m: KVM's 2 MiB mappings at the marker; console bytes: what the VMM printed up to the marker, which sets the serial I/O exits):\n");
    let keys = &COUNTERS[3..];
    println!("| VMM | {} | pages_2m | console bytes |", keys.join(" | "));
    println!("|---|{}---|---|", "---|".repeat(keys.len()));
    for (name, _) in runs {
        let cells: Vec<String> = keys
            .iter()
            .chain(["pages_2m", "console_bytes"].iter())
            .map(|k| format!("{:.0}", med(r, name, k)))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    println!("\nPer round (exits):");
    for (name, _) in runs {
        let v = per_round(r, name, "boot", &|m| m.get("exits").copied());
        println!("  {name}: {}", common::list(&v));
    }
}

/// Host-direct start-up: first KVM_RUN (from `-v`) and peak RSS of `ferrovm run` (firmware guest).
fn host_startup(fw: &std::path::Path) -> (f64, f64) {
    let ferrovm = env!("CARGO_BIN_EXE_ferrovm");
    let mut first = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..20 {
        let out = Command::new(ferrovm)
            .args(["run", "-v", "--kernel"])
            .arg(fw)
            .stdin(Stdio::null())
            .output()
            .expect("run ferrovm");
        let err = String::from_utf8_lossy(&out.stderr);
        if let Some(us) = err
            .split("first KVM_RUN ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse::<f64>().ok())
        {
            first.push(us / 1000.0);
        }
        // SAFETY: getrusage fills the zeroed struct for reaped children (max RSS so far).
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a rusage struct.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
        rss.push(ru.ru_maxrss as f64 / 1024.0);
    }
    (median(&first), rss.iter().cloned().fold(0.0, f64::max))
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        println!("boot: bench");
        return ExitCode::SUCCESS;
    }
    let dir = std::env::temp_dir().join(format!("ferrovm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let fw = dir.join("hello.elf");
    std::fs::write(
        &fw,
        ferrovm::firmware::get("hello").expect("hello firmware"),
    )
    .expect("write");

    // Host start-up first: RUSAGE_CHILDREN must not yet include the L1 QEMU.
    let (host_first, host_rss) = host_startup(&fw);
    let peers = Peers::from_env();
    let runs = runs(&peers);
    let reps = reps();
    let results: Arc<Mutex<String>> = Arc::default();
    let sink = results.clone();
    let case = harness::Case::new("bench_boot_vs_peers", &script(&runs, reps))
        .timeout(Duration::from_secs(300 + 120 * (runs.len() * reps) as u64))
        .file(&fw, "hello.elf")
        .check(move |o| {
            *sink.lock().unwrap() = o.output.clone();
            harness::expect_status(o, 0)
        });
    let mut cfg = harness::Config::from_env();
    cfg.l1_extra.extend(harness::qemu_firmware(&[
        "bios-256k.bin",
        "bios-microvm.bin",
        "linuxboot_dma.bin",
        "kvmvapic.bin",
        "pvh.bin",
    ]));
    cfg.l1_programs.push("/usr/bin/qemu-system-x86_64".into());
    for (p, name) in [
        (&peers.baseline, "ferrovm-baseline"),
        (&peers.firecracker, "firecracker"),
        (&peers.cloud_hypervisor, "cloud-hypervisor"),
    ] {
        if let Some(p) = p {
            cfg.l1_extra.push((p.clone(), format!("/peers/{name}")));
        }
    }
    let started = Instant::now();
    let status = harness::run_with(vec![case], cfg);
    let output = results.lock().unwrap().clone();
    let r = common::parse(&output);
    for line in output
        .lines()
        .filter(|l| l.contains("L1 THP") || l.contains("BENCH-FAIL"))
    {
        println!("{}", line.trim());
    }

    println!("\nBoot to FERROVM-BOOT-OK, stock {} kernel, {MEM_MIB} MiB, 1 vCPU, median of {reps} (run took {:.0} s):\n",
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest-images/out/default/kernel-version")).unwrap_or_default().trim(),
        started.elapsed().as_secs_f64());
    print_tables(&r, &runs);
    let l1_first: Vec<f64> = output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("first KVM_RUN "))
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect();
    println!("\nStart-up with a firmware guest (ferrovm run, 512 MiB):\n");
    println!("| where | process start to first KVM_RUN (ms, median) | peak RSS (MiB) |");
    println!("|---|---|---|");
    println!("| L1 (real KVM, nested) | {:.1} | |", median(&l1_first));
    println!("| this host's /dev/kvm | {host_first:.1} | {host_rss:.1} |");
    let _ = std::fs::remove_dir_all(&dir);
    status
}
