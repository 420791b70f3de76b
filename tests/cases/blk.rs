//! virtio-blk over virtio-pci with the stock kernel (issue 4): root filesystem on a disk image,
//! no data lost (clean shutdown and SIGKILL after sync), read-only disks, two disks, image
//! locking, INTx fallback (`pci=nomsi`), module reload, a guest that breaks its disk through
//! PCI config space and recovers it.
//!
//! Each case copies `$IMAGES/rootfs.ext4` (shipped into L1 by the harness) to a scratch image,
//! puts the guest's script into it with debugfs (no mount), boots with `root=/dev/vda`, then
//! checks the image on the host side with e2fsck and debugfs.

use std::time::Duration;

use super::{status, synced_file_intact};
use crate::harness::{expect_output, Case, CaseOutput};
use crate::value;

/// Shell prelude: a writable copy of the root image with `/test.sh` inside.
const PRELUDE: &str = r#"set -e
# L1's /work is RAM: drop the image copies when the case ends.
trap 'rm -f disk.img data.img' EXIT
cp "$IMAGES/rootfs.ext4" disk.img
put_script() { debugfs -w -R "write $1 /test.sh" disk.img >/dev/null 2>&1; }
boot_root() {
    # boot_root EXTRA_CMDLINE FERROVM_ARGS...
    extra=$1; shift
    set +e
    "$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs "$IMAGES/initramfs.cpio.gz" \
        --memory 512M --cmdline "console=ttyS0 panic=1 root=/dev/vda rw ferrovm.test=/test.sh $extra" \
        "$@" </dev/null
    echo "FERROVM_STATUS=$?"
    set -e
}
fsck_image() {
    set +e
    e2fsck -fn "$1" >fsck.log 2>&1
    echo "E2FSCK_STATUS=$?"
    tail -3 fsck.log
    set -e
}
"#;

fn case(name: &str, body: &str) -> Case {
    Case::new(name, &format!("{PRELUDE}{body}")).timeout(Duration::from_secs(240))
}

