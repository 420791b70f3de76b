//! QEMU's `pci-testdev` (PCI 1b36:0005), the device kvm-unit-tests' `vmexit` pci-mem/pci-io
//! rows and its `pci_testdev()` library check probe; attached only with `--test-devices`, never
//! in an ordinary VM. Written from QEMU's description of its behaviour (hw/misc/pci-testdev.c).
//!
//! BAR 0 is 4 KiB of MMIO, BAR 1 256 ports; both have the same register layout. Writing `n` to
//! the byte at offset 0 of a BAR selects test `n` (0, 1, 2) of that BAR's kind (MMIO or port
//! I/O); any other value deselects. The selected test's header then reads at offset 0 (zeros
//! when none is selected):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | test number (0..=5: MMIO tests first, then the port tests) |
//! | 1 | 1 | width the guest should write (always 1) |
//! | 4 | 4 | offset in the BAR the guest should write to |
//! | 8 | 1 | the value to write (`0xFA`, or `0xCE` for the wildcard test) |
//! | 12 | 4 | count of the writes ferrovm saw (those an ioeventfd took are not counted) |
//! | 16 | .. | name, NUL-terminated: "mmio-no-eventfd", "portio-datamatch-eventfd", ... |
//!
//! - `no-eventfd`: the write exits to ferrovm, which counts a one-byte write of the value;
//! - `wildcard-eventfd`: an ioeventfd takes any write at the offset (the count stays 0);
//! - `datamatch-eventfd`: an ioeventfd takes one-byte writes of the value, other writes exit.
//!
//! The ioeventfd is registered while the test is selected and its BAR decodes, at the BAR's
//! current address (it follows the guest moving the BAR), through the [`IoEventRegistry`]:
//! the device never sees KVM. A test offset is the half-size of its BAR plus the test number,
//! so every test writes somewhere else.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pci::config::{BarKind, BarSpec, PciConfig, PciHeader};
use super::pci::{IoEvent, IoEventRegistry, PciDevice, PciError};
use crate::ratelimit::RateLimit;

pub const VENDOR_ID: u16 = 0x1b36; // Red Hat
pub const DEVICE_ID: u16 = 0x0005;
/// BAR 0: MMIO.
pub const MEM_BAR: usize = 0;
pub const MEM_BAR_SIZE: u64 = 4096;
/// BAR 1: port I/O.
pub const IO_BAR: usize = 1;
pub const IO_BAR_SIZE: u64 = 256;

const TESTS_PER_KIND: u8 = 3;
const NAMES: [&str; TESTS_PER_KIND as usize] =
    ["no-eventfd", "wildcard-eventfd", "datamatch-eventfd"];
const DATA_MATCH: u8 = 0xfa;
const DATA_ANY: u8 = 0xce;
/// Header field offsets.
const OFF_TEST: u64 = 0;
const OFF_COUNT: usize = 12;
const OFF_NAME: usize = 16;

static LOG: RateLimit = RateLimit::new(10);

/// One test: what the guest reads in its header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Test {
    /// 0..=5: `kind * 3 + n`.
    index: u8,
    io: bool,
    /// Where in the BAR the guest writes.
    offset: u64,
    data: u8,
    /// Only one-byte writes of `data` count (all but the wildcard test).
    match_data: bool,
    eventfd: bool,
    count: u32,
}

impl Test {
    fn new(io: bool, n: u8) -> Self {
        let index = u8::from(io) * TESTS_PER_KIND + n;
        let half = if io { IO_BAR_SIZE } else { MEM_BAR_SIZE } / 2;
        let wildcard = n == 1;
        Self {
            index,
            io,
            offset: half + u64::from(index),
            data: if wildcard { DATA_ANY } else { DATA_MATCH },
            match_data: !wildcard,
            eventfd: n != 0,
            count: 0,
        }
    }

    fn name(&self) -> String {
        let kind = if self.io { "portio" } else { "mmio" };
        format!("{kind}-{}", NAMES[usize::from(self.index % TESTS_PER_KIND)])
    }

