//! Disk image formats under a real guest (issue 11): the Debian root filesystem as a qcow2
//! overlay on a raw base, as a dynamic VHD, as a throwaway overlay (`overlay=on`), and a
//! qcow2 overlay whose ferrovm is SIGKILLed right after the guest's `sync`. qemu-img (copied
//! into L1) is the reference checker: `qemu-img check` on every qcow2 ferrovm wrote, and
//! `qemu-img convert -O raw` to read the result back with debugfs. And the cloud-init seed
//! as the guest sees it (found by its label, read-only, the generated files).

use std::time::Duration;

use super::{status, synced_file_intact, tagged_md5};
use crate::harness::{expect_output, Case, CaseOutput};
use crate::value;

/// Shell prelude: a raw copy of the root image with `/test.sh` inside, and helpers.
const PRELUDE: &str = r#"set -e
trap 'rm -rf base.img ov.qcow2 disk.vhd flat.raw tmp' EXIT
cp "$IMAGES/rootfs.ext4" base.img
put_script() { debugfs -w -R "write $1 /test.sh" base.img >/dev/null 2>&1; }
boot() {
    # boot FERROVM_ARGS...
    set +e
    "$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs "$IMAGES/initramfs.cpio.gz" \
        --memory 512M --cmdline "console=ttyS0 panic=1 root=/dev/vda rw ferrovm.test=/test.sh" \
        "$@" </dev/null
    echo "FERROVM_STATUS=$?"
    set -e
}
# readback IMAGE FORMAT FILE: checks a raw conversion of IMAGE with e2fsck and prints
# READBACK=<the file's contents>.
readback() {
    qemu-img convert -f "$2" -O raw "$1" flat.raw
    set +e
    e2fsck -fn flat.raw >fsck.log 2>&1
    echo "E2FSCK_STATUS=$?"
    set -e
    echo "READBACK=$(debugfs -R "cat $3" flat.raw 2>/dev/null)"
    rm -f flat.raw
}
qcheck() {
    set +e
    qemu-img check "$1" >check.log 2>&1
    echo "QCHECK_STATUS=$?"
    sed 's/^/QCHECK: /' check.log
    set -e
}
WRITE='echo ferrovm-img-data-11 > /root/written.txt\nsync\necho GUEST_WROTE\n'
"#;

fn case(name: &str, body: &str) -> Case {
    Case::new(name, &format!("{PRELUDE}{body}")).timeout(Duration::from_secs(240))
}

