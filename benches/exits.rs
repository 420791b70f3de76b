//! `ferrovm bench-exits` in both places the project can run it, in one command:
//! on this host's /dev/kvm, and inside the nested harness's L1 (real KVM with emulated AMD-V),
//! where exits are expensive and KVM is the real one.
//!
//! `cargo bench --bench exits` (as root, after `scripts/setup-host`). Prints both tables.

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ARGS: &str = "-n 1000 -r 21";

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        println!("exits: bench");
        return ExitCode::SUCCESS;
    }
    let ferrovm = env!("CARGO_BIN_EXE_ferrovm");
    println!("== ferrovm bench-exits {ARGS} on this host's /dev/kvm");
    let host = Command::new(ferrovm)
        .arg("bench-exits")
        .args(ARGS.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .expect("run ferrovm bench-exits");
    print!("{}", String::from_utf8_lossy(&host.stdout));
    eprint!("{}", String::from_utf8_lossy(&host.stderr));

    let nested: Arc<Mutex<String>> = Arc::default();
    let sink = nested.clone();
    let case = harness::Case::new(
        "bench_exits_in_l1",
        &format!("\"$FERROVM\" bench-exits {ARGS}\n"),
    )
    .timeout(Duration::from_secs(900))
    .check(move |o| {
        *sink.lock().unwrap_or_else(|e| e.into_inner()) = o.output.clone();
        harness::expect_status(o, 0)
    });
    let status = harness::run_with(vec![case], harness::Config::from_env());
    println!("\n== ferrovm bench-exits {ARGS} inside L1 (nested harness)");
    print!("{}", nested.lock().unwrap_or_else(|e| e.into_inner()));
    if host.status.success() {
        status
    } else {
        ExitCode::FAILURE
    }
}
