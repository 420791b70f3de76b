//! Helpers shared by the ferrovm fuzz targets: a byte reader that never fails (a short input
//! reads as zeros), small guest memories, a virtqueue laid out in guest memory from fuzz
//! bytes, scratch files on tmpfs, and inert MSI/ioeventfd/interrupt back ends.
//!
//! Every target drives ferrovm's real code (the library crate at `..`) on a real
//! `GuestMemoryMmap`; nothing here re-implements a device.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Reads fields off the fuzz input; past the end every read is 0 (so any input is valid).
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }
    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[start..]
    }
    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
}

/// An access size from two bits: 1, 2, 4 or 8 bytes.
pub fn access_size(b: u8) -> usize {
    1 << (b & 3)
}

/// Guest memory for queue targets: two adjacent regions (so buffers can straddle a region
/// boundary) and a hole above them.
pub const QMEM_SPLIT: u64 = 0x2_0000;
pub const QMEM_END: u64 = 0x4_0000;
/// Where the fuzz input's data blob is copied (descriptor addresses point around here).
pub const DATA_BASE: u64 = 0x1000;

pub fn queue_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), QMEM_SPLIT as usize),
        (GuestAddress(QMEM_SPLIT), (QMEM_END - QMEM_SPLIT) as usize),
    ])
    .expect("guest memory")
}

/// The size of the fuzzed queues (descriptor table entries).
pub const QSIZE: u16 = 16;

/// Virtqueue flags as the fuzzer sets them (bit 0 NEXT, bit 1 WRITE, bit 2 INDIRECT; the
/// other bits pass through now and then).
fn desc_flags(b: u8) -> u16 {
    if b & 0x80 != 0 {
        u16::from(b)
    } else {
        u16::from(b & 7)
    }
}

/// A guest address: mostly inside the data area, sometimes anywhere (holes, past the end,
/// across the region boundary, wrapping).
fn desc_addr(inp: &mut Input) -> u64 {
    let mode = inp.u8();
    match mode & 3 {
        0 | 1 => DATA_BASE + u64::from(inp.u16()) * 4,
        2 => QMEM_SPLIT - 0x100 + u64::from(inp.u8()),
        _ => inp.u64(),
    }
}

fn desc_len(inp: &mut Input) -> u32 {
    let l = inp.u16();
    if l & 0x8000 != 0 {
        inp.u32()
    } else {
        u32::from(l)
    }
}

/// Lays a split virtqueue of [`QSIZE`] entries out at guest address 0 from fuzz bytes:
/// descriptors (addr, len, flags, next), available heads and index, then the data blob at
/// [`DATA_BASE`] (request headers, payloads and indirect tables live there). Returns the
/// mock (for the used ring) and the device-side `Queue`, or None when the driver-side layout
/// is refused by virtio-queue itself (not a device bug).
pub fn build_queue<'m>(
    mem: &'m GuestMemoryMmap,
    inp: &mut Input,
    event_idx: bool,
) -> Option<(MockSplitQueue<'m, GuestMemoryMmap>, Queue)> {
    build_queue_at(mem, inp, event_idx, 0, 0x4000)
}

/// [`build_queue`] with the rings at `base` (below [`DATA_BASE`]: 0 or 0x800) and a data
/// blob of at most `blob_max` bytes.
pub fn build_queue_at<'m>(
    mem: &'m GuestMemoryMmap,
    inp: &mut Input,
    event_idx: bool,
    base: u64,
    blob_max: usize,
) -> Option<(MockSplitQueue<'m, GuestMemoryMmap>, Queue)> {
    let vq = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
    let nd = usize::from(inp.u8() % (QSIZE as u8 + 1));
    for i in 0..nd {
        let addr = desc_addr(inp);
        let len = desc_len(inp);
        let flags = desc_flags(inp.u8());
        let next = u16::from(inp.u8()) % (QSIZE + 2);
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        vq.desc_table().store(i as u16, d).ok()?;
    }
    let navail = inp.u8() % (QSIZE as u8 + 1);
    for i in 0..navail {
        let head = u16::from(inp.u8()) % (QSIZE + 2);
        vq.avail().ring().ref_at(usize::from(i)).ok()?.store(head);
    }
    // Mostly the honest index; now and then one running ahead of the ring.
    let skew = inp.u8();
    let idx = if skew & 0xf0 == 0xf0 {
        u16::from(navail).wrapping_add(u16::from(skew & 0xf) << 8 | u16::from(skew))
    } else {
        u16::from(navail)
    };
    vq.avail().idx().store(idx);
    let blob = inp.bytes(blob_max);
    mem.write_slice(blob, GuestAddress(DATA_BASE + base * 8))
        .ok()?;
    let mut q: Queue = vq.create_queue().ok()?;
    use virtio_queue::QueueT;
    q.set_event_idx(event_idx);
    Some((vq, q))
}

