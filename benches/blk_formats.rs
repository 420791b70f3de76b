//! Host-only comparison of disk formats through the virtio-blk request path: the fio jobs of
//! the nested `devices` benchmark (issue 11) replayed against the synchronous
//! `QueueHandler::process_queue` (the worker's code path, minus the eventfd wake-up), once on
//! a raw image and once on the same bytes as a fully allocated qcow2 (64 KiB clusters,
//! `qemu-img convert -S 0`), both in the page cache.
//!
//! - 4 KiB random reads and writes, 32 requests per kick;
//! - 1 MiB sequential reads and writes, 4 requests per kick, each request 32 segments of
//!   32 KiB (a guest's scattered pages).
//!
//! Prints requests per second (best of 3 runs) and the qcow2/raw ratio.
//!
//! Run: `cargo bench --bench blk_formats` (needs qemu-img). FERROVM_BENCH_N scales the
//! number of requests (default 20000 small, 2000 large); FERROVM_BENCH_JOB=TEXT runs only
//! the jobs whose name contains TEXT, FERROVM_BENCH_ONLY=raw|qcow2 only one format (for
//! `perf record` or `strace -c -f`).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ferrovm::devices::virtio::block::{Block, DiskConfig};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT as _};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const FILE_SIZE: u64 = 256 << 20;
const QUEUE_SIZE: u16 = 256;
const USED: u64 = 0x8000;
const HDRS: u64 = 0x10_0000;
const STATUS: u64 = 0x18_0000;
const DATA: u64 = 0x20_0000;
const MEM_SIZE: usize = 16 << 20;

/// One fio-like job.
#[derive(Clone, Copy)]
struct Job {
    name: &'static str,
    read: bool,
    /// Bytes per request, and per segment (descriptor).
    len: u64,
    seg: u64,
    /// Requests per kick.
    qd: u16,
    random: bool,
}

const JOBS: [Job; 4] = [
    Job {
        name: "4 KiB randread QD32",
        read: true,
        len: 4096,
        seg: 4096,
        qd: 32,
        random: true,
    },
    Job {
        name: "4 KiB randwrite QD32",
        read: false,
        len: 4096,
        seg: 4096,
        qd: 32,
        random: true,
    },
    Job {
        name: "1 MiB seq read QD4",
        read: true,
        len: 1 << 20,
        seg: 32 << 10,
        qd: 4,
        random: false,
    },
    Job {
        name: "1 MiB seq write QD4",
        read: false,
        len: 1 << 20,
        seg: 32 << 10,
        qd: 4,
        random: false,
    },
];

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

    fn store(&self, i: u16, addr: u64, len: u64, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len as u32, flags, next);
        self.vq
            .desc_table()
            .store(i, RawDescriptor::from(d))
            .expect("desc");
    }

    /// Queues request `slot` of `job` at `offset`: header, the data segments (spread over
    /// guest memory, every other segment-sized block), status.
    fn push(&mut self, job: &Job, slot: u16, offset: u64) {
        let segs = (job.len / job.seg) as u16;
        let hdr = HDRS + 16 * u64::from(slot);
        let status = STATUS + u64::from(slot);
        let kind = if job.read {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_OUT
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).expect("hdr");
        let next = VRING_DESC_F_NEXT as u16;
        let wr = VRING_DESC_F_WRITE as u16;
        let data_flags = if job.read { next | wr } else { next };
        let d0 = (segs + 2) * slot;
        self.store(d0, hdr, 16, next, d0 + 1);
        for s in 0..segs {
            let block = u64::from(slot) * u64::from(segs) + u64::from(s);
            let addr = DATA + 2 * job.seg * block;
            self.store(d0 + 1 + s, addr, job.seg, data_flags, d0 + 2 + s);
        }
        self.store(d0 + 1 + segs, status, 1, wr, 0);
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

/// Serves `n` requests of `job`; returns requests per second.
fn run(blk: &Block, mem: &GuestMemoryMmap, job: &Job, n: usize, seed: u64) -> f64 {
    let mut drv = Driver::new(mem);
    let mut handler = blk.queue_handler();
    let blocks = FILE_SIZE / job.len;
    let mut x = seed | 1;
    let mut seq = 0u64;
    let start = Instant::now();
    let mut done = 0usize;
    while done < n {
        let k = usize::from(job.qd).min(n - done);
        for slot in 0..k {
            let b = if job.random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % blocks
            } else {
                seq += 1;
                seq % blocks
            };
            drv.push(job, slot as u16, b * job.len);
        }
        handler
            .process_queue(mem, &mut drv.queue)
            .expect("process_queue");
        done += k;
    }
    let secs = start.elapsed().as_secs_f64();
    for slot in 0..u64::from(job.qd).min(n as u64) {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + slot)).expect("status");
        assert_eq!(status, 0, "request in slot {slot} succeeded");
    }
    n as f64 / secs
}

fn make_images(raw: &Path, qcow2: &Path) {
    let mut f = std::fs::File::create(raw).expect("raw image");
    let chunk = vec![0xa5u8; 1 << 20];
    for _ in 0..FILE_SIZE / (1 << 20) {
        f.write_all(&chunk).expect("fill");
    }
    let ok = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-S", "0"])
        .arg(raw)
        .arg(qcow2)
        .status()
        .expect("qemu-img")
        .success();
    assert!(ok, "qemu-img convert failed");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("blk_formats: bench");
        return;
    }
    let raw = TempFile::new_with_prefix("/var/tmp/ferrovm-fmt-bench").expect("temp file");
    let qcow2 = raw.as_path().with_extension("qcow2");
    make_images(raw.as_path(), &qcow2);
    let scale: f64 = std::env::var("FERROVM_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let only = std::env::var("FERROVM_BENCH_ONLY").ok();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    let blks = [raw.as_path(), qcow2.as_path()].map(|p| Block::new(&DiskConfig::new(p)));
    let blks = blks.map(|b| b.expect("device"));
    println!(
        "blk_formats: {} MiB image in /var/tmp, page cache",
        FILE_SIZE >> 20
    );
    let pick = std::env::var("FERROVM_BENCH_JOB").ok();
    for job in JOBS
        .iter()
        .filter(|j| pick.as_deref().is_none_or(|p| j.name.contains(p)))
    {
        let n = ((if job.len > 4096 { 2000.0 } else { 20000.0 }) * scale) as usize;
        let mut best = [0f64; 2];
        for (i, blk) in blks.iter().enumerate() {
            if only.as_deref().is_some_and(|o| o != ["raw", "qcow2"][i]) {
                continue;
            }
            run(blk, &mem, job, n / 4 + 1, 7);
            for rep in 0..3 {
                best[i] = best[i].max(run(blk, &mem, job, n, 42 + rep));
            }
        }
        println!(
            "{:>22}: raw {:>9.0} req/s  qcow2 {:>9.0} req/s  qcow2/raw {:.2}",
            job.name,
            best[0],
            best[1],
            best[1] / best[0]
        );
    }
    drop(blks);
    let _ = std::fs::remove_file(&qcow2);
}
