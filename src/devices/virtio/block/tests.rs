//! Device-level tests: option parsing, config space, and requests from a (hostile) driver
//! built in real guest memory with `MockSplitQueue` (no KVM).

use std::cell::Cell;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::devices::virtio::{ActiveQueue, Runner, VirtioInterrupt, VirtioInterruptType};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 4 << 20;
const DISK_SIZE: usize = 1 << 20;
const USED: u64 = 0x8000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x1f0000;
/// Region boundary for the two-region guest memory.
const SPLIT: u64 = 2 << 20;

thread_local! {
    /// Whether `handler` gives this test thread the io_uring back end.
    static USE_URING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `test` with every request served through `UringQueueHandler`.
fn with_uring(test: fn()) {
    USE_URING.with(|u| u.set(true));
    test();
}

/// The request path under test: synchronous, or io_uring inside `with_uring`.
enum TestHandler {
    Sync(QueueHandler),
    Uring(Box<UringQueueHandler>),
}

impl TestHandler {
    fn process_queue(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, QueueError> {
        match self {
            TestHandler::Sync(h) => h.process_queue(mem, q),
            TestHandler::Uring(h) => h.process_queue(mem, q),
        }
    }
}

fn handler(blk: &Block) -> TestHandler {
    if USE_URING.with(Cell::get) {
        TestHandler::Uring(Box::new(
            UringQueueHandler::new(blk.queue_handler()).expect("io_uring setup"),
        ))
    } else {
        TestHandler::Sync(blk.queue_handler())
    }
}

/// Worker threads (by name) whose io_uring setup fails, to exercise the fallback.
static FAIL_URING_SETUP: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The worker's io_uring setup in tests (see `FAIL_URING_SETUP`).
pub(super) fn setup_ring() -> std::io::Result<io_uring::IoUring> {
    let me = std::thread::current().name().map(str::to_string);
    if me.is_some_and(|n| FAIL_URING_SETUP.lock().unwrap().contains(&n)) {
        return Err(std::io::Error::from_raw_os_error(libc::EPERM));
    }
    super::uring::setup_ring()
}

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), SPLIT as usize),
        (GuestAddress(SPLIT), MEM_SIZE - SPLIT as usize),
    ])
    .unwrap()
}

/// Byte `i` of the test image.
fn pattern(i: usize) -> u8 {
    (i / 512) as u8 ^ (i as u8).wrapping_mul(7)
}

fn image() -> TempFile {
    let t = TempFile::new_with_prefix("/var/tmp/ferrovm-blk-test").unwrap();
    let data: Vec<u8> = (0..DISK_SIZE).map(pattern).collect();
    t.as_file().write_all(&data).unwrap();
    t
}

fn device(t: &TempFile, readonly: bool, serial: Option<&str>) -> Block {
    Block::new(&DiskConfig {
        readonly,
        serial: serial.map(str::to_string),
        ..DiskConfig::new(t.as_path())
    })
    .unwrap()
}

#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: false,
    }
}

fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: true,
    }
}

/// The driver side of one split queue at guest address 0.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(0), size),
            size,
            next_desc: 0,
        }
    }

    /// The device's view of the queue. The used ring is placed at `USED` because
    /// `MockSplitQueue` (virtio-queue 0.18) puts it inside the available ring for sizes > 2
    /// (`SplitQueueRing::end` adds the element count, not the byte size).
    fn queue(&self) -> Queue {
        let mut q = self.vq.create_queue::<Queue>().unwrap();
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q
    }

    fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.vq
            .desc_table()
            .store(
                index,
                RawDescriptor::from(SplitDesc::new(addr, len, flags, next)),
            )
            .unwrap();
    }

    /// Writes a properly linked chain and makes it available; returns the head.
    fn push(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 } as u16;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store(idx, d.addr, d.len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.make_available(head);
        head
    }

    fn make_available(&self, head: u16) {
        let avail = self.vq.avail_addr();
        let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
        let slot = 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, avail.unchecked_add(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED).unchecked_add(2))
            .unwrap()
    }

    /// (id, len) of used element `i`.
    fn used(&self, i: u16) -> (u32, u32) {
        let base = GuestAddress(USED + 4 + 8 * u64::from(i % self.size));
        (
            self.mem.read_obj(base).unwrap(),
            self.mem.read_obj(base.unchecked_add(4)).unwrap(),
        )
    }

    /// Sets `used_event` (EVENT_IDX: interrupt me when used idx passes this).
    fn set_used_event(&self, v: u16) {
        let off = 4 + 2 * u64::from(self.size);
        self.mem
            .write_obj(v, self.vq.avail_addr().unchecked_add(off))
            .unwrap();
    }
}

