//! virtio-fs (virtio 1.x, 5.11): a host folder in the guest (`mount -t virtiofs TAG /mnt`),
//! served by virtiofsd over vhost-user. ferrovm implements no FUSE server: it owns the
//! virtio-pci device (configuration space with the tag, two queues: hiprio and one request
//! queue) and relays the queues to the daemon ([`super::vhost_user`]).
//!
//! `--fs tag=NAME,path=DIR[,readonly=on]` starts virtiofsd for DIR on a listening socket
//! ferrovm made and already connected to, so a daemon that fails to start closes the
//! connection (its error line is ferrovm's error) and nothing waits for a socket file to
//! appear. `--fs tag=NAME,socket=PATH` connects to a daemon the user started.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::daemon::{find_program, log_message, Daemon, PrivateDir};
use super::vhost_user::{OrphanedRequests, VhostUserBackend, VhostUserError, VhostUserRelay};
use super::{ActivateError, VirtioDevice, VirtioHandler};

/// virtio device type of a file system device.
pub const TYPE_FS: u32 = 26;
/// Longest tag (the configuration field is 36 bytes, NUL-padded).
pub const TAG_MAX: usize = 36;
/// hiprio + one request queue.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];

/// `--fs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    pub tag: String,
    pub source: FsSource,
}

/// Who serves the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsSource {
    /// ferrovm starts virtiofsd for this folder. `submounts`: tell the guest which folders
    /// are mount points (virtiofsd's default); off for a share that becomes an overlayfs
    /// lower layer, which refuses the automount points the guest would make of them.
    Dir {
        path: PathBuf,
        readonly: bool,
        submounts: bool,
    },
    /// A vhost-user-fs daemon already listening on this socket.
    Socket(PathBuf),
}

/// A malformed `--fs` option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsConfigError {
    #[error("--fs {0:?}: missing tag=NAME")]
    MissingTag(String),
    #[error("--fs {0:?}: give path=DIR (ferrovm starts virtiofsd) or socket=PATH (a running one)")]
    MissingSource(String),
    #[error("--fs {0:?}: path= and socket= exclude each other")]
    TwoSources(String),
    #[error("--fs {0:?}: readonly=on is for path= (a daemon on socket= has its own settings)")]
    ReadonlyWithSocket(String),
    #[error("--fs {input:?}: tag {tag:?} must be 1 to {TAG_MAX} bytes without NUL or ','")]
    BadTag { input: String, tag: String },
    #[error("--fs {input:?}: unknown key {key:?} (expected tag=NAME,path=DIR[,readonly=on] or tag=NAME,socket=PATH)")]
    UnknownKey { input: String, key: String },
    #[error("--fs {input:?}: {key} given twice")]
    Duplicate { input: String, key: String },
    #[error("--fs {input:?}: readonly={value:?} (expected on or off)")]
    BadReadonly { input: String, value: String },
    #[error("--fs: tag {0:?} is used by two shares")]
    DuplicateTag(String),
}

/// Parses `tag=NAME,path=DIR[,readonly=on]` or `tag=NAME,socket=PATH`.
pub fn parse_fs_option(s: &str) -> Result<FsConfig, FsConfigError> {
    let (mut tag, mut path, mut socket, mut readonly) = (None, None, None, None);
    for item in s.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        let slot = match key {
            "tag" => &mut tag,
            "path" => &mut path,
            "socket" => &mut socket,
            "readonly" => &mut readonly,
            _ => {
                return Err(FsConfigError::UnknownKey {
                    input: s.into(),
                    key: key.into(),
                })
            }
        };
        if slot.replace(value.to_string()).is_some() {
            return Err(FsConfigError::Duplicate {
                input: s.into(),
                key: key.into(),
            });
        }
    }
    let tag = tag.ok_or_else(|| FsConfigError::MissingTag(s.into()))?;
    if tag.is_empty() || tag.len() > TAG_MAX || tag.contains('\0') {
        return Err(FsConfigError::BadTag {
            input: s.into(),
            tag,
        });
    }
    let readonly = match readonly.as_deref() {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => {
            return Err(FsConfigError::BadReadonly {
                input: s.into(),
                value: v.into(),
            })
        }
    };
    let source = match (path, socket) {
        (Some(_), Some(_)) => return Err(FsConfigError::TwoSources(s.into())),
        (None, None) => return Err(FsConfigError::MissingSource(s.into())),
        (Some(p), None) => FsSource::Dir {
            path: p.into(),
            readonly,
            submounts: true,
        },
        (None, Some(_)) if readonly => return Err(FsConfigError::ReadonlyWithSocket(s.into())),
        (None, Some(p)) => FsSource::Socket(p.into()),
    };
    Ok(FsConfig { tag, source })
}

