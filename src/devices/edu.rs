//! QEMU's educational PCI device `edu` (PCI 1234:11e8, version 1.0), the DMA and interrupt
//! target of kvm-unit-tests' `intel-iommu` test. Written from QEMU's description of the device
//! (docs/specs/edu.rst) and its observable behaviour.
//!
//! BAR 0 is 1 MiB of 32-bit MMIO. Registers are accessed with 4-byte accesses below 0x80 and
//! with 4- or 8-byte accesses from 0x80 on, naturally aligned; other accesses read zero and are
//! ignored on write. A valid access to an offset that holds no register reads all-ones.
//!
//! | offset | access | register |
//! |---|---|---|
//! | 0x00 | RO | identification, `0x010000ed` (version 1.0) |
//! | 0x04 | RW | liveness: reads the bitwise NOT of the last value written |
//! | 0x08 | RW | factorial: write `n`, read `n!` (wrapping 32-bit arithmetic) |
//! | 0x20 | RW | status: bit 0 computing (RO), bit 7 raise interrupt 0x01 after a factorial |
//! | 0x24 | RO | interrupt status |
//! | 0x60 | WO | interrupt raise: ORs the value into the interrupt status |
//! | 0x64 | WO | interrupt acknowledge: clears those bits |
//! | 0x80 | RW | DMA source address |
//! | 0x88 | RW | DMA destination address |
//! | 0x90 | RW | DMA count |
//! | 0x98 | RW | DMA command: bit 0 start, bit 1 direction (1: device buffer to RAM), bit 2 raise interrupt 0x100 when done |
//!
//! Work is done synchronously on the register write: a factorial is ready (status bit 0 never
//! reads set) and a DMA is complete (command bit 0 reads clear) as soon as the write returns,
//! so no host thread or timer is needed. The device's DMA buffer is 4 KiB at device-side
//! addresses `0x40000..0x41000`; a transfer that does not fit in it is rejected. RAM-side
//! addresses are masked to the device's DMA mask (28 bits, as QEMU's default) and go through
//! the [`DmaSpace`] with the device's requester ID, so an IOMMU translates or blocks them; a
//! blocked transfer is abandoned. Either failure still completes the command (start bit
//! cleared, completion interrupt raised when asked), as QEMU's device does.
//!
//! Interrupts: INTx (pin A, level, asserted while the interrupt status is non-zero unless the
//! command register's Interrupt Disable bit is set) or, once the guest enables it, one MSI
//! vector ([`Msi`]) sent on every raise. Enabling MSI deasserts INTx.

use std::sync::Arc;

use super::dma::DmaSpace;
use super::pci::config::{
    BarKind, BarSpec, PciConfig, PciHeader, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, REG_COMMAND,
    REG_INTERRUPT_LINE, REG_STATUS as PCI_REG_STATUS,
};
use super::pci::msi::Msi;
use super::pci::{MsiRouter, PciDevice, PciError};
use super::IrqLevel;
use crate::ratelimit::RateLimit;

pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0x11e8;
pub const REVISION: u8 = 0x10;
/// BAR 0: the registers.
pub const BAR: usize = 0;
pub const BAR_SIZE: u64 = 1 << 20;
/// What the identification register reads: major 1, minor 0, magic 0xed.
pub const ID: u32 = 0x0100_00ed;
/// Device-side address of the DMA buffer, and its size.
pub const DMA_START: u64 = 0x4_0000;
pub const DMA_SIZE: usize = 4096;
/// Bits of a RAM-side DMA address the device drives (QEMU's default `dma_mask`).
pub const DEFAULT_DMA_MASK: u64 = (1 << 28) - 1;

