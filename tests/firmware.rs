//! Fast tier: firmware/ guest programs run by the real `ferrovm` binary directly on /dev/kvm.
//!
//! These need /dev/kvm (any backend, even a software one) but no Linux image. They cover the
//! boot path (ELF load, long-mode entry, zero page, ACPI RSDP), the exit dispatch, the serial
//! port, power-off/reboot/panic/crash statuses, and the command-line error paths.
//! None of these programs touches the bench device (ports 0x700.., MMIO 0xe100_0000), so no
//! run here passes `--bench-device`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FERROVM: &str = env!("CARGO_BIN_EXE_ferrovm");

/// A scratch directory unique to one test.
fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrovm-fw-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes firmware program `name` to `dir` and returns its path.
fn firmware(dir: &Path, name: &str) -> PathBuf {
    let bytes = ferrovm::firmware::get(name).unwrap_or_else(|| panic!("no firmware {name}"));
    let p = dir.join(format!("{name}.elf"));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn ferrovm(args: &[&str]) -> Output {
    support::output(Command::new(FERROVM).args(args)).expect("run ferrovm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn run_fw(name: &str, extra: &[&str]) -> Output {
    let dir = scratch(&format!(
        "{name}-{}",
        extra.join("_").replace(['/', '='], "_")
    ));
    let fw = firmware(&dir, name);
    let mut args = vec!["run", "--kernel", fw.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = ferrovm(&args);
    let _ = std::fs::remove_dir_all(&dir);
    o
}

#[test]
fn selftest_subcommand_passes() {
    let o = ferrovm(&["selftest"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("selftest: ok"));
}

#[test]
fn hello_prints_on_com1_and_powers_off() {
    let o = run_fw("hello", &[]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "Hello from ferrovm firmware\n");
}

#[test]
fn serial_to_file_and_off() {
    let dir = scratch("serial-file");
    let fw = firmware(&dir, "hello");
    let log = dir.join("console.log");
    let serial = format!("file={}", log.display());
    let o = ferrovm(&["run", "--kernel", fw.to_str().unwrap(), "--serial", &serial]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "Hello from ferrovm firmware\n"
    );
    let o = ferrovm(&["run", "--kernel", fw.to_str().unwrap(), "--serial", "off"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The 64-bit boot protocol's entry state, read back by the guest itself.
#[test]
fn boot_protocol_register_state() {
    let o = run_fw("bootregs", &["--cmdline", "console=ttyS0 x=y"]);
    assert_eq!(o.status.code(), Some((0x21 << 1) | 1), "{}", stderr(&o));
    let out = stdout(&o);
    let get = |k: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in output:\n{out}"));
        u64::from_str_radix(&line[k.len() + 1..], 16).unwrap()
    };
    assert_eq!(get("rsi"), 0x7000, "RSI = zero page");
    assert_eq!(get("rsp"), 0x8ff0);
    assert_eq!(get("rflags") & 0x200, 0, "interrupts disabled at entry");
    assert_eq!(get("cs"), 0x10, "__BOOT_CS");
    assert_eq!(get("cr0") & 0x8000_0001, 0x8000_0001, "PE and PG");
    assert_eq!(get("cr3"), 0x9000);
    assert_ne!(get("cr4") & 0x20, 0, "PAE");
    assert_eq!(get("efer") & 0x500, 0x500, "LME and LMA");
    assert_eq!(get("boot_flag"), 0xaa55);
    assert!(get("e820_entries") >= 3);
    assert_eq!(get("cmd_line_ptr"), 0x20000);
    assert_eq!(get("acpi_rsdp_addr"), 0xe0000);
    assert_eq!(get("rsdp_signature").to_le_bytes(), *b"RSD PTR ");
}

/// What ferrovm must print on stderr when a run ends.
#[derive(Clone, Copy, Debug)]
enum Says {
    /// Nothing at all: power-off and isa-debug-exit end a run silently.
    Nothing,
    /// A line containing this (non-empty) text.
    Line(&'static str),
}

impl Says {
    fn check(self, stderr: &str) -> Result<(), String> {
        match self {
            Says::Nothing if stderr.is_empty() => Ok(()),
            Says::Nothing => Err(format!("expected no stderr, got: {stderr}")),
            Says::Line(text) => {
                // An empty expectation would match any output.
                assert!(!text.trim().is_empty(), "empty expected text");
                if stderr.lines().any(|l| l.contains(text)) {
                    Ok(())
                } else {
                    Err(format!("expected {text:?} in: {stderr}"))
                }
            }
        }
    }
}

#[test]
fn guest_actions_map_to_documented_statuses() {
    let cases: &[(&str, i32, Says)] = &[
        ("poweroff", 0, Says::Nothing),
        ("reboot", 0, Says::Line("ferrovm: guest rebooted")),
        ("panic", 4, Says::Line("ferrovm: guest kernel panic")),
        ("triple", 3, Says::Line("ferrovm: guest crashed")),
        ("exit=3", 7, Says::Nothing),
        ("exit=0", 1, Says::Nothing),
        ("bogus", 0xff, Says::Nothing),
    ];
    for &(action, status, says) in cases {
        let o = run_fw("cmdline", &["--cmdline", action]);
        assert_eq!(
            o.status.code(),
            Some(status),
            "action {action}: stdout {} stderr {}",
            stdout(&o),
            stderr(&o)
        );
        assert!(stdout(&o).contains(&format!("cmdline: {action}")));
        if let Err(e) = says.check(&stderr(&o)) {
            panic!("action {action}: {e}");
        }
    }
    // The firmware's own word for an action it does not know.
    assert!(stdout(&run_fw("cmdline", &["--cmdline", "bogus"])).contains("unknown action"));
}

#[test]
fn unclaimed_ports_and_mmio_read_as_ones_and_do_not_stop_the_guest() {
    let o = run_fw("cmdline", &["--cmdline", "ports"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("ports: done"));
}

#[test]
fn smp_and_large_memory_start() {
    // 4 vCPUs (APs wait for INIT/SIPI) and 64 GiB of lazily mapped RAM on a smaller host.
    let o = run_fw("hello", &["--cpus", "4", "--memory", "64G"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("Hello"));
}

/// Each bad input gets one clear line on stderr and status 1 (2 for syntax errors), no panic.
#[test]
fn bad_input_gets_one_line_errors() {
    let dir = scratch("bad-input");
    let fw = firmware(&dir, "hello");
    let fw = fw.to_str().unwrap();
    let text = dir.join("notes.txt");
    std::fs::write(&text, "this is not a kernel\n").unwrap();
    // A bzImage header that announces 64 KiB of payload in a 4 KiB file.
    let mut bz = vec![0u8; 4096];
    bz[0x1f1] = 1; // setup_sects
    bz[0x1f4..0x1f8].copy_from_slice(&0x1000u32.to_le_bytes()); // syssize (16-byte units)
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x236] = 1; // XLF_KERNEL_64
    let truncated = dir.join("bzImage-truncated");
    std::fs::write(&truncated, &bz).unwrap();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/bzImage"],
            "cannot open kernel /nonexistent/bzImage",
        ),
        (
            vec!["--kernel", text.to_str().unwrap()],
            "neither a bzImage nor an ELF",
        ),
        (
            vec!["--kernel", truncated.to_str().unwrap()],
            "is truncated",
        ),
        (
            vec!["--kernel", fw, "--initramfs", "/nonexistent/initrd"],
            "cannot read initramfs /nonexistent/initrd",
        ),
        (vec!["--kernel", fw, "--memory", "0"], "too small"),
        (vec!["--kernel", fw, "--memory", "2T"], "too large"),
        (
            vec!["--kernel", fw, "--memory", "lots"],
            "invalid memory size",
        ),
        (
            vec!["--kernel", fw, "--cpus", "0"],
            "--cpus 0 is out of range",
        ),
        (
            vec!["--kernel", fw, "--cpus", "10000"],
            "--cpus 10000 is out of range",
        ),
        (vec!["--kernel", fw, "--serial", "tty"], "invalid --serial"),
    ];
    for (extra, msg) in cases {
        let mut args = vec!["run"];
        args.extend(extra.iter());
        let o = ferrovm(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: expected '{msg}' in: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(!err.contains("panicked"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_permission_on_dev_kvm_is_a_clear_error() {
    // As an unprivileged user (nobody), /dev/kvm (mode 0600 root, or 0660 group kvm) is closed.
    let dir = scratch("noperm");
    let fw = firmware(&dir, "hello");
    let mut perms = std::fs::metadata(&dir).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&dir, perms).unwrap();
    let o = support::output(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                FERROVM,
                "run",
                "--kernel",
            ])
            .arg(&fw),
    )
    .expect("setpriv (util-linux) is needed for this test");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TAP device made for one test, removed when dropped.
struct TestTap(String);

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// Unprivileged operation (issue 13): an ordinary user in the `kvm` group (setup-host's
/// `ferrovm-test`) runs a VM with a NIC on a TAP that root made for it beforehand, with the
/// seccomp filters on; nothing of ferrovm runs as root.
#[test]
fn an_ordinary_user_in_the_kvm_group_runs_a_vm_on_a_precreated_tap() {
    let user = "ferrovm-test";
    let known = Command::new("id")
        .arg(user)
        .output()
        .is_ok_and(|o| o.status.success());
    // SAFETY: geteuid has no preconditions.
    if !known || unsafe { libc::geteuid() } != 0 {
        println!(
            "SKIPPED: an_ordinary_user_in_the_kvm_group_runs_a_vm_on_a_precreated_tap: \
             needs root and the {user} user (scripts/setup-host makes it)"
        );
        return;
    }
    let dir = scratch("unprivileged");
    let fw = firmware(&dir, "hello");
    let mut perms = std::fs::metadata(&dir).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&dir, perms).unwrap();
    let tap = TestTap(format!("fvt{}", std::process::id() % 100_000));
    let made = Command::new("ip")
        .args(["tuntap", "add", "dev", &tap.0, "mode", "tap", "user", user])
        .output()
        .expect("ip (iproute2) is needed for this test");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let o = support::output(
        Command::new("setpriv")
            .args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--init-groups",
            ])
            .args([
                FERROVM,
                "run",
                "--seccomp",
                "on",
                "--net",
                &format!("tap={}", tap.0),
            ])
            .arg("--kernel")
            .arg(&fw),
    )
    .expect("setpriv (util-linux) is needed for this test");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("Hello from ferrovm firmware"));
    // The same user without the kvm group is refused with one line.
    let o = support::output(
        Command::new("setpriv")
            .args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--clear-groups",
            ])
            .args([FERROVM, "run", "--kernel"])
            .arg(&fw),
    )
    .unwrap();
    assert!(
        stderr(&o).contains("cannot open /dev/kvm"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_errors_exit_2() {
    let o = ferrovm(&["run"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--kernel"));
}

/// A multiboot v1 kernel (as QEMU's hypervisor test kernels are) reads fw_cfg and chooses
/// ferrovm's exit status through isa-debug-exit: (code << 1) | 1. Its command line is the
/// kernel's path, a space and `--cmdline` (which may start with a dash), as QEMU gives it.
#[test]
fn multiboot_kernel_with_fw_cfg_and_debug_exit() {
    let dir = scratch("multiboot");
    let fw = firmware(&dir, "multiboot");
    let path = fw.to_str().unwrap();
    for (code, cpus, args) in [(5, "2", "exit=5 from-test"), (3, "1", "-dash exit=3")] {
        let o = ferrovm(&[
            "run",
            "--kernel",
            path,
            "--cmdline",
            args,
            "--cpus",
            cpus,
            "--memory",
            "64M",
        ]);
        assert_eq!(o.status.code(), Some((code << 1) | 1), "{}", stderr(&o));
        assert_eq!(
            stdout(&o),
            format!("multiboot: ok cpus={cpus} mem_upper_mib=0063 cmdline={path} {args}\n")
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A multiboot ELF loaded below 1 MiB, over the pages where a 64-bit entry's page tables go
/// (kvm-unit-tests' realmode.flat sits at 0x8000): it finds its data and bss intact.
#[test]
fn multiboot_kernel_below_1mib_loads_intact() {
    let o = run_fw("multiboot_low", &["--memory", "32M"]);
    assert_eq!(o.status.code(), Some(0x21 << 1 | 1), "{}", stderr(&o));
    assert_eq!(stdout(&o), "multiboot_low: ok\n");
}

/// ACPI S3 as kvm-unit-tests' s3 does it: the suspend stops the vCPU at once, the RTC alarm
/// wakes the VM, and the guest resumes in real mode at the FACS waking vector with RAM intact
/// and PM1_STS.WAK_STS set (the stub's exit value is what the guest stored before sleeping).
#[test]
fn s3_suspends_and_wakes_at_the_facs_vector_on_the_rtc_alarm() {
    let o = run_fw("s3", &["--memory", "64M", "--cpus", "2"]);
    assert_eq!(o.status.code(), Some(0x2a << 1 | 1), "{}", stderr(&o));
    assert_eq!(stdout(&o), "s3: suspending\ns3: resumed\n");
}

/// `--cpu` in QEMU's spelling: -x2apic clears the bit the guest sees, a feature KVM never
/// offers (pbe) and an unknown model are one-line errors.
#[test]
fn cpu_features_can_be_removed_and_unbackable_ones_are_refused() {
    let ecx = |extra: &[&str]| {
        let o = run_fw("cpuid", extra);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        let hex = out
            .split("ecx=")
            .nth(1)
            .and_then(|s| s.get(..16))
            .unwrap_or("");
        u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("{out}"))
    };
    const X2APIC: u64 = 1 << 21;
    assert_ne!(ecx(&[]) & X2APIC, 0, "ferrovm offers x2apic by default");
    assert_eq!(ecx(&["--cpu", "host,-x2apic"]) & X2APIC, 0);
    assert_ne!(
        ecx(&["--cpu", "max,-x2apic,x2apic=on"]) & X2APIC,
        0,
        "last wins"
    );
    for (arg, msg) in [
        ("host,+pbe", "feature 'pbe' is not available"),
        ("qemu64", "unknown CPU model 'qemu64'"),
        ("host,+warp", "unknown CPU feature 'warp'"),
    ] {
        let o = run_fw("cpuid", &["--cpu", arg]);
        assert_eq!(o.status.code(), Some(1), "{arg}");
        let err = stderr(&o);
        assert!(
            err.contains(msg) && err.trim_end().lines().count() == 1,
            "{arg}: {err}"
        );
    }
}

/// QEMU's pc-testdev only with --test-devices: string I/O reaches it one element at a time
/// (the last byte of `rep outsb` is what reads back), and its MMIO window stores data.
#[test]
fn pc_testdev_only_when_asked_for() {
    let with = run_fw("testdev", &["--test-devices"]);
    assert_eq!(with.status.code(), Some(0), "{}", stderr(&with));
    assert_eq!(
        stdout(&with),
        "testdev port=000000000000007a mem=000000005eed1234\n"
    );
    let without = run_fw("testdev", &[]);
    assert_eq!(without.status.code(), Some(0), "{}", stderr(&without));
    assert_eq!(
        stdout(&without),
        "testdev port=00000000000000ff mem=00000000ffffffff\n"
    );
}

/// QEMU's pci-testdev only with --test-devices, driven as kvm-unit-tests drives it: writes
/// at an eventfd test's offset are taken by a KVM ioeventfd (the device counts none), the
/// no-eventfd tests' writes reach the device (16 counted), for the MMIO and the port BAR.
#[test]
fn pci_testdev_notify_writes_go_to_ioeventfds() {
    let with = run_fw("pci_testdev", &["--test-devices"]);
    assert_eq!(with.status.code(), Some(0), "{}", stderr(&with));
    let mut want = String::new();
    for kind in ["mmio", "portio"] {
        for (test, count) in [
            ("no-eventfd", 16),
            ("wildcard-eventfd", 0),
            ("datamatch-eventfd", 0),
        ] {
            want += &format!("{kind}-{test} count={count:016x}\n");
        }
    }
    assert_eq!(stdout(&with), want);
    let without = run_fw("pci_testdev", &[]);
    assert_eq!(without.status.code(), Some(0), "{}", stderr(&without));
    assert_eq!(stdout(&without), "pci-testdev absent\n");
}

/// A multiboot kernel finds the PICs as a BIOS leaves them: ISA line 11 (pulsed through
/// pc-testdev) arrives at vector 0x73 and wakes a `sti; hlt` (realmode.flat's sti_inhibit).
#[test]
fn multiboot_kernel_finds_the_pics_programmed_as_a_bios_leaves_them() {
    let o = run_fw("multiboot_pic", &["--test-devices", "--memory", "32M"]);
    assert_eq!(o.status.code(), Some(0x31 << 1 | 1), "{}", stderr(&o));
}

#[test]
fn missing_dev_kvm_is_a_clear_error() {
    // A private mount namespace with an empty /dev: /dev/kvm does not exist there.
    let dir = scratch("nokvm");
    let fw = firmware(&dir, "hello");
    let script = format!(
        "mount -t tmpfs none /dev && exec {FERROVM} run --kernel {}",
        fw.display()
    );
    let o = support::output(Command::new("unshare").args(["--mount", "sh", "-c", &script]))
        .expect("unshare (util-linux) is needed for this test");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
    assert!(err.contains("No such file"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// seccomp (issue 13): a vCPU thread that makes a system call outside its filter stops
/// ferrovm at once with one line naming the call and the thread (status 5); `log` lets it
/// through (the kernel logs it) and `off` has no filter, so the guest goes on and powers off.
#[test]
fn a_forbidden_system_call_stops_ferrovm_with_one_line() {
    let o = run_fw("seccomp", &["--bench-device"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert_eq!(
        err.trim_end(),
        "ferrovm: seccomp: thread 'vcpu0' made a system call it may not make: getppid (110); \
         stopping (--seccomp log lets it through and logs it)"
    );
    assert!(!stdout(&o).contains("came back"));
    for mode in ["log", "off"] {
        let o = run_fw("seccomp", &["--bench-device", "--seccomp", mode]);
        assert_eq!(o.status.code(), Some(0), "{mode}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("seccomp: the probe came back"),
            "{mode}"
        );
    }
}

/// `--iommu` (VT-d on a split irqchip) with edu from `--test-devices`: DMA through a
/// second-level page table, a recorded fault for an unmapped IOVA, invalidation wait, MSI and
/// IOAPIC interrupts in remappable format, and an MSI whose IRTE names another source
/// blocked (firmware/iommu.S says what each step checks; status (step << 1) | 1 on failure).
#[test]
fn iommu_remaps_edu_dma_and_interrupts() {
    let o = run_fw("iommu", &["--iommu", "--test-devices", "--memory", "64M"]);
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {out}\nstderr: {}",
        stderr(&o)
    );
    for line in [
        "vtd: DMA through IOVA 0 ok",
        "vtd: unmapped IOVA faulted, reason ",
        "vtd: invalidation wait ok",
        "vtd: remapped MSI ok",
        "vtd: remapped IOAPIC interrupt ok",
        "vtd: MSI from the wrong source blocked",
    ] {
        assert!(out.contains(line), "missing {line:?} in {out}");
    }
}

/// Without `--iommu` the unit is absent (nothing decodes at 0xfed90000), the DMAR table is not
/// there, and `--iommu` with firmware is refused in one line.
#[test]
fn iommu_is_absent_unless_asked_for_and_needs_a_kernel() {
    let o = run_fw("iommu", &["--test-devices", "--memory", "64M"]);
    assert_eq!(o.status.code(), Some(2 << 1 | 1), "{}", stdout(&o));
    assert!(stdout(&o).contains("FAILED at step 0000000000000002"));
    let o = ferrovm(&["run", "--firmware", "bios", "--iommu"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--iommu"), "{}", stderr(&o));
}
