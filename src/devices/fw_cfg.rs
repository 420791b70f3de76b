//! QEMU's fw_cfg on the PC's ports: the selector (16 bits) at 0x510, the data byte at 0x511
//! and the DMA address at 0x514 (big-endian, high dword first; writing the low dword at
//! 0x518, or all 64 bits at 0x514, starts the transfer). Firmware (SeaBIOS, OVMF) reads its
//! configuration here; test kernels written for QEMU read the RAM size and CPU count.
//!
//! Items are numbered; "files" get numbers from 0x20 up and are listed, sorted by name, in
//! the file directory (item 0x19: a big-endian count, then 64-byte entries of size, select,
//! reserved and a 56-byte name). Reads past an item's end give zeros, unknown items are empty,
//! as in QEMU. A DMA descriptor is `{control, length, address}` (big-endian u32, u32, u64) in
//! guest memory: control bits select (item in the top 16 bits), read, skip, write; when done
//! ferrovm writes control back as 0, or with the error bit for a bad address or a write (no
//! item here is writable). A transfer copies in bounded chunks whatever length the guest asks.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::BusDeviceMut;

/// Selector port; the data port is `FW_CFG_PORT + 1`, the DMA address `FW_CFG_PORT + 4`.
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports decoded: selector, data, (2 unused), DMA address high and low.
pub const FW_CFG_LEN: u64 = 12;

pub const FW_CFG_SIGNATURE: u16 = 0x00;
pub const FW_CFG_ID: u16 = 0x01;
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
pub const FW_CFG_NOGRAPHIC: u16 = 0x04;
pub const FW_CFG_NB_CPUS: u16 = 0x05;
pub const FW_CFG_BOOT_MENU: u16 = 0x0e;
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
pub const FW_CFG_FILE_DIR: u16 = 0x19;
pub const FW_CFG_FILE_FIRST: u16 = 0x20;
/// x86-specific: the IRQ0 override flag (PIT on IOAPIC pin 2).
pub const FW_CFG_IRQ0_OVERRIDE: u16 = 0x8002;

/// FW_CFG_ID bits: traditional interface, DMA interface.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;
/// What the DMA address register reads as ("QEMU CFG", big-endian).
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;
/// DMA control bits.
const DMA_ERROR: u32 = 1;
const DMA_READ: u32 = 2;
const DMA_SKIP: u32 = 4;
const DMA_SELECT: u32 = 8;
const DMA_WRITE: u32 = 0x10;
/// Longest file name, with its NUL.
const FILE_NAME_LEN: usize = 56;
/// Bytes copied per step of a DMA transfer.
const DMA_CHUNK: usize = 64 << 10;

/// Errors from adding items.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg file name '{0}' is empty, too long (55 bytes at most) or already used")]
    BadName(String),
    #[error("fw_cfg has no selector left for file '{0}'")]
    Full(String),
}

/// The fw_cfg device.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    /// name -> selector
    files: BTreeMap<String, u16>,
    mem: Option<GuestMemoryMmap>,
    selector: u16,
    offset: usize,
    dma_high: u32,
}