fn header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn read_mem(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn file_bytes(t: &TempFile, off: usize, len: usize) -> Vec<u8> {
    std::fs::read(t.as_path()).unwrap()[off..off + len].to_vec()
}

/// Runs one request through the device's handler; returns (used len, status byte).
fn run(blk: &Block, mem: &GuestMemoryMmap, descs: &[D]) -> (u32, u8) {
    let mut drv = Driver::new(mem, 16);
    let mut q = drv.queue();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = drv.push(descs);
    handler(blk).process_queue(mem, &mut q).unwrap();
    assert_eq!(drv.used_idx(), 1, "request must be completed");
    let (id, len) = drv.used(0);
    assert_eq!(id, u32::from(head));
    (len, status(mem))
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const UNTOUCHED: u8 = 0xff;

// ---- option parser ----

#[test]
fn parse_full_option() {
    let c = parse_disk_option("path=/img/a.raw,readonly=on,serial=abc,direct=on").unwrap();
    assert_eq!(
        c,
        DiskConfig {
            readonly: true,
            serial: Some("abc".into()),
            direct: true,
            ..DiskConfig::new("/img/a.raw")
        }
    );
    let c = parse_disk_option("path=x.img").unwrap();
    assert!(!c.readonly && !c.direct && c.serial.is_none());
    assert!(!parse_disk_option("readonly=off,path=x").unwrap().readonly);
    assert_eq!(
        parse_disk_option("path=x,bootindex=0").unwrap().bootindex,
        Some(0)
    );
}

#[test]
fn parse_rejects_bad_options() {
    use DiskOptionError as E;
    let e = |s| parse_disk_option(s).unwrap_err();
    assert!(matches!(e("readonly=on"), E::MissingPath { .. }));
    assert!(matches!(e(""), E::Malformed { .. }));
    assert!(matches!(e("path="), E::EmptyPath { .. }));
    assert!(matches!(e("path=a,"), E::Malformed { .. }));
    assert!(matches!(e("path=a,ro=on"), E::UnknownKey { key, .. } if key == "ro"));
    assert!(matches!(e("path=a,readonly"), E::Malformed { .. }));
    assert!(matches!(e("path=a,readonly=yes"), E::InvalidSwitch { .. }));
    assert!(matches!(e("path=a,direct=1"), E::InvalidSwitch { .. }));
    assert!(matches!(e("path=a,path=b"), E::DuplicateKey { .. }));
    assert!(matches!(
        e("path=a,readonly=on,readonly=off"),
        E::DuplicateKey { .. }
    ));
    let long = e("path=a,serial=123456789012345678901");
    assert!(matches!(long, E::SerialTooLong { len: 21, .. }));
    assert!(long.to_string().contains("20"));
    assert!(parse_disk_option("path=a,serial=12345678901234567890").is_ok());
    assert!(e("path=a,bogus=1").to_string().contains("bogus"));
    for bad in ["-1", "65536", "x", ""] {
        let opt = format!("path=a,bootindex={bad}");
        assert!(matches!(
            parse_disk_option(&opt).unwrap_err(),
            E::BadBootIndex { .. }
        ));
    }
}

// ---- device identity and config space ----

#[test]
fn features_depend_on_readonly() {
    let t = image();
    let bit = |b: u32| 1u64 << b;
    let rw = device(&t, false, None);
    assert_eq!(rw.device_type(), 2);
    assert_eq!(rw.queue_max_sizes(), &[256]);
    let f = rw.features();
    for b in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_F_RING_EVENT_IDX, 0);
    assert_ne!(f & VIRTIO_F_RING_INDIRECT_DESC, 0);
    assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
    drop(rw);

    let ro = device(&t, true, None);
    let f = ro.features();
    assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn config_layout_matches_virtio_blk_config() {
    use std::mem::offset_of;
    type C = virtio_blk_config;
    let t = image();
    let blk = device(&t, false, None);
    let u32_at = |off: usize| {
        let mut b = [0u8; 4];
        blk.read_config(off as u64, &mut b);
        u32::from_le_bytes(b)
    };
    let mut cap = [0u8; 8];
    blk.read_config(offset_of!(C, capacity) as u64, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_SIZE / 512) as u64);
    assert_eq!(u32_at(offset_of!(C, size_max)), SIZE_MAX);
    assert_eq!(u32_at(offset_of!(C, seg_max)), SEG_MAX);
    assert_eq!(u32_at(offset_of!(C, blk_size)), 512);
    assert_eq!(
        u32_at(offset_of!(C, max_discard_sectors)),
        MAX_DISCARD_SECTORS
    );
    assert_eq!(u32_at(offset_of!(C, max_discard_seg)), 1);
    assert_eq!(
        u32_at(offset_of!(C, discard_sector_alignment)),
        DISCARD_SECTOR_ALIGNMENT
    );
    assert_eq!(
        u32_at(offset_of!(C, max_write_zeroes_sectors)),
        MAX_WRITE_ZEROES_SECTORS
    );
    assert_eq!(u32_at(offset_of!(C, max_write_zeroes_seg)), 1);
    let mut b = [0u8; 1];
    blk.read_config(offset_of!(C, write_zeroes_may_unmap) as u64, &mut b);
    assert_eq!(b[0], 1);
    assert_eq!(offset_of!(C, max_secure_erase_sectors), CONFIG_SIZE);
}

#[test]
fn config_reads_out_of_range_are_zero() {
    let t = image();
    let mut blk = device(&t, false, None);
    let mut b = [0xaau8; 8];
    blk.read_config(CONFIG_SIZE as u64 - 2, &mut b);
    assert_eq!(b[..2], [0, 0]); // padding bytes
    assert_eq!(b[2..], [0; 6]);
    let mut b = [0xaau8; 16];
    blk.read_config(u64::MAX - 3, &mut b);
    assert_eq!(b, [0; 16]);
    blk.read_config(1, &mut b); // unaligned inside
    assert_eq!(b[..7], ((DISK_SIZE / 512) as u64).to_le_bytes()[1..]);
    blk.read_config(0, &mut []);
    blk.write_config(0, &[1, 2, 3]);
    let mut cap = [0u8; 8];
    blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_SIZE / 512) as u64);
}

