//! The VM-exit observatory: what made each vCPU leave the guest, and how long ferrovm took to
//! send it back.
//!
//! Every vCPU owns one [`VcpuExitStats`] and is its only writer; the counters are relaxed
//! atomics, so the VMM thread (SIGUSR1, `C-a s`) and the end-of-run report read them live
//! without stopping the guest. Always compiled; the hot path is a few relaxed `fetch_add`s,
//! one table probe for port I/O, a short pointer-compare scan for MMIO, and two clock reads.
//! Recording can be switched off per vCPU at creation (the `bench-exits` overhead figure).
//!
//! Memory is bounded: [`PORT_SLOTS`] (port, direction) pairs per vCPU (more distinct pairs
//! are counted under "other ports"), MMIO by device name (fixed when the bus is built), and
//! one [`BUCKETS`]-bucket log2 histogram per exit reason.

use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why KVM_RUN returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    IoIn = 0,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    SystemEvent,
    InternalError,
    /// KVM_EXIT_INTR or KVM_RUN returning EINTR/EAGAIN (a kick from the VMM).
    Intr,
    /// KVM_EXIT_IOAPIC_EOI: a level-triggered interrupt's EOI for the userspace IOAPIC
    /// (split irqchip only).
    IoapicEoi,
    Other,
}

/// Number of [`Reason`]s.
pub const REASONS: usize = 11;

impl Reason {
    pub const ALL: [Reason; REASONS] = [
        Reason::IoIn,
        Reason::IoOut,
        Reason::MmioRead,
        Reason::MmioWrite,
        Reason::Hlt,
        Reason::Shutdown,
        Reason::SystemEvent,
        Reason::InternalError,
        Reason::Intr,
        Reason::IoapicEoi,
        Reason::Other,
    ];

    /// The name used in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Reason::IoIn => "io-in",
            Reason::IoOut => "io-out",
            Reason::MmioRead => "mmio-read",
            Reason::MmioWrite => "mmio-write",
            Reason::Hlt => "hlt",
            Reason::Shutdown => "shutdown",
            Reason::SystemEvent => "system-event",
            Reason::InternalError => "internal-error",
            Reason::Intr => "intr",
            Reason::IoapicEoi => "ioapic-eoi",
            Reason::Other => "other",
        }
    }
}

/// What one exit was, as far as the statistics care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port I/O: the port, and the device name the bus found (`None`: unclaimed).
    Pio { write: bool, port: u16 },
    /// MMIO: the device name the bus found (`None`: unclaimed).
    Mmio {
        write: bool,
        device: Option<&'static str>,
    },
    /// Anything else.
    Plain(Reason),
}

impl ExitKind {
    pub fn reason(self) -> Reason {
        match self {
            ExitKind::Pio { write: false, .. } => Reason::IoIn,
            ExitKind::Pio { write: true, .. } => Reason::IoOut,
            ExitKind::Mmio { write: false, .. } => Reason::MmioRead,
            ExitKind::Mmio { write: true, .. } => Reason::MmioWrite,
            ExitKind::Plain(r) => r,
        }
    }
}

// ---------------------------------------------------------------------------------------
// log2 histogram
// ---------------------------------------------------------------------------------------

/// Histogram buckets: bucket `i` holds durations in `[2^i, 2^(i+1))` ns (bucket 0 also 0 ns).
pub const BUCKETS: usize = 64;

/// The bucket of a duration in ns.
#[inline]
pub fn bucket(ns: u64) -> usize {
    (63 - (ns | 1).leading_zeros()) as usize
}

/// The inclusive range of durations (ns) bucket `i` holds.
pub fn bucket_range(i: usize) -> (u64, u64) {
    let i = i.min(BUCKETS - 1);
    let lo = if i == 0 { 0 } else { 1u64 << i };
    let hi = if i == 63 {
        u64::MAX
    } else {
        (1u64 << (i + 1)) - 1
    };
    (lo, hi)
}

