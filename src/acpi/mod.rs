//! ACPI tables for the guest: RSDP, XSDT, FADT, FACS, MADT and an AML DSDT.
//!
//! Everything lives in the reserved area at [`layout::ACPI_START`]:
//!
//! ```text
//! ACPI_START  RSDP (revision 2, points at the XSDT)
//!             DSDT, FACS, FADT, MADT, ... (each aligned, leaves first)
//!             XSDT (last, because it lists the addresses of everything else)
//! ```
//!
//! The platform described is a full (not HW-reduced) ACPI PC: the FADT points
//! at the legacy PM1a event/control blocks emulated by `devices::acpi_pm`, SMI_CMD is 0 (the
//! platform is always in ACPI mode, so the PM device must report SCI_EN set), there is no PM
//! timer (Linux uses the TSC/kvm-clock) and reset goes through port 0xCF9.
//!
//! The DSDT is assembled from a list of device builders (`SB_DEVICES`) placed under `\_SB`;
//! adding a device (e.g. the PCI root bridge) means adding a builder to that list.

use acpi_tables::aml::{self, Path};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::{Aml, AmlSink};
use vm_memory::{GuestAddress, GuestMemory};

use crate::arch::x86_64::layout;

pub mod loader;

/// OEM ID in every table header and the RSDP.
pub const OEM_ID: [u8; 6] = *b"FERROV";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"FERROVM ";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// ASL compiler ID / revision fields (we are the "compiler" of these tables).
const CREATOR_ID: [u8; 4] = *b"FRVM";
const CREATOR_REVISION: u32 = 1;

/// SLP_TYP value the guest writes to PM1a_CNT to enter S3 (suspend to RAM).
pub const S3_SLP_TYP: u8 = 1;
/// SLP_TYP value the guest writes to PM1a_CNT to enter S5; the PM device checks for it.
pub const S5_SLP_TYP: u8 = 5;
/// The reset register (System I/O) and the value that resets the machine.
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;

/// Length of the PM1a event block (status + enable, 2 bytes each).
const PM1_EVT_LEN: u8 = 4;
/// Length of the PM1a control block.
const PM1_CNT_LEN: u8 = 2;
/// Length of the PM timer block.
const PM_TMR_LEN: u8 = 4;

/// Size of an ACPI 2.0+ RSDP.
const RSDP_LEN: usize = 36;
/// Size of the common system description table header.
const HEADER_LEN: usize = 36;
/// Size of the FACS (version 2 layout).
const FACS_LEN: usize = 64;

// Every table address fits the 32-bit fields (FADT DSDT/FIRMWARE_CTRL), so `as u32` on
// addresses inside the ACPI area is lossless.
const _: () = assert!(layout::ACPI_START + layout::ACPI_SIZE <= u32::MAX as u64);

/// What the ACPI tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU `i` has APIC ID and ACPI processor UID `i`.
    pub num_cpus: u8,
    /// The PCI host bridge (PNP0A08 root bridge in the DSDT, MCFG table), if any.
    pub pci: Option<PciAcpi>,
    /// Offer S3 (suspend to RAM; `\_S3`). A firmware boot does not: waking would have to go
    /// through the firmware's resume path, which ferrovm does not drive.
    pub s3: bool,
    /// An Intel IOMMU at [`crate::devices::vtd::VTD_BASE`] with interrupt remapping (DMAR
    /// table), on a split irqchip: the IOAPIC is ferrovm's and there are no 8259 PICs.
    pub iommu: bool,
}

/// What the ACPI tables say about PCI bus 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciAcpi {
    /// ECAM base of bus 0 (1 MiB, segment 0); None on the i440FX (firmware boot), which has
    /// none.
    pub ecam_base: Option<u64>,
    /// The 32-bit MMIO window BARs live in.
    pub mmio_start: u64,
    pub mmio_size: u64,
    /// The 64-bit MMIO window (start, size), where firmware may put 64-bit BARs.
    pub mmio64: Option<(u64, u64)>,
    /// The port window (start, size) I/O BARs decode in, when a device has one.
    pub io: Option<(u64, u64)>,
}

