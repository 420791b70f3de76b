//! Firmware boot benchmark (issue 10): time and KVM exits from VMM start to the init marker
//! (`FERROVM-BOOT-OK`) through SeaBIOS + GRUB, ferrovm against QEMU `-M pc` with the same
//! firmware file and the same ISO (guest-images/build-iso.sh) on a virtio-blk disk and as a
//! CD-ROM on virtio-scsi (El Torito), and
//! ferrovm's own direct kernel boot of the same kernel and initramfs. Then OVMF + GRUB
//! (ferrovm `--firmware uefi`, QEMU `-M q35` with the same code image), in a second case:
//! QEMU 7.2's TCG, which runs L1, has been seen to abort while an L2 runs OVMF, and that
//! must not lose the SeaBIOS figures.
//!
//! `cargo bench --bench fwboot` (as root, after `scripts/setup-host`). One L1 boot. Each VMM
//! gets the console on a FIFO; once GRUB's menu is on it the script types `p`, the entry
//! that prints what the guest sees and powers off, so every VM ends by itself.

mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use common::median;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const REPS: usize = 3;
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Shell helpers: `measure NAME KEY CMD...` runs CMD with its console on a FIFO, types KEY
/// when GRUB's menu shows (none for a direct boot), and prints one BENCH line at the marker.
const HELPERS: &str = r#"set -e
QEMU=/usr/bin/qemu-system-x86_64
uptime_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
printf '\370\003' > sercon-port   # COM1 (0x3f8), what ferrovm gives SeaBIOS
measure() {
    name=$1; key=$2; shift 2
    rm -f out.log in.fifo; mkfifo in.fifo
    e0=$(cat /sys/kernel/debug/kvm/exits)
    t0=$(uptime_ms)
    "$@" <in.fifo >out.log 2>&1 &
    pid=$!
    exec 3>in.fifo
    typed=
    while ! grep -q FERROVM-BOOT-OK out.log; do
        kill -0 $pid 2>/dev/null || { echo "BENCH-FAIL $name"; tail -c 2000 out.log; exec 3>&-; return 0; }
        if [ -n "$key" ] && [ -z "$typed" ] && grep -q "check and power off" out.log; then
            printf "$key" >&3; typed=1
        fi
        sleep 0.02
    done
    t1=$(uptime_ms)
    e1=$(cat /sys/kernel/debug/kvm/exits)
    wait $pid || true
    exec 3>&-
    echo "BENCH $name ms=$((t1 - t0)) exits=$((e1 - e0))"
}
"#;

fn seabios_script() -> String {
    format!(
        r#"{HELPERS}
ISO=/images/boot.iso
i=0
while [ $i -lt {REPS} ]; do
    measure ferrovm-seabios p "$FERROVM" run --firmware bios --disk path=$ISO,readonly=on --memory 512M
    measure qemu-pc-seabios p $QEMU -M pc -accel kvm -cpu host -m 512M -smp 1 -nodefaults \
        -no-user-config -display none -serial stdio -bios {SEABIOS} \
        -fw_cfg name=etc/sercon-port,file=sercon-port \
        -drive file=$ISO,if=none,id=d0,format=raw,readonly=on -device virtio-blk-pci,drive=d0
    measure ferrovm-seabios-cdrom p "$FERROVM" run --firmware bios --cdrom $ISO --memory 512M
    measure qemu-pc-seabios-cdrom p $QEMU -M pc -accel kvm -cpu host -m 512M -smp 1 -nodefaults \
        -no-user-config -display none -serial stdio -bios {SEABIOS} \
        -fw_cfg name=etc/sercon-port,file=sercon-port -device virtio-scsi-pci \
        -drive file=$ISO,if=none,id=cd0,format=raw,media=cdrom,readonly=on -device scsi-cd,drive=cd0
    measure ferrovm-direct "" "$FERROVM" run --kernel "$IMAGES/bzImage" \
        --initramfs "$IMAGES/initramfs.cpio.gz" --memory 512M \
        --cmdline "console=ttyS0 reboot=k panic=1 ferrovm.test=/nonexistent"
    i=$((i + 1))
done
"#
    )
}

