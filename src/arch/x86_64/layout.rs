//! Every guest-physical address ferrovm uses, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (left zero)
//! 0x0000_0500  GDT                       0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start_info + memory map
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. page directories (identity map of the low 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA start (reserved up to 1 MiB)
//! 0x000e_0000  RSDP and ACPI tables (reserved)
//! 0x0010_0000  kernel load address (bzImage protected-mode part, ELF segments)
//!  ...         RAM up to min(size, 3 GiB)
//! 0xc000_0000  32-bit MMIO hole: PCI MMIO window, ECAM, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB (the part of guest RAM that did not fit below the hole)
//! ```

/// GDT with the boot protocol's flat segments.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT (the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries, right after start_info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Maximum PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX: usize = 64;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages, mapping 0..4 GiB.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line size accepted (the bzImage header may lower it).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the Extended BIOS Data Area; everything from here to 1 MiB is reserved in e820.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI tables live (the RSDP first, then the rest). Reserved in e820.
pub const ACPI_START: u64 = 0xe0000;
/// Size of the ACPI area.
pub const ACPI_SIZE: u64 = 0x20000;
/// What ferrovm itself writes below 1 MiB when it boots a multiboot kernel: (start, end,
/// what). A multiboot segment may go anywhere else in RAM (kvm-unit-tests' realmode.flat
/// loads at 0x8000); the page tables at 0x9000 are written for 64-bit entry only.
pub const MULTIBOOT_RESERVED: &[(u64, u64, &str)] = &[
    (BOOT_GDT_START, BOOT_IDT_START + 8, "the boot GDT and IDT"),
    (PVH_INFO_START, ZERO_PAGE_START, "the multiboot information"),
    (
        CMDLINE_START,
        CMDLINE_START + CMDLINE_MAX_SIZE as u64,
        "the command line",
    ),
    (ACPI_START, ACPI_START + ACPI_SIZE, "the ACPI tables"),
];
/// Where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Initial stack pointer for the 64-bit boot protocol (below the zero page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Start of the 32-bit MMIO hole below 4 GiB; RAM stops here and continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 4 GiB: end of the hole, start of high RAM.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Size of the hole.
pub const MMIO_HOLE_SIZE: u64 = HIGH_RAM_START - MMIO_HOLE_START;

/// 32-bit PCI MMIO window for BARs.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI ECAM (memory-mapped configuration space), bus 0 only (1 MiB).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// PCI INTx: INTA..INTD of every slot are spread over IOAPIC pins 16..24 (level-triggered).
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI of `pin` (0 = INTA .. 3 = INTD) of PCI slot `slot` on bus 0 (the DSDT's _PRT says
/// the same).
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_INTX_GSI_COUNT
}
/// 0xe200_0000..0xfec0_0000 has no device: firmware tests use it as unclaimed MMIO.
pub const UNCLAIMED_MMIO_TEST: u64 = 0xe200_0000;
/// IOAPIC of the in-kernel irqchip.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) and identity-map page, required on Intel, harmless elsewhere.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Where KVM's TSS goes when a firmware ROM (up to 16 MiB) occupies the top of the 4 GiB
/// space: 0xfeffc000..0xff000000 (identity map page first), as QEMU puts it. Reserved in e820.
pub const FW_KVM_TSS_ADDRESS: u64 = 0xfeff_d000;
pub const FW_KVM_RESERVED_START: u64 = 0xfeff_c000;
pub const FW_KVM_RESERVED_LEN: u64 = 0x4000;
/// Firmware boot: the legacy VGA window (no RAM, no device: reads as all-ones) and the
/// shadow RAM the i440FX's PAM registers control (option ROMs 0xc0000.., the BIOS 0xe0000..).
pub const VGA_WINDOW_START: u64 = 0xa_0000;
pub const SHADOW_START: u64 = 0xc_0000;
pub const SHADOW_END: u64 = 0x10_0000;
/// Firmware boot: the PCI hole QEMU's PC gives firmware to place 32-bit BARs in, from the end
/// of low RAM up to the IOAPIC, and the 64-bit window (32 GiB, 1 GiB-aligned above high RAM).
pub const PCI_HOLE32_END: u64 = IOAPIC_START;
pub const PCI_HOLE64_SIZE: u64 = 32 << 30;

/// Legacy I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// The keyboard's ISA interrupt (firmware boots only).
pub const I8042_IRQ: u32 = 1;
pub const CMOS_PORT: u16 = 0x70;
/// ACPI PM1a event and control blocks and the PM timer (the FADT points here).
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
pub const ACPI_PM_TMR_PORT: u16 = 0x608;
/// ACPI SCI interrupt.
pub const ACPI_SCI_IRQ: u32 = 9;
/// isa-debug-exit (QEMU-compatible): writing V ends ferrovm with status `(V << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The "bench" device (`ferrovm bench-exits`, exit-statistics tests): ports
/// `BENCH_PORT..+0x10` (data, parameters, marks, guest TSC), a 4 KiB MMIO page, two
/// addresses that only an ioeventfd answers (KVM handles the write in the kernel), and an
/// interrupt line driven through an irqfd. See `src/bench/device.rs` and firmware/bench.S.
pub const BENCH_PORT: u16 = 0x700;
pub const BENCH_PORT_LEN: u64 = 0x10;
pub const BENCH_IOEVENTFD_PORT: u16 = 0x710;
/// Inside the MMIO hole, between the ECAM and the IOAPIC.
pub const BENCH_MMIO_START: u64 = 0xe100_0000;
pub const BENCH_MMIO_LEN: u64 = 0x1000;
pub const BENCH_IOEVENTFD_MMIO: u64 = 0xe100_1000;
/// IOAPIC pin only (above the PIC's 16 lines).
pub const BENCH_GSI: u32 = 23;
/// Guest RAM words the HLT/irqfd bench shares with the host: interrupt count and limit.
pub const BENCH_SHARED_START: u64 = 0x8_0000;

/// The guest RAM regions for `mem_size` bytes: below the hole, then above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// (RAM below the hole, RAM above 4 GiB) for a guest of `mem_size` bytes.
pub fn ram_split(mem_size: u64) -> (u64, u64) {
    let low = mem_size.min(MMIO_HOLE_START);
    (low, mem_size - low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_hole() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, 1 << 30)]
        );
    }
}