#[test]
fn serial_too_long_for_device() {
    let t = image();
    let disk = open_disk(&DiskConfig::new(t.as_path())).unwrap();
    assert!(matches!(
        Block::with_disk(disk, Some("x".repeat(21).as_str())),
        Err(BlockError::SerialTooLong { .. })
    ));
}

// ---- well-formed requests ----

#[test]
fn read_fills_guest_buffers() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    let (len, st) = run(
        &blk,
        &mem,
        &[
            r(HDR, 16),
            w(DATA, 1024),
            w(DATA + 0x1000, 512),
            w(STATUS, 1),
        ],
    );
    assert_eq!((len, st), (1536 + 1, OK));
    assert_eq!(read_mem(&mem, DATA, 1024), file_bytes(&t, 3 * 512, 1024));
    assert_eq!(
        read_mem(&mem, DATA + 0x1000, 512),
        file_bytes(&t, 5 * 512, 512)
    );
    let s = blk.stats();
    assert_eq!(
        (s.reads, s.bytes_read, s.invalid, s.errors),
        (1, 1536, 0, 0)
    );
}

#[test]
fn write_reaches_the_file() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 10);
    mem.write_slice(&[0x5a; 2048], GuestAddress(DATA)).unwrap();
    let (len, st) = run(&blk, &mem, &[r(HDR, 16), r(DATA, 2048), w(STATUS, 1)]);
    assert_eq!((len, st), (1, OK));
    assert_eq!(file_bytes(&t, 10 * 512, 2048), vec![0x5a; 2048]);
    assert_eq!(
        file_bytes(&t, 9 * 512, 512),
        (9 * 512..10 * 512).map(pattern).collect::<Vec<_>>()
    );
    let s = blk.stats();
    assert_eq!((s.writes, s.bytes_written), (1, 2048));
}

#[test]
fn buffers_may_cross_memory_regions_and_share_descriptors() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    // Header, data and status in one device-readable + one device-writable descriptor,
    // the data buffer straddling the region boundary.
    let start = SPLIT - 700;
    header(&mem, start - 16, VIRTIO_BLK_T_IN, 1);
    let (len, st) = {
        let mut drv = Driver::new(&mem, 16);
        let mut q = drv.queue();
        drv.push(&[r(start - 16, 16), w(start, 1024 + 1)]);
        handler(&blk).process_queue(&mem, &mut q).unwrap();
        let (_, len) = drv.used(0);
        (len, read_mem(&mem, start + 1024, 1)[0])
    };
    assert_eq!((len, st), (1025, OK));
    assert_eq!(read_mem(&mem, start, 1024), file_bytes(&t, 512, 1024));
}

#[test]
fn flush_get_id_and_unsupported() {
    let t = image();
    let blk = device(&t, false, Some("disk-0042"));
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&blk, &mem, &[r(HDR, 16), w(STATUS, 1)]), (1, OK));

    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), w(DATA, 32), w(STATUS, 1)]),
        (21, OK)
    );
    let mut want = b"disk-0042".to_vec();
    want.resize(20, 0);
    want.extend_from_slice(&[0xee; 12]);
    assert_eq!(read_mem(&mem, DATA, 32), want);
    // A short ID buffer gets a truncated ID.
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), w(DATA, 4), w(STATUS, 1)]),
        (5, OK)
    );

    header(&mem, HDR, 0x1234, 0);
    assert_eq!(run(&blk, &mem, &[r(HDR, 16), w(STATUS, 1)]), (1, UNSUPP));
    let s = blk.stats();
    assert_eq!((s.flushes, s.get_ids, s.other, s.unsupported), (1, 2, 1, 1));
}

fn discard_seg(mem: &GuestMemoryMmap, sector: u64, num: u32, flags: u32) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&b, GuestAddress(DATA)).unwrap();
}

#[test]
fn discard_and_write_zeroes_zero_the_range() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    let req = [r(HDR, 16), r(DATA, 16), w(STATUS, 1)];

    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    discard_seg(&mem, 8, 8, 0);
    assert_eq!(run(&blk, &mem, &req), (1, OK));
    assert_eq!(file_bytes(&t, 4096, 4096), vec![0; 4096]);

    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_seg(&mem, 20, 3, 0);
    assert_eq!(run(&blk, &mem, &req), (1, OK));
    assert_eq!(file_bytes(&t, 20 * 512, 1536), vec![0; 1536]);
    discard_seg(&mem, 30, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(run(&blk, &mem, &req), (1, OK));
    assert_eq!(file_bytes(&t, 30 * 512, 1024), vec![0; 1024]);
    // Neighbours untouched, size unchanged.
    assert_eq!(
        file_bytes(&t, 29 * 512, 512),
        (29 * 512..30 * 512).map(pattern).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::metadata(t.as_path()).unwrap().len(),
        DISK_SIZE as u64
    );

    // Discard with the unmap flag, unknown write-zeroes flags: UNSUPP.
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    discard_seg(&mem, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(run(&blk, &mem, &req), (1, UNSUPP));
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_seg(&mem, 0, 1, 2);
    assert_eq!(run(&blk, &mem, &req), (1, UNSUPP));
    // Past the end, too many sectors, two segments: IOERR.
    discard_seg(&mem, (DISK_SIZE / 512) as u64, 1, 0);
    assert_eq!(run(&blk, &mem, &req), (1, IOERR));
    discard_seg(&mem, 0, MAX_WRITE_ZEROES_SECTORS + 1, 0);
    assert_eq!(run(&blk, &mem, &req), (1, IOERR));
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), r(DATA, 32), w(STATUS, 1)]),
        (1, IOERR)
    );
    let s = blk.stats();
    assert_eq!((s.discards, s.write_zeroes), (2, 6));
}

