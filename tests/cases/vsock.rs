//! virtio-vsock (issue 12): hybrid vsock between the stock kernel's guest and L1 programs
//! (socat on the host side, tests/guest/vsock-nc.c in the guest).

use std::time::Duration;

use super::{status, tagged_md5};
use crate::harness::{expect_output, Case, CaseOutput};
use crate::value;

const SCRIPT: &str = r#"set -e
command -v socat >/dev/null || { echo "socat missing in L1"; exit 1; }
head -c 16777216 /dev/urandom > h2g
md5sum h2g | sed 's/ .*/ HOST_H2G_MD5/'
cat > g.sh <<'GUEST_EOF'
# listen PORT ARGS...: a listener in the background, once it listens
listen() {
    p=$1; shift
    /vsock-nc -l $p "$@" 2>/tmp/l$p.err &
    until grep -q listening /tmp/l$p.err; do sleep 0.1; done
}
# gate PORT MARKER: prints MARKER once PORT listens, returns when the host has connected
gate() {
    listen $1 </dev/null >/dev/null
    echo $2
    wait $!
}
listen 1234 > /tmp/h2g
L=$!
echo GUEST_LISTENING_1234
wait $L; echo "GUEST_RELAY_STATUS=$?"
md5sum /tmp/h2g | sed 's/ .*/ GUEST_H2G_MD5/'
rm /tmp/h2g
dd if=/dev/urandom of=/tmp/g2h bs=1M count=16 2>/dev/null
md5sum /tmp/g2h | sed 's/ .*/ GUEST_G2H_MD5/'
/vsock-nc 2 5000 < /tmp/g2h > /dev/null; echo "GUEST_SEND_STATUS=$?"
echo "GUEST_$(/vsock-nc -p 200 2 6000)"
gate 4001 GUEST_PINGS_DONE
listen 3000 -i
head -c 67108864 /dev/zero | /vsock-nc 2 7000 > /dev/null 2>&1 &
gate 4002 GUEST_FLOODS_READY
echo GUEST_DONE
GUEST_EOF
mkinitrd_with_test g.sh initrd.img "$FILES/vsock-nc"
socat -u UNIX-LISTEN:v.sock_5000 CREATE:g2h.bin & S5000=$!
socat UNIX-LISTEN:v.sock_6000,fork PIPE & S6000=$!
# The host side of port 7000 never reads: socat stops once the pipe to sleep is full.
socat -u UNIX-LISTEN:v.sock_7000 SYSTEM:'sleep 600' & S7000=$!
trap 'kill $S5000 $S6000 $S7000 ${FLOOD:-} 2>/dev/null; kill $VM 2>/dev/null; true' EXIT
"$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 512M \
    --serial file=console.log --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" \
    --vsock cid=3,socket="$PWD/v.sock" </dev/null &
VM=$!
fds() { ls /proc/$VM/fd | wc -l; }
rss() { sed -n 's/^VmRSS: *\([0-9]*\) kB/\1/p' /proc/$VM/status; }
# knock PORT: opens the guest's gate on PORT
knock() { printf 'CONNECT %s\n' $1 | socat -t 5 - UNIX-CONNECT:v.sock >/dev/null; }
wait_for_line console.log GUEST_LISTENING_1234 $VM
FDS_START=$(fds)
echo "FDS_START=$FDS_START"
(printf 'CONNECT 1234\n'; cat h2g) | socat -t 30 - UNIX-CONNECT:v.sock > reply
echo "HOST_REPLY=$(head -n 1 reply)"
wait_for_line console.log GUEST_PINGS_DONE $VM
wait $S5000 && echo HOST_RECEIVED_ALL
md5sum g2h.bin | sed 's/ .*/ HOST_G2H_MD5/'
# Every finished connection closes its socket (the guest's close reaches ferrovm a little
# later); only the gate's connection may be open.
n=0; while [ "$(fds)" -gt "$FDS_START" ] && [ $n -lt 50 ]; do sleep 0.2; n=$((n + 1)); done
echo "FDS_AFTER_CLOSE=$(fds)"
knock 4001
wait_for_line console.log GUEST_FLOODS_READY $VM
rss0=$(rss)
(printf 'CONNECT 3000\n'; head -c 67108864 /dev/zero) | socat -t 5 - UNIX-CONNECT:v.sock >/dev/null 2>&1 &
FLOOD=$!
sleep 10
rss1=$(rss)
echo "RSS_GROWTH_KB=$((rss1 - rss0))"
kill -0 $FLOOD 2>/dev/null && echo HOST_FLOOD_HELD_BACK
knock 4002
set +e
wait $VM
echo "FERROVM_STATUS=$?"
set -e
grep -E 'GUEST|FERROVM-TEST-EXIT|vsock' console.log || true
[ -e v.sock ] && echo SOCKET_LEFT_BEHIND || echo SOCKET_REMOVED
"#;

fn check(o: &CaseOutput) -> Result<(), String> {
    status(o, "FERROVM_STATUS", 0)?;
    for m in [
        "GUEST_LISTENING_1234",
        "HOST_REPLY=OK 1073741824",
        "GUEST_RELAY_STATUS=0",
        "GUEST_SEND_STATUS=0",
        "HOST_RECEIVED_ALL",
        "HOST_FLOOD_HELD_BACK",
        "GUEST_DONE",
        "SOCKET_REMOVED",
    ] {
        expect_output(o, m)?;
    }
    if tagged_md5(o, "HOST_H2G_MD5")? != tagged_md5(o, "GUEST_H2G_MD5")? {
        return Err("host-to-guest stream corrupted".into());
    }
    if tagged_md5(o, "GUEST_G2H_MD5")? != tagged_md5(o, "HOST_G2H_MD5")? {
        return Err("guest-to-host stream corrupted".into());
    }
    status(o, "GUEST_PINGS_OK", 200)?;
    let (start, after) = (value(o, "FDS_START")?, value(o, "FDS_AFTER_CLOSE")?);
    if after > start {
        return Err(format!(
            "{} fds left open by closed connections",
            after - start
        ));
    }
    // Two floods held back by credit: ferrovm buffers at most 256 KiB per connection.
    let growth = value(o, "RSS_GROWTH_KB")?;
    if growth > 16 << 10 {
        return Err(format!("ferrovm grew by {growth} KiB while nobody read"));
    }
    Ok(())
}

pub fn cases() -> Vec<Case> {
    let nc = crate::harness::vsock_nc();
    vec![Case::new(
        "vsock_streams_both_ways_200_connections_bounded_memory",
        SCRIPT,
    )
    .requires(
        &nc,
        "gcc -static tests/guest/vsock-nc.c failed: install gcc and libc6-dev",
    )
    .file(nc, "vsock-nc")
    .timeout(Duration::from_secs(400))
    .check(check)]
}