/// Register offsets.
pub const REG_ID: u64 = 0x00;
pub const REG_LIVENESS: u64 = 0x04;
pub const REG_FACTORIAL: u64 = 0x08;
pub const REG_STATUS: u64 = 0x20;
pub const REG_IRQ_STATUS: u64 = 0x24;
pub const REG_IRQ_RAISE: u64 = 0x60;
pub const REG_IRQ_ACK: u64 = 0x64;
pub const REG_DMA_SRC: u64 = 0x80;
pub const REG_DMA_DST: u64 = 0x88;
pub const REG_DMA_COUNT: u64 = 0x90;
pub const REG_DMA_CMD: u64 = 0x98;

/// Status register bits.
pub const STATUS_COMPUTING: u32 = 0x01;
pub const STATUS_IRQ_FACTORIAL: u32 = 0x80;
/// Interrupt status bits the device raises itself.
pub const IRQ_FACTORIAL: u32 = 0x001;
pub const IRQ_DMA: u32 = 0x100;
/// DMA command bits.
pub const DMA_CMD_START: u64 = 0x1;
pub const DMA_CMD_TO_RAM: u64 = 0x2;
pub const DMA_CMD_IRQ: u64 = 0x4;

/// PCI status register: INTx asserted.
const PCI_STATUS_INTERRUPT: u16 = 1 << 3;

static DMA_LOG: RateLimit = RateLimit::new(10);
static IRQ_LOG: RateLimit = RateLimit::new(5);

