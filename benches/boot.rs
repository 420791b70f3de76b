//! Boot benchmark: ferrovm against QEMU (`-M microvm` and `-M q35`), same kernel, same
//! initramfs, same command line, to the same init marker (`FERROVM-BOOT-OK`).
//!
//! `cargo bench --bench boot` (as root, after `scripts/setup-host`). Runs through the nested
//! harness (one L1 boot for everything) unless the CPU has svm/vmx. Per VMM and repetition:
//! (a) wall time from VMM start to the marker, (b) KVM exits until the marker (KVM debugfs,
//! global `exits` counter; one VM runs at a time), (c) VMM memory that is not guest RAM
//! (Rss of every mapping in /proc/PID/smaps smaller than guest RAM, at the marker).
//! Then, on the host directly with a firmware guest: process start to first KVM_RUN and
//! peak resident memory of `ferrovm run`.

mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use common::median;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REPS: usize = 3;
const MEM_MIB: u64 = 256;

/// The L1 script: boots each VMM REPS times, alternating, and prints one BENCH line per boot.
fn script() -> String {
    format!(
        r#"set -e
printf 'sleep 2\n' > t.sh
mkinitrd_with_test t.sh initrd.img
QEMU=/usr/bin/qemu-system-x86_64
CMDLINE="console=ttyS0 panic=-1 ferrovm.test=/test.sh"
mem_kb=$(({MEM_MIB} * 1024))
uptime_ms() {{ awk '{{ printf "%d", $1 * 1000 }}' /proc/uptime; }}
measure() {{
    name=$1; shift
    rm -f out.log
    e0=$(cat /sys/kernel/debug/kvm/exits)
    t0=$(uptime_ms)
    "$@" </dev/null >out.log 2>&1 &
    pid=$!
    while ! grep -q FERROVM-BOOT-OK out.log; do
        kill -0 $pid 2>/dev/null || {{ echo "BENCH-FAIL $name"; cat out.log; return 1; }}
        sleep 0.01
    done
    t1=$(uptime_ms)
    e1=$(cat /sys/kernel/debug/kvm/exits)
    rss=$(awk -v ram=$mem_kb '/^Size:/ {{ size = $2 }} /^Rss:/ {{ if (size < ram) t += $2 }} END {{ print t + 0 }}' /proc/$pid/smaps)
    wait $pid || true
    echo "BENCH $name ms=$((t1 - t0)) exits=$((e1 - e0)) overhead_kb=$rss"
}}
i=0
while [ $i -lt {REPS} ]; do
    measure ferrovm "$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img \
        --memory {MEM_MIB}M --cmdline "$CMDLINE"
    measure qemu-microvm $QEMU -L /qemu/share -M microvm -accel kvm -cpu host -m {MEM_MIB}M -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio \
        -kernel "$IMAGES/bzImage" -initrd initrd.img -append "$CMDLINE"
    measure qemu-q35 $QEMU -L /qemu/share -M q35 -accel kvm -cpu host -m {MEM_MIB}M -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio \
        -kernel "$IMAGES/bzImage" -initrd initrd.img -append "$CMDLINE"
    i=$((i + 1))
done
# Start-up to the first KVM_RUN inside L1 (real KVM), with a firmware guest.
for j in 1 2 3 4 5; do
    "$FERROVM" run -v --kernel "$FILES/hello.elf" </dev/null 2>&1 | grep -o 'first KVM_RUN [0-9]* us' || true
done
"#
    )
}

#[derive(Default, Clone)]
struct Sample {
    ms: Vec<f64>,
    exits: Vec<f64>,
    overhead_kb: Vec<f64>,
}

fn parse(output: &str) -> BTreeMap<String, Sample> {
    let mut m: BTreeMap<String, Sample> = BTreeMap::new();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("BENCH ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let Some(name) = it.next() else { continue };
        let s = m.entry(name.to_string()).or_default();
        for kv in it {
            if let Some((k, v)) = kv.split_once('=') {
                let Ok(v) = v.parse::<f64>() else { continue };
                match k {
                    "ms" => s.ms.push(v),
                    "exits" => s.exits.push(v),
                    "overhead_kb" => s.overhead_kb.push(v),
                    _ => {}
                }
            }
        }
    }
    m
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
    let results: Arc<Mutex<String>> = Arc::default();
    let sink = results.clone();
    let case = harness::Case::new("bench_boot_vs_qemu", &script())
        .timeout(Duration::from_secs(900))
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
    let started = Instant::now();
    let status = harness::run_with(vec![case], cfg);
    let output = results.lock().unwrap().clone();
    let samples = parse(&output);

    println!("\nBoot to FERROVM-BOOT-OK, stock {} kernel, {MEM_MIB} MiB, 1 vCPU, median of {REPS} (run took {:.0} s):\n",
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest-images/out/default/kernel-version")).unwrap_or_default().trim(),
        started.elapsed().as_secs_f64());
    println!("| VMM | wall ms | KVM exits | VMM memory besides guest RAM (KiB) | wall vs microvm | exits vs microvm |");
    println!("|---|---|---|---|---|---|");
    let base = samples.get("qemu-microvm").cloned().unwrap_or_default();
    for name in ["ferrovm", "qemu-microvm", "qemu-q35"] {
        let s = samples.get(name).cloned().unwrap_or_default();
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            median(&s.ms),
            median(&s.exits),
            median(&s.overhead_kb),
            median(&s.ms) / median(&base.ms),
            median(&s.exits) / median(&base.exits)
        );
    }
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
