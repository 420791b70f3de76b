//! kvm-unit-tests' `x86/vmexit.flat` as a standard second opinion in `ferrovm bench-exits`'
//! report (`--kvm-unit-tests DIR`, DIR a built checkout): each row runs in its own VM with
//! `--test-devices`, as the suite's runner starts it, and the cycles per exit it prints are
//! reported beside ferrovm's own micro-benchmarks. `vmcall` is left out: it does not end
//! under this host's KVM (nor under QEMU's).

use std::path::Path;

use super::BenchError;
use crate::config::{SerialMode, VmConfig};
use crate::vmm::{self, VmOutcome};

/// The rows: vmexit's test name and the vCPUs the suite gives it.
pub const ROWS: &[(&str, u8)] = &[
    ("cpuid", 1),
    ("mov_from_cr8", 1),
    ("mov_to_cr8", 1),
    ("inl_from_pmtimer", 1),
    ("inl_from_qemu", 1),
    ("ipi", 2),
    ("ipi_halt", 2),
    ("tscdeadline", 1),
    ("tscdeadline_immed", 1),
    ("toggle_cr0_wp", 2),
    ("toggle_cr4_pge", 2),
];

/// One row's result: cycles per exit as vmexit.flat printed it.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: &'static str,
    pub cycles: u64,
}

/// Runs every row of `dir`/x86/vmexit.flat under ferrovm.
pub fn run(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>, BenchError> {
    let kernel = dir.join("x86/vmexit.flat");
    if !kernel.is_file() {
        return Err(BenchError::Setup(format!(
            "{} not found: build kvm-unit-tests there (./configure && make)",
            kernel.display()
        )));
    }
    let out = std::env::temp_dir().join(format!("ferrovm-kut-{}.log", std::process::id()));
    let mut rows = Vec::new();
    for &(name, cpus) in ROWS {
        progress(&format!("kvm-unit-tests vmexit {name}"));
        let cfg = VmConfig {
            cmdline: name.into(),
            cpus,
            mem_size: 128 << 20,
            serial: SerialMode::File(out.clone()),
            test_devices: true,
            ..VmConfig::with_kernel(kernel.clone())
        };
        let outcome = vmm::run(cfg);
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let _ = std::fs::remove_file(&out);
        match outcome? {
            VmOutcome::DebugExit(0) => {}
            other => {
                return Err(BenchError::Guest(format!(
                    "kvm-unit-tests vmexit {name}: ended {other:?}"
                )))
            }
        }
        let cycles = parse_row(&text, name).ok_or_else(|| {
            BenchError::Guest(format!("kvm-unit-tests vmexit {name}: no '{name} N' line"))
        })?;
        rows.push(Row { name, cycles });
    }
    Ok(rows)
}

/// The cycles of `name` from vmexit's "NAME CYCLES" result line.
fn parse_row(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (n, c) = l.trim().split_once(' ')?;
        (n == name).then(|| c.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_parsed_from_vmexit_output() {
        let out = "enabling apic\ncpuid 111305\r\nipi 4000\nipi_halt x\n";
        assert_eq!(parse_row(out, "cpuid"), Some(111_305));
        assert_eq!(parse_row(out, "ipi"), Some(4000));
        assert_eq!(parse_row(out, "ipi_halt"), None);
        assert_eq!(parse_row(out, "mov_to_cr8"), None);
    }
}