/// `n!` in wrapping 32-bit arithmetic. From 34 on the product has at least 32 factors of two,
/// so it is 0 modulo 2^32: no need to loop up to `n`.
fn factorial(n: u32) -> u32 {
    if n >= 34 {
        return 0;
    }
    (1..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

/// The device.
pub struct Edu {
    config: PciConfig,
    msi: Msi,
    dma: Arc<dyn DmaSpace>,
    /// Requester ID of the device's DMA (bus << 8 | device << 3 | function).
    sid: u16,
    intx: Arc<dyn IrqLevel>,
    gsi: u32,
    dma_mask: u64,
    /// The device asserts INTx (before the Interrupt Disable bit).
    intx_asserted: bool,
    /// The level last given to the interrupt controller.
    intx_line: bool,
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u64,
    dma_cmd: u64,
    buf: Box<[u8; DMA_SIZE]>,
}

impl Edu {
    /// The device at requester ID `sid`, doing DMA through `dma`, its MSI vector from `msi`
    /// and INTx (pin A) on `gsi` of `intx` (the interrupt line register reads `gsi`).
    pub fn new(
        dma: Arc<dyn DmaSpace>,
        sid: u16,
        msi: Arc<dyn MsiRouter>,
        intx: Arc<dyn IrqLevel>,
        gsi: u32,
    ) -> Result<Self, PciError> {
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            revision: REVISION,
            class: 0xff_00_00, // "other" device
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            interrupt_pin: 1,
        });
        config.add_bar(
            BAR,
            BarSpec {
                size: BAR_SIZE,
                kind: BarKind::Mem32,
                prefetchable: false,
            },
        )?;
        config.set_regs(REG_INTERRUPT_LINE, &[u8::try_from(gsi).unwrap_or(0xff)]);
        let mut msi = Msi::new(msi, false).map_err(PciError::Interrupt)?;
        msi.add_to(&mut config)?;
        Ok(Self {
            config,
            msi,
            dma,
            sid,
            intx,
            gsi,
            dma_mask: DEFAULT_DMA_MASK,
            intx_asserted: false,
            intx_line: false,
            liveness: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_count: 0,
            dma_cmd: 0,
            buf: Box::new([0; DMA_SIZE]),
        })
    }

    /// Changes the bits of RAM-side DMA addresses the device drives (QEMU's `dma_mask`
    /// property; [`DEFAULT_DMA_MASK`] until then).
    pub fn set_dma_mask(&mut self, mask: u64) {
        self.dma_mask = mask;
    }

    /// The MSI capability (its GSI, whether the guest enabled it).
    pub fn msi(&self) -> &Msi {
        &self.msi
    }

    /// The interrupt status register.
    pub fn irq_status(&self) -> u32 {
        self.irq_status
    }

    fn bus_master(&self) -> bool {
        self.config.command() & COMMAND_BUS_MASTER != 0
    }

    /// Gives the interrupt controller the INTx level the device state calls for, and mirrors
    /// it in the PCI status register.
    fn sync_intx(&mut self) {
        let status = u16::from_le_bytes([
            self.config.regs()[PCI_REG_STATUS],
            self.config.regs()[PCI_REG_STATUS + 1],
        ]);
        let status = if self.intx_asserted {
            status | PCI_STATUS_INTERRUPT
        } else {
            status & !PCI_STATUS_INTERRUPT
        };
        self.config.set_regs(PCI_REG_STATUS, &status.to_le_bytes());

        let high = self.intx_asserted && self.config.command() & COMMAND_INTX_DISABLE == 0;
        if high == self.intx_line {
            return;
        }
        match self.intx.set_level(self.gsi, high) {
            Ok(()) => self.intx_line = high,
            Err(e) => {
                let gsi = self.gsi;
                IRQ_LOG.warn(|| format!("edu: cannot set INTx (GSI {gsi}) to {high}: {e}"));
            }
        }
    }

    /// ORs `bits` into the interrupt status and signals the interrupt if any bit is set.
    fn raise(&mut self, bits: u32) {
        self.irq_status |= bits;
        if self.irq_status == 0 {
            return;
        }
        if self.msi.enabled() {
            // An MSI is a memory write: it needs bus mastering, like DMA.
            if !self.bus_master() {
                IRQ_LOG.log(|| "edu: MSI with bus mastering off, dropped".into());
                return;
            }
            if let Err(e) = self.msi.trigger(&mut self.config) {
                IRQ_LOG.warn(|| format!("edu: cannot send the MSI: {e}"));
            }
        } else {
            self.intx_asserted = true;
            self.sync_intx();
        }
    }

    /// Clears `bits` from the interrupt status; INTx drops once it is zero.
    fn acknowledge(&mut self, bits: u32) {
        self.irq_status &= !bits;
        if self.irq_status == 0 && !self.msi.enabled() {
            self.intx_asserted = false;
            self.sync_intx();
        }
    }

    /// Runs the transfer `dma_cmd` asks for, then completes the command.
    fn run_dma(&mut self) {
        let to_ram = self.dma_cmd & DMA_CMD_TO_RAM != 0;
        let (dev, ram) = if to_ram {
            (self.dma_src, self.dma_dst)
        } else {
            (self.dma_dst, self.dma_src)
        };
        self.transfer(to_ram, dev, ram, self.dma_count);
        self.dma_cmd &= !DMA_CMD_START;
        if self.dma_cmd & DMA_CMD_IRQ != 0 {
            self.raise(IRQ_DMA);
        }
    }

    /// Moves `count` bytes between the device buffer at device address `dev` and bus address
    /// `ram`; logs and gives up on any error.
    fn transfer(&mut self, to_ram: bool, dev: u64, ram: u64, count: u64) {
        let end = dev.checked_add(count);
        let in_buffer = dev >= DMA_START && end.is_some_and(|e| e <= DMA_START + DMA_SIZE as u64);
        if !in_buffer {
            DMA_LOG.warn(|| {
                format!(
                    "edu: DMA of {count:#x} bytes at device address {dev:#x} outside the \
                     buffer {DMA_START:#x}..{:#x}, rejected",
                    DMA_START + DMA_SIZE as u64
                )
            });
            return;
        }
        if !self.bus_master() {
            DMA_LOG.warn(|| "edu: DMA with bus mastering off, rejected".into());
            return;
        }
        let ram_addr = ram & self.dma_mask;
        if ram_addr != ram {
            DMA_LOG.warn(|| format!("edu: DMA address {ram:#x} clamped to {ram_addr:#x}"));
        }
        // Both fit: checked against the 4 KiB buffer above.
        let start = (dev - DMA_START) as usize;
        let range = start..start + count as usize;
        let result = if to_ram {
            self.dma.write(self.sid, ram_addr, &self.buf[range])
        } else {
            // Through a bounce buffer: a failed read leaves the device buffer untouched.
            let mut tmp = vec![0u8; range.len()];
            let r = self.dma.read(self.sid, ram_addr, &mut tmp);
            if r.is_ok() {
                self.buf[range].copy_from_slice(&tmp);
            }
            r
        };
        if let Err(e) = result {
            DMA_LOG.warn(|| format!("edu: DMA aborted: {e}"));
        }
    }

    /// The register at `offset` (a valid access; 4-byte reads take the low half).
    fn read_reg(&self, offset: u64) -> u64 {
        match offset {
            REG_ID => ID.into(),
            REG_LIVENESS => self.liveness.into(),
            REG_FACTORIAL => self.factorial.into(),
            REG_STATUS => self.status.into(),
            REG_IRQ_STATUS => self.irq_status.into(),
            REG_DMA_SRC => self.dma_src,
            REG_DMA_DST => self.dma_dst,
            REG_DMA_COUNT => self.dma_count,
            REG_DMA_CMD => self.dma_cmd,
            _ => u64::MAX,
        }
    }

    fn write_reg(&mut self, offset: u64, val: u64) {
        // The 32-bit registers take the low half of the value.
        let val32 = val as u32;
        match offset {
            REG_LIVENESS => self.liveness = !val32,
            REG_FACTORIAL => {
                self.factorial = factorial(val32);
                if self.status & STATUS_IRQ_FACTORIAL != 0 {
                    self.raise(IRQ_FACTORIAL);
                }
            }
            REG_STATUS => {
                self.status =
                    (self.status & !STATUS_IRQ_FACTORIAL) | (val32 & STATUS_IRQ_FACTORIAL);
            }
            REG_IRQ_RAISE => self.raise(val32),
            REG_IRQ_ACK => self.acknowledge(val32),
            // A 4-byte write sets the whole register (the upper half becomes zero). The
            // registers are locked while a transfer runs, which never outlives the command
            // write here.
            REG_DMA_SRC => self.dma_src = val,
            REG_DMA_DST => self.dma_dst = val,
            REG_DMA_COUNT => self.dma_count = val,
            REG_DMA_CMD if val & DMA_CMD_START != 0 => {
                self.dma_cmd = val;
                self.run_dma();
            }
            _ => {}
        }
    }
}

