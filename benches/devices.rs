//! Device benchmark (issues 4 and 5): virtio-blk and virtio-net of ferrovm against QEMU q35
//! (Debian's qemu-system-x86, `-accel kvm`), same stock kernel, same initramfs, same root image.
//!
//! `cargo bench --bench devices` (as root, after `scripts/setup-host`). Runs through the nested
//! harness (one L1 boot for everything) unless the CPU has svm/vmx. Each VMM boots the stock
//! kernel with `root=/dev/vda` (a copy of rootfs.ext4), a 512 MiB data disk (/dev/vdb) and one
//! TAP NIC in a network namespace; inside the guest:
//! - fio on /dev/vdb (`--direct=1 --ioengine=libaio`): 4 KiB randread and randwrite at iodepth
//!   32, 1 MiB sequential read and write at iodepth 4, 8 s each (time_based);
//! - iperf3 TCP guest->host and host->guest (`-R`) against an iperf3 server in the namespace;
//! - 20 pings guest->host at 0.2 s.
//!
//! VMMs alternate (ABBA, 2 rounds). FERROVM_BENCH_SECS / FERROVM_BENCH_ROUNDS override both. Around every phase the L1 side samples KVM's
//! debugfs counters (all exits, userspace MMIO/PIO exits, injected interrupts) when the guest's
//! `PHASE ... begin|end` line arrives on the console, so exits per I/O are reported too.
//!
//! `FERROVM_BENCH_DISK=qcow2 cargo bench --bench devices` compares disk formats instead (issue
//! 11): fio only, the data disk as raw through ferrovm, and as a fully allocated qcow2 through
//! ferrovm and through QEMU.

mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use common::{fmt, list, mean, parse, per_round, Results};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Rounds (ABBA order); FERROVM_BENCH_ROUNDS overrides.
fn rounds() -> usize {
    env_num("FERROVM_BENCH_ROUNDS").unwrap_or(2)
}
/// Seconds per fio job and per iperf3 direction; FERROVM_BENCH_SECS overrides.
fn secs() -> u32 {
    env_num("FERROVM_BENCH_SECS").unwrap_or(8)
}
fn env_num<T: std::str::FromStr>(k: &str) -> Option<T> {
    std::env::var(k).ok()?.parse().ok()
}
/// FERROVM_BENCH_DISK=qcow2: the disk-format comparison (issue 11) instead: fio only, on a
/// fully allocated data disk, through ferrovm raw, ferrovm qcow2 and QEMU qcow2.
fn qcow2_mode() -> bool {
    std::env::var("FERROVM_BENCH_DISK").is_ok_and(|v| v == "qcow2")
}
/// The VMM runs, in ABBA order; the first is the baseline of the ratios.
fn vmms() -> Vec<&'static str> {
    if qcow2_mode() {
        vec!["ferrovm", "ferrovm_qcow2", "qemu_qcow2"]
    } else {
        vec!["ferrovm", "qemu"]
    }
}