/// Errors from building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The MADT must list at least one processor.
    #[error("ACPI: the VM needs at least one vCPU")]
    NoCpus,
    /// The tables do not fit the reserved ACPI area.
    #[error(
        "ACPI tables need {needed:#x} bytes but the ACPI area at {start:#x} is only {size:#x} bytes"
    )]
    TooLarge {
        /// Bytes needed, counted from the start of the area (including alignment padding).
        needed: u64,
        /// Start of the area.
        start: u64,
        /// Size of the area.
        size: u64,
    },
    /// Guest memory does not back the ACPI area.
    #[error("ACPI: cannot write the {table} table at {addr:#x} to guest memory: {source}")]
    GuestMemory {
        /// Table signature.
        table: String,
        /// Guest-physical address of the table.
        addr: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the tables that matter after boot are.
#[derive(Debug, Clone, Copy)]
pub struct AcpiAddresses {
    /// The RSDP (for the zero page's `acpi_rsdp_addr` or the PVH start_info `rsdp_paddr`).
    pub rsdp: GuestAddress,
    /// The FACS (its firmware waking vector is where an S3 wake resumes).
    pub facs: GuestAddress,
}

/// The FACS's Firmware_Waking_Vector field (32-bit; real-mode entry at CS = vector >> 4).
pub const FACS_WAKING_VECTOR_OFFSET: u64 = 12;

/// Builds all ACPI tables for `cfg` and writes them to `mem` at [`layout::ACPI_START`] (a
/// direct kernel boot). Nothing is written if the tables do not fit the ACPI area.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<AcpiAddresses, AcpiError> {
    build_tables(cfg)?.install(mem, layout::ACPI_START)
}

/// Bytes before the tables at [`layout::ACPI_START`]: the RSDP, padded so the FACS that
/// follows can be 64-byte aligned.
const RSDP_AREA: u64 = 64;

/// Builds every table into one blob whose pointer fields hold offsets into it, plus the RSDP;
/// [`loader::AcpiBlob`] says which fields to relocate and which checksums to fix, either
/// itself (direct boot) or as QEMU's table-loader script for firmware.
pub fn build_tables(cfg: &AcpiConfig) -> Result<loader::AcpiBlob, AcpiError> {
    use loader::Field;
    if cfg.num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let mut area = AreaAllocator::new(layout::ACPI_START, layout::ACPI_SIZE);
    area.alloc(RSDP_AREA as usize, 16)?;
    let base = area.used();
    let mut off = |len: usize, align: u64| {
        area.alloc(len, align)
            .map(|a| a - layout::ACPI_START - base)
    };

    // Leaves first, so every pointer is known when the table holding it is built.
    let dsdt = build_dsdt(cfg);
    let dsdt_off = off(dsdt.len(), 16)?;
    let facs = build_facs();
    let facs_off = off(facs.len(), 64)?; // The FACS must be 64-byte aligned.
    let fadt = build_fadt(dsdt_off, facs_off);
    let fadt_off = off(fadt.len(), 16)?;
    let madt = build_madt(cfg);
    let madt_off = off(madt.len(), 16)?;
    let mut tables = vec![
        (dsdt, dsdt_off),
        (facs, facs_off),
        (fadt, fadt_off),
        (madt, madt_off),
    ];
    let mut xsdt_entries = vec![fadt_off, madt_off];
    if cfg.iommu {
        let d = build_dmar(cfg);
        let o = off(d.len(), 16)?;
        xsdt_entries.push(o);
        tables.push((d, o));
    }
    if let Some(m) = cfg.pci.as_ref().and_then(build_mcfg) {
        let o = off(m.len(), 16)?;
        xsdt_entries.push(o);
        tables.push((m, o));
    }
    let xsdt = build_xsdt(&xsdt_entries);
    let xsdt_off = off(xsdt.len(), 16)?;
    tables.push((xsdt, xsdt_off));

    let mut blob = loader::AcpiBlob::new(build_rsdp(xsdt_off), facs_off);
    for (bytes, at) in &tables {
        blob.put_table(bytes, *at, &bytes[..4] != b"FACS");
    }
    blob.pointer(Field::Table(fadt_off + 36), 4); // FIRMWARE_CTRL
    blob.pointer(Field::Table(fadt_off + 40), 4); // DSDT
    blob.pointer(Field::Table(fadt_off + 140), 8); // X_DSDT
    for i in 0..xsdt_entries.len() as u64 {
        blob.pointer(Field::Table(xsdt_off + HEADER_LEN as u64 + 8 * i), 8);
    }
    blob.pointer(Field::Rsdp(24), 8); // XsdtAddress
    Ok(blob)
}

