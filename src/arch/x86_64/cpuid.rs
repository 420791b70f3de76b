//! Per-vCPU CPUID: KVM's supported set with this vCPU's APIC ID and the VM's topology.
//!
//! The topology is one socket with `cpus` cores and one thread per core; APIC ID = vCPU index.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Smallest shift so that `1 << shift >= n`.
fn shift_for(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Features the in-kernel irqchip provides that KVM_GET_SUPPORTED_CPUID does not list.
#[derive(Debug, Clone, Copy, Default)]
pub struct IrqchipFeatures {
    /// KVM_CAP_TSC_DEADLINE_TIMER: the LAPIC timer's TSC-deadline mode. Without it Linux
    /// calibrates the LAPIC timer against the PIT, which fails under nested virtualization.
    pub tsc_deadline: bool,
}

/// Adjusts `entries` (KVM's supported CPUID) for vCPU `index` of `cpus`.
pub fn adjust_entries(
    entries: &mut [kvm_cpuid_entry2],
    index: u8,
    cpus: u8,
    irqchip: IrqchipFeatures,
) {
    let apic_id = index as u32;
    let cpus = cpus.max(1) as u32;
    let core_shift = shift_for(cpus);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] addressable logical CPUs.
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((1 << core_shift).min(255) << 16);
                e.ecx |= ECX_HYPERVISOR | ECX_X2APIC;
                if irqchip.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let shared = if e.eax & 0xe0 >= 0x60 { cpus - 1 } else { 0 }; // L3 is shared
                e.eax = (e.eax & 0x3fff) | (((1 << core_shift) - 1) << 26) | (shared << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                // Sub-leaf 0: SMT level (1 thread); sub-leaf 1: core level; then invalid.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = cpus;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            LEAF_AMD_SIZES => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC ID size.
                e.ecx = (e.ecx & !0xf0ff) | (cpus - 1) | (core_shift << 12);
            }
            _ => {}
        }
    }
}

/// Returns a copy of `supported` adjusted for vCPU `index` of `cpus`.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, cpus: u8, irqchip: IrqchipFeatures) -> CpuId {
    let mut cpuid = supported.clone();
    adjust_entries(cpuid.as_mut_slice(), index, cpus, irqchip);
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_topology() {
        let mut e = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
        ];
        adjust_entries(&mut e, 3, 4, IrqchipFeatures { tsc_deadline: true });
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 3));
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
        assert_eq!(e[3].ebx, 0);
        assert_eq!(e[4].ecx & 0xff, 3);
        assert_eq!(shift_for(1), 0);
        assert_eq!(shift_for(2), 1);
        assert_eq!(shift_for(3), 2);
    }
}
