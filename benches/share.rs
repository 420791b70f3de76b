//! Workstation-VM benchmark (issue 12): virtio-fs through virtiofsd and user networking through
//! passt, ferrovm against QEMU q35 with the *same* virtiofsd and passt binaries and flags, same
//! stock kernel, same root image.
//!
//! `cargo bench --bench share` (as root, after `scripts/setup-host`), through the nested harness
//! (one L1 boot). L1 makes a network namespace whose only outside interface is a dummy with a
//! default route (passt takes its addresses from it) and an iperf3 server on its loopback,
//! which passt maps to the gateway address the guest gets by DHCP. Inside the guest:
//! - fio on a 256 MiB file of the shared folder (O_DIRECT, so the guest page cache does not
//!   answer): 1 MiB sequential reads at iodepth 4 and 4 KiB random reads at iodepth 16;
//! - iperf3 TCP guest->host and host->guest through passt.
//!
//! virtiofsd runs with `--cache=auto --thread-pool-size=0` for both (what `--fs` starts).
//! VMMs alternate ABBA; FERROVM_BENCH_SECS (default 8) and FERROVM_BENCH_ROUNDS (default 2).

mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fmt, list, mean, parse, per_round};

fn env_num<T: std::str::FromStr>(k: &str) -> Option<T> {
    std::env::var(k).ok()?.parse().ok()
}

fn guest_script(secs: u32) -> String {
    format!(
        r#"T={secs}
mkdir -p /mnt/s
mount -t virtiofs share /mnt/s || echo "SHARE-FAILED"
cat > /tmp/dhcp.sh <<'EOF'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add "$ip/$mask" dev "$interface"
[ -z "$mtu" ] || ip link set dev "$interface" mtu "$mtu"
ip route add default via "${{router%% *}}"
echo "${{router%% *}}" > /tmp/gw
EOF
chmod +x /tmp/dhcp.sh
ip link set eth0 up
udhcpc -i eth0 -f -q -n -t 10 -T 3 -s /tmp/dhcp.sh >/dev/null 2>&1 || echo "DHCP-FAILED"
GW=$(cat /tmp/gw 2>/dev/null)
fio_run() {{
    echo "PHASE $1 begin"
    fio --name=$1 --filename=/mnt/s/data --direct=1 --ioengine=libaio --rw=$2 --bs=$3 \
        --iodepth=$4 --runtime=$T --time_based --output-format=terse --terse-version=3 \
        >/tmp/fio.txt 2>&1
    echo "PHASE $1 end"
    awk -F';' -v n=$1 'NF > 50 {{ printf "BENCH %s rd_kib_s=%s rd_iops=%s\n", n, $7, $8 }}' /tmp/fio.txt
    grep -q ';' /tmp/fio.txt || {{ echo "FIO-FAILED $1"; cat /tmp/fio.txt; }}
}}
iperf_run() {{
    n=$1; shift
    echo "PHASE $n begin"
    iperf3 -c "$GW" -t $T -f m "$@" >/tmp/ip.txt 2>&1
    echo "PHASE $n end"
    awk -v n=$n '/receiver/ {{ for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") v = $(i - 1) }} END {{ if (v != "") print "BENCH " n " mbit_s=" v; else print "IPERF-FAILED " n }}' /tmp/ip.txt
    grep -q receiver /tmp/ip.txt || cat /tmp/ip.txt
}}
fio_run fs-read-1m read 1M 4
fio_run fs-randread-4k randread 4k 16
iperf_run passt-tcp-g2h
iperf_run passt-tcp-h2g -R
"#
    )
}

