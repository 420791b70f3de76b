//! `--cpu MODEL[,+FEATURE|-FEATURE|FEATURE=on|off,...]`: the guest's CPUID feature bits, in
//! QEMU's spelling.
//!
//! The models are `host` and `max` (the default; both mean everything this host's KVM can
//! provide, as QEMU's are under KVM). A `+feature` must be something KVM can back: a bit of
//! KVM_GET_SUPPORTED_CPUID or one the in-kernel irqchip provides (x2apic, tsc-deadline), or
//! `hypervisor`; anything else is an error naming the feature. `-feature` clears the bit.
//! Later settings win over earlier ones, as in QEMU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::cpuid::IrqchipFeatures;

/// The register of a CPUID leaf a feature bit lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A feature bit: leaf, sub-leaf, register, bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bit {
    leaf: u32,
    index: u32,
    reg: Reg,
    bit: u8,
}

const fn b(leaf: u32, index: u32, reg: Reg, bit: u8) -> Bit {
    Bit {
        leaf,
        index,
        reg,
        bit,
    }
}

use Reg::{Eax, Ebx, Ecx, Edx};

/// QEMU's feature names (hyphenated; `_` and `.` are accepted for `-`) and their bits.
#[rustfmt::skip]
const FEATURES: &[(&str, Bit)] = &[
    // Leaf 1 EDX.
    ("fpu", b(1, 0, Edx, 0)), ("vme", b(1, 0, Edx, 1)), ("de", b(1, 0, Edx, 2)),
    ("pse", b(1, 0, Edx, 3)), ("tsc", b(1, 0, Edx, 4)), ("msr", b(1, 0, Edx, 5)),
    ("pae", b(1, 0, Edx, 6)), ("mce", b(1, 0, Edx, 7)), ("cx8", b(1, 0, Edx, 8)),
    ("apic", b(1, 0, Edx, 9)), ("sep", b(1, 0, Edx, 11)), ("mtrr", b(1, 0, Edx, 12)),
    ("pge", b(1, 0, Edx, 13)), ("mca", b(1, 0, Edx, 14)), ("cmov", b(1, 0, Edx, 15)),
    ("pat", b(1, 0, Edx, 16)), ("pse36", b(1, 0, Edx, 17)), ("clflush", b(1, 0, Edx, 19)),
    ("ds", b(1, 0, Edx, 21)), ("acpi", b(1, 0, Edx, 22)), ("mmx", b(1, 0, Edx, 23)),
    ("fxsr", b(1, 0, Edx, 24)), ("sse", b(1, 0, Edx, 25)), ("sse2", b(1, 0, Edx, 26)),
    ("ss", b(1, 0, Edx, 27)), ("ht", b(1, 0, Edx, 28)), ("tm", b(1, 0, Edx, 29)),
    ("pbe", b(1, 0, Edx, 31)),
    // Leaf 1 ECX.
    ("pni", b(1, 0, Ecx, 0)), ("sse3", b(1, 0, Ecx, 0)), ("pclmulqdq", b(1, 0, Ecx, 1)),
    ("dtes64", b(1, 0, Ecx, 2)), ("monitor", b(1, 0, Ecx, 3)), ("ds-cpl", b(1, 0, Ecx, 4)),
    ("vmx", b(1, 0, Ecx, 5)), ("smx", b(1, 0, Ecx, 6)), ("est", b(1, 0, Ecx, 7)),
    ("tm2", b(1, 0, Ecx, 8)), ("ssse3", b(1, 0, Ecx, 9)), ("cid", b(1, 0, Ecx, 10)),
    ("fma", b(1, 0, Ecx, 12)), ("cx16", b(1, 0, Ecx, 13)), ("xtpr", b(1, 0, Ecx, 14)),
    ("pdcm", b(1, 0, Ecx, 15)), ("pcid", b(1, 0, Ecx, 17)), ("dca", b(1, 0, Ecx, 18)),
    ("sse4-1", b(1, 0, Ecx, 19)), ("sse4-2", b(1, 0, Ecx, 20)), ("x2apic", b(1, 0, Ecx, 21)),
    ("movbe", b(1, 0, Ecx, 22)), ("popcnt", b(1, 0, Ecx, 23)),
    ("tsc-deadline", b(1, 0, Ecx, 24)), ("aes", b(1, 0, Ecx, 25)), ("xsave", b(1, 0, Ecx, 26)),
    ("avx", b(1, 0, Ecx, 28)), ("f16c", b(1, 0, Ecx, 29)), ("rdrand", b(1, 0, Ecx, 30)),
    ("hypervisor", b(1, 0, Ecx, 31)),
    // Leaf 7 sub-leaf 0 EBX.
    ("fsgsbase", b(7, 0, Ebx, 0)), ("tsc-adjust", b(7, 0, Ebx, 1)), ("bmi1", b(7, 0, Ebx, 3)),
    ("hle", b(7, 0, Ebx, 4)), ("avx2", b(7, 0, Ebx, 5)), ("smep", b(7, 0, Ebx, 7)),
    ("bmi2", b(7, 0, Ebx, 8)), ("erms", b(7, 0, Ebx, 9)), ("invpcid", b(7, 0, Ebx, 10)),
    ("rtm", b(7, 0, Ebx, 11)), ("mpx", b(7, 0, Ebx, 14)), ("avx512f", b(7, 0, Ebx, 16)),
    ("avx512dq", b(7, 0, Ebx, 17)), ("rdseed", b(7, 0, Ebx, 18)), ("adx", b(7, 0, Ebx, 19)),
    ("smap", b(7, 0, Ebx, 20)), ("avx512ifma", b(7, 0, Ebx, 21)),
    ("clflushopt", b(7, 0, Ebx, 23)), ("clwb", b(7, 0, Ebx, 24)), ("avx512pf", b(7, 0, Ebx, 26)),
    ("avx512er", b(7, 0, Ebx, 27)), ("avx512cd", b(7, 0, Ebx, 28)), ("sha-ni", b(7, 0, Ebx, 29)),
    ("avx512bw", b(7, 0, Ebx, 30)), ("avx512vl", b(7, 0, Ebx, 31)),
    // Leaf 7 sub-leaf 0 ECX.
    ("avx512vbmi", b(7, 0, Ecx, 1)), ("umip", b(7, 0, Ecx, 2)), ("pku", b(7, 0, Ecx, 3)),
    ("waitpkg", b(7, 0, Ecx, 5)), ("avx512vbmi2", b(7, 0, Ecx, 6)), ("gfni", b(7, 0, Ecx, 8)),
    ("vaes", b(7, 0, Ecx, 9)), ("vpclmulqdq", b(7, 0, Ecx, 10)),
    ("avx512vnni", b(7, 0, Ecx, 11)), ("avx512bitalg", b(7, 0, Ecx, 12)),
    ("avx512-vpopcntdq", b(7, 0, Ecx, 14)), ("la57", b(7, 0, Ecx, 16)),
    ("rdpid", b(7, 0, Ecx, 22)), ("cldemote", b(7, 0, Ecx, 25)), ("movdiri", b(7, 0, Ecx, 27)),
    ("movdir64b", b(7, 0, Ecx, 28)),
    // Leaf 7 sub-leaf 0 EDX.
    ("avx512-4vnniw", b(7, 0, Edx, 2)), ("avx512-4fmaps", b(7, 0, Edx, 3)),
    ("fsrm", b(7, 0, Edx, 4)), ("md-clear", b(7, 0, Edx, 10)), ("serialize", b(7, 0, Edx, 14)),
    ("tsx-ldtrk", b(7, 0, Edx, 16)), ("arch-lbr", b(7, 0, Edx, 19)),
    ("amx-bf16", b(7, 0, Edx, 22)), ("avx512-fp16", b(7, 0, Edx, 23)),
    ("amx-tile", b(7, 0, Edx, 24)), ("amx-int8", b(7, 0, Edx, 25)),
    ("spec-ctrl", b(7, 0, Edx, 26)), ("stibp", b(7, 0, Edx, 27)),
    ("arch-capabilities", b(7, 0, Edx, 29)), ("core-capability", b(7, 0, Edx, 30)),
    ("ssbd", b(7, 0, Edx, 31)),
    // Leaf 7 sub-leaf 1 EAX.
    ("avx-vnni", b(7, 1, Eax, 4)), ("avx512-bf16", b(7, 1, Eax, 5)), ("fzrm", b(7, 1, Eax, 10)),
    ("fsrs", b(7, 1, Eax, 11)), ("fsrc", b(7, 1, Eax, 12)), ("lam", b(7, 1, Eax, 26)),
    // Leaf 0x8000_0001 EDX.
    ("syscall", b(0x8000_0001, 0, Edx, 11)), ("nx", b(0x8000_0001, 0, Edx, 20)),
    ("xd", b(0x8000_0001, 0, Edx, 20)), ("mmxext", b(0x8000_0001, 0, Edx, 22)),
    ("fxsr-opt", b(0x8000_0001, 0, Edx, 25)), ("pdpe1gb", b(0x8000_0001, 0, Edx, 26)),
    ("rdtscp", b(0x8000_0001, 0, Edx, 27)), ("lm", b(0x8000_0001, 0, Edx, 29)),
    ("3dnowext", b(0x8000_0001, 0, Edx, 30)), ("3dnow", b(0x8000_0001, 0, Edx, 31)),
    // Leaf 0x8000_0001 ECX.
    ("lahf-lm", b(0x8000_0001, 0, Ecx, 0)), ("cmp-legacy", b(0x8000_0001, 0, Ecx, 1)),
    ("svm", b(0x8000_0001, 0, Ecx, 2)), ("extapic", b(0x8000_0001, 0, Ecx, 3)),
    ("cr8legacy", b(0x8000_0001, 0, Ecx, 4)), ("abm", b(0x8000_0001, 0, Ecx, 5)),
    ("sse4a", b(0x8000_0001, 0, Ecx, 6)), ("misalignsse", b(0x8000_0001, 0, Ecx, 7)),
    ("3dnowprefetch", b(0x8000_0001, 0, Ecx, 8)), ("osvw", b(0x8000_0001, 0, Ecx, 9)),
    ("ibs", b(0x8000_0001, 0, Ecx, 10)), ("xop", b(0x8000_0001, 0, Ecx, 11)),
    ("skinit", b(0x8000_0001, 0, Ecx, 12)), ("wdt", b(0x8000_0001, 0, Ecx, 13)),
    ("lwp", b(0x8000_0001, 0, Ecx, 15)), ("fma4", b(0x8000_0001, 0, Ecx, 16)),
    ("tce", b(0x8000_0001, 0, Ecx, 17)), ("nodeid-msr", b(0x8000_0001, 0, Ecx, 19)),
    ("tbm", b(0x8000_0001, 0, Ecx, 21)), ("topoext", b(0x8000_0001, 0, Ecx, 22)),
    ("perfctr-core", b(0x8000_0001, 0, Ecx, 23)), ("perfctr-nb", b(0x8000_0001, 0, Ecx, 24)),
    // Leaf 0x8000_000A EDX (SVM features).
    ("npt", b(0x8000_000a, 0, Edx, 0)), ("lbrv", b(0x8000_000a, 0, Edx, 1)),
    ("svm-lock", b(0x8000_000a, 0, Edx, 2)), ("nrip-save", b(0x8000_000a, 0, Edx, 3)),
    ("tsc-scale", b(0x8000_000a, 0, Edx, 4)), ("vmcb-clean", b(0x8000_000a, 0, Edx, 5)),
    ("flushbyasid", b(0x8000_000a, 0, Edx, 6)), ("decodeassists", b(0x8000_000a, 0, Edx, 7)),
    ("pause-filter", b(0x8000_000a, 0, Edx, 10)), ("pfthreshold", b(0x8000_000a, 0, Edx, 12)),
    ("avic", b(0x8000_000a, 0, Edx, 13)), ("v-vmsave-vmload", b(0x8000_000a, 0, Edx, 15)),
    ("vgif", b(0x8000_000a, 0, Edx, 16)),
    // Leaf 0x8000_0007 EDX.
    ("invtsc", b(0x8000_0007, 0, Edx, 8)),
    // Leaf 0x4000_0001 EAX: KVM's paravirtual features (QEMU's kvm-* properties).
    ("kvmclock", b(0x4000_0001, 0, Eax, 0)), ("kvm-nopiodelay", b(0x4000_0001, 0, Eax, 1)),
    ("kvm-mmu", b(0x4000_0001, 0, Eax, 2)), ("kvmclock2", b(0x4000_0001, 0, Eax, 3)),
    ("kvm-asyncpf", b(0x4000_0001, 0, Eax, 4)), ("kvm-steal-time", b(0x4000_0001, 0, Eax, 5)),
    ("kvm-pv-eoi", b(0x4000_0001, 0, Eax, 6)), ("kvm-pv-unhalt", b(0x4000_0001, 0, Eax, 7)),
    ("kvm-pv-tlb-flush", b(0x4000_0001, 0, Eax, 9)),
    ("kvm-asyncpf-vmexit", b(0x4000_0001, 0, Eax, 10)),
    ("kvm-pv-ipi", b(0x4000_0001, 0, Eax, 11)), ("kvm-poll-control", b(0x4000_0001, 0, Eax, 12)),
    ("kvm-pv-sched-yield", b(0x4000_0001, 0, Eax, 13)),
    ("kvm-asyncpf-int", b(0x4000_0001, 0, Eax, 14)),
    ("kvm-msi-ext-dest-id", b(0x4000_0001, 0, Eax, 15)),
];

