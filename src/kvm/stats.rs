//! KVM's own counters, per VM and per vCPU, through the binary statistics file descriptor
//! (`KVM_GET_STATS_FD`, Linux 5.14+): the exits KVM handled in the kernel (nested page
//! faults, interrupt windows, halts, emulated instructions...) that never reach ferrovm,
//! readable without debugfs or root.
//!
//! Layout (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"): a 24-byte header
//! (flags, name_size, num_desc, id_offset, desc_offset, data_offset), then `num_desc`
//! descriptors of 16 bytes + `name_size` (flags, exponent, size, offset, bucket_size, name),
//! then the data block of u64 values. The descriptors are read once; each reading is one
//! `pread` of the data block.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
const HEADER_LEN: usize = 24;
const DESC_FIXED_LEN: usize = 16;
/// Bounds on what a kernel may describe (a bad header must not make ferrovm allocate much).
const MAX_DESCS: u32 = 4096;
const MAX_NAME: u32 = 256;

const TYPE_MASK: u32 = 0xf;
const TYPE_CUMULATIVE: u32 = 0;
const TYPE_INSTANT: u32 = 1;
const TYPE_PEAK: u32 = 2;
const UNIT_MASK: u32 = 0xf0;
const UNIT_NONE: u32 = 0;

/// One counter: its name and where its value sits in the data block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desc {
    name: String,
    /// Byte offset in the data block.
    offset: usize,
    /// A count that only grows (cumulative) or a current value (instant, peak).
    cumulative: bool,
}

/// An open statistics fd of one VM or vCPU.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    descs: Vec<Desc>,
    data_offset: u64,
    data_len: usize,
}

/// One reading: (name, value, cumulative) per counter, in KVM's order.
pub type Reading = Vec<(String, u64, bool)>;

impl KvmStats {
    /// Opens the statistics of the VM or vCPU behind `fd`; `Err` when this KVM has none.
    pub fn open(fd: &impl AsRawFd) -> io::Result<KvmStats> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let stats = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if stats < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(stats) };
        Self::from_file(file)
    }

    /// Parses the header and descriptors of a statistics file.
    fn from_file(file: File) -> io::Result<KvmStats> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let mut h = [0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0)?;
        let word = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let (name_size, num_desc) = (word(&h, 4), word(&h, 8));
        let (desc_offset, data_offset) = (word(&h, 16), word(&h, 20));
        if num_desc > MAX_DESCS || name_size == 0 || name_size > MAX_NAME {
            return Err(bad("KVM statistics header out of bounds"));
        }
        let stride = DESC_FIXED_LEN + name_size as usize;
        let mut block = vec![0u8; stride * num_desc as usize];
        file.read_exact_at(&mut block, desc_offset.into())?;
        let mut descs = Vec::new();
        let mut data_len = 0usize;
        for d in block.chunks_exact(stride) {
            let flags = word(d, 0);
            let size = u16::from_le_bytes([d[6], d[7]]) as usize;
            let offset = word(d, 8) as usize;
            let kind = flags & TYPE_MASK;
            let end = offset + size * 8;
            data_len = data_len.max(end);
            // Scalar counts only: histograms and times (units) are left out.
            if size != 1
                || flags & UNIT_MASK != UNIT_NONE
                || !matches!(kind, TYPE_CUMULATIVE | TYPE_INSTANT | TYPE_PEAK)
            {
                continue;
            }
            let raw = &d[DESC_FIXED_LEN..];
            let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let name = String::from_utf8_lossy(&raw[..len]).into_owned();
            descs.push(Desc {
                name,
                offset,
                cumulative: kind == TYPE_CUMULATIVE,
            });
        }
        if data_len > (MAX_DESCS as usize) * 8 * 64 {
            return Err(bad("KVM statistics data block too large"));
        }
        Ok(KvmStats {
            file,
            descs,
            data_offset: data_offset.into(),
            data_len,
        })
    }

    /// The current value of every scalar counter.
    pub fn read(&self) -> io::Result<Reading> {
        let mut data = vec![0u8; self.data_len];
        self.file.read_exact_at(&mut data, self.data_offset)?;
        Ok(self
            .descs
            .iter()
            .map(|d| {
                let v = u64::from_le_bytes(data[d.offset..d.offset + 8].try_into().unwrap());
                (d.name.clone(), v, d.cumulative)
            })
            .collect())
    }
}

