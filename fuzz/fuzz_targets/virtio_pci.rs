//! The virtio-pci transport and PCI configuration space: a sequence of accesses to the
//! function's configuration space (header, BAR sizing and moves, command register, the
//! virtio capabilities and the VIRTIO_PCI_CAP_PCI_CFG window, MSI-X control), to BAR 0
//! (common config: features, status, queue select/size/enable/addresses; ISR; device
//! config; notify; MSI-X table and PBA), through the function directly, CF8/CFC, ECAM and
//! the MMIO window of a real `PciRoot`. The device behind it is a real virtio-rng,
//! virtio-blk (in-memory disk) or virtio-net (in-memory backend): a driver that reaches
//! DRIVER_OK starts its worker on rings in a real `GuestMemoryMmap` whose contents come from
//! the input too.
//! Input: device byte, op count, ops (12 bytes each), then guest memory contents.
#![no_main]
use libfuzzer_sys::fuzz_target;

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use ferrovm::bus::BusDevice;
use ferrovm::devices::pci::root::{PciConfigIo, PciEcam, PciMmioWindow, PciRoot};
use ferrovm::devices::pci::{IntxLine, PciFunction};
use ferrovm::devices::virtio::block::Block;
use ferrovm::devices::virtio::net::{Net, NetBackend};
use ferrovm::devices::virtio::pci::{VirtioPci, VirtioPciDevice};
use ferrovm::devices::virtio::rng::Rng;
use ferrovm::devices::virtio::VirtioDevice;
use ferrovm::disk::mem::MemDisk;
use ferrovm_fuzz::fakes::{IoEvents, Router};
use ferrovm_fuzz::{access_size, queue_mem, Input};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct NullTap(EventFd, VecDeque<Vec<u8>>);
impl AsRawFd for NullTap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
impl NetBackend for NullTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.1.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, iov: &[&[u8]]) -> io::Result<usize> {
        Ok(iov.iter().map(|b| b.len()).sum())
    }
}

const MMIO_START: u64 = 0xc000_0000;
const SLOT: u8 = 1;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let which = inp.u8();
    let nops = usize::from(inp.u8());
    let ops = inp.bytes(nops * 12);
    let mem = queue_mem();
    let _ = mem.write_slice(inp.bytes(0x8000), GuestAddress(0));
    let dev: Box<dyn VirtioDevice> = match which % 3 {
        0 => Box::new(Rng::new()),
        1 => {
            let disk: Vec<u8> = (0..16 * 1024).map(|i| i as u8).collect();
            Box::new(Block::with_disk(Box::new(MemDisk::new("mem", disk)), Some("fuzz")).unwrap())
        }
        _ => {
            let frames = VecDeque::from(vec![vec![0xab; 60], vec![0xcd; 1514]]);
            let tap = NullTap(EventFd::new(EFD_NONBLOCK).unwrap(), frames);
            Box::new(Net::with_backend("fuzz0", [0x52, 0x54, 0, 1, 2, 3], Box::new(tap)))
        }
    };
    let pci = VirtioPciDevice::new(
        dev,
        mem.clone(),
        Arc::new(Router::default()),
        Arc::new(IoEvents),
        IntxLine::new().unwrap(),
    )
    .expect("virtio-pci device");
    let func: Arc<VirtioPci> = Arc::new(VirtioPci::new(pci));
    let mut root = PciRoot::new(MMIO_START, 0x1000_0000);
    root.insert(SLOT, func.clone()).expect("slot");
    let root = Arc::new(root);
    let (cf8, cfc) = PciConfigIo::pair(root.clone());
    let ecam = PciEcam::new(root.clone());
    let window = PciMmioWindow::new(root.clone());

    let mut ops = Input::new(ops);
    while !ops.is_empty() {
        let kind = ops.u8();
        let target = ops.u8();
        let offset = ops.u16();
        let value = ops.u64().to_le_bytes();
        let size = access_size(kind >> 4);
        let write = kind & 0x40 != 0;
        let mut buf = [0u8; 8];
        // Configuration register: mostly the 256-byte header, sometimes extended space.
        let reg = if offset & 0x8000 != 0 {
            offset & 0xfff
        } else {
            offset & 0xff
        };
        // BAR offset: a 4 KiB structure (common, ISR, device, notify, MSI-X table, PBA, ...)
        // and a byte offset inside it.
        let bar_off = u64::from(offset >> 8 & 7) * 0x1000 + u64::from(offset & 0xff);
        match kind & 7 {
            0 | 1 => {
                if write {
                    func.config_write(reg, &value[..size]);
                } else {
                    func.config_read(reg, &mut buf[..size]);
                }
            }
            2 | 3 => {
                let bar = if target & 0x80 != 0 { usize::from(target & 7) } else { 0 };
                if write {
                    func.bar_write(bar, bar_off, &value[..size]);
                } else {
                    func.bar_read(bar, bar_off, &mut buf[..size]);
                }
            }
            4 => {
                // CONFIG_ADDRESS, then CONFIG_DATA at 0xcfc + (offset & 3).
                let dev = if target & 0x80 != 0 { target & 0x1f } else { SLOT };
                let addr = 0x8000_0000u32
                    | u32::from(target >> 5 & 1) << 16
                    | u32::from(dev) << 11
                    | u32::from(offset >> 8 & 7) << 8
                    | u32::from(offset & 0xfc);
                cf8.write(0, &addr.to_le_bytes());
                let port = u64::from(offset >> 11 & 3);
                if write {
                    cfc.write(port, &value[..size]);
                } else {
                    cfc.read(port, &mut buf[..size]);
                }
                if target & 0x40 != 0 {
                    cf8.read(0, &mut buf[..4]);
                }
            }
            5 => {
                let dev = if target & 0x80 != 0 { u64::from(target & 0x1f) } else { u64::from(SLOT) };
                let off = dev << 15 | u64::from(target >> 5 & 1) << 20 | u64::from(reg);
                if write {
                    ecam.write(off, &value[..size]);
                } else {
                    ecam.read(off, &mut buf[..size]);
                }
            }
            6 => {
                // Wherever the guest moved BAR 0 (or anywhere in the window).
                let base = if target & 0x80 != 0 {
                    u64::from(target & 0x7f) << 16
                } else {
                    func.decoded_bars()
                        .first()
                        .map_or(0, |b| b.addr.saturating_sub(MMIO_START))
                };
                let off = base.saturating_add(bar_off);
                if write {
                    window.write(off, &value[..size]);
                } else {
                    window.read(off, &mut buf[..size]);
                }
            }
            _ => {
                // Firmware-style BAR assignment.
                func.assign_bar(usize::from(target & 7), u64::from_le_bytes(value) & !0xfff);
                let _ = func.bar_specs();
            }
        }
    }
});