/// Errors in `--cpu`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuError {
    #[error("--cpu: unknown CPU model '{0}' (ferrovm has host and max: all KVM supports)")]
    Model(String),
    #[error("--cpu: unknown CPU feature '{0}' (QEMU's names, e.g. +x2apic or tsc-deadline=off)")]
    Feature(String),
    #[error("--cpu: '{0}' is neither +FEATURE, -FEATURE nor FEATURE=on|off")]
    Syntax(String),
    #[error("--cpu: feature '{0}' is not available: this host's KVM cannot provide it")]
    Unsupported(String),
}

/// A parsed `--cpu`: the features to set (true) or clear (false), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    changes: Vec<(String, Bit, bool)>,
}

fn lookup(name: &str) -> Option<Bit> {
    let norm = name.to_ascii_lowercase().replace(['_', '.'], "-");
    FEATURES.iter().find(|(n, _)| *n == norm).map(|(_, b)| *b)
}

impl CpuFeatures {
    /// Parses `MODEL[,+F|-F|F=on|F=off|F...]` (a bare `F` means `+F`, as in QEMU).
    pub fn parse(s: &str) -> Result<Self, CpuError> {
        let mut parts = s.split(',');
        let model = parts.next().unwrap_or("");
        if !matches!(model, "host" | "max") {
            return Err(CpuError::Model(model.into()));
        }
        let mut changes = Vec::new();
        for p in parts.filter(|p| !p.is_empty()) {
            let (name, on) = if let Some(n) = p.strip_prefix('+') {
                (n, true)
            } else if let Some(n) = p.strip_prefix('-') {
                (n, false)
            } else if let Some((n, v)) = p.split_once('=') {
                match v {
                    "on" | "true" | "yes" => (n, true),
                    "off" | "false" | "no" => (n, false),
                    _ => return Err(CpuError::Syntax(p.into())),
                }
            } else {
                (p, true)
            };
            let bit = lookup(name).ok_or_else(|| CpuError::Feature(name.into()))?;
            changes.push((name.to_string(), bit, on));
        }
        Ok(Self { changes })
    }