/// The guest's /test.sh: prints `PHASE <name> begin|end` around each measurement and one
/// `BENCH <name> key=value...` line per result.
fn guest_script() -> String {
    let secs = secs();
    let fio_only = u8::from(qcow2_mode());
    format!(
        r#"T={secs}
FIO_ONLY={fio_only}
ip link set eth0 up
ip addr add 172.30.0.2/24 dev eth0
ping -c 2 -W 5 172.30.0.1 >/dev/null 2>&1 || echo "GUEST-NET-DOWN"
echo "GUEST_VDB_SECTORS=$(cat /sys/block/vdb/size)"
fio_run() {{
    echo "PHASE $1 begin"
    fio --name=$1 --filename=/dev/vdb --direct=1 --ioengine=libaio --rw=$2 --bs=$3 \
        --iodepth=$4 --runtime=$T --time_based --output-format=terse --terse-version=3 \
        >/tmp/fio.txt 2>&1
    echo "PHASE $1 end"
    awk -F';' -v n=$1 'NF > 50 {{ printf "BENCH %s rd_kib_s=%s rd_iops=%s rd_kib=%s wr_kib_s=%s wr_iops=%s wr_kib=%s\n", n, $7, $8, $6, $48, $49, $47 }}' /tmp/fio.txt
    grep -q ';' /tmp/fio.txt || {{ echo "FIO-FAILED $1"; cat /tmp/fio.txt; }}
}}
iperf_run() {{
    n=$1; shift
    echo "PHASE $n begin"
    iperf3 -c 172.30.0.1 -t $T -f m "$@" >/tmp/ip.txt 2>&1
    echo "PHASE $n end"
    awk -v n=$n '/receiver/ {{ for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") v = $(i - 1) }} END {{ if (v != "") print "BENCH " n " mbit_s=" v; else print "IPERF-FAILED " n }}' /tmp/ip.txt
    grep -q receiver /tmp/ip.txt || cat /tmp/ip.txt
}}
fio_run randread-4k randread 4k 32
fio_run randwrite-4k randwrite 4k 32
fio_run read-1m read 1M 4
fio_run write-1m write 1M 4
[ "$FIO_ONLY" = 1 ] && exit 0
iperf_run tcp-g2h
iperf_run tcp-h2g -R
echo "PHASE ping begin"
ping -c 20 -i 0.2 172.30.0.1 >/tmp/p.txt 2>&1
echo "PHASE ping end"
# mdev as iputils computes it, sqrt(mean(x^2) - mean(x)^2); busybox awk has no sqrt().
awk -F'time=' 'function root(x, r, i) {{ if (x <= 0) return 0; r = x + 1; for (i = 0; i < 60; i++) r = (r + x / r) / 2; return r }}
/time=/ {{ split($2, a, " "); x = a[1]; n++; s += x; q += x * x }}
END {{ if (n) {{ m = s / n; printf "BENCH ping avg_ms=%.3f mdev_ms=%.3f n=%d\n", m, root(q / n - m * m), n }} else print "PING-FAILED" }}' /tmp/p.txt
"#
    )
}