impl FwCfg {
    /// The device with the items every guest may read: signature, ID (traditional and, with
    /// guest memory to copy into, DMA), RAM size, CPU counts, no boot menu, the IRQ0 override.
    pub fn new(ram_size: u64, cpus: u16, mem: Option<GuestMemoryMmap>) -> Self {
        let id = ID_TRADITIONAL | if mem.is_some() { ID_DMA } else { 0 };
        let mut d = Self {
            items: BTreeMap::new(),
            files: BTreeMap::new(),
            mem,
            selector: FW_CFG_SIGNATURE,
            offset: 0,
            dma_high: 0,
        };
        d.add_item(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        d.add_item(FW_CFG_ID, id.to_le_bytes().to_vec());
        d.add_item(FW_CFG_RAM_SIZE, ram_size.to_le_bytes().to_vec());
        d.add_item(FW_CFG_NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        d.add_item(FW_CFG_NB_CPUS, cpus.to_le_bytes().to_vec());
        d.add_item(FW_CFG_MAX_CPUS, cpus.to_le_bytes().to_vec());
        d.add_item(FW_CFG_BOOT_MENU, 0u16.to_le_bytes().to_vec());
        d.add_item(FW_CFG_IRQ0_OVERRIDE, 1u32.to_le_bytes().to_vec());
        d.add_item(FW_CFG_FILE_DIR, d.directory());
        d
    }

    /// Sets numbered item `selector`.
    pub fn add_item(&mut self, selector: u16, data: Vec<u8>) {
        self.items.insert(selector, data);
    }

    /// Adds file `name` (and rebuilds the directory).
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN || self.files.contains_key(name) {
            return Err(FwCfgError::BadName(name.into()));
        }
        let sel = FW_CFG_FILE_FIRST
            .checked_add(self.files.len() as u16)
            .filter(|s| *s < 0x4000)
            .ok_or_else(|| FwCfgError::Full(name.into()))?;
        self.files.insert(name.into(), sel);
        self.items.insert(sel, data);
        let dir = self.directory();
        self.items.insert(FW_CFG_FILE_DIR, dir);
        Ok(())
    }

    /// The file directory item: big-endian count, then one entry per file sorted by name.
    fn directory(&self) -> Vec<u8> {
        let mut d = (self.files.len() as u32).to_be_bytes().to_vec();
        for (name, sel) in &self.files {
            let size = self.items.get(sel).map_or(0, Vec::len) as u32;
            d.extend_from_slice(&size.to_be_bytes());
            d.extend_from_slice(&sel.to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            d.extend_from_slice(&n);
        }
        d
    }

    fn select(&mut self, selector: u16) {
        self.selector = selector;
        self.offset = 0;
    }

    /// The current item from the current offset on (empty past its end).
    fn remaining(&self) -> &[u8] {
        let item = self
            .items
            .get(&self.selector)
            .map_or(&[][..], Vec::as_slice);
        item.get(self.offset..).unwrap_or(&[])
    }

    /// Runs the DMA descriptor at `addr`.
    fn dma(&mut self, addr: u64) {
        let Some(mem) = self.mem.clone() else { return };
        let desc = GuestAddress(addr);
        let mut raw = [0u8; 16];
        if mem.read_slice(&mut raw, desc).is_err() {
            return; // nowhere to report the error
        }
        let control = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let length = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let target = u64::from_be_bytes(raw[8..16].try_into().unwrap_or([0; 8]));
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_READ != 0 {
            self.dma_read(&mem, target, length)
        } else if control & DMA_WRITE != 0 {
            false // no writable item
        } else if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(length as usize);
            true
        } else {
            true
        };
        let status: u32 = if ok { 0 } else { DMA_ERROR };
        let _ = mem.write_slice(&status.to_be_bytes(), desc);
    }

    /// Copies `length` bytes of the current item (zeros past its end) to guest `target`.
    fn dma_read(&mut self, mem: &GuestMemoryMmap, target: u64, length: u32) -> bool {
        let zeros = [0u8; DMA_CHUNK];
        let mut done: u64 = 0;
        while done < u64::from(length) {
            let n = (u64::from(length) - done).min(DMA_CHUNK as u64) as usize;
            let src = self.remaining();
            let chunk = if src.is_empty() {
                &zeros[..n]
            } else {
                &src[..n.min(src.len())]
            };
            let len = chunk.len();
            let Some(to) = target.checked_add(done) else {
                return false;
            };
            if mem.write_slice(chunk, GuestAddress(to)).is_err() {
                return false;
            }
            self.offset = self.offset.saturating_add(len);
            done += len as u64;
        }
        true
    }
}

impl BusDeviceMut for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 => {
                for b in data.iter_mut() {
                    *b = self.remaining().first().copied().unwrap_or(0);
                    self.offset = self.offset.saturating_add(1);
                }
            }
            4..=11 if self.mem.is_some() => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(offset as usize - 4 + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 1) => self.select(u16::from(data[0])),
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (4, 4) => self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            (8, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let addr = u64::from(self.dma_high) << 32 | u64::from(low);
                self.dma_high = 0;
                self.dma(addr);
            }
            (4, 8) => {
                let addr = u64::from_be_bytes(data.try_into().unwrap_or([0; 8]));
                self.dma(addr);
            }
            _ => {}
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

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn dma(d: &mut FwCfg, m: &GuestMemoryMmap, control: u32, len: u32, target: u64) -> u32 {
        let mut desc = control.to_be_bytes().to_vec();
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&target.to_be_bytes());
        m.write_slice(&desc, GuestAddress(0x1000)).unwrap();
        d.write(4, &0u32.to_be_bytes());
        d.write(8, &0x1000u32.to_be_bytes());
        let mut st = [0u8; 4];
        m.read_slice(&mut st, GuestAddress(0x1000)).unwrap();
        u32::from_be_bytes(st)
    }

    #[test]
    fn items() {
        let mut d = FwCfg::new(64 << 20, 3, None);
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

    #[test]
    fn files_and_directory() {
        let mut d = FwCfg::new(64 << 20, 1, None);
        d.add_file("etc/zz", vec![9; 3]).unwrap();
        d.add_file("bootorder", b"/pci@i0cf8/*@2\n".to_vec())
            .unwrap();
        assert!(d.add_file("bootorder", vec![]).is_err());
        assert!(d.add_file(&"x".repeat(56), vec![]).is_err());
        let dir = read_item(&mut d, FW_CFG_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        // Sorted by name: bootorder first, selector 0x21 (added second).
        assert_eq!(&dir[4..8], &15u32.to_be_bytes());
        assert_eq!(&dir[8..10], &[0, 0x21]);
        assert_eq!(&dir[12..21], b"bootorder");
        assert_eq!(&dir[68 + 8..68 + 14], b"etc/zz");
        assert_eq!(read_item(&mut d, 0x20, 4), [9, 9, 9, 0]);
    }

    #[test]
    fn dma_select_read_skip_and_errors() {
        let m = mem();
        let mut d = FwCfg::new(64 << 20, 2, Some(m.clone()));
        assert_eq!(read_item(&mut d, FW_CFG_ID, 4), [3, 0, 0, 0]);
        let mut sig = [0u8; 8];
        d.read(4, &mut sig);
        assert_eq!(&sig, b"QEMU CFG");
        d.add_file("etc/x", (0..200u8).collect()).unwrap();
        let st = dma(&mut d, &m, 0x20 << 16 | DMA_SELECT | DMA_SKIP, 10, 0);
        assert_eq!(st, 0);
        assert_eq!(dma(&mut d, &m, DMA_READ, 300, 0x2000), 0);
        let mut got = [0u8; 300];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(got[0], 10);
        assert_eq!(got[189], 199);
        assert!(got[190..].iter().all(|b| *b == 0), "zeros past the end");
        // Writes, and reads into memory that is not there, fail with the error bit.
        assert_eq!(dma(&mut d, &m, DMA_WRITE, 4, 0x2000), DMA_ERROR);
        assert_eq!(dma(&mut d, &m, DMA_READ, 16, 0xff_fff8), DMA_ERROR);
        assert_eq!(dma(&mut d, &m, DMA_READ, u32::MAX, 0x2000), DMA_ERROR);
        // A descriptor outside memory is ignored.
        d.write(4, &[0, 0, 0, 1]);
        d.write(8, &[0; 4]);
    }
}