    /// Checks every `+feature` against what KVM (`supported`) and the irqchip can back.
    pub fn check(&self, supported: &CpuId, irqchip: IrqchipFeatures) -> Result<(), CpuError> {
        for (name, bit, on) in &self.changes {
            let extra = match (bit.leaf, bit.reg, bit.bit) {
                (1, Ecx, 21) | (1, Ecx, 31) => true, // x2apic (in-kernel LAPIC), hypervisor
                (1, Ecx, 24) => irqchip.tsc_deadline,
                _ => false,
            };
            if *on && !extra && !get(supported.as_slice(), *bit) {
                return Err(CpuError::Unsupported(name.clone()));
            }
        }
        Ok(())
    }

    /// Applies the settings to one vCPU's CPUID (after `cpuid::adjust_entries`).
    pub fn apply(&self, entries: &mut [kvm_cpuid_entry2]) {
        for (_, bit, on) in &self.changes {
            // A missing leaf: only clearing can get here (setting was checked).
            let Some(e) = entries.iter_mut().find(|e| bit.is_in(e)) else {
                continue;
            };
            let r = bit.reg_mut(e);
            if *on {
                *r |= 1 << bit.bit;
            } else {
                *r &= !(1 << bit.bit);
            }
        }
    }
}

impl Bit {
    /// Whether `e` is the leaf (and sub-leaf) this bit lives in. Leaf 1 has no sub-leaves.
    fn is_in(&self, e: &kvm_cpuid_entry2) -> bool {
        e.function == self.leaf && (e.index == self.index || self.leaf == 1)
    }

