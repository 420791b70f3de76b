//! The ACPI tables as one relocatable blob, and the two ways they reach the guest:
//!
//! - a direct kernel boot: ferrovm relocates the blob itself and writes it to guest RAM
//!   ([`AcpiBlob::install`]);
//! - a firmware boot: the blob goes to fw_cfg as `etc/acpi/tables`, the RSDP as
//!   `etc/acpi/rsdp`, and `etc/table-loader` ([`AcpiBlob::loader_script`]) tells SeaBIOS or
//!   OVMF how to place them: allocate each file (tables anywhere high, the RSDP in the
//!   0xe0000-0xfffff segment where the OS scans for it), add the tables' address to every
//!   pointer field, and fix every checksum. These are QEMU's BIOS linker-loader commands:
//!   128 bytes each, a little-endian u32 command then its arguments, file names NUL-padded to
//!   56 bytes.
//!
//! Both paths apply the same list of pointer fields and checksums, so they cannot disagree.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{checksum, AcpiAddresses, AcpiError};

/// fw_cfg names of the two files and the script.
pub const TABLES_FILE: &str = "etc/acpi/tables";
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
pub const LOADER_FILE: &str = "etc/table-loader";

/// Loader commands.
const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
/// Allocation zones: anywhere in high memory, or the F segment (below 1 MiB).
const ZONE_HIGH: u8 = 1;
const ZONE_FSEG: u8 = 2;
const COMMAND_LEN: usize = 128;
const NAME_LEN: usize = 56;

/// A field of the blob: at this offset in the tables or in the RSDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Table(u64),
    Rsdp(u64),
}

/// Tables with pointer fields relative to the blob's start.
#[derive(Debug, Clone)]
pub struct AcpiBlob {
    tables: Vec<u8>,
    rsdp: Vec<u8>,
    facs_offset: u64,
    /// (field, size): the field holds an offset into `tables`.
    pointers: Vec<(Field, u8)>,
    /// (checksum byte, start, length), all in the same file.
    checksums: Vec<(Field, u64, u64)>,
}

impl AcpiBlob {
    /// A blob with `rsdp` (its checksums are registered here) and no tables yet.
    pub fn new(rsdp: Vec<u8>, facs_offset: u64) -> Self {
        let len = rsdp.len() as u64;
        Self {
            tables: Vec::new(),
            rsdp,
            facs_offset,
            pointers: Vec::new(),
            // ACPI 1.0 checksum over the first 20 bytes, extended checksum over all.
            checksums: vec![(Field::Rsdp(8), 0, 20), (Field::Rsdp(32), 0, len)],
        }
    }

    /// Places `table` at `offset`; a table with a standard header gets its checksum fixed.
    pub fn put_table(&mut self, table: &[u8], offset: u64, has_header: bool) {
        let end = offset as usize + table.len();
        if self.tables.len() < end {
            self.tables.resize(end, 0);
        }
        self.tables[offset as usize..end].copy_from_slice(table);
        if has_header {
            self.checksums
                .push((Field::Table(offset + 9), offset, table.len() as u64));
        }
    }

    /// Registers a `size`-byte pointer field (1, 2, 4 or 8).
    pub fn pointer(&mut self, field: Field, size: u8) {
        self.pointers.push((field, size));
    }

    /// The tables file (`etc/acpi/tables`).
    pub fn tables(&self) -> &[u8] {
        &self.tables
    }

    /// The RSDP file (`etc/acpi/rsdp`).
    pub fn rsdp(&self) -> &[u8] {
        &self.rsdp
    }

    fn bytes_mut(&mut self, f: Field) -> (&mut Vec<u8>, usize) {
        match f {
            Field::Table(o) => (&mut self.tables, o as usize),
            Field::Rsdp(o) => (&mut self.rsdp, o as usize),
        }
    }

    /// Relocates the blob to `tables_at` and fixes every checksum (what the firmware does
    /// with the loader script).
    pub fn relocate(&mut self, tables_at: u64) {
        for (field, size) in self.pointers.clone() {
            let (buf, o) = self.bytes_mut(field);
            let n = usize::from(size);
            let Some(b) = buf.get_mut(o..o + n) else {
                continue;
            };
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(b);
            let new = u64::from_le_bytes(v).wrapping_add(tables_at).to_le_bytes();
            b.copy_from_slice(&new[..n]);
        }
        for (field, start, len) in self.checksums.clone() {
            let (buf, o) = self.bytes_mut(field);
            let range = start as usize..(start + len) as usize;
            if o >= buf.len() || range.end > buf.len() {
                continue;
            }
            buf[o] = 0;
            buf[o] = checksum(&buf[range]);
        }
    }

    /// Direct boot: the RSDP at `base`, the tables after it (64-byte aligned), in `mem`.
    pub fn install<M: GuestMemory>(
        mut self,
        mem: &M,
        base: u64,
    ) -> Result<AcpiAddresses, AcpiError> {
        let tables_at = base + super::RSDP_AREA;
        self.relocate(tables_at);
        for (bytes, addr) in [(&self.rsdp, base), (&self.tables, tables_at)] {
            mem.write_slice(bytes, GuestAddress(addr))
                .map_err(|source| AcpiError::GuestMemory {
                    table: String::from_utf8_lossy(&bytes[..4.min(bytes.len())]).into_owned(),
                    addr,
                    source,
                })?;
        }
        log::debug!(
            "ACPI: RSDP at {base:#x}, {} bytes of tables at {tables_at:#x}",
            self.tables.len()
        );
        Ok(AcpiAddresses {
            rsdp: GuestAddress(base),
            facs: GuestAddress(tables_at + self.facs_offset),
        })
    }

