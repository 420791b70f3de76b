//! virtio-blk: a disk image served to the guest through one virtqueue.
//!
//! - [`parse_disk_option`] turns `path=FILE[,format=raw|qcow2|vhd][,readonly=on|off]
//!   [,serial=ID][,direct=on|off][,overlay=on|off][,backing=BASE]` into a [`DiskConfig`].
//! - [`open_disk`] opens the image through [`crate::disk`] (format detected from the contents
//!   unless given; OFD lock: one writer, or many readers), creating an overlay when asked.
//! - [`Block`] is the [`VirtioDevice`]: it offers the features and the config space; on
//!   activation it returns the handler of its single queue (index 0), which the one virtio
//!   worker (`virtio-blk-<n>`, see [`super::worker`]) runs: requests are served through
//!   [`QueueHandler`]: synchronously
//!   (preadv/pwritev straight into guest memory) for page-cache images, the default; through
//!   an io_uring ([`UringQueueHandler`], one batch of readv/writev/fsync per queue drain,
//!   completed out of order) for `direct=on` raw images, where it serves deep queues about 3x
//!   faster (benches/README.md). If the ring cannot be set up (old kernel, seccomp,
//!   io_uring disabled) the worker logs it once per process and serves synchronously.
//!
//! When the queue cannot be served (rings outside guest memory at activation, a corrupt
//! available index or an io_uring failure later) the worker stops serving, raises a
//! configuration interrupt and the transport reports DEVICE_NEEDS_RESET (0x40) in the device
//! status. A driver reset clears it.

mod request;
mod uring;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Once;

use log::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::disk::{DiskBackend, DiskError, DiskOptions, Format};
pub use request::{QueueError, QueueHandler};
pub use uring::UringQueueHandler;

use super::{
    ActivateError, DeviceError, VirtioDevice, VirtioHandler, WorkerCtx, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::ratelimit::RateLimit;

/// virtio-blk always counts in 512-byte sectors.
pub const SECTOR_SIZE: u64 = crate::disk::SECTOR_SIZE;
/// The size of the only queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments (descriptors) in one request.
pub const SEG_MAX: u32 = 128;
/// Largest data segment in bytes, as advertised (VIRTIO_BLK_F_SIZE_MAX). Kept so that
/// SEG_MAX * SIZE_MAX / 512 fits 16 bits: SeaBIOS 1.16.2 (Debian's) truncates that quotient
/// to a u16, and at 0 it loops forever on zero-length reads.
pub const SIZE_MAX: u32 = 128 << 10;
/// Largest data descriptor accepted: drivers that do not negotiate SIZE_MAX (OVMF's
/// virtio-blk sends a whole transfer as one descriptor) may exceed it. With SEG_MAX + 2
/// descriptors a request stays below 4 GiB.
pub const DESC_LEN_MAX: u32 = 16 << 20;
/// Largest discard, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest write-zeroes, in sectors (1 GiB).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// Discard granularity, in sectors (4 KiB).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Bytes of `struct virtio_blk_config` the device implements (up to write_zeroes_may_unmap
/// and its padding).
pub const CONFIG_SIZE: usize = 60;

const SERIAL_MAX: usize = VIRTIO_BLK_ID_BYTES as usize;

/// A `--disk` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub serial: Option<String>,
    pub direct: bool,
    /// `format=`; detected from the contents when `None`.
    pub format: Option<Format>,
    /// `overlay=on`: writes go to a temporary qcow2 over the untouched image.
    pub overlay: bool,
    /// `backing=BASE`: `path` is (or is created as) a qcow2 overlay of BASE.
    pub backing: Option<PathBuf>,
    /// `bootindex=N`: the firmware's boot order (lowest first; disks without one follow in
    /// `--disk` order).
    pub bootindex: Option<u32>,
}

impl DiskConfig {
    /// A plain `path=FILE` disk.
    pub fn new(path: impl Into<PathBuf>) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            readonly: false,
            serial: None,
            direct: false,
            format: None,
            overlay: false,
            backing: None,
            bootindex: None,
        }
    }

    fn options(&self) -> DiskOptions {
        DiskOptions {
            path: self.path.clone(),
            readonly: self.readonly,
            direct: self.direct,
            format: self.format,
        }
    }
}

