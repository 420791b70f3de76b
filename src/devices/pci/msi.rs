//! Plain MSI (capability ID 0x05) with one vector and a 64-bit message address, optionally with
//! per-vector masking.
//!
//! The capability's registers live in the function's [`PciConfig`]: the guest programs them
//! through ordinary configuration writes (the write masks set up by [`Msi::add_to`] decide
//! which bits it may change), and the device calls [`Msi::config_written`] after each write so
//! that the vector's route follows the registers. The vector is a GSI with an irqfd
//! ([`MsiVector`]) allocated from the [`MsiRouter`] when the [`Msi`] is built; the route is
//! updated only when the enable bit, the address, the data or the mask bit changed.
//!
//! Layout (offsets inside the capability):
//!
//! | offset | size | register |
//! |---|---|---|
//! | 0 | 1 | capability ID (0x05) |
//! | 1 | 1 | next pointer |
//! | 2 | 2 | message control: bit 0 enable (RW), bits 3:1 = 0 (one vector), bits 6:4 = 0, bit 7 = 1 (64-bit), bit 8 per-vector masking |
//! | 4 | 4 | message address, low (bits 1:0 read-only zero) |
//! | 8 | 4 | message address, high |
//! | 12 | 2 | message data |
//! | 16 | 4 | mask bits (with per-vector masking; bit 0 RW) |
//! | 20 | 4 | pending bits (with per-vector masking; read-only) |

use std::io;
use std::sync::Arc;

use super::{MsiRouter, MsiVector, PciConfig, PciError};
use crate::ratelimit::RateLimit;

/// MSI capability ID.
pub const CAP_ID: u8 = 0x05;
/// Offsets of the registers inside the capability.
pub const CAP_CONTROL: usize = 2;
pub const CAP_ADDRESS_LO: usize = 4;
pub const CAP_ADDRESS_HI: usize = 8;
pub const CAP_DATA: usize = 12;
pub const CAP_MASK: usize = 16;
pub const CAP_PENDING: usize = 20;
/// Capability length (ID and next pointer included) without and with per-vector masking.
pub const CAP_LEN: usize = 14;
pub const CAP_LEN_MASKING: usize = 24;

/// Message control bits.
pub const CTRL_ENABLE: u16 = 1 << 0;
pub const CTRL_64BIT: u16 = 1 << 7;
pub const CTRL_PER_VECTOR_MASK: u16 = 1 << 8;

/// Route failures follow guest configuration writes: rate-limited for all devices.
static ROUTE_LOG: RateLimit = RateLimit::new(5);

/// What the router was told for the vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    addr: u64,
    data: u32,
    masked: bool,
}

/// "No route": what a freshly allocated vector has.
const NO_ROUTE: Route = Route {
    addr: 0,
    data: 0,
    masked: true,
};

/// The MSI state of one function.
pub struct Msi {
    per_vector_mask: bool,
    vector: MsiVector,
    router: Arc<dyn MsiRouter>,
    /// Where the capability sits in configuration space, once added.
    offset: Option<usize>,
    /// The registers as last read by [`Msi::config_written`].
    enabled: bool,
    vector_masked: bool,
    /// The last route the router accepted.
    routed: Route,
    /// A trigger arrived while the vector was masked (per-vector masking only).
    pending: bool,
}

impl Msi {
    /// One vector with a GSI from `router` (no route until the guest enables MSI).
    /// `per_vector_mask` adds the mask and pending registers.
    pub fn new(router: Arc<dyn MsiRouter>, per_vector_mask: bool) -> io::Result<Self> {
        let vector = router.allocate()?;
        Ok(Self {
            per_vector_mask,
            vector,
            router,
            offset: None,
            enabled: false,
            vector_masked: false,
            routed: NO_ROUTE,
            pending: false,
        })
    }