/// True for the accesses the device answers: 4 bytes anywhere, 8 bytes from 0x80 on,
/// naturally aligned.
fn valid_access(offset: u64, len: usize) -> bool {
    let size_ok = len == 4 || (len == 8 && offset >= REG_DMA_SRC);
    size_ok && offset % len as u64 == 0
}

impl PciDevice for Edu {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        self.config.read(reg.into(), data);
    }

    fn config_write(&mut self, reg: u16, data: &[u8]) {
        let was_msi = self.msi.enabled();
        self.config.write(reg.into(), data);
        self.msi.config_written(&mut self.config);
        if !was_msi && self.msi.enabled() {
            // The function may not use INTx while MSI is on.
            self.intx_asserted = false;
        }
        // Also follows the Interrupt Disable bit.
        self.sync_intx();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR || !valid_access(offset, data.len()) {
            return;
        }
        let v = self.read_reg(offset).to_le_bytes();
        let n = data.len();
        data.copy_from_slice(&v[..n]);
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR || !valid_access(offset, data.len()) {
            return;
        }
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        self.write_reg(offset, u64::from_le_bytes(v));
    }

    /// Firmware-style assignment: memory decoding and bus mastering on, as firmware leaves a
    /// device it has set up (a test kernel may not set the command bits itself).
    fn assign_bar(&mut self, bar: usize, addr: u64) {
        self.config.set_bar_addr(bar, addr);
        self.config.enable_decoding(false, true);
        let cmd = self.config.command() | COMMAND_BUS_MASTER;
        self.config.set_regs(REG_COMMAND, &cmd.to_le_bytes());
    }
}

#[cfg(test)]
mod tests;