    /// The register of `e` this bit lives in.
    fn reg_mut<'a>(&self, e: &'a mut kvm_cpuid_entry2) -> &'a mut u32 {
        match self.reg {
            Eax => &mut e.eax,
            Ebx => &mut e.ebx,
            Ecx => &mut e.ecx,
            Edx => &mut e.edx,
        }
    }
}

/// Whether `bit` is set in `entries`.
fn get(entries: &[kvm_cpuid_entry2], bit: Bit) -> bool {
    entries
        .iter()
        .find(|e| bit.is_in(e))
        .is_some_and(|e| *bit.reg_mut(&mut e.clone()) & (1 << bit.bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    fn leaf(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn parses_qemu_spellings() {
        let f = CpuFeatures::parse("host,-x2apic,+tsc-deadline,tsc_deadline=off,sse4.1,lam=on")
            .unwrap();
        let names: Vec<_> = f.changes.iter().map(|c| (c.0.as_str(), c.2)).collect();
        assert_eq!(
            names,
            [
                ("x2apic", false),
                ("tsc-deadline", true),
                ("tsc_deadline", false),
                ("sse4.1", true),
                ("lam", true)
            ]
        );
        assert_eq!(CpuFeatures::parse("max").unwrap(), CpuFeatures::default());
        assert_eq!(
            CpuFeatures::parse("qemu64,-x2apic"),
            Err(CpuError::Model("qemu64".into()))
        );
        assert_eq!(
            CpuFeatures::parse("host,+warp-drive"),
            Err(CpuError::Feature("warp-drive".into()))
        );
        assert_eq!(
            CpuFeatures::parse("host,x2apic=maybe"),
            Err(CpuError::Syntax("x2apic=maybe".into()))
        );
    }

    #[test]
    fn only_what_kvm_backs_can_be_added() {
        let supported = cpuid(&[leaf(1, 0, 1 << 13), leaf(7, 0, 0)]);
        let chip = IrqchipFeatures {
            tsc_deadline: false,
        };
        let ok = CpuFeatures::parse("host,+cx16,+x2apic,+hypervisor,-avx512f").unwrap();
        ok.check(&supported, chip).unwrap();
        let e = CpuFeatures::parse("host,+avx512f").unwrap();
        assert_eq!(
            e.check(&supported, chip),
            Err(CpuError::Unsupported("avx512f".into()))
        );
        let tsc = CpuFeatures::parse("host,+tsc-deadline").unwrap();
        assert!(tsc.check(&supported, chip).is_err());
        tsc.check(&supported, IrqchipFeatures { tsc_deadline: true })
            .unwrap();
    }

    #[test]
    fn applies_in_order_and_last_wins() {
        let mut e = vec![leaf(1, 0, 1 << 21 | 1 << 24), leaf(7, 1, 0)];
        CpuFeatures::parse("host,-x2apic,+tsc-deadline,-tsc-deadline,+lam,-lam,+lam")
            .unwrap()
            .apply(&mut e);
        assert_eq!(e[0].ecx, 0);
        assert_eq!(e[1].eax, 1 << 26);
        // A missing leaf is left alone.
        CpuFeatures::parse("host,-la57").unwrap().apply(&mut e);
    }

    /// KVM's paravirtual leaf, as QEMU spells its bits (asyncpf.flat skips without
    /// kvm-asyncpf-int, as under QEMU's qemu64).
    #[test]
    fn kvm_paravirtual_features() {
        let mut pv = leaf(0x4000_0001, 0, 0);
        pv.eax = 1 << 4 | 1 << 14 | 1 << 3;
        let mut e = vec![pv];
        let f = CpuFeatures::parse("host,-kvm-asyncpf-int,kvm_asyncpf=off").unwrap();
        f.check(&cpuid(&e), IrqchipFeatures::default()).unwrap();
        f.apply(&mut e);
        assert_eq!(e[0].eax, 1 << 3);
        let add = CpuFeatures::parse("host,+kvm-pv-ipi").unwrap();
        assert_eq!(
            add.check(&cpuid(&e), IrqchipFeatures::default()),
            Err(CpuError::Unsupported("kvm-pv-ipi".into()))
        );
    }
}