    /// Appends the capability to `config` (disabled, message zero) and returns its offset.
    /// Adding it a second time fails with [`PciError::CapabilitySpace`].
    pub fn add_to(&mut self, config: &mut PciConfig) -> Result<usize, PciError> {
        let len = self.cap_len();
        if self.offset.is_some() {
            return Err(PciError::CapabilitySpace(len));
        }
        let mut ctrl = CTRL_64BIT;
        if self.per_vector_mask {
            ctrl |= CTRL_PER_VECTOR_MASK;
        }
        // Body: everything after the ID and next-pointer bytes.
        let mut body = vec![0u8; len - 2];
        body[..2].copy_from_slice(&ctrl.to_le_bytes());
        let mut wmask = vec![0u8; len - 2];
        let at = |reg: usize| reg - 2;
        wmask[at(CAP_CONTROL)] = CTRL_ENABLE as u8;
        wmask[at(CAP_ADDRESS_LO)..at(CAP_ADDRESS_LO) + 4]
            .copy_from_slice(&[0xfc, 0xff, 0xff, 0xff]);
        wmask[at(CAP_ADDRESS_HI)..at(CAP_ADDRESS_HI) + 4].fill(0xff);
        wmask[at(CAP_DATA)..at(CAP_DATA) + 2].fill(0xff);
        if self.per_vector_mask {
            wmask[at(CAP_MASK)] = 0x01; // one vector: one mask bit
        }
        let off = config.add_capability(CAP_ID, &body, &wmask)?;
        self.offset = Some(off);
        Ok(off)
    }

    fn cap_len(&self) -> usize {
        if self.per_vector_mask {
            CAP_LEN_MASKING
        } else {
            CAP_LEN
        }
    }

    /// The capability's offset in configuration space, once added.
    pub fn offset(&self) -> Option<usize> {
        self.offset
    }

    /// The vector's GSI.
    pub fn gsi(&self) -> u32 {
        self.vector.gsi
    }

    /// True when the guest has set the enable bit (the device must not use INTx then).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// True when a trigger would not be delivered now (disabled or masked).
    pub fn masked(&self) -> bool {
        !self.enabled || self.vector_masked
    }

    /// True while a trigger waits for the vector to be unmasked.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// The programmed message (`addr`, `data`) as the registers hold it now.
    pub fn message(&self, config: &PciConfig) -> Option<(u64, u32)> {
        let off = self.offset?;
        let lo = read_u32(config, off + CAP_ADDRESS_LO);
        let hi = read_u32(config, off + CAP_ADDRESS_HI);
        let data = read_u16(config, off + CAP_DATA);
        Some((u64::from(hi) << 32 | u64::from(lo), u32::from(data)))
    }

    /// Call after every [`PciConfig::write`]: re-reads the capability and, when the enable
    /// bit, the message or the mask changed, routes the vector anew (masked while disabled).
    /// A trigger left pending by the mask is delivered once the vector is deliverable again.
    pub fn config_written(&mut self, config: &mut PciConfig) {
        let Some(off) = self.offset else {
            return;
        };
        let ctrl = read_u16(config, off + CAP_CONTROL);
        self.enabled = ctrl & CTRL_ENABLE != 0;
        self.vector_masked = self.per_vector_mask && read_u32(config, off + CAP_MASK) & 1 != 0;
        let (addr, data) = self.message(config).unwrap_or((0, 0));
        let route = Route {
            addr,
            data,
            masked: self.masked(),
        };
        if route != self.routed {
            let gsi = self.vector.gsi;
            match self.router.update(gsi, addr, data, route.masked) {
                Ok(()) => self.routed = route,
                Err(e) => {
                    ROUTE_LOG.warn(|| format!("MSI: cannot route GSI {gsi}: {e}"));
                }
            }
        }
        if self.pending && !self.masked() {
            self.set_pending(config, false);
            // EAGAIN only if the counter is saturated: an interrupt is pending anyway.
            let _ = self.vector.irqfd.write(1);
        }
    }

    fn set_pending(&mut self, config: &mut PciConfig, pending: bool) {
        self.pending = pending;
        if let Some(off) = self.offset.filter(|_| self.per_vector_mask) {
            config.set_regs(off + CAP_PENDING, &u32::from(pending).to_le_bytes());
        }
    }

    /// Sends the message: writes the vector's irqfd. Does nothing while MSI is disabled (the
    /// device uses INTx then); while the vector is masked, sets its pending bit instead.
    pub fn trigger(&mut self, config: &mut PciConfig) -> io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if self.vector_masked {
            self.set_pending(config, true);
            return Ok(());
        }
        self.vector.irqfd.write(1)
    }
}

