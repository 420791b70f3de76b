//! MC146818 RTC and CMOS RAM at ports 0x70 (index) and 0x71 (data).
//!
//! Insert at port 0x70 with length 2. The clock registers always show the host's current
//! UTC time, read when the guest reads them. Guest writes to the clock registers are
//! ignored (the guest cannot set the clock). Register A's UIP bit is set as on the chip:
//! from 244 us before each second's update until the 1984 us update cycle ends. The alarm
//! (registers 1, 3, 5; 0xC0-0xFF is "don't care") is checked at every second boundary:
//! register C shows AF (and IRQF with AIE) once it matched since C was last read, and
//! [`Cmos::alarm_fired_since`] lets the VMM wake a suspended (S3) VM. There is no interrupt
//! line: alarm, periodic and update interrupts are not delivered.

use crate::bus::BusDeviceMut;

/// Clock registers.
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const CENTURY: u8 = 0x32;
/// Status registers.
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

/// Register A: 32.768 kHz time base, 1024 Hz rate; bit 7 is UIP (update in progress).
const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UIP: u8 = 0x80;
/// UIP is set this long before each update and stays set through it (the update cycle).
const UIP_BEFORE_NS: u32 = 244_000;
const UIP_UPDATE_NS: u32 = 1_984_000;
/// Alarm registers.
const SECONDS_ALARM: u8 = 0x01;
const MINUTES_ALARM: u8 = 0x03;
const HOURS_ALARM: u8 = 0x05;
/// Register B: set (updates stop), alarm interrupt enable.
const REG_B_SET: u8 = 0x80;
const REG_B_AIE: u8 = 0x20;
/// Register C: interrupt request flag, alarm flag.
const REG_C_IRQF: u8 = 0x80;
const REG_C_AF: u8 = 0x20;
/// Register B: 24-hour mode, BCD.
const REG_B_DEFAULT: u8 = 0x02;
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
/// Register D: valid RAM and time.
const REG_D_VALID: u8 = 0x80;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The 0x34/0x35 field counts RAM between 16 MiB and this limit.
const LOW_MEM_LIMIT: u64 = 0xe000_0000;

/// The RTC/CMOS device.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// The Unix second register C was last read at (alarm matches after it count).
    c_read_at: u64,
}