#[test]
fn readonly_disk_refuses_writes() {
    let t = image();
    let blk = device(&t, true, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
        (1, IOERR)
    );
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, HDR, kind, 0);
        discard_seg(&mem, 0, 1, 0);
        assert_eq!(
            run(&blk, &mem, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)]),
            (1, IOERR)
        );
    }
    assert_eq!(
        file_bytes(&t, 0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (513, OK)
    );
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&blk, &mem, &[r(HDR, 16), w(STATUS, 1)]), (1, OK));
    assert_eq!(blk.stats().errors, 3);
}

#[test]
fn indirect_descriptors() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    let table = 0xc000u64;
    let descs = [
        SplitDesc::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDesc::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        ),
        SplitDesc::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    header(&mem, HDR, VIRTIO_BLK_T_IN, 7);
    let drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    drv.store(0, table, 48, VRING_DESC_F_INDIRECT as u16, 0);
    drv.make_available(0);
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used(0), (0, 513));
    assert_eq!(status(&mem), OK);
    assert_eq!(read_mem(&mem, DATA, 512), file_bytes(&t, 7 * 512, 512));
}

// ---- hostile driver ----

#[test]
fn data_outside_guest_memory_is_ioerr() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let beyond = MEM_SIZE as u64 + 0x1000;
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), w(beyond, 512), w(STATUS, 1)]),
        (1, IOERR)
    );
    // Partly inside.
    assert_eq!(
        run(
            &blk,
            &mem,
            &[r(HDR, 16), w(MEM_SIZE as u64 - 256, 512), w(STATUS, 1)]
        ),
        (1, IOERR)
    );
    // Wrapping the address space.
    assert_eq!(
        run(
            &blk,
            &mem,
            &[r(HDR, 16), w(u64::MAX - 100, 512), w(STATUS, 1)]
        ),
        (1, IOERR)
    );
    // Header outside memory.
    assert_eq!(
        run(&blk, &mem, &[r(beyond, 16), w(DATA, 512), w(STATUS, 1)]),
        (1, IOERR)
    );
    assert_eq!(blk.stats().invalid, 4);
}

#[test]
fn status_outside_guest_memory_completes_with_len_0() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let mut drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    drv.push(&[r(HDR, 16), r(DATA, 512), w(MEM_SIZE as u64, 1)]);
    drv.push(&[r(HDR, 16), r(DATA, 512), w(u64::MAX, 1)]);
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used_idx(), 2);
    assert_eq!(drv.used(0).1, 0);
    assert_eq!(drv.used(1).1, 0);
    assert_eq!(blk.stats().bytes_written, 0);
}

#[test]
fn no_room_for_status() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let mut drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    drv.push(&[r(HDR, 16), r(DATA, 512)]); // no writable descriptor at all
    drv.push(&[r(HDR, 16), r(DATA, 512), w(STATUS, 0)]); // zero-length status
    drv.push(&[w(STATUS, 1), r(HDR, 16)]); // status not last / not writable
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used_idx(), 3);
    for i in 0..3 {
        assert_eq!(drv.used(i).1, 0);
    }
    assert_eq!(
        file_bytes(&t, 0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
    assert_eq!(blk.stats().invalid, 3);
}

#[test]
fn zero_length_descriptors_are_skipped() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    let (len, st) = run(
        &blk,
        &mem,
        &[
            r(0, 0),
            r(HDR, 16),
            w(0xdead_0000_0000, 0),
            w(DATA, 512),
            w(DATA + 4096, 0),
            w(STATUS, 1),
        ],
    );
    assert_eq!((len, st), (513, OK));
    assert_eq!(read_mem(&mem, DATA, 512), file_bytes(&t, 1024, 512));
    // Nothing but zero-length descriptors.
    let mut drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    drv.push(&[r(HDR, 0), w(STATUS, 0)]);
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used(0), (0, 0));
}

#[test]
fn looping_and_dangling_chains() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    // 0 -> 1 -> 0 -> ...
    drv.store(0, HDR, 16, next, 1);
    drv.store(1, STATUS, 1, wr | next, 0);
    drv.make_available(0);
    // 2 -> 2 (self loop, all writable)
    drv.store(2, STATUS, 1, wr | next, 2);
    drv.make_available(2);
    // 3 -> 200 (past the table)
    drv.store(3, HDR, 16, next, 200);
    drv.make_available(3);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used_idx(), 3);
    assert_eq!(drv.used(0), (0, 0));
    assert_eq!(drv.used(1), (2, 0));
    assert_eq!(drv.used(2), (3, 0));
    assert_eq!(status(&mem), UNTOUCHED);
    assert_eq!(blk.stats().invalid, 3);
}

