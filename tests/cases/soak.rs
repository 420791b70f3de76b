//! Soak and crash consistency under a real guest (issue 13). CI runs short versions;
//! `scripts/soak` runs the published sizes (FERROVM_SOAK_BOOTS, FERROVM_SOAK_KILLS).
//!
//! - `soak_sequential_linux_boots`: N boots of the stock kernel one after the other, each with
//!   a virtio-blk disk (so its worker runs); while each guest runs, ferrovm's
//!   open fds, threads and RSS are sampled. Every boot ends with status 0, fds and threads are
//!   the same every time, RSS stays within a band (guest RAM is touched differently by each
//!   boot, in 2 MiB pages).
//! - `soak_sigkill_keeps_every_acked_record`: the guest writes numbered 512-byte records to
//!   its disk with `fsync` after each and prints `ACK n` once it returns; ferrovm is SIGKILLed
//!   at a random moment; every acknowledged record must be on the image. Raw and qcow2 (the
//!   qcow2 must also pass `qemu-img check`, leaked clusters allowed, as documented in
//!   src/disk/qcow2).
//! - `soak_hostile_guest_hammers_every_device`: tests/guest/hammer.c pokes every virtio
//!   function (blk, rng, vsock, the virtio-scsi CD-ROM) and the legacy ports at random for
//!   FERROVM_SOAK_HAMMER_SECS (30; `scripts/soak`: 600): ferrovm must keep serving (the guest
//!   finishes and powers off, status 0), its RSS must stay flat and its log bounded.

use std::time::Duration;

use crate::harness::{Case, CaseOutput};

fn env_count(key: &str, default: u32) -> u32 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

