//! virtio-blk over virtio-pci with the stock kernel (issue 4): root filesystem on a disk image,
//! no data lost (clean shutdown and SIGKILL after sync), read-only disks, two disks, image
//! locking, INTx fallback (`pci=nomsi`), module reload.
//!
//! Each case copies `$IMAGES/rootfs.ext4` (shipped into L1 by the harness) to a scratch image,
//! puts the guest's script into it with debugfs (no mount), boots with `root=/dev/vda`, then
//! checks the image on the host side with e2fsck and debugfs.

use std::time::Duration;

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

fn status(o: &CaseOutput, key: &str, want: i64) -> Result<(), String> {
    match value(o, key)? {
        v if v == want => Ok(()),
        v => Err(format!("{key}={v}, expected {want}")),
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
            // md5 printed by the guest must equal the host's md5 of the file in the image
            let guest = o
                .output
                .lines()
                .find(|l| l.contains("/root/big.bin") && l.len() > 32)
                .and_then(|l| l.split_whitespace().next())
                .ok_or("no guest md5")?
                .to_string();
            let host = o
                .output
                .lines()
                .find(|l| l.ends_with("host-md5"))
                .and_then(|l| l.split_whitespace().next())
                .ok_or("no host md5")?;
            if guest != host {
                return Err(format!("data lost: guest md5 {guest}, image md5 {host}"));
            }
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
"$FERROVM" run --kernel "$IMAGES/bzImage" --memory 256M --disk path=disk.img </dev/null
echo "SECOND_STATUS=$?"
"$FERROVM" run --kernel "$IMAGES/bzImage" --memory 256M --disk path=disk.img,readonly=on \
    --serial off --cmdline "console=ttyS0 panic=-1 nonexistent_init_so_it_fails" </dev/null &
p2=$!
set -e
sleep 1
kill -TERM $pid; wait $pid || true
kill -KILL $p2 2>/dev/null || true
"#,
        )
        .check(|o| {
            status(o, "SECOND_STATUS", 1)?;
            expect_output(o, "in use by another process")
        }),
        case(
            "blk_pci_nomsi_uses_intx",
            r#"
printf 'grep -c virtio /proc/interrupts | sed s/^/GUEST_VIRTIO_IRQ_LINES=/\ngrep -q PCI-MSI /proc/interrupts && echo GUEST_MSI=yes || echo GUEST_MSI=no\nls /root >/dev/null && echo GUEST_ROOT_OK\n' > t.sh
put_script t.sh
boot_root "pci=nomsi" --disk path=disk.img
"#,
        )
        .check(|o| {
            status(o, "FERROVM_STATUS", 0)?;
            expect_output(o, "GUEST_MSI=no")?;
            expect_output(o, "GUEST_ROOT_OK")
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
    ]
}