/// Checks a whole `--fs` list (tags must differ).
pub fn check_fs_list(list: &[FsConfig]) -> Result<(), FsConfigError> {
    for (i, a) in list.iter().enumerate() {
        if list[..i].iter().any(|b| b.tag == a.tag) {
            return Err(FsConfigError::DuplicateTag(a.tag.clone()));
        }
    }
    Ok(())
}

/// Why a share could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(
        "--fs needs virtiofsd, which is not in PATH or /usr/libexec: run scripts/setup-host \
         (cargo install virtiofsd) or give socket=PATH"
    )]
    NotInstalled,
    #[error("--fs {tag}: {path}: {reason}")]
    BadDir {
        tag: String,
        path: PathBuf,
        reason: String,
    },
    #[error("--fs {tag}: {what}: {source}")]
    Io {
        tag: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--fs {tag}: virtiofsd failed ({status}): {message}")]
    Daemon {
        tag: String,
        status: String,
        message: String,
    },
    #[error("--fs {tag}: {source}")]
    Backend {
        tag: String,
        #[source]
        source: VhostUserError,
    },
}

/// A started virtiofsd: the daemon, ferrovm's connection, and where its log is until the
/// handshake shows it started.
struct Started {
    daemon: Daemon,
    stream: UnixStream,
    tmp: PrivateDir,
}

fn check_dir(tag: &str, dir: &Path) -> Result<(), FsError> {
    let reason = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => "not a directory".to_string(),
        Err(e) => e.to_string(),
    };
    Err(FsError::BadDir {
        tag: tag.into(),
        path: dir.into(),
        reason,
    })
}

/// Starts virtiofsd for `dir` on a socket ferrovm is already connected to.
fn start_virtiofsd(
    tag: &str,
    dir: &Path,
    readonly: bool,
    submounts: bool,
) -> Result<Started, FsError> {
    let io = |what: &str| {
        let (tag, what) = (tag.to_string(), what.to_string());
        move |source| FsError::Io { tag, what, source }
    };
    check_dir(tag, dir)?;
    let prog = find_program("virtiofsd", &["/usr/libexec", "/usr/lib/qemu"])
        .ok_or(FsError::NotInstalled)?;
    let tmp = PrivateDir::create("virtiofsd").map_err(io("temporary directory"))?;
    let sock_path = tmp.path().join("vhost-user.sock");
    let listener = UnixListener::bind(&sock_path).map_err(io("vhost-user socket"))?;
    // Connected before virtiofsd runs: the connection waits in the backlog until it accepts,
    // and is reset if it exits first (ferrovm's copy of the listener is closed below).
    let stream = UnixStream::connect(&sock_path).map_err(io("vhost-user socket"))?;
    let log = File::create(tmp.path().join("log")).map_err(io("virtiofsd log"))?;
    let mut cmd = Command::new(&prog);
    cmd.arg(format!("--fd={}", listener.as_raw_fd()))
        .arg("--shared-dir")
        .arg(dir)
        .args(["--log-level=error", "--thread-pool-size=0", "--cache=auto"]);
    if readonly {
        cmd.arg("--readonly");
    }
    if !submounts {
        cmd.arg("--no-announce-submounts");
    }
    let daemon = Daemon::spawn(cmd, listener.as_raw_fd(), log)
        .map_err(io(&format!("cannot run {}", prog.display())))?;
    drop(listener);
    Ok(Started {
        daemon,
        stream,
        tmp,
    })
}