/// Opens the image a `--disk` option names: an overlay over it when `overlay=on`, the
/// overlay `path` over `backing=` (created when missing), or the image itself.
pub fn open_disk(config: &DiskConfig) -> Result<Box<dyn DiskBackend>, DiskError> {
    let opts = config.options();
    match (&config.backing, config.overlay) {
        (Some(base), _) => crate::disk::overlay::open_persistent(&opts, base),
        (None, true) => crate::disk::overlay::open_throwaway(&opts),
        (None, false) => crate::disk::open(&opts),
    }
}

/// Why a `--disk` option is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskOptionError {
    #[error("disk option `{option}`: `path=FILE` is required")]
    MissingPath { option: String },
    #[error("disk option `{option}`: the path is empty")]
    EmptyPath { option: String },
    #[error("disk option `{option}`: `{item}` is not KEY=VALUE")]
    Malformed { option: String, item: String },
    #[error(
        "disk option `{option}`: unknown key `{key}` (known: path, format, readonly, serial, \
         direct, overlay, backing, bootindex)"
    )]
    UnknownKey { option: String, key: String },
    #[error("disk option `{option}`: `{key}` given twice")]
    DuplicateKey { option: String, key: String },
    #[error("disk option `{option}`: `{key}={value}`: expected on or off")]
    InvalidSwitch {
        option: String,
        key: String,
        value: String,
    },
    #[error("disk option `{option}`: format `{value}` (known: raw, qcow2, vhd)")]
    UnknownFormat { option: String, value: String },
    #[error("disk option `{option}`: {what}")]
    Conflict { option: String, what: &'static str },
    #[error("disk option `{option}`: bootindex `{value}` is not a number from 0 to 65535")]
    BadBootIndex { option: String, value: String },
    #[error("disk option `{option}`: serial `{serial}` is {len} bytes, at most 20 are allowed")]
    SerialTooLong {
        option: String,
        serial: String,
        len: usize,
    },
}

/// Parses `path=FILE[,format=raw|qcow2|vhd][,readonly=on|off][,serial=ID][,direct=on|off]
/// [,overlay=on|off][,backing=BASE][,bootindex=N]`.
pub fn parse_disk_option(s: &str) -> Result<DiskConfig, DiskOptionError> {
    const KEYS: [&str; 8] = [
        "path",
        "format",
        "readonly",
        "serial",
        "direct",
        "overlay",
        "backing",
        "bootindex",
    ];
    let option = s.to_string();
    let mut values: [Option<&str>; 8] = [None; 8];
    for item in s.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(DiskOptionError::Malformed {
                option,
                item: item.to_string(),
            });
        };
        let Some(k) = KEYS.iter().position(|k| *k == key) else {
            return Err(DiskOptionError::UnknownKey {
                option,
                key: key.to_string(),
            });
        };
        if values[k].replace(value).is_some() {
            return Err(DiskOptionError::DuplicateKey {
                option,
                key: key.to_string(),
            });
        }
    }
    let [path, format, readonly, serial, direct, overlay, backing, bootindex] = values;
    let switch = |key: &str, value: Option<&str>| match value {
        None | Some("off") => Ok(false),
        Some("on") => Ok(true),
        Some(v) => Err(DiskOptionError::InvalidSwitch {
            option: option.clone(),
            key: key.to_string(),
            value: v.to_string(),
        }),
    };
    let path = match path {
        None => return Err(DiskOptionError::MissingPath { option }),
        Some("") => return Err(DiskOptionError::EmptyPath { option }),
        Some(p) => PathBuf::from(p),
    };
    let format = format
        .map(|f| {
            Format::parse(f).ok_or_else(|| DiskOptionError::UnknownFormat {
                option: option.clone(),
                value: f.to_string(),
            })
        })
        .transpose()?;
    if let Some(serial) = serial.filter(|v| v.len() > SERIAL_MAX) {
        return Err(DiskOptionError::SerialTooLong {
            option,
            serial: serial.to_string(),
            len: serial.len(),
        });
    }
    let cfg = DiskConfig {
        path,
        readonly: switch("readonly", readonly)?,
        serial: serial.map(str::to_string),
        direct: switch("direct", direct)?,
        format,
        overlay: switch("overlay", overlay)?,
        backing: backing.filter(|b| !b.is_empty()).map(PathBuf::from),
        bootindex: bootindex
            .map(|v| {
                v.parse::<u16>()
                    .map(u32::from)
                    .map_err(|_| DiskOptionError::BadBootIndex {
                        option: option.clone(),
                        value: v.to_string(),
                    })
            })
            .transpose()?,
    };
    let conflict = |what| {
        Err(DiskOptionError::Conflict {
            option: option.clone(),
            what,
        })
    };
    match (&cfg.backing, cfg.overlay, cfg.readonly) {
        (Some(_), true, _) => conflict("overlay=on and backing= cannot be combined"),
        (_, true, true) => {
            conflict("overlay=on already keeps the image unchanged; drop readonly=on")
        }
        (Some(_), _, _) if cfg.format.is_some_and(|f| f != Format::Qcow2) => {
            conflict("an overlay (backing=) is a qcow2 image")
        }
        _ => Ok(cfg),
    }
}