fn same_md5(o: &CaseOutput, a: &str, b: &str) -> Result<(), String> {
    let (x, y) = (tagged_md5(o, a)?, tagged_md5(o, b)?);
    if x == y {
        Ok(())
    } else {
        Err(format!("{a} {x} differs from {b} {y}"))
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        case(
            "img_qcow2_overlay_on_raw_base",
            r#"
printf "$WRITE" > t.sh
put_script t.sh
md5sum base.img | sed 's/ .*/ base-before/'
boot --disk path=ov.qcow2,backing=base.img
md5sum base.img | sed 's/ .*/ base-after/'
qcheck ov.qcow2
"$FERROVM" img info ov.qcow2 | sed 's/^/INFO: /'
readback ov.qcow2 qcow2 /root/written.txt
"#,
        )
        .check(|o| {
            expect_output(o, "GUEST_WROTE")?;
            status(o, "FERROVM_STATUS", 0)?;
            same_md5(o, "base-before", "base-after")?;
            status(o, "QCHECK_STATUS", 0)?;
            expect_output(o, "INFO: backing file:")?;
            expect_output(o, "INFO: problems: none")?;
            status(o, "E2FSCK_STATUS", 0)?;
            expect_output(o, "READBACK=ferrovm-img-data-11")
        }),
        case(
            "img_dynamic_vhd_root",
            r#"
printf "$WRITE" > t.sh
put_script t.sh
qemu-img convert -f raw -O vpc -o subformat=dynamic base.img disk.vhd
rm -f base.img
boot --disk path=disk.vhd
readback disk.vhd vpc /root/written.txt
"#,
        )
        .check(|o| {
            expect_output(o, "GUEST_WROTE")?;
            status(o, "FERROVM_STATUS", 0)?;
            status(o, "E2FSCK_STATUS", 0)?;
            expect_output(o, "READBACK=ferrovm-img-data-11")
        }),
        case(
            "img_overlay_on_leaves_no_trace",
            r#"
printf "$WRITE" > t.sh
put_script t.sh
mkdir tmp
md5sum base.img | sed 's/ .*/ base-before/'
TMPDIR=$PWD/tmp boot --disk path=base.img,overlay=on
md5sum base.img | sed 's/ .*/ base-after/'
echo "LEFT_IN_TMP=$(ls tmp | wc -l)"
"#,
        )
        .check(|o| {
            expect_output(o, "GUEST_WROTE")?;
            status(o, "FERROVM_STATUS", 0)?;
            same_md5(o, "base-before", "base-after")?;
            status(o, "LEFT_IN_TMP", 0)
        }),
        case(
            "img_qcow2_sigkill_after_sync",
            r#"
printf 'dd if=/dev/urandom of=/root/big.bin bs=64k count=64 2>/dev/null\nmd5sum /root/big.bin\nsync\necho GUEST_SYNCED\nsleep 1000\n' > t.sh
put_script t.sh
"$FERROVM" img create ov.qcow2 --backing base.img
"$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs "$IMAGES/initramfs.cpio.gz" --memory 512M \
    --disk path=ov.qcow2 --serial file=console.log \
    --cmdline "console=ttyS0 panic=1 root=/dev/vda rw ferrovm.test=/test.sh" </dev/null &
pid=$!
wait_for_line console.log GUEST_SYNCED $pid
kill -KILL $pid
wait $pid || true
grep -E 'big.bin|GUEST' console.log
qcheck ov.qcow2
qemu-img convert -f qcow2 -O raw ov.qcow2 flat.raw
set +e
e2fsck -fy flat.raw >replay.log 2>&1; echo "REPLAY_STATUS=$?"
set -e
debugfs -R 'cat /root/big.bin' flat.raw 2>/dev/null | md5sum | sed 's/ .*/  host-md5/'
"#,
        )
        .check(|o| {
            synced_file_intact(o, "/root/big.bin")?;
            // 0: clean; 3: leaked clusters only (allocations of unflushed writes, documented
            // in src/disk/qcow2/mod.rs). Anything else is corruption.
            match value(o, "QCHECK_STATUS")? {
                0 | 3 => {}
                v => return Err(format!("qemu-img check status {v}: corruption")),
            }
            match value(o, "REPLAY_STATUS")? {
                0 | 1 => Ok(()),
                v => Err(format!("e2fsck -fy status {v}: uncorrectable errors")),
            }
        }),
        case(
            "img_cloud_init_seed_in_guest",
            r#"
cat > t.sh <<'GUEST_EOF'
d=$(findfs LABEL=CIDATA)
echo "GUEST_SEED_DEV=$d"
echo "GUEST_SEED_RO=$(cat /sys/block/${d#/dev/}/ro)"
mount -t vfat -o ro "$d" /mnt
ls /mnt | sed 's/^/GUEST_FILE=/'
sed 's/^/GUEST_UD: /' /mnt/user-data
sed 's/^/GUEST_MD: /' /mnt/meta-data
umount /mnt
if dd if=/dev/zero of="$d" bs=512 count=1 conv=fsync 2>/dev/null; then echo GUEST_WRITE=ok; else echo GUEST_WRITE=refused; fi
GUEST_EOF
put_script t.sh
echo 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerrovmTestKey test@ferrovm' > id.pub
boot --disk path=base.img --ssh-key id.pub --password 'ferro vm'
"#,
        )
        .check(|o| {
            status(o, "FERROVM_STATUS", 0)?;
            expect_output(o, "GUEST_SEED_DEV=/dev/vdb")?;
            expect_output(o, "GUEST_SEED_RO=1")?;
            expect_output(o, "GUEST_FILE=user-data")?;
            expect_output(o, "GUEST_FILE=meta-data")?;
            expect_output(o, "GUEST_UD: #cloud-config")?;
            expect_output(o, "GUEST_UD:   - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerrovmTestKey")?;
            expect_output(o, "GUEST_UD: password: \"ferro vm\"")?;
            expect_output(o, "GUEST_MD: instance-id: iid-ferrovm-")?;
            expect_output(o, "GUEST_WRITE=refused")
        }),
    ]
}