fn read_u16(config: &PciConfig, off: usize) -> u16 {
    let mut b = [0u8; 2];
    config.read(off, &mut b);
    u16::from_le_bytes(b)
}

fn read_u32(config: &PciConfig, off: usize) -> u32 {
    let mut b = [0u8; 4];
    config.read(off, &mut b);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::config::{PciHeader, REG_CAP_PTR};
    use crate::devices::pci::msix::tests::FakeRouter;

    fn config() -> PciConfig {
        PciConfig::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            ..Default::default()
        })
    }

    fn setup(per_vector_mask: bool) -> (PciConfig, Msi, Arc<FakeRouter>, usize) {
        let router = Arc::new(FakeRouter::default());
        let mut c = config();
        let mut m = Msi::new(router.clone(), per_vector_mask).unwrap();
        let off = m.add_to(&mut c).unwrap();
        (c, m, router, off)
    }

    fn write(c: &mut PciConfig, m: &mut Msi, off: usize, data: &[u8]) {
        c.write(off, data);
        m.config_written(c);
    }

    /// What a guest does (kvm-unit-tests' pci_setup_msi): address, data (as a dword), enable.
    fn program(c: &mut PciConfig, m: &mut Msi, off: usize, addr: u64, data: u32) {
        write(c, m, off + CAP_ADDRESS_LO, &(addr as u32).to_le_bytes());
        write(
            c,
            m,
            off + CAP_ADDRESS_HI,
            &((addr >> 32) as u32).to_le_bytes(),
        );
        write(c, m, off + CAP_DATA, &data.to_le_bytes());
        let ctrl = read_u16(c, off + CAP_CONTROL) | CTRL_ENABLE;
        write(c, m, off + CAP_CONTROL, &ctrl.to_le_bytes());
    }

    #[test]
    fn capability_layout() {
        let (c, m, _, off) = setup(false);
        assert_eq!(off, 0x40);
        assert_eq!(m.offset(), Some(0x40));
        assert_eq!(c.regs()[REG_CAP_PTR], 0x40);
        assert_eq!(c.regs()[off], CAP_ID);
        assert_eq!(c.regs()[off + 1], 0, "last capability");
        assert_eq!(read_u16(&c, off + CAP_CONTROL), CTRL_64BIT);
        assert!(!m.enabled());
        assert_eq!(m.gsi(), 24, "the router's first GSI");

        let (c, _, _, off) = setup(true);
        assert_eq!(
            read_u16(&c, off + CAP_CONTROL),
            CTRL_64BIT | CTRL_PER_VECTOR_MASK
        );
    }

    #[test]
    fn read_only_bits_stay() {
        let (mut c, mut m, _, off) = setup(false);
        write(&mut c, &mut m, off, &[0xff; 4]);
        assert_eq!(c.regs()[off], CAP_ID);
        assert_eq!(
            read_u16(&c, off + CAP_CONTROL),
            CTRL_64BIT | CTRL_ENABLE,
            "only the enable bit is writable"
        );
        write(&mut c, &mut m, off + CAP_ADDRESS_LO, &[0xff; 4]);
        assert_eq!(read_u32(&c, off + CAP_ADDRESS_LO), 0xffff_fffc);
        // The data register is 16 bits; a dword write does not reach past the capability.
        write(&mut c, &mut m, off + CAP_DATA, &[0xff; 4]);
        assert_eq!(read_u32(&c, off + CAP_DATA), 0xffff);
    }

    #[test]
    fn enable_routes_and_trigger_fires() {
        let (mut c, mut m, router, off) = setup(false);
        let gsi = m.gsi();
        // Triggers while disabled go nowhere.
        m.trigger(&mut c).unwrap();
        assert!(!router.fired(gsi));
        // An unrelated write does not touch the route.
        write(&mut c, &mut m, 0x04, &[0x06, 0]);
        assert!(router.take_routes().is_empty());

        program(&mut c, &mut m, off, 0x1_fee0_1000, 0x4041);
        assert!(m.enabled());
        assert_eq!(m.message(&c), Some((0x1_fee0_1000, 0x4041)));
        let routes = router.take_routes();
        assert_eq!(
            routes.last(),
            Some(&(gsi, 0x1_fee0_1000, 0x4041, false)),
            "{routes:x?}"
        );
        // Programmed while disabled: every earlier update was masked.
        assert!(routes[..routes.len() - 1].iter().all(|r| r.3));

        m.trigger(&mut c).unwrap();
        assert!(router.fired(gsi));
        assert!(!router.fired(gsi), "one write, one interrupt");

        // Rewriting the same values changes nothing.
        program(&mut c, &mut m, off, 0x1_fee0_1000, 0x4041);
        assert!(router.take_routes().is_empty());

        // Disabling masks the route.
        write(&mut c, &mut m, off + CAP_CONTROL, &[0, 0]);
        assert!(!m.enabled());
        assert_eq!(
            router.take_routes(),
            vec![(gsi, 0x1_fee0_1000, 0x4041, true)]
        );
        m.trigger(&mut c).unwrap();
        assert!(!router.fired(gsi));
    }

    #[test]
    fn failed_update_is_retried() {
        let (mut c, mut m, router, off) = setup(false);
        router.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        program(&mut c, &mut m, off, 0xfee0_0000, 0x30);
        assert!(router.take_routes().is_empty());
        router
            .fail
            .store(false, std::sync::atomic::Ordering::SeqCst);
        write(&mut c, &mut m, 0x0c, &[0x10]); // any write
        assert_eq!(
            router.take_routes(),
            vec![(m.gsi(), 0xfee0_0000, 0x30, false)]
        );
    }

    #[test]
    fn per_vector_mask_and_pending() {
        let (mut c, mut m, router, off) = setup(true);
        let gsi = m.gsi();
        write(&mut c, &mut m, off + CAP_MASK, &[0xff; 4]);
        assert_eq!(read_u32(&c, off + CAP_MASK), 1);
        program(&mut c, &mut m, off, 0xfee0_0000, 0x22);
        assert!(m.enabled() && m.masked());
        assert_eq!(
            router.take_routes().last(),
            Some(&(gsi, 0xfee0_0000, 0x22, true))
        );

        m.trigger(&mut c).unwrap();
        assert!(!router.fired(gsi));
        assert!(m.pending());
        assert_eq!(read_u32(&c, off + CAP_PENDING), 1);
        write(&mut c, &mut m, off + CAP_PENDING, &[0; 4]);
        assert_eq!(
            read_u32(&c, off + CAP_PENDING),
            1,
            "pending bits are read-only"
        );

        // Unmasking routes the vector and delivers the pending message.
        write(&mut c, &mut m, off + CAP_MASK, &[0; 4]);
        assert_eq!(router.take_routes(), vec![(gsi, 0xfee0_0000, 0x22, false)]);
        assert!(router.fired(gsi));
        assert!(!m.pending());
        assert_eq!(read_u32(&c, off + CAP_PENDING), 0);
    }

    #[test]
    fn not_added_twice_and_no_room() {
        let (mut c, mut m, _, _) = setup(false);
        assert!(m.add_to(&mut c).is_err());
        // A configuration space with no room left.
        let mut full = config();
        full.add_capability(0x09, &[0; 180], &[]).unwrap();
        let mut m = Msi::new(Arc::new(FakeRouter::default()), true).unwrap();
        assert!(m.add_to(&mut full).is_err());
        assert_eq!(m.offset(), None);
        m.config_written(&mut full); // not added: nothing to do
        m.trigger(&mut full).unwrap();
    }

    #[test]
    fn hostile_config_writes() {
        let (mut c, mut m, _, _) = setup(true);
        let mut x: u64 = 0x1234_5678;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = ((x >> 33) % 0x60) as usize;
            let len = [1usize, 2, 4, 8][((x >> 20) & 3) as usize];
            write(&mut c, &mut m, off, &(x >> 7).to_le_bytes()[..len]);
            if x & 0x100 != 0 {
                m.trigger(&mut c).unwrap();
            }
        }
        assert_eq!(c.regs()[0x40], CAP_ID);
    }
}
