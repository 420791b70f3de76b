//! The i440FX/PIIX chipset functions that PC firmware probes, as QEMU's `-M pc` presents them:
//! the host bridge at 00:00.0 (8086:1237, with the PAM shadow-RAM registers), the PIIX3 ISA
//! bridge at 00:01.0 (8086:7000, PIRQ routing registers) and the PIIX4 power-management
//! function at 00:01.3 (8086:7113, PMBA). Only a firmware boot has them: a direct kernel boot
//! keeps the generic host bridge.
//!
//! Why i440FX and not Q35: SeaBIOS and OVMF support both, but the i440FX needs no MMCONFIG
//! BAR, no LPC function with its own PM block layout and no PCIe root ports; the few
//! registers here are all its firmware touches. Both firmwares recognise QEMU by the host
//! bridge's subsystem ID (1af4:1100), which every function here carries.
//!
//! What is emulated and what is only stored:
//! - PAM0..PAM6 (0x59..0x5f): each change re-maps the shadow segments it covers through
//!   [`ShadowRam`] (read from ROM or RAM, write to RAM or nowhere).
//! - PIIX3 PIRQRC[A-D] (0x60..0x63): stored. INTx reaches the guest through the IOAPIC pins
//!   the DSDT's _PRT names (GSI 16..23), not through the 8259s, so a guest that runs its PCI
//!   devices in PIC mode gets no PCI interrupts. Firmware polls; Linux uses the IOAPIC.
//! - PIIX4 PMBA (0x40) and PMREGMISC (0x80): stored; the PM registers decode at the port the
//!   FADT names (0x600, where SeaBIOS programs PMBA when it gets ACPI tables from fw_cfg).
//! - DEVACTB (0x58) reads with APMC_EN set, as QEMU's PIIX4 does without SMM: firmware then
//!   sees SMM as already set up and never raises an SMI (KVM here has none to offer).

use std::sync::Arc;

use super::config::{PciConfig, PciHeader};
use super::{ConfigOnly, PciDevice};

/// Maps the shadow segments of 0xc0000..0x100000 (implemented next to the KVM memory slots).
pub trait ShadowRam: Send + Sync {
    /// Segment `seg` ([`pam_segment`]) now reads from RAM if `read` (from the ROM or the PCI
    /// bus otherwise) and writes to RAM if `write` (nowhere otherwise).
    fn set_pam(&self, seg: usize, read: bool, write: bool);
}

/// Number of PAM segments: 0xf0000..0x100000 (64 KiB) and twelve 16 KiB segments from 0xc0000.
pub const PAM_SEGMENTS: usize = 13;

/// (guest address, length) of PAM segment `seg`.
pub fn pam_segment(seg: usize) -> (u64, u64) {
    match seg {
        0 => (0xf_0000, 0x1_0000),
        s => (0xc_0000 + (s as u64 - 1) * 0x4000, 0x4000),
    }
}

/// First PAM register.
const PAM0: usize = 0x59;
/// The host bridge's SMRAM register (stored only).
const SMRAM: usize = 0x72;

/// Identity of every function here: QEMU's subsystem ID, which firmware checks for.
fn header(device_id: u16, revision: u8, class: u32, interrupt_pin: u8) -> PciHeader {
    PciHeader {
        vendor_id: 0x8086,
        device_id,
        revision,
        class,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
        interrupt_pin,
    }
}

/// The 82441FX host bridge (00:00.0).
pub struct I440fxHost {
    config: PciConfig,
    shadow: Arc<dyn ShadowRam>,
}

impl I440fxHost {
    /// The bridge at reset: every PAM segment reads from the ROM/PCI side, writes go nowhere.
    pub fn new(shadow: Arc<dyn ShadowRam>) -> Self {
        let mut config = PciConfig::new(&header(0x1237, 0x02, 0x06_00_00, 0));
        config.set_wmask(PAM0, &[0x30, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33]);
        config.set_wmask(SMRAM, &[0x78]);
        config.set_regs(SMRAM, &[0x02]);
        for seg in 0..PAM_SEGMENTS {
            shadow.set_pam(seg, false, false);
        }
        Self { config, shadow }
    }

    /// (read, write) of segment `seg` in the PAM registers `regs` (PAM0..PAM6).
    fn segment_mode(regs: &[u8], seg: usize) -> (bool, bool) {
        let bits = match seg {
            0 => regs[0] >> 4,
            s => regs[s.div_ceil(2)] >> if s % 2 == 1 { 0 } else { 4 },
        };
        (bits & 1 != 0, bits & 2 != 0)
    }
}

impl PciDevice for I440fxHost {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        self.config.read(reg.into(), data);
    }
    fn config_write(&mut self, reg: u16, data: &[u8]) {
        let before: [u8; 7] = self.config.regs()[PAM0..PAM0 + 7]
            .try_into()
            .unwrap_or([0; 7]);
        self.config.write(reg.into(), data);
        let after = &self.config.regs()[PAM0..PAM0 + 7];
        for seg in 0..PAM_SEGMENTS {
            let (old, new) = (
                Self::segment_mode(&before, seg),
                Self::segment_mode(after, seg),
            );
            if old != new {
                self.shadow.set_pam(seg, new.0, new.1);
            }
        }
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn assign_bar(&mut self, _bar: usize, _addr: u64) {}
}

