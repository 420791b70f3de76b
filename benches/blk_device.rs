//! Host-only micro-benchmark of the virtio-blk device model: 4 KiB random reads and writes
//! submitted through a virtqueue in guest memory and served by the synchronous
//! `QueueHandler::process_queue` (the worker's code path, minus the eventfd wake-up) and by
//! the io_uring `UringQueueHandler::process_queue`, at queue depth 1 and 32 (requests
//! queued per kick), against plain pread/pwrite on the same file; once through the page cache
//! and once with O_DIRECT (`direct=on`).
//!
//! Run: `cargo bench --bench blk_device`

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Instant;

use ferrovm::devices::virtio::block::{Block, DiskConfig, QueueHandler, UringQueueHandler};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT as _};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const FILE_SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
/// Requests per run and runs per figure (best of), page cache / O_DIRECT.
const N_CACHED: usize = 20_000;
const REPS_CACHED: u64 = 5;
const N_DIRECT: usize = 4_000;
const REPS_DIRECT: u64 = 3;
const QUEUE_SIZE: u16 = 256;
const USED: u64 = 0x8000;
const HDRS: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x80_0000;

struct Rng(u64);

impl Rng {
    fn offset(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % (FILE_SIZE / BLOCK as u64)) * BLOCK as u64
    }
}

struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    queue: Queue,
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let mut queue = vq.create_queue::<Queue>().expect("queue");
        // MockSplitQueue's own used ring overlaps its available ring (virtio-queue 0.18).
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        Self {
            mem,
            vq,
            queue,
            avail_idx: 0,
        }
    }

    /// Queues request `slot` (0..QUEUE_SIZE/3) reading or writing 4 KiB at `offset`.
    fn push(&mut self, slot: u16, read: bool, offset: u64) {
        let hdr = HDRS + 16 * u64::from(slot);
        let data = DATA + BLOCK as u64 * u64::from(slot);
        let status = STATUS + u64::from(slot);
        let kind = if read {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_OUT
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).expect("hdr");
        let d0 = 3 * slot;
        let next = VRING_DESC_F_NEXT as u16;
        let wr = VRING_DESC_F_WRITE as u16;
        let data_flags = if read { next | wr } else { next };
        let t = self.vq.desc_table();
        t.store(
            d0,
            RawDescriptor::from(Descriptor::new(hdr, 16, next, d0 + 1)),
        )
        .expect("desc");
        t.store(
            d0 + 1,
            RawDescriptor::from(Descriptor::new(data, BLOCK as u32, data_flags, d0 + 2)),
        )
        .expect("desc");
        t.store(
            d0 + 2,
            RawDescriptor::from(Descriptor::new(status, 1, wr, 0)),
        )
        .expect("desc");
        let avail = self.vq.avail_addr();
        let entry = 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(d0, avail.unchecked_add(entry))
            .expect("avail");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, avail.unchecked_add(2))
            .expect("avail idx");
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sync,
    Uring,
}

enum Handler {
    Sync(QueueHandler),
    Uring(Box<UringQueueHandler>),
}

fn device_run(
    blk: &Block,
    mem: &GuestMemoryMmap,
    backend: Backend,
    read: bool,
    batch: u16,
    n: usize,
    seed: u64,
) -> f64 {
    let mut drv = Driver::new(mem);
    let mut handler = match backend {
        Backend::Sync => Handler::Sync(blk.queue_handler()),
        Backend::Uring => Handler::Uring(Box::new(
            UringQueueHandler::new(blk.queue_handler()).expect("io_uring setup"),
        )),
    };
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut done = 0usize;
    while done < n {
        let k = usize::from(batch).min(n - done);
        for slot in 0..k {
            drv.push(slot as u16, read, rng.offset());
        }
        match &mut handler {
            Handler::Sync(h) => h.process_queue(mem, &mut drv.queue),
            Handler::Uring(h) => h.process_queue(mem, &mut drv.queue),
        }
        .expect("process_queue");
        done += k;
    }
    let secs = start.elapsed().as_secs_f64();
    let used: u16 = mem
        .read_obj(GuestAddress(USED).unchecked_add(2))
        .expect("used idx");
    assert_eq!(used, n as u16, "every request completed");
    for slot in 0..u64::from(batch).min(n as u64) {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + slot)).expect("status");
        assert_eq!(status, 0, "request in slot {slot} succeeded");
    }
    n as f64 / secs
}

