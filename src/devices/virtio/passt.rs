//! User-mode networking (`--net user`): the host end of a virtio-net device is a passt process
//! (Debian package `passt`), which gives the guest DHCP, DNS, NAT to whatever the host reaches
//! and forwarded host ports, with no TAP and no privileges.
//!
//! ferrovm starts one passt per NIC on one end of a socket pair (`passt --fd 3 --one-off`), so
//! there is no socket path to race for and passt exits when ferrovm's end closes, even if
//! ferrovm is killed. The stream carries QEMU's "socket" framing: each Ethernet frame preceded
//! by its length as a 32-bit big-endian number. No virtio-net header crosses it: the device
//! offers no offloads on this backend, so every header the guest sends is all zeros and every
//! frame it receives gets a zeroed one.
//!
//! passt is ready when it has written its PID file (after parsing its options, binding the
//! forwarded ports and finding the host's interface); if it exits first, its error line is
//! the error of `--net user`. Run as root, passt drops to `nobody`, so its PID file lives in a
//! private directory owned by that user.

use std::fs::{self, File};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::daemon::{find_program, log_message, Daemon, PrivateDir};

use super::net::{FwdProto, HostFwd, NetBackend, MAX_FRAME_LEN};
use super::tap::VNET_HDR_LEN;

/// How long passt may take to start (it is quick, but L1 of the nested harness is emulated).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a transmit may wait for passt to make room before frames start being dropped.
const TX_STALL: Duration = Duration::from_millis(50);
/// Shortest frame passed on: an Ethernet header.
const ETH_HLEN: usize = 14;
/// `nobody:nogroup` on Debian: whom passt runs as when started by root.
const NOBODY: u32 = 65534;

/// Why `--net user` could not start.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("--net user needs passt, which is not in PATH: install the Debian package `passt`")]
    NotInstalled,
    #[error("--net user: {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("--net user: passt exited ({status}): {message}")]
    Failed { status: String, message: String },
    #[error("--net user: passt did not start within {} s", START_TIMEOUT.as_secs())]
    Timeout,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PasstError {
    let what = what.into();
    move |source| PasstError::Io { what, source }
}

/// The passt `-t`/`-u` argument for one forward: `[ADDR/]PORT:GUESTPORT`.
pub fn passt_forward_args(f: &HostFwd) -> [String; 2] {
    let flag = match f.proto {
        FwdProto::Tcp => "-t",
        FwdProto::Udp => "-u",
    };
    let addr = f.addr.map(|a| format!("{a}/")).unwrap_or_default();
    [
        flag.to_string(),
        format!("{addr}{}:{}", f.host_port, f.guest_port),
    ]
}

/// Where the next received bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxState {
    /// The 4-byte length prefix, `got` bytes of it read.
    Len { got: usize },
    /// A frame of `len` bytes, `got` read.
    Body { len: usize, got: usize },
    /// A frame too large to pass on, `left` bytes still to discard.
    Skip { left: usize },
}

/// A running passt and ferrovm's end of its socket.
pub struct Passt {
    stream: FrameStream,
    daemon: Daemon,
}

/// Ethernet frames over a stream socket in QEMU's length-prefixed framing.
pub struct FrameStream {
    sock: UnixStream,
    rx: RxState,
    len_buf: [u8; 4],
    frame: Vec<u8>,
    /// The unsent tail of a record the peer had no room for; sent before any other frame.
    tx_rest: Vec<u8>,
}

/// What passt says on stderr that is not an error: it cannot reach syslog, it drops root.
const PASST_NOISE: &[&str] = &["Failed to send", "Don't run as root"];

