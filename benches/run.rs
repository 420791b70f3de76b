//! One command in a throwaway VM (issue 12): `ferrovm run -- true` end to end against QEMU
//! booting the *same* kernel and the *same* initramfs (ferrovm's guest init, saved with
//! `--save-initramfs`), with the same two virtiofsd shares (host / read-only, the working
//! directory read-write) and vhost-vsock for the streams, socat listening on the host ports.
//!
//! `cargo bench --bench run` (as root, after `scripts/setup-host`), through the nested harness
//! (one L1 boot). Wall time from before the VMM (and, for QEMU, its virtiofsd and socat
//! listeners) starts until the VMM has exited, from L1's /proc/uptime; alternating
//! ferrovm/QEMU, FERROVM_BENCH_ROUNDS (default 10) of each; medians. Then one run of each
//! with `cat /proc/uptime` as the command: the guest's uptime when the command runs (kernel +
//! init: modules, mounts) against the total, the rest being the VMM's start and exit.
//! virtme-ng and vmtest are not installable in L1 (no Python, no network), so QEMU q35 stands
//! in for the QEMU they drive.

mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fmt, list, median, parse, per_round};

const SCRIPT: &str = r#"set -e
QEMU=/usr/bin/qemu-system-x86_64
VIRTIOFSD=/usr/local/bin/virtiofsd
BASE="console=ttyS0 quiet panic=-1 reboot=k"
echo l1 > /etc/hostname
[ -c /dev/vhost-vsock ] || echo "NO-VHOST-VSOCK"
"$FERROVM" run --kernel "$IMAGES/bzImage" --save-initramfs true.cpio -- true && echo "FERROVM-OK"
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
# init_times CONSOLE: the guest init's start and power-off times (its ferrovm.trace lines)
init_times() {
    awk '/ferrovm-init: .* start/ { s = $2 } /ferrovm-init: .* power off/ { e = $2 }
         END { printf "init_start_s=%s init_s=%.3f", s == "" ? -1 : s, (s == "" || e == "") ? -1 : e - s }' "$1"
}
# run_ferrovm KERNEL ROUND [trace]
run_ferrovm() {
    k=$1 round=$2
    extra=""
    [ "${3:-}" = trace ] && extra="--serial file=fcons.log"
    t0=$(now)
    set +e
    RUST_LOG=ferrovm::kvm::vcpu=debug,ferrovm::oneshot=debug "$FERROVM" run --kernel "$IMAGES/$k" \
        $extra --cmdline "$BASE ferrovm.trace" -- true >out.txt 2>err.txt
    st=$?
    set -e
    line="BENCH ferrovm $k${3:+-$3} round=$round total_s=$(since $t0) status=$st"
    first=$(sed -n 's/.*first KVM_RUN \([0-9]*\) us after start.*/\1/p' err.txt)
    ended=$(sed -n 's/.*the VM ended \([0-9]*\) ms after start.*/\1/p' err.txt)
    [ -n "$first" ] && line="$line vmm_start_s=$(awk -v u=$first 'BEGIN { printf "%.3f", u / 1e6 }')"
    [ -n "$ended" ] && [ -n "$first" ] && line="$line vm_s=$(awk -v e=$ended -v u=$first 'BEGIN { printf "%.3f", e / 1e3 - u / 1e6 }')"
    [ -n "$extra" ] && line="$line $(init_times fcons.log)"
    echo "$line"
    [ $st = 0 ] || { echo "ferrovm round $round: FAILED $st"; cat err.txt; }
}
wait_sock() { n=0; while [ ! -S "$1" ] && [ $n -lt 300 ]; do sleep 0.01; n=$((n + 1)); done; }
# run_qemu KERNEL ROUND [trace]
run_qemu() {
    k=$1 round=$2
    serial=none
    [ "${3:-}" = trace ] && serial=file:qcons.log
    rm -f root.sock cwd.sock q.out q.status
    t0=$(now)
    $VIRTIOFSD --socket-path=root.sock --shared-dir / --readonly --no-announce-submounts \
        --log-level=error --thread-pool-size=0 --cache=auto 2>>vfs.log &
    $VIRTIOFSD --socket-path=cwd.sock --shared-dir "$PWD" \
        --log-level=error --thread-pool-size=0 --cache=auto 2>>vfs.log &
    socat -t 0.01 -u VSOCK-LISTEN:1 CREATE:q.out & s1=$!
    socat -t 0.01 -u VSOCK-LISTEN:2 CREATE:q.err & s2=$!
    socat -t 0.01 -u VSOCK-LISTEN:3 CREATE:q.status & s3=$!
    socat -t 0.01 -u OPEN:/dev/null VSOCK-LISTEN:4 & s4=$!
    wait_sock root.sock; wait_sock cwd.sock
    set +e
    $QEMU -L /qemu/share -M q35 -accel kvm -cpu host -m 512M -smp 1 \
        -nodefaults -no-user-config -display none -serial $serial -no-reboot \
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -kernel "$IMAGES/$k" -initrd true.cpio -append "$BASE rdinit=/init ferrovm.trace" \
        -chardev socket,id=r,path=root.sock -device vhost-user-fs-pci,chardev=r,tag=ferrovm-root \
        -chardev socket,id=c,path=cwd.sock -device vhost-user-fs-pci,chardev=c,tag=ferrovm-cwd \
        -device vhost-vsock-pci,guest-cid=3 2>qerr.txt
    st=$?
    set -e
    grep -q 'exit 0' q.status 2>/dev/null || st=99
    line="BENCH qemu $k${3:+-$3} round=$round total_s=$(since $t0) status=$st"
    [ $serial = none ] || line="$line $(init_times qcons.log)"
    echo "$line"
    [ $st = 0 ] || { echo "qemu $k round $round: FAILED"; cat qerr.txt; }
    kill $s1 $s2 $s3 $s4 2>/dev/null || true
    wait 2>/dev/null || true
}
for k in bzImage vmlinux; do
    i=1
    while [ $i -le $ROUNDS ]; do
        if [ $((i % 2)) = 1 ]; then run_ferrovm $k $i; run_qemu $k $i
        else run_qemu $k $i; run_ferrovm $k $i; fi
        i=$((i + 1))
    done
    run_ferrovm $k 1 trace
    run_qemu $k 1 trace
