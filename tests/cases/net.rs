//! virtio-net over TAP with the stock kernel (issue 5). Everything happens inside a network
//! namespace the case creates in L1 (or on the host in direct mode) and removes afterwards;
//! traffic only goes between that namespace's TAP and the guest.

use std::time::Duration;

use crate::harness::{expect_output, Case, CaseOutput};
use crate::value;

/// Shell prelude: a namespace, TAP helpers, and a guest launcher running in the namespace.
const PRELUDE: &str = r#"set -e
# iproute2's ip by path: busybox sh runs its own (smaller) ip applet for a bare "ip".
IP=/usr/sbin/ip
[ -x $IP ] || IP=/sbin/ip
[ -x $IP ] || skip_case "iproute2's ip not found"
[ "$(id -u)" = 0 ] || skip_case "network namespaces and TAPs need root"
[ -c /dev/net/tun ] || skip_case "no /dev/net/tun"
NS=ferrovm-net-$$
$IP netns add $NS
trap '$IP netns del $NS 2>/dev/null || true' EXIT
inns() { $IP netns exec $NS "$@"; }
inns $IP link set lo up
mktap() { inns $IP tuntap add dev "$1" mode tap vnet_hdr; inns $IP addr add "$2" dev "$1"; inns $IP link set "$1" up; }
start_guest() {
    # start_guest SCRIPT FERROVM_ARGS...: boots the guest in the background, console to console.log
    s=$1; shift
    mkinitrd_with_test "$s" initrd.img
    inns "$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 512M \
        --serial file=console.log --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" "$@" </dev/null &
    GUEST_PID=$!
}
wait_console() { wait_for_line console.log "$1" $GUEST_PID; }
finish_guest() {
    set +e
    wait $GUEST_PID
    echo "FERROVM_STATUS=$?"
    set -e
    grep -E 'GUEST|FERROVM-TEST-EXIT|virtio_net' console.log || true
}
"#;

fn case(name: &str, body: &str) -> Case {
    Case::new(name, &format!("{PRELUDE}{body}")).timeout(Duration::from_secs(300))
}

