//! The CPU state the boot protocols expect at entry: GDT, identity page tables, segment and
//! control registers, general registers, FPU, boot MSRs and LAPIC LINT pins.
//!
//! Pure functions that compute KVM structures (unit-tested here); `kvm::vcpu` applies them.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::EntryMode;
use super::layout;

/// GDT slots. 0x10/0x18 are the Linux boot protocol's __BOOT_CS/__BOOT_DS.
pub const GDT_CODE64: usize = 2;
pub const GDT_DATA: usize = 3;
pub const GDT_TSS: usize = 4;
pub const GDT_CODE32: usize = 5;

/// Flat descriptors: (flags, base, limit) packed into a GDT entry.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT.
pub const GDT: [u64; 6] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // data
    gdt_entry(0x808b, 0, 0xfffff), // TSS
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code (PVH)
];

/// Decodes a GDT entry into the KVM segment the CPU would load for `index`.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables for 0..4 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    write_gdt(mem)?;
    write_page_tables(mem)
}

/// Writes the GDT and an empty IDT: all a 32-bit entry (PVH, multiboot) needs.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
}

/// Writes identity page tables for 0..4 GiB (2 MiB pages) at `layout::PML4_START`.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 512 x 2 MiB pages.
    mem.write_obj(layout::PDPTE_START | 0x03, GuestAddress(layout::PML4_START))?;
    for d in 0..4u64 {
        let pd = layout::PDE_START + d * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(layout::PDPTE_START + d * 8))?;
        for i in 0..512u64 {
            let addr = ((d * 512 + i) << 21) | 0x83; // present, writable, 2 MiB page
            mem.write_obj(addr, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Segment and control registers for `mode`, starting from the vCPU's reset `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let code_index = match mode {
        EntryMode::Linux64 { .. } => GDT_CODE64,
        EntryMode::Pvh { .. } | EntryMode::Multiboot { .. } => GDT_CODE32,
    };
    let code = segment_from_gdt(GDT[code_index], code_index);
    let data = segment_from_gdt(GDT[GDT_DATA], GDT_DATA);
    let tss = segment_from_gdt(GDT[GDT_TSS], GDT_TSS);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } | EntryMode::Multiboot { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers at entry.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: layout::ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: layout::PVH_INFO_START,
            ..Default::default()
        },
        EntryMode::Multiboot { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rax: super::multiboot::BOOTLOADER_MAGIC as u64,
            rbx: layout::PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// FPU state after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices used at boot.
pub mod msr_index {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const IA32_TSC: u32 = 0x10;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// The MSRs a freshly reset CPU has, as a kernel expects them: fast strings on, MTRRs on with
/// write-back default, syscall MSRs clear.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    use msr_index::*;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(IA32_SYSENTER_CS, 0),
        e(IA32_SYSENTER_ESP, 0),
        e(IA32_SYSENTER_EIP, 0),
        e(STAR, 0),
        e(CSTAR, 0),
        e(KERNEL_GS_BASE, 0),
        e(SYSCALL_MASK, 0),
        e(LSTAR, 0),
        e(IA32_TSC, 0),
        e(IA32_MISC_ENABLE, 1),               // fast string operations
        e(IA32_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs enabled, default type write-back
    ]
}

/// LAPIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets LINT0 to ExtINT and LINT1 to NMI in a KVM LAPIC register page, as a PC BIOS leaves them.
pub fn set_lint_pins(regs: &mut [std::os::raw::c_char; 1024]) {
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = u32::from_le_bytes(b);
        let v = (v & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment_from_gdt(GDT[GDT_CODE64], GDT_CODE64);
        assert_eq!(cs.selector, 0x10);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_, cs.s), (1, 0, 1, 0xb, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[GDT_DATA], GDT_DATA);
        assert_eq!(ds.selector, 0x18);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let cs32 = segment_from_gdt(GDT[GDT_CODE32], GDT_CODE32);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPTE_START);
        // The last 2 MiB page below 4 GiB maps to itself.
        let pdpt3: u64 = mem
            .read_obj(GuestAddress(layout::PDPTE_START + 24))
            .unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pdpt3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
        assert_eq!(last & 0x83, 0x83);
    }

    #[test]
    fn lint_pins() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x07; // garbage in the mode bits is replaced
        set_lint_pins(&mut regs);
        assert_eq!(regs[APIC_LVT0 + 1] as u8 & 0x7, 7);
        assert_eq!(regs[APIC_LVT1 + 1] as u8 & 0x7, 4);
    }
}