/// A folder for scratch files: `$FERROVM_FUZZ_TMP`, else /dev/shm (tmpfs), else the system
/// temporary folder; one per process (libFuzzer forks and parallel jobs get their own).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("FERROVM_FUZZ_TMP")
            .map(PathBuf::from)
            .or_else(|| {
                let shm = PathBuf::from("/dev/shm");
                shm.is_dir().then_some(shm)
            })
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("ferrovm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// Writes `data` to the scratch file `name` (replacing it) and returns its path.
pub fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    let mut f = File::create(&path).expect("scratch file");
    f.write_all(data).expect("write scratch file");
    path
}

/// The inert MSI router and ioeventfd registry the virtio-pci transport needs.
pub mod fakes {
    use std::io;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use ferrovm::devices::pci::{IoEventRegistry, MsiRouter, MsiVector};

    #[derive(Default)]
    pub struct Router(std::sync::atomic::AtomicU32);
    impl MsiRouter for Router {
        fn allocate(&self) -> io::Result<MsiVector> {
            let gsi = 24 + self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(MsiVector {
                gsi,
                irqfd: EventFd::new(EFD_NONBLOCK)?,
            })
        }
        fn update(&self, _gsi: u32, _addr: u64, _data: u32, _masked: bool) -> io::Result<()> {
            Ok(())
        }
    }

    pub struct IoEvents;
    impl IoEventRegistry for IoEvents {
        fn register_event(
            &self,
            _ev: ferrovm::devices::pci::IoEvent,
            _fd: &EventFd,
        ) -> io::Result<()> {
            Ok(())
        }
        fn unregister_event(
            &self,
            _ev: ferrovm::devices::pci::IoEvent,
            _fd: &EventFd,
        ) -> io::Result<()> {
            Ok(())
        }
    }

    /// A virtio interrupt that goes nowhere.
    pub struct NoIrq;
    impl ferrovm::devices::virtio::VirtioInterrupt for NoIrq {
        fn trigger(&self, _kind: ferrovm::devices::virtio::VirtioInterruptType) -> io::Result<()> {
            Ok(())
        }
    }
}

/// Activates `dev` on `queues` (virtio index, queue) and serves them once through the
/// worker's own pass (`worker::serve_inline`) on this thread, then hands the handler back to
/// the device. No worker thread: spawning one (and installing its seccomp filter) per input
/// cost about 1 ms, twenty times the device work.
pub fn run_device_once(
    mut dev: Box<dyn ferrovm::devices::virtio::VirtioDevice>,
    mem: &GuestMemoryMmap,
    features: u64,
    queues: Vec<(u16, Queue)>,
) {
    let n = queues.len();
    let Ok(mut handler) = dev.activate(mem.clone(), features, queues) else {
        return;
    };
    let _ = ferrovm::devices::virtio::worker::serve_inline(handler.as_mut(), &fakes::NoIrq, n, 64);
    dev.deactivate(handler);
}

/// Disk-image targets: the input is an op script (`OPS` ops of 4 bytes) followed by the
/// image. The image is written to a scratch file, opened through `ferrovm::disk::open`
/// with the format forced (read-only unless the script's first byte asks for writes), and
/// the ops run through the `DiskBackend` interface the virtio-blk request path uses.
pub mod diskfuzz {
    use super::*;
    use ferrovm::disk::{DiskBackend, DiskOptions, Format};
    use vm_memory::VolatileSlice;