    /// Firmware boot: the `etc/table-loader` script for the two files.
    pub fn loader_script(&self) -> Vec<u8> {
        let mut s = Vec::new();
        let name = |f: Field| match f {
            Field::Table(_) => TABLES_FILE,
            Field::Rsdp(_) => RSDP_FILE,
        };
        let off = |f: Field| match f {
            Field::Table(o) | Field::Rsdp(o) => o as u32,
        };
        command(&mut s, CMD_ALLOCATE, |c| {
            put_name(c, TABLES_FILE);
            c.extend_from_slice(&64u32.to_le_bytes());
            c.push(ZONE_HIGH);
        });
        command(&mut s, CMD_ALLOCATE, |c| {
            put_name(c, RSDP_FILE);
            c.extend_from_slice(&16u32.to_le_bytes());
            c.push(ZONE_FSEG);
        });
        for (field, size) in &self.pointers {
            command(&mut s, CMD_ADD_POINTER, |c| {
                put_name(c, name(*field));
                put_name(c, TABLES_FILE);
                c.extend_from_slice(&off(*field).to_le_bytes());
                c.push(*size);
            });
        }
        for (field, start, len) in &self.checksums {
            command(&mut s, CMD_ADD_CHECKSUM, |c| {
                put_name(c, name(*field));
                c.extend_from_slice(&off(*field).to_le_bytes());
                c.extend_from_slice(&(*start as u32).to_le_bytes());
                c.extend_from_slice(&(*len as u32).to_le_bytes());
            });
        }
        s
    }
}

/// Appends one 128-byte command.
fn command(out: &mut Vec<u8>, cmd: u32, args: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&cmd.to_le_bytes());
    args(out);
    out.resize(start + COMMAND_LEN, 0);
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    let mut n = [0u8; NAME_LEN];
    n[..name.len()].copy_from_slice(name.as_bytes());
    out.extend_from_slice(&n);
}

#[cfg(test)]
mod tests {
    use super::super::{build_tables, AcpiConfig};
    use super::*;

    fn cfg() -> AcpiConfig {
        AcpiConfig {
            num_cpus: 2,
            pci: None,
            s3: true,
            iommu: false,
        }
    }

    /// Runs a loader script the way SeaBIOS's romfile_loader does, with the tables placed at
    /// `tables_at`; returns (tables, rsdp).
    fn run_script(blob: &AcpiBlob, tables_at: u64) -> (Vec<u8>, Vec<u8>) {
        let mut files = [blob.tables().to_vec(), blob.rsdp().to_vec()];
        let idx = |n: &[u8]| {
            let n = std::str::from_utf8(n).unwrap().trim_end_matches('\0');
            usize::from(n == RSDP_FILE)
        };
        let addrs = [tables_at, 0xf_5a40];
        for c in blob.loader_script().chunks(COMMAND_LEN) {
            let cmd = u32::from_le_bytes(c[..4].try_into().unwrap());
            let a = &c[4..];
            let u32_at = |o: usize| u32::from_le_bytes(a[o..o + 4].try_into().unwrap()) as usize;
            match cmd {
                CMD_ALLOCATE => assert!(a[60] == ZONE_HIGH || a[60] == ZONE_FSEG),
                CMD_ADD_POINTER => {
                    let (d, s) = (idx(&a[..56]), idx(&a[56..112]));
                    let (o, n) = (u32_at(112), a[116] as usize);
                    let mut v = [0u8; 8];
                    v[..n].copy_from_slice(&files[d][o..o + n]);
                    let p = u64::from_le_bytes(v) + addrs[s];
                    files[d][o..o + n].copy_from_slice(&p.to_le_bytes()[..n]);
                }
                CMD_ADD_CHECKSUM => {
                    let f = idx(&a[..56]);
                    let (o, st, len) = (u32_at(56), u32_at(60), u32_at(64));
                    let sum = files[f][st..st + len]
                        .iter()
                        .fold(0u8, |s, b| s.wrapping_add(*b));
                    files[f][o] = files[f][o].wrapping_sub(sum);
                }
                other => panic!("command {other}"),
            }
        }
        let [t, r] = files;
        (t, r)
    }

    #[test]
    fn loader_script_and_direct_install_agree() {
        let blob = build_tables(&cfg()).unwrap();
        assert_eq!(blob.loader_script().len() % COMMAND_LEN, 0);
        let at = 0x1fff_0000;
        let (tables, rsdp) = run_script(&blob, at);
        let mut direct = blob.clone();
        direct.relocate(at);
        assert_eq!(tables, direct.tables());
        assert_eq!(rsdp, direct.rsdp());
        // The RSDP points at an XSDT inside the placed tables, and every table sums to 0.
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap()) - at;
        assert_eq!(&tables[xsdt as usize..xsdt as usize + 4], b"XSDT");
        assert_eq!(rsdp.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let fadt = u64::from_le_bytes(tables[xsdt as usize + 36..][..8].try_into().unwrap()) - at;
        let f = &tables[fadt as usize..];
        let len = u32::from_le_bytes(f[4..8].try_into().unwrap()) as usize;
        assert_eq!(&f[..4], b"FACP");
        assert_eq!(f[..len].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let dsdt = u32::from_le_bytes(f[40..44].try_into().unwrap()) as u64 - at;
        assert_eq!(&tables[dsdt as usize..dsdt as usize + 4], b"DSDT");
    }
}