/// Connects to the share's backend, starting virtiofsd when asked to.
fn open_backend(cfg: &FsConfig) -> Result<(Option<Daemon>, VhostUserBackend), FsError> {
    let tag = &cfg.tag;
    let queues = QUEUE_SIZES.len();
    match &cfg.source {
        FsSource::Socket(path) => {
            let stream = UnixStream::connect(path).map_err(|source| FsError::Io {
                tag: tag.clone(),
                what: format!("cannot connect to {}", path.display()),
                source,
            })?;
            let backend =
                VhostUserBackend::connect(stream, queues).map_err(|source| FsError::Backend {
                    tag: tag.clone(),
                    source,
                })?;
            Ok((None, backend))
        }
        FsSource::Dir {
            path,
            readonly,
            submounts,
        } => {
            let mut s = start_virtiofsd(tag, path, *readonly, *submounts)?;
            match VhostUserBackend::connect(s.stream, queues) {
                Ok(backend) => Ok((Some(s.daemon), backend)),
                Err(source) => {
                    // It closed the connection: it is exiting; give it a moment to say why.
                    let mut status = None;
                    for _ in 0..200 {
                        status = s.daemon.exited().ok().flatten();
                        if status.is_some() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    let Some(status) = status else {
                        return Err(FsError::Backend {
                            tag: tag.clone(),
                            source,
                        });
                    };
                    Err(FsError::Daemon {
                        tag: tag.clone(),
                        status: status.to_string(),
                        message: log_message(&s.tmp.path().join("log"), &[]),
                    })
                }
            }
        }
    }
}

/// Answers FUSE requests with EIO once the daemon is gone, so guest programs get an error
/// instead of waiting forever. A request starts with `fuse_in_header` (len, opcode, unique at
/// offset 8, ...); the answer is a bare `fuse_out_header` {len 16, error -EIO, unique}. Requests
/// without a reply buffer (FORGET) are just returned.
struct FuseEio;

const FUSE_IN_UNIQUE: std::ops::Range<usize> = 8..16;
const FUSE_OUT_HEADER_LEN: u32 = 16;

impl OrphanedRequests for FuseEio {
    fn fail(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let mut head = [0u8; 16];
        let mut got = 0usize;
        let mut reply_at = None;
        for desc in chain {
            if desc.is_write_only() {
                if reply_at.is_none() && desc.len() >= FUSE_OUT_HEADER_LEN {
                    reply_at = Some(desc.addr());
                }
            } else if got < head.len() {
                let n = (desc.len() as usize).min(head.len() - got);
                if mem
                    .read_slice(&mut head[got..got + n], desc.addr())
                    .is_err()
                {
                    return 0;
                }
                got += n;
            }
        }
        let (Some(at), true) = (reply_at, got == head.len()) else {
            return 0;
        };
        let mut reply = [0u8; FUSE_OUT_HEADER_LEN as usize];
        reply[..4].copy_from_slice(&FUSE_OUT_HEADER_LEN.to_le_bytes());
        reply[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
        reply[8..].copy_from_slice(&head[FUSE_IN_UNIQUE]);
        match mem.write_slice(&reply, at) {
            Ok(()) => FUSE_OUT_HEADER_LEN,
            Err(_) => 0,
        }
    }
}

/// A virtio-fs device.
pub struct Fs {
    tag: String,
    config: [u8; TAG_MAX + 4],
    backend: VhostUserBackend,
    /// The daemon ferrovm started (None for socket=), killed with the device.
    _daemon: Option<Daemon>,
}

impl Fs {
    /// Starts (or connects to) the share's daemon and negotiates with it.
    pub fn new(cfg: &FsConfig) -> Result<Fs, FsError> {
        let (daemon, backend) = open_backend(cfg)?;
        let mut config = [0u8; TAG_MAX + 4];
        config[..cfg.tag.len()].copy_from_slice(cfg.tag.as_bytes());
        config[TAG_MAX..].copy_from_slice(&1u32.to_le_bytes()); // num_request_queues
        Ok(Fs {
            tag: cfg.tag.clone(),
            config,
            backend,
            _daemon: daemon,
        })
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn name(&self) -> String {
        format!("virtio-fs-{}", self.tag)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.backend.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only (virtio 1.x 5.11.4).
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<(u16, Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: QUEUE_SIZES.len(),
            });
        }
        let relay = self
            .backend
            .start(
                &self.name(),
                mem,
                acked_features,
                queues,
                Some(Box::new(FuseEio)),
            )
            .map_err(|e| {
                ActivateError::Worker(std::io::Error::other(format!(
                    "virtio-fs {}: {e}",
                    self.tag
                )))
            })?;
        Ok(Box::new(relay))
    }

    fn deactivate(&mut self, handler: Box<dyn VirtioHandler>) {
        match super::worker::downcast::<VhostUserRelay>(handler) {
            Some(relay) => self.backend.stop(&relay),
            None => log::error!("virtio-fs {}: foreign handler given back", self.tag),
        }
    }
}

#[cfg(test)]
mod tests;
