//! Fast tier: the VM-exit observatory, with firmware/exits.S and firmware/bench.S run by the
//! real binary on /dev/kvm. Everything asserted is a count, never a time.
//!
//! The bench device (ports 0x700.., MMIO 0xe100_0000) is only attached with `--bench-device`
//! (`bench-exits` attaches it itself): every `run` of firmware/exits.S passes it.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{forward_lines, wait_for, KillOnDrop};

const FERROVM: &str = env!("CARGO_BIN_EXE_ferrovm");
/// Only a guard against a hung guest, not an assertion on speed.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrovm-exits-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn firmware(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.elf"));
    std::fs::write(&p, ferrovm::firmware::get(name).unwrap()).unwrap();
    p
}

fn port<'a>(v: &'a Value, port: u64, dir: &str) -> Option<&'a Value> {
    v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port && p["dir"] == dir)
}

/// The number in the table row whose first column is `first` (and that contains `also`).
fn table_row(table: &str, first: &str, also: &str) -> Vec<u64> {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first) && l.contains(also))
        .unwrap_or_else(|| panic!("no row {first} {also} in:\n{table}"));
    line.split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Runs firmware/exits.S with `--cmdline count` (plus `extra`) and the JSON statistics in
/// `json`; returns the run's output and the parsed statistics.
fn run_count(fw: &Path, json: &Path, extra: &[&str]) -> (std::process::Output, Value) {
    let o = support::output(
        Command::new(FERROVM)
            .args(["run", "--kernel"])
            .arg(fw)
            .args(["--cmdline", "count"])
            .args(extra)
            .arg(format!("--exit-stats=json:{}", json.display()))
            .arg("--exit-stats"),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let v = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (o, v)
}

#[test]
fn each_exit_kind_is_counted_exactly_and_json_matches_table() {
    let dir = scratch("count");
    let fw = firmware(&dir, "exits");
    let json = dir.join("stats.json");
    let (o, v) = run_count(&fw, &json, &["--bench-device"]);
    let err = String::from_utf8_lossy(&o.stderr);

    // The dedicated port and MMIO addresses: exactly what the firmware did.
    let out = port(&v, 0x700, "out").unwrap();
    assert_eq!(out["count"], 100);
    assert_eq!(out["device"], "bench");
    assert_eq!(port(&v, 0x700, "in").unwrap()["count"], 70);
    let unclaimed = port(&v, 0x720, "out").unwrap();
    assert_eq!(unclaimed["count"], 10);
    assert_eq!(unclaimed["device"], "unclaimed");
    assert_eq!(v["mmio"]["bench"]["write"], 50);
    assert_eq!(v["mmio"]["bench"]["read"], 30);
    assert_eq!(v["mmio"]["unclaimed"]["read"], 20);
    assert_eq!(v["mmio"]["unclaimed"]["write"], 0);
    // Those are the only MMIO exits; cpuid is handled in the kernel and never counted.
    assert_eq!(v["reasons"]["mmio-write"], 50);
    assert_eq!(v["reasons"]["mmio-read"], 50);
    assert_eq!(v["reasons"]["other"], 0);
    assert_eq!(v["reasons"]["internal-error"], 0);
    // The power-off is one more port write (ACPI PM1a control).
    assert_eq!(port(&v, 0x604, "out").unwrap()["count"], 1);
    let io_out = v["reasons"]["io-out"].as_u64().unwrap();
    let port_out: u64 = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["dir"] == "out")
        .map(|p| p["count"].as_u64().unwrap())
        .sum();
    assert_eq!(io_out, port_out, "every port write is in the port table");

    // Totals add up: reasons, vCPUs, histogram counts.
    let total = v["total"].as_u64().unwrap();
    let reasons: u64 = v["reasons"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(total, reasons);
    assert_eq!(v["vcpus"][0]["total"], total);
    for (name, h) in v["handling_ns"].as_object().unwrap() {
        assert_eq!(h["count"], v["reasons"][name], "histogram of {name}");
        let in_buckets: u64 = h["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b[1].as_u64().unwrap())
            .sum();
        assert_eq!(h["count"].as_u64(), Some(in_buckets));
    }

    // The table printed at the end shows the same figures.
    assert!(err.contains(&format!("{total} exits")), "{err}");
    for (name, n) in v["reasons"].as_object().unwrap() {
        if n.as_u64() != Some(0) {
            let row = table_row(&err, name, "");
            assert_eq!(Some(row[0]), n.as_u64(), "{name}");
            let h = &v["handling_ns"][name];
            assert_eq!(
                row[row.len() - 3..],
                [
                    h["mean_ns"].as_u64().unwrap(),
                    h["p50_ns"].as_u64().unwrap(),
                    h["p99_ns"].as_u64().unwrap()
                ]
            );
        }
    }
    assert_eq!(table_row(&err, "0x0700", "out")[0], 100);
    assert_eq!(table_row(&err, "0x0700", " in ")[0], 70);
    assert_eq!(table_row(&err, "0x0720", "unclaimed")[0], 10);
    assert_eq!(table_row(&err, "bench", ""), [30, 50]);
    assert_eq!(table_row(&err, "unclaimed", ""), [20, 0]);
    assert_eq!(table_row(&err, "vcpu0", ""), [total]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_bench_device_its_ports_and_mmio_are_unclaimed() {
    let dir = scratch("nobench");
    let fw = firmware(&dir, "exits");
    let json = dir.join("stats.json");
    let (_, v) = run_count(&fw, &json, &[]);
    let out = port(&v, 0x700, "out").unwrap();
    assert_eq!(out["count"], 100);
    assert_eq!(out["device"], "unclaimed");
    assert_eq!(port(&v, 0x700, "in").unwrap()["device"], "unclaimed");
    // The bench page's 50 writes and 30 reads land with the 20 reads at 0xe2000000.
    assert_eq!(v["mmio"]["unclaimed"]["write"], 50);
    assert_eq!(v["mmio"]["unclaimed"]["read"], 50);
    for dir in ["read", "write"] {
        assert_eq!(v["mmio"]["bench"][dir].as_u64().unwrap_or(0), 0, "{v}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_exit_stats_value_is_a_one_line_error() {
    let o = support::output(Command::new(FERROVM).args([
        "run",
        "--kernel",
        "/nonexistent",
        "--exit-stats=xml",
    ]))
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("invalid --exit-stats 'xml'"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
}

/// The count in the live table's row for the bench data port, if it has one.
fn bench_port_count(table: &[String]) -> Option<u64> {
    let row = table
        .iter()
        .find(|l| l.starts_with("0x0700") && l.contains("bench"))?;
    row.split_whitespace().nth(1)?.parse().ok()
}

/// Asks for live figures with SIGUSR1 until the table shows the guest's bench port writes and
/// returns their count. The guest prints "wait: ready" just before its first write to port
/// 0x700, so a table asked for on that line may predate the write (and have no 0x0700 row):
/// ask again rather than race the vCPU.
fn live_bench_writes(child: &KillOnDrop, err_rx: &mpsc::Receiver<String>) -> u64 {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        child.signal(libc::SIGUSR1);
        wait_for(err_rx, "live, SIGUSR1");
        let table = wait_for(err_rx, "vcpu0");
        match bench_port_count(&table) {
            Some(n) if n > 0 => return n,
            _ if Instant::now() > deadline => {
                panic!("no bench port writes in the live table: {table:#?}")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn sigusr1_and_console_escape_print_live_figures_while_the_guest_runs() {
    let dir = scratch("live");
    let fw = firmware(&dir, "exits");
    let mut child = KillOnDrop::spawn(
        Command::new(FERROVM)
            .args(["run", "--kernel", fw.to_str().unwrap(), "--cmdline", "wait"])
            .arg("--bench-device")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let (out_tx, out_rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    forward_lines(child.stdout.take().unwrap(), out_tx);
    forward_lines(child.stderr.take().unwrap(), err_tx);
    // The guest loops (port writes, polling COM1) until a byte arrives on its serial input.
    wait_for(&out_rx, "wait: ready");
    let first = live_bench_writes(&child, &err_rx);
    // Still running: the count only grows.
    assert!(live_bench_writes(&child, &err_rx) >= first);

    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\x01s").unwrap();
    stdin.flush().unwrap();
    wait_for(&err_rx, "live, C-a s");
    wait_for(&err_rx, "vcpu0");
    // Both times the guest kept running: now let it finish.
    stdin.write_all(b"q").unwrap();
    stdin.flush().unwrap();
    wait_for(&out_rx, "wait: done");
    let status = child.wait_timeout(HANG_GUARD).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    drop(stdin);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_exits_runs_every_kind_against_the_raw_loop() {
    let o = support::output(Command::new(FERROVM).args(["bench-exits", "-n", "20", "-r", "3"]))
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for kind in ferrovm::bench::KINDS {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("| {} |", kind.name)))
            .unwrap_or_else(|| panic!("no {} row in:\n{out}", kind.name));
        assert_eq!(row.matches('|').count(), 8, "{row}");
    }
    assert!(out.contains("exit statistics overhead"), "{out}");
    let bad =
        support::output(Command::new(FERROVM).args(["bench-exits", "--only", "teleport"])).unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn fw_cfg_answers_like_qemu() {
    let dir = scratch("fwcfg");
    let fw = firmware(&dir, "fwcfg");
    for (cpus, mem, value) in [("2", "64M", 0x32), ("3", "128M", 0x23)] {
        let o = support::output(
            Command::new(FERROVM)
                .args(["run", "--kernel", fw.to_str().unwrap()])
                .args(["--cpus", cpus, "--memory", mem]),
        )
        .unwrap();
        assert_eq!(
            o.status.code(),
            Some((value << 1) | 1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