impl Cmos {
    /// A CMOS whose memory-size bytes describe `mem_below_4g` bytes of RAM starting at 0 and
    /// `mem_above_4g` bytes starting at 4 GiB.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = REG_A_DEFAULT;
        ram[usize::from(REG_B)] = REG_B_DEFAULT;
        ram[usize::from(REG_D)] = REG_D_VALID;
        // 0x15/0x16: base memory in KiB (640).
        put_u16(&mut ram, 0x15, 640);
        // 0x17/0x18 and 0x30/0x31: KiB above 1 MiB, saturating at 63 MiB.
        let ext_kib = (mem_below_4g.saturating_sub(MIB) / KIB).min(0xfc00);
        put_u16(&mut ram, 0x17, ext_kib as u16);
        put_u16(&mut ram, 0x30, ext_kib as u16);
        // 0x34/0x35: 64 KiB units above 16 MiB, up to 3.5 GiB.
        let mid = mem_below_4g.min(LOW_MEM_LIMIT).saturating_sub(16 * MIB) >> 16;
        put_u16(&mut ram, 0x34, mid as u16);
        // 0x5b..0x5d: 64 KiB units above 4 GiB (24 bits).
        let high = (mem_above_4g >> 16).min(0xff_ffff);
        ram[0x5b] = high as u8;
        ram[0x5c] = (high >> 8) as u8;
        ram[0x5d] = (high >> 16) as u8;
        Self {
            index: 0,
            ram,
            c_read_at: unix_now().0,
        }
    }

    /// True when the alarm matched at a second boundary after Unix second `since` (up to
    /// now) with the alarm interrupt enabled: the wake event of a suspended VM.
    pub fn alarm_fired_since(&self, since: u64) -> bool {
        self.ram[usize::from(REG_B)] & REG_B_AIE != 0 && self.alarm_between(since, unix_now().0)
    }

    /// Whether the alarm registers match the time at some second in (from, to].
    fn alarm_between(&self, from: u64, to: u64) -> bool {
        if self.ram[usize::from(REG_B)] & REG_B_SET != 0 {
            return false; // the clock does not update, so it cannot reach the alarm
        }
        // A day covers every alarm value; more than that need not be looked at.
        let from = from.max(to.saturating_sub(86_400));
        if from >= to {
            return false;
        }
        // The values of each field its alarm register accepts.
        let secs: [bool; 60] =
            std::array::from_fn(|v| self.alarm_accepts(SECONDS_ALARM, self.encode(v as u8)));
        let mins: [bool; 60] =
            std::array::from_fn(|v| self.alarm_accepts(MINUTES_ALARM, self.encode(v as u8)));
        let hours: [bool; 24] =
            std::array::from_fn(|v| self.alarm_accepts(HOURS_ALARM, self.hours(v as u8)));
        // Minute by minute (at most 1,441), then the seconds of a matching minute in range.
        (from / 60..=to / 60).any(|m| {
            let (_, min, hour) = utc_hms(m * 60);
            let first = (from + 1).max(m * 60);
            let last = to.min((m * 60).saturating_add(59));
            hours[usize::from(hour)]
                && mins[usize::from(min)]
                && (first..=last).any(|s| secs[(s % 60) as usize])
        })
    }

    /// Whether alarm register `reg` accepts the encoded clock field `now` (top two bits set:
    /// any value).
    fn alarm_accepts(&self, reg: u8, now: u8) -> bool {
        let a = self.ram[usize::from(reg)];
        a & 0xc0 == 0xc0 || a == now
    }

    /// Register C, cleared by the read.
    fn read_c(&mut self) -> u8 {
        let now = unix_now().0;
        let fired = self.alarm_between(self.c_read_at, now);
        self.c_read_at = now;
        match (fired, self.ram[usize::from(REG_B)] & REG_B_AIE != 0) {
            (true, true) => REG_C_AF | REG_C_IRQF,
            (true, false) => REG_C_AF,
            _ => 0,
        }
    }

    /// Encodes a clock field according to register B (BCD unless DM is set).
    fn encode(&self, value: u8) -> u8 {
        if self.ram[usize::from(REG_B)] & REG_B_BINARY != 0 {
            value
        } else {
            (value / 10) << 4 | (value % 10)
        }
    }

    fn hours(&self, hour: u8) -> u8 {
        if self.ram[usize::from(REG_B)] & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn read_register(&self, reg: u8) -> u8 {
        let clock = || host_utc_now();
        match reg {
            SECONDS => self.encode(clock().sec),
            MINUTES => self.encode(clock().min),
            HOURS => self.hours(clock().hour),
            WEEKDAY => self.encode(clock().weekday),
            DAY_OF_MONTH => self.encode(clock().day),
            MONTH => self.encode(clock().month),
            YEAR => self.encode((clock().year % 100) as u8),
            CENTURY => self.encode((clock().year / 100 % 100) as u8),
            REG_A => {
                let uip = update_in_progress(unix_now().1);
                let set = self.ram[usize::from(REG_B)] & REG_B_SET != 0;
                self.ram[usize::from(REG_A)] | if uip && !set { REG_A_UIP } else { 0 }
            }
            _ => self.ram[usize::from(reg & 0x7f)],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                log::debug!("cmos: ignoring write {value:#04x} to clock register {reg:#04x}")
            }
            REG_A => self.ram[usize::from(REG_A)] = value & 0x7f,
            REG_C | REG_D => {}
            _ => self.ram[usize::from(reg & 0x7f)] = value,
        }
    }
}

fn put_u16(ram: &mut [u8; 128], at: usize, value: u16) {
    ram[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy)]
struct ClockTime {
    sec: u8,
    min: u8,
    hour: u8,
    /// 1 = Sunday.
    weekday: u8,
    day: u8,
    /// 1..=12.
    month: u8,
    year: u32,
}

/// Whether UIP reads 1 at `ns` nanoseconds into the second: from 244 us before the update
/// (at the second boundary) until the 1984 us update cycle ends.
fn update_in_progress(ns: u32) -> bool {
    !(UIP_UPDATE_NS..1_000_000_000 - UIP_BEFORE_NS).contains(&ns)
}