#[test]
fn huge_indirect_table_is_bounded() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    // 4000 chained 1-byte readable descriptors in an indirect table; then a status.
    let table = 0x100000u64;
    let n = 4000u16;
    for i in 0..n {
        let d = if i + 1 == n {
            SplitDesc::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0)
        } else {
            SplitDesc::new(DATA, 1, VRING_DESC_F_NEXT as u16, i + 1)
        };
        mem.write_obj(
            RawDescriptor::from(d),
            GuestAddress(table + 16 * u64::from(i)),
        )
        .unwrap();
    }
    let drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    drv.store(0, table, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16, 0);
    drv.make_available(0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used(0), (0, 0));
    assert_eq!(status(&mem), UNTOUCHED);
}

#[test]
fn too_many_or_too_large_segments() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // SEG_MAX + 1 data segments of 512 bytes, in a 256-entry queue.
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..=SEG_MAX as u64).map(|i| w(DATA + 512 * i, 512)));
    descs.push(w(STATUS, 1));
    let mut drv = Driver::new(&mem, 256);
    let mut q = drv.queue();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    drv.push(&descs);
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used(0).1, 1);
    assert_eq!(status(&mem), IOERR);
    // Exactly SEG_MAX is fine.
    descs.remove(1);
    drv.push(&descs);
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used(1).1, SEG_MAX * 512 + 1);
    assert_eq!(status(&mem), OK);
    // One segment larger than SIZE_MAX.
    assert_eq!(
        run(
            &blk,
            &mem,
            &[r(HDR, 16), w(0x100000, DESC_LEN_MAX + 512), w(STATUS, 1)]
        ),
        (1, IOERR)
    );
}

#[test]
fn wrong_directions() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    // OUT whose data is device-writable.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (1, IOERR)
    );
    // IN whose data is device-readable.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
        (1, IOERR)
    );
    // Readable after writable.
    assert_eq!(
        run(
            &blk,
            &mem,
            &[r(HDR, 16), w(DATA, 512), r(DATA + 4096, 512), w(STATUS, 1)]
        ),
        (1, IOERR)
    );
    // Header device-writable: no readable bytes at all.
    assert_eq!(
        run(&blk, &mem, &[w(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (1, IOERR)
    );
    assert_eq!(
        file_bytes(&t, 0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
    assert_eq!(blk.stats().invalid, 4);
}

#[test]
fn short_header() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 15), w(DATA, 512), w(STATUS, 1)]),
        (1, IOERR)
    );
    // A header split over several descriptors is fine.
    assert_eq!(
        run(
            &blk,
            &mem,
            &[r(HDR, 5), r(HDR + 5, 11), w(DATA, 512), w(STATUS, 1)]
        ),
        (513, OK)
    );
}

#[test]
fn out_of_range_sectors_and_lengths() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    let sectors = (DISK_SIZE / 512) as u64;
    for (kind, sector, len) in [
        (VIRTIO_BLK_T_OUT, sectors, 512),         // just past the end
        (VIRTIO_BLK_T_OUT, sectors - 1, 1024),    // straddling the end
        (VIRTIO_BLK_T_OUT, u64::MAX, 512),        // sector * 512 overflows
        (VIRTIO_BLK_T_OUT, u64::MAX / 512, 1024), // offset + len overflows
        (VIRTIO_BLK_T_IN, sectors, 512),
        (VIRTIO_BLK_T_IN, 0, 100), // not a whole sector
        (VIRTIO_BLK_T_OUT, 0, 513),
    ] {
        header(&mem, HDR, kind, sector);
        let data = if kind == VIRTIO_BLK_T_IN {
            w(DATA, len)
        } else {
            r(DATA, len)
        };
        assert_eq!(
            run(&blk, &mem, &[r(HDR, 16), data, w(STATUS, 1)]),
            (1, IOERR),
            "kind {kind} sector {sector} len {len}"
        );
    }
    assert_eq!(
        std::fs::metadata(t.as_path()).unwrap().len(),
        DISK_SIZE as u64
    );
    // The last sector itself is fine.
    header(&mem, HDR, VIRTIO_BLK_T_IN, sectors - 1);
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (513, OK)
    );
    let s = blk.stats();
    assert_eq!((s.invalid, s.bytes_read, s.bytes_written), (7, 512, 0));
}

#[test]
fn bad_head_index_is_skipped() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let mut drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    drv.make_available(999);
    let head = drv.push(&[r(HDR, 16), w(STATUS, 1)]);
    handler(&blk).process_queue(&mem, &mut q).unwrap();
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0), (u32::from(head), 1));
    assert_eq!(blk.stats().invalid, 1);
}

#[test]
fn corrupt_avail_index_is_a_queue_error() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    let drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    mem.write_obj(100u16, drv.vq.avail_addr().unchecked_add(2))
        .unwrap();
    assert!(matches!(
        handler(&blk).process_queue(&mem, &mut q),
        Err(QueueError::AvailRing(_))
    ));
}