/// The L1 script: one namespace + TAP + iperf3 server, one root image and one data disk, then
/// the VMMs in ABBA order.
fn script() -> String {
    let order: Vec<String> = (0..rounds())
        .map(|r| {
            let mut v = vmms();
            if r % 2 == 1 {
                v.reverse();
            }
            v.iter()
                .map(|n| format!("run_{} {}", n, r + 1))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    format!(
        r#"set -e
IP=/usr/sbin/ip
[ -x $IP ] || IP=/sbin/ip
QEMU=/usr/bin/qemu-system-x86_64
KVM=/sys/kernel/debug/kvm
CR=$(printf '\r')
NS=ferrovm-bench-$$
SRV=
$IP netns add $NS
cleanup() {{ [ -z "$SRV" ] || kill $SRV 2>/dev/null; $IP netns del $NS 2>/dev/null; rm -f disk.img data.img data.qcow2; }}
trap cleanup EXIT
inns() {{ $IP netns exec $NS "$@"; }}
inns $IP link set lo up
inns $IP tuntap add dev tap0 mode tap vnet_hdr
inns $IP addr add 172.30.0.1/24 dev tap0
inns $IP link set tap0 up
inns /usr/bin/iperf3 -s -B 172.30.0.1 >iperf-server.log 2>&1 &
SRV=$!
cat > g.sh <<'GUEST_EOF'
{guest}
GUEST_EOF
cp "$IMAGES/rootfs.ext4" disk.img
debugfs -w -R "write g.sh /test.sh" disk.img >/dev/null 2>&1
# A fully allocated data disk (tmpfs pages exist), so reads do not hit holes.
# (256 MiB in the qcow2 comparison: L1's RAM holds both copies.)
dd if=/dev/zero of=data.img bs=1M count={data_mb} 2>/dev/null
CMDLINE="console=ttyS0 quiet panic=1 root=/dev/vda rw ferrovm.test=/test.sh"
MAC=52:54:00:12:34:56
rd() {{ v=0; read v <"$1" 2>/dev/null || v=0; }}
sample() {{
    rd $KVM/exits; e=$v; rd $KVM/mmio_exits; m=$v; rd $KVM/io_exits; p=$v
    rd $KVM/irq_injections; q=$v
    read t _ </proc/uptime; t=${{t%.*}}${{t#*.}}
}}
# run_vm NAME ROUND CMD...: runs the VMM with its console on a pipe; samples the KVM counters
# when the guest announces a phase; prefixes the guest's BENCH lines with NAME and ROUND.
run_vm() {{
    name=$1 round=$2; shift 2
    : >console.log
    set +e
    {{ "$@" </dev/null 2>err.log; echo "VMM-STATUS $?"; }} | while IFS= read -r l; do
        l=${{l%"$CR"}}
        case $l in
        "PHASE "*" begin") sample; e0=$e m0=$m p0=$p q0=$q t0=$t ;;
        "PHASE "*" end")
            sample; ph=${{l#PHASE }}; ph=${{ph% end}}
            echo "BENCH $name $ph round=$round kvm_exits=$((e - e0)) user_mmio=$((m - m0)) user_pio=$((p - p0)) irqs=$((q - q0)) l1_cs=$((t - t0))" ;;
        "BENCH "*) echo "BENCH $name ${{l#BENCH }} round=$round" ;;
        "VMM-STATUS "*|*FAILED*|GUEST-NET-DOWN|GUEST_VDB*|FERROVM-TEST-EXIT*) echo "$name round $round: $l" ;;
        esac
        echo "$l" >>console.log
    done
    set -e
    grep -q 'FERROVM-TEST-EXIT status=0' console.log || {{ echo "--- $name console tail"; tail -40 console.log; cat err.log; }}
}}
# run_ferrovm ROUND [NAME DATA-IMAGE]; run_qemu ROUND [NAME DATA-IMAGE FORMAT]
run_ferrovm() {{
    vm=${{2:-ferrovm}} stats=
    [ "$vm" = ferrovm ] && stats=--exit-stats
    run_vm "$vm" $1 inns "$FERROVM" run --kernel "$IMAGES/bzImage" \
        --initramfs "$IMAGES/initramfs.cpio.gz" --memory 512M --cpus 1 --cmdline "$CMDLINE" \
        --disk path=disk.img --disk path=${{3:-data.img}} --net tap=tap0,mac=$MAC --serial stdio $stats
    if [ "$1" = 1 ] && [ -n "$stats" ]; then echo EXITSTATS-BEGIN; cat err.log; echo EXITSTATS-END; fi
}}
run_qemu() {{
    run_vm ${{2:-qemu}} $1 inns $QEMU -L /qemu/share -M q35 -accel kvm -cpu host -m 512M -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio \
        -kernel "$IMAGES/bzImage" -initrd "$IMAGES/initramfs.cpio.gz" -append "$CMDLINE" \
        -drive if=none,id=root,format=raw,file=disk.img -device virtio-blk-pci,drive=root \
        -drive if=none,id=data,format=${{4:-raw}},file=${{3:-data.img}} -device virtio-blk-pci,drive=data \
        -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off \
        -device virtio-net-pci,netdev=n0,mac=$MAC,romfile=
}}
# The same data disk as qcow2, every cluster allocated (-S 0: no sparse detection).
[ {fio_only} = 1 ] && qemu-img convert -f raw -O qcow2 -S 0 data.img data.qcow2
run_ferrovm_qcow2() {{ run_ferrovm $1 ferrovm_qcow2 data.qcow2; }}
run_qemu_qcow2() {{ run_qemu $1 qemu_qcow2 data.qcow2 qcow2; }}
{order}
"#,
        guest = guest_script(),
        order = order.join("\n"),
        fio_only = u8::from(qcow2_mode()),
        data_mb = if qcow2_mode() { 256 } else { 512 }
    )
}

struct Metric {
    test: &'static str,
    label: &'static str,
    /// true: higher is better.
    higher: bool,
    get: fn(&BTreeMap<String, f64>) -> Option<f64>,
    /// Operations in the phase (for exits per op), and the op's name.
    ops: fn(&BTreeMap<String, f64>) -> Option<f64>,
    per: &'static str,
}

fn g(m: &BTreeMap<String, f64>, k: &str) -> Option<f64> {
    m.get(k).copied()
}

fn metrics() -> Vec<Metric> {
    vec![
        Metric {
            test: "randread-4k",
            label: "fio 4 KiB randread QD32, IOPS",
            higher: true,
            get: |m| g(m, "rd_iops"),
            ops: |m| Some(g(m, "rd_kib")? / 4.0),
            per: "I/O",
        },
        Metric {
            test: "randwrite-4k",
            label: "fio 4 KiB randwrite QD32, IOPS",
            higher: true,
            get: |m| g(m, "wr_iops"),
            ops: |m| Some(g(m, "wr_kib")? / 4.0),
            per: "I/O",
        },
        Metric {
            test: "read-1m",
            label: "fio 1 MiB seq read QD4, MiB/s",
            higher: true,
            get: |m| Some(g(m, "rd_kib_s")? / 1024.0),
            ops: |m| Some(g(m, "rd_kib")? / 1024.0),
            per: "I/O",
        },
        Metric {
            test: "write-1m",
            label: "fio 1 MiB seq write QD4, MiB/s",
            higher: true,
            get: |m| Some(g(m, "wr_kib_s")? / 1024.0),
            ops: |m| Some(g(m, "wr_kib")? / 1024.0),
            per: "I/O",
        },
        Metric {
            test: "tcp-g2h",
            label: "iperf3 TCP guest->host, Mbit/s",
            higher: true,
            get: |m| g(m, "mbit_s"),
            // MB moved in SECS seconds at the receiver's rate.
            ops: |m| Some(g(m, "mbit_s")? * secs() as f64 / 8.0),
            per: "MB",
        },
        Metric {
            test: "tcp-h2g",
            label: "iperf3 TCP host->guest, Mbit/s",
            higher: true,
            get: |m| g(m, "mbit_s"),
            ops: |m| Some(g(m, "mbit_s")? * secs() as f64 / 8.0),
            per: "MB",
        },
        Metric {
            test: "ping",
            label: "ping guest->host RTT avg, ms",
            higher: false,
            get: |m| g(m, "avg_ms"),
            ops: |m| g(m, "n"),
            per: "ping",
        },
        Metric {
            test: "ping",
            label: "ping guest->host RTT mdev, ms",
            higher: false,
            get: |m| g(m, "mdev_ms"),
            ops: |_| None,
            per: "",
        },
    ]
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        println!("devices: bench");
        return ExitCode::SUCCESS;
    }
    let results: Arc<Mutex<String>> = Arc::default();
    let sink = results.clone();
    let case = harness::Case::new("bench_devices_vs_qemu", &script())
        .timeout(Duration::from_secs(1800))
        .check(move |o| {
            *sink.lock().unwrap() = o.output.clone();
            harness::expect_status(o, 0)
        });
    let mut cfg = harness::Config::from_env();
    cfg.rootfs_in_initrd = true;
    // What q35 loads for a -kernel boot; no option ROM for virtio-net-pci (Debian's ipxe-qemu
    // is not installed, hence `romfile=`).
    cfg.l1_extra.extend(harness::qemu_firmware(&[
        "bios-256k.bin",
        "linuxboot_dma.bin",
        "kvmvapic.bin",
    ]));
    cfg.l1_programs.extend(
        [
            "/usr/bin/qemu-system-x86_64",
            "/usr/bin/iperf3",
            "/usr/sbin/debugfs",
            "/usr/sbin/ip",
            "/usr/bin/qemu-img",
        ]
        .iter()
        .map(PathBuf::from),
    );
    cfg.l1_modules.push("tun".into());
    let images = cfg.images.clone();
    let started = Instant::now();
    let status = harness::run_with(vec![case], cfg);
    let output = results.lock().unwrap().clone();
    let r = parse(&output);

    for l in output.lines().filter(|l| {
        l.contains(" round ")
            && (l.contains("FAILED") || l.contains("VMM-STATUS") || l.contains("NET-DOWN"))
    }) {
        println!("{}", l.trim());
    }
    if qcow2_mode() {
        print_qcow2_table(&r, &images, started);
        return status;
    }
    println!(
        "\nDevices: ferrovm vs QEMU q35 (virtio-pci, vhost=off), stock {} kernel, 512 MiB, 1 vCPU, \
         {} s per test, {} rounds ABBA (run took {:.0} s):\n",
        std::fs::read_to_string(images.join("kernel-version"))
        .unwrap_or_default()
        .trim(),
        secs(),
        rounds(),
        started.elapsed().as_secs_f64()
    );
    println!("| test | ferrovm (per round) | QEMU (per round) | ferrovm / QEMU (means) |");
    println!("|---|---:|---:|---:|");
    for m in metrics() {
        let f = per_round(&r, "ferrovm", m.test, &m.get);
        let q = per_round(&r, "qemu", m.test, &m.get);
        let ratio = mean(&f) / mean(&q);
        println!(
            "| {} ({}) | {} | {} | {:.2} |",
            m.label,
            if m.higher {
                "higher is better"
            } else {
                "lower is better"
            },
            list(&f),
            list(&q),
            ratio
        );
    }
    println!("\nL1 KVM exits per operation during each test (mean of rounds; in parentheses: of which userspace MMIO+PIO exits), and guest interrupts injected per operation:\n");
    println!("| test | per | ferrovm exits | QEMU exits | ferrovm irqs | QEMU irqs |");
    println!("|---|---|---:|---:|---:|---:|");
    for m in metrics() {
        if m.per.is_empty() {
            continue;
        }
        let cell = |vmm: &str, key: &'static str| -> f64 {
            let ops = m.ops;
            mean(&per_round(&r, vmm, m.test, &|x| {
                let n = ops(x)?;
                let v = match key {
                    "user" => g(x, "user_mmio")? + g(x, "user_pio")?,
                    k => g(x, k)?,
                };
                (n > 0.0).then(|| v / n)
            }))
        };
        println!(
            "| {} | {} | {} ({}) | {} ({}) | {} | {} |",
            m.test,
            m.per,
            fmt(cell("ferrovm", "kvm_exits")),
            fmt(cell("ferrovm", "user")),
            fmt(cell("qemu", "kvm_exits")),
            fmt(cell("qemu", "user")),
            fmt(cell("ferrovm", "irqs")),
            fmt(cell("qemu", "irqs")),
        );
    }
    // ferrovm's own exit statistics of round 1 (whole run: boot, fio, iperf3, ping).
    if let (Some(a), Some(b)) = (output.find("EXITSTATS-BEGIN"), output.find("EXITSTATS-END")) {
        println!("\nferrovm --exit-stats, round 1 (whole VM lifetime):\n");
        for l in output[a..b].lines().skip(1) {
            println!("    {}", l.trim_end());
        }
    }
    status
}

