//! virtio-scsi (device type 8) with read-only CD-ROM drives: `--cdrom IMAGE`, one target per
//! image (target N = the N-th `--cdrom`, LUN 0), on one controller.
//!
//! This is the CD-ROM a PC firmware boots El Torito from: SeaBIOS and OVMF both drive
//! virtio-scsi, and Linux sees `/dev/sr0` through `virtio_scsi` and `sr_mod`. The three
//! queues are the virtio-scsi ones: control (0: task management answered at once, since every
//! command completes before the next is read; asynchronous-notification queries report no
//! events), event (1: never used, as no hot-plug feature is offered) and one request queue
//! (2). SeaBIOS configures only the request queue; the device serves whichever of these the
//! driver made ready, on the one worker lifecycle ([`super::worker`]).
//!
//! A request is a byte stream (VIRTIO_F_VERSION_1): the device-readable part starts with the
//! command header (LUN, tag, attributes, CDB of `cdb_size` bytes), the device-writable part
//! with the response (sense length, residual, status, response code, `sense_size` bytes of
//! sense), followed by the data-in buffer. The command itself is answered by [`cdrom`];
//! reads go straight from the image into guest memory.

mod cdrom;
mod request;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::block::{open_disk, BlockError, DiskConfig, DiskOptionError};
use super::{
    ActivateError, DeviceError, VirtioDevice, VirtioHandler, WorkerCtx, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::disk::DiskBackend;
use crate::ratelimit::RateLimit;
pub use cdrom::{CdRom, BLOCK_SIZE};

/// virtio device type of the SCSI host.
pub const TYPE_SCSI: u32 = 8;
/// Queue indexes.
pub const CONTROL_QUEUE: u16 = 0;
pub const EVENT_QUEUE: u16 = 1;
pub const REQUEST_QUEUE: u16 = 2;
const QUEUE_SIZE: u16 = 128;
/// Most CD-ROM drives on one controller (targets 0..MAX_CDROMS).
pub const MAX_CDROMS: usize = 16;
/// Data segments per request (config `seg_max`): the queue size less header and response.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest transfer in 512-byte sectors (config `max_sectors`): 1 MiB.
const MAX_SECTORS: u32 = 2048;
/// Defaults of the driver-writable config fields (virtio 1.x 5.6.4).
const DEFAULT_SENSE_SIZE: u32 = 96;
const DEFAULT_CDB_SIZE: u32 = 32;
/// Largest `sense_size` / `cdb_size` a driver may set (QEMU's bounds: one byte each).
const MAX_FIELD: u32 = 255;
/// Smallest `cdb_size` that can hold a command.
const MIN_CDB_SIZE: u32 = 6;
/// Bytes of `struct virtio_scsi_config`.
const CONFIG_SIZE: usize = 36;
const CONFIG_SENSE_SIZE: u64 = 20;
const CONFIG_CDB_SIZE: u64 = 24;

/// One drive: the image and the unit that answers for it.
#[derive(Debug)]
pub struct Target {
    disk: Arc<dyn DiskBackend>,
    unit: CdRom,
}

/// The driver-writable sizes, shared between the transport (config writes on a vCPU
/// thread) and the worker.
#[derive(Debug)]
struct SharedSizes {
    sense: AtomicU32,
    cdb: AtomicU32,
}

/// The SCSI host with its CD-ROM targets.
pub struct Scsi {
    targets: Arc<Vec<Target>>,
    sizes: Arc<SharedSizes>,
    name: String,
    config_log: RateLimit,
}

static INSTANCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Why a `--cdrom` could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CdromError {
    #[error(transparent)]
    Open(#[from] BlockError),
    #[error("CD-ROM image {path}: {size} bytes is less than one 2048-byte block")]
    TooSmall { path: std::path::PathBuf, size: u64 },
    #[error("at most {MAX_CDROMS} --cdrom images are supported, {0} were given")]
    TooMany(usize),
}

impl Scsi {
    /// Opens every image read-only (shared lock) and builds the controller; target N is
    /// `cdroms[N]`.
    pub fn new(cdroms: &[DiskConfig]) -> Result<Scsi, CdromError> {
        if cdroms.len() > MAX_CDROMS {
            return Err(CdromError::TooMany(cdroms.len()));
        }
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let mut targets = Vec::new();
        for (t, c) in cdroms.iter().enumerate() {
            let c = DiskConfig {
                readonly: true,
                ..c.clone()
            };
            let disk: Arc<dyn DiskBackend> =
                Arc::from(open_disk(&c).map_err(|e| CdromError::Open(e.into()))?);
            let size = disk.size();
            if size < BLOCK_SIZE {
                return Err(CdromError::TooSmall {
                    path: c.path.clone(),
                    size,
                });
            }
            if size % BLOCK_SIZE != 0 {
                log::warn!(
                    "CD-ROM image {}: {size} bytes is not a whole number of 2048-byte blocks; \
                     the last {} bytes are not visible",
                    c.path.display(),
                    size % BLOCK_SIZE
                );
            }
            let unit = CdRom::new(size, &format!("ferrovm-cd{n}-{t}"));
            targets.push(Target { disk, unit });
        }
        Ok(Scsi {
            targets: Arc::new(targets),
            sizes: Arc::new(SharedSizes {
                sense: AtomicU32::new(DEFAULT_SENSE_SIZE),
                cdb: AtomicU32::new(DEFAULT_CDB_SIZE),
            }),
            name: format!("virtio-scsi-{n}"),
            config_log: RateLimit::new(3),
        })
    }

    /// The number of targets (drives).
    pub fn targets(&self) -> usize {
        self.targets.len()
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let max_target = self.targets.len().saturating_sub(1) as u16;
        let fields32: [(usize, u32); 8] = [
            (0, 1), // num_queues: request queues
            (4, SEG_MAX),
            (8, MAX_SECTORS),
            (12, u32::from(QUEUE_SIZE)), // cmd_per_lun
            (16, 0),                     // event_info_size: no events
            (20, self.sizes.sense.load(Ordering::Relaxed)),
            (24, self.sizes.cdb.load(Ordering::Relaxed)),
            (32, 0), // max_lun
        ];
        for (off, v) in fields32 {
            c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        }
        c[28..30].copy_from_slice(&0u16.to_le_bytes()); // max_channel
        c[30..32].copy_from_slice(&max_target.to_le_bytes());
        c
    }
}

impl VirtioDevice for Scsi {
    fn device_type(&self) -> u32 {
        TYPE_SCSI
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    /// Only `sense_size` and `cdb_size` are writable, as whole 32-bit fields.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let field = match offset {
            CONFIG_SENSE_SIZE => &self.sizes.sense,
            CONFIG_CDB_SIZE => &self.sizes.cdb,
            _ => {
                self.config_log
                    .warn(|| format!("{}: write to read-only config offset {offset}", self.name));
                return;
            }
        };
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.config_log.warn(|| {
                format!(
                    "{}: {}-byte write to config offset {offset}",
                    self.name,
                    data.len()
                )
            });
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let min = if offset == CONFIG_CDB_SIZE {
            MIN_CDB_SIZE
        } else {
            0
        };
        if !(min..=MAX_FIELD).contains(&v) {
            self.config_log.warn(|| {
                format!(
                    "{}: config offset {offset} set to {v} (allowed {min}..={MAX_FIELD}); ignored",
                    self.name
                )
            });
            return;
        }
        field.store(v, Ordering::Relaxed);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<(u16, Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        if !queues.iter().any(|(i, _)| *i == REQUEST_QUEUE) {
            return Err(ActivateError::InvalidQueue {
                index: REQUEST_QUEUE,
            });
        }
        let mut served = Vec::new();
        for (index, mut queue) in queues {
            queue.set_event_idx(acked_features & VIRTIO_F_RING_EVENT_IDX != 0);
            if !queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue { index });
            }
            served.push((index, queue));
        }
        let sizes = request::Sizes {
            sense: self.sizes.sense.load(Ordering::Relaxed) as usize,
            cdb: self.sizes.cdb.load(Ordering::Relaxed) as usize,
        };
        Ok(Box::new(ScsiHandler {
            mem,
            queues: served,
            server: request::Server::new(self.targets.clone(), sizes),
        }))
    }
}

