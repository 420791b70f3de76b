//! Fast tier, firmware boots (issue 10): Debian's SeaBIOS run by the real `ferrovm` binary
//! directly on /dev/kvm. SeaBIOS and GRUB are small enough for this host's software KVM
//! (Linux is not: the kernel those menus boot is tested in the nested tier). Needs the
//! `seabios` package (scripts/setup-host installs it); without it the tests say SKIPPED.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const FERROVM: &str = env!("CARGO_BIN_EXE_ferrovm");
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrovm-fwboot-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ferrovm(args: &[&str]) -> Output {
    support::output(Command::new(FERROVM).args(args)).expect("run ferrovm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn have_seabios(test: &str) -> bool {
    if Path::new(SEABIOS).is_file() {
        return true;
    }
    println!("SKIPPED: {test}: {SEABIOS} not found (apt-get install seabios)");
    false
}

fn empty_disk(dir: &Path) -> PathBuf {
    let p = dir.join("empty.img");
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

/// SeaBIOS runs its whole POST on ferrovm's i440FX platform, finds the virtio disk empty,
/// says "No bootable device." on the serial console, waits and resets: ferrovm exits 6.
/// Its debug log shows the platform it recognised and nothing it missed.
#[test]
fn seabios_posts_and_reports_no_bootable_device() {
    if !have_seabios("seabios_posts_and_reports_no_bootable_device") {
        return;
    }
    let dir = scratch("nodev");
    let disk = empty_disk(&dir);
    let log = dir.join("fw.log");
    let o = ferrovm(&[
        "run",
        "--firmware",
        "bios",
        "--firmware-log",
        log.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
        "--cpus",
        "2",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(6), "{err}");
    assert!(err.contains("no bootable device"), "{err}");
    let console = String::from_utf8_lossy(&o.stdout);
    assert!(console.contains("No bootable device."), "{console}");
    let fw = std::fs::read_to_string(&log).unwrap();
    for want in [
        "Running on QEMU (i440fx)",
        "QEMU fw_cfg DMA interface supported",
        "qemu/e820: addr 0x0000000000000000 len 0x0000000020000000 [RAM]",
        "1: /pci@i0cf8/scsi@2",
        "Found 2 cpu(s) max supported 2 cpu(s)",
        "PCI: init bdf=00:01.3 id=8086:7113",
        "via xsdt",
        "found virtio-blk at 00:02.0",
        "sercon: using ioport 0x3f8",
        "Boot failed: not a bootable disk",
    ] {
        assert!(fw.contains(want), "firmware log lacks {want:?}:\n{fw}");
    }
    assert!(fw.contains("PS2 keyboard initialized"), "{fw}");
    // What SeaBIOS complains about, except the failed boot this test asks for.
    let left: Vec<String> = complaints(&fw)
        .into_iter()
        .filter(|l| !l.starts_with("Boot failed"))
        .collect();
    assert!(left.is_empty(), "{left:#?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The lines of a SeaBIOS log that complain, with numbers blanked (addresses differ).
fn complaints(log: &str) -> std::collections::BTreeSet<String> {
    log.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            [
                "warning",
                "not found",
                "unsupported",
                "unable",
                "error",
                "fail",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .map(|l| {
            l.chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect()
        })
        .collect()
}

/// Same run, same SeaBIOS, same empty virtio disk: QEMU's `-M pc` (TCG here) and ferrovm.
/// Every complaint in ferrovm's firmware log must also be in QEMU's.
#[test]
fn seabios_complains_about_nothing_qemu_does_not() {
    let name = "seabios_complains_about_nothing_qemu_does_not";
    if !have_seabios(name) {
        return;
    }
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        println!("SKIPPED: {name}: {qemu} not found (apt-get install qemu-system-x86)");
        return;
    }
    let dir = scratch("vsqemu");
    let disk = empty_disk(&dir);
    let (qlog, flog) = (dir.join("qemu.log"), dir.join("ferrovm.log"));
    let q = support::output(Command::new(qemu).args([
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "512M",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-boot",
        "reboot-timeout=1000",
        "-bios",
        SEABIOS,
        "-drive",
        &format!("file={},if=none,id=d0,format=raw", disk.display()),
        "-device",
        "virtio-blk-pci,drive=d0,disable-legacy=on",
        "-debugcon",
        &format!("file:{}", qlog.display()),
        "-global",
        "isa-debugcon.iobase=0x402",
        "-serial",
        "null",
        "-monitor",
        "none",
    ]))
    .expect("run qemu");
    assert!(q.status.success(), "qemu: {}", stderr(&q));
    let f = ferrovm(&[
        "run",
        "--firmware",
        "bios",
        "--serial",
        "off",
        "--firmware-log",
        flog.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    assert_eq!(f.status.code(), Some(6), "{}", stderr(&f));
    let qlog = std::fs::read_to_string(&qlog).unwrap();
    assert!(
        qlog.contains("No bootable device"),
        "QEMU's SeaBIOS did not finish:\n{qlog}"
    );
    let theirs = complaints(&qlog);
    let ours: Vec<String> = complaints(&std::fs::read_to_string(&flog).unwrap())
        .into_iter()
        .filter(|l| !theirs.contains(l))
        .collect();
    assert!(
        ours.is_empty(),
        "only under ferrovm: {ours:#?}\nQEMU's: {theirs:#?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Images that are not PC firmware, and a missing one, get one line and status 1.
#[test]
fn bad_firmware_images_get_one_line_errors() {
    let dir = scratch("bad");
    let disk = empty_disk(&dir);
    let disk_arg = format!("path={}", disk.display());
    let random = dir.join("random.bin");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..128 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // No jump opcode at the reset vector, whatever the generator gives.
            match x as u8 {
                0xe9..=0xeb | 0x66 | 0x90 => 0,
                b => b,
            }
        })
        .collect();
    std::fs::write(&random, bytes).unwrap();
    let short = dir.join("short.bin");
    std::fs::write(&short, [0xea; 1000]).unwrap();
    for (path, want) in [
        (
            random.to_str().unwrap(),
            "does not look like a PC firmware image",
        ),
        (short.to_str().unwrap(), "is 1000 bytes"),
        (
            "/nonexistent/fw.bin",
            "cannot read firmware image /nonexistent/fw.bin",
        ),
    ] {
        let o = ferrovm(&["run", "--firmware", path, "--disk", &disk_arg]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{path}: {err}");
        assert!(err.contains(want), "{path}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    let o = ferrovm(&["run", "--kernel", "/x", "--firmware", "bios"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = ferrovm(&["run", "--firmware-log", "/tmp/x", "--kernel", "/x"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--firmware-log needs a firmware boot"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs ferrovm with `args` until GRUB's menu is on the console (SeaBIOS's banner before
/// it), then stops it. Returns the console, or None with it when no menu came within 240 s.
fn grub_menu(args: &[String]) -> Result<String, String> {
    let mut child = Command::new(FERROVM)
        .arg("run")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferrovm");
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut console = Vec::new();
    let found = loop {
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(200)) {
            console.extend_from_slice(&b);
        }
        let text = String::from_utf8_lossy(&console);
        if text.contains("check and power off") && text.contains("SeaBIOS (version") {
            break true;
        }
        if start.elapsed() > Duration::from_secs(240) {
            break false;
        }
    };
    // A key stops GRUB's countdown (the entry behind it would start Linux).
    let _ = child.stdin.as_mut().unwrap().write_all(b"\x1b");
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&console).into_owned();
    if found {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The GRUB ISO guest-images/build-iso.sh makes, or None (SKIPPED printed).
fn boot_iso(name: &str) -> Option<PathBuf> {
    if !have_seabios(name) {
        return None;
    }
    let iso = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-images/out/default/boot.iso");
    if !iso.is_file() {
        println!(
            "SKIPPED: {name}: {} missing (guest-images/build-iso.sh)",
            iso.display()
        );
        return None;
    }
    Some(iso)
}

/// SeaBIOS boots GRUB from the hybrid ISO on a read-only virtio disk (the default firmware
/// when only a disk is given), and GRUB's menu reaches the serial console. (The kernel
/// behind it needs real KVM: nested tier.)
#[test]
fn seabios_boots_grub_from_the_iso() {
    let Some(iso) = boot_iso("seabios_boots_grub_from_the_iso") else {
        return;
    };
    let console = grub_menu(&[
        "--disk".into(),
        format!("path={},readonly=on", iso.display()),
    ])
    .unwrap_or_else(|c| panic!("no GRUB menu:\n{c}"));
    assert!(console.contains("Booting from Hard Disk"), "{console}");
}

/// SeaBIOS boots the same ISO as a CD (El Torito from the virtio-scsi CD-ROM, `--cdrom`):
/// it finds the drive, boots "DVD/CD", and GRUB reads its menu from the CD.
#[test]
fn seabios_boots_grub_from_a_cdrom() {
    let Some(iso) = boot_iso("seabios_boots_grub_from_a_cdrom") else {
        return;
    };
    let console = grub_menu(&["--cdrom".into(), iso.display().to_string()])
        .unwrap_or_else(|c| panic!("no GRUB menu:\n{c}"));
    assert!(console.contains("Booting from DVD/CD"), "{console}");
    assert!(!console.contains("Booting from Hard Disk"), "{console}");
}