const BOOT_LOOP: &str = r#"set -e
trap 'rm -f t.sh initrd.img disk.img out.log' EXIT
# The guest stays up long enough to be sampled even with the other core busy.
printf 'echo SOAK-READY\nsleep 6\n' > t.sh
mkinitrd_with_test t.sh initrd.img
truncate -s 16M disk.img
i=1
while [ $i -le $BOOTS ]; do
    "$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 256M \
        --disk path=disk.img --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" \
        </dev/null >out.log 2>&1 &
    pid=$!
    wait_for_line out.log SOAK-READY $pid
    sleep 0.5
    fds=$(ls /proc/$pid/fd | wc -l)
    # (not KVM's own kvm-* worker threads, which newer kernels put in the thread group)
    thr=$(cat /proc/$pid/task/*/comm | grep -v -c '^kvm-' || true)
    rss=$(awk '/^VmRSS:/ { print $2 }' /proc/$pid/status || true)
    # A sample taken after the VM ended is worthless: say so instead of reporting it.
    kill -0 $pid 2>/dev/null || echo "SOAK_SAMPLE_LATE $i"
    set +e; wait $pid; st=$?; set -e
    echo "SOAK_BOOT $i fds=$fds threads=$thr rss_kb=$rss status=$st"
    i=$((i + 1))
done
"#;

const CRASH_LOOP: &str = r#"set -e
trap 'rm -f t.sh initrd.img rec.img flat.raw out.log' EXIT
cat > t.sh <<'EOF'
n=0
while [ $n -lt 100000 ]; do
    printf 'REC%08d' $n | dd of=/dev/vda bs=512 seek=$n count=1 conv=sync,notrunc,fsync 2>/dev/null \
        || { echo "WRITE_FAILED $n"; break; }
    echo "ACK $n"
    n=$((n + 1))
done
EOF
mkinitrd_with_test t.sh initrd.img
# verify IMAGE LAST: prints how many of records 0..LAST are not on IMAGE.
verify() {
    bad=0; j=0
    while [ $j -le $2 ]; do
        got=$(dd if="$1" bs=512 skip=$j count=1 2>/dev/null | head -c 11)
        [ "$got" = "$(printf 'REC%08d' $j)" ] || bad=$((bad + 1))
        j=$((j + 1))
    done
    echo $bad
}
for fmt in raw qcow2; do
    k=1
    while [ $k -le $KILLS ]; do
        rm -f rec.img
        if [ $fmt = raw ]; then truncate -s 64M rec.img; else qemu-img create -q -f qcow2 rec.img 64M; fi
        "$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 256M \
            --disk path=rec.img,format=$fmt --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" \
            </dev/null >out.log 2>&1 &
        pid=$!
        wait_for_line out.log "ACK 0" $pid
        sleep $((RANDOM % 4 + 1))
        kill -9 $pid
        set +e; wait $pid; set -e
        last=$(grep -a -o 'ACK [0-9]*' out.log | tail -n 1 | cut -d' ' -f2)
        check=none
        img=rec.img
        if [ $fmt = qcow2 ]; then
            set +e; qemu-img check rec.img >check.log 2>&1; check=$?; set -e
            qemu-img convert -f qcow2 -O raw rec.img flat.raw
            img=flat.raw
        fi
        echo "CRASH fmt=$fmt kill=$k acked=$last missing=$(verify $img $last) check=$check"
        rm -f flat.raw check.log
        k=$((k + 1))
    done
done
"#;

const HAMMER: &str = r#"set -e
trap 'rm -f t.sh initrd.img disk.img out.log err.log' EXIT
printf '/hammer %s\n' $SECS > t.sh
mkinitrd_with_test t.sh initrd.img "$FILES/hammer"
truncate -s 16M disk.img
"$FERROVM" run --kernel "$IMAGES/bzImage" --initramfs initrd.img --memory 256M \
    --disk path=disk.img --rng --cdrom /images/boot.iso --vsock cid=3,socket=$WORK/hv.sock \
    --cmdline "console=ttyS0 panic=1 ferrovm.test=/test.sh" </dev/null >out.log 2>err.log &
pid=$!
wait_for_line out.log "HAMMER devices=" $pid
rss() { awk '/^VmRSS:/ { print $2 }' /proc/$pid/status 2>/dev/null || echo 0; }
first=$(rss); max=$first; last=$first
while kill -0 $pid 2>/dev/null; do
    r=$(rss); [ -n "$r" ] && [ "$r" != 0 ] && { last=$r; [ $r -gt $max ] && max=$r; }
    sleep 5
done
set +e; wait $pid; st=$?; set -e
grep -a -E 'HAMMER' out.log | tail -n 3
echo "HAMMER_RESULT status=$st rss_first=$first rss_max=$max rss_last=$last log_bytes=$(wc -c < err.log) log_lines=$(wc -l < err.log)"
head -c 2000 err.log | sed 's/^/FERROVM-LOG: /'
"#;

fn check_hammer(o: &CaseOutput) -> Result<(), String> {
    if !o.output.contains("HAMMER-DONE") {
        return Err("the hostile guest did not finish its run".into());
    }
    let rows = rows(o, "HAMMER_RESULT ");
    let r = rows.first().ok_or("no HAMMER_RESULT line")?;
    if num(r, "status")? != 0 {
        return Err(format!("ferrovm ended with a non-zero status: {r:?}"));
    }
    let (first, max) = (num(r, "rss_first")?, num(r, "rss_max")?);
    if max.saturating_sub(first) > 32 << 10 {
        return Err(format!("ferrovm's RSS grew from {first} to {max} KiB"));
    }
    // Rate-limited messages: a bounded log however long the guest keeps at it.
    if num(r, "log_bytes")? > 64 << 10 {
        return Err(format!("ferrovm logged more than 64 KiB: {r:?}"));
    }
    Ok(())
}

/// The `key=N` fields of the output lines starting with `tag`.
fn rows(o: &CaseOutput, tag: &str) -> Vec<Vec<(String, String)>> {
    o.output
        .lines()
        .filter_map(|l| l.trim().strip_prefix(tag))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn field(row: &[(String, String)], key: &str) -> Result<String, String> {
    row.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| format!("no {key}= in {row:?}"))
}

fn num(row: &[(String, String)], key: &str) -> Result<u64, String> {
    field(row, key)?
        .parse()
        .map_err(|e| format!("{key}: {e} in {row:?}"))
}

fn check_boots(o: &CaseOutput, boots: u32) -> Result<(), String> {
    let rows = rows(o, "SOAK_BOOT ");
    if let Some(late) = o.output.lines().find(|l| l.starts_with("SOAK_SAMPLE_LATE")) {
        return Err(format!("{late}: the guest had ended before it was sampled"));
    }
    if rows.len() != boots as usize {
        return Err(format!("{} of {boots} boots reported", rows.len()));
    }
    let mut figures = Vec::new();
    for r in &rows {
        if num(r, "status")? != 0 {
            return Err(format!("a boot ended with a non-zero status: {r:?}"));
        }
        figures.push((num(r, "fds")?, num(r, "threads")?, num(r, "rss_kb")?));
    }
    let range = |f: fn(&(u64, u64, u64)) -> u64| {
        let v: Vec<u64> = figures.iter().map(f).collect();
        (
            v[0],
            v[v.len() - 1],
            *v.iter().min().unwrap(),
            *v.iter().max().unwrap(),
        )
    };
    let (fds, thr, rss) = (range(|f| f.0), range(|f| f.1), range(|f| f.2));
    println!("SOAK figures over {boots} boots (first/last/min/max): fds {fds:?} threads {thr:?} rss_kb {rss:?}");
    if fds.2 != fds.3 || thr.2 != thr.3 {
        return Err(format!(
            "fds {fds:?} or threads {thr:?} differ between boots"
        ));
    }
    // A band, not a trend: 16 MiB or 10 % of the first boot's RSS.
    if rss.3 - rss.2 > (16 << 10).max(rss.0 / 10) {
        return Err(format!("RSS ranges over {rss:?} KiB"));
    }
    Ok(())
}

fn check_kills(o: &CaseOutput, kills: u32) -> Result<(), String> {
    let rows = rows(o, "CRASH ");
    if rows.len() != 2 * kills as usize {
        return Err(format!("{} of {} kills reported", rows.len(), 2 * kills));
    }
    for r in &rows {
        num(r, "acked")?;
        if num(r, "missing")? != 0 {
            return Err(format!("acknowledged records lost: {r:?}"));
        }
        // qemu-img check: 0 clean, 3 leaked clusters only.
        let check = field(r, "check")?;
        if field(r, "fmt")? == "qcow2" && check != "0" && check != "3" {
            return Err(format!("qemu-img check status {check}: {r:?}"));
        }
    }
    Ok(())
}

pub fn cases() -> Vec<Case> {
    // CI sizes (the nested tier's time budget); scripts/soak runs the published ones.
    let boots = env_count("FERROVM_SOAK_BOOTS", 2).max(2);
    let kills = env_count("FERROVM_SOAK_KILLS", 1);
    let hammer_secs = env_count("FERROVM_SOAK_HAMMER_SECS", 30);
    let hammer = crate::harness::guest_program("hammer");
    vec![
        Case::new(
            "soak_sequential_linux_boots",
            &format!("BOOTS={boots}\n{BOOT_LOOP}"),
        )
        .timeout(Duration::from_secs(120 + 60 * u64::from(boots)))
        .check(move |o| check_boots(o, boots)),
        Case::new(
            "soak_sigkill_keeps_every_acked_record",
            &format!("KILLS={kills}\n{CRASH_LOOP}"),
        )
        .timeout(Duration::from_secs(120 + 2 * 70 * u64::from(kills)))
        .check(move |o| check_kills(o, kills)),
        Case::new(
            "soak_hostile_guest_hammers_every_device",
            &format!("SECS={hammer_secs}\n{HAMMER}"),
        )
        .requires(
            &hammer,
            "gcc -static tests/guest/hammer.c failed: install gcc and libc6-dev",
        )
        .file(hammer, "hammer")
        .timeout(Duration::from_secs(180 + u64::from(hammer_secs)))
        .check(check_hammer),
    ]
}
