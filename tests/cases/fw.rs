//! Firmware boots under a real guest (issue 10): Debian's SeaBIOS boots the GRUB ISO
//! (guest-images/build-iso.sh) from a read-only virtio disk (the hybrid ISO's MBR) and from
//! a virtio-scsi CD-ROM (El Torito; the guest then mounts /dev/sr0), the case picks the menu entry
//! by typing its hotkey on the serial console, and the stock kernel prints what it sees
//! (RAM, CPUs, disks) and powers off. SeaBIOS also boots the installed Debian system
//! (guest-images/build-disk.sh, an L1 disk, through a throwaway overlay) to systemd's login
//! prompt; the case logs in as root and powers off. A disk without a boot loader ends with SeaBIOS's
//! "No bootable device." and ferrovm's status 6.
//!
//! No OVMF case: QEMU 7.2's TCG, which runs L1 here, aborts (`tcg_handle_interrupt:
//! assertion failed: (qemu_mutex_iothread_locked())`) while an L2 runs OVMF, whether
//! ferrovm or QEMU runs it in L1 (tried with `cargo bench --bench fwboot`), and the abort
//! takes the whole L1 with it.

use std::path::Path;
use std::time::Duration;

use super::status;
use crate::harness::{expect_output, Case, CaseOutput};
use crate::value;

/// Where the ISO and SeaBIOS are in L1 (see [`l1_files`]).
const PRELUDE: &str = r#"set -e
trap 'rm -f in.fifo empty.img' EXIT
# boot KEY FERROVM_ARGS...: runs ferrovm with the console on a FIFO, types KEY once GRUB's
# menu is on the console, waits for ferrovm to end. Prints the console, the firmware log's
# warning lines (FWLOG:) and FERROVM_STATUS=.
boot() {
    key=$1; shift
    rm -f in.fifo; mkfifo in.fifo
    "$FERROVM" run --firmware-log fw.log "$@" <in.fifo >out.log 2>&1 &
    pid=$!
    exec 3>in.fifo
    i=0
    while [ -n "$key" ] && ! grep -q "check and power off" out.log; do
        kill -0 $pid 2>/dev/null || { echo "FERROVM_ENDED_BEFORE_MENU"; key=; break; }
        i=$((i + 1))
        if [ $i -gt 400 ]; then echo "NO_GRUB_MENU"; kill -USR1 $pid; sleep 1; kill $pid || true; break; fi
        sleep 0.5
    done
    [ -n "$key" ] && { echo "MENU_AFTER_HALF_SECONDS=$i"; printf "$key" >&3; }
    # A VM that does not end: its exit statistics and console tail, then stop it.
    i=0
    while kill -0 $pid 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt ${VM_WAIT:-500} ]; then
            echo "VM_DID_NOT_END"; kill -USR1 $pid; sleep 2; kill $pid
            tail -c 4000 out.log | tr -d '\033\r' | sed 's/^/TAIL: /'
            break
        fi
        sleep 0.5
    done
    set +e
    wait $pid
    echo "FERROVM_STATUS=$?"
    set -e
    exec 3>&-
    grep -a -E 'FERROVM-|FW-CHECK|No bootable|Booting from|ferrovm:' out.log | tr -d '\033\r' | sed 's/^/L2: /'
    grep -a -i -E 'warning|not found|unsupported|fail' fw.log | sed 's/^/FWLOG: /' || true
}
"#;

fn case(name: &str, body: &str) -> Case {
    Case::new(name, &format!("{PRELUDE}{body}")).timeout(Duration::from_secs(360))
}

/// The guest's FW-CHECK line field `key` (`key=value`).
fn check_field<'a>(o: &'a CaseOutput, key: &str) -> Result<&'a str, String> {
    let line = o
        .output
        .lines()
        .find(|l| l.contains("FW-CHECK "))
        .ok_or("no FW-CHECK line from the guest")?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .ok_or_else(|| format!("FW-CHECK has no {key}="))
}