/// A 4 KiB buffer aligned for O_DIRECT.
#[repr(C, align(4096))]
struct Page([u8; BLOCK]);

fn plain_run(file: &std::fs::File, read: bool, n: usize, seed: u64) -> f64 {
    let mut buf = Box::new(Page([0x5au8; BLOCK]));
    let mut rng = Rng(seed);
    let start = Instant::now();
    for _ in 0..n {
        let off = rng.offset();
        if read {
            file.read_exact_at(&mut buf.0, off).expect("pread");
        } else {
            file.write_all_at(&buf.0, off).expect("pwrite");
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let tmp = TempFile::new_with_prefix("/var/tmp/ferrovm-blk-bench").expect("temp file");
    {
        let mut f = tmp.as_file();
        let chunk = vec![0xa5u8; 1 << 20];
        for _ in 0..FILE_SIZE / (1 << 20) {
            f.write_all(&chunk).expect("fill");
        }
        f.sync_all().expect("sync");
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("memory");
    let mut totals = (0u64, 0u64, 0u64, 0u64);

    for direct in [false, true] {
        let (n, reps, mode) = if direct {
            (N_DIRECT, REPS_DIRECT, "O_DIRECT")
        } else {
            (N_CACHED, REPS_CACHED, "page cache")
        };
        let blk = Block::new(&DiskConfig {
            direct,
            ..DiskConfig::new(tmp.as_path())
        })
        .expect("device");
        let plain = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(tmp.as_path())
            .expect("open");
        println!(
            "blk_device: 4 KiB random I/O, {} MiB file in /var/tmp, {mode}, N={n}, best of {reps}",
            FILE_SIZE >> 20
        );
        // Warm up every path (and the page cache) once.
        plain_run(&plain, true, n, 1);
        device_run(&blk, &mem, Backend::Sync, true, 1, n, 1);
        device_run(&blk, &mem, Backend::Uring, true, 32, n, 1);

        for (name, read) in [("read", true), ("write", false)] {
            // Best of `reps` interleaved runs: a single run is short enough to be noisy.
            let mut p = 0f64;
            let mut dev = [[0f64; 2]; 2]; // [qd1, qd32] x [sync, uring]
            for rep in 0..reps {
                let seed = 42 + rep;
                p = p.max(plain_run(&plain, read, n, seed));
                for (q, qd) in [1u16, 32].into_iter().enumerate() {
                    for (b, backend) in [Backend::Sync, Backend::Uring].into_iter().enumerate() {
                        let r = device_run(&blk, &mem, backend, read, qd, n, seed);
                        dev[q][b] = dev[q][b].max(r);
                    }
                }
            }
            println!("{mode:>10} {name:>5}: plain p{name:<5}        {p:>10.0} ops/s");
            for (q, qd) in [1, 32].into_iter().enumerate() {
                let [s, u] = dev[q];
                println!(
                    "{mode:>10} {name:>5}: QD{qd:<2} sync {s:>10.0} ops/s ({:.2} of plain)  \
                     io_uring {u:>10.0} ops/s ({:.2} of plain)  io_uring/sync {:.2}",
                    s / p,
                    u / p,
                    u / s
                );
            }
        }
        let s = blk.stats();
        totals.0 += s.reads;
        totals.1 += s.writes;
        totals.2 += s.errors;
        totals.3 += s.invalid;
    }
    println!(
        "device stats: {} reads, {} writes, {} errors, {} invalid",
        totals.0, totals.1, totals.2, totals.3
    );
}