/// Hands out aligned, non-overlapping ranges of the ACPI area.
struct AreaAllocator {
    start: u64,
    size: u64,
    next: u64,
}

impl AreaAllocator {
    fn new(start: u64, size: u64) -> Self {
        Self {
            start,
            size,
            next: start,
        }
    }

    /// Reserves `len` bytes aligned to `align` (a power of two).
    fn alloc(&mut self, len: usize, align: u64) -> Result<u64, AcpiError> {
        let too_large = |needed: u64| AcpiError::TooLarge {
            needed,
            start: self.start,
            size: self.size,
        };
        let addr = self
            .next
            .checked_next_multiple_of(align)
            .ok_or_else(|| too_large(u64::MAX))?;
        let end = addr
            .checked_add(len as u64)
            .ok_or_else(|| too_large(u64::MAX))?;
        if end - self.start > self.size {
            return Err(too_large(end - self.start));
        }
        self.next = end;
        Ok(addr)
    }

    fn used(&self) -> u64 {
        self.next - self.start
    }
}

/// The 8-bit checksum that makes `data` sum to zero.
fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// A system description table: the standard header followed by a body; length and checksum
/// are filled in by [`Sdt::finish`].
struct Sdt {
    bytes: Vec<u8>,
}

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(signature);
        bytes.extend_from_slice(&0u32.to_le_bytes()); // length, patched in finish()
        bytes.push(revision);
        bytes.push(0); // checksum, patched in finish()
        bytes.extend_from_slice(&OEM_ID);
        bytes.extend_from_slice(&OEM_TABLE_ID);
        bytes.extend_from_slice(&OEM_REVISION.to_le_bytes());
        bytes.extend_from_slice(&CREATOR_ID);
        bytes.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
        debug_assert_eq!(bytes.len(), HEADER_LEN);
        Self { bytes }
    }

    fn bytes(&mut self, data: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(data);
        self
    }

    fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[4..8].copy_from_slice(&len.to_le_bytes());
        self.bytes[9] = 0;
        self.bytes[9] = checksum(&self.bytes);
        self.bytes
    }
}

/// RSDP, ACPI 2.0+ layout (revision 2): RSDT address 0, XSDT address set.
fn build_rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(RSDP_LEN);
    b.extend_from_slice(b"RSD PTR ");
    b.push(0); // checksum over the first 20 bytes
    b.extend_from_slice(&OEM_ID);
    b.push(2); // revision
    b.extend_from_slice(&0u32.to_le_bytes()); // RSDT address: no RSDT
    b.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    b.extend_from_slice(&xsdt_addr.to_le_bytes());
    b.push(0); // extended checksum over all 36 bytes
    b.extend_from_slice(&[0; 3]);
    debug_assert_eq!(b.len(), RSDP_LEN);
    b[8] = checksum(&b[..20]);
    b[32] = checksum(&b);
    b
}

/// XSDT listing `entries` (FADT, MADT, later MCFG).
fn build_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for e in entries {
        t.u64(*e);
    }
    t.finish()
}

