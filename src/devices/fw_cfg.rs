//! QEMU's fw_cfg, the traditional I/O-port interface only (no DMA): a guest writes an item
//! selector (16 bits) to port 0x510 and reads the item byte by byte from port 0x511. Test
//! kernels written for QEMU use it to find the signature, RAM size and CPU count.
//!
//! Items: signature ("QEMU"), ID (1: traditional interface, no DMA), RAM size (u64 LE),
//! CPU count (u16 LE), and an empty file directory (u32 BE count 0). Unknown items and reads
//! past an item's end read as 0, as in QEMU.

use crate::bus::BusDeviceMut;

/// Selector port; the data port is `FW_CFG_PORT + 1`.
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports decoded (selector, data; the DMA address ports 0x514.. are not).
pub const FW_CFG_LEN: u64 = 2;

pub const FW_CFG_SIGNATURE: u16 = 0x00;
pub const FW_CFG_ID: u16 = 0x01;
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
pub const FW_CFG_NB_CPUS: u16 = 0x05;
pub const FW_CFG_FILE_DIR: u16 = 0x19;

/// The fw_cfg device.
pub struct FwCfg {
    ram_size: u64,
    cpus: u16,
    selector: u16,
    offset: usize,
}

impl FwCfg {
    pub fn new(ram_size: u64, cpus: u16) -> Self {
        Self {
            ram_size,
            cpus,
            selector: FW_CFG_SIGNATURE,
            offset: 0,
        }
    }

    fn item(&self) -> Vec<u8> {
        match self.selector {
            FW_CFG_SIGNATURE => b"QEMU".to_vec(),
            FW_CFG_ID => 1u32.to_le_bytes().to_vec(),
            FW_CFG_RAM_SIZE => self.ram_size.to_le_bytes().to_vec(),
            FW_CFG_NB_CPUS => self.cpus.to_le_bytes().to_vec(),
            FW_CFG_FILE_DIR => 0u32.to_be_bytes().to_vec(),
            _ => Vec::new(),
        }
    }
}

impl BusDeviceMut for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 1 {
            data.fill(0);
            return;
        }
        let item = self.item();
        for b in data.iter_mut() {
            *b = item.get(self.offset).copied().unwrap_or(0);
            self.offset = self.offset.saturating_add(1);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && !data.is_empty() {
            let lo = data[0];
            let hi = data.get(1).copied().unwrap_or(0);
            self.selector = u16::from_le_bytes([lo, hi]);
            self.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(d: &mut FwCfg, sel: u16, n: usize) -> Vec<u8> {
        d.write(0, &sel.to_le_bytes());
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                d.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn items() {
        let mut d = FwCfg::new(64 << 20, 3);
        assert_eq!(read_item(&mut d, FW_CFG_SIGNATURE, 5), b"QEMU\0");
        assert_eq!(read_item(&mut d, FW_CFG_ID, 4), [1, 0, 0, 0]);
        assert_eq!(
            read_item(&mut d, FW_CFG_RAM_SIZE, 8),
            (64u64 << 20).to_le_bytes()
        );
        assert_eq!(read_item(&mut d, FW_CFG_NB_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut d, FW_CFG_FILE_DIR, 4), [0, 0, 0, 0]);
        assert_eq!(read_item(&mut d, 0x7777, 2), [0, 0]);
        let mut b = [0xffu8; 2];
        d.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        d.write(0, &[]);
    }
}