fn status0(o: &CaseOutput) -> Result<(), String> {
    match value(o, "FERROVM_STATUS")? {
        0 => Ok(()),
        v => Err(format!("ferrovm exited {v}")),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        case(
            "net_ping_both_ways",
            r#"
cat > g.sh <<'GUEST_EOF'
ip link set eth0 up
ip addr add 172.30.0.2/24 dev eth0
cat /sys/class/net/eth0/address | sed 's/^/GUEST_MAC=/'
ping -c 3 -W 5 172.30.0.1 >/dev/null && echo GUEST_PING_OK
echo GUEST_READY
nc -l -p 7000 | sed 's/^/GUEST_GOT=/'
GUEST_EOF
mktap tap0 172.30.0.1/24
start_guest g.sh --net tap=tap0,mac=52:54:00:12:34:56
wait_console GUEST_READY
inns busybox ping -c 3 -W 5 172.30.0.2 >/dev/null && echo HOST_PING_OK
echo host-says-bye | inns busybox timeout 10 busybox nc 172.30.0.2 7000 || true
finish_guest
"#,
        )
        .check(|o| {
            status0(o)?;
            expect_output(o, "GUEST_MAC=52:54:00:12:34:56")?;
            expect_output(o, "GUEST_PING_OK")?;
            expect_output(o, "HOST_PING_OK")?;
            expect_output(o, "GUEST_GOT=host-says-bye")
        }),
        case(
            "net_tcp_64mib_both_ways",
            r#"
mkdir -p www
dd if=/dev/urandom of=www/h2g bs=1M count=64 2>/dev/null
md5sum www/h2g | sed 's/ .*/ HOST_H2G_MD5/'
cat > g.sh <<'GUEST_EOF'
ip link set eth0 up
ip addr add 172.30.0.2/24 dev eth0
mkdir -p /tmp/www
dd if=/dev/urandom of=/tmp/www/g2h bs=1M count=64 2>/dev/null
md5sum /tmp/www/g2h | sed 's/ .*/ GUEST_G2H_MD5/'
httpd -p 8080 -h /tmp/www
wget -q -O /tmp/h2g http://172.30.0.1:8080/h2g && md5sum /tmp/h2g | sed 's/ .*/ GUEST_H2G_MD5/'
echo GUEST_READY
nc -l -p 7000 >/dev/null
GUEST_EOF
mktap tap0 172.30.0.1/24
inns busybox httpd -p 8080 -h "$PWD/www"
start_guest g.sh --net tap=tap0
wait_console GUEST_READY
inns busybox wget -q -O g2h http://172.30.0.2:8080/g2h
md5sum g2h | sed 's/ .*/ HOST_G2H_MD5/'
echo done | inns busybox timeout 10 busybox nc 172.30.0.2 7000 || true
finish_guest
"#,
        )
        .check(|o| {
            status0(o)?;
            let md5 = |tag: &str| super::tagged_md5(o, tag);
            if md5("HOST_H2G_MD5")? != md5("GUEST_H2G_MD5")? {
                return Err("host->guest transfer corrupted".into());
            }
            if md5("GUEST_G2H_MD5")? != md5("HOST_G2H_MD5")? {
                return Err("guest->host transfer corrupted".into());
            }
            Ok(())
        }),
        case(
            "net_two_nics_link_flap_module_reload",
            r#"
cat > g.sh <<'GUEST_EOF'
ip link set eth0 up; ip addr add 172.30.0.2/24 dev eth0
ip link set eth1 up; ip addr add 172.31.0.2/24 dev eth1
ping -c 2 -W 5 172.30.0.1 >/dev/null && echo GUEST_NIC0_OK
ping -c 2 -W 5 172.31.0.1 >/dev/null && echo GUEST_NIC1_OK
ip link set eth0 down; ip link set eth0 up
ping -c 2 -W 5 172.30.0.1 >/dev/null && echo GUEST_FLAP_OK
m=$(find /lib/modules -name virtio_net.ko)
rmmod virtio_net && insmod "$m" && echo GUEST_RELOADED
n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
ip link set eth0 up; ip addr add 172.30.0.2/24 dev eth0
ping -c 2 -W 5 172.30.0.1 >/dev/null && echo GUEST_AFTER_RELOAD_OK
GUEST_EOF
mktap tap0 172.30.0.1/24
mktap tap1 172.31.0.1/24
start_guest g.sh --net tap=tap0 --net tap=tap1
finish_guest
"#,
        )
        .check(|o| {
            status0(o)?;
            for m in [
                "GUEST_NIC0_OK",
                "GUEST_NIC1_OK",
                "GUEST_FLAP_OK",
                "GUEST_RELOADED",
                "GUEST_AFTER_RELOAD_OK",
            ] {
                expect_output(o, m)?;
            }
            Ok(())
        }),
        case(
            "net_user_dhcp_wget_hostfwd",
            r#"
# --net user: no TAP. The namespace only needs an interface with a default route for passt
# to take its addresses from (a dummy one); the HTTP server is on the namespace's loopback,
# which passt maps to the gateway address it gives the guest.
inns $IP link add ext0 type dummy
inns $IP addr add 10.77.0.15/24 dev ext0
inns $IP link set ext0 up
inns $IP route add default via 10.77.0.1
mkdir -p www
dd if=/dev/urandom of=www/h2g bs=1M count=16 2>/dev/null
md5sum www/h2g | sed 's/ .*/ HOST_H2G_MD5/'
inns busybox httpd -p 127.0.0.1:8080 -h "$PWD/www"
cat > g.sh <<'GUEST_EOF'
cat > /tmp/dhcp.sh <<'DHCP_EOF'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add "$ip/$mask" dev "$interface"
[ -z "$mtu" ] || ip link set dev "$interface" mtu "$mtu"
ip route add default via "${router%% *}"
echo "${router%% *}" > /tmp/gw
echo "GUEST_DHCP_IP=$ip/$mask GUEST_DHCP_ROUTER=$router"
DHCP_EOF
chmod +x /tmp/dhcp.sh
ip link set eth0 up
udhcpc -i eth0 -f -q -n -t 10 -T 3 -s /tmp/dhcp.sh 2>/dev/null || echo GUEST_DHCP_FAILED
gw=$(cat /tmp/gw)
wget -q -O /tmp/h2g "http://$gw:8080/h2g" && md5sum /tmp/h2g | sed 's/ .*/ GUEST_H2G_MD5/'
nc -l -p 7000 > /tmp/got &
# Ready once the listener is in /proc/net/tcp (port 7000 = 0x1B58, state 0A = LISTEN).
n=0; until grep -q ':1B58 00000000:0000 0A' /proc/net/tcp || [ $n -gt 100 ]; do sleep 0.1; n=$((n+1)); done
echo GUEST_READY
wait
sed 's/^/GUEST_GOT=/' /tmp/got
GUEST_EOF
start_guest g.sh --net user,hostfwd=tcp:127.0.0.1:2222-:7000
wait_console GUEST_READY
echo hello-through-hostfwd | inns busybox timeout 20 busybox nc 127.0.0.1 2222 || echo "HOSTFWD_NC_STATUS=$?"
finish_guest
# passt is gone with ferrovm.
pids_matching "passt --foreground" >/dev/null && echo PASST_LEFT_RUNNING || echo PASST_GONE
# (the check itself must be able to fail: a running passt is found)
sleep 37 & sp=$!; pids_matching "sleep 37" >/dev/null && echo PIDS_MATCHING_WORKS; kill $sp
"#,
        )
        .check(|o| {
            status0(o)?;
            expect_output(o, "GUEST_DHCP_IP=10.77.0.15/24 GUEST_DHCP_ROUTER=10.77.0.1")?;
            let md5 = |tag: &str| super::tagged_md5(o, tag);
            if md5("HOST_H2G_MD5")? != md5("GUEST_H2G_MD5")? {
                return Err("HTTP download through passt corrupted".into());
            }
            expect_output(o, "GUEST_GOT=hello-through-hostfwd")?;
            expect_output(o, "PIDS_MATCHING_WORKS")?;
            expect_output(o, "PASST_GONE")
        }),
        case(
            "net_bad_mac_is_a_clear_error",
            r#"
set +e
"$FERROVM" run --kernel "$IMAGES/bzImage" --net tap=tap0,mac=01:00:5e:00:00:01 </dev/null 2>mcast.err
echo "MCAST_STATUS=$?"
sed 's/^/MCAST_ERR: /' mcast.err
"$FERROVM" run --kernel "$IMAGES/bzImage" --net tap=tap0,mac=zz:00 </dev/null 2>badmac.err
echo "BADMAC_STATUS=$?"
sed 's/^/BADMAC_ERR: /' badmac.err
"#,
        )
        .check(|o| {
            // (A missing TAP as root is created on demand; the no-permission errors are unit
            // tests with CAP_NET_ADMIN dropped, in src/devices/virtio/tap.rs.)
            for (k, err, words) in [
                ("MCAST_STATUS", "MCAST_ERR:", ["\"01:00:5e:00:00:01\"", "multicast"]),
                ("BADMAC_STATUS", "BADMAC_ERR:", ["\"zz:00\"", "invalid MAC address"]),
            ] {
                if value(o, k)? != 1 {
                    return Err(format!("{k} is not 1"));
                }
                // One line that names the bad value and says what is wrong with it.
                let lines: Vec<&str> = o
                    .output
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix(err))
                    .collect();
                match lines[..] {
                    [line] if words.iter().all(|w| line.contains(w)) => {}
                    _ => return Err(format!("{err} expected one line with {words:?}: {lines:?}")),
                }
            }
            Ok(())
        }),
    ]
}