    pub const OPS: usize = 8;
    pub const SCRIPT_LEN: usize = 1 + OPS * 4;

    fn ranged(d: &dyn DiskBackend, sector: u16, count: u8) -> (u64, u64) {
        let size = d.size();
        let len = (u64::from(count % 129)) * 512;
        let sectors = (size / 512).max(1);
        let off = (u64::from(sector) % sectors) * 512;
        // Mostly in range (what the request path lets through); the top bit asks for an
        // unchecked range, which every backend must refuse cleanly.
        if count & 0x80 != 0 {
            (u64::from(sector) << 20, len)
        } else {
            (off, len.min(size.saturating_sub(off)))
        }
    }

    /// Runs the script against an opened disk.
    pub fn exercise(d: &dyn DiskBackend, script: &mut Input) {
        let _ = (d.path(), d.format(), d.readonly(), d.direct(), d.raw_fd());
        let mut buf = vec![0u8; 128 * 512];
        for _ in 0..OPS {
            let op = script.u8();
            let sector = script.u16();
            let count = script.u8();
            let (off, len) = ranged(d, sector, count);
            let len = len as usize;
            match op % 6 {
                0 | 1 => {
                    // Reads, as one buffer or split in two (a scattered request).
                    let (a, b) = buf[..len].split_at_mut(len / 2 & !511);
                    let bufs = if op & 1 != 0 {
                        vec![VolatileSlice::from(a), VolatileSlice::from(b)]
                    } else {
                        vec![VolatileSlice::from(&mut buf[..len])]
                    };
                    let _ = d.read_at(&bufs, off);
                }
                2 => {
                    buf[..len].fill(op);
                    let _ = d.write_at(&[VolatileSlice::from(&mut buf[..len])], off);
                }
                3 => {
                    let _ = d.write_zeroes(off, len as u64, op & 0x40 != 0);
                }
                4 => {
                    let _ = d.discard(off, len as u64);
                }
                _ => {
                    let _ = d.flush();
                }
            }
        }
        if let Some(v) = d.as_vhd() {
            let _ = (v.disk_type(), v.unique_id(), v.block_size());
            if let Some((p, _)) = v.parent() {
                let _ = p.size();
            }
        }
        if let Some(q) = d.as_qcow2() {
            let _ = q.header();
            q.with_backing(|b| b.map(|b| b.size()));
            let _ = q.check();
        }
    }