/// The guest booted through SeaBIOS and GRUB with `cpus` CPUs and about `mem_mib` of RAM.
fn booted(o: &CaseOutput, cpus: u32, mem_mib: u64) -> Result<(), String> {
    expect_output(o, "FERROVM-BOOT-OK")?;
    expect_output(o, "FERROVM-TEST-EXIT status=0")?;
    status(o, "FERROVM_STATUS", 0)?;
    let got: u32 = check_field(o, "cpus")?
        .parse()
        .map_err(|e| format!("cpus: {e}"))?;
    if got != cpus {
        return Err(format!("guest sees {got} CPUs, expected {cpus}"));
    }
    let kb: u64 = check_field(o, "mem_kb")?
        .parse()
        .map_err(|e| format!("mem: {e}"))?;
    // MemTotal excludes the kernel and firmware reservations: within 15 %.
    if kb * 100 < mem_mib * 1024 * 85 || kb > mem_mib * 1024 {
        return Err(format!("guest sees {kb} KiB, expected about {mem_mib} MiB"));
    }
    if !check_field(o, "disks")?.contains("vda") {
        return Err("guest sees no vda".into());
    }
    let line = o
        .output
        .lines()
        .find(|l| l.contains("FW-CHECK "))
        .unwrap_or("");
    if !line.contains("ferrovm.test=/fw-check.sh") {
        return Err("GRUB did not boot the entry whose hotkey was typed".into());
    }
    if value(o, "MENU_AFTER_HALF_SECONDS").is_err() {
        return Err("GRUB's menu never appeared on the console".into());
    }
    Ok(())
}