/// Adds `reading` into `total` by name (vCPU counters summed over the vCPUs).
pub fn accumulate(total: &mut Reading, reading: Reading) {
    for (name, v, cumulative) in reading {
        match total.iter_mut().find(|e| e.0 == name) {
            Some(e) => e.1 = e.1.saturating_add(v),
            None => total.push((name, v, cumulative)),
        }
    }
}

/// The statistics fds of one VM and its vCPUs (any of them may be missing).
#[derive(Debug, Default)]
pub struct KernelStats {
    pub vm: Option<KvmStats>,
    pub vcpus: Vec<KvmStats>,
}

/// One reading of [`KernelStats`]: VM counters, and vCPU counters summed over the vCPUs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KernelSnapshot {
    pub vm: Reading,
    pub vcpu: Reading,
}

/// The vCPU counters that say where exits went, in the order the report shows them.
const EXIT_COUNTERS: [&str; 12] = [
    "pf_fixed",
    "pf_taken",
    "pf_emulate",
    "pf_spurious",
    "irq_window_exits",
    "halt_exits",
    "irq_exits",
    "insn_emulation",
    "hypercalls",
    "signal_exits",
    "request_irq_exits",
    "nmi_window_exits",
];
/// The VM counters shown: how guest RAM is mapped in KVM's page tables.
const VM_COUNTERS: [&str; 3] = ["pages_4k", "pages_2m", "pages_1g"];

impl KernelStats {
    /// Reads every fd; `None` when this KVM has no statistics.
    pub fn snapshot(&self) -> Option<KernelSnapshot> {
        if self.vm.is_none() && self.vcpus.is_empty() {
            return None;
        }
        let mut snap = KernelSnapshot::default();
        if let Some(Ok(r)) = self.vm.as_ref().map(KvmStats::read) {
            snap.vm = r;
        }
        for v in &self.vcpus {
            if let Ok(r) = v.read() {
                accumulate(&mut snap.vcpu, r);
            }
        }
        Some(snap)
    }
}

impl KernelSnapshot {
    fn get(r: &Reading, name: &str) -> Option<u64> {
        r.iter().find(|e| e.0 == name).map(|e| e.1)
    }

    /// Every VM exit KVM counted (`exits`), 0 if it does not say.
    pub fn exits(&self) -> u64 {
        Self::get(&self.vcpu, "exits").unwrap_or(0)
    }