done
"#;

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        println!("run: bench");
        return ExitCode::SUCCESS;
    }
    let rounds: u32 = std::env::var("FERROVM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let results: Arc<Mutex<String>> = Arc::default();
    let sink = results.clone();
    let script = format!("ROUNDS={rounds}\n{SCRIPT}");
    let case = harness::Case::new("bench_run_vs_qemu", &script)
        .timeout(Duration::from_secs(1800))
        .check(move |o| {
            *sink.lock().unwrap() = o.output.clone();
            harness::expect_status(o, 0)?;
            harness::expect_output(o, "FERROVM-OK")
        });
    let mut cfg = harness::Config::from_env();
    cfg.l1_extra.extend(harness::qemu_firmware(&[
        "bios-256k.bin",
        "linuxboot_dma.bin",
        "pvh.bin",
        "kvmvapic.bin",
    ]));
    cfg.l1_extra
        .extend(harness::command_run_modules(&cfg.images));
    cfg.l1_programs.extend(
        [
            "/usr/bin/qemu-system-x86_64",
            "/usr/local/bin/virtiofsd",
            "/usr/bin/socat",
        ]
        .iter()
        .map(PathBuf::from),
    );
    cfg.l1_modules.push("vhost_vsock".into());
    let started = Instant::now();
    let status = harness::run_with(vec![case], cfg);
    let output = results.lock().unwrap().clone();
    for l in output
        .lines()
        .filter(|l| l.contains("FAILED") || l.contains("NO-"))
    {
        println!("{}", l.trim());
    }
    report(&output, rounds, started.elapsed());
    status
}

fn report(output: &str, rounds: u32, took: Duration) {
    let r = parse(output);
    let get =
        |k: &'static str| move |m: &std::collections::BTreeMap<String, f64>| m.get(k).copied();
    let ok_total = |m: &std::collections::BTreeMap<String, f64>| {
        (m.get("status") == Some(&0.0))
            .then(|| m.get("total_s").copied())
            .flatten()
    };
    println!(
        "\n`run -- true` end to end: ferrovm vs QEMU q35 (same kernel, initramfs, virtiofsd; \
         QEMU with vhost-vsock), {rounds} rounds alternating per kernel (run took {:.0} s):\n",
        took.as_secs_f64()
    );
    println!("| kernel | ferrovm median, s | QEMU median, s | ferrovm / QEMU | ferrovm rounds | QEMU rounds |");
    println!("|---|---:|---:|---:|---|---|");
    for k in ["bzImage", "vmlinux"] {
        let (f, q) = (
            per_round(&r, "ferrovm", k, &ok_total),
            per_round(&r, "qemu", k, &ok_total),
        );
        println!(
            "| {k} | {} | {} | {} | {} | {} |",
            fmt(median(&f)),
            fmt(median(&q)),
            fmt(median(&f) / median(&q)),
            list(&f),
            list(&q)
        );
    }
    println!("\nWhere the time goes (one traced run each; guest times from its boot clock):\n");
    println!("| kernel, VMM | total, s | VMM start to first KVM_RUN, s | guest clock at init start, s | init (modules, mounts, command, teardown), s |");
    println!("|---|---:|---:|---:|---:|");
    for k in ["bzImage", "vmlinux"] {
        for vmm in ["ferrovm", "qemu"] {
            let one = |key: &'static str| {
                per_round(&r, vmm, &format!("{k}-trace"), &get(key))
                    .first()
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            println!(
                "| {k}, {vmm} | {} | {} | {} | {} |",
                fmt(one("total_s")),
                fmt(one("vmm_start_s")),
                fmt(one("init_start_s")),
                fmt(one("init_s"))
            );
        }
    }
}
