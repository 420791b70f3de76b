//! The VM's resource map: which device owns each interrupt line (GSI), port range and MMIO
//! range. The boot recipe claims everything here before it wires a device, so two devices can
//! never be given the same line or addresses: a clash is a startup error naming both.
//!
//! GSIs 0..24 are the in-kernel IOAPIC's pins; MSI vectors get GSIs from 24 up, handed out by
//! `kvm::vm::KvmInterrupts`. A PCI INTx line may be shared by several slots (that is how PCI
//! works, and the DSDT's _PRT says so); every other line is exclusive.

use std::collections::BTreeMap;

/// IOAPIC pins of the in-kernel irqchip: the GSIs claimed here.
pub const IOAPIC_PINS: u32 = 24;

/// Which address space a range is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Space {
    Pio,
    Mmio,
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Space::Pio => "port",
            Space::Mmio => "MMIO",
        })
    }
}

/// Whether an interrupt line may have more than one owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    Exclusive,
    /// A level-triggered PCI INTx line: shared with other PCI functions only.
    PciIntx,
}

/// A clash or an impossible request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("GSI {gsi} for {owner}: no such IOAPIC pin (0..{IOAPIC_PINS})")]
    NoSuchGsi { gsi: u32, owner: String },
    #[error("GSI {gsi} for {owner} is already taken by {holder}")]
    GsiTaken {
        gsi: u32,
        owner: String,
        holder: String,
    },
    #[error("{space} range {base:#x}+{len:#x} for {owner} is empty or wraps around")]
    BadRange {
        space: Space,
        base: u64,
        len: u64,
        owner: String,
    },
    #[error("{space} range {base:#x}+{len:#x} for {owner} overlaps {holder}")]
    RangeTaken {
        space: Space,
        base: u64,
        len: u64,
        owner: String,
        holder: String,
    },
}

#[derive(Debug)]
struct GsiClaim {
    sharing: Sharing,
    owners: Vec<String>,
}

/// Every claimed GSI and range of one VM.
#[derive(Debug, Default)]
pub struct Resources {
    gsis: BTreeMap<u32, GsiClaim>,
    /// (space, base) -> (len, owner)
    ranges: BTreeMap<(Space, u64), (u64, String)>,
}

impl Resources {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims IOAPIC pin `gsi` for `owner`.
    pub fn claim_gsi(
        &mut self,
        gsi: u32,
        owner: &str,
        sharing: Sharing,
    ) -> Result<(), ResourceError> {
        if gsi >= IOAPIC_PINS {
            return Err(ResourceError::NoSuchGsi {
                gsi,
                owner: owner.into(),
            });
        }
        match self.gsis.get_mut(&gsi) {
            None => {
                self.gsis.insert(
                    gsi,
                    GsiClaim {
                        sharing,
                        owners: vec![owner.into()],
                    },
                );
                Ok(())
            }
            Some(c) if c.sharing == Sharing::PciIntx && sharing == Sharing::PciIntx => {
                c.owners.push(owner.into());
                Ok(())
            }
            Some(c) => Err(ResourceError::GsiTaken {
                gsi,
                owner: owner.into(),
                holder: c.owners.join(", "),
            }),
        }
    }

    /// Claims `[base, base + len)` in `space` for `owner`.
    pub fn claim(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        owner: &str,
    ) -> Result<(), ResourceError> {
        let end =
            base.checked_add(len)
                .filter(|_| len > 0)
                .ok_or_else(|| ResourceError::BadRange {
                    space,
                    base,
                    len,
                    owner: owner.into(),
                })?;
        // Only the nearest claim starting below `end` in the same space can overlap.
        if let Some((&(s, b), (l, holder))) = self.ranges.range(..(space, end)).next_back() {
            if s == space && b + l > base {
                return Err(ResourceError::RangeTaken {
                    space,
                    base,
                    len,
                    owner: owner.into(),
                    holder: holder.clone(),
                });
            }
        }
        self.ranges.insert((space, base), (len, owner.into()));
        Ok(())
    }

    /// Who holds GSI `gsi` (for logs and tests).
    pub fn gsi_owners(&self, gsi: u32) -> Vec<&str> {
        self.gsis
            .get(&gsi)
            .map(|c| c.owners.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsis_are_exclusive_except_pci_intx() {
        let mut r = Resources::new();
        r.claim_gsi(4, "com1", Sharing::Exclusive).unwrap();
        let e = r.claim_gsi(4, "other", Sharing::Exclusive).unwrap_err();
        assert_eq!(e.to_string(), "GSI 4 for other is already taken by com1");
        r.claim_gsi(16, "pci 00:01.0 INTA", Sharing::PciIntx)
            .unwrap();
        r.claim_gsi(16, "pci 00:09.0 INTA", Sharing::PciIntx)
            .unwrap();
        assert_eq!(r.gsi_owners(16).len(), 2);
        r.claim_gsi(23, "bench", Sharing::Exclusive).unwrap();
        let e = r
            .claim_gsi(23, "pci 00:07.0 INTA", Sharing::PciIntx)
            .unwrap_err();
        assert!(e.to_string().contains("taken by bench"), "{e}");
        assert!(r.claim_gsi(16, "x", Sharing::Exclusive).is_err());
        assert!(matches!(
            r.claim_gsi(24, "x", Sharing::Exclusive),
            Err(ResourceError::NoSuchGsi { .. })
        ));
    }

    #[test]
    fn ranges_do_not_overlap_within_a_space() {
        let mut r = Resources::new();
        r.claim(Space::Pio, 0x3f8, 8, "com1").unwrap();
        r.claim(Space::Mmio, 0x3f8, 8, "ram").unwrap(); // other space
        assert!(r.claim(Space::Pio, 0x3ff, 1, "x").is_err());
        assert!(r.claim(Space::Pio, 0x3f0, 9, "x").is_err());
        r.claim(Space::Pio, 0x3f0, 8, "fdc").unwrap();
        r.claim(Space::Pio, 0x400, 1, "y").unwrap();
        assert!(r.claim(Space::Pio, 0x500, 0, "empty").is_err());
        assert!(r.claim(Space::Mmio, u64::MAX, 2, "wrap").is_err());
        let e = r.claim(Space::Mmio, 0x3fc, 1, "z").unwrap_err();
        assert_eq!(e.to_string(), "MMIO range 0x3fc+0x1 for z overlaps ram");
    }
}

/// The two buses and the claim map, filled together: a device is put on a bus only after its
/// range was claimed, so a clash fails here with both owners named.
#[derive(Default)]
pub struct Buses {
    pub pio: crate::bus::Bus,
    pub mmio: crate::bus::Bus,
    pub claims: Resources,
}

/// Why a device could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    Claim(#[from] ResourceError),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

impl Buses {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `[base, base + len)` in `space` and puts `device` there on that space's bus.
    pub fn add(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        name: &'static str,
        device: crate::bus::SharedDevice,
    ) -> Result<(), PlaceError> {
        self.claims.claim(space, base, len, name)?;
        let bus = match space {
            Space::Pio => &mut self.pio,
            Space::Mmio => &mut self.mmio,
        };
        bus.insert(base, len, name, device)?;
        Ok(())
    }
}
