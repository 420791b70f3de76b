//! virtio-fs through virtiofsd (issue 12): host folders in the stock kernel's guest.

use std::time::Duration;

use super::{status, tagged_md5};
use crate::harness::{expect_output, Case, CaseOutput};
use crate::value;

/// Shell prelude: a guest launcher with the console in console.log.
const PRELUDE: &str = r#"set -e
start_guest() {
    # start_guest SCRIPT FERROVM_ARGS...: boots the guest in the background
    s=$1; shift
    mkinitrd_with_test "$s" initrd.img
    "$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 512M \
        --serial file=console.log --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" "$@" </dev/null &
    GUEST_PID=$!
}
finish_guest() {
    set +e
    wait $GUEST_PID
    echo "FERROVM_STATUS=$?"
    set -e
    grep -E 'GUEST|FERROVM-TEST-EXIT|virtio|virtiofs' console.log || true
}
"#;

fn case(name: &str, body: &str) -> Case {
    Case::new(name, &format!("{PRELUDE}{body}")).timeout(Duration::from_secs(400))
}

fn same_md5(o: &CaseOutput, a: &str, b: &str) -> Result<(), String> {
    if tagged_md5(o, a)? != tagged_md5(o, b)? {
        return Err(format!(
            "{a} and {b} differ: the file was corrupted on the way"
        ));
    }
    Ok(())
}

pub fn cases() -> Vec<Case> {
    vec![
        case(
            "fs_share_both_ways_rename_unlink_10000_files",
            r#"
mkdir -p share
dd if=/dev/urandom of=share/h2g bs=1M count=64 2>/dev/null
md5sum share/h2g | sed 's/ .*/ HOST_H2G_MD5/'
echo doomed > share/host-unlinks-me
# The directory of 10,000 files: 9,000 made by the host, 1,000 by the guest (each guest
# create is three FUSE round trips, seconds per hundred under TCG); both sides list all.
mkdir share/many
(cd share/many && seq 0 8999 | sed 's/^/h/' | xargs touch)
cat > g.sh <<'GUEST_EOF'
mkdir -p /mnt/s
mount -t virtiofs share /mnt/s && echo GUEST_MOUNTED
md5sum /mnt/s/h2g | sed 's/ .*/ GUEST_H2G_MD5/'
dd if=/dev/urandom of=/mnt/s/g2h bs=1M count=64 conv=fsync 2>/dev/null && echo GUEST_FSYNC_OK
md5sum /mnt/s/g2h | sed 's/ .*/ GUEST_G2H_MD5/'
mv /mnt/s/g2h /mnt/s/g2h.renamed && echo GUEST_RENAMED
rm /mnt/s/host-unlinks-me && echo GUEST_UNLINKED
i=0; while [ $i -lt 1000 ]; do : > /mnt/s/many/g$i; i=$((i + 1)); done
echo "GUEST_MANY=$(ls /mnt/s/many | wc -l)"
echo "GUEST_SEES_HOST_LAST=$(ls /mnt/s/many/h8999)"
sync
umount /mnt/s && echo GUEST_UNMOUNTED
GUEST_EOF
start_guest g.sh --fs tag=share,path="$PWD/share"
finish_guest
md5sum share/g2h.renamed | sed 's/ .*/ HOST_G2H_MD5/'
[ -e share/host-unlinks-me ] || echo HOST_SEES_UNLINK
[ -e share/g2h ] || echo HOST_SEES_RENAME
echo "HOST_MANY=$(ls share/many | wc -l)"
echo "HOST_GUEST_MADE=$(ls share/many | grep -c '^g')"
pids_matching "virtiofsd --fd" >/dev/null && echo VIRTIOFSD_LEFT_RUNNING || echo VIRTIOFSD_GONE
"#,
        )
        .check(|o| {
            status(o, "FERROVM_STATUS", 0)?;
            for m in [
                "GUEST_MOUNTED",
                "GUEST_FSYNC_OK",
                "GUEST_RENAMED",
                "GUEST_UNLINKED",
                "GUEST_UNMOUNTED",
                "HOST_SEES_UNLINK",
                "HOST_SEES_RENAME",
                "VIRTIOFSD_GONE",
            ] {
                expect_output(o, m)?;
            }
            same_md5(o, "HOST_H2G_MD5", "GUEST_H2G_MD5")?;
            same_md5(o, "GUEST_G2H_MD5", "HOST_G2H_MD5")?;
            expect_output(o, "GUEST_SEES_HOST_LAST=/mnt/s/many/h8999")?;
            status(o, "GUEST_MANY", 10000)?;
            status(o, "HOST_MANY", 10000)?;
            status(o, "HOST_GUEST_MADE", 1000)
        }),
        case(
            "fs_readonly_and_daemon_killed_mid_run",
            r#"
mkdir -p ro rw
echo read-me > ro/hello
echo probe > rw/probe
cat > g.sh <<'GUEST_EOF'
mkdir -p /mnt/ro /mnt/rw
mount -t virtiofs ro /mnt/ro && mount -t virtiofs rw /mnt/rw && echo GUEST_MOUNTED
echo "GUEST_RO_READ=$(cat /mnt/ro/hello)"
if echo x > /mnt/ro/new 2>/dev/null; then echo GUEST_RO_WRITE_ALLOWED; else echo GUEST_RO_WRITE_REFUSED; fi
cat /mnt/rw/probe >/dev/null && echo GUEST_LOSE_DAEMON_NOW
# Until the daemon is gone reads succeed; then they must fail, not hang.
n=0
while [ $n -lt 600 ]; do
    if ! cat /mnt/rw/probe /mnt/rw/new-$n >/dev/null 2>/tmp/err; then
        grep -q "No such file" /tmp/err || break
    fi
    sleep 0.1; n=$((n + 1))
done
echo "GUEST_AFTER_KILL=$(head -c 200 /tmp/err)"
echo GUEST_STILL_ALIVE
GUEST_EOF
start_guest g.sh --fs tag=ro,path="$PWD/ro",readonly=on --fs tag=rw,path="$PWD/rw"
wait_for_line console.log GUEST_LOSE_DAEMON_NOW $GUEST_PID
kill -KILL $(pids_matching "shared-dir $PWD/rw") && echo HOST_KILLED_DAEMON
finish_guest
[ -e ro/new ] && echo HOST_RO_FILE_CREATED || echo HOST_RO_UNTOUCHED
"#,
        )
        .check(|o| {
            status(o, "FERROVM_STATUS", 0)?;
            expect_output(o, "GUEST_MOUNTED")?;
            expect_output(o, "GUEST_RO_READ=read-me")?;
            expect_output(o, "GUEST_RO_WRITE_REFUSED")?;
            expect_output(o, "HOST_RO_UNTOUCHED")?;
            expect_output(o, "HOST_KILLED_DAEMON")?;
            expect_output(o, "GUEST_AFTER_KILL=cat: ")?;
            expect_output(o, "Input/output error")?;
            expect_output(o, "GUEST_STILL_ALIVE")?;
            value(o, "FERROVM_STATUS").map(|_| ())
        }),
    ]
}
