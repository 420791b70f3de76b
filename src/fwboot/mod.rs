//! Booting through PC firmware (`--firmware bios|uefi|PATH`): Debian's SeaBIOS or OVMF, which
//! then boots whatever bootloader the disks hold.
//!
//! What ferrovm does differently from a direct kernel boot (the steps are in `vmm::run`):
//! - memory ([`memory`]): the firmware image is a read-only slot ending at 4 GiB, with its
//!   last 128 KiB also at 0xe0000..0x100000 until the firmware switches that range to shadow
//!   RAM through the i440FX's PAM registers; 0xa0000..0xc0000 (VGA) has no RAM;
//! - the chipset: the i440FX host bridge, PIIX3 ISA bridge and PIIX4 PM functions
//!   (`devices::pci::i440fx`), no ECAM, PCI holes where QEMU's PC has them;
//! - fw_cfg carries the memory map, boot order and ACPI tables ([`files`]) instead of
//!   ferrovm writing a zero page and tables into RAM;
//! - the boot processor starts at the reset vector (f000:fff0) in real mode.

pub mod files;
pub mod memory;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::devices::pci::PciRoot;

/// Debian's SeaBIOS (package `seabios`), the QEMU build with 256 KiB.
pub const SEABIOS_PATH: &str = "/usr/share/seabios/bios-256k.bin";
/// Debian's OVMF without secure boot (package `ovmf`).
pub const OVMF_PATH: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Smallest and largest image accepted (SeaBIOS is 128 or 256 KiB, OVMF 2 to 4 MiB).
pub const MIN_SIZE: u64 = 64 << 10;
pub const MAX_SIZE: u64 = 16 << 20;

/// A firmware image that is unusable, with what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("--firmware {name}: {path} not found: install Debian's {package} package")]
    Missing {
        name: &'static str,
        path: &'static str,
        package: &'static str,
    },
    #[error("cannot read firmware image {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("firmware image {path} is {size} bytes: a PC firmware image is a multiple of 4 KiB between 64 KiB and 16 MiB")]
    Size { path: PathBuf, size: u64 },
    #[error("{0} does not look like a PC firmware image: no jump instruction at the reset vector (the image's last 16 bytes)")]
    NoResetVector(PathBuf),
}

/// Bus 0 of a firmware boot: the i440FX host bridge (its PAM registers drive `memory`'s shadow
/// segments), and in slot 1 the PIIX3 ISA bridge (function 0) and PIIX4 PM (function 3), as
/// on QEMU's PC. BARs are pre-assigned in ferrovm's window; the firmware moves them.
pub fn i440fx_bus(
    memory: Arc<memory::FirmwareMemory>,
) -> Result<PciRoot, crate::devices::pci::PciError> {
    use crate::arch::x86_64::layout;
    use crate::devices::pci::i440fx::{ChipsetFunction, I440fxHost};
    let host = Arc::new(Mutex::new(I440fxHost::new(memory)));
    let mut pci = PciRoot::with_host_bridge(
        layout::PCI_MMIO32_START,
        layout::PCI_MMIO32_SIZE,
        Some(host),
    );
    pci.insert_function(1, 0, Arc::new(Mutex::new(ChipsetFunction::piix3_isa())))?;
    pci.insert_function(1, 3, Arc::new(Mutex::new(ChipsetFunction::piix4_pm())))?;
    Ok(pci)
}

/// The image path for `--firmware SPEC`: `bios`, `uefi` or a path.
pub fn resolve(spec: &str) -> Result<PathBuf, FirmwareError> {
    let (name, path, package) = match spec {
        "bios" => ("bios", SEABIOS_PATH, "seabios"),
        "uefi" => ("uefi", OVMF_PATH, "ovmf"),
        other => return Ok(PathBuf::from(other)),
    };
    if !Path::new(path).is_file() {
        return Err(FirmwareError::Missing {
            name,
            path,
            package,
        });
    }
    Ok(PathBuf::from(path))
}

/// Reads and checks a firmware image: its size, and a jump at the reset vector (the CPU's
/// first instruction is the image's 16th byte from the end: SeaBIOS has a far jump there,
/// OVMF NOPs and a near jump).
pub fn load(path: &Path) -> Result<Vec<u8>, FirmwareError> {
    let meta = std::fs::metadata(path).map_err(|e| FirmwareError::Read(path.into(), e))?;
    let size = meta.len();
    if !meta.is_file() || !(MIN_SIZE..=MAX_SIZE).contains(&size) || size % 4096 != 0 {
        return Err(FirmwareError::Size {
            path: path.into(),
            size,
        });
    }
    let image = std::fs::read(path).map_err(|e| FirmwareError::Read(path.into(), e))?;
    if !has_reset_jump(&image) {
        return Err(FirmwareError::NoResetVector(path.into()));
    }
    Ok(image)
}

/// A jump among the first instructions at the reset vector (NOPs may come first).
fn has_reset_jump(image: &[u8]) -> bool {
    let Some(v) = image.len().checked_sub(16).and_then(|o| image.get(o..)) else {
        return false;
    };
    let first = v.iter().position(|b| *b != 0x90).unwrap_or(16);
    // 0xe9 near jmp, 0xea far jmp, 0xeb short jmp; 0x66 0xea with an operand-size prefix.
    matches!(v.get(first), Some(0xe9..=0xeb))
        || (v.get(first) == Some(&0x66) && v.get(first + 1) == Some(&0xea))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_a_firmware_image() {
        let dir = std::env::temp_dir().join(format!("ferrovm-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, data: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        let small = write("small", &[0xea; 4096]);
        assert!(matches!(load(&small), Err(FirmwareError::Size { .. })));
        let odd = write("odd", &vec![0u8; (128 << 10) + 1]);
        assert!(matches!(load(&odd), Err(FirmwareError::Size { .. })));
        let zeros = write("zeros", &vec![0u8; 128 << 10]);
        let e = load(&zeros).unwrap_err().to_string();
        assert!(e.contains("reset vector"), "{e}");
        let mut sea = vec![0u8; 128 << 10];
        let n = sea.len();
        sea[n - 16] = 0xea;
        assert!(load(&write("sea", &sea)).is_ok());
        let mut ovmf = vec![0u8; 2 << 20];
        let n = ovmf.len();
        ovmf[n - 16..n - 13].copy_from_slice(&[0x90, 0x90, 0xe9]);
        assert!(load(&write("ovmf", &ovmf)).is_ok());
        assert!(matches!(
            load(&dir.join("absent")),
            Err(FirmwareError::Read(..))
        ));
        assert!(matches!(load(&dir), Err(FirmwareError::Size { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(resolve("/x/y.fd").unwrap(), PathBuf::from("/x/y.fd"));
    }
}
