//! `ferrovm bench-exits`: what one VM exit costs, through ferrovm and through a bare KVM_RUN
//! loop ([`raw`]), for each kind of exit. The guest is firmware/bench.S; the host side of
//! its protocol is the bench device ([`device`]).
//!
//! Each kind runs R repetitions of N round trips. A repetition is timed on the host (wall
//! clock between the guest's start and end marks, so it spans N KVM_RUN round trips) and in
//! the guest (rdtsc delta, converted with the TSC frequency KVM reports). Reported: median
//! and p99 over the repetitions of ns per round trip. Runs of ferrovm and raw alternate so
//! that drift in a noisy machine hits both.

pub mod device;
pub mod kut;
pub mod raw;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::{SerialMode, VmConfig};
use crate::vmm::{self, VmOutcome};
use device::BenchLog;

/// What failed while benchmarking.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("bench setup: {0}")]
    Setup(String),
    #[error("bench I/O")]
    Io(#[source] std::io::Error),
    #[error("bench guest: {0}")]
    Guest(String),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
}

/// An exit kind: the name in the report and the guest's command line.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub name: &'static str,
    pub code: &'static str,
    pub what: &'static str,
}

/// Every kind, in report order.
pub const KINDS: &[Kind] = &[
    Kind {
        name: "pio-out",
        code: "piow",
        what: "out to a userspace device",
    },
    Kind {
        name: "pio-in",
        code: "pior",
        what: "in from a userspace device",
    },
    Kind {
        name: "mmio-read",
        code: "mmrd",
        what: "read of a userspace MMIO page",
    },
    Kind {
        name: "mmio-write",
        code: "mmwr",
        what: "write to a userspace MMIO page",
    },
    Kind {
        name: "ioeventfd-pio",
        code: "ioev",
        what: "out to a port KVM answers with an ioeventfd",
    },
    Kind {
        name: "ioeventfd-mmio",
        code: "mmev",
        what: "MMIO write KVM answers with an ioeventfd",
    },
    Kind {
        name: "cpuid",
        code: "cpui",
        what: "in-kernel exit",
    },
    Kind {
        name: "rdmsr",
        code: "rdms",
        what: "rdmsr IA32_APIC_BASE, in-kernel",
    },
    Kind {
        name: "hlt-irqfd",
        code: "halt",
        what: "HLT woken by an IOAPIC interrupt from a host irqfd",
    },
];

/// Benchmark options.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Round trips per repetition (rounded up to a multiple of 10).
    pub round_trips: u32,
    pub reps: u32,
    /// Kind names to run (empty: all).
    pub only: Vec<String>,
    /// A built kvm-unit-tests checkout: its vmexit rows join the report.
    pub kvm_unit_tests: Option<PathBuf>,
}

/// Median and p99 of ns per round trip over the repetitions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub host_p50: f64,
    pub host_p99: f64,
    pub guest_p50: f64,
    pub guest_p99: f64,
}

/// The results of one kind.
#[derive(Debug, Clone)]
pub struct KindResult {
    pub kind: Kind,
    pub raw: Figures,
    pub ferrovm: Figures,
}

/// Nearest-rank percentile of `v` (sorted in place).
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn figures(log: &BenchLog, n: u32, tsc_khz: u32) -> Figures {
    let n = f64::from(n);
    let mut host: Vec<f64> = log.host_ns.iter().map(|&t| t as f64 / n).collect();
    let mut guest: Vec<f64> = log
        .guest_tsc
        .iter()
        .map(|&t| t as f64 * 1e6 / f64::from(tsc_khz.max(1)) / n)
        .collect();
    Figures {
        host_p50: percentile(&mut host, 0.5),
        host_p99: percentile(&mut host, 0.99),
        guest_p50: percentile(&mut guest, 0.5),
        guest_p99: percentile(&mut guest, 0.99),
    }
}

/// Runs the bench firmware through ferrovm's own VMM (`vmm::run`).
fn run_ferrovm(
    kernel: &Path,
    code: &str,
    params: Vec<u32>,
    record: bool,
) -> Result<BenchLog, BenchError> {
    let log = Arc::new(Mutex::new(BenchLog::new(params)));
    let cfg = VmConfig {
        cmdline: code.into(),
        mem_size: 64 << 20,
        serial: SerialMode::Off,
        record_exits: record,
        bench: Some(log.clone()),
        ..VmConfig::with_kernel(kernel.to_path_buf())
    };
    match vmm::run(cfg)? {
        VmOutcome::PowerOff => {}
        other => return Err(BenchError::Guest(format!("ferrovm run ended: {other:?}"))),
    }
    let log = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(log)
}

fn check(log: &BenchLog, reps: u32, what: &str) -> Result<(), BenchError> {
    if log.host_ns.len() != reps as usize || log.guest_tsc.len() != reps as usize {
        return Err(BenchError::Guest(format!(
            "{what}: {} host and {} guest samples, {reps} expected",
            log.host_ns.len(),
            log.guest_tsc.len()
        )));
    }
    Ok(())
}

/// The whole report.
pub struct Report {
    pub results: Vec<KindResult>,
    pub tsc_khz: u32,
    /// pio-out ns per round trip (host median): ferrovm with statistics, without, raw.
    pub overhead: Option<(f64, f64, f64)>,
    /// ns per exit that recording costs, measured without KVM (clock reads + counters).
    pub record_ns: f64,
    pub opts: BenchOptions,
    /// kvm-unit-tests vmexit rows (with `--kvm-unit-tests`).
    pub kut: Vec<kut::Row>,
}

