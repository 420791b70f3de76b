//! PCI: bus 0 with a host bridge at 00:00.0, configuration space through ports 0xCF8/0xCFC and
//! ECAM, memory BARs in the 32-bit window, I/O BARs in a port window, MSI-X.
//!
//! Devices implement [`PciDevice`]; [`root::PciRoot`] owns the 32 slots of bus 0, allocates BAR
//! addresses and dispatches configuration and BAR accesses. Interrupts: MSI-X vectors are KVM GSIs
//! whose routes the device updates through an [`MsiRouter`]; INTx is an irqfd with a resample
//! eventfd ([`IntxLine`]) that the boot recipe registers. Devices never see the VM fd.

use std::io;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod config;
pub mod i440fx;
pub mod msi;
pub mod msix;
pub mod root;

pub use config::{BarKind, BarSpec, PciConfig, PciHeader};
pub use root::{PciConfigIo, PciEcam, PciIoWindow, PciMmioWindow, PciRoot};

/// Errors from building the PCI topology.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("BAR {0}: invalid index or size, or the slot is taken")]
    BadBar(usize),
    #[error("no room left in configuration space for a capability of {0} bytes")]
    CapabilitySpace(usize),
    #[error("bus 0 has no free slot")]
    NoSlot,
    #[error("slot {0} is taken or out of range")]
    SlotTaken(u8),
    #[error("the PCI MMIO window has no room for a BAR of {0:#x} bytes")]
    MmioExhausted(u64),
    #[error("the PCI port window has no room for an I/O BAR of {0:#x} ports")]
    PioExhausted(u64),
    #[error("cannot set up interrupt vectors")]
    Interrupt(#[source] io::Error),
}

/// One BAR as it decodes now: guest-physical `[addr, addr + len)`, in port space if `io`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedBar {
    pub bar: usize,
    pub addr: u64,
    pub len: u64,
    pub io: bool,
}

/// What bus 0 holds for a slot: called from any vCPU thread with `&self`; the function locks
/// what it needs itself. `Mutex<D>` of any [`PciDevice`] is one.
pub trait PciFunction: Send + Sync {
    fn config_read(&self, reg: u16, data: &mut [u8]);
    fn config_write(&self, reg: u16, data: &[u8]);
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]);
    /// The BARs' sizes and kinds, for address assignment.
    fn bar_specs(&self) -> Vec<(usize, BarSpec)>;
    fn assign_bar(&self, bar: usize, addr: u64);
    /// The BARs that decode now (their decoding on, address assigned).
    fn decoded_bars(&self) -> Vec<DecodedBar>;
}

impl<D: PciDevice> PciFunction for std::sync::Mutex<D> {
    fn config_read(&self, reg: u16, data: &mut [u8]) {
        lock(self).config_read(reg, data)
    }
    fn config_write(&self, reg: u16, data: &[u8]) {
        lock(self).config_write(reg, data)
    }
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        lock(self).bar_read(bar, offset, data)
    }
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        lock(self).bar_write(bar, offset, data)
    }
    fn bar_specs(&self) -> Vec<(usize, BarSpec)> {
        lock(self).config().bar_specs()
    }
    fn assign_bar(&self, bar: usize, addr: u64) {
        lock(self).assign_bar(bar, addr)
    }
    fn decoded_bars(&self) -> Vec<DecodedBar> {
        decoded_bars(lock(self).config())
    }
}

/// The BARs of `config` that decode now.
pub fn decoded_bars(config: &PciConfig) -> Vec<DecodedBar> {
    config
        .decoded()
        .into_iter()
        .map(|(bar, kind, addr, len)| DecodedBar {
            bar,
            addr,
            len,
            io: kind == BarKind::Io,
        })
        .collect()
}

fn lock<D: ?Sized>(m: &std::sync::Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A function on bus 0 with plain state (`&mut self`; wrap it in a `Mutex` for the bus).
/// Offsets are relative to the function's 4 KiB configuration space or to the BAR. Accesses
/// come straight from the guest: any size, any offset, must never panic.
pub trait PciDevice: Send {
    /// The configuration header (BAR addresses, command register).
    fn config(&self) -> &PciConfig;
    /// Reads configuration space at `reg` (0..4096).
    fn config_read(&mut self, reg: u16, data: &mut [u8]);
    /// Writes configuration space at `reg` (0..4096).
    fn config_write(&mut self, reg: u16, data: &[u8]);
    /// Reads BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Sets the address of BAR `bar` (firmware-style assignment before the guest runs).
    fn assign_bar(&mut self, bar: usize, addr: u64);
}

/// A function that is nothing but its configuration space: no BARs decode, and writes go
/// where the write masks allow (host bridges, chipset functions).
pub struct ConfigOnly {
    config: PciConfig,
}

impl ConfigOnly {
    pub fn new(config: PciConfig) -> Self {
        Self { config }
    }
}

impl PciDevice for ConfigOnly {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        self.config.read(reg.into(), data);
    }
    fn config_write(&mut self, reg: u16, data: &[u8]) {
        self.config.write(reg.into(), data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn assign_bar(&mut self, _bar: usize, _addr: u64) {}
}

/// One MSI vector: a GSI whose route the [`MsiRouter`] manages, and the irqfd that raises it.
pub struct MsiVector {
    pub gsi: u32,
    pub irqfd: EventFd,
}

/// Routes MSI messages to GSIs (implemented in `kvm/` over KVM_SET_GSI_ROUTING and irqfds).
pub trait MsiRouter: Send + Sync {
    /// Allocates a GSI and an irqfd connected to it (no route until [`MsiRouter::update`]).
    fn allocate(&self) -> io::Result<MsiVector>;
    /// Routes `gsi` to the MSI message (`addr`, `data`); a masked vector has no route.
    fn update(&self, gsi: u32, addr: u64, data: u32, masked: bool) -> io::Result<()>;
}

/// Where an ioeventfd listens and which writes signal it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoEvent {
    /// Port I/O (else MMIO).
    pub pio: bool,
    pub addr: u64,
    /// `Some(v)`: only a one-byte write of `v`; `None`: any write of any size.
    pub datamatch: Option<u8>,
}

impl IoEvent {
    /// Any write of any size to MMIO `addr`.
    pub fn mmio(addr: u64) -> Self {
        Self {
            pio: false,
            addr,
            datamatch: None,
        }
    }
}

/// Registers guest addresses whose writes signal an eventfd inside KVM (kicks that never exit
/// to userspace). Implemented in `kvm/`.
pub trait IoEventRegistry: Send + Sync {
    fn register_event(&self, ev: IoEvent, fd: &EventFd) -> io::Result<()>;
    fn unregister_event(&self, ev: IoEvent, fd: &EventFd) -> io::Result<()>;

    /// Any write of any size to MMIO `addr` signals `fd`.
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        self.register_event(IoEvent::mmio(addr), fd)
    }
    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        self.unregister_event(IoEvent::mmio(addr), fd)
    }
}

/// A level-triggered INTx line: `irqfd` asserts it; KVM deasserts it at EOI and signals
/// `resample`, where the device re-asserts it if its interrupt condition still holds. The boot
/// recipe registers the pair (KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE) on the slot's GSI.
pub struct IntxLine {
    pub irqfd: EventFd,
    /// Watched by the device's worker while it runs.
    pub resample: EventFd,
}

impl IntxLine {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            irqfd: EventFd::new(EFD_NONBLOCK)?,
            resample: EventFd::new(EFD_NONBLOCK)?,
        })
    }
}