#[test]
fn event_idx_suppresses_interrupts() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let mut drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    q.set_event_idx(true);
    let mut h = handler(&blk);
    // No work: no interrupt.
    assert!(!h.process_queue(&mem, &mut q).unwrap());
    // The driver wants an interrupt only after used idx passes 5.
    drv.set_used_event(5);
    drv.push(&[r(HDR, 16), w(STATUS, 1)]);
    assert!(!h.process_queue(&mem, &mut q).unwrap());
    drv.set_used_event(1);
    drv.push(&[r(HDR, 16), w(STATUS, 1)]);
    assert!(h.process_queue(&mem, &mut q).unwrap());
    // With EVENT_IDX the device publishes avail_event = next_avail when re-enabling.
    let off = 4 + 8 * 16;
    let avail_event: u16 = mem.read_obj(GuestAddress(USED).unchecked_add(off)).unwrap();
    assert_eq!(avail_event, 2);
}

#[test]
fn invalid_queue_sizes_are_refused_by_virtio_queue() {
    let mem = guest_mem();
    let drv = Driver::new(&mem, 256);
    let mut q = drv.queue();
    assert!(q.try_set_size(100).is_err());
    assert!(q.try_set_size(512).is_err());
    assert!(q.try_set_size(0).is_err());
    q.set_size(100); // logged and ignored
    assert_eq!(q.size(), 256);
    assert!(q.is_valid(&mem));
    q.set_ready(false);
    assert!(!q.is_valid(&mem));
}

// ---- activation, worker, reset ----

#[derive(Default)]
struct TestInterrupt {
    events: Mutex<Vec<VirtioInterruptType>>,
}

impl VirtioInterrupt for TestInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        self.events.lock().unwrap().push(kind);
        Ok(())
    }
}

impl TestInterrupt {
    fn count(&self, kind: VirtioInterruptType) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|k| **k == kind)
            .count()
    }
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(5), "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn active_queue(q: Queue) -> (ActiveQueue, EventFd) {
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let driver_side = kick.try_clone().unwrap();
    (
        ActiveQueue {
            index: 0,
            queue: q,
            kick,
        },
        driver_side,
    )
}

#[test]
fn reset_without_activate_is_none() {
    let t = image();
    let mut blk = Runner::new(Box::new(device(&t, false, None)));
    assert!(blk.reset().is_none());
    assert!(!blk.needs_reset());
}

#[test]
fn worker_serves_kicks_and_survives_reactivation() {
    let t = image();
    let mut blk = Runner::new(Box::new(device(&t, false, None)));
    let mem = guest_mem();
    let irq = Arc::new(TestInterrupt::default());
    header(&mem, HDR, VIRTIO_BLK_T_IN, 4);

    for round in 0..3u16 {
        // A fresh driver each round, as after `rmmod virtio_blk; insmod virtio_blk`.
        mem.write_slice(&vec![0u8; 0x3000], GuestAddress(0))
            .unwrap();
        let mut drv = Driver::new(&mem, 64);
        let (aq, kick) = active_queue(drv.queue());
        let acked = blk.device().features() & !VIRTIO_F_RING_EVENT_IDX;
        blk.activate(mem.clone(), acked, vec![aq], irq.clone())
            .unwrap();
        assert!(matches!(
            blk.activate(mem.clone(), acked, vec![], irq.clone()),
            Err(ActivateError::AlreadyActive)
        ));
        for i in 0..4u16 {
            drv.push(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
            kick.write(1).unwrap();
            wait_for(|| drv.used_idx() == i + 1);
            assert_eq!(drv.used(i).1, 513);
        }
        assert_eq!(read_mem(&mem, DATA, 512), file_bytes(&t, 2048, 512));
        wait_for(|| irq.count(VirtioInterruptType::Queue(0)) >= 4 * (round as usize + 1));
        let kicks = blk.reset().expect("was active");
        assert_eq!(kicks.len(), 1);
        assert!(blk.reset().is_none());
    }
    assert_eq!(blk.device().stats().reads, 12);
    assert_eq!(irq.count(VirtioInterruptType::Config), 0);
}

#[test]
fn worker_serves_requests_queued_before_activation() {
    let t = image();
    let mut blk = Runner::new(Box::new(device(&t, false, None)));
    let mem = guest_mem();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let mut drv = Driver::new(&mem, 16);
    drv.push(&[r(HDR, 16), w(STATUS, 1)]);
    let (aq, _kick) = active_queue(drv.queue());
    let irq = Arc::new(TestInterrupt::default());
    blk.activate(mem.clone(), blk.device().features(), vec![aq], irq)
        .unwrap();
    wait_for(|| drv.used_idx() == 1);
    assert!(blk.reset().is_some());
}

#[test]
fn invalid_queue_at_activation_needs_reset() {
    let t = image();
    let mut blk = Runner::new(Box::new(device(&t, false, None)));
    let mem = guest_mem();
    let irq = Arc::new(TestInterrupt::default());
    let drv = Driver::new(&mem, 16);
    let mut q = drv.queue();
    q.set_used_ring_address(Some(0), Some(0x10)); // 64 GiB: outside guest memory
    let (aq, _kick) = active_queue(q);
    let err = blk
        .activate(mem.clone(), blk.device().features(), vec![aq], irq.clone())
        .unwrap_err();
    assert!(matches!(err, ActivateError::InvalidQueue { index: 0 }));
    assert!(blk.needs_reset());
    // The transport raises the configuration interrupt for a failed activation (pci tests).
    assert_eq!(irq.count(VirtioInterruptType::Config), 0);
    // The kick eventfd comes back on reset, which clears the condition.
    assert_eq!(blk.reset().map(|k| k.len()), Some(1));
    assert!(!blk.needs_reset());

    // A queue the driver never enabled.
    let mut q = drv.queue();
    q.set_ready(false);
    let (aq, _kick) = active_queue(q);
    assert!(blk
        .activate(mem.clone(), blk.device().features(), vec![aq], irq.clone())
        .is_err());
    assert_eq!(blk.reset().map(|k| k.len()), Some(1));

    // Wrong queue count: error, kicks still returned.
    let (a, _k1) = active_queue(drv.queue());
    let (b, _k2) = active_queue(drv.queue());
    assert!(matches!(
        blk.activate(
            mem.clone(),
            blk.device().features(),
            vec![a, b],
            irq.clone()
        ),
        Err(ActivateError::QueueCount { got: 2, want: 1 })
    ));
    assert_eq!(blk.reset().map(|k| k.len()), Some(2));
}

#[test]
fn corrupt_ring_while_running_needs_reset() {
    let t = image();
    let mut blk = Runner::new(Box::new(device(&t, false, None)));
    let mem = guest_mem();
    let irq = Arc::new(TestInterrupt::default());
    let drv = Driver::new(&mem, 16);
    let (aq, kick) = active_queue(drv.queue());
    blk.activate(mem.clone(), blk.device().features(), vec![aq], irq.clone())
        .unwrap();
    mem.write_obj(1000u16, drv.vq.avail_addr().unchecked_add(2))
        .unwrap();
    kick.write(1).unwrap();
    wait_for(|| blk.needs_reset());
    wait_for(|| irq.count(VirtioInterruptType::Config) == 1);
    // Further kicks are ignored without spinning; reset recovers.
    kick.write(1).unwrap();
    assert_eq!(blk.reset().map(|k| k.len()), Some(1));
    assert!(!blk.needs_reset());
}

#[test]
fn worker_thread_is_named() {
    let t = image();
    let blk = device(&t, false, None);
    assert!(blk.name().starts_with("virtio-blk-"));
}

#[test]
fn direct_io_aligned_and_misaligned_buffers() {
    let t = image();
    let Some(blk) = direct_device(&t) else {
        return;
    };
    assert!(blk.disk().direct());
    let mem = guest_mem();
    // Page-aligned buffer: straight O_DIRECT.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 8);
    mem.write_slice(&[0x11; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)]),
        (1, OK)
    );
    // Misaligned guest buffers: O_DIRECT says EINVAL, the bounce buffer takes over.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 16);
    mem.write_slice(&[0x22; 1024], GuestAddress(DATA + 3))
        .unwrap();
    assert_eq!(
        run(&blk, &mem, &[r(HDR, 16), r(DATA + 3, 1024), w(STATUS, 1)]),
        (1, OK)
    );
    header(&mem, HDR, VIRTIO_BLK_T_IN, 8);
    assert_eq!(
        run(
            &blk,
            &mem,
            &[
                r(HDR, 16),
                w(DATA + 5, 512),
                w(DATA + 0x3001, 512),
                w(STATUS, 1)
            ]
        ),
        (1025, OK)
    );
    assert_eq!(read_mem(&mem, DATA + 5, 512), vec![0x11; 512]);
    drop(blk);
    assert_eq!(file_bytes(&t, 4096, 4096), vec![0x11; 4096]);
    assert_eq!(file_bytes(&t, 8192, 1024), vec![0x22; 1024]);
}

