//! The fw_cfg files a firmware boot hands over, in QEMU's formats:
//!
//! | file | contents |
//! |---|---|
//! | `etc/e820` | the memory map: 20-byte entries (u64 address, u64 length, u32 type), little-endian |
//! | `bootorder` | one OpenFirmware device path per line, first boot device first (`/pci@i0cf8/scsi@SLOT`, QEMU's name for a virtio-blk function; `/pci@i0cf8/scsi@SLOT/channel@0/disk@TARGET,0` for a CD-ROM on virtio-scsi), NUL-terminated |
//! | `etc/boot-fail-wait` | u32 milliseconds SeaBIOS waits after "No bootable device" before it resets |
//! | `etc/sercon-port` | u16 port of SeaBIOS's serial console (COM1): BIOS text output without VGA |
//! | `etc/reserved-memory-end` | u64: where 64-bit BARs may start (above RAM, 1 GiB aligned) |
//! | `etc/table-loader`, `etc/acpi/tables`, `etc/acpi/rsdp` | ferrovm's ACPI tables and how to place them (`acpi::loader`) |

use crate::acpi::loader::{AcpiBlob, LOADER_FILE, RSDP_FILE, TABLES_FILE};
use crate::arch::x86_64::layout;
use crate::devices::fw_cfg::{FwCfg, FwCfgError};

/// e820 types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// How long SeaBIOS waits before it resets when nothing boots (documented in the README).
pub const BOOT_FAIL_WAIT_MS: u32 = 5000;

/// What the files describe.
pub struct FirmwareInfo<'a> {
    pub below_4g: u64,
    pub above_4g: u64,
    /// The boot devices, first boot device first.
    pub boot_devices: &'a [BootDevice],
    /// Start of the 64-bit PCI window.
    pub mmio64_start: u64,
    pub acpi: &'a AcpiBlob,
}

/// Adds every file to `fw`.
pub fn install(fw: &mut FwCfg, info: &FirmwareInfo) -> Result<(), FwCfgError> {
    fw.add_file("etc/e820", e820(info.below_4g, info.above_4g))?;
    fw.add_file("bootorder", bootorder(info.boot_devices))?;
    fw.add_file(
        "etc/boot-fail-wait",
        BOOT_FAIL_WAIT_MS.to_le_bytes().to_vec(),
    )?;
    fw.add_file("etc/sercon-port", layout::COM1_PORT.to_le_bytes().to_vec())?;
    fw.add_file(
        "etc/reserved-memory-end",
        info.mmio64_start.to_le_bytes().to_vec(),
    )?;
    fw.add_file(TABLES_FILE, info.acpi.tables().to_vec())?;
    fw.add_file(RSDP_FILE, info.acpi.rsdp().to_vec())?;
    fw.add_file(LOADER_FILE, info.acpi.loader_script())?;
    Ok(())
}

/// RAM below and above the hole, and the pages KVM's TSS uses.
fn e820(below_4g: u64, above_4g: u64) -> Vec<u8> {
    let mut entries = vec![
        (0, below_4g, E820_RAM),
        (
            layout::FW_KVM_RESERVED_START,
            layout::FW_KVM_RESERVED_LEN,
            E820_RESERVED,
        ),
    ];
    if above_4g > 0 {
        entries.push((layout::HIGH_RAM_START, above_4g, E820_RAM));
    }
    let mut b = Vec::new();
    for (addr, len, kind) in entries {
        b.extend_from_slice(&u64::to_le_bytes(addr));
        b.extend_from_slice(&u64::to_le_bytes(len));
        b.extend_from_slice(&u32::to_le_bytes(kind));
    }
    b
}

/// A device the firmware may boot from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootDevice {
    /// A virtio-blk disk in PCI slot `slot`.
    Disk { slot: u8 },
    /// CD-ROM `target` (LUN 0) of the virtio-scsi controller in PCI slot `slot`.
    Cdrom { slot: u8, target: u8 },
}

impl BootDevice {
    /// The OpenFirmware path SeaBIOS and OVMF match (QEMU's names: `scsi@` for a
    /// virtio-blk function too).
    fn path(&self) -> String {
        match self {
            BootDevice::Disk { slot } => format!("/pci@i0cf8/scsi@{slot:x}"),
            BootDevice::Cdrom { slot, target } => {
                format!("/pci@i0cf8/scsi@{slot:x}/channel@0/disk@{target:x},0")
            }
        }
    }
}

fn bootorder(devices: &[BootDevice]) -> Vec<u8> {
    let mut s: String = devices.iter().map(|d| d.path() + "\n").collect();
    s.push('\0');
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_and_bootorder_formats() {
        let e = e820(0x2000_0000, 0x4000_0000);
        assert_eq!(e.len(), 60);
        assert_eq!(&e[8..16], &0x2000_0000u64.to_le_bytes());
        assert_eq!(&e[16..20], &1u32.to_le_bytes());
        assert_eq!(&e[20..28], &0xfeff_c000u64.to_le_bytes());
        assert_eq!(&e[40..48], &0x1_0000_0000u64.to_le_bytes());
        assert_eq!(e820(0x2000_0000, 0).len(), 40);
        assert_eq!(
            bootorder(&[
                BootDevice::Disk { slot: 2 },
                BootDevice::Cdrom {
                    slot: 0x11,
                    target: 3
                }
            ]),
            b"/pci@i0cf8/scsi@2\n/pci@i0cf8/scsi@11/channel@0/disk@3,0\n\0"
        );
    }
}
