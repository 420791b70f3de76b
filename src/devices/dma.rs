//! What sits between a device and guest memory or the local APICs when the platform has an
//! IOMMU: a device's DMA goes through a [`DmaSpace`] and its MSI messages through an
//! [`InterruptRemap`]. Without an IOMMU they are the identity ([`DirectDma`], [`NoRemap`]).
//!
//! Requester IDs (`sid`) are PCI bus/device/function numbers: `bus << 8 | dev << 3 | fn`.

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// An MSI message as a device writes it: the address (0xFEEx_xxxx) and the 32-bit data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// Delivers an MSI message to the local APICs at once (KVM_SIGNAL_MSI). The message is not
/// remapped: callers that must remap do it first.
pub trait MsiSender: Send + Sync {
    fn send(&self, msg: MsiMessage) -> io::Result<()>;
}

/// Why a DMA request failed: the IOMMU blocked it (the fault is recorded in the IOMMU's
/// registers where the guest asked for that), or the address is not guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    #[error(
        "DMA by {sid:04x} to bus address {addr:#x} blocked by the IOMMU (fault reason {reason:#x})"
    )]
    Blocked { sid: u16, addr: u64, reason: u8 },
    #[error("DMA by {sid:04x} to {addr:#x}: not guest RAM")]
    NotRam { sid: u16, addr: u64 },
}

/// The address space a PCI device's DMA sees. Transfers may span pages; each page is
/// translated on its own. A failed transfer may have moved a prefix of the buffer.
pub trait DmaSpace: Send + Sync {
    fn read(&self, sid: u16, addr: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(&self, sid: u16, addr: u64, buf: &[u8]) -> Result<(), DmaError>;
}

/// DMA straight to guest-physical addresses (no IOMMU).
pub struct DirectDma(pub GuestMemoryMmap);

impl DmaSpace for DirectDma {
    fn read(&self, sid: u16, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| DmaError::NotRam { sid, addr })
    }
    fn write(&self, sid: u16, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.0
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| DmaError::NotRam { sid, addr })
    }
}

/// Interrupt remapping: turns the MSI message a requester writes into the one the local APICs
/// receive, or blocks it.
pub trait InterruptRemap: Send + Sync {
    /// The message `msg` from requester `sid` becomes (`None`: blocked; the IOMMU recorded
    /// the fault where the guest asked for that). `sid` is `None` for requests without a
    /// requester ID to check (the IOAPIC's, as under QEMU).
    fn remap(&self, sid: Option<u16>, msg: MsiMessage) -> Option<MsiMessage>;
    /// What [`InterruptRemap::remap`] returns, without recording a fault or raising the fault
    /// event: for routes recomputed after a table change and for matching EOIs, which are no
    /// interrupt request of the guest's.
    fn lookup(&self, sid: Option<u16>, msg: MsiMessage) -> Option<MsiMessage>;
    /// Runs `hook` after every guest action that may change what [`InterruptRemap::remap`]
    /// returns (remapping enabled or disabled, a new table, an interrupt-entry-cache
    /// invalidation). The hook is called with no IOMMU lock held: it may call `remap`.
    fn set_change_hook(&self, hook: Box<dyn Fn() + Send + Sync>);
}

/// No interrupt remapping: every message passes unchanged.
pub struct NoRemap;

impl InterruptRemap for NoRemap {
    fn remap(&self, _sid: Option<u16>, msg: MsiMessage) -> Option<MsiMessage> {
        Some(msg)
    }
    fn lookup(&self, _sid: Option<u16>, msg: MsiMessage) -> Option<MsiMessage> {
        Some(msg)
    }
    fn set_change_hook(&self, _hook: Box<dyn Fn() + Send + Sync>) {}
}