    /// The backing image a fuzzed qcow2 may name ("base.raw", next to it); created once.
    pub fn ensure_backing() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            let data: Vec<u8> = (0..64 * 1024).map(|i| (i / 512) as u8 ^ 0x5a).collect();
            scratch_file("base.raw", &data);
        });
    }

    /// Opens `image` as `format` and runs the script. qcow2 backing names other than
    /// "base.raw" are skipped: a fuzzed name must not make the harness open host files.
    pub fn run(data: &[u8], format: Format, name: &str) {
        let mut inp = Input::new(data);
        let script = inp.bytes(SCRIPT_LEN);
        let image = inp.rest();
        let mut script = Input::new(script);
        let flags = script.u8();
        let mut readonly = flags & 1 == 0;
        if format == Format::Vhd {
            if !vhd_parent_allowed(image) {
                return;
            }
            ensure_vhd_parent();
        }
        if format == Format::Qcow2 {
            if !qcow2_backing_allowed(image) {
                return;
            }
            ensure_backing();
            // Writes to 2 MiB clusters cost a lot of tmpfs per run: read-only above 64 KiB.
            if image.len() >= 24 && u32::from_be_bytes(image[20..24].try_into().unwrap()) > 16 {
                readonly = true;
            }
        }
        let path = scratch_file(name, image);
        let opts = DiskOptions {
            path: path.clone(),
            readonly,
            direct: false,
            format: Some(format),
        };
        if let Ok(d) = ferrovm::disk::open(&opts) {
            exercise(d.as_ref(), &mut script);
            drop(d);
        }
        // The probe sees the same bytes (what `format=` auto-detection does).
        if let Ok(f) = File::open(&path) {
            let _ = ferrovm::disk::probe(&f, &path);
        }
        if flags & 2 != 0 {
            let _ = ferrovm::disk::info::describe(&path, Some(format));
        }
    }

    /// What `Qcow2::open` would take as the backing name is either absent or "base.raw".
    /// The unique id of the parent a fuzzed differencing VHD may name.
    pub const VHD_PARENT_UUID: [u8; 16] = [0xa5; 16];

    /// The parent a fuzzed differencing VHD may name ("parent.vhd", next to it): a fixed
    /// VHD of 64 KiB with unique id [`VHD_PARENT_UUID`]; created once.
    pub fn ensure_vhd_parent() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            let size = 64 * 1024u64;
            let mut img: Vec<u8> = (0..size).map(|i| (i / 512) as u8 ^ 0xc3).collect();
            let mut f = [0u8; 512];
            f[..8].copy_from_slice(b"conectix");
            f[8..12].copy_from_slice(&2u32.to_be_bytes());
            f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
            f[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
            f[28..32].copy_from_slice(b"win ");
            f[40..48].copy_from_slice(&size.to_be_bytes());
            f[48..56].copy_from_slice(&size.to_be_bytes());
            f[60..64].copy_from_slice(&2u32.to_be_bytes());
            f[68..84].copy_from_slice(&VHD_PARENT_UUID);
            let sum = !f.iter().fold(0u32, |s, b| s.wrapping_add(u32::from(*b)));
            f[64..68].copy_from_slice(&sum.to_be_bytes());
            img.extend_from_slice(&f);
            scratch_file("parent.vhd", &img);
        });
    }

    /// A differencing VHD may name only "parent.vhd" (next to it): a fuzzed locator must not
    /// make the harness open host files. Checks the parent name and every locator ferrovm
    /// would follow (W2ru, W2ku, MacX) whose data lies inside the image; one outside, or
    /// too long, makes ferrovm refuse the image before it opens anything.
    fn vhd_parent_allowed(image: &[u8]) -> bool {
        let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
        let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
        let n = image.len();
        if n < 512 {
            return true;
        }
        let end = &image[n - 512..];
        let footer = if end[..8] == *b"conectix" {
            end
        } else {
            &image[..512]
        };
        if be32(footer, 60) != 4 {
            return true;
        }
        let at = usize::try_from(be64(footer, 16)).unwrap_or(usize::MAX);
        let Some(h) = image.get(at..at.saturating_add(1024)) else {
            return true;
        };
        let utf16 = |raw: &[u8], unit: fn([u8; 2]) -> u16| {
            let u: Vec<u16> = raw
                .chunks_exact(2)
                .map(|c| unit([c[0], c[1]]))
                .take_while(|u| *u != 0)
                .collect();
            String::from_utf16_lossy(&u)
        };
        let ok = |s: &str| {
            matches!(
                s,
                "" | "parent.vhd" | ".\\parent.vhd" | "file://./parent.vhd"
            )
        };
        if !ok(&utf16(&h[64..576], u16::from_be_bytes)) {
            return false;
        }
        (0..8).all(|k| {
            let e = &h[576 + 24 * k..600 + 24 * k];
            let (len, off) = (be32(e, 8) as usize, be64(e, 16));
            let off = usize::try_from(off).unwrap_or(usize::MAX);
            let Some(data) = image.get(off..off.saturating_add(len)) else {
                return true;
            };
            match &e[..4] {
                b"W2ru" | b"W2ku" => ok(&utf16(data, u16::from_le_bytes)),
                b"MacX" => {
                    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
                    ok(&String::from_utf8_lossy(&data[..end]))
                }
                _ => true,
            }
        })
    }

    fn qcow2_backing_allowed(image: &[u8]) -> bool {
        use ferrovm::disk::qcow2::header::{Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
        if image.len() < 24 {
            return true;
        }
        let bits = u32::from_be_bytes(image[20..24].try_into().unwrap());
        let cs = 1usize << bits.clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
        let first = &image[..cs.min(image.len())];
        match Header::parse(first, image.len() as u64) {
            Ok(h) => h.backing_file.as_deref().is_none_or(|n| n == "base.raw"),
            Err(_) => true,
        }
    }
}
