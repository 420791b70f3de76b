//! ACPI table tests: the walk from the RSDP, MCFG, errors, and iasl on the whole set.

use super::*;
use std::path::{Path as FsPath, PathBuf};
use std::process::Command;
use vm_memory::Bytes;
use vm_memory::GuestMemoryMmap;

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

/// Reads a whole SDT at `addr` and checks its header like a guest would.
fn read_table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
    let end = layout::ACPI_START + layout::ACPI_SIZE;
    assert!(addr >= layout::ACPI_START && addr < end, "{addr:#x}");
    assert_eq!(addr % 8, 0, "table at {addr:#x} not 8-byte aligned");
    let hdr = read(mem, addr, HEADER_LEN);
    assert_eq!(&hdr[0..4], sig);
    let len = u32_at(&hdr, 4) as usize;
    assert!(len >= HEADER_LEN);
    assert!(addr + len as u64 <= end);
    let t = read(mem, addr, len);
    assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
    assert_eq!(&t[10..16], &OEM_ID);
    assert_eq!(&t[16..24], &OEM_TABLE_ID);
    t
}

/// Everything a guest finds by walking from the RSDP.
struct Walked {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    facs: Vec<u8>,
    madt: Vec<u8>,
    mcfg: Option<Vec<u8>>,
    dsdt: Vec<u8>,
}

fn walk(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Walked {
    assert_eq!(rsdp_addr.0, layout::ACPI_START);
    let rsdp = read(mem, rsdp_addr.0, RSDP_LEN);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(&rsdp[9..15], &OEM_ID);
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20) as usize, RSDP_LEN);

    let xsdt = read_table(mem, u64_at(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = xsdt[HEADER_LEN..]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(entries.len() == 2 || entries.len() == 3, "{entries:x?}");
    let mcfg = entries.get(2).map(|a| read_table(mem, *a, b"MCFG"));
    let fadt = read_table(mem, entries[0], b"FACP");
    let madt = read_table(mem, entries[1], b"APIC");

    assert_eq!(fadt.len(), FADT_LEN);
    assert_eq!(fadt[8], 6, "FADT revision");
    let dsdt32 = u32_at(&fadt, 40);
    let x_dsdt = u64_at(&fadt, 140);
    assert_eq!(u64::from(dsdt32), x_dsdt);
    let dsdt = read_table(mem, x_dsdt, b"DSDT");

    let facs_addr = u64::from(u32_at(&fadt, 36));
    assert_eq!(facs_addr % 64, 0);
    let facs = read(mem, facs_addr, FACS_LEN);
    assert_eq!(&facs[0..4], b"FACS");
    assert_eq!(u32_at(&facs, 4) as usize, FACS_LEN);

    Walked {
        rsdp,
        xsdt,
        fadt,
        facs,
        madt,
        mcfg,
        dsdt,
    }
}

#[test]
fn acpi_tables_walk_from_rsdp() {
    for num_cpus in [1u8, 2, 4, 255] {
        let mem = guest_mem();
        let cfg = AcpiConfig {
            num_cpus,
            pci: None,
            s3: true,
            iommu: false,
        };
        let rsdp = create_acpi_tables(&mem, &cfg).unwrap().rsdp;
        let w = walk(&mem, rsdp);

        // FADT fixed hardware.
        let f = &w.fadt;
        assert_eq!(u16_at(f, 46), 9, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(f, 76), 0x608, "PM_TMR_BLK");
        assert_eq!(
            (f[88], f[89], f[91]),
            (4, 2, 4),
            "PM1 evt/cnt, PM_TMR lengths"
        );
        assert_eq!(u16_at(f, 109), 0b111, "IAPC_BOOT_ARCH");
        let flags = u32_at(f, 112);
        // TMR_VAL_EXT (bit 8) clear: a 24-bit PM timer.
        assert_eq!(flags, 1 | 1 << 2 | 1 << 4 | 1 << 5 | 1 << 10, "flags");
        assert_eq!(&f[116..120], &[1, 8, 0, 1], "RESET_REG GAS");
        assert_eq!(u64_at(f, 120), 0xcf9);
        assert_eq!(f[128], 6, "RESET_VALUE");
        assert_eq!(&f[148..152], &[1, 32, 0, 0], "X_PM1a_EVT_BLK GAS");
        assert_eq!(u64_at(f, 152), 0x600);
        assert_eq!(&f[172..176], &[1, 16, 0, 0], "X_PM1a_CNT_BLK GAS");
        // X_PM_TMR_BLK at 208: 32-bit System I/O at 0x608.
        assert_eq!(&f[208..212], &[1, 32, 0, 0], "X_PM_TMR_BLK GAS");
        assert_eq!(u64_at(f, 212), 0x608);
        assert_eq!(u64_at(f, 176), 0x604);

        // MADT.
        let m = &w.madt;
        assert_eq!(u32_at(m, 36), 0xfee0_0000);
        assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");
        let mut off = 44;
        let (mut lapics, mut ioapics, mut isos, mut nmis) = (vec![], 0, vec![], 0);
        while off < m.len() {
            let (ty, len) = (m[off], m[off + 1] as usize);
            let e = &m[off..off + len];
            match ty {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(e[2], e[3], "UID == APIC ID");
                    assert_eq!(u32_at(e, 4), 1, "enabled");
                    lapics.push(e[3]);
                }
                1 => {
                    assert_eq!(len, 12);
                    assert_eq!(u32_at(e, 4), 0xfec0_0000);
                    assert_eq!(u32_at(e, 8), 0);
                    assert!(e[2] >= num_cpus, "IOAPIC ID collides with a LAPIC");
                    ioapics += 1;
                }
                2 => isos.push((e[3], u32_at(e, 4), u16_at(e, 8))),
                4 => {
                    assert_eq!((e[2], e[5]), (0xff, 1));
                    nmis += 1;
                }
                t => panic!("unexpected MADT entry type {t}"),
            }
            off += len;
        }
        assert_eq!(off, m.len());
        assert_eq!(lapics, (0..num_cpus).collect::<Vec<_>>());
        assert_eq!((ioapics, nmis), (1, 1));
        assert_eq!(isos, vec![(0, 2, 0b0101), (9, 9, 0b1101)]);

        // The XSDT comes last and everything fits the area.
        let xsdt_addr = u64_at(&w.rsdp, 24);
        assert!(xsdt_addr + w.xsdt.len() as u64 <= layout::ACPI_START + layout::ACPI_SIZE);
        assert_eq!(&w.facs[32..33], &[2]);
        assert!(w.dsdt.windows(4).any(|x| x == b"_S5_"));
        assert!(w.dsdt.windows(4).any(|x| x == b"_S3_"));
    }
}