// ---- io_uring back end ----

/// Every request-path test again, served through `UringQueueHandler`.
mod uring {
    macro_rules! uring_too {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    super::with_uring(super::$name);
                }
            )*
        };
    }

    uring_too!(
        read_fills_guest_buffers,
        write_reaches_the_file,
        buffers_may_cross_memory_regions_and_share_descriptors,
        flush_get_id_and_unsupported,
        discard_and_write_zeroes_zero_the_range,
        readonly_disk_refuses_writes,
        indirect_descriptors,
        data_outside_guest_memory_is_ioerr,
        status_outside_guest_memory_completes_with_len_0,
        no_room_for_status,
        zero_length_descriptors_are_skipped,
        looping_and_dangling_chains,
        huge_indirect_table_is_bounded,
        too_many_or_too_large_segments,
        wrong_directions,
        short_header,
        out_of_range_sectors_and_lengths,
        bad_head_index_is_skipped,
        corrupt_avail_index_is_a_queue_error,
        event_idx_suppresses_interrupts,
        direct_io_aligned_and_misaligned_buffers,
        mixed_batch_with_hostile_requests,
    );
}

/// One drain with valid reads, writes and a flush interleaved with malformed requests: every
/// request completes exactly once with the right status and length, whatever the order.
#[test]
fn mixed_batch_with_hostile_requests() {
    let t = image();
    let blk = device(&t, false, None);
    let mem = guest_mem();
    let mut drv = Driver::new(&mem, 256);
    let mut q = drv.queue();
    let n = 40u64;
    let mut expect = Vec::new(); // (head, used len, status addr, status)
    for i in 0..n {
        let hdr = HDR + 16 * i;
        let data = DATA + 4096 * i;
        let st = STATUS + i;
        mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        let (descs, len, code) = match i % 5 {
            0 => {
                header(&mem, hdr, VIRTIO_BLK_T_IN, 8 * i);
                (vec![r(hdr, 16), w(data, 4096), w(st, 1)], 4097, OK)
            }
            1 => {
                header(&mem, hdr, VIRTIO_BLK_T_OUT, 8 * i);
                mem.write_slice(&[i as u8; 4096], GuestAddress(data))
                    .unwrap();
                (vec![r(hdr, 16), r(data, 4096), w(st, 1)], 1, OK)
            }
            2 => {
                // Past the end of the disk.
                header(&mem, hdr, VIRTIO_BLK_T_IN, (DISK_SIZE / 512) as u64);
                (vec![r(hdr, 16), w(data, 512), w(st, 1)], 1, IOERR)
            }
            3 => {
                // Data buffer outside guest memory.
                header(&mem, hdr, VIRTIO_BLK_T_OUT, 0);
                (
                    vec![r(hdr, 16), r(MEM_SIZE as u64, 512), w(st, 1)],
                    1,
                    IOERR,
                )
            }
            _ => {
                header(&mem, hdr, VIRTIO_BLK_T_FLUSH, 0);
                (vec![r(hdr, 16), w(st, 1)], 1, OK)
            }
        };
        let head = drv.push(&descs);
        expect.push((u32::from(head), len, st, code));
    }
    assert!(handler(&blk).process_queue(&mem, &mut q).unwrap());
    assert_eq!(u64::from(drv.used_idx()), n);
    let mut used: Vec<(u32, u32)> = (0..n as u16).map(|i| drv.used(i)).collect();
    used.sort_unstable();
    let mut want: Vec<(u32, u32)> = expect.iter().map(|e| (e.0, e.1)).collect();
    want.sort_unstable();
    assert_eq!(used, want);
    for (i, &(_, _, st, code)) in expect.iter().enumerate() {
        let got: u8 = mem.read_obj(GuestAddress(st)).unwrap();
        assert_eq!(got, code, "request {i}");
        let data = DATA + 4096 * i as u64;
        match i % 5 {
            0 => assert_eq!(read_mem(&mem, data, 4096), file_bytes(&t, 4096 * i, 4096)),
            1 => assert_eq!(file_bytes(&t, 4096 * i, 4096), vec![i as u8; 4096]),
            _ => {}
        }
    }
    let s = blk.stats();
    // The writes from outside guest memory fail in parsing, before they are counted.
    assert_eq!((s.reads, s.writes, s.flushes), (16, 8, 8));
    assert_eq!((s.invalid, s.errors), (16, 0));
}

