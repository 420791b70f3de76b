//! Fewer exits (issue 14): guest RAM that KVM maps with 2 MiB pages (THP by default,
//! `thp=off`, `hugepages=on`), KVM's in-kernel counters in `--exit-stats`, the KVM
//! paravirtual features the guest finds, and the virtio console (`--console virtio`).

use std::time::Duration;

use crate::harness::{expect_output, Case, CaseOutput};

/// Boots the PVH kernel with `mem` (a --memory value) and 2 vCPUs, `--exit-stats` to
/// `$json`; the guest prints its PV setup lines. Prints `STATUS_<tag>=N`.
fn boot(tag: &str, mem: &str) -> String {
    format!(
        r#""$FERROVM" run --kernel "$IMAGES/vmlinux" --initramfs initrd.img --cpus 2 --memory {mem} \
    --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" --exit-stats --exit-stats=json:{tag}.json \
    </dev/null >{tag}.log 2>&1
echo "STATUS_{tag}=$?"
"#
    )
}

const SCRIPT_PAGES: &str = r#"set -e
cat > t.sh <<'EOF'
dmesg | grep -E 'kvm-clock|kvm-guest|PV|clocksource' | sed 's/^/GUEST: /'
EOF
mkinitrd_with_test t.sh initrd.img
set +e
"#;

/// The --exit-stats JSON the script printed as `JSON_<tag>=...`.
fn stats_json(o: &CaseOutput, tag: &str) -> Result<serde_json::Value, String> {
    let line = o
        .output
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("JSON_{tag}=")))
        .ok_or_else(|| format!("no JSON_{tag} line"))?;
    serde_json::from_str(line).map_err(|e| format!("{tag}: --exit-stats JSON: {e}"))
}

/// A counter of the JSON's "kvm" section (VM or vCPU counters).
fn counter(o: &CaseOutput, tag: &str, name: &str) -> Result<u64, String> {
    let v = stats_json(o, tag)?;
    let kvm = v
        .get("kvm")
        .ok_or_else(|| format!("{tag}: --exit-stats JSON has no kvm section"))?;
    ["vcpu", "vm"]
        .iter()
        .find_map(|part| kvm[part][name].as_u64())
        .ok_or_else(|| format!("{tag}: no {name} counter"))
}

fn status(o: &CaseOutput, tag: &str) -> Result<(), String> {
    match o
        .output
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("STATUS_{tag}=")))
    {
        Some("0") => Ok(()),
        other => Err(format!("{tag}: ferrovm status {other:?}, expected 0")),
    }
}

fn check_pages(o: &CaseOutput) -> Result<(), String> {
    for tag in ["thp", "nothp", "huge"] {
        status(o, tag)?;
    }
    // THP (default): guest RAM in 2 MiB pages, hardly any nested page faults.
    let (p2m, pf) = (
        counter(o, "thp", "pages_2m")?,
        counter(o, "thp", "pf_fixed")?,
    );
    if p2m == 0 || pf > 2000 {
        return Err(format!(
            "default RAM: pages_2m {p2m}, pf_fixed {pf}: not on huge pages"
        ));
    }
    // thp=off: 4 KiB pages, one fault per page the guest touches.
    let (p2m, pf) = (
        counter(o, "nothp", "pages_2m")?,
        counter(o, "nothp", "pf_fixed")?,
    );
    if p2m != 0 || pf < 5000 {
        return Err(format!(
            "thp=off: pages_2m {p2m}, pf_fixed {pf}: expected 4 KiB pages"
        ));
    }
    if counter(o, "huge", "pages_2m")? == 0 {
        return Err("hugepages=on: no 2 MiB mappings".into());
    }
    expect_output(o, "KVM (in-kernel, binary stats):")?;
    // The pool emptied: a one-line error, status 1.
    expect_output(o, "STATUS_nopool=1")?;
    expect_output(o, "too few free 2 MiB pages")?;
    // The KVM paravirtual features the guest set up (CPUID 0x40000001 from KVM).
    for pv in [
        "kvm-clock: Using msrs",
        "PV spinlocks enabled",
        "setup PV IPIs",
    ] {
        expect_output(o, pv).map_err(|e| format!("guest PV features: {e}"))?;
    }
    Ok(())
}

/// Exits on `port` (both directions) in an --exit-stats JSON file.
fn port_count(o: &CaseOutput, tag: &str, port: u16) -> Result<u64, String> {
    let v = stats_json(o, tag)?;
    let ports = v["ports"].as_array().ok_or("no ports")?;
    Ok(ports
        .iter()
        .filter(|p| p["port"].as_u64() == Some(port.into()))
        .filter_map(|p| p["count"].as_u64())
        .sum())
}

fn check_console(o: &CaseOutput) -> Result<(), String> {
    status(o, "hvc")?;
    expect_output(o, "GUEST_CONSOLE=hvc0")?;
    // The kernel's log from before the driver loaded, replayed on hvc0.
    expect_output(o, "Linux version")?;
    expect_output(o, "FERROVM-BOOT-OK")?;
    expect_output(o, "GOT=typed-line")?;
    expect_output(o, "FERROVM-TEST-EXIT status=0")?;
    // The serial port is hardly touched: the boot log did not go through it.
    let com1 = port_count(o, "hvc", 0x3f8)?;
    if com1 > 2000 {
        return Err(format!(
            "{com1} exits on COM1's data port with the virtio console"
        ));
    }
    Ok(())
}

pub fn cases() -> Vec<Case> {
    let pages = format!(
        "{SCRIPT_PAGES}{}{}\
echo 200 > /proc/sys/vm/nr_hugepages
echo \"HUGE_POOL=$(cat /proc/sys/vm/nr_hugepages)\"
{}echo 0 > /proc/sys/vm/nr_hugepages
{}for t in thp nothp huge; do echo \"JSON_$t=$(cat $t.json)\"; done
grep -h 'GUEST: ' thp.log
grep -h 'KVM (in-kernel' thp.log
grep -h 'ferrovm:' nopool.log
",
        boot("thp", "256M"),
        boot("nothp", "256M,thp=off"),
        boot("huge", "256M,hugepages=on"),
        boot("nopool", "256M,hugepages=on"),
    );
    let console = r#"set -e
cat > t.sh <<'EOF'
echo "GUEST_CONSOLE=$(cat /sys/class/tty/console/active)"
echo READY-FOR-INPUT
read -r line
echo "GOT=$line"
EOF
mkinitrd_with_test t.sh initrd.img
set +e
trap '' PIPE
mkfifo in.fifo
"$FERROVM" run --kernel "$IMAGES/vmlinux" --initramfs initrd.img --memory 256M --console virtio \
    --cmdline "console=hvc0 panic=1 ferrovm.test=/test.sh" --exit-stats=json:hvc.json \
    <in.fifo >hvc.log 2>&1 &
pid=$!
exec 3>in.fifo
i=0
while ! grep -q READY-FOR-INPUT hvc.log && kill -0 $pid 2>/dev/null && [ $i -lt 600 ]; do
    sleep 0.2; i=$((i + 1))
done
echo typed-line >&3 || echo "ferrovm ended before the input was typed"
wait $pid
echo "STATUS_hvc=$?"
exec 3>&-
cat hvc.log
echo "JSON_hvc=$(cat hvc.json)"
"#;
    vec![
        Case::new("exits_huge_pages_kernel_counters_pv", &pages)
            .timeout(Duration::from_secs(420))
            .check(check_pages),
        Case::new("console_virtio_hvc0_log_and_input", console)
            .timeout(Duration::from_secs(240))
            .check(check_console),
    ]
}