    /// The header as the guest reads it.
    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; OFF_NAME];
        h[0] = self.index;
        h[1] = 1; // width
        h[4..8].copy_from_slice(&(self.offset as u32).to_le_bytes());
        h[8] = self.data;
        h[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&self.count.to_le_bytes());
        h.extend_from_slice(self.name().as_bytes());
        h.push(0);
        h
    }

    /// The ioeventfd for this test with its BAR at `base`.
    fn ioevent(&self, base: u64) -> IoEvent {
        IoEvent {
            pio: self.io,
            addr: base + self.offset,
            datamatch: self.match_data.then_some(self.data),
        }
    }
}

/// The device: its configuration space, the selected test and its ioeventfd.
pub struct PciTestDev {
    config: PciConfig,
    current: Option<Test>,
    ioevents: Arc<dyn IoEventRegistry>,
    /// Signalled by KVM for the eventfd tests; drained whenever the guest reads the header.
    notifier: EventFd,
    /// Where the ioeventfd is registered now.
    registered: Option<IoEvent>,
}

impl PciTestDev {
    pub fn new(ioevents: Arc<dyn IoEventRegistry>) -> Result<Self, PciError> {
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            class: 0xff_00_00, // "other" device
            ..Default::default()
        });
        let bar = |size, kind| BarSpec {
            size,
            kind,
            prefetchable: false,
        };
        config.add_bar(MEM_BAR, bar(MEM_BAR_SIZE, BarKind::Mem32))?;
        config.add_bar(IO_BAR, bar(IO_BAR_SIZE, BarKind::Io))?;
        let notifier = EventFd::new(EFD_NONBLOCK).map_err(PciError::Interrupt)?;
        Ok(Self {
            config,
            current: None,
            ioevents,
            notifier,
            registered: None,
        })
    }

    /// The BAR base of kind `io` while it decodes.
    fn decoded_base(&self, io: bool) -> Option<u64> {
        self.config
            .decoded()
            .into_iter()
            .find(|(_, kind, _, _)| (*kind == BarKind::Io) == io)
            .map(|(_, _, addr, _)| addr)
    }

    /// Registers the selected test's ioeventfd where its BAR decodes now (dropping the old one).
    fn sync_ioevent(&mut self) {
        let want = self
            .current
            .as_ref()
            .filter(|t| t.eventfd)
            .and_then(|t| Some(t.ioevent(self.decoded_base(t.io)?)));
        if want == self.registered {
            return;
        }
        if let Some(old) = self.registered.take() {
            if let Err(e) = self.ioevents.unregister_event(old, &self.notifier) {
                LOG.warn(|| format!("pci-testdev: cannot drop the ioeventfd {old:x?}: {e}"));
            }
        }
        if let Some(new) = want {
            match self.ioevents.register_event(new, &self.notifier) {
                Ok(()) => self.registered = Some(new),
                Err(e) => {
                    LOG.warn(|| format!("pci-testdev: no ioeventfd at {new:x?}: {e}"));
                }
            }
        }
    }

    fn drain(&self) {
        let _ = self.notifier.read(); // EAGAIN when nothing was signalled
    }

    /// A write to the test register of the BAR of kind `io`.
    fn select(&mut self, io: bool, value: u8) {
        self.current = (value < TESTS_PER_KIND).then(|| Test::new(io, value));
        self.drain();
        self.sync_ioevent();
    }
}

impl PciDevice for PciTestDev {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        self.config.read(reg.into(), data);
    }

    fn config_write(&mut self, reg: u16, data: &[u8]) {
        self.config.write(reg.into(), data);
        self.sync_ioevent(); // the BAR may have moved, or decoding changed
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        self.drain();
        let header = self.current.as_ref().map(Test::header).unwrap_or_default();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            *b = at.and_then(|o| header.get(o)).copied().unwrap_or(0);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let io = bar == IO_BAR;
        if offset == OFF_TEST {
            if let Some(&v) = data.first() {
                self.select(io, v);
            }
            return;
        }
        let Some(t) = self.current.as_mut().filter(|t| t.io == io) else {
            return;
        };
        if offset != t.offset {
            return;
        }
        if t.match_data && (data.len() != 1 || data[0] != t.data) {
            return;
        }
        t.count = t.count.wrapping_add(1);
    }

    /// Firmware-style assignment: decoding on, as firmware leaves a device it has set up (a
    /// test kernel never sets the command bits itself).
    fn assign_bar(&mut self, bar: usize, addr: u64) {
        self.config.set_bar_addr(bar, addr);
        self.config.enable_decoding(true, true);
        self.sync_ioevent();
    }
}

#[cfg(test)]
mod tests;