/// Summary of a histogram: count, mean (exact, from the sum) and percentiles, each reported as
/// the upper bound of the bucket that holds it (so "p99 <= value").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistSummary {
    pub count: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// Upper bound of the bucket holding the `q`-quantile (0 < q <= 1) of `buckets`.
pub fn quantile(buckets: &[u64; BUCKETS], q: f64) -> u64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0;
    }
    // Rank of the quantile, 1-based: ceil(q * total), at least 1.
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return bucket_range(i).1;
        }
    }
    bucket_range(BUCKETS - 1).1
}

/// Summarises bucket counts and their exact sum.
pub fn summarize(buckets: &[u64; BUCKETS], sum_ns: u64) -> HistSummary {
    let count: u64 = buckets.iter().sum();
    let max_ns = buckets
        .iter()
        .rposition(|&n| n > 0)
        .map(|i| bucket_range(i).1)
        .unwrap_or(0);
    HistSummary {
        count,
        mean_ns: sum_ns.checked_div(count).unwrap_or(0),
        p50_ns: quantile(buckets, 0.5),
        p99_ns: quantile(buckets, 0.99),
        max_ns,
    }
}

struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Per-vCPU counters
// ---------------------------------------------------------------------------------------

/// Slots of the per-vCPU (port, direction) table (open addressing, linear probing).
pub const PORT_SLOTS: usize = 1024;
/// Distinct (port, direction) pairs tracked per vCPU; further pairs count as "other ports".
pub const PORT_CAP: usize = 768;
/// The MMIO "device" for addresses no device claims.
pub const UNCLAIMED: &str = "unclaimed";
/// The MMIO "device" for names missing from the table built at start (not expected).
const UNLISTED: &str = "(unlisted)";