    /// The report's section: all exits, those returned to ferrovm (`user`, ferrovm's own
    /// count), those KVM handled itself, and the counters that explain them.
    pub fn table(&self, user: u64) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let all = self.exits();
        let _ = writeln!(
            s,
            "KVM (in-kernel, binary stats): {all} exits, {user} to ferrovm, {} handled in the kernel",
            all.saturating_sub(user)
        );
        for name in EXIT_COUNTERS {
            if let Some(v) = Self::get(&self.vcpu, name).filter(|&v| v > 0) {
                let _ = writeln!(s, "  {name:<20} {v:>12}");
            }
        }
        let pages: Vec<String> = VM_COUNTERS
            .iter()
            .filter_map(|n| Some(format!("{n} {}", Self::get(&self.vm, n)?)))
            .collect();
        if !pages.is_empty() {
            let _ = writeln!(s, "  guest RAM mapped as  {}", pages.join(", "));
        }
        s
    }

    /// `{"vm":{name:value...},"vcpu":{...}}`, every scalar counter.
    pub fn json(&self) -> String {
        let obj = |r: &Reading| {
            let fields: Vec<String> = r.iter().map(|(n, v, _)| format!("\"{n}\":{v}")).collect();
            format!("{{{}}}", fields.join(","))
        };
        format!("{{\"vm\":{},\"vcpu\":{}}}", obj(&self.vm), obj(&self.vcpu))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A statistics file as the kernel lays it out.
    fn file(stats: &[(&str, u32, u16, u64)]) -> File {
        let name_size = 48u32;
        let desc_offset = HEADER_LEN as u32 + 16; // id string between
        let stride = DESC_FIXED_LEN as u32 + name_size;
        let data_offset = desc_offset + stride * stats.len() as u32;
        let mut out = Vec::new();
        for w in [
            0,
            name_size,
            stats.len() as u32,
            HEADER_LEN as u32,
            desc_offset,
            data_offset,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(b"kvm-1234/vcpu-0\0");
        let mut off = 0u32;
        let mut data = Vec::new();
        for &(name, flags, size, value) in stats {
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&0i16.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size as usize, 0);
            out.extend_from_slice(&n);
            for i in 0..size {
                data.extend_from_slice(&(value + u64::from(i)).to_le_bytes());
            }
            off += u32::from(size) * 8;
        }
        out.extend_from_slice(&data);
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.write_all(&out).unwrap();
        f
    }

    #[test]
    fn reads_scalar_counts_and_skips_histograms_and_times() {
        let f = file(&[
            ("exits", TYPE_CUMULATIVE, 1, 70_000),
            ("halt_wait_hist", 4, 32, 5),
            ("halt_poll_success_ns", 0x20, 1, 99),
            ("pages_2m", TYPE_INSTANT, 1, 120),
            ("pf_fixed", TYPE_CUMULATIVE, 1, 16_800),
        ]);
        let s = KvmStats::from_file(f).unwrap();
        let r = s.read().unwrap();
        assert_eq!(
            r,
            vec![
                ("exits".to_string(), 70_000, true),
                ("pages_2m".to_string(), 120, false),
                ("pf_fixed".to_string(), 16_800, true),
            ]
        );
        let mut total = Reading::new();
        accumulate(&mut total, r.clone());
        accumulate(&mut total, r);
        assert_eq!(total[0].1, 140_000);
    }

    #[test]
    fn the_report_splits_exits_between_ferrovm_and_the_kernel() {
        let snap = KernelSnapshot {
            vm: vec![
                ("pages_4k".into(), 10, false),
                ("pages_2m".into(), 120, false),
            ],
            vcpu: vec![
                ("exits".into(), 1000, true),
                ("pf_fixed".into(), 300, true),
                ("halt_exits".into(), 0, true),
            ],
        };
        let t = snap.table(600);
        assert!(
            t.contains("1000 exits, 600 to ferrovm, 400 handled in the kernel"),
            "{t}"
        );
        assert!(t.contains("pf_fixed") && !t.contains("halt_exits"), "{t}");
        assert!(t.contains("pages_4k 10, pages_2m 120"), "{t}");
        assert_eq!(
            snap.json(),
            r#"{"vm":{"pages_4k":10,"pages_2m":120},"vcpu":{"exits":1000,"pf_fixed":300,"halt_exits":0}}"#
        );
    }

    #[test]
    fn a_hostile_header_is_an_error_not_an_allocation() {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        let mut h = Vec::new();
        for w in [0u32, 64, u32::MAX, 24, 24, 24] {
            h.extend_from_slice(&w.to_le_bytes());
        }
        f.write_all(&h).unwrap();
        assert!(KvmStats::from_file(f).is_err());
        let short = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        assert!(KvmStats::from_file(short).is_err());
    }

    #[test]
    fn this_hosts_kvm_if_it_has_statistics() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return; // no /dev/kvm: the parsing tests above cover the format
        };
        let vm = kvm.create_vm().unwrap();
        match KvmStats::open(&vm) {
            Ok(s) => {
                let r = s.read().unwrap();
                assert!(r.iter().all(|(n, _, _)| !n.is_empty()));
            }
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
    }
}