/// The host's current Unix time: (seconds, nanoseconds into the second).
fn unix_now() -> (u64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// The host's current UTC time.
fn host_utc_now() -> ClockTime {
    utc_at(unix_now().0)
}

/// Second, minute and hour of the UTC day at Unix time `secs`: what `gmtime` gives (Unix time
/// has no leap seconds), by arithmetic, for the alarm check's walk over up to a day.
fn utc_hms(secs: u64) -> (u8, u8, u8) {
    let day = secs % 86_400;
    let field = |v: u64| u8::try_from(v).unwrap_or(0);
    (field(day % 60), field(day / 60 % 60), field(day / 3600))
}

/// UTC time at Unix second `secs`.
fn utc_at(secs: u64) -> ClockTime {
    let now = libc::time_t::try_from(secs).unwrap_or(0);
    // SAFETY: an all-zero `tm` is a valid value (integers and a null zone pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers refer to live, properly aligned locals; gmtime_r is reentrant.
    if unsafe { libc::gmtime_r(&now, &mut tm) }.is_null() {
        // Only fails for years that overflow `int`; show the epoch rather than garbage.
        tm = libc::tm {
            tm_mday: 1,
            tm_year: 70,
            ..tm
        };
    }
    let field = |v: libc::c_int| u8::try_from(v).unwrap_or(0);
    ClockTime {
        sec: field(tm.tm_sec.min(59)),
        min: field(tm.tm_min),
        hour: field(tm.tm_hour),
        weekday: field(tm.tm_wday + 1),
        day: field(tm.tm_mday),
        month: field(tm.tm_mon + 1),
        year: u32::try_from(tm.tm_year + 1900).unwrap_or(1970),
    }
}

impl BusDeviceMut for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match (offset, data) {
            (0, [b]) => *b = self.index,
            (1, [b]) if self.index == REG_C => *b = self.read_c(),
            (1, [b]) => *b = self.read_register(self.index),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            // Bit 7 masks NMIs on real hardware; it is not part of the index.
            (0, &[v]) => self.index = v & 0x7f,
            (1, &[v]) => self.write_register(self.index, v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// The alarm check against a second-by-second scan, for random alarm registers, modes
    /// and ranges up to two days.
    #[test]
    fn alarm_between_agrees_with_a_scan() {
        let mut r: u64 = 7;
        let mut next = || {
            r = r
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            r >> 33
        };
        let mut cmos = Cmos::new(0, 0);
        let mut fired = 0;
        for _ in 0..1_000 {
            cmos.ram[usize::from(REG_B)] = (next() as u8) & !REG_B_SET;
            for reg in [SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM] {
                cmos.ram[usize::from(reg)] = match next() % 4 {
                    0 => 0xc0 | next() as u8,
                    1 => cmos.encode((next() % 60) as u8),
                    2 => cmos.hours((next() % 24) as u8),
                    _ => next() as u8,
                };
            }
            let from = 1_700_000_000 + next() % 200_000;
            let to = from.saturating_sub(100) + next() % 172_800;
            let scan = (from.max(to.saturating_sub(86_400)) + 1..=to).any(|s| {
                let (sec, min, hour) = utc_hms(s);
                cmos.alarm_accepts(SECONDS_ALARM, cmos.encode(sec))
                    && cmos.alarm_accepts(MINUTES_ALARM, cmos.encode(min))
                    && cmos.alarm_accepts(HOURS_ALARM, cmos.hours(hour))
            });
            assert_eq!(
                cmos.alarm_between(from, to),
                scan,
                "from {from} to {to}, {:?}",
                &cmos.ram[..12]
            );
            fired += usize::from(scan);
        }
        assert!(
            (100..900).contains(&fired),
            "{fired} of 1000 ranges fired: too one-sided"
        );
    }

    #[test]
    fn utc_hms_agrees_with_gmtime() {
        let mut s: u64 = 1;
        for i in 0..20_000u64 {
            // Every tenth second of two days, then values spread up to the year 9999.
            let t = if i < 2 * 86_400 / 10 {
                i * 10 + 3
            } else {
                s % 253_402_300_799
            };
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let c = utc_at(t);
            assert_eq!(utc_hms(t), (c.sec, c.min, c.hour), "at {t}");
        }
    }

    fn reg(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index | 0x80]);
        let mut b = [0u8];
        cmos.read(1, &mut b);
        b[0]
    }

    fn bcd(v: u8) -> u64 {
        u64::from(v >> 4) * 10 + u64::from(v & 0xf)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (independent of libc).
    fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y / 400;
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146097 + doe - 719468
    }

    #[test]
    fn bcd_clock_matches_host() {
        let mut cmos = Cmos::new(512 * MIB, 0);
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let year = bcd(reg(&mut cmos, CENTURY)) * 100 + bcd(reg(&mut cmos, YEAR));
        let days = days_from_civil(
            year,
            bcd(reg(&mut cmos, MONTH)),
            bcd(reg(&mut cmos, DAY_OF_MONTH)),
        );
        let secs = days * 86400
            + bcd(reg(&mut cmos, HOURS)) * 3600
            + bcd(reg(&mut cmos, MINUTES)) * 60
            + bcd(reg(&mut cmos, SECONDS));
        assert!(secs.abs_diff(host) <= 2, "cmos {secs} host {host}");
        // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
        assert_eq!(bcd(reg(&mut cmos, WEEKDAY)), (days + 4) % 7 + 1);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut cmos = Cmos::new(0, 0);
        assert_eq!(reg(&mut cmos, REG_B), REG_B_DEFAULT);
        cmos.write(1, &[REG_B_BINARY]);
        let h = reg(&mut cmos, HOURS);
        let now = host_utc_now();
        assert!(h & 0x7f >= 1 && h & 0x7f <= 12);
        if now.min != 0 {
            assert_eq!(h & 0x80 != 0, now.hour >= 12);
        }
        assert!(reg(&mut cmos, MONTH) <= 12);
    }

    #[test]
    fn uip_is_set_around_each_second_boundary() {
        // The window, checked at its edges (deterministic: a polling test misses a 2.2 ms
        // window when the machine is loaded).
        for (ns, uip) in [
            (0, true),
            (1_983_999, true),
            (1_984_000, false),
            (500_000_000, false),
            (999_755_999, false),
            (999_756_000, true),
            (999_999_999, true),
        ] {
            assert_eq!(update_in_progress(ns), uip, "{ns} ns");
        }
        // SET stops updates: no UIP, whatever the time.
        let mut cmos = Cmos::new(64 * MIB, 0);
        cmos.write(0, &[REG_B]);
        cmos.write(1, &[REG_B_DEFAULT | REG_B_SET]);
        for _ in 0..1000 {
            assert_eq!(reg(&mut cmos, REG_A) & REG_A_UIP, 0);
        }
    }

    #[test]
    fn alarm_matches_at_second_boundaries() {
        let mut cmos = Cmos::new(64 * MIB, 0);
        let set = |cmos: &mut Cmos, r: u8, v: u8| {
            cmos.write(0, &[r]);
            cmos.write(1, &[v]);
        };
        for r in [SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM] {
            set(&mut cmos, r, 0xc0); // don't care: every second matches
        }
        let now = unix_now().0;
        assert!(!cmos.alarm_fired_since(now - 5), "AIE clear: no wake");
        set(&mut cmos, REG_B, REG_B_DEFAULT | REG_B_AIE);
        assert!(cmos.alarm_fired_since(now - 5));
        assert!(
            !cmos.alarm_fired_since(now + 10),
            "no boundary in an empty span"
        );
        // A specific time: 12:34:56 BCD, matched only at that second.
        set(&mut cmos, SECONDS_ALARM, 0x56);
        set(&mut cmos, MINUTES_ALARM, 0x34);
        set(&mut cmos, HOURS_ALARM, 0x12);
        let day = now - now % 86_400;
        let at = day + 12 * 3600 + 34 * 60 + 56;
        assert!(cmos.alarm_between(at - 1, at));
        assert!(!cmos.alarm_between(at, at + 3600));
        assert!(
            cmos.alarm_between(at - 86_400 * 3, at + 10),
            "long spans are capped, not skipped"
        );
        // Register C: AF | IRQF once, then clear.
        for r in [SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM] {
            set(&mut cmos, r, 0xff);
        }
        cmos.c_read_at = now - 2;
        assert_eq!(reg(&mut cmos, REG_C), REG_C_AF | REG_C_IRQF);
        set(&mut cmos, REG_B, REG_B_DEFAULT | REG_B_AIE | REG_B_SET); // stopped: no new match
        assert_eq!(reg(&mut cmos, REG_C), 0, "cleared by the read");
    }

    #[test]
    fn status_registers_and_ram() {
        let mut cmos = Cmos::new(3 * 1024 * MIB, 1024 * MIB);
        assert_eq!(reg(&mut cmos, REG_A) & !REG_A_UIP, 0x26);
        assert_eq!(reg(&mut cmos, REG_C), 0);
        assert_eq!(reg(&mut cmos, REG_D), 0x80);
        let mid = u16::from_le_bytes([reg(&mut cmos, 0x34), reg(&mut cmos, 0x35)]);
        assert_eq!(u64::from(mid), ((3 * 1024 - 16) * MIB) >> 16);
        assert_eq!(
            [
                reg(&mut cmos, 0x5b),
                reg(&mut cmos, 0x5c),
                reg(&mut cmos, 0x5d)
            ],
            [0x00, 0x40, 0x00]
        );
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0xab]);
        assert_eq!(reg(&mut cmos, 0x40), 0xab);
        cmos.write(1, &[1, 2]);
        let mut w = [0u8; 2];
        cmos.read(1, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        cmos.write(0, &[SECONDS]);
        cmos.write(1, &[0x99]);
        assert!(bcd(reg(&mut cmos, SECONDS)) < 60);
    }
}