/// A chipset function whose device-specific registers (0x40..0x100) are plain storage.
pub type ChipsetFunction = ConfigOnly;

impl ConfigOnly {
    /// The PIIX3 PCI-to-ISA bridge (00:01.0), function 0 of a multi-function slot.
    pub fn piix3_isa() -> Self {
        let mut config = PciConfig::new(&header(0x7000, 0x00, 0x06_01_00, 0));
        config.set_multifunction();
        config.set_wmask(0x40, &[0xff; 0xc0]);
        // Reset values (PIIX3 datasheet, as QEMU sets them): PIRQs disabled (bit 7).
        config.set_regs(0x4c, &[0x4d, 0x00, 0x03]);
        config.set_regs(0x60, &[0x80; 4]);
        config.set_regs(0x69, &[0x02]);
        config.set_regs(0x70, &[0x80]);
        config.set_regs(0x76, &[0x0c, 0x0c, 0x02]);
        config.set_regs(0xa0, &[0x08]);
        config.set_regs(0xa8, &[0x0f]);
        Self::new(config)
    }

    /// The PIIX4 power-management function (00:01.3): SCI on INTA (line 9).
    pub fn piix4_pm() -> Self {
        let mut config = PciConfig::new(&header(0x7113, 0x03, 0x06_80_00, 1));
        config.set_wmask(0x40, &[0xff; 0xc0]);
        // PMBA and SMBBA: I/O space indicators (bit 0) read-only, 64- and 16-byte aligned.
        config.set_wmask(0x40, &[0xc0, 0xff, 0, 0]);
        config.set_wmask(0x90, &[0xf0, 0xff, 0, 0]);
        config.set_regs(0x40, &[0x01]);
        config.set_regs(0x90, &[0x01]);
        // DEVACTB.APMC_EN (bit 25): "SMM already set up", read-only.
        config.set_regs(0x5b, &[0x02]);
        config.set_wmask(0x5b, &[0xfd]);
        config.set_regs(super::config::REG_INTERRUPT_LINE, &[9]);
        Self::new(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record(Mutex<Vec<(usize, bool, bool)>>);
    impl ShadowRam for Record {
        fn set_pam(&self, seg: usize, read: bool, write: bool) {
            self.0.lock().unwrap().push((seg, read, write));
        }
    }

    #[test]
    fn pam_writes_remap_only_changed_segments() {
        let rec = Arc::new(Record::default());
        let mut h = I440fxHost::new(rec.clone());
        assert_eq!(rec.0.lock().unwrap().len(), PAM_SEGMENTS);
        rec.0.lock().unwrap().clear();
        // SeaBIOS: dword writes at 0x58 and 0x5c making everything read-write.
        h.config_write(0x58, &[0, 0x30, 0x33, 0x33]);
        h.config_write(0x5c, &[0x33, 0x33, 0x33, 0x33]);
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(got.len(), PAM_SEGMENTS);
        assert!(got.iter().all(|&(_, r, w)| r && w));
        rec.0.lock().unwrap().clear();
        // Lock 0xf0000 read-only; 0xc4000 (PAM1 high nibble) read-only.
        h.config_write(0x59, &[0x10, 0x13]);
        assert_eq!(
            rec.0.lock().unwrap().clone(),
            vec![(0, true, false), (2, true, false)]
        );
        assert_eq!(pam_segment(2), (0xc4000, 0x4000));
        assert_eq!(pam_segment(12), (0xec000, 0x4000));
        // Reserved bits stay clear; other registers are not PAM.
        let mut b = [0u8; 1];
        h.config_write(0x59, &[0xff]);
        h.config_read(0x59, &mut b);
        assert_eq!(b[0], 0x30);
    }

    #[test]
    fn chipset_identities() {
        let mut isa = ChipsetFunction::piix3_isa();
        let mut b = [0u8; 4];
        isa.config_read(0, &mut b);
        assert_eq!(b, [0x86, 0x80, 0x00, 0x70]);
        isa.config_read(0x0c, &mut b);
        assert_eq!(b[2] & 0x80, 0x80, "multi-function");
        isa.config_write(0x60, &[0x0b]);
        isa.config_read(0x60, &mut b);
        assert_eq!(b, [0x0b, 0x80, 0x80, 0x80]);
        let mut pm = ChipsetFunction::piix4_pm();
        pm.config_write(0x40, &[0xff, 0xff, 0xff, 0xff]);
        pm.config_read(0x40, &mut b);
        assert_eq!(b, [0xc1, 0xff, 0, 0]);
        pm.config_write(0x58, &[0, 0, 0, 0]);
        pm.config_read(0x58, &mut b);
        assert_eq!(b[3] & 0x02, 0x02, "APMC_EN stays set");
    }
}
