//! Host-only micro-benchmark of the virtio-blk device model: 4 KiB random reads and writes
//! submitted through a virtqueue in guest memory and served by `QueueHandler::process_queue`
//! (the worker's code path, minus the eventfd wake-up), against plain pread/pwrite on the
//! same file.
//!
//! Run: `cargo bench --bench blk_device`

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
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
const BLOCK: usize = 4096;
const N: usize = 20_000;
const REPS: u64 = 5;
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

fn device_run(blk: &Block, mem: &GuestMemoryMmap, read: bool, batch: u16, seed: u64) -> f64 {
    let mut drv = Driver::new(mem);
    let mut handler = blk.queue_handler();
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut done = 0usize;
    while done < N {
        let n = usize::from(batch).min(N - done);
        for slot in 0..n {
            drv.push(slot as u16, read, rng.offset());
        }
        handler
            .process_queue(mem, &mut drv.queue)
            .expect("process_queue");
        done += n;
    }
    let secs = start.elapsed().as_secs_f64();
    let used: u16 = mem
        .read_obj(GuestAddress(USED).unchecked_add(2))
        .expect("used idx");
    assert_eq!(used, N as u16, "every request completed");
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
    assert_eq!(status, 0, "last request succeeded");
    N as f64 / secs
}

fn plain_run(file: &std::fs::File, read: bool, seed: u64) -> f64 {
    let mut buf = vec![0x5au8; BLOCK];
    let mut rng = Rng(seed);
    let start = Instant::now();
    for _ in 0..N {
        let off = rng.offset();
        if read {
            file.read_exact_at(&mut buf, off).expect("pread");
        } else {
            file.write_all_at(&buf, off).expect("pwrite");
        }
    }
    N as f64 / start.elapsed().as_secs_f64()
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
    let blk = Block::new(&DiskConfig {
        path: tmp.as_path().to_path_buf(),
        readonly: false,
        serial: None,
        direct: false,
    })
    .expect("device");
    let plain = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.as_path())
        .expect("open");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("memory");

    println!(
        "blk_device: 4 KiB random I/O on a {} MiB file in /var/tmp (page cache), N={N}, best of {REPS}",
        FILE_SIZE >> 20
    );
    // Warm up both paths (and the page cache) once.
    plain_run(&plain, true, 1);
    device_run(&blk, &mem, true, 1, 1);

    for (name, read) in [("read", true), ("write", false)] {
        // Best of REPS interleaved runs: a single 20000-op run is short enough to be noisy.
        let (mut p, mut d1, mut d32) = (0f64, 0f64, 0f64);
        for rep in 0..REPS {
            let seed = 42 + rep;
            p = p.max(plain_run(&plain, read, seed));
            d1 = d1.max(device_run(&blk, &mem, read, 1, seed));
            d32 = d32.max(device_run(&blk, &mem, read, 32, seed));
        }
        println!("{name:>5}: plain p{name:<5} {p:>10.0} ops/s");
        println!(
            "{name:>5}: device, 1/kick  {d1:>10.0} ops/s  ratio {:.2}",
            d1 / p
        );
        println!(
            "{name:>5}: device, 32/kick {d32:>10.0} ops/s  ratio {:.2}",
            d32 / p
        );
    }
    let s = blk.stats();
    println!(
        "device stats: {} reads, {} writes, {} MiB read, {} MiB written, {} errors, {} invalid",
        s.reads,
        s.writes,
        s.bytes_read >> 20,
        s.bytes_written >> 20,
        s.errors,
        s.invalid
    );
}