/// Fails unless a line starting with `prefix` contains `text`.
fn expect_line(o: &CaseOutput, prefix: &str, text: &str) -> Result<(), String> {
    let lines: Vec<&str> = o
        .output
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .collect();
    if lines.iter().any(|l| l.contains(text)) {
        Ok(())
    } else {
        Err(format!(
            "no {prefix:?} line contains {text:?}; got {lines:?}"
        ))
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        case(
            "blk_root_write_sync_poweroff",
            r#"
printf 'echo ferrovm-blk-data-42 > /root/written.txt\nsync\necho GUEST_WROTE\n' > t.sh
put_script t.sh
boot_root ""  --disk path=disk.img
fsck_image disk.img
echo "READBACK=$(debugfs -R 'cat /root/written.txt' disk.img 2>/dev/null)"
"#,
        )
        .check(|o| {
            expect_output(o, "FERROVM-BOOT-OK")?;
            expect_output(o, "root=/dev/vda")?;
            expect_output(o, "GUEST_WROTE")?;
            status(o, "FERROVM_STATUS", 0)?;
            status(o, "E2FSCK_STATUS", 0)?;
            expect_output(o, "READBACK=ferrovm-blk-data-42")
        }),
        case(
            "blk_sigkill_after_sync_loses_nothing",
            r#"
printf 'dd if=/dev/urandom of=/root/big.bin bs=64k count=64 2>/dev/null\nmd5sum /root/big.bin\nsync\necho GUEST_SYNCED\nsleep 1000\n' > t.sh
put_script t.sh
"$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs "$IMAGES/initramfs.cpio.gz" --memory 512M \
    --disk path=disk.img --serial file=console.log \
    --cmdline "console=ttyS0 panic=1 root=/dev/vda rw ferrovm.test=/test.sh" </dev/null &
pid=$!
wait_for_line console.log GUEST_SYNCED $pid
kill -KILL $pid
wait $pid || true
cat console.log | grep -E 'big.bin|GUEST'
# the guest's fs is still mounted: replay the journal as a boot would, then check strictly
set +e
e2fsck -fy disk.img >replay.log 2>&1; echo "REPLAY_STATUS=$?"
grep -v '^Pass\|^e2fsck' replay.log | head -5
set -e
fsck_image disk.img
debugfs -R 'cat /root/big.bin' disk.img 2>/dev/null | md5sum | sed 's/ .*/  host-md5/'
"#,
        )
        .check(|o| {
            synced_file_intact(o, "/root/big.bin")?;
            let replay = value(o, "REPLAY_STATUS")?;
            if replay > 1 {
                return Err(format!("e2fsck -fy status {replay}: uncorrectable errors"));
            }
            status(o, "E2FSCK_STATUS", 0)
        }),
        case(
            "blk_readonly_disk_rejects_writes",
            r#"
printf 'cat /sys/block/vda/ro | sed s/^/GUEST_RO=/\nif dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=100 conv=fsync 2>/dev/null; then echo GUEST_WRITE=ok; else echo GUEST_WRITE=failed; fi\n' > t.sh
put_script t.sh
md5_before=$(md5sum disk.img | cut -d' ' -f1)
boot_root "ro" --disk path=disk.img,readonly=on
[ "$(md5sum disk.img | cut -d' ' -f1)" = "$md5_before" ] && echo IMAGE_UNCHANGED
"#,
        )
        .check(|o| {
            status(o, "FERROVM_STATUS", 0)?;
            expect_output(o, "GUEST_RO=1")?;
            expect_output(o, "GUEST_WRITE=failed")?;
            expect_output(o, "IMAGE_UNCHANGED")
        }),
        case(
            "blk_two_disks_and_serial",
            r#"
truncate -s 64M data.img
printf 'cat /sys/block/vdb/serial | sed s/^/GUEST_SERIAL=/\necho ferrovm-second-disk | dd of=/dev/vdb conv=fsync 2>/dev/null\necho GUEST_DONE\n' > t.sh
put_script t.sh
boot_root "" --disk path=disk.img --disk path=data.img,serial=ferro-data-1
echo "DATA=$(head -c 19 data.img)"
"#,
        )
        .check(|o| {
            status(o, "FERROVM_STATUS", 0)?;
            expect_output(o, "GUEST_SERIAL=ferro-data-1")?;
            expect_output(o, "DATA=ferrovm-second-disk")
        }),
        case(
            "blk_second_vm_refused",
            r#"
printf 'echo GUEST_HOLDING\nsleep 1000\n' > t.sh
put_script t.sh
"$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs "$IMAGES/initramfs.cpio.gz" --memory 256M \
    --disk path=disk.img --serial file=first.log \
    --cmdline "console=ttyS0 root=/dev/vda rw ferrovm.test=/test.sh" </dev/null &
pid=$!
wait_for_line first.log GUEST_HOLDING $pid
set +e
"$FERROVM" run --kernel "$IMAGES/bzImage" --memory 256M --disk path=disk.img </dev/null 2>second.err
echo "SECOND_STATUS=$?"
sed 's/^/SECOND_ERR: /' second.err
# Nor can a reader join a writer. (Were it let in, its kernel would panic without a root
# filesystem and reboot: status 0, within the time limit.)
timeout 120 "$FERROVM" run --kernel "$IMAGES/bzImage" --memory 256M --disk path=disk.img,readonly=on \
    --serial off --cmdline "console=ttyS0 panic=-1" </dev/null 2>readonly.err
echo "READONLY_STATUS=$?"
sed 's/^/READONLY_ERR: /' readonly.err
kill -0 $pid && echo FIRST_STILL_RUNNING
set -e
kill -TERM $pid; wait $pid || true
"#,
        )
        .check(|o| {
            status(o, "SECOND_STATUS", 1)?;
            expect_line(o, "SECOND_ERR:", "in use by another process")?;
            status(o, "READONLY_STATUS", 1)?;
            expect_line(o, "READONLY_ERR:", "in use by another process")?;
            expect_output(o, "FIRST_STILL_RUNNING")
        }),
        case(
            "blk_pci_nomsi_uses_intx",
            r#"
cat > t.sh <<'GUEST_EOF'
echo "GUEST_VIRTIO_IRQ_LINES=$(grep -c virtio /proc/interrupts)"
grep virtio /proc/interrupts | sed 's/^/GUEST_IRQ: /'
grep -q PCI-MSI /proc/interrupts && echo GUEST_MSI=yes || echo GUEST_MSI=no
ls /root >/dev/null && echo GUEST_ROOT_OK
GUEST_EOF
put_script t.sh
boot_root "pci=nomsi" --disk path=disk.img
"#,
        )
        .check(|o| {
            status(o, "FERROVM_STATUS", 0)?;
            expect_output(o, "GUEST_MSI=no")?;
            expect_output(o, "GUEST_ROOT_OK")?;
            // INTx: one (IOAPIC) line for the whole device, where MSI-X would give the
            // configuration vector and one per queue a line each.
            status(o, "GUEST_VIRTIO_IRQ_LINES", 1)?;
            let irq = o
                .output
                .lines()
                .find_map(|l| l.trim().strip_prefix("GUEST_IRQ:"))
                .ok_or("no GUEST_IRQ line")?;
            let count: u64 = irq
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            if !irq.contains("IO-APIC") || count == 0 {
                return Err(format!("virtio is not a used IOAPIC line: {irq}"));
            }
            Ok(())
        }),
        case(
            "blk_module_reload",
            r#"
truncate -s 16M data.img
printf 'ferrovm-reload-test' | dd of=data.img conv=notrunc 2>/dev/null
cat > r.sh <<'GUEST_EOF'
m=$(find /lib/modules -name virtio_blk.ko)
head -c 19 /dev/vda; echo
rmmod virtio_blk && echo GUEST_RMMOD_OK
insmod "$m" && echo GUEST_INSMOD_OK
n=0; while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
echo "GUEST_AFTER=$(head -c 19 /dev/vda)"
GUEST_EOF
mkinitrd_with_test r.sh initrd.img
set +e
"$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 256M \
    --disk path=data.img --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" </dev/null
echo "FERROVM_STATUS=$?"
"#,
        )
        .check(|o| {
            status(o, "FERROVM_STATUS", 0)?;
            expect_output(o, "GUEST_RMMOD_OK")?;
            expect_output(o, "GUEST_INSMOD_OK")?;
            expect_output(o, "GUEST_AFTER=ferrovm-reload-test")
        }),
        case("blk_guest_resets_failed_disk", RESET_FAILED_DISK).check(check_reset_failed_disk),
    ]
}

