//! Linux-guest tests of ferrovm, run by the nested harness (tests/harness/mod.rs).
//! `cargo test --test nested [-- <substring>]`; see the harness docs for modes and knobs.

mod harness;

use harness::{expect_output, expect_status, Case};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let cases = vec![
        Case::new(
            "harness_kvm_selftest",
            r#"
set -e
echo "mode=$FERROVM_TEST_MODE"
ls -l /dev/kvm
if [ "$FERROVM_TEST_MODE" = nested ]; then
    grep ' /sys/kernel/debug debugfs ' /proc/mounts
    ls /sys/kernel/debug/kvm
fi
"$FERROVM" selftest
"#,
        )
        .timeout(Duration::from_secs(120))
        .check(|o| {
            expect_status(o, 0)?;
            expect_output(o, "selftest: ok")
        }),
        Case::new(
            "harness_timeout_fires",
            "echo sleeping-forever\nsleep 100000\necho woke-up\n",
        )
        .timeout(Duration::from_secs(5))
        .expect_timeout()
        .check(|o| {
            expect_output(o, "sleeping-forever")?;
            if o.output.contains("woke-up") {
                return Err("the script was not killed".into());
            }
            Ok(())
        }),
        // Runs after harness_timeout_fires: passing proves the harness continues after a timeout.
        Case::new("harness_exit_status", "echo about-to-exit-7\nexit 7\n")
            .timeout(Duration::from_secs(30))
            .check(|o| {
                expect_status(o, 7)?;
                expect_output(o, "about-to-exit-7")
            }),
        Case::new(
            "harness_mkinitrd_helper",
            r#"
set -e
printf 'echo hello from test.sh\n' > t.sh
echo extra > extra.txt
mkinitrd_with_test t.sh initrd.img extra.txt
base=$(( ($(wc -c < "$IMAGES/initramfs.cpio.gz") + 3) / 4 * 4 ))
tail -c +$((base + 1)) initrd.img | "$BUSYBOX" cpio -t
"#,
        )
        .timeout(Duration::from_secs(60))
        .check(|o| {
            expect_status(o, 0)?;
            expect_output(o, "test.sh")?;
            expect_output(o, "extra.txt")
        }),
    ];
    harness::run(cases)
}
