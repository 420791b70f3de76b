//! `ferrovm run -- CMD` (issue 12): one command in a throwaway VM whose root is L1's own `/`
//! over virtio-fs, its streams and exit status passed back.

use std::time::Duration;

use super::status;
use crate::harness::{expect_output, Case, CaseOutput};
use crate::value;

const SCRIPT: &str = r#"set -e
echo l1-hostname-for-ferrovm > /etc/hostname
R() { "$FERROVM" run --kernel "$IMAGES/bzImage" "$@"; }
set +e
R -- sh -c 'echo out; echo err >&2; cat /etc/hostname; pwd; echo made-in-guest > created.txt;
    echo x > /etc/written-in-guest && echo OVERLAY_WRITE_OK; exit 7' >out1 2>err1
echo "STATUS_BASIC=$?"
sed 's/^/OUT1 /' out1; sed 's/^/ERR1 /' err1
echo "HOST_SEES=$(cat created.txt)"
[ -e /etc/written-in-guest ] && echo HOST_ROOT_CHANGED || echo HOST_ROOT_UNTOUCHED
head -c 100000 /dev/urandom > in.bin
R -- md5sum < in.bin > out2 2>err2
echo "STATUS_STDIN=$?"
echo "GUEST_STDIN_MD5=$(cut -d' ' -f1 out2)"
echo "HOST_STDIN_MD5=$(md5sum < in.bin | cut -d' ' -f1)"
( R -- yes 2>/dev/null; echo $? > pipe.status ) | head -n 1 > pipe.out
echo "STATUS_PIPE=$(cat pipe.status)"
echo "PIPE_OUT=$(cat pipe.out)"
R -- sh -c 'kill -9 $$' >/dev/null 2>&1
echo "STATUS_KILLED=$?"
R -- /no/such/program >/dev/null 2>err4
echo "STATUS_NOT_FOUND=$?"
sed 's/^/ERR4 /' err4
R -- sh -c 'echo c > /proc/sysrq-trigger; sleep 30' >/dev/null 2>err5
echo "STATUS_PANIC=$?"
sed 's/^/ERR5 /' err5
# (not through R: the signal must reach ferrovm, not a subshell)
"$FERROVM" run --kernel "$IMAGES/bzImage" -- sh -c 'echo started; exec sleep 300' >out6 2>&1 &
pid=$!
wait_for_line out6 started $pid
kill -INT $pid
wait $pid
echo "STATUS_CTRL_C=$?"
pids_matching "shared-dir" >/dev/null && echo VIRTIOFSD_LEFT_RUNNING || echo VIRTIOFSD_GONE
true
"#;

fn check(o: &CaseOutput) -> Result<(), String> {
    status(o, "STATUS_BASIC", 7)?;
    for m in [
        "OUT1 out",
        "ERR1 err",
        "OUT1 l1-hostname-for-ferrovm",
        "OUT1 OVERLAY_WRITE_OK",
        "HOST_SEES=made-in-guest",
        "HOST_ROOT_UNTOUCHED",
        "VIRTIOFSD_GONE",
    ] {
        expect_output(o, m)?;
    }
    if o.output.contains("OUT1 err") || o.output.contains("ERR1 out") {
        return Err("stdout and stderr mixed".into());
    }
    status(o, "STATUS_STDIN", 0)?;
    let md5 = |k: &str| {
        o.output
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::to_string)
            .ok_or(format!("no {k}"))
    };
    if md5("GUEST_STDIN_MD5=")? != md5("HOST_STDIN_MD5=")? {
        return Err("stdin did not reach the command intact".into());
    }
    // stdout closed by the reader: the run ends, the guest's writer sees EPIPE (busybox
    // `yes` then exits 1; a writer killed by SIGPIPE would give 141).
    expect_output(o, "PIPE_OUT=y")?;
    if value(o, "STATUS_PIPE")? == 0 {
        return Err("yes | head: the guest's writer never saw the closed pipe".into());
    }
    status(o, "STATUS_KILLED", 137)?;
    status(o, "STATUS_NOT_FOUND", 127)?;
    expect_output(
        o,
        "ERR4 ferrovm: /no/such/program: No such file or directory",
    )?;
    status(o, "STATUS_PANIC", 124)?;
    expect_output(o, "ERR5 ferrovm: the guest kernel panicked")?;
    status(o, "STATUS_CTRL_C", 130)
}

pub fn cases() -> Vec<Case> {
    vec![
        Case::new("run_command_streams_status_signals_panic_ctrl_c", SCRIPT)
            .timeout(Duration::from_secs(600))
            .check(check),
    ]
}
