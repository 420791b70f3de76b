//! ACPI fixed-hardware power management registers and the 0xCF9 reset port.
//!
//! [`AcpiPm`] covers PM1a_EVT_BLK (PM1_STS at +0, PM1_EN at +2) and PM1a_CNT_BLK (PM1_CNT at
//! +4): insert it at port 0x600 with length [`ACPI_PM_LEN`]. The machine has no SMI_CMD
//! port, so it is always in ACPI mode and SCI_EN always reads 1. The only sleep state is S5.

use crate::bus::BusDeviceMut;
use crate::devices::{StopRequest, VmControl};

/// The SLP_TYP value of \_S5 in the DSDT.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Bytes covered by [`AcpiPm`]: PM1_STS, PM1_EN, PM1_CNT and 2 reserved bytes.
pub const ACPI_PM_LEN: u64 = 8;
/// The value the FADT reset register writes to [`ResetPort`].
pub const RESET_VALUE: u8 = 0x06;

/// PM1_CNT bits.
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

/// Register offsets inside the device.
const PM1_STS: usize = 0;
const PM1_EN: usize = 2;
const PM1_CNT: usize = 4;

/// PM1a event and control registers.
pub struct AcpiPm {
    vm: VmControl,
    sts: u16,
    en: u16,
    cnt: u16,
}

impl AcpiPm {
    /// Registers that ask `vm` to power off when the guest enters S5.
    pub fn new(vm: VmControl) -> Self {
        Self {
            vm,
            sts: 0,
            en: 0,
            cnt: SCI_EN,
        }
    }

    /// The 8 register bytes as the guest sees them.
    fn bytes(&self) -> [u8; ACPI_PM_LEN as usize] {
        let mut b = [0u8; ACPI_PM_LEN as usize];
        b[PM1_STS..PM1_STS + 2].copy_from_slice(&self.sts.to_le_bytes());
        b[PM1_EN..PM1_EN + 2].copy_from_slice(&self.en.to_le_bytes());
        b[PM1_CNT..PM1_CNT + 2].copy_from_slice(&(self.cnt | SCI_EN).to_le_bytes());
        b
    }

    fn write_cnt(&mut self, value: u16, mask: u16) {
        // SLP_EN is write-only; everything else is stored.
        self.cnt = (self.cnt & !mask) | (value & mask & !SLP_EN);
        if mask & value & SLP_EN == 0 {
            return;
        }
        let slp_typ = (self.cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if slp_typ == u16::from(S5_SLEEP_TYPE) {
            log::info!("acpi: guest entered S5, powering off");
            self.vm.request_stop(StopRequest::PowerOff);
        } else {
            log::debug!("acpi: ignoring sleep request with SLP_TYP {slp_typ}");
        }
    }
}

impl BusDeviceMut for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| regs.get(at).copied())
                .unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Gather, per 16-bit register, the written bits and a mask of which bytes were hit.
        let mut value = [0u16; 3];
        let mut mask = [0u16; 3];
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64).filter(|&a| a < 6) else {
                continue;
            };
            let (reg, shift) = ((at / 2) as usize, (at % 2) * 8);
            value[reg] |= u16::from(b) << shift;
            mask[reg] |= 0xff << shift;
        }
        // PM1_STS is write-1-to-clear.
        self.sts &= !(value[0] & mask[0]);
        self.en = (self.en & !mask[1]) | (value[1] & mask[1]);
        if mask[2] != 0 {
            self.write_cnt(value[2], mask[2]);
        }
    }
}

/// The PCI reset control register at port 0xCF9 (insert with length 1).
pub struct ResetPort {
    vm: VmControl,
    value: u8,
}

impl ResetPort {
    /// A reset port that asks `vm` to reset.
    pub fn new(vm: VmControl) -> Self {
        Self { vm, value: 0 }
    }
}

impl BusDeviceMut for ResetPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        self.value = value;
        // Bit 2 starts the reset (bit 1 selects hard vs soft, which makes no difference here).
        if value & 0x04 != 0 {
            log::info!("acpi: reset via port 0xcf9 ({value:#04x})");
            self.vm.request_stop(StopRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut AcpiPm, offset: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        dev.read(offset, &mut d);
        d
    }

    #[test]
    fn registers_and_access_sizes() {
        let vm = VmControl::new().unwrap();
        let mut pm = AcpiPm::new(vm.clone());
        assert_eq!(read(&mut pm, 4, 2), [0x01, 0x00], "SCI_EN set");
        pm.write(4, &[0x00, 0x00]);
        assert_eq!(read(&mut pm, 4, 2), [0x01, 0x00], "SCI_EN sticks");
        pm.write(2, &[0x20, 0x01]);
        assert_eq!(read(&mut pm, 0, 4), [0, 0, 0x20, 0x01]);
        pm.write(3, &[0x03]);
        assert_eq!(read(&mut pm, 2, 2), [0x20, 0x03]);
        pm.sts = 0x8101;
        // A 4-byte write covers PM1_STS (write-1-to-clear) and PM1_EN (stored).
        pm.write(0, &[0x01, 0x80, 0, 0]);
        assert_eq!(read(&mut pm, 0, 2), [0x00, 0x01]);
        assert_eq!(read(&mut pm, 2, 2), [0, 0]);
        assert_eq!(read(&mut pm, 6, 4), [0, 0, 0xff, 0xff]);
        assert_eq!(read(&mut pm, 100, 1), [0xff]);
        pm.write(7, &[0xff; 4]);
        pm.write(u64::MAX, &[0xff; 2]);
        assert!(!vm.is_stopping());
    }

    #[test]
    fn sleep_states() {
        let vm = VmControl::new().unwrap();
        let mut pm = AcpiPm::new(vm.clone());
        // S3 (type 3) is ignored, and SLP_TYP without SLP_EN does nothing.
        pm.write(4, &(SLP_EN | 3 << SLP_TYP_SHIFT).to_le_bytes());
        pm.write(4, &(5u16 << SLP_TYP_SHIFT).to_le_bytes());
        assert!(!vm.is_stopping());
        assert_eq!(
            read(&mut pm, 5, 1),
            [0x14],
            "SLP_TYP stored, SLP_EN reads 0"
        );
        // Linux writes SLP_TYP first, then SLP_TYP | SLP_EN; a 1-byte write to +5 works too.
        pm.write(5, &[((SLP_EN | 5 << SLP_TYP_SHIFT) >> 8) as u8]);
        assert_eq!(vm.request(), Some(StopRequest::PowerOff));

        let vm = VmControl::new().unwrap();
        let mut pm = AcpiPm::new(vm.clone());
        pm.write(
            4,
            &u32::from(SLP_EN | 5 << SLP_TYP_SHIFT | SCI_EN).to_le_bytes(),
        );
        assert_eq!(vm.request(), Some(StopRequest::PowerOff));
    }

    #[test]
    fn reset_port() {
        let vm = VmControl::new().unwrap();
        let mut port = ResetPort::new(vm.clone());
        port.write(0, &[0x02]);
        let mut b = [0u8];
        port.read(0, &mut b);
        assert_eq!(b[0], 0x02);
        assert!(!vm.is_stopping());
        port.write(0, &[RESET_VALUE]);
        assert_eq!(vm.request(), Some(StopRequest::Reset));
        port.write(0, &[]);
    }
}
