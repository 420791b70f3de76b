//! Linux-guest tests of ferrovm, run by the nested harness (tests/harness/mod.rs).
//! `cargo test --test nested [-- <substring>]`; see the harness docs for modes and knobs.

mod cases;
mod harness;

use harness::{expect_output, expect_status, Case, CaseOutput, Config, Mode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// What a boot case prints from inside the L2 guest: CPU count, MemTotal and the guest's clock.
const GUEST_FACTS: &str = r#"echo "GUEST_CPUS=$(grep -c ^processor /proc/cpuinfo)"
echo "GUEST_MEMKB=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
echo "GUEST_RAMKB=$(dmesg | grep -o 'Memory: [0-9]*K/[0-9]*K' | cut -d/ -f2 | tr -d K)"
echo "GUEST_DATE=$(date +%s)"
"#;

/// A case that boots `kernel` (a path valid in the case's shell) with `base_initrd` plus a
/// `/test.sh` holding `guest_script`, and prints `FERROVM_STATUS=<status>`.
fn boot_script(kernel: &str, images: &str, cpus: u32, mem: &str, guest_script: &str) -> String {
    format!(
        r#"set -e
cat > t.sh <<'GUEST_EOF'
{guest_script}
GUEST_EOF
IMAGES="{images}" mkinitrd_with_test t.sh initrd.img
echo "HOST_DATE=$(date +%s)"
set +e
"$FERROVM" run --kernel "{kernel}" --initramfs initrd.img --cpus {cpus} --memory {mem}     --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" </dev/null
echo "FERROVM_STATUS=$?"
"#
    )
}

/// The integer after `KEY=` on its own line of the output.
fn value(o: &CaseOutput, key: &str) -> Result<i64, String> {
    o.output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .ok_or_else(|| format!("no {key}= line in the output"))?
        .trim()
        .parse()
        .map_err(|e| format!("{key}: {e}"))
}

/// Checks a boot that ran GUEST_FACTS and powered off: markers, CPUs, memory, clock, status 0.
fn check_boot(o: &CaseOutput, cpus: i64, mem_mib: i64) -> Result<(), String> {
    expect_status(o, 0)?;
    expect_output(o, "FERROVM-BOOT-OK")?;
    expect_output(o, "FERROVM-TEST-EXIT status=0")?;
    let got = value(o, "GUEST_CPUS")?;
    if got != cpus {
        return Err(format!("guest sees {got} CPUs, --cpus was {cpus}"));
    }
    // RAM the kernel found (its "Memory: free/total" boot line) must match --memory within 10%.
    // MemTotal excludes the kernel's own image and reservations (about 45 MiB for this kernel),
    // so it is held to 10% from 1 GiB up and to 25% below.
    let want = mem_mib * 1024;
    let ram = value(o, "GUEST_RAMKB")?;
    if (ram - want).abs() * 10 > want {
        return Err(format!(
            "guest found {ram} kB of RAM, not within 10% of --memory {mem_mib} MiB"
        ));
    }
    let kb = value(o, "GUEST_MEMKB")?;
    let tolerance = if mem_mib >= 1024 { 10 } else { 4 };
    if (kb - want).abs() * tolerance > want {
        return Err(format!(
            "MemTotal {kb} kB is not within 1/{tolerance} of --memory {mem_mib} MiB"
        ));
    }
    let skew = value(o, "GUEST_DATE")? - value(o, "HOST_DATE")?;
    if !(-5..=300).contains(&skew) {
        return Err(format!("guest clock is {skew} s off the host's"));
    }
    let st = value(o, "FERROVM_STATUS")?;
    if st != 0 {
        return Err(format!(
            "ferrovm exited {st} after guest poweroff, expected 0"
        ));
    }
    Ok(())
}

fn boot_case(name: &str, kernel: &str, cpus: u32, mem_mib: i64) -> Case {
    let mem = format!("{mem_mib}M");
    Case::new(
        name,
        &boot_script(kernel, "$IMAGES", cpus, &mem, GUEST_FACTS),
    )
    .timeout(Duration::from_secs(240))
    .check(move |o| check_boot(o, cpus as i64, mem_mib))
}

/// Linux boot cases (issue 3): both entry paths, SMP, large memory, reboot, panic, 6.12.
fn linux_boot_cases() -> Vec<Case> {
    let mut cases = vec![
        boot_case("boot_bzimage_1cpu_256m", "$IMAGES/bzImage", 1, 256),
        boot_case("boot_pvh_1cpu_256m", "$IMAGES/vmlinux", 1, 256),
        boot_case("boot_bzimage_2cpu_4g", "$IMAGES/bzImage", 2, 4096),
        boot_case("boot_pvh_4cpu_4g", "$IMAGES/vmlinux", 4, 4096),
        Case::new(
            "boot_guest_reboot_exits_0",
            &boot_script(
                "$IMAGES/bzImage",
                "$IMAGES",
                1,
                "256M",
                "echo rebooting-now\nreboot -f",
            ),
        )
        .timeout(Duration::from_secs(240))
        .check(|o| {
            expect_output(o, "rebooting-now")?;
            expect_output(o, "ferrovm: guest rebooted")?;
            match value(o, "FERROVM_STATUS")? {
                0 => Ok(()),
                s => Err(format!("status {s} after guest reboot, expected 0")),
            }
        }),
        Case::new(
            "boot_guest_panic_exits_4",
            &boot_script(
                "$IMAGES/bzImage",
                "$IMAGES",
                1,
                "256M",
                "echo 1 > /proc/sys/kernel/sysrq\necho c > /proc/sysrq-trigger",
            ),
        )
        .timeout(Duration::from_secs(240))
        .check(|o| {
            expect_output(o, "Kernel panic - not syncing")?;
            expect_output(o, "ferrovm: guest kernel panic")?;
            match value(o, "FERROVM_STATUS")? {
                4 => Ok(()),
                s => Err(format!("status {s} after guest panic, expected 4")),
            }
        }),
    ];
    // Exit statistics of a real Linux boot (issue 6): the table names the top reasons and ports.
    cases.push(
        Case::new(
            "exit_stats_on_linux_boot",
            &boot_script("$IMAGES/bzImage", "$IMAGES", 1, "256M", GUEST_FACTS)
                .replace(
                    "--cpus 1",
                    "--cpus 1 --exit-stats --exit-stats=json:stats.json",
                )
                .replace(
                    "echo \"FERROVM_STATUS=$?\"",
                    "echo \"FERROVM_STATUS=$?\"\ngrep -c '\"reason\"' stats.json || true",
                ),
        )
        .timeout(Duration::from_secs(240))
        .check(|o| {
            check_boot(o, 1, 256)?;
            expect_output(o, "ferrovm exit statistics")?;
            expect_output(o, "io-out")?;
            // COM1 output is among the ports, attributed to its device.
            if !o
                .output
                .lines()
                .any(|l| l.contains("0x03f8") && l.contains("com1"))
            {
                return Err("COM1 (0x03f8, com1) is missing from the port table".into());
            }
            Ok(())
        }),
    );
    // The packaged 6.12 kernel, built by `guest-images/build.sh --kernel 6.12`.
    let flavor_612 = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest-images/out/6.12-cloud");
    cases.push(
        Case::new(
            "boot_kernel_6_12",
            &boot_script(
                "$IMAGES/../6.12-cloud/bzImage",
                "$IMAGES/../6.12-cloud",
                2,
                "512M",
                GUEST_FACTS,
            ),
        )
        .timeout(Duration::from_secs(240))
        .requires(
            flavor_612.join("bzImage"),
            "build it: guest-images/build.sh --kernel 6.12",
        )
        .requires(
            flavor_612.join("initramfs.cpio.gz"),
            "build it: guest-images/build.sh --kernel 6.12",
        )
        .check(|o| {
            expect_output(o, "kernel=6.12")?;
            check_boot(o, 2, 512)
        }),
    );
    cases
}

/// Files of the 6.12 flavor, copied into L1 next to /images.
fn extra_l1_files() -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest-images/out/6.12-cloud");
    ["bzImage", "initramfs.cpio.gz"]
        .iter()
        .map(|f| (dir.join(f), format!("/6.12-cloud/{f}")))
        // A missing file is not an error here: boot_kernel_6_12 then reports SKIPPED.
        .filter(|(p, _)| p.exists())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// PCI and virtio-pci (issue "virtio-pci transport"). Kept in one block for easy merges.
// ---------------------------------------------------------------------------------------------

/// Guest side of the PCI cases: list bus 0, bind virtio-rng, read entropy, show interrupts.
const PCI_GUEST: &str = r#"for d in /sys/bus/pci/devices/*; do
    echo "PCIDEV $(basename $d) $(cat $d/vendor) $(cat $d/device) $(cat $d/class) irq=$(cat $d/irq)"
    head -n 1 $d/resource | sed "s/^/PCIRES $(basename $d) /"
done
dmesg | grep -E 'MMCONFIG|PCI0|PCI Root Bridge|virtio|pci 0000' | head -40
insmod /virtio-rng.ko || echo "INSMOD-FAILED"
for v in /sys/bus/virtio/devices/*; do
    echo "VIRTIODEV $(basename $v) device=$(cat $v/device) vendor=$(cat $v/vendor) status=$(cat $v/status) driver=$(basename $(readlink $v/driver))"
    echo "VIRTIOFEATURES $(cat $v/features)"
done
echo "RNG_CURRENT=$(cat /sys/class/misc/hw_random/rng_current)"
echo "HWRNG_BYTES=$(dd if=/dev/hwrng bs=512 count=8 2>/dev/null | wc -c)"
dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -A n -t x1
# Many small requests, one kick each: with ioeventfds they cost no userspace MMIO exit.
# The host samples KVM's MMIO exit counter at each marker (while the VM is alive).
echo RNG-START; sleep 1
dd if=/dev/hwrng of=/dev/null bs=4096 count=256 2>/dev/null
echo RNG-DONE; sleep 1
grep -E 'virtio|MSI|IO-APIC +1[6-9]|IO-APIC +2[0-3]' /proc/interrupts
echo "RNG_IRQS=$(grep -E 'virtio0(-input)?$' /proc/interrupts | awk '{print $2}')"
"#;

/// A case booting the stock kernel with `--rng` (a virtio-rng device on 00:01.0).
fn pci_case(name: &str, images: &std::path::Path, extra_cmdline: &str) -> Case {
    let script = format!(
        r#"set -e
cat > t.sh <<'GUEST_EOF'
{PCI_GUEST}
GUEST_EOF
mkinitrd_with_test t.sh initrd.img "$FILES/virtio-rng.ko"
set +e
"$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --cpus 1 --memory 256M --rng \
    --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh {extra_cmdline}" </dev/null >out.txt 2>&1 &
pid=$!
# KVM's userspace MMIO exit counter (debugfs, summed over live VMs) at a guest marker.
mmio_at() {{
    n=0
    while ! grep -q "^$1" out.txt && kill -0 $pid 2>/dev/null && [ $n -lt 1200 ]; do sleep 0.1; n=$((n + 1)); done
    cat /sys/kernel/debug/kvm/mmio_exits 2>/dev/null || echo -1
}}
m0=$(mmio_at RNG-START)
m1=$(mmio_at RNG-DONE)
wait $pid
echo "FERROVM_STATUS=$?"
cat out.txt
[ "$m0" -ge 0 ] && echo "KICK_MMIO_EXITS=$((m1 - m0))"
true
"#
    );
    Case::new(name, &script)
        .file(
            images.join("modules/kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio-rng.ko",
        )
        .timeout(Duration::from_secs(240))
}

/// Checks shared by the MSI-X and INTx cases. `isr_reads`: the driver reads the ISR register
/// (one userspace MMIO exit) per interrupt, as it does with INTx.
fn check_pci_common(o: &CaseOutput, isr_reads: bool) -> Result<(), String> {
    expect_status(o, 0)?;
    expect_output(o, "FERROVM-TEST-EXIT status=0")?;
    // The host bridge and the virtio device (modern ID 0x1044, revision 1).
    expect_output(o, "PCIDEV 0000:00:00.0 0x1b36 0x0008 0x060000")?;
    expect_output(o, "PCIDEV 0000:00:01.0 0x1af4 0x1044 0xff0000")?;
    // BAR 0 kept where ferrovm put it (inside the _CRS window).
    expect_output(
        o,
        "PCIRES 0000:00:01.0 0x00000000c0000000 0x00000000c0007fff",
    )?;
    expect_output(o, "MMCONFIG")?;
    // Driver bound, status ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK.
    expect_output(
        o,
        "device=0x0004 vendor=0x1af4 status=0x0000000f driver=virtio_rng",
    )?;
    expect_output(o, "RNG_CURRENT=virtio_rng.0")?;
    if value(o, "HWRNG_BYTES")? != 4096 {
        return Err("could not read 4096 bytes from /dev/hwrng".into());
    }
    if o.output.contains("INSMOD-FAILED") {
        return Err("insmod virtio-rng.ko failed".into());
    }
    // Thousands of kicks, (almost) no userspace MMIO exits: the notify addresses are ioeventfds.
    // (Only measurable where KVM debugfs is mounted: always in L1, maybe not on a host.)
    if o.mode == Mode::Nested {
        value(o, "KICK_MMIO_EXITS")?;
    }
    let irqs = value(o, "RNG_IRQS")?;
    if irqs < 4096 {
        return Err(format!(
            "only {irqs} virtio-rng interrupts for 1 MiB of entropy"
        ));
    }
    if let Ok(exits) = value(o, "KICK_MMIO_EXITS") {
        let allowed = if isr_reads { irqs } else { 0 } + irqs / 100;
        if exits > allowed {
            return Err(format!(
                "{exits} userspace MMIO exits during {irqs} requests: kicks are not ioeventfds"
            ));
        }
    }
    match value(o, "FERROVM_STATUS")? {
        0 => Ok(()),
        s => Err(format!("ferrovm exited {s}")),
    }
}

/// The line of /proc/interrupts naming `what`, with a non-zero count.
fn interrupt_line<'a>(o: &'a CaseOutput, what: &str) -> Result<&'a str, String> {
    let line = o
        .output
        .lines()
        .find(|l| l.contains(what) && l.contains(':'))
        .ok_or_else(|| format!("no /proc/interrupts line with {what}"))?;
    let count: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if count == 0 {
        return Err(format!("no interrupts counted: {line}"));
    }
    Ok(line)
}

fn pci_cases(images: &std::path::Path) -> Vec<Case> {
    vec![
        pci_case("pci_virtio_rng_msix", images, "").check(|o| {
            check_pci_common(o, false)?;
            let l = interrupt_line(o, "virtio0-input")?;
            if !l.contains("MSI") {
                return Err(format!("virtio0-input is not an MSI interrupt: {l}"));
            }
            expect_output(o, "virtio0-config")
        }),
        pci_case("pci_virtio_rng_intx_nomsi", images, "pci=nomsi").check(|o| {
            check_pci_common(o, true)?;
            let l = interrupt_line(o, "virtio0")?;
            if !l.contains("IO-APIC") || !l.contains("17-fasteoi") {
                return Err(format!("virtio0 is not on IOAPIC pin 17, level: {l}"));
            }
            Ok(())
        }),
    ]
}
// ---------------------------------------------------------------------------------------------
// End of the PCI block.
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let mut cases = vec![
        Case::new(
            "harness_kvm_selftest",
            r#"
set -e
echo "mode=$FERROVM_TEST_MODE"
ls -l /dev/kvm
if [ "$FERROVM_TEST_MODE" = nested ]; then
    grep ' /sys/kernel/debug debugfs ' /proc/mounts
    ls /sys/kernel/debug/kvm
fi
"$FERROVM" selftest
"#,
        )
        .timeout(Duration::from_secs(120))
        .check(|o| {
            expect_status(o, 0)?;
            expect_output(o, "selftest: ok")
        }),
        Case::new(
            "harness_timeout_fires",
            "echo sleeping-forever\nsleep 100000\necho woke-up\n",
        )
        .timeout(Duration::from_secs(5))
        .expect_timeout()
        .check(|o| {
            expect_output(o, "sleeping-forever")?;
            if o.output.contains("woke-up") {
                return Err("the script was not killed".into());
            }
            Ok(())
        }),
        // Runs after harness_timeout_fires: passing proves the harness continues after a timeout.
        Case::new("harness_exit_status", "echo about-to-exit-7\nexit 7\n")
            .timeout(Duration::from_secs(30))
            .check(|o| {
                expect_status(o, 7)?;
                expect_output(o, "about-to-exit-7")
            }),
        Case::new(
            "harness_mkinitrd_helper",
            r#"
set -e
printf 'echo hello from test.sh\n' > t.sh
echo extra > extra.txt
mkinitrd_with_test t.sh initrd.img extra.txt
base=$(( ($(wc -c < "$IMAGES/initramfs.cpio.gz") + 3) / 4 * 4 ))
tail -c +$((base + 1)) initrd.img | "$BUSYBOX" cpio -t
"#,
        )
        .timeout(Duration::from_secs(60))
        .check(|o| {
            expect_status(o, 0)?;
            expect_output(o, "test.sh")?;
            expect_output(o, "extra.txt")
        }),
    ];
    cases.extend(linux_boot_cases());
    let mut cfg = Config::from_env();
    // FERROVM_TEST_REPEAT=N runs the PCI, disk and network cases N times in the one L1 boot
    // (names suffixed .r2, .r3, ...): the soak loop for races, e.g. with the other core loaded.
    let repeat = std::env::var("FERROVM_TEST_REPEAT")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    for round in 1..=repeat {
        let mut device_cases = pci_cases(&cfg.images);
        device_cases.extend(cases::blk::cases());
        device_cases.extend(cases::img::cases());
        device_cases.extend(cases::net::cases());
        device_cases.extend(cases::fs::cases());
        device_cases.extend(cases::vsock::cases());
        device_cases.extend(cases::run::cases());
        device_cases.extend(cases::iommu::cases());
        device_cases.extend(cases::fw::cases());
        device_cases.extend(cases::exits::cases());
        if round > 1 {
            for c in &mut device_cases {
                c.name = format!("{}.r{round}", c.name);
            }
        }
        cases.extend(device_cases);
    }
    // Soak and crash runs (sized by FERROVM_SOAK_BOOTS / FERROVM_SOAK_KILLS), not repeated.
    cases.extend(cases::soak::cases());
    cfg.l1_extra.extend(extra_l1_files());
    cfg.l1_extra.extend(cases::fw::l1_files(&cfg.images));
    cfg.l1_extra
        .extend(harness::command_run_modules(&cfg.images));
    cfg.l1_disks.extend(cases::fw::l1_disk(&cfg.images));
    // Disk cases copy the root image and check it with e2fsprogs (and image formats with
    // qemu-img); network cases make a namespace with a TAP (iproute2, the tun module).
    cfg.rootfs_in_initrd = true;
    cfg.l1_programs.extend(
        [
            "/usr/sbin/e2fsck",
            "/usr/sbin/debugfs",
            "/usr/sbin/ip",
            "/usr/bin/qemu-img",
            "/usr/bin/passt",
            "/usr/bin/passt.avx2",
            "/usr/local/bin/virtiofsd",
            "/usr/bin/socat",
        ]
        .iter()
        .map(PathBuf::from),
    );
    cfg.l1_modules.extend(["tun".into(), "dummy".into()]);
    harness::run_with(cases, cfg)
}