/// One vCPU's exit statistics. Written only by its vCPU thread (relaxed atomics).
pub struct VcpuExitStats {
    index: u8,
    enabled: bool,
    reasons: [AtomicU64; REASONS],
    hist: [Histogram; REASONS],
    /// Key: `(write << 16 | port) + 1`; 0 is an empty slot. Set once, before its count.
    port_keys: Box<[AtomicU32]>,
    port_counts: Box<[AtomicU64]>,
    port_used: AtomicU32,
    /// Port exits whose pair did not fit in the table: [in, out].
    port_overflow: [AtomicU64; 2],
    /// MMIO device names: [unclaimed, devices..., unlisted]; counts: [read, write].
    mmio_names: Box<[&'static str]>,
    mmio_counts: Box<[[AtomicU64; 2]]>,
}

impl VcpuExitStats {
    /// Statistics for vCPU `index`, whose MMIO bus holds devices named `mmio_devices`.
    /// With `enabled == false`, [`Self::start`] returns `None` and nothing is recorded.
    pub fn new(
        index: u8,
        enabled: bool,
        mmio_devices: impl IntoIterator<Item = &'static str>,
    ) -> Self {
        let mut names: Vec<&'static str> = vec![UNCLAIMED];
        for n in mmio_devices {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names.push(UNLISTED);
        let mmio_counts = names
            .iter()
            .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
            .collect();
        Self {
            index,
            enabled,
            reasons: std::array::from_fn(|_| AtomicU64::new(0)),
            hist: std::array::from_fn(|_| Histogram::new()),
            port_keys: (0..PORT_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            port_counts: (0..PORT_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            port_used: AtomicU32::new(0),
            port_overflow: [AtomicU64::new(0), AtomicU64::new(0)],
            mmio_names: names.into_boxed_slice(),
            mmio_counts,
        }
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Call right after KVM_RUN returns: the start of the userspace handling time.
    #[inline]
    pub fn start(&self) -> Option<u64> {
        self.enabled.then(clock::now)
    }

    /// Records one exit that was handled since `start` (from [`Self::start`]).
    #[inline]
    pub fn record(&self, kind: ExitKind, start: Option<u64>) {
        let Some(t0) = start else { return };
        self.record_ns(kind, clock::since_ns(t0));
    }

    /// Records one exit that took `ns` in userspace.
    pub fn record_ns(&self, kind: ExitKind, ns: u64) {
        let r = kind.reason() as usize;
        self.reasons[r].fetch_add(1, Ordering::Relaxed);
        let h = &self.hist[r];
        h.buckets[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        h.sum_ns.fetch_add(ns, Ordering::Relaxed);
        match kind {
            ExitKind::Pio { write, port } => self.count_port(write, port),
            ExitKind::Mmio { write, device } => {
                let i = self.mmio_index(device);
                self.mmio_counts[i][write as usize].fetch_add(1, Ordering::Relaxed);
            }
            ExitKind::Plain(_) => {}
        }
    }

    fn count_port(&self, write: bool, port: u16) {
        let key = ((u32::from(write) << 16) | u32::from(port)) + 1;
        // Fibonacci hashing of the 17-bit key into the table.
        let mut i = (key.wrapping_mul(0x9e37_79b9) >> 22) as usize % PORT_SLOTS;
        for _ in 0..PORT_SLOTS {
            match self.port_keys[i].load(Ordering::Relaxed) {
                k if k == key => {
                    self.port_counts[i].fetch_add(1, Ordering::Relaxed);
                    return;
                }
                0 => {
                    // Only this vCPU's thread inserts, so a plain check-then-store is enough.
                    if self.port_used.load(Ordering::Relaxed) as usize >= PORT_CAP {
                        break;
                    }
                    self.port_used.fetch_add(1, Ordering::Relaxed);
                    self.port_counts[i].fetch_add(1, Ordering::Relaxed);
                    // Release: a reader that sees the key also sees the first count.
                    self.port_keys[i].store(key, Ordering::Release);
                    return;
                }
                _ => i = (i + 1) % PORT_SLOTS,
            }
        }
        self.port_overflow[write as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn mmio_index(&self, device: Option<&'static str>) -> usize {
        let Some(name) = device else { return 0 };
        let last = self.mmio_names.len() - 1;
        let names = &self.mmio_names[1..last];
        // Names come from the bus, so the pointer usually matches; compare text otherwise.
        names
            .iter()
            .position(|n| std::ptr::eq(n.as_ptr(), name.as_ptr()) && n.len() == name.len())
            .or_else(|| names.iter().position(|n| *n == name))
            .map_or(last, |i| i + 1)
    }

    /// A consistent-enough copy of the counters (each counter is read once, relaxed).
    pub fn snapshot(&self) -> VcpuSnapshot {
        let reasons = Reason::ALL.map(|r| self.reasons[r as usize].load(Ordering::Relaxed));
        let hist = Reason::ALL.map(|r| {
            let h = &self.hist[r as usize];
            let b: [u64; BUCKETS] = std::array::from_fn(|i| h.buckets[i].load(Ordering::Relaxed));
            (b, h.sum_ns.load(Ordering::Relaxed))
        });
        let mut ports = Vec::new();
        for (k, c) in self.port_keys.iter().zip(self.port_counts.iter()) {
            let key = k.load(Ordering::Acquire);
            if key != 0 {
                let key = key - 1;
                ports.push((
                    (key & 0xffff) as u16,
                    key >> 16 == 1,
                    c.load(Ordering::Relaxed),
                ));
            }
        }
        ports.sort_unstable();
        let mmio = self
            .mmio_names
            .iter()
            .zip(self.mmio_counts.iter())
            .map(|(n, c)| {
                (
                    *n,
                    c[0].load(Ordering::Relaxed),
                    c[1].load(Ordering::Relaxed),
                )
            })
            .collect();
        VcpuSnapshot {
            index: self.index,
            reasons,
            hist,
            ports,
            port_overflow: [
                self.port_overflow[0].load(Ordering::Relaxed),
                self.port_overflow[1].load(Ordering::Relaxed),
            ],
            mmio,
        }
    }
}

/// Plain copy of one vCPU's counters.
#[derive(Debug, Clone)]
pub struct VcpuSnapshot {
    pub index: u8,
    /// Counts by [`Reason`] (in [`Reason::ALL`] order).
    pub reasons: [u64; REASONS],
    /// Histogram buckets and sum (ns) by reason.
    pub hist: [([u64; BUCKETS], u64); REASONS],
    /// (port, write, count), sorted.
    pub ports: Vec<(u16, bool, u64)>,
    /// Port exits not in `ports` (table full): [in, out].
    pub port_overflow: [u64; 2],
    /// (device, reads, writes).
    pub mmio: Vec<(&'static str, u64, u64)>,
}

impl VcpuSnapshot {
    pub fn total(&self) -> u64 {
        self.reasons.iter().sum()
    }
}

// ---------------------------------------------------------------------------------------
// The whole VM
// ---------------------------------------------------------------------------------------

/// The clock that times exit handling. Two reads per exit are on the hot path, so it reads the
/// TSC directly (one instruction; a vDSO `clock_gettime` costs tens of instructions, which
/// matters where userspace is slow, e.g. inside the nested harness's emulated L1) and converts
/// with the frequency KVM reports (`KVM_GET_TSC_KHZ`, the host TSC rate unless scaled). Until
/// that is known (or where KVM cannot tell) it falls back to `Instant`.
pub mod clock {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Instant;

    /// ns = ticks * MULT >> 32; 0 means "use Instant".
    static MULT: AtomicU64 = AtomicU64::new(0);
    static EPOCH: OnceLock<Instant> = OnceLock::new();

    /// Switches to the TSC, running at `khz`.
    pub fn set_tsc_khz(khz: u32) {
        if khz > 0 {
            let mult = ((1_000_000u128 << 32) / u128::from(khz)).min(u64::MAX as u128) as u64;
            MULT.store(mult, Ordering::Relaxed);
        }
    }

    /// A timestamp in clock units.
    #[inline]
    pub fn now() -> u64 {
        if MULT.load(Ordering::Relaxed) != 0 {
            // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
            unsafe { core::arch::x86_64::_rdtsc() }
        } else {
            EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
        }
    }

    /// Nanoseconds since `t0` (from [`now`]).
    #[inline]
    pub fn since_ns(t0: u64) -> u64 {
        let d = now().saturating_sub(t0);
        match MULT.load(Ordering::Relaxed) {
            0 => d,
            m => ((u128::from(d) * u128::from(m)) >> 32).min(u64::MAX as u128) as u64,
        }
    }
}

// ---------------------------------------------------------------------------------------

/// Every vCPU's statistics plus what is needed to name ports.
#[derive(Clone)]
pub struct ExitStats {
    vcpus: Vec<Arc<VcpuExitStats>>,
    /// Port I/O bus ranges (base, len, name), to name ports in the report.
    pio_names: Vec<(u64, u64, &'static str)>,
    /// KVM's own counters (exits handled in the kernel), when this KVM has them.
    kernel: Arc<crate::kvm::stats::KernelStats>,
    started: Instant,
}

impl ExitStats {
    pub fn new(
        vcpus: Vec<Arc<VcpuExitStats>>,
        pio_names: impl IntoIterator<Item = (u64, u64, &'static str)>,
    ) -> Self {
        Self {
            vcpus,
            pio_names: pio_names.into_iter().collect(),
            kernel: Arc::default(),
            started: Instant::now(),
        }
    }

    /// Adds KVM's statistics of this VM and its vCPUs to every snapshot.
    pub fn with_kernel(mut self, kernel: crate::kvm::stats::KernelStats) -> Self {
        self.kernel = Arc::new(kernel);
        self
    }

    /// Reads every vCPU's counters now.
    pub fn snapshot(&self) -> Snapshot {
        let vcpus: Vec<VcpuSnapshot> = self.vcpus.iter().map(|v| v.snapshot()).collect();
        let mut reasons = [0u64; REASONS];
        let mut hist = [([0u64; BUCKETS], 0u64); REASONS];
        let mut ports: std::collections::BTreeMap<(u16, bool), u64> = Default::default();
        let mut port_overflow = [0u64; 2];
        let mut mmio: Vec<(&'static str, u64, u64)> = Vec::new();
        for v in &vcpus {
            for r in 0..REASONS {
                reasons[r] += v.reasons[r];
                for b in 0..BUCKETS {
                    hist[r].0[b] += v.hist[r].0[b];
                }
                hist[r].1 = hist[r].1.saturating_add(v.hist[r].1);
            }
            for &(p, w, c) in &v.ports {
                *ports.entry((p, w)).or_default() += c;
            }
            port_overflow[0] += v.port_overflow[0];
            port_overflow[1] += v.port_overflow[1];
            for &(n, rd, wr) in &v.mmio {
                match mmio.iter_mut().find(|e| e.0 == n) {
                    Some(e) => {
                        e.1 += rd;
                        e.2 += wr;
                    }
                    None => mmio.push((n, rd, wr)),
                }
            }
        }
        let ports = ports
            .into_iter()
            .map(|((port, write), count)| PortCount {
                port,
                write,
                count,
                device: self.port_device(port),
            })
            .collect();
        Snapshot {
            kernel: self.kernel.snapshot(),
            elapsed_ns: self.started.elapsed().as_nanos() as u64,
            reasons,
            hist,
            ports,
            port_overflow,
            mmio,
            vcpus,
        }
    }

    fn port_device(&self, port: u16) -> &'static str {
        let p = u64::from(port);
        self.pio_names
            .iter()
            .find(|(b, l, _)| p >= *b && p - b < *l)
            .map_or(UNCLAIMED, |e| e.2)
    }
}

/// Port counts with the device behind the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortCount {
    pub port: u16,
    pub write: bool,
    pub count: u64,
    pub device: &'static str,
}

/// Totals over all vCPUs, plus each vCPU's own figures.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub elapsed_ns: u64,
    pub reasons: [u64; REASONS],
    pub hist: [([u64; BUCKETS], u64); REASONS],
    pub ports: Vec<PortCount>,
    pub port_overflow: [u64; 2],
    pub mmio: Vec<(&'static str, u64, u64)>,
    pub vcpus: Vec<VcpuSnapshot>,
    /// KVM's in-kernel counters, when this KVM has binary statistics.
    pub kernel: Option<crate::kvm::stats::KernelSnapshot>,
}

/// Rows shown in the table's port and MMIO sections.
const TOP_ROWS: usize = 16;

impl Snapshot {
    pub fn total(&self) -> u64 {
        self.reasons.iter().sum()
    }

    /// The human-readable report (ends with a newline).
    pub fn table(&self, title: &str) -> String {
        let mut s = String::new();
        let total = self.total();
        let secs = self.elapsed_ns as f64 / 1e9;
        let _ = writeln!(
            s,
            "=== ferrovm exit statistics ({title}): {total} exits in {secs:.3} s, {} vCPU(s) ===",
            self.vcpus.len()
        );
        let _ = writeln!(
            s,
            "{:<16} {:>12} {:>7} {:>10} {:>10} {:>10}",
            "reason", "count", "%", "mean ns", "p50 ns<=", "p99 ns<="
        );
        let mut order: Vec<usize> = (0..REASONS).filter(|&r| self.reasons[r] > 0).collect();
        order.sort_by_key(|&r| std::cmp::Reverse(self.reasons[r]));
        for r in order {
            let h = summarize(&self.hist[r].0, self.hist[r].1);
            let _ = writeln!(
                s,
                "{:<16} {:>12} {:>6.2}% {:>10} {:>10} {:>10}",
                Reason::ALL[r].name(),
                self.reasons[r],
                pct(self.reasons[r], total),
                h.mean_ns,
                h.p50_ns,
                h.p99_ns
            );
        }
        if !self.ports.is_empty() {
            let _ = writeln!(
                s,
                "{:<16} {:>12} {:>7} {:>4} device",
                "port", "count", "%", "dir"
            );
            let mut ports: Vec<&PortCount> = self.ports.iter().collect();
            ports.sort_by_key(|p| std::cmp::Reverse(p.count));
            for p in ports.iter().take(TOP_ROWS) {
                let _ = writeln!(
                    s,
                    "{:<16} {:>12} {:>6.2}% {:>4} {}",
                    format!("{:#06x}", p.port),
                    p.count,
                    pct(p.count, total),
                    if p.write { "out" } else { "in" },
                    p.device
                );
            }
            if ports.len() > TOP_ROWS {
                let _ = writeln!(s, "  ... {} more ports", ports.len() - TOP_ROWS);
            }
            let over = self.port_overflow[0] + self.port_overflow[1];
            if over > 0 {
                let _ = writeln!(s, "{:<16} {:>12}", "other ports", over);
            }
        }
        let mut mmio: Vec<&(&str, u64, u64)> = self.mmio.iter().filter(|m| m.1 + m.2 > 0).collect();
        if !mmio.is_empty() {
            let _ = writeln!(s, "{:<16} {:>12} {:>12}", "mmio region", "reads", "writes");
            mmio.sort_by_key(|m| std::cmp::Reverse(m.1 + m.2));
            for m in mmio.iter().take(TOP_ROWS) {
                let _ = writeln!(s, "{:<16} {:>12} {:>12}", m.0, m.1, m.2);
            }
        }
        let _ = writeln!(s, "{:<16} {:>12}", "vcpu", "exits");
        for v in &self.vcpus {
            let _ = writeln!(s, "{:<16} {:>12}", format!("vcpu{}", v.index), v.total());
        }
        if let Some(k) = &self.kernel {
            // KVM_RUN returning for a signal is ferrovm's count but not a VM exit.
            s += &k.table(total - self.reasons[Reason::Intr as usize]);
        }
        s
    }

    /// The same figures as JSON (hand-written: only numbers and known ASCII names).
    pub fn json(&self) -> String {
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"elapsed_ns\":{},\"total\":{},\"reasons\":{},\"handling_ns\":{}",
            self.elapsed_ns,
            self.total(),
            reasons_json(&self.reasons),
            hist_json(&self.hist)
        );
        s += ",\"ports\":[";
        for (i, p) in self.ports.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"port\":{},\"dir\":\"{}\",\"device\":{},\"count\":{}}}",
                p.port,
                if p.write { "out" } else { "in" },
                json_str(p.device),
                p.count
            );
        }
        let _ = write!(
            s,
            "],\"other_ports\":{{\"in\":{},\"out\":{}}},\"mmio\":{}",
            self.port_overflow[0],
            self.port_overflow[1],
            mmio_json(&self.mmio)
        );
        s += ",\"vcpus\":[";
        for (i, v) in self.vcpus.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"index\":{},\"total\":{},\"reasons\":{},\"handling_ns\":{},\"ports\":[",
                v.index,
                v.total(),
                reasons_json(&v.reasons),
                hist_json(&v.hist)
            );
            for (j, (port, write, count)) in v.ports.iter().enumerate() {
                if j > 0 {
                    s.push(',');
                }
                let _ = write!(
                    s,
                    "{{\"port\":{port},\"dir\":\"{}\",\"count\":{count}}}",
                    if *write { "out" } else { "in" }
                );
            }
            let _ = write!(s, "],\"mmio\":{}}}", mmio_json(&v.mmio));
        }
        s += "]";
        if let Some(k) = &self.kernel {
            let _ = write!(s, ",\"kvm\":{}", k.json());
        }
        s += "}\n";
        s
    }
}

fn pct(n: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        n as f64 * 100.0 / total as f64
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o += "\\\"",
            '\\' => o += "\\\\",
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn reasons_json(r: &[u64; REASONS]) -> String {
    let mut s = String::from("{");
    for (i, reason) in Reason::ALL.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "\"{}\":{}", reason.name(), r[i]);
    }
    s.push('}');
    s
}

fn hist_json(h: &[([u64; BUCKETS], u64); REASONS]) -> String {
    let mut s = String::from("{");
    let mut first = true;
    for (i, reason) in Reason::ALL.iter().enumerate() {
        let (b, sum) = &h[i];
        let sm = summarize(b, *sum);
        if sm.count == 0 {
            continue;
        }
        if !first {
            s.push(',');
        }
        first = false;
        // Buckets as [lower bound ns, count] pairs, non-empty only.
        let buckets: Vec<String> = b
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(j, n)| format!("[{},{}]", bucket_range(j).0, n))
            .collect();
        let _ = write!(
            s,
            "\"{}\":{{\"count\":{},\"sum_ns\":{},\"mean_ns\":{},\"p50_ns\":{},\"p99_ns\":{},\"max_ns\":{},\"buckets\":[{}]}}",
            reason.name(),
            sm.count,
            sum,
            sm.mean_ns,
            sm.p50_ns,
            sm.p99_ns,
            sm.max_ns,
            buckets.join(",")
        );
    }
    s.push('}');
    s
}

fn mmio_json(m: &[(&'static str, u64, u64)]) -> String {
    let rows: Vec<String> = m
        .iter()
        .filter(|e| e.1 + e.2 > 0)
        .map(|(n, r, w)| format!("{}:{{\"read\":{r},\"write\":{w}}}", json_str(n)))
        .collect();
    format!("{{{}}}", rows.join(","))
}

// ---------------------------------------------------------------------------------------
// SIGUSR1: ask for live figures
// ---------------------------------------------------------------------------------------

static SIGUSR1_EVENT: OnceLock<EventFd> = OnceLock::new();

extern "C" fn on_sigusr1(_: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot; saving it keeps the
    // interrupted code's errno intact.
    let saved = unsafe { *libc::__errno_location() };
    if let Some(ev) = SIGUSR1_EVENT.get() {
        // OnceLock::get is an atomic load; EventFd::write is one write(2): async-signal-safe.
        let _ = ev.write(1);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// Installs the SIGUSR1 handler (once per process) and returns the eventfd it writes: it is
/// readable when live statistics were asked for. Drain it with `read`.
pub fn sigusr1_event() -> std::io::Result<&'static EventFd> {
    if let Some(ev) = SIGUSR1_EVENT.get() {
        return Ok(ev);
    }
    let ev = EventFd::new(EFD_NONBLOCK)?;
    let ev = SIGUSR1_EVENT.get_or_init(|| ev);
    // SAFETY: sigaction is plain data; all-zero is valid (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised; the handler only does async-signal-safe work.
    if unsafe { libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let _ = ev.as_raw_fd();
    Ok(ev)
}

/// Where `--exit-stats` sends the end-of-run report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsOutput {
    /// A table on stderr.
    Table,
    /// JSON written to a file.
    Json(std::path::PathBuf),
}

/// Parses one `--exit-stats` value: empty/`table`, or `json:PATH`.
pub fn parse_output(s: &str) -> Option<StatsOutput> {
    match s {
        "" | "table" => Some(StatsOutput::Table),
        _ => s
            .strip_prefix("json:")
            .filter(|p| !p.is_empty())
            .map(|p| StatsOutput::Json(p.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_math() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(3), 1);
        assert_eq!(bucket(4), 2);
        assert_eq!(bucket(1023), 9);
        assert_eq!(bucket(1024), 10);
        assert_eq!(bucket(u64::MAX), 63);
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert_eq!(bucket(lo), i);
            assert_eq!(bucket(hi), i);
            if i + 1 < BUCKETS {
                assert_eq!(bucket_range(i + 1).0, hi + 1);
            }
        }
        assert_eq!(bucket_range(63).1, u64::MAX);
    }

    #[test]
    fn quantiles_from_buckets() {
        let mut b = [0u64; BUCKETS];
        assert_eq!(summarize(&b, 0), HistSummary::default());
        // 99 exits of ~1 µs (bucket 9: 512..1023) and one of ~1 ms (bucket 19).
        b[9] = 99;
        b[19] = 1;
        let s = summarize(&b, 99 * 1000 + 1_000_000);
        assert_eq!(s.count, 100);
        assert_eq!(s.mean_ns, 10_990);
        assert_eq!(s.p50_ns, 1023);
        assert_eq!(s.p99_ns, 1023, "rank 99 is still in the 1 µs bucket");
        assert_eq!(quantile(&b, 1.0), (1 << 20) - 1);
        assert_eq!(s.max_ns, (1 << 20) - 1);
        b[19] = 2;
        assert_eq!(quantile(&b, 0.99), (1 << 20) - 1);
    }

    #[test]
    fn counts_by_port_and_device() {
        let v = VcpuExitStats::new(0, true, ["virtio-blk", "bench"]);
        for _ in 0..5 {
            v.record_ns(
                ExitKind::Pio {
                    write: true,
                    port: 0x3f8,
                },
                100,
            );
        }
        v.record_ns(
            ExitKind::Pio {
                write: false,
                port: 0x3f8,
            },
            100,
        );
        let bench: &'static str = "bench";
        v.record_ns(
            ExitKind::Mmio {
                write: true,
                device: Some(bench),
            },
            10,
        );
        v.record_ns(
            ExitKind::Mmio {
                write: false,
                device: None,
            },
            10,
        );
        v.record_ns(
            ExitKind::Mmio {
                write: false,
                device: Some("nobody"),
            },
            10,
        );
        v.record_ns(ExitKind::Plain(Reason::Intr), 0);
        let s = v.snapshot();
        assert_eq!(s.reasons[Reason::IoOut as usize], 5);
        assert_eq!(s.reasons[Reason::IoIn as usize], 1);
        assert_eq!(s.reasons[Reason::MmioRead as usize], 2);
        assert_eq!(s.reasons[Reason::Intr as usize], 1);
        assert_eq!(s.ports, vec![(0x3f8, false, 1), (0x3f8, true, 5)]);
        assert!(s.mmio.contains(&("bench", 0, 1)));
        assert!(s.mmio.contains(&(UNCLAIMED, 1, 0)));
        assert!(s.mmio.contains(&(UNLISTED, 1, 0)));
        assert_eq!(s.total(), 10);
    }

    #[test]
    fn port_table_is_bounded() {
        let v = VcpuExitStats::new(0, true, []);
        for port in 0..=u16::MAX {
            v.record_ns(ExitKind::Pio { write: true, port }, 1);
        }
        let s = v.snapshot();
        assert_eq!(s.ports.len(), PORT_CAP);
        assert_eq!(s.port_overflow[1], 65536 - PORT_CAP as u64);
        assert_eq!(s.reasons[Reason::IoOut as usize], 65536);
    }

    #[test]
    fn disabled_records_nothing() {
        let v = VcpuExitStats::new(0, false, []);
        let t = v.start();
        assert!(t.is_none());
        v.record(ExitKind::Plain(Reason::Hlt), t);
        assert_eq!(v.snapshot().total(), 0);
    }

    #[test]
    fn json_and_table_agree() {
        let v = Arc::new(VcpuExitStats::new(0, true, ["bench"]));
        v.record_ns(
            ExitKind::Pio {
                write: true,
                port: 0x700,
            },
            5000,
        );
        let st = ExitStats::new(vec![v], [(0x700, 16, "bench")]);
        let snap = st.snapshot();
        let t = snap.table("end");
        assert!(t.contains("io-out"), "{t}");
        assert!(t.contains("0x0700"), "{t}");
        assert!(t.contains("bench"), "{t}");
        let j = snap.json();
        assert!(j.contains("\"port\":1792,\"dir\":\"out\",\"device\":\"bench\",\"count\":1"));
        assert_eq!(json_str("a\"b\n"), "\"a\\\"b\\u000a\"");
    }

    #[test]
    fn output_option() {
        assert_eq!(parse_output(""), Some(StatsOutput::Table));
        assert_eq!(
            parse_output("json:/tmp/x.json"),
            Some(StatsOutput::Json("/tmp/x.json".into()))
        );
        assert_eq!(parse_output("json:"), None);
        assert_eq!(parse_output("xml"), None);
    }
}