/// The cost of recording one exit (what the vCPU loop adds: two clock reads, a port-table
/// probe, reason/bucket/sum counters), timed over many iterations without KVM.
pub fn record_cost_ns() -> f64 {
    use crate::exit_stats::{ExitKind, VcpuExitStats};
    const ITERATIONS: u32 = 1_000_000;
    let stats = VcpuExitStats::new(0, true, ["bench"]);
    let t = std::time::Instant::now();
    for i in 0..ITERATIONS {
        let t0 = stats.start();
        let kind = ExitKind::Pio {
            write: true,
            port: std::hint::black_box(0x700 + (i & 3) as u16),
        };
        stats.record(kind, t0);
    }
    t.elapsed().as_nanos() as f64 / f64::from(ITERATIONS)
}

/// Runs the benchmarks.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Report, BenchError> {
    let n = opts.round_trips.max(10).div_ceil(10) * 10;
    let reps = opts.reps.max(1);
    let dir = std::env::temp_dir().join(format!("ferrovm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::Io)?;
    let kernel: PathBuf = dir.join("bench.elf");
    let elf = crate::firmware::get("bench")
        .ok_or_else(|| BenchError::Setup("bench firmware missing".into()))?;
    std::fs::write(&kernel, elf).map_err(BenchError::Io)?;
    let params = vec![n, reps];
    let mut results = Vec::new();
    let mut tsc_khz = 0;
    let mut overhead = None;
    let r = (|| {
        for kind in KINDS {
            if !opts.only.is_empty() && !opts.only.iter().any(|o| o == kind.name) {
                continue;
            }
            progress(kind.name);
            let (raw_log, khz) = raw::run(&kernel, kind.code, BenchLog::new(params.clone()))?;
            check(&raw_log, reps, &format!("{} raw", kind.name))?;
            tsc_khz = khz;
            let fv = run_ferrovm(&kernel, kind.code, params.clone(), true)?;
            check(&fv, reps, &format!("{} ferrovm", kind.name))?;
            let raw_fig = figures(&raw_log, n, khz);
            let fv_fig = figures(&fv, n, khz);
            if kind.name == "pio-out" {
                // Statistics cost: ferrovm without recording, then with again (A B A).
                let off = run_ferrovm(&kernel, kind.code, params.clone(), false)?;
                check(&off, reps, "pio-out ferrovm without statistics")?;
                let on2 = run_ferrovm(&kernel, kind.code, params.clone(), true)?;
                let on = (fv_fig.host_p50 + figures(&on2, n, khz).host_p50) / 2.0;
                overhead = Some((on, figures(&off, n, khz).host_p50, raw_fig.host_p50));
            }
            results.push(KindResult {
                kind: *kind,
                raw: raw_fig,
                ferrovm: fv_fig,
            });
        }
        Ok::<(), BenchError>(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    let kut = match &opts.kvm_unit_tests {
        Some(d) => kut::run(d, progress)?,
        None => Vec::new(),
    };
    Ok(Report {
        kut,
        results,
        tsc_khz,
        overhead,
        record_ns: record_cost_ns(),
        opts: BenchOptions {
            round_trips: n,
            reps,
            only: opts.only.clone(),
            kvm_unit_tests: opts.kvm_unit_tests.clone(),
        },
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl Report {
    /// The report as a Markdown table (also readable as plain text).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ferrovm bench-exits: {} round trips x {} repetitions per kind, TSC {} kHz (KVM_GET_TSC_KHZ)",
            self.opts.round_trips, self.opts.reps, self.tsc_khz
        );
        let _ = writeln!(s, "ns per round trip: median (p99) over repetitions; host = wall clock around the KVM_RUN sequence, guest = rdtsc\n");
        let _ = writeln!(
            s,
            "| exit kind | raw host ns | ferrovm host ns | ratio | raw guest ns | ferrovm guest ns | ratio |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
        for r in &self.results {
            let _ = writeln!(
                s,
                "| {} | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.2} | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.2} |",
                r.kind.name,
                r.raw.host_p50,
                r.raw.host_p99,
                r.ferrovm.host_p50,
                r.ferrovm.host_p99,
                ratio(r.ferrovm.host_p50, r.raw.host_p50),
                r.raw.guest_p50,
                r.raw.guest_p99,
                r.ferrovm.guest_p50,
                r.ferrovm.guest_p99,
                ratio(r.ferrovm.guest_p50, r.raw.guest_p50),
            );
        }
        if let Some((on, off, raw)) = self.overhead {
            let _ = writeln!(
                s,
                "\nexit statistics overhead (pio-out, host median): with {on:.0} ns, without {off:.0} ns: {:+.0} ns ({:+.1}%) per exit; raw loop {raw:.0} ns",
                on - off,
                ratio(on - off, off) * 100.0
            );
        }
        let _ = writeln!(
            s,
            "recording one exit (2 clock reads + counters, no KVM): {:.0} ns",
            self.record_ns
        );
        if !self.kut.is_empty() {
            let _ = writeln!(
                s,
                "\nkvm-unit-tests x86/vmexit.flat under ferrovm (its own figure: TSC cycles per iteration)\n"
            );
            let _ = writeln!(s, "| vmexit row | cycles | ns |\n|---|---:|---:|");
            for r in &self.kut {
                let ns = ratio(r.cycles as f64 * 1e6, f64::from(self.tsc_khz));
                let _ = writeln!(s, "| {} | {} | {ns:.0} |", r.name, r.cycles);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
        assert_eq!(percentile(&mut [7.0], 0.99), 7.0);
    }
}
