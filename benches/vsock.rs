//! vsock throughput against a TCP stream over TAP (issue 12), one ferrovm VM with both
//! `--vsock` and `--net tap=...`, in the nested harness (one L1 boot, a network namespace).
//!
//! The guest runs the same relay code for both (tests/guest/vsock-nc.c: AF_VSOCK, or `-t`
//! for TCP), moving FERROVM_BENCH_MIB (default 256) MiB of zeroes per transfer; L1's socat
//! sinks or sources them (`UNIX-LISTEN:PATH_<port>` for vsock, `TCP-LISTEN` in the namespace
//! for TCP). Guest-side wall time from connect to the end of the stream (guest->host: until
//! the host has read everything and closed; host->guest: until end of file).
//! FERROVM_BENCH_ROUNDS (default 3), alternating vsock/TCP.
//!
//! `cargo bench --bench vsock` (as root, after `scripts/setup-host`).

mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fmt, list, mean, parse, per_round};

const SCRIPT: &str = r#"set -e
IP=/usr/sbin/ip
NS=ferrovm-vsock-$$
$IP netns add $NS
PIDS=
trap 'kill $PIDS 2>/dev/null; $IP netns del $NS 2>/dev/null || true' EXIT
inns() { $IP netns exec $NS "$@"; }
inns $IP link set lo up
inns $IP tuntap add dev tap0 mode tap vnet_hdr
inns $IP addr add 172.30.0.1/24 dev tap0
inns $IP link set tap0 up
BYTES=$((MIB * 1048576))
cat > g.sh <<GUEST_EOF
ip link set eth0 up
ip addr add 172.30.0.2/24 dev eth0
t() { cut -d' ' -f1 /proc/uptime; }
rate() { awk -v a=\$1 -v b=\$2 'BEGIN { printf "%.1f", $MIB / (b - a) }'; }
one() {
    # one NAME ROUND SOURCE ARGS...: SOURCE = zero (send $BYTES) or null (receive)
    n=\$1 r=\$2 src=\$3; shift 3
    a=\$(t)
    if [ \$src = zero ]; then head -c $BYTES /dev/zero | /vsock-nc "\$@" >/dev/null
    else got=\$(/vsock-nc "\$@" </dev/null | wc -c); [ "\$got" = $BYTES ] || echo "SHORT \$n \$got"; fi
    b=\$(t)
    echo "BENCH ferrovm \$n round=\$r mib_s=\$(rate \$a \$b)"
}
r=1
while [ \$r -le $ROUNDS ]; do
    one vsock-g2h \$r zero 2 6001
    one tcp-g2h \$r zero -t 172.30.0.1 6002
    one tcp-h2g \$r null -t 172.30.0.1 6004
    one vsock-h2g \$r null 2 6003
    r=\$((r + 1))
done
echo GUEST_DONE
GUEST_EOF
mkinitrd_with_test g.sh initrd.img "$FILES/vsock-nc"
socat -u UNIX-LISTEN:v.sock_6001,fork SYSTEM:'cat >/dev/null' & PIDS="$PIDS $!"
socat -U UNIX-LISTEN:v.sock_6003,fork SYSTEM:"head -c $BYTES /dev/zero" & PIDS="$PIDS $!"
inns socat -u TCP-LISTEN:6002,fork,reuseaddr SYSTEM:'cat >/dev/null' & PIDS="$PIDS $!"
inns socat -U TCP-LISTEN:6004,fork,reuseaddr SYSTEM:"head -c $BYTES /dev/zero" & PIDS="$PIDS $!"
sleep 1
inns "$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 512M \
    --serial stdio --cmdline "console=ttyS0 quiet panic=1 ferrovm.test=/test.sh" \
    --net tap=tap0 --vsock cid=3,socket="$PWD/v.sock" </dev/null | tr -d '\r' | grep -E 'BENCH|SHORT|GUEST_DONE|vsock-nc'
"#;

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        println!("vsock: bench");
        return ExitCode::SUCCESS;
    }
    let num = |k: &str, d: u32| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (mib, rounds) = (
        num("FERROVM_BENCH_MIB", 256),
        num("FERROVM_BENCH_ROUNDS", 3),
    );
    let results: Arc<Mutex<String>> = Arc::default();
    let sink = results.clone();
    let nc = harness::vsock_nc();
    let case = harness::Case::new(
        "bench_vsock_vs_tcp",
        &format!("MIB={mib}\nROUNDS={rounds}\n{SCRIPT}"),
    )
    .requires(&nc, "gcc -static tests/guest/vsock-nc.c failed")
    .file(nc, "vsock-nc")
    .timeout(Duration::from_secs(1800))
    .check(move |o| {
        *sink.lock().unwrap() = o.output.clone();
        harness::expect_status(o, 0)?;
        harness::expect_output(o, "GUEST_DONE")
    });
    let mut cfg = harness::Config::from_env();
    cfg.l1_programs
        .extend(["/usr/sbin/ip", "/usr/bin/socat"].iter().map(PathBuf::from));
    cfg.l1_modules.push("tun".into());
    let started = Instant::now();
    let status = harness::run_with(vec![case], cfg);
    let output = results.lock().unwrap().clone();
    for l in output.lines().filter(|l| l.contains("SHORT")) {
        println!("{}", l.trim());
    }
    let r = parse(&output);
    let get = |m: &std::collections::BTreeMap<String, f64>| m.get("mib_s").copied();
    println!(
        "\nvsock vs TCP over TAP, one ferrovm VM, {mib} MiB per transfer, {rounds} rounds \
         (run took {:.0} s):\n",
        started.elapsed().as_secs_f64()
    );
    println!(
        "| direction | vsock MiB/s (per round) | TCP over TAP MiB/s (per round) | vsock / TCP |"
    );
    println!("|---|---|---|---:|");
    for (label, v, t) in [
        ("guest -> host", "vsock-g2h", "tcp-g2h"),
        ("host -> guest", "vsock-h2g", "tcp-h2g"),
    ] {
        let (a, b) = (
            per_round(&r, "ferrovm", v, &get),
            per_round(&r, "ferrovm", t, &get),
        );
        println!(
            "| {label} | {} | {} | {} |",
            list(&a),
            list(&b),
            fmt(mean(&a) / mean(&b))
        );
    }
    status
}