impl Passt {
    /// Starts passt with the given port forwards and waits until it is ready.
    pub fn spawn(hostfwd: &[HostFwd]) -> Result<Passt, PasstError> {
        let prog = find_program("passt", &[]).ok_or(PasstError::NotInstalled)?;
        let dir =
            PrivateDir::create("passt").map_err(io_err("cannot create a temporary directory"))?;
        let pid_file = dir.path().join("pid");
        let log_file = dir.path().join("log");
        let (ours, theirs) = UnixStream::pair().map_err(io_err("socketpair"))?;
        let log = File::create(&log_file).map_err(io_err(format!("{}", log_file.display())))?;
        let mut cmd = Command::new(&prog);
        cmd.args(["--foreground", "--quiet", "--one-off"])
            .args(["--fd", &theirs.as_raw_fd().to_string()])
            .arg("--pid")
            .arg(&pid_file);
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY))
                .map_err(io_err(format!("chown {}", dir.path().display())))?;
            cmd.args(["--runas", &format!("{NOBODY}:{NOBODY}")]);
        }
        for f in hostfwd {
            cmd.args(passt_forward_args(f));
        }
        let daemon = Daemon::spawn(cmd, theirs.as_raw_fd(), log)
            .map_err(io_err(format!("cannot run {}", prog.display())))?;
        drop(theirs);
        let mut passt = Passt {
            stream: FrameStream::new(ours).map_err(io_err("non-blocking socket"))?,
            daemon,
        };
        passt.wait_ready(&pid_file, &log_file)?;
        Ok(passt)
    }

    fn wait_ready(&mut self, pid_file: &Path, log_file: &Path) -> Result<(), PasstError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.daemon.exited().map_err(io_err("waitpid passt"))? {
                return Err(PasstError::Failed {
                    status: status.to_string(),
                    message: log_message(log_file, PASST_NOISE),
                });
            }
            if fs::metadata(pid_file).is_ok_and(|m| m.len() > 0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PasstError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl FrameStream {
    /// Frames over `sock`, which is made non-blocking.
    pub fn new(sock: UnixStream) -> io::Result<FrameStream> {
        sock.set_nonblocking(true)?;
        Ok(FrameStream {
            sock,
            rx: RxState::Len { got: 0 },
            len_buf: [0; 4],
            frame: vec![0; MAX_FRAME_LEN],
            tx_rest: Vec::new(),
        })
    }

    /// Sends what is left of a partly sent record. Ok(true) when nothing is left.
    fn flush_rest(&mut self) -> io::Result<bool> {
        while !self.tx_rest.is_empty() {
            match (&self.sock).write(&self.tx_rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_rest.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Waits up to [`TX_STALL`] for passt to take the rest of a record.
    fn flush_rest_waiting(&mut self) -> io::Result<bool> {
        self.sock.set_nonblocking(false)?;
        self.sock.set_write_timeout(Some(TX_STALL))?;
        let r = self.flush_rest();
        self.sock.set_nonblocking(true)?;
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            r => r,
        }
    }

    fn recv(&mut self, range: std::ops::Range<usize>, into_len: bool) -> io::Result<usize> {
        let buf = if into_len {
            &mut self.len_buf[range]
        } else {
            &mut self.frame[range]
        };
        match (&self.sock).read(buf) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "passt closed its socket (it exited)",
            )),
            r => r,
        }
    }
}

impl AsRawFd for Passt {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.sock.as_raw_fd()
    }
}

impl NetBackend for Passt {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read_frame(buf)
    }
    fn write_frame(&mut self, iov: &[&[u8]]) -> io::Result<usize> {
        self.stream.write_frame(iov)
    }
}

impl AsRawFd for FrameStream {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for FrameStream {
    /// Reads at most one record's worth of bytes per `read`, so whatever is not consumed stays
    /// in the socket and keeps it readable for the worker's epoll.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.rx {
                RxState::Len { got } => {
                    let got = got + self.recv(got..4, true)?;
                    self.rx = if got < 4 {
                        RxState::Len { got }
                    } else {
                        match u32::from_be_bytes(self.len_buf) as usize {
                            len if len > MAX_FRAME_LEN || len + VNET_HDR_LEN > buf.len() => {
                                RxState::Skip { left: len }
                            }
                            len => RxState::Body { len, got: 0 },
                        }
                    };
                }
                RxState::Body { len, got } if got == len => {
                    self.rx = RxState::Len { got: 0 };
                    if len < ETH_HLEN {
                        return Ok(0); // counted as a runt by the device
                    }
                    buf[..VNET_HDR_LEN].fill(0);
                    buf[VNET_HDR_LEN..VNET_HDR_LEN + len].copy_from_slice(&self.frame[..len]);
                    return Ok(VNET_HDR_LEN + len);
                }
                RxState::Body { len, got } => {
                    let got = got + self.recv(got..len, false)?;
                    self.rx = RxState::Body { len, got };
                }
                RxState::Skip { left: 0 } => {
                    self.rx = RxState::Len { got: 0 };
                    return Ok(0);
                }
                RxState::Skip { left } => {
                    let n = self.recv(0..left.min(self.frame.len()), false)?;
                    self.rx = RxState::Skip { left: left - n };
                }
            }
        }
    }

    /// Sends one frame (the virtio-net header is dropped). A frame passt has no room for
    /// waits briefly, then is kept and sent before the next one; while it is stuck, new frames
    /// are dropped (as a congested link drops them) so the worker never blocks for long.
    fn write_frame(&mut self, iov: &[&[u8]]) -> io::Result<usize> {
        if !self.flush_rest()? {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "passt is not reading: frame dropped",
            ));
        }
        let data = iov.concat();
        let frame = data.get(VNET_HDR_LEN..).unwrap_or_default();
        let len = (frame.len() as u32).to_be_bytes();
        let total = len.len() + frame.len();
        let sent = loop {
            match (&self.sock).write_vectored(&[IoSlice::new(&len), IoSlice::new(frame)]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                r => break r?,
            }
        };
        if sent < total {
            self.tx_rest = [&len[..], frame].concat().split_off(sent);
            self.flush_rest_waiting()?;
        }
        Ok(data.len())
    }
}

#[cfg(test)]
mod tests;