/// FACS (version 2). Not strictly required, but a full (non HW-reduced) FADT is expected to
/// point at one: it holds the global lock and the waking vector.
fn build_facs() -> Vec<u8> {
    let mut b = Vec::with_capacity(FACS_LEN);
    b.extend_from_slice(b"FACS");
    b.extend_from_slice(&(FACS_LEN as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // hardware signature
    b.extend_from_slice(&0u32.to_le_bytes()); // firmware waking vector
    b.extend_from_slice(&0u32.to_le_bytes()); // global lock
    b.extend_from_slice(&0u32.to_le_bytes()); // flags: no S4BIOS, no 64-bit wake
    b.extend_from_slice(&0u64.to_le_bytes()); // X firmware waking vector
    b.push(2); // version
    b.extend_from_slice(&[0; 3]);
    b.extend_from_slice(&0u32.to_le_bytes()); // OSPM flags
    b.resize(FACS_LEN, 0); // reserved
    b
}

/// A System I/O generic address of `len` bytes at `port`. The PM1 blocks use `Undefined`
/// (legacy) access, exactly what ACPICA synthesizes from the 32-bit FADT fields, so the two
/// descriptions never disagree.
fn io_gas(port: u16, len: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, len * 8, 0, access, u64::from(port))
}

/// FADT, revision 6 (ACPI 6.5 layout, 276 bytes), full (not HW-reduced) PC platform.
fn build_fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    // IA-PC boot architecture flags.
    const LEGACY_DEVICES: u16 = 1 << 0;
    const HAS_8042: u16 = 1 << 1;
    const VGA_NOT_PRESENT: u16 = 1 << 2;
    // Bit 3 (MSI not supported) stays clear; bits 4 (no ASPM) and 5 (no CMOS RTC) too.

    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .preferred_pm_profile(PmProfile::Unspecified)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No fixed-feature power button and no sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.creator_id = CREATOR_ID;
    f.creator_revision = CREATOR_REVISION.to_le_bytes();
    // The FACS address fits 32 bits; the spec wants X_FIRMWARE_CTRL zero then.
    f.firmware_ctrl = (facs_addr as u32).into();
    f.x_firmware_ctrl = 0.into();
    f.dsdt = (dsdt_addr as u32).into();
    f.x_dsdt = dsdt_addr.into();
    f.sci_int = (layout::ACPI_SCI_IRQ as u16).into();
    // SMI_CMD = 0: no SMM, the platform is always in ACPI mode (ACPI_ENABLE/DISABLE unused).
    f.smi_cmd = 0.into();
    f.acpi_enable = 0;
    f.acpi_disable = 0;
    f.pm1a_evt_blk = u32::from(layout::ACPI_PM1A_EVT_PORT).into();
    f.pm1a_cnt_blk = u32::from(layout::ACPI_PM1A_CNT_PORT).into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.pm1_cnt_len = PM1_CNT_LEN;
    // The 24-bit PM timer (TMR_VAL_EXT clear); no GPEs.
    f.pm_tmr_blk = u32::from(layout::ACPI_PM_TMR_PORT).into();
    f.pm_tmr_len = PM_TMR_LEN;
    // C2/C3 latencies above 100/1000 us mean "not supported".
    f.p_lvl2_lat = 0x0fff.into();
    f.p_lvl3_lat = 0x0fff.into();
    f.iapc_boot_arch = (LEGACY_DEVICES | HAS_8042 | VGA_NOT_PRESENT).into();
    f.reset_reg = io_gas(RESET_PORT, 1, AccessSize::ByteAccess);
    f.reset_value = RESET_VALUE;
    f.x_pm1a_evt_blk = io_gas(
        layout::ACPI_PM1A_EVT_PORT,
        PM1_EVT_LEN,
        AccessSize::Undefined,
    );
    f.x_pm1a_cnt_blk = io_gas(
        layout::ACPI_PM1A_CNT_PORT,
        PM1_CNT_LEN,
        AccessSize::Undefined,
    );
    f.x_pm_tmr_blk = io_gas(layout::ACPI_PM_TMR_PORT, PM_TMR_LEN, AccessSize::Undefined);

    let mut bytes = Vec::with_capacity(FADT_LEN);
    f.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// Size of the revision 6 FADT.
const FADT_LEN: usize = 276;

/// MADT (revision 5): one local APIC per vCPU, the IOAPIC, ISA overrides, LINT1 NMI.
fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    const LAPIC_ENABLED: u32 = 1;
    // MPS INTI flags.
    const ACTIVE_HIGH: u16 = 0b01;
    const EDGE: u16 = 0b01 << 2;
    const LEVEL: u16 = 0b11 << 2;
    const CONFORMS: u16 = 0;
    const ALL_PROCESSORS: u8 = 0xff;

    let mut t = Sdt::new(b"APIC", 5);
    // A split irqchip has no 8259 PICs.
    let flags = if cfg.iommu { 0 } else { PCAT_COMPAT };
    t.u32(layout::APIC_START as u32).u32(flags);

    for i in 0..cfg.num_cpus {
        // Processor Local APIC: type 0, length 8, ACPI processor UID, APIC ID, flags.
        t.u8(0).u8(8).u8(i).u8(i).u32(LAPIC_ENABLED);
    }
    // I/O APIC: type 1, length 12, ID (distinct from every LAPIC ID), reserved, address, GSI base.
    t.u8(1)
        .u8(12)
        .u8(ioapic_id(cfg))
        .u8(0)
        .u32(layout::IOAPIC_START as u32)
        .u32(0);
    // Interrupt Source Overrides: type 2, length 10, bus 0 (ISA), source IRQ, GSI, flags.
    // The PIT's IRQ0 is wired to IOAPIC pin 2 on PCs.
    t.u8(2).u8(10).u8(0).u8(0).u32(2).u16(EDGE | ACTIVE_HIGH);
    // The SCI is level-triggered; KVM's IOAPIC sees it active-high (as QEMU describes it).
    let sci = layout::ACPI_SCI_IRQ;
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(sci as u8)
        .u32(sci)
        .u16(LEVEL | ACTIVE_HIGH);
    // Local APIC NMI: type 4, length 6, all processors, flags, LINT1.
    t.u8(4).u8(6).u8(ALL_PROCESSORS).u16(CONFORMS).u8(1);
    t.finish()
}

