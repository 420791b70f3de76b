//! ACPI fixed-hardware power management registers and the 0xCF9 reset port.
//!
//! [`AcpiPm`] covers PM1a_EVT_BLK (PM1_STS at +0, PM1_EN at +2), PM1a_CNT_BLK (PM1_CNT at
//! +4) and PM_TMR_BLK (+8), the layout of the PIIX4 PM function QEMU's PC has: insert it at
//! port 0x600 with length [`ACPI_PM_LEN`]. The machine has no SMI_CMD port, so it is always
//! in ACPI mode and SCI_EN always reads 1. Sleep states: S3 (suspend to RAM: the VMM parks
//! the vCPUs and wakes them at the FACS waking vector on an RTC alarm when PM1_EN.RTC_EN is
//! set, see `crate::sleep`) and S5 (power off).
//!
//! The PM timer is a 24-bit counter at 3.579545 MHz (the FADT leaves TMR_VAL_EXT clear),
//! computed from the host's monotonic clock when read. TMR_STS (PM1_STS bit 0) is set once
//! the counter's top bit has changed since the guest last cleared it; the timer raises no
//! SCI (Linux and the firmwares poll it).

use crate::bus::BusDeviceMut;
use crate::devices::{StopRequest, VmControl};

/// The SLP_TYP values of \_S3 and \_S5 in the DSDT.
pub const S3_SLEEP_TYPE: u8 = 1;
pub const S5_SLEEP_TYPE: u8 = 5;
/// PM1_STS / PM1_EN bits: RTC alarm status / wake enable; wake status.
const RTC_STS: u16 = 1 << 10;
const RTC_EN: u16 = 1 << 10;
const WAK_STS: u16 = 1 << 15;
/// Bytes covered by [`AcpiPm`]: PM1_STS, PM1_EN, PM1_CNT, 2 reserved bytes and PM_TMR.
pub const ACPI_PM_LEN: u64 = 12;
/// Offset of PM_TMR in [`AcpiPm`] (port 0x608 at the usual base).
pub const PM_TMR_OFFSET: u64 = 8;
/// The PM timer's rate (Hz).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// TMR_VAL is 24 bits wide.
const PM_TIMER_MASK: u32 = 0x00ff_ffff;
/// PM1_STS bit 0.
const TMR_STS: u16 = 1 << 0;
/// The value the FADT reset register writes to [`ResetPort`].
pub const RESET_VALUE: u8 = 0x06;

/// The PIIX4's SLP_TYP for soft-off (S5).
const PIIX4_SOFT_OFF: u16 = 0;

/// PM1_CNT bits.
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

/// Register offsets inside the device.
const PM1_STS: usize = 0;
const PM1_EN: usize = 2;
const PM1_CNT: usize = 4;
const PM_TMR: usize = PM_TMR_OFFSET as usize;

/// PM1a event and control registers and the PM timer.
pub struct AcpiPm {
    vm: VmControl,
    sts: u16,
    en: u16,
    cnt: u16,
    /// Time zero of the PM timer.
    epoch: std::time::Instant,
    /// The timer's top bit when the guest last cleared TMR_STS.
    tmr_msb_at_clear: u32,
}

impl AcpiPm {
    /// Registers that ask `vm` to power off when the guest enters S5.
    pub fn new(vm: VmControl) -> Self {
        Self {
            vm,
            sts: 0,
            en: 0,
            cnt: SCI_EN,
            epoch: std::time::Instant::now(),
            tmr_msb_at_clear: 0,
        }
    }

    /// Whether the guest enabled the RTC alarm as a wake event (PM1_EN.RTC_EN).
    pub fn rtc_wake_enabled(&self) -> bool {
        self.en & RTC_EN != 0
    }

    /// Records a wake from S3 by the RTC alarm (PM1_STS.WAK_STS and RTC_STS).
    pub fn woken_by_rtc(&mut self) {
        self.sts |= WAK_STS | RTC_STS;
    }

    /// TMR_VAL now: elapsed ticks of the 3.579545 MHz clock, modulo 2^24.
    fn timer(&self) -> u32 {
        let ns = self.epoch.elapsed().as_nanos();
        let ticks = ns * u128::from(PM_TIMER_HZ) / 1_000_000_000;
        (ticks as u32) & PM_TIMER_MASK // the low 24 bits are all that is kept
    }