fn ovmf_script() -> String {
    format!(
        r#"{HELPERS}
ISO=/images/boot.iso
i=0
while [ $i -lt {REPS} ]; do
    cp {OVMF_VARS} vars.fd
    measure qemu-q35-ovmf p $QEMU -M q35 -accel kvm -cpu host -m 512M -smp 1 -nodefaults \
        -no-user-config -display none -serial stdio \
        -drive if=pflash,format=raw,readonly=on,file={OVMF_CODE} -drive if=pflash,format=raw,file=vars.fd \
        -drive file=$ISO,if=none,id=d0,format=raw,readonly=on -device virtio-blk-pci,drive=d0
    measure ferrovm-ovmf p "$FERROVM" run --firmware uefi --disk path=$ISO,readonly=on --memory 512M
    i=$((i + 1))
done
"#
    )
}

#[derive(Default, Clone)]
struct Sample {
    ms: Vec<f64>,
    exits: Vec<f64>,
}

fn parse(output: &str, into: &mut BTreeMap<String, Sample>) {
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("BENCH ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let Some(name) = it.next() else { continue };
        let s = into.entry(name.to_string()).or_default();
        for kv in it {
            match kv.split_once('=').map(|(k, v)| (k, v.parse::<f64>())) {
                Some(("ms", Ok(v))) => s.ms.push(v),
                Some(("exits", Ok(v))) => s.exits.push(v),
                _ => {}
            }
        }
    }
}

fn case(name: &str, script: String, sink: Arc<Mutex<String>>) -> harness::Case {
    harness::Case::new(name, &script)
        .timeout(Duration::from_secs(1500))
        .check(move |o| {
            sink.lock().unwrap().push_str(&o.output);
            for l in o.output.lines().filter(|l| l.contains("BENCH-FAIL")) {
                eprintln!("{l}");
            }
            harness::expect_status(o, 0)
        })
}

fn row(samples: &BTreeMap<String, Sample>, name: &str, base: &str) {
    let s = samples.get(name).cloned().unwrap_or_default();
    let b = samples.get(base).cloned().unwrap_or_default();
    println!(
        "| {name} | {} | {:.0} | {:.0} | {:.2} | {:.2} |",
        s.ms.len(),
        median(&s.ms),
        median(&s.exits),
        median(&s.ms) / median(&b.ms),
        median(&s.exits) / median(&b.exits)
    );
}

fn main() -> std::process::ExitCode {
    if std::env::args().any(|a| a == "--list") {
        println!("fwboot: bench");
        return std::process::ExitCode::SUCCESS;
    }
    let out: Arc<Mutex<String>> = Arc::default();
    let mut cases = vec![
        case("bench_fwboot_seabios", seabios_script(), out.clone()),
        case("bench_fwboot_ovmf", ovmf_script(), out.clone()),
    ];
    // FERROVM_BENCH_ONLY=seabios|ovmf runs one of the two.
    if let Ok(only) = std::env::var("FERROVM_BENCH_ONLY") {
        cases.retain(|c| c.name.ends_with(&only));
    }
    let mut cfg = harness::Config::from_env();
    let images = cfg.images.clone();
    cfg.l1_extra.extend(
        [
            (images.join("boot.iso"), "/images/boot.iso"),
            (SEABIOS.into(), SEABIOS),
            (OVMF_CODE.into(), OVMF_CODE),
            (OVMF_VARS.into(), OVMF_VARS),
        ]
        .into_iter()
        .map(|(p, l1): (std::path::PathBuf, &str)| (p, l1.to_string())),
    );
    cfg.l1_programs.push("/usr/bin/qemu-system-x86_64".into());
    let status = harness::run_with(cases, cfg);
    let mut samples = BTreeMap::new();
    parse(&out.lock().unwrap(), &mut samples);
    println!("\nVMM start to FERROVM-BOOT-OK through firmware + GRUB (boot.iso on virtio-blk, or -cdrom rows: on a virtio-scsi CD-ROM), 512 MiB, 1 vCPU, median of up to {REPS}:\n");
    println!("| run | n | wall ms | KVM exits | wall vs QEMU | exits vs QEMU |");
    println!("|---|---|---|---|---|---|");
    row(&samples, "ferrovm-seabios", "qemu-pc-seabios");
    row(&samples, "qemu-pc-seabios", "qemu-pc-seabios");
    row(&samples, "ferrovm-seabios-cdrom", "qemu-pc-seabios-cdrom");
    row(&samples, "qemu-pc-seabios-cdrom", "qemu-pc-seabios-cdrom");
    row(&samples, "ferrovm-direct", "qemu-pc-seabios");
    row(&samples, "ferrovm-ovmf", "qemu-q35-ovmf");
    row(&samples, "qemu-q35-ovmf", "qemu-q35-ovmf");
    status
}