/// DMAR: one remapping unit (DRHD) for every PCI device of segment 0, with interrupt
/// remapping, xAPIC destinations only (x2APIC opt-out: the unit has no extended interrupt
/// mode), and the IOAPIC in its device scope (Linux enables interrupt remapping only when
/// every IOAPIC is under a unit). The IOAPIC's requester ID is 0xFF:00.0, as QEMU gives it.
fn build_dmar(cfg: &AcpiConfig) -> Vec<u8> {
    use crate::devices::vtd;
    const SCOPE_IOAPIC: u8 = 3;
    let mut t = Sdt::new(b"DMAR", 1);
    t.u8(vtd::DMAR_HOST_ADDRESS_WIDTH)
        .u8(vtd::DMAR_FLAGS)
        .bytes(&[0; 10]);
    // DRHD: type 0, length (16 + one 8-byte scope), flags, reserved, segment, base.
    t.u16(0)
        .u16(24)
        .u8(vtd::DRHD_FLAGS)
        .u8(0)
        .u16(0)
        .u64(vtd::VTD_BASE);
    // Device scope: type, length 8, reserved, enumeration ID, start bus, path (dev, fn).
    let sid = vtd::IOAPIC_SID;
    t.u8(SCOPE_IOAPIC)
        .u8(8)
        .u16(0)
        .u8(ioapic_id(cfg))
        .u8((sid >> 8) as u8)
        .u8((sid >> 3) as u8 & 0x1f)
        .u8(sid as u8 & 7);
    t.finish()
}