fn direct_device(t: &TempFile) -> Option<Block> {
    match Block::new(&DiskConfig {
        direct: true,
        ..DiskConfig::new(t.as_path())
    }) {
        Ok(b) => Some(b),
        // Filesystems without O_DIRECT (tmpfs) refuse the open: nothing to test there.
        Err(BlockError::Disk(DiskError::Open { source, .. }))
            if source.raw_os_error() == Some(libc::EINVAL) =>
        {
            let test = std::thread::current().name().unwrap_or("?").to_string();
            crate::test_support::skipped(&test, "the temp directory has no O_DIRECT (tmpfs?)");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Activates `blk`, queues 32 4 KiB reads with one kick, and checks they all complete with
/// the right data. Returns whether the worker served them through io_uring.
fn serve_batch_through_worker(blk: Block, t: &TempFile) -> bool {
    let mut blk = Runner::new(Box::new(blk));
    let mem = guest_mem();
    let irq = Arc::new(TestInterrupt::default());
    let mut drv = Driver::new(&mem, 128);
    let (aq, kick) = active_queue(drv.queue());
    blk.activate(mem.clone(), blk.device().features(), vec![aq], irq.clone())
        .unwrap();
    for i in 0..32u64 {
        header(&mem, HDR + 16 * i, VIRTIO_BLK_T_IN, 8 * i);
        drv.push(&[
            r(HDR + 16 * i, 16),
            w(DATA + 4096 * i, 4096),
            w(STATUS + i, 1),
        ]);
    }
    kick.write(1).unwrap();
    wait_for(|| drv.used_idx() == 32);
    for i in 0..32u16 {
        assert_eq!(drv.used(i).1, 4097);
    }
    for i in 0..32u64 {
        let st: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(st, OK);
        assert_eq!(
            read_mem(&mem, DATA + 4096 * i, 4096),
            file_bytes(t, 4096 * i as usize, 4096)
        );
    }
    wait_for(|| irq.count(VirtioInterruptType::Queue(0)) >= 1);
    let uring = blk.device().serving_with_uring();
    blk.reset().expect("was active");
    assert!(!blk.device().serving_with_uring());
    assert_eq!(blk.device().stats().reads, 32);
    uring
}

#[test]
fn worker_serves_direct_disks_through_uring() {
    let t = image();
    let Some(blk) = direct_device(&t) else {
        return;
    };
    assert!(blk.prefers_uring());
    assert!(serve_batch_through_worker(blk, &t));
}

#[test]
fn worker_serves_page_cache_disks_synchronously() {
    let t = image();
    let blk = device(&t, false, None);
    assert!(!blk.prefers_uring());
    assert!(!serve_batch_through_worker(blk, &t));
}

#[test]
fn worker_falls_back_when_uring_setup_fails() {
    let t = image();
    let Some(blk) = direct_device(&t) else {
        return;
    };
    FAIL_URING_SETUP
        .lock()
        .unwrap()
        .push(blk.name().to_string());
    assert!(!serve_batch_through_worker(blk, &t));
}