    /// The register bytes as the guest sees them.
    fn bytes(&self) -> [u8; ACPI_PM_LEN as usize] {
        let mut b = [0u8; ACPI_PM_LEN as usize];
        let timer = self.timer();
        let sts = if timer >> 23 != self.tmr_msb_at_clear {
            self.sts | TMR_STS
        } else {
            self.sts
        };
        b[PM1_STS..PM1_STS + 2].copy_from_slice(&sts.to_le_bytes());
        b[PM_TMR..PM_TMR + 4].copy_from_slice(&timer.to_le_bytes());
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
        // SLP_TYP 0 is soft-off in the PIIX4's own encoding, which SeaBIOS's APM power-off
        // (GRUB's `halt`) writes; ferrovm's \_S5 says 5. Both power off.
        if slp_typ == u16::from(S5_SLEEP_TYPE) || slp_typ == PIIX4_SOFT_OFF {
            log::info!("acpi: guest entered S5, powering off");
            self.vm.request_stop(StopRequest::PowerOff);
        } else if slp_typ == u16::from(S3_SLEEP_TYPE) {
            log::info!("acpi: guest entered S3 (suspend to RAM)");
            self.vm.request_suspend();
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
        // PM1_STS is write-1-to-clear. PM_TMR is read-only.
        self.sts &= !(value[0] & mask[0]);
        if value[0] & mask[0] & TMR_STS != 0 {
            self.tmr_msb_at_clear = self.timer() >> 23;
        }
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
        assert_eq!(read(&mut pm, 6, 2), [0, 0]);
        assert_eq!(read(&mut pm, 12, 2), [0xff, 0xff]);
        assert_eq!(read(&mut pm, 100, 1), [0xff]);
        pm.write(7, &[0xff; 4]);
        pm.write(u64::MAX, &[0xff; 2]);
        assert!(!vm.is_stopping());
    }

    #[test]
    fn sleep_states() {
        let vm = VmControl::new().unwrap();
        let mut pm = AcpiPm::new(vm.clone());
        // Types other than S3 and S5 are ignored, and SLP_TYP without SLP_EN does nothing.
        pm.write(4, &(SLP_EN | 3 << SLP_TYP_SHIFT).to_le_bytes());
        pm.write(4, &(5u16 << SLP_TYP_SHIFT).to_le_bytes());
        pm.write(4, &(1u16 << SLP_TYP_SHIFT).to_le_bytes());
        assert!(!vm.is_stopping() && !vm.is_suspended());
        // S3 (what kvm-unit-tests' s3 writes: 0x2400) asks for a suspend, not a stop.
        pm.write(2, &RTC_EN.to_le_bytes());
        assert!(pm.rtc_wake_enabled());
        pm.write(4, &0x2400u16.to_le_bytes());
        assert!(vm.is_suspended() && !vm.is_stopping());
        pm.woken_by_rtc();
        assert_eq!(read(&mut pm, 1, 1)[0] & 0x84, 0x84, "WAK_STS | RTC_STS");
        pm.write(4, &(5u16 << SLP_TYP_SHIFT).to_le_bytes());
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

        // SeaBIOS's APM power-off writes SLP_EN with the PIIX4's soft-off type 0.
        let vm = VmControl::new().unwrap();
        let mut pm = AcpiPm::new(vm.clone());
        pm.write(4, &0x2000u16.to_le_bytes());
        assert_eq!(vm.request(), Some(StopRequest::PowerOff));
    }

    #[test]
    fn pm_timer_counts_at_3_58_mhz_in_24_bits() {
        let vm = VmControl::new().unwrap();
        let mut pm = AcpiPm::new(vm);
        let tmr = |pm: &mut AcpiPm| u32::from_le_bytes(read(pm, 8, 4).try_into().unwrap());
        // Ticks that `elapsed` allows (+1 for rounding).
        let most = |elapsed: std::time::Duration| {
            elapsed.as_nanos() * u128::from(PM_TIMER_HZ) / 1_000_000_000 + 1
        };
        let start = std::time::Instant::now();
        let t0 = tmr(&mut pm);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let before_t1 = std::time::Instant::now();
        let t1 = tmr(&mut pm);
        let elapsed = start.elapsed();
        // At least 20 ms of ticks (71591), at most what the clock measured around both reads;
        // the upper check is left out if the 24-bit counter could have wrapped (4.7 s).
        let d = t1.wrapping_sub(t0) & PM_TIMER_MASK;
        assert!(d >= 71_591, "{t0} -> {t1}");
        assert!(
            elapsed.as_secs() >= 4 || u128::from(d) <= most(elapsed),
            "{t0} -> {t1}"
        );
        assert_eq!(t1 & !PM_TIMER_MASK, 0);
        // Read-only: a write of 0 does not restart it (that would look like a wrap).
        pm.write(8, &[0; 4]);
        let d = tmr(&mut pm).wrapping_sub(t1) & PM_TIMER_MASK;
        let since = before_t1.elapsed();
        assert!(
            since.as_secs() >= 4 || u128::from(d) <= most(since),
            "read-only"
        );
        // TMR_STS: set once bit 23 changed since it was cleared (move the epoch back 2.4 s).
        pm.write(0, &[TMR_STS as u8, 0]);
        assert_eq!(read(&mut pm, 0, 1)[0] & 1, 0);
        pm.epoch -= std::time::Duration::from_millis(2400);
        assert_eq!(read(&mut pm, 0, 1)[0] & 1, 1);
        pm.write(0, &[TMR_STS as u8, 0]);
        assert_eq!(read(&mut pm, 0, 1)[0] & 1, 0);
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