/// The guest breaks its own virtio-blk device and recovers it, all from userspace through
/// the device's PCI config file: the VIRTIO_PCI_CAP_PCI_CFG window (a vendor capability with
/// cfg_type 5: BAR number at +4, offset into the BAR at +8, access length at +12, data at +16)
/// reaches BAR 0's common configuration. It resets the device, negotiates VERSION_1 only, puts
/// queue 0's descriptor table outside guest RAM and sets DRIVER_OK: the device must answer
/// with DEVICE_NEEDS_RESET (0x40). Unbinding and binding virtio-pci (a driver reset) must
/// bring back a disk that reads what was written to it.
const RESET_FAILED_DISK: &str = r#"
truncate -s 16M data.img
cat > r.sh <<'GUEST_EOF'
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1042 ] && dev=${d##*/}
done
[ -n "$dev" ] || { echo "GUEST_ERROR no virtio-blk PCI function (1af4:1042)"; exit 1; }
echo "GUEST_BLK_DEV=$dev"
cfg=/sys/bus/pci/devices/$dev/config
# Config space accesses of exactly one byte or one aligned dword: the kernel passes them on
# as single config cycles.
r8() { dd if=$cfg bs=1 count=1 skip=$(($1)) 2>/dev/null | od -An -tu1 | tr -d ' '; }
r32() { dd if=$cfg bs=4 count=1 skip=$(($1 / 4)) 2>/dev/null | od -An -tu4 | tr -d ' '; }
byte() { printf "\\$(printf %03o $(($1 & 255)))"; }
w8() { byte $2 | dd of=$cfg bs=1 count=1 seek=$(($1)) conv=notrunc 2>/dev/null; }
w32() {
    { byte $2; byte $(($2 >> 8)); byte $(($2 >> 16)); byte $(($2 >> 24)); } |
        dd of=$cfg bs=4 count=1 seek=$(($1 / 4)) conv=notrunc 2>/dev/null
}
# Walk the capability list for the PCI_CFG window.
cap=0 p=$(r8 0x34) n=0
while [ "$p" -ne 0 ] && [ $n -lt 48 ]; do
    if [ "$(r8 $p)" -eq 9 ] && [ "$(r8 $((p + 3)))" -eq 5 ]; then cap=$p; break; fi
    p=$(r8 $((p + 1))) n=$((n + 1))
done
echo "GUEST_PCI_CFG_CAP=$cap"
[ $cap -ne 0 ] || { echo "GUEST_ERROR no VIRTIO_PCI_CAP_PCI_CFG capability"; exit 1; }
# bar_write OFFSET LENGTH VALUE and bar_read OFFSET LENGTH, on BAR 0 through the window.
bar_at() { w8 $((cap + 4)) 0; w32 $((cap + 8)) $1; w32 $((cap + 12)) $2; }
bar_write() { bar_at $1 $2; w32 $((cap + 16)) $3; }
bar_read() { bar_at $1 $2; echo $(($(r32 $((cap + 16))) & ((1 << ($2 * 8)) - 1))); }
show_status() { printf '%s=0x%02x
' $1 $(bar_read 0x14 1); }

show_status GUEST_STATUS_BOUND
bar_write 0x14 1 0
show_status GUEST_STATUS_RESET
bar_write 0x14 1 1
bar_write 0x14 1 3
bar_write 0x08 4 1
bar_write 0x0c 4 1
bar_write 0x14 1 0x0b
show_status GUEST_STATUS_FEATURES_OK
bar_write 0x16 2 0
bar_write 0x20 4 0xfff00000
bar_write 0x24 4 0x0000ffff
bar_write 0x1c 2 1
bar_write 0x14 1 0x0f
show_status GUEST_STATUS_BROKEN

echo $dev > /sys/bus/pci/drivers/virtio-pci/unbind && echo GUEST_UNBOUND
n=0; while [ -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo $dev > /sys/bus/pci/drivers/virtio-pci/bind && echo GUEST_BOUND
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -b /dev/vda ] && echo GUEST_VDA_BACK
show_status GUEST_STATUS_REBOUND
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=16 2>/dev/null
md5sum < /tmp/pattern | sed 's/ .*/ GUEST_PATTERN_MD5/'
dd if=/tmp/pattern of=/dev/vda bs=4096 conv=fsync 2>/dev/null && echo GUEST_WRITE_OK
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=4096 count=16 2>/dev/null | md5sum | sed 's/ .*/ GUEST_READBACK_MD5/'
GUEST_EOF
mkinitrd_with_test r.sh initrd.img
set +e
"$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 256M \
    --disk path=data.img --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" </dev/null
echo "FERROVM_STATUS=$?"
head -c 65536 data.img | md5sum | sed 's/ .*/ HOST_IMAGE_MD5/'
"#;

/// Every way blk_guest_resets_failed_disk can fail, not only the first.
fn check_reset_failed_disk(o: &CaseOutput) -> Result<(), String> {
    let status_byte = |key: &str| -> Result<u8, String> {
        let v = o
            .output
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}=0x")))
            .ok_or_else(|| format!("no {key}= line"))?;
        u8::from_str_radix(v.trim(), 16).map_err(|e| format!("{key}: {e}"))
    };
    let md5 = |tag: &str| super::tagged_md5(o, tag);
    let mut errors: Vec<String> = Vec::new();
    let mut fail = |r: Result<(), String>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    fail(status(o, "FERROVM_STATUS", 0));
    fail(expect_output(o, "FERROVM-TEST-EXIT status=0"));
    // The window works: the driver's status, then the steps of our own initialization.
    for (key, want) in [
        ("GUEST_STATUS_BOUND", 0x0f),
        ("GUEST_STATUS_RESET", 0x00),
        ("GUEST_STATUS_FEATURES_OK", 0x0b),
    ] {
        fail(status_byte(key).and_then(|s| match s {
            s if s == want => Ok(()),
            s => Err(format!("{key} is {s:#04x}, expected {want:#04x}")),
        }));
    }
    fail(status_byte("GUEST_STATUS_BROKEN").and_then(|s| {
        if s & 0x40 != 0 {
            Ok(())
        } else {
            Err(format!(
                "device status {s:#04x} after DRIVER_OK with queue 0's descriptor table at \
                 0xffff_fff0_0000 (outside guest RAM): DEVICE_NEEDS_RESET (0x40) not reported"
            ))
        }
    }));
    // Recovery: a driver reset clears the failure and the disk works again.
    for m in [
        "GUEST_UNBOUND",
        "GUEST_BOUND",
        "GUEST_VDA_BACK",
        "GUEST_WRITE_OK",
    ] {
        fail(expect_output(o, m));
    }
    fail(status_byte("GUEST_STATUS_REBOUND").and_then(|s| match s {
        0x0f => Ok(()),
        s => Err(format!(
            "device status {s:#04x} after rebinding, expected 0x0f"
        )),
    }));
    fail((|| {
        let pattern = md5("GUEST_PATTERN_MD5")?;
        if md5("GUEST_READBACK_MD5")? != pattern {
            return Err("the guest read back something else than it wrote".into());
        }
        if md5("HOST_IMAGE_MD5")? != pattern {
            return Err("the image does not hold what the guest wrote".into());
        }
        Ok(())
    })());
    match errors.len() {
        0 => Ok(()),
        _ => Err(errors.join("\n")),
    }
}