/// Why a disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("serial `{serial}` of disk image {path} is longer than 20 bytes")]
    SerialTooLong { path: PathBuf, serial: String },
}

/// Request counters, updated by the worker with relaxed atomics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    get_ids: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    other: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    unsupported: AtomicU64,
    invalid: AtomicU64,
}

/// A snapshot of the device counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// VIRTIO_BLK_T_IN requests.
    pub reads: u64,
    /// VIRTIO_BLK_T_OUT requests.
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    /// Requests of an unknown type.
    pub other: u64,
    /// Bytes copied from the image to the guest / from the guest to the image.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Host I/O failures and writes refused on a read-only disk (status IOERR).
    pub errors: u64,
    /// Requests answered UNSUPP.
    pub unsupported: u64,
    /// Malformed requests: bad chains, addresses, directions, lengths, ranges.
    pub invalid: u64,
}

impl Counters {
    fn snapshot(&self) -> BlockStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStats {
            reads: l(&self.reads),
            writes: l(&self.writes),
            flushes: l(&self.flushes),
            get_ids: l(&self.get_ids),
            discards: l(&self.discards),
            write_zeroes: l(&self.write_zeroes),
            other: l(&self.other),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            errors: l(&self.errors),
            unsupported: l(&self.unsupported),
            invalid: l(&self.invalid),
        }
    }
}

static INSTANCES: AtomicUsize = AtomicUsize::new(0);

/// The virtio-blk device model.
pub struct Block {
    disk: Arc<dyn DiskBackend>,
    id: [u8; SERIAL_MAX],
    features: u64,
    config: [u8; CONFIG_SIZE],
    stats: Arc<Counters>,
    /// Set by the worker while it serves through io_uring.
    uring_active: Arc<AtomicBool>,
    name: String,
    config_log: RateLimit,
}

impl Block {
    /// Opens the image `config` names (see [`open_disk`]) and builds the device.
    pub fn new(config: &DiskConfig) -> Result<Block, BlockError> {
        let disk = open_disk(config)?;
        Block::with_disk(disk, config.serial.as_deref())
    }