fn test_pci() -> PciAcpi {
    PciAcpi {
        ecam_base: Some(layout::PCI_ECAM_START),
        mmio64: None,
        io: None,
        mmio_start: layout::PCI_MMIO32_START,
        mmio_size: layout::PCI_MMIO32_SIZE,
    }
}

#[test]
fn mcfg_describes_bus_0() {
    let mem = guest_mem();
    let cfg = AcpiConfig {
        num_cpus: 1,
        pci: Some(test_pci()),
        s3: true,
        iommu: false,
    };
    let w = walk(&mem, create_acpi_tables(&mem, &cfg).unwrap().rsdp);
    let m = w.mcfg.unwrap();
    assert_eq!(m.len(), HEADER_LEN + 8 + 16);
    assert_eq!(u64_at(&m, 44), 0xe000_0000);
    assert_eq!((u16_at(&m, 52), m[54], m[55]), (0, 0, 0));
    assert!(w.dsdt.windows(4).any(|x| x == b"PCI0"));
    assert!(w.dsdt.windows(4).any(|x| x == b"_PRT"));
}

/// The root bridge's `_CRS` has a WordIO range exactly when the bus has a port window.
#[test]
fn pci_port_window_is_in_crs_only_when_used() {
    let mem = guest_mem();
    let word_io = |dsdt: &[u8]| -> Option<(u16, u16)> {
        let at = dsdt
            .windows(4)
            .position(|x| x == [0x88, 0x0d, 0x00, 0x01])?;
        Some((u16_at(dsdt, at + 8), u16_at(dsdt, at + 10)))
    };
    for io in [None, Some((0xc000, 0x4000))] {
        let cfg = AcpiConfig {
            num_cpus: 1,
            pci: Some(PciAcpi { io, ..test_pci() }),
            s3: true,
            iommu: false,
        };
        let w = walk(&mem, create_acpi_tables(&mem, &cfg).unwrap().rsdp);
        let want = io.map(|_| (0xc000, 0xffff));
        assert_eq!(word_io(&w.dsdt), want, "{io:x?}");
    }
}