pub fn cases() -> Vec<Case> {
    vec![
        case(
            "fw_seabios_iso_grub_1cpu",
            r#"boot p --firmware bios --disk path=/images/boot.iso,readonly=on --memory 512M"#,
        )
        .check(|o| booted(o, 1, 512)),
        case(
            "fw_seabios_cdrom_grub_2cpu_data_disk",
            r#"truncate -s 64M empty.img
echo "BZIMAGE_SHA=$(sha256sum /images/bzImage | cut -d' ' -f1)"
boot p --cdrom /images/boot.iso --disk path=empty.img --cpus 2 --memory 1G"#,
        )
        .check(|o| {
            booted(o, 2, 1024)?;
            // El Torito from the virtio-scsi CD-ROM, not the hybrid ISO's MBR.
            expect_output(o, "Booting from DVD/CD")?;
            if !check_field(o, "disks")?.contains("sr0") {
                return Err("guest sees no CD-ROM (sr0)".into());
            }
            // The ISO carries L1's /images/bzImage (guest-images/build-iso.sh).
            let want = o
                .output
                .lines()
                .find_map(|l| l.trim().strip_prefix("BZIMAGE_SHA="))
                .ok_or("no BZIMAGE_SHA= line")?;
            let got = check_field(o, "cd_sha")?;
            if got != want {
                return Err(format!(
                    "bzImage read from the mounted CD-ROM hashes to {got}, the ISO's is {want}"
                ));
            }
            Ok(())
        }),
        case(
            "fw_seabios_reboot_restart",
            r#"rm -f in.fifo; mkfifo in.fifo
"$FERROVM" run --reboot restart --disk path=/images/boot.iso,readonly=on <in.fifo >out.log 2>&1 &
pid=$!
exec 3>in.fifo
menus() { grep -a -o "check and power off" out.log | wc -l; }
wait_menus() {
    i=0
    while [ "$(menus)" -lt "$1" ]; do
        i=$((i + 1)); [ $i -gt 400 ] && { echo "NO_MENU_$1"; kill $pid; return; }
        sleep 0.5
    done
    echo "MENU_$1_SEEN"
}
wait_menus 1; printf r >&3
wait_menus 2; printf p >&3
set +e; wait $pid; echo "FERROVM_STATUS=$?"; set -e
exec 3>&-
echo "SEABIOS_BANNERS=$(grep -a -o 'SeaBIOS (version' out.log | wc -l)"
grep -a -E 'FERROVM-|FW-CHECK|ferrovm:' out.log | tr -d '\033\r' | sed 's/^/L2: /'"#,
        )
        .check(|o| {
            expect_output(o, "MENU_2_SEEN")?;
            expect_output(o, "restarting the VM")?;
            expect_output(o, "FERROVM-TEST-EXIT status=0")?;
            status(o, "FERROVM_STATUS", 0)?;
            match value(o, "SEABIOS_BANNERS")? {
                n if n >= 2 => Ok(()),
                n => Err(format!(
                    "SeaBIOS ran {n} times, expected 2 (the restart goes through it)"
                )),
            }
        }),
        case(
            "fw_seabios_installed_debian_to_login",
            r#"disk=; for d in $FERROVM_L1_DISKS; do disk=$d; done
[ -b "$disk" ] || { echo "NO_DEBIAN_DISK (guest-images/build-disk.sh)"; exit 1; }
rm -f in.fifo; mkfifo in.fifo
# (L1 has no /var/tmp, where overlay=on puts its throwaway qcow2 by default.)
TMPDIR=/tmp "$FERROVM" run --disk path=$disk,overlay=on --cpus 2 --memory 1G <in.fifo >out.log 2>&1 &
pid=$!
exec 3>in.fifo
# (busybox sh has no $SECONDS: the case's clock is L1's uptime.)
t0=$(cut -d. -f1 /proc/uptime); now() { echo $(($(cut -d. -f1 /proc/uptime) - t0)); }
wait_for() { # wait_for TEXT SECONDS
    i=0
    while ! grep -a -q "$1" out.log; do
        i=$((i + 1)); [ $i -gt $(($2 * 2)) ] && { echo "TIMEOUT_WAITING $1 ($(now)s)"; return 1; }
        kill -0 $pid 2>/dev/null || { echo "EXITED_WAITING $1 ($(now)s)"; return 1; }
        sleep 0.5
    done
    echo "SEEN $1"
    echo "AT $(now)s: $1"
}
# Log in once systemd has reached multi-user.target: getty prompts before that, and a login
# that early races the rest of the boot (dbus not up yet for `systemctl poweroff`). The
# budgets are generous: under TCG with the other host core busy, the boot alone can take
# 250 s and a shutdown more than a minute.
if wait_for "ferrovm-debian login:" 400 && wait_for "Multi-User System" 150; then
    printf 'root\r' >&3
    wait_for "root@ferrovm-debian" 120 && printf 'nproc; systemctl poweroff\r' >&3
fi
i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 360 ]; do sleep 0.5; i=$((i + 1)); done
kill -0 $pid 2>/dev/null && echo "NO_POWEROFF_AFTER $(now)s"
echo "AT $(now)s: ended"
kill $pid 2>/dev/null || true
set +e; wait $pid; echo "FERROVM_STATUS=$?"; set -e
exec 3>&-
grep -a -E 'Welcome to|Reached target|login:|FERROVM-|Failed|ferrovm:|^[0-9]+.$' out.log | tr -d '\033\r' | sed 's/^/L2: /'"#,
        )
        .timeout(Duration::from_secs(900))
        .check(|o| {
            expect_output(o, "SEEN ferrovm-debian login:")?;
            expect_output(o, "Welcome to")?;
            expect_output(o, "Multi-User System")?;
            expect_output(o, "SEEN root@ferrovm-debian")?;
            status(o, "FERROVM_STATUS", 0)
        }),
        case(
            "fw_seabios_no_bootable_disk",
            r#"truncate -s 64M empty.img
boot "" --firmware bios --disk path=empty.img"#,
        )
        .check(|o| {
            expect_output(o, "No bootable device")?;
            status(o, "FERROVM_STATUS", 6)
        }),
    ]
}

/// The installed-system disk image, attached to L1 as a read-only virtio disk.
pub fn l1_disk(images: &Path) -> Option<std::path::PathBuf> {
    Some(images.join("debian-disk.img")).filter(|p| p.exists())
}

/// Host files the cases need in L1: the ISO and Debian's SeaBIOS at its package path.
pub fn l1_files(images: &Path) -> Vec<(std::path::PathBuf, String)> {
    const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
    [
        (images.join("boot.iso"), "/images/boot.iso"),
        (Path::new(SEABIOS).to_path_buf(), SEABIOS),
    ]
    .into_iter()
    .filter(|(p, _)| p.exists())
    .map(|(p, l1)| (p, l1.to_string()))
    .collect()
}