/// Serves the queues the driver made ready.
struct ScsiHandler {
    mem: GuestMemoryMmap,
    queues: Vec<(u16, Queue)>,
    server: request::Server,
}

impl VirtioHandler for ScsiHandler {
    fn queue_event(&mut self, slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let Some((index, queue)) = self.queues.get_mut(slot) else {
            return Ok(());
        };
        let notify = match *index {
            REQUEST_QUEUE => self
                .server
                .drain(&self.mem, queue, request::Kind::Command)?,
            CONTROL_QUEUE => self
                .server
                .drain(&self.mem, queue, request::Kind::Control)?,
            // Event buffers stay with the device: no event is ever reported.
            _ => false,
        };
        if notify {
            ctx.signal_used(*index).map_err(DeviceError::new)?;
        }
        Ok(())
    }
}

/// Parses a `--cdrom` value: `IMAGE` (QEMU's -cdrom), or `path=IMAGE[,format=F][,bootindex=N]`.
pub fn parse_cdrom_option(s: &str) -> Result<DiskConfig, DiskOptionError> {
    if !s.starts_with("path=") {
        if s.is_empty() {
            return Err(DiskOptionError::EmptyPath { option: s.into() });
        }
        return Ok(DiskConfig {
            readonly: true,
            ..DiskConfig::new(s)
        });
    }
    let cfg = super::block::parse_disk_option(s)?;
    let conflict = |what| {
        Err(DiskOptionError::Conflict {
            option: s.to_string(),
            what,
        })
    };
    if cfg.serial.is_some() || cfg.direct || cfg.overlay || cfg.backing.is_some() {
        return conflict("a CD-ROM takes only path, format and bootindex");
    }
    if s.split(',').any(|kv| kv == "readonly=off") {
        return conflict("a CD-ROM is read-only");
    }
    Ok(DiskConfig {
        readonly: true,
        ..cfg
    })
}