/// The disk-format table: ferrovm raw, ferrovm qcow2 and QEMU qcow2, with the two ratios the
/// issue sets targets for.
fn print_qcow2_table(r: &Results, images: &std::path::Path, started: Instant) {
    println!(
        "\nDisk formats: a fully allocated 256 MiB data disk, raw vs qcow2 (64 KiB clusters, \
         `qemu-img convert -S 0`), fio --direct=1 libaio in the guest, stock {} kernel, \
         {} s per test, {} rounds ABBA (run took {:.0} s):\n",
        std::fs::read_to_string(images.join("kernel-version"))
            .unwrap_or_default()
            .trim(),
        secs(),
        rounds(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "| test | ferrovm raw | ferrovm qcow2 | QEMU qcow2 | ferrovm qcow2 / raw | ferrovm qcow2 / QEMU qcow2 |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for m in metrics().into_iter().take(4) {
        let [raw, q, qemu] =
            ["ferrovm", "ferrovm_qcow2", "qemu_qcow2"].map(|v| per_round(r, v, m.test, &m.get));
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} |",
            m.label,
            list(&raw),
            list(&q),
            list(&qemu),
            mean(&q) / mean(&raw),
            mean(&q) / mean(&qemu)
        );
    }
    println!(
        "\nPer I/O, mean of rounds: L1 KVM exits (in parentheses: userspace MMIO+PIO exits), \
         guest interrupts injected, and L1 wall time in ms:\n"
    );
    println!("| test | ferrovm raw | ferrovm qcow2 | QEMU qcow2 |");
    println!("|---|---:|---:|---:|");
    for m in metrics().into_iter().take(4) {
        let cells = ["ferrovm", "ferrovm_qcow2", "qemu_qcow2"].map(|v| {
            let per_io = |key: &'static str, scale: f64| {
                mean(&per_round(r, v, m.test, &|x| {
                    let n = (m.ops)(x)?;
                    let v = match key {
                        "user" => g(x, "user_mmio")? + g(x, "user_pio")?,
                        k => g(x, k)?,
                    };
                    (n > 0.0).then(|| v * scale / n)
                }))
            };
            format!(
                "{} ({}), {} irqs, {} ms",
                fmt(per_io("kvm_exits", 1.0)),
                fmt(per_io("user", 1.0)),
                fmt(per_io("irqs", 1.0)),
                fmt(per_io("l1_cs", 10.0))
            )
        });
        println!("| {} | {} |", m.test, cells.join(" | "));
    }
}
