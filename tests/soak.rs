//! Soak (issue 13): sequential VM runs directly on /dev/kvm, each sampled while its guest runs:
//! the ferrovm process's open fds, threads and resident memory must be the same in every run,
//! and every run must end with status 0. FERROVM_SOAK_RUNS sets the count (50 by default, a
//! CI-sized run; `scripts/soak` runs 200 and prints the figures).
//!
//! The guest is firmware/exits.S in its `wait` mode (loops on the bench device and COM1 until
//! a byte arrives, then powers off) with a virtio-blk disk, virtio-rng and the bench device:
//! each run is a whole VM lifetime (KVM VM and vCPU fds, guest RAM, PCI devices, the event
//! loop and console threads) in a fresh process.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use support::{forward_lines, wait_for, KillOnDrop, HANG_GUARD};

const FERROVM: &str = env!("CARGO_BIN_EXE_ferrovm");

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrovm-soak-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One run's figures, sampled once the guest is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    fds: usize,
    threads: usize,
    rss_kb: u64,
}

fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn sample(pid: u32) -> Sample {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    // KVM's own worker (kvm-nx-lpage-recovery) lives in the process's thread group on newer
    // kernels and starts when KVM decides: not one of ferrovm's threads.
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| !comm.starts_with("kvm-"))
                .count()
        })
        .unwrap_or(0);
    Sample {
        fds,
        threads,
        rss_kb: status_field(pid, "VmRSS:"),
    }
}

/// Runs one VM to its end; returns the sample taken while the guest waited.
fn one_run(guest: &Path, disk: &Path) -> Sample {
    let mut child = KillOnDrop::spawn(
        Command::new(FERROVM)
            .args(["run", "--kernel"])
            .arg(guest)
            .args([
                "--cmdline",
                "wait",
                "--bench-device",
                "--rng",
                "--memory",
                "64M",
            ])
            .arg("--disk")
            .arg(format!("path={}", disk.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    forward_lines(child.stdout.take().unwrap(), tx);
    wait_for(&rx, "wait: ready");
    // The event loop and console threads start beside the guest: sample a settled process,
    // two samples 100 ms apart that agree (the guest waits for its byte as long as it takes).
    let mut s = sample(child.id());
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let next = sample(child.id());
        if (next.fds, next.threads) == (s.fds, s.threads) {
            break;
        }
        s = next;
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"q").unwrap();
    stdin.flush().unwrap();
    wait_for(&rx, "wait: done");
    let status = child.wait_timeout(HANG_GUARD).unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "run ended {status:?}"
    );
    s
}

#[test]
fn sequential_vm_runs_hold_fds_threads_and_memory_flat() {
    let runs: usize = std::env::var("FERROVM_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = scratch();
    let guest = dir.join("exits.elf");
    std::fs::write(&guest, ferrovm::firmware::get("exits").unwrap()).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let start = std::time::Instant::now();
    let samples: Vec<Sample> = (0..runs).map(|_| one_run(&guest, &disk)).collect();
    let secs = start.elapsed().as_secs_f64();
    let col = |f: fn(&Sample) -> u64| {
        let v: Vec<u64> = samples.iter().map(f).collect();
        let (min, max) = (*v.iter().min().unwrap(), *v.iter().max().unwrap());
        (v[0], *v.last().unwrap(), min, max)
    };
    let fds = col(|s| s.fds as u64);
    let threads = col(|s| s.threads as u64);
    let rss = col(|s| s.rss_kb);
    println!("soak: {runs} runs in {secs:.1} s, 0 failures");
    println!("| figure | first | last | min | max |");
    println!("|---|---:|---:|---:|---:|");
    for (name, (first, last, min, max)) in
        [("open fds", fds), ("threads", threads), ("RSS KiB", rss)]
    {
        println!("| {name} | {first} | {last} | {min} | {max} |");
    }
    assert_eq!(fds.2, fds.3, "open fds differ between runs: {samples:?}");
    assert_eq!(
        threads.2, threads.3,
        "threads differ between runs: {samples:?}"
    );
    // Separate processes: resident memory may differ by what the allocator and the page
    // cache make of the same work, not by a trend.
    assert!(
        rss.3 - rss.2 <= 4096,
        "RSS ranges over {} KiB between runs: {samples:?}",
        rss.3 - rss.2
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