/// MCFG: one ECAM allocation, segment 0, buses 0..=0.
fn build_mcfg(pci: &PciAcpi) -> Option<Vec<u8>> {
    let ecam = pci.ecam_base?;
    let mut t = Sdt::new(b"MCFG", 1);
    t.u64(0); // reserved
    t.u64(ecam).u16(0).u8(0).u8(0).u32(0);
    Some(t.finish())
}

/// The IOAPIC's ID: the first ID after the local APICs (0..num_cpus), so they never collide.
fn ioapic_id(cfg: &AcpiConfig) -> u8 {
    cfg.num_cpus
}

// ---------------------------------------------------------------------------------------------
// DSDT
// ---------------------------------------------------------------------------------------------

/// Appends the AML of one device (or other named object) to the `\_SB` scope.
type DeviceAmlBuilder = fn(&AcpiConfig, &mut Vec<u8>);

/// Everything under `\_SB`, in order. Add new devices here (the PCI root bridge goes first).
const SB_DEVICES: &[DeviceAmlBuilder] = &[pci_aml, com1_aml, rtc_aml, i8042_aml, motherboard_aml];

/// DSDT, revision 2 (64-bit AML integers).
fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut aml_bytes = Vec::new();

    // \_S3 (suspend to RAM; the value QEMU's PC uses, which kvm-unit-tests' s3 writes) and
    // \_S5: SLP_TYPa, SLP_TYPb, reserved, reserved.
    if cfg.s3 {
        aml::Name::new(
            Path::new("_S3_"),
            &aml::Package::new(vec![&S3_SLP_TYP, &S3_SLP_TYP, &0u8, &0u8]),
        )
        .to_aml_bytes(&mut aml_bytes);
    }
    aml::Name::new(
        Path::new("_S5_"),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut aml_bytes);

    let mut sb = Vec::new();
    for build in SB_DEVICES {
        build(cfg, &mut sb);
    }
    aml_bytes.extend_from_slice(&aml::Scope::raw(Path::new("\\_SB_"), sb));

    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(&aml_bytes);
    t.finish()
}

/// `IO (Decode16, port, port, 1, len)`: a fixed range of `len` ports.
fn io_fixed(port: u16, len: u8) -> aml::IO {
    aml::IO::new(port, port, 1, len)
}

/// `IRQNoFlags () {irq}`: an ISA IRQ (edge, active high, exclusive).
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small resource item 0x04 (IRQ format), 2 bytes long: the IRQ mask.
        sink.byte((0x04 << 3) | 2);
        sink.word(1u16 << self.0);
    }
}

/// `Device (name) { _HID, _UID, _CRS }` for a simple device with fixed resources.
fn simple_device(out: &mut Vec<u8>, name: &str, hid: &str, uid: u8, resources: &[&dyn Aml]) {
    let hid = aml::EISAName::new(hid);
    let hid = aml::Name::new(Path::new("_HID"), &hid);
    let uid = aml::Name::new(Path::new("_UID"), &uid);
    let crs = aml::ResourceTemplate::new(resources.to_vec());
    let crs = aml::Name::new(Path::new("_CRS"), &crs);
    aml::Device::new(Path::new(name), vec![&hid, &uid, &crs]).to_aml_bytes(out);
}

/// COM1 (16550 UART).
fn com1_aml(_cfg: &AcpiConfig, out: &mut Vec<u8>) {
    let io = io_fixed(layout::COM1_PORT, 8);
    let irq = IrqNoFlags(layout::COM1_IRQ as u8);
    simple_device(out, "COM1", "PNP0501", 0, &[&io, &irq]);
}

/// CMOS RTC.
fn rtc_aml(_cfg: &AcpiConfig, out: &mut Vec<u8>) {
    let io = io_fixed(layout::CMOS_PORT, 2);
    let irq = IrqNoFlags(8);
    simple_device(out, "RTC_", "PNP0B00", 0, &[&io, &irq]);
}

