use super::*;
use crate::devices::pci::config::{COMMAND_MEMORY, REG_BAR0, REG_COMMAND};
use std::io;
use std::sync::Mutex;

/// Records (registered?, event) in order.
#[derive(Default)]
struct Registry(Mutex<Vec<(bool, IoEvent)>>);

impl IoEventRegistry for Registry {
    fn register_event(&self, ev: IoEvent, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().push((true, ev));
        Ok(())
    }
    fn unregister_event(&self, ev: IoEvent, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().push((false, ev));
        Ok(())
    }
}

const MEM: u64 = 0xc000_0000;
const IO: u64 = 0xc000;

fn dev() -> (PciTestDev, Arc<Registry>) {
    let reg = Arc::new(Registry::default());
    let mut d = PciTestDev::new(reg.clone()).unwrap();
    d.assign_bar(MEM_BAR, MEM);
    d.assign_bar(IO_BAR, IO);
    (d, reg)
}

fn events(r: &Registry) -> Vec<(bool, IoEvent)> {
    std::mem::take(&mut *r.0.lock().unwrap())
}

fn read(d: &mut PciTestDev, bar: usize, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(bar, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

/// What kvm-unit-tests reads: the name, up to its NUL.
fn name(d: &mut PciTestDev, bar: usize) -> String {
    let mut s = String::new();
    for i in 16.. {
        match read(d, bar, i, 1) as u8 {
            0 => break,
            c => s.push(c as char),
        }
    }
    s
}

#[test]
fn identity_and_bars() {
    let (mut d, _) = dev();
    let mut b = [0u8; 4];
    d.config_read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x0005_1b36);
    d.config_read(REG_BAR0 as u16, &mut b);
    assert_eq!(u32::from_le_bytes(b), MEM as u32);
    d.config_read(REG_BAR0 as u16 + 4, &mut b);
    assert_eq!(u32::from_le_bytes(b), IO as u32 | 1, "an I/O BAR");
    // Sizing the I/O BAR: 256 ports.
    d.config_write(REG_BAR0 as u16 + 4, &[0xff; 4]);
    d.config_read(REG_BAR0 as u16 + 4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xffff_ff01);
    d.config_read(REG_COMMAND as u16, &mut b[..2]);
    assert_eq!(
        u16::from_le_bytes([b[0], b[1]]) & 3,
        3,
        "decoding on after assignment"
    );
}

#[test]
fn headers_of_every_test_then_the_end() {
    let (mut d, _) = dev();
    assert_eq!(read(&mut d, MEM_BAR, 1, 1), 0, "nothing selected: zeros");
    let mut seen = vec![];
    for (bar, io) in [(MEM_BAR, false), (IO_BAR, true)] {
        for n in 0.. {
            d.bar_write(bar, 0, &[n]);
            let width = read(&mut d, bar, 1, 1);
            if width == 0 {
                break;
            }
            assert_eq!(width, 1);
            let index = read(&mut d, bar, 0, 1);
            let offset = read(&mut d, bar, 4, 4);
            let data = read(&mut d, bar, 8, 4);
            let half = if io { 128 } else { 2048 };
            assert_eq!(offset, half + index, "test {index}");
            seen.push((index, name(&mut d, bar), data));
        }
    }
    let want: Vec<(u64, String, u64)> = [
        (0, "mmio-no-eventfd", 0xfa),
        (1, "mmio-wildcard-eventfd", 0xce),
        (2, "mmio-datamatch-eventfd", 0xfa),
        (3, "portio-no-eventfd", 0xfa),
        (4, "portio-wildcard-eventfd", 0xce),
        (5, "portio-datamatch-eventfd", 0xfa),
    ]
    .into_iter()
    .map(|(i, n, v)| (i, n.to_string(), v))
    .collect();
    assert_eq!(seen, want);
    // Past the NUL and far away: zeros, never a panic.
    assert_eq!(read(&mut d, IO_BAR, 200, 4), 0);
    assert_eq!(read(&mut d, IO_BAR, u64::MAX, 8), 0);
}

#[test]
fn counts_only_matching_writes_at_the_test_offset() {
    let (mut d, _) = dev();
    d.bar_write(MEM_BAR, 0, &[0]); // mmio-no-eventfd: offset 2048, value 0xfa
    for _ in 0..16 {
        d.bar_write(MEM_BAR, 2048, &[0xfa]);
    }
    d.bar_write(MEM_BAR, 2048, &[0xfb]); // wrong value
    d.bar_write(MEM_BAR, 2048, &[0xfa, 0]); // wrong width
    d.bar_write(MEM_BAR, 2049, &[0xfa]); // wrong offset
    d.bar_write(IO_BAR, 2048, &[0xfa]); // other BAR
    assert_eq!(read(&mut d, MEM_BAR, 12, 4), 16);
    d.bar_write(IO_BAR, 0, &[1]); // portio-wildcard: any value, any width
    assert_eq!(read(&mut d, IO_BAR, 12, 4), 0, "a new test starts at 0");
    d.bar_write(IO_BAR, 132, &[1, 2]);
    d.bar_write(IO_BAR, 132, &[0xce]);
    assert_eq!(read(&mut d, IO_BAR, 12, 4), 2);
    d.bar_write(IO_BAR, 0, &[]); // empty write: ignored
    d.bar_write(IO_BAR, 0, &[9]); // deselects
    d.bar_write(IO_BAR, 132, &[0xce]);
    assert_eq!(read(&mut d, IO_BAR, 12, 4), 0);
}

#[test]
fn ioeventfds_follow_the_selected_test_and_its_bar() {
    let (mut d, reg) = dev();
    assert!(events(&reg).is_empty(), "nothing selected: no ioeventfd");
    d.bar_write(MEM_BAR, 0, &[0]);
    assert!(events(&reg).is_empty(), "no-eventfd test");
    d.bar_write(MEM_BAR, 0, &[2]);
    let mmio = IoEvent {
        pio: false,
        addr: MEM + 2050,
        datamatch: Some(0xfa),
    };
    assert_eq!(events(&reg), [(true, mmio)]);
    d.bar_write(IO_BAR, 0, &[1]);
    let pio = IoEvent {
        pio: true,
        addr: IO + 132,
        datamatch: None,
    };
    assert_eq!(events(&reg), [(false, mmio), (true, pio)]);
    // The guest moves the I/O BAR, then turns memory and I/O decoding off.
    d.config_write(REG_BAR0 as u16 + 4, &0xd000u32.to_le_bytes());
    let moved = IoEvent {
        addr: 0xd000 + 132,
        ..pio
    };
    assert_eq!(events(&reg), [(false, pio), (true, moved)]);
    d.config_write(REG_COMMAND as u16, &COMMAND_MEMORY.to_le_bytes());
    assert_eq!(events(&reg), [(false, moved)]);
    d.config_write(REG_COMMAND as u16, &[3, 0]);
    assert_eq!(events(&reg), [(true, moved)]);
    d.bar_write(IO_BAR, 0, &[3]);
    assert_eq!(events(&reg), [(false, moved)]);
}