#[test]
fn acpi_rejects_zero_cpus() {
    let mem = guest_mem();
    let err = create_acpi_tables(
        &mem,
        &AcpiConfig {
            num_cpus: 0,
            pci: None,
            s3: true,
            iommu: false,
        },
    )
    .unwrap_err();
    assert!(matches!(err, AcpiError::NoCpus));
}

#[test]
fn acpi_allocator_reports_overflow() {
    let mut a = AreaAllocator::new(0x1000, 0x100);
    assert_eq!(a.alloc(36, 16).unwrap(), 0x1000);
    assert_eq!(a.alloc(10, 64).unwrap(), 0x1040);
    let err = a.alloc(0x100, 16).unwrap_err();
    assert!(err.to_string().contains("only 0x100 bytes"), "{err}");
}

#[test]
fn acpi_without_guest_memory_fails_cleanly() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let err = create_acpi_tables(
        &mem,
        &AcpiConfig {
            num_cpus: 1,
            pci: None,
            s3: true,
            iommu: false,
        },
    )
    .unwrap_err();
    assert!(matches!(err, AcpiError::GuestMemory { .. }), "{err}");
}

/// Runs iasl with `args` in `dir`; panics with install instructions if it is missing.
fn iasl(dir: &FsPath, args: &[&str]) -> String {
    let out = match Command::new("iasl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "iasl not found: install acpica-tools (e.g. `apt-get install -y acpica-tools`) \
             to run the ACPI table validation test"
        ),
        Err(e) => panic!("running iasl: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "iasl {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Fails if iasl output reports any error ("N Errors" with N > 0, or an "Error" line).
fn assert_no_errors(what: &str, text: &str) {
    for line in text.lines() {
        let lower = line.to_ascii_lowercase();
        if let Some(pos) = lower.find(" error") {
            // Summary lines look like "Compilation successful. 0 Errors, 0 Warnings...".
            let count = lower[..pos].rsplit(|c: char| !c.is_ascii_digit()).next();
            if count == Some("0") {
                continue;
            }
        }
        assert!(
            !lower.contains("error"),
            "iasl reported an error for {what}: {line}\n{text}"
        );
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrovm-acpi-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn acpi_tables_pass_iasl() {
    let mem = guest_mem();
    let cfg = AcpiConfig {
        num_cpus: 4,
        pci: Some(test_pci()),
        s3: true,
        iommu: false,
    };
    let rsdp = create_acpi_tables(&mem, &cfg).unwrap().rsdp;
    let w = walk(&mem, rsdp);
    let mcfg = w.mcfg.clone().expect("MCFG");
    let dir = temp_dir("iasl");

    // iasl cannot disassemble a bare binary RSDP ("does not contain a valid ACPI table");
    // `walk` has already checked its signature, revision and both checksums.
    let tables: [(&str, &[u8]); 6] = [
        ("MCFG", &mcfg),
        ("XSDT", &w.xsdt),
        ("FACP", &w.fadt),
        ("FACS", &w.facs),
        ("APIC", &w.madt),
        ("DSDT", &w.dsdt),
    ];
    for (sig, bytes) in tables {
        let file = format!("{sig}.dat");
        std::fs::write(dir.join(&file), bytes).unwrap();
        let out = iasl(&dir, &["-d", &file]);
        println!("iasl -d {file}:\n{out}");
        assert_no_errors(&file, &out);
        let dsl = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).unwrap();
        assert!(
            !dsl.contains("Invalid") && !dsl.contains("Incorrect"),
            "{sig}: iasl flagged a field:\n{dsl}"
        );
        if sig == "DSDT" {
            continue; // recompiled below (AML output is not byte-identical after optimizing)
        }
        // Data tables round-trip exactly through the iasl table compiler, except for the
        // checksum and the compiler ID/revision, which iasl stamps with its own.
        let re = format!("re_{sig}");
        let out = iasl(&dir, &["-p", &re, &format!("{sig}.dsl")]);
        assert_no_errors(&format!("{sig}.dsl"), &out);
        let recompiled = std::fs::read(dir.join(format!("{re}.aml"))).unwrap();
        assert_eq!(recompiled.len(), bytes.len(), "{sig} recompiled length");
        for (i, (a, b)) in recompiled.iter().zip(bytes).enumerate() {
            let stamped = i == 9 || (28..36).contains(&i);
            assert!(
                stamped || a == b,
                "{sig} differs at {i:#x} after iasl round trip"
            );
        }
    }

    let dsl = std::fs::read_to_string(dir.join("DSDT.dsl")).unwrap();
    for needle in [
        "_S5_",
        "PNP0501",
        "PNP0B00",
        "PNP0303",
        "PNP0C02",
        "0x0CF9",
        "PNP0A08",
        "PNP0A03",
        "_PRT",
        "_SEG",
        "_BBN",
        "WordBusNumber",
        "0xC0000000,         // Range Minimum",
        "0xDFFFFFFF,         // Range Maximum",
        "Memory32Fixed (ReadWrite, 0xE0000000,",
        // slot 1 INTA -> GSI 17, slot 31 INTD -> GSI 18
        "0x0001FFFF, Zero, Zero, 0x11 }",
        "0x001FFFFF, 0x03, Zero, 0x12 }",
    ] {
        // Compared with whitespace collapsed (iasl indents and breaks lines).
        let flat = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat(&dsl).contains(&flat(needle)),
            "DSDT lacks {needle}:\n{dsl}"
        );
    }
    let mcfg_dsl = std::fs::read_to_string(dir.join("MCFG.dsl")).unwrap();
    for needle in ["Base Address : 00000000E0000000", "End Bus Number : 00"] {
        assert!(
            mcfg_dsl.contains(needle),
            "MCFG lacks {needle}:\n{mcfg_dsl}"
        );
    }

    // Recompile the disassembly: it must build cleanly.
    let out = iasl(&dir, &["-p", "recompiled", "DSDT.dsl"]);
    assert_no_errors("DSDT.dsl", &out);
    assert!(out.contains(" 0 Errors"), "{out}");
    assert!(dir.join("recompiled.aml").exists());

    println!("iasl DSDT.dsl:\n{out}");
    if std::env::var_os("FERROVM_KEEP_ACPI").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `--iommu`: a DMAR table (one DRHD for all of segment 0 at the unit's base, interrupt
/// remapping with x2APIC opt-out, the IOAPIC in the scope as 0xff:00.0) that iasl reads
/// without complaint, and a MADT without PCAT_COMPAT (a split irqchip has no 8259s).
#[test]
fn dmar_describes_the_iommu_only_when_asked_for() {
    use crate::devices::vtd;
    let mem = guest_mem();
    let mut cfg = AcpiConfig {
        num_cpus: 2,
        pci: Some(test_pci()),
        s3: true,
        iommu: true,
    };
    let find = |mem: &GuestMemoryMmap, sig: &[u8; 4]| {
        let rsdp = read(mem, layout::ACPI_START, RSDP_LEN);
        let xsdt = read_table(mem, u64_at(&rsdp, 24), b"XSDT");
        xsdt[HEADER_LEN..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .map(|a| read(mem, a, 4096))
            .find(|t| &t[..4] == sig)
            .map(|t| t[..u32_at(&t, 4) as usize].to_vec())
    };
    create_acpi_tables(&mem, &cfg).unwrap();
    let dmar = find(&mem, b"DMAR").expect("DMAR");
    assert_eq!(sum(&dmar), 0);
    assert_eq!(dmar[36], vtd::DMAR_HOST_ADDRESS_WIDTH);
    assert_eq!(dmar[37], 0b11, "INTR_REMAP | X2APIC_OPT_OUT");
    let drhd = &dmar[48..];
    assert_eq!((u16_at(drhd, 0), u16_at(drhd, 2), drhd[4]), (0, 24, 1));
    assert_eq!(u64_at(drhd, 8), vtd::VTD_BASE);
    // IOAPIC scope: type 3, length 8, enumeration ID = the MADT's IOAPIC ID (num_cpus).
    assert_eq!(&drhd[16..24], &[3, 8, 0, 0, 2, 0xff, 0, 0]);
    let madt = find(&mem, b"APIC").unwrap();
    assert_eq!(u32_at(&madt, 40), 0, "no PCAT_COMPAT");

    let dir = temp_dir("iasl-dmar");
    std::fs::write(dir.join("DMAR.dat"), &dmar).unwrap();
    let out = iasl(&dir, &["-d", "DMAR.dat"]);
    assert_no_errors("DMAR", &out);
    let dsl = std::fs::read_to_string(dir.join("DMAR.dsl")).unwrap();
    assert!(dsl.contains("FED90000"), "{dsl}");
    let _ = std::fs::remove_dir_all(&dir);

    cfg.iommu = false;
    let mem = guest_mem();
    create_acpi_tables(&mem, &cfg).unwrap();
    assert!(find(&mem, b"DMAR").is_none());
    assert_eq!(u32_at(&find(&mem, b"APIC").unwrap(), 40), 1, "PCAT_COMPAT");
}