/// i8042 keyboard controller (data port 0x60, command/status port 0x64).
fn i8042_aml(_cfg: &AcpiConfig, out: &mut Vec<u8>) {
    let data = io_fixed(layout::I8042_PORT, 1);
    let cmd = io_fixed(layout::I8042_PORT + 4, 1);
    let irq = IrqNoFlags(1);
    simple_device(out, "KBD_", "PNP0303", 0, &[&data, &cmd, &irq]);
}

/// Motherboard resources: ports claimed by the platform so the OS does not hand them out, and
/// the ECAM range (Linux uses MCFG's ECAM only when it is reserved here or in the e820 map).
fn motherboard_aml(cfg: &AcpiConfig, out: &mut Vec<u8>) {
    // PM1a event (0x600..0x604) and control (0x604..0x606) blocks and the PM timer (0x608).
    let pm = io_fixed(
        layout::ACPI_PM1A_EVT_PORT,
        crate::devices::acpi_pm::ACPI_PM_LEN as u8,
    );
    let reset = io_fixed(RESET_PORT, 1);
    let debug_exit = io_fixed(layout::DEBUG_EXIT_PORT, 1);
    let ecam = cfg
        .pci
        .as_ref()
        .and_then(|p| p.ecam_base)
        .map(|e| aml::Memory32Fixed::new(true, e as u32, layout::PCI_ECAM_SIZE as u32));
    let mut res: Vec<&dyn Aml> = vec![&pm, &reset, &debug_exit];
    if let Some(e) = &ecam {
        res.push(e);
    }
    simple_device(out, "MBRD", "PNP0C02", 0, &res);
}

/// The PCI root bridge `\_SB.PCI0` for bus 0: its resources (bus 0, the config ports, the MMIO
/// window) and `_PRT`, which maps INTA..INTD of every slot straight to IOAPIC GSIs
/// ([`layout::pci_intx_gsi`]; level-triggered, active-low by the ACPI default for `_PRT` GSIs).
fn pci_aml(cfg: &AcpiConfig, out: &mut Vec<u8>) {
    let Some(pci) = &cfg.pci else { return };
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let hid = aml::Name::new(Path::new("_HID"), &hid);
    let cid = aml::Name::new(Path::new("_CID"), &cid);
    let seg = aml::Name::new(Path::new("_SEG"), &0u8);
    let bbn = aml::Name::new(Path::new("_BBN"), &0u8);
    let uid = aml::Name::new(Path::new("_UID"), &0u8);
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_ports = io_fixed(0xcf8, 8);
    let mmio_end = pci.mmio_start + pci.mmio_size - 1;
    let mmio = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio_start as u32,
        mmio_end as u32,
        None,
    );
    let mmio64 = pci.mmio64.map(|(start, size)| {
        aml::AddressSpace::<u64>::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start,
            start + size - 1,
            None,
        )
    });
    let io = pci.io.map(|(start, size)| {
        let end = (start + size - 1).min(0xffff) as u16;
        aml::AddressSpace::<u16>::new_io(start as u16, end, None)
    });
    let mut resources: Vec<&dyn Aml> = vec![&bus, &cfg_ports, &mmio];
    if let Some(m) = &mmio64 {
        resources.push(m);
    }
    if let Some(i) = &io {
        resources.push(i);
    }
    let crs = aml::ResourceTemplate::new(resources);
    let crs = aml::Name::new(Path::new("_CRS"), &crs);
    let mut prt = aml::PackageBuilder::new();
    for slot in 0..32u8 {
        for pin in 0..4u8 {
            let addr = u32::from(slot) << 16 | 0xffff;
            let gsi = layout::pci_intx_gsi(slot, pin);
            let entry = aml::Package::new(vec![&addr, &pin, &0u8, &gsi]);
            prt.add_element(&entry);
        }
    }
    let prt = aml::Name::new(Path::new("_PRT"), &prt);
    aml::Device::new(
        Path::new("PCI0"),
        vec![&hid, &cid, &seg, &bbn, &uid, &crs, &prt],
    )
    .to_aml_bytes(out);
}

#[cfg(test)]
mod tests;