    /// Builds the device around an opened image; `serial` answers GET_ID (at most 20 bytes).
    pub fn with_disk(
        disk: Box<dyn DiskBackend>,
        serial: Option<&str>,
    ) -> Result<Block, BlockError> {
        let mut id = [0u8; SERIAL_MAX];
        if let Some(s) = serial {
            if s.len() > SERIAL_MAX {
                return Err(BlockError::SerialTooLong {
                    path: disk.path().to_path_buf(),
                    serial: s.to_string(),
                });
            }
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        let bit = |b: u32| 1u64 << b;
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX);
        if disk.readonly() {
            features |= bit(VIRTIO_BLK_F_RO);
        } else {
            features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config = build_config(disk.size() / SECTOR_SIZE);
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        Ok(Block {
            disk: Arc::from(disk),
            id,
            features,
            config,
            stats: Arc::new(Counters::default()),
            uring_active: Arc::new(AtomicBool::new(false)),
            name: format!("virtio-blk-{n}"),
            config_log: RateLimit::new(3),
        })
    }

    /// The opened image.
    pub fn disk(&self) -> &dyn DiskBackend {
        self.disk.as_ref()
    }

    /// The worker thread's name (`virtio-blk-<n>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A snapshot of the request counters (callable from any thread holding the device).
    pub fn stats(&self) -> BlockStats {
        self.stats.snapshot()
    }

    /// A request processor sharing this device's image and counters; what the worker runs.
    /// Exposed for benchmarks and tests that drive a queue without a worker thread.
    pub fn queue_handler(&self) -> QueueHandler {
        QueueHandler::new(self.disk.clone(), self.id, self.stats.clone())
    }

    /// Whether the worker serves this disk through io_uring (when the ring can be set up):
    /// only `direct=on` raw images, where io_uring wins; page-cache I/O is faster
    /// synchronously, and other formats map guest offsets under a lock.
    pub fn prefers_uring(&self) -> bool {
        self.disk.direct() && self.disk.raw_fd().is_some()
    }

    /// True while a worker serves this device through io_uring (false when idle, for
    /// page-cache images, and after a failed io_uring setup).
    pub fn serving_with_uring(&self) -> bool {
        self.uring_active.load(Ordering::SeqCst)
    }
}

/// Serialises `struct virtio_blk_config` (little-endian) for a disk of `sectors` sectors.
fn build_config(sectors: u64) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &sectors.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &1u32.to_le_bytes());
    put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &1u32.to_le_bytes());
    put(56, &[1u8]);
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        super::TYPE_BLOCK
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No writable field is offered (CONFIG_WCE is not negotiated).
        self.config_log.warn(|| {
            format!(
                "{}: ignoring a {}-byte config write at offset {offset}",
                self.name,
                data.len()
            )
        });
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<(u16, Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        let got = queues.len();
        let Ok([(index, mut queue)]) = <[(u16, Queue); 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { got, want: 1 });
        };
        queue.set_event_idx(acked_features & VIRTIO_F_RING_EVENT_IDX != 0);
        if !queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue { index });
        }
        Ok(Box::new(BlockHandler {
            name: self.name.clone(),
            handler: Handler::Sync(self.queue_handler()),
            uring: self.prefers_uring(),
            uring_active: self.uring_active.clone(),
            mem,
            queue,
            index,
        }))
    }

    fn deactivate(&mut self, _handler: Box<dyn VirtioHandler>) {
        self.uring_active.store(false, Ordering::SeqCst);
    }
}

/// How the worker executes file I/O.
enum Handler {
    Sync(QueueHandler),
    Uring(Box<UringQueueHandler>),
}

impl Handler {
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, QueueError> {
        match self {
            Handler::Sync(h) => h.process_queue(mem, queue),
            Handler::Uring(h) => h.process_queue(mem, queue),
        }
    }
}

static URING_FALLBACK_LOGGED: Once = Once::new();

/// io_uring setup, replaceable in tests to exercise the fallback.
#[cfg(not(test))]
fn setup_ring() -> std::io::Result<io_uring::IoUring> {
    uring::setup_ring()
}
#[cfg(test)]
use tests::setup_ring;

/// What the worker runs for one activation: the queue and the request processor.
struct BlockHandler {
    name: String,
    handler: Handler,
    /// Switch `handler` to io_uring when the worker starts (the ring belongs to its thread).
    uring: bool,
    uring_active: Arc<AtomicBool>,
    mem: GuestMemoryMmap,
    queue: Queue,
    index: u16,
}

impl VirtioHandler for BlockHandler {
    /// Moves the handler onto an io_uring made on this (the worker's) thread; on failure logs
    /// once per process and keeps serving synchronously.
    fn started(&mut self) {
        if !self.uring {
            return;
        }
        let Handler::Sync(h) = &self.handler else {
            return;
        };
        match setup_ring() {
            Ok(ring) => match UringQueueHandler::with_ring(h.same_disk(), ring) {
                Ok(u) => {
                    self.uring_active.store(true, Ordering::SeqCst);
                    self.handler = Handler::Uring(Box::new(u));
                }
                Err(e) => warn!("{}: {e}; serving synchronously", self.name),
            },
            Err(e) => {
                URING_FALLBACK_LOGGED.call_once(|| {
                    warn!("virtio-blk: io_uring unavailable ({e}); serving disks synchronously");
                });
            }
        }
    }

    fn queue_event(&mut self, _slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let notify = self
            .handler
            .process_queue(&self.mem, &mut self.queue)
            .map_err(|e| DeviceError::new(format!("{}: queue failed: {e}", self.name)))?;
        if notify {
            ctx.signal_used(self.index).map_err(|e| {
                DeviceError::new(format!(
                    "{}: cannot raise the queue interrupt: {e}",
                    self.name
                ))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