fn script(secs: u32, rounds: usize) -> String {
    let order: Vec<String> = (0..rounds)
        .map(|r| {
            let v = if r % 2 == 0 {
                ["ferrovm", "qemu"]
            } else {
                ["qemu", "ferrovm"]
            };
            v.map(|n| format!("run_{n} {}", r + 1)).join("\n")
        })
        .collect();
    format!(
        r#"set -e
IP=/usr/sbin/ip
QEMU=/usr/bin/qemu-system-x86_64
VIRTIOFSD=/usr/local/bin/virtiofsd
CR=$(printf '\r')
NS=ferrovm-share-$$
SRV=
$IP netns add $NS
cleanup() {{ [ -z "$SRV" ] || kill $SRV 2>/dev/null; $IP netns del $NS 2>/dev/null; rm -rf disk.img share psock; }}
trap cleanup EXIT
inns() {{ $IP netns exec $NS "$@"; }}
inns $IP link set lo up
inns $IP link add ext0 type dummy
inns $IP addr add 10.77.0.15/24 dev ext0
inns $IP link set ext0 up
inns $IP route add default via 10.77.0.1
inns /usr/bin/iperf3 -s -B 127.0.0.1 >iperf-server.log 2>&1 &
SRV=$!
mkdir -p share
dd if=/dev/urandom of=share/data bs=1M count=256 2>/dev/null
cat > g.sh <<'GUEST_EOF'
{guest}
GUEST_EOF
cp "$IMAGES/rootfs.ext4" disk.img
debugfs -w -R "write g.sh /test.sh" disk.img >/dev/null 2>&1
CMDLINE="console=ttyS0 quiet panic=1 root=/dev/vda rw ferrovm.test=/test.sh"
MAC=52:54:00:12:34:56
run_vm() {{
    name=$1 round=$2; shift 2
    : >console.log
    set +e
    {{ "$@" </dev/null 2>err.log; echo "VMM-STATUS $?"; }} | while IFS= read -r l; do
        l=${{l%"$CR"}}
        case $l in
        "BENCH "*) echo "BENCH $name ${{l#BENCH }} round=$round" ;;
        "VMM-STATUS "*|*FAILED*|FERROVM-TEST-EXIT*) echo "$name round $round: $l" ;;
        esac
        echo "$l" >>console.log
    done
    set -e
    grep -q 'FERROVM-TEST-EXIT status=0' console.log || {{ echo "--- $name console tail"; tail -40 console.log; cat err.log; }}
}}
run_ferrovm() {{
    run_vm ferrovm $1 inns "$FERROVM" run --kernel "$IMAGES/bzImage" \
        --initramfs "$IMAGES/initramfs.cpio.gz" --memory 512M --cpus 1 --cmdline "$CMDLINE" \
        --disk path=disk.img --fs tag=share,path="$PWD/share" --net user,mac=$MAC --serial stdio
}}
wait_sock() {{
    n=0; while [ ! -S "$1" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    [ -S "$1" ] || {{ echo "qemu round: SOCKET-FAILED $1"; cat virtiofsd.log passt.log; }}
}}
run_qemu() {{
    # passt drops root to nobody (by number: L1 has no /etc/passwd) before it binds its
    # socket: give it a folder it may write.
    rm -rf vfs.sock psock; mkdir psock; chown 65534:65534 psock
    inns $VIRTIOFSD --socket-path=vfs.sock --shared-dir "$PWD/share" --log-level=error \
        --thread-pool-size=0 --cache=auto 2>virtiofsd.log &
    vpid=$!
    inns passt --foreground --quiet --one-off --runas 65534:65534 --socket "$PWD/psock/passt.sock" \
        2>passt.log &
    ppid=$!
    wait_sock vfs.sock; wait_sock psock/passt.sock
    run_vm qemu $1 inns $QEMU -L /qemu/share -M q35 -accel kvm -cpu host -m 512M -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio \
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -kernel "$IMAGES/bzImage" -initrd "$IMAGES/initramfs.cpio.gz" -append "$CMDLINE" \
        -drive if=none,id=root,format=raw,file=disk.img -device virtio-blk-pci,drive=root \
        -chardev socket,id=vfs,path=vfs.sock -device vhost-user-fs-pci,chardev=vfs,tag=share \
        -netdev stream,id=n0,server=off,addr.type=unix,addr.path=psock/passt.sock \
        -device virtio-net-pci,netdev=n0,mac=$MAC,romfile=
    # Both end with their one client; do not leave them behind if they do not.
    kill $vpid $ppid 2>/dev/null || true
    wait $vpid $ppid 2>/dev/null || true
}}
{order}
"#,
        guest = guest_script(secs),
        order = order.join("\n"),
    )
}

struct Metric {
    test: &'static str,
    label: &'static str,
    key: &'static str,
}

const METRICS: [Metric; 4] = [
    Metric {
        test: "fs-read-1m",
        label: "virtio-fs fio 1 MiB sequential read QD4, MiB/s",
        key: "rd_kib_s",
    },
    Metric {
        test: "fs-randread-4k",
        label: "virtio-fs fio 4 KiB random read QD16, IOPS",
        key: "rd_iops",
    },
    Metric {
        test: "passt-tcp-g2h",
        label: "passt TCP guest->host, Mbit/s",
        key: "mbit_s",
    },
    Metric {
        test: "passt-tcp-h2g",
        label: "passt TCP host->guest, Mbit/s",
        key: "mbit_s",
    },
];

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        println!("share: bench");
        return ExitCode::SUCCESS;
    }
    let secs = env_num("FERROVM_BENCH_SECS").unwrap_or(8);
    let rounds = env_num("FERROVM_BENCH_ROUNDS").unwrap_or(2);
    let results: Arc<Mutex<String>> = Arc::default();
    let sink = results.clone();
    let case = harness::Case::new("bench_share_vs_qemu", &script(secs, rounds))
        .timeout(Duration::from_secs(1800))
        .check(move |o| {
            *sink.lock().unwrap() = o.output.clone();
            harness::expect_status(o, 0)
        });
    let mut cfg = harness::Config::from_env();
    cfg.rootfs_in_initrd = true;
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
            "/usr/bin/passt",
            "/usr/bin/passt.avx2",
            "/usr/local/bin/virtiofsd",
        ]
        .iter()
        .map(PathBuf::from),
    );
    cfg.l1_modules.push("dummy".into());
    let started = Instant::now();
    let status = harness::run_with(vec![case], cfg);
    let output = results.lock().unwrap().clone();
    let r = parse(&output);
    for l in output
        .lines()
        .filter(|l| l.contains(" round ") && (l.contains("FAILED") || l.contains("VMM-STATUS")))
    {
        println!("{}", l.trim());
    }
    println!(
        "\nShare and user networking: ferrovm vs QEMU q35, same virtiofsd and passt, {secs} s per \
         test, {rounds} rounds ABBA (run took {:.0} s):\n",
        started.elapsed().as_secs_f64()
    );
    println!(
        "| test (higher is better) | ferrovm (per round) | QEMU (per round) | ferrovm / QEMU |"
    );
    println!("|---|---:|---:|---:|");
    for m in METRICS {
        let scale = if m.key == "rd_kib_s" {
            1.0 / 1024.0
        } else {
            1.0
        };
        let get = |x: &std::collections::BTreeMap<String, f64>| x.get(m.key).map(|v| v * scale);
        let f = per_round(&r, "ferrovm", m.test, &get);
        let q = per_round(&r, "qemu", m.test, &get);
        println!(
            "| {} | {} | {} | {} |",
            m.label,
            list(&f),
            list(&q),
            fmt(mean(&f) / mean(&q))
        );
    }
    status
}
