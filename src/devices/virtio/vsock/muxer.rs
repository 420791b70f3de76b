//! The host side of virtio-vsock: guest stream connections mapped onto Unix sockets, in the
//! "hybrid vsock" convention of Firecracker and Cloud Hypervisor.
//!
//! - A host program connects to the listener at PATH and writes `CONNECT <port>\n`; ferrovm
//!   sends the guest a REQUEST from host port 2^30+n to `<port>`; on the guest's RESPONSE the
//!   program reads `OK <host port>\n` and the socket is the stream. A RST closes it.
//! - A guest connection to CID 2 port P is a connection to the Unix socket `PATH_P`.
//!
//! Flow control is virtio's credit: ferrovm reads a host socket only while the guest has room
//! (`buf_alloc - (sent - fwd_cnt)`) and only into receive buffers the guest posted, and buffers at
//! most [`CONN_BUF`] bytes per connection towards the host (what it advertises; a guest that
//! sends more is reset). Control packets wait in a queue whose growth stops TX processing, so
//! memory is bounded by connections x CONN_BUF whatever the guest or the host programs do.
//!
//! Two epoll sets, handed to the worker as its two backend fds: `rx_epoll` (the listener,
//! host clients before their CONNECT line, connections the guest has credit for: everything
//! whose handling sends the guest a packet, so the worker stops watching it while the guest
//! posts no receive buffers) and `tx_epoll` (connections with bytes waiting for the host).

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::rx::Rx;
use crate::devices::virtio::DeviceError;
use crate::ratelimit::RateLimit;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Bytes buffered towards the host per connection (the `buf_alloc` the guest sees).
pub const CONN_BUF: u32 = 256 << 10;
/// Connections at once; more are refused (RST to the guest, closed host client).
pub const MAX_CONNS: usize = 128;
/// Host clients that have not sent their CONNECT line yet; a new one evicts the oldest.
const MAX_PENDING: usize = 32;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
/// TX processing stops while this many control packets wait for receive buffers.
pub const CTRL_GATE: usize = 256;
/// A credit update goes to the guest once this many bytes were forwarded since the last one.
const CREDIT_UPDATE_AFTER: u32 = CONN_BUF / 4;
/// How long a host-initiated connection waits for the guest's answer (Firecracker's 2 s).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// First host port of host-initiated connections (Firecracker's choice).
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Packets read from one host socket per event (fairness between connections).
const PACKETS_PER_EVENT: usize = 64;

const TOKEN_LISTENER: u64 = 0;

/// Why the listener could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("vsock socket {0}: another process is listening on it")]
    InUse(PathBuf),
    #[error("vsock socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("vsock socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Guest-side port (peer) and host-side port (local) of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    local: u32,
    peer: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// The guest's receive window, from its latest packet.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    rx_cnt: u32,
    /// Payload bytes forwarded to the host socket, and the count the guest last saw.
    fwd_cnt: u32,
    last_fwd_sent: u32,
    to_host: VecDeque<u8>,
    host_eof: bool,
    host_shut_wr: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shut: u32,
    credit_update_queued: bool,
    in_rx: bool,
    in_tx: bool,
    /// When the REQUEST of a host-initiated connection was queued.
    since: std::time::Instant,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Conn {
        Conn {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            to_host: VecDeque::new(),
            host_eof: false,
            host_shut_wr: false,
            peer_shut: 0,
            credit_update_queued: false,
            in_rx: false,
            in_tx: false,
            since: std::time::Instant::now(),
        }
    }

    /// Bytes the guest can still take on this connection.
    fn credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_rx(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.credit() > 0
    }
}

/// A host client that has not sent its CONNECT line yet.
struct Pending {
    stream: UnixStream,
    token: u64,
    line: Vec<u8>,
}

/// A control packet waiting for a receive buffer; its credit fields are filled when it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ctrl {
    key: Key,
    op: u16,
    flags: u32,
}

/// All connections of one device.
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    /// The listener is out of rx_epoll: accept failed for want of fds (EMFILE), and a
    /// readable listener nobody can accept from would wake the worker forever.
    listener_paused: bool,
    rx_epoll: Epoll,
    tx_epoll: Epoll,
    pending: VecDeque<Pending>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    ctrl: VecDeque<Ctrl>,
    /// Connections the last rx_epoll poll found readable.
    readable: Vec<Key>,
    next_token: u64,
    next_local_port: u32,
    log: RateLimit,
}

impl Muxer {
    /// Listens on `path` (a stale socket nobody listens on is replaced).
    pub fn new(guest_cid: u64, path: &Path) -> Result<Muxer, ListenError> {
        let io = |source| ListenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let listener = bind(path)?;
        listener.set_nonblocking(true).map_err(io)?;
        let rx_epoll = Epoll::new().map_err(io)?;
        let tx_epoll = Epoll::new().map_err(io)?;
        rx_epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(io)?;
        Ok(Muxer {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            listener_paused: false,
            rx_epoll,
            tx_epoll,
            pending: VecDeque::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            ctrl: VecDeque::new(),
            readable: Vec::new(),
            next_token: 1,
            next_local_port: LOCAL_PORT_BASE,
            log: RateLimit::new(10),
        })
    }

    /// The two fds the worker watches: [rx_epoll, tx_epoll].
    pub fn fds(&self) -> [RawFd; 2] {
        [self.rx_epoll.as_raw_fd(), self.tx_epoll.as_raw_fd()]
    }

    /// Control packets waiting for receive buffers.
    pub fn ctrl_backlog(&self) -> usize {
        self.ctrl.len()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (device reset): host programs see their sockets close.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.conns.clear();
        self.tokens.clear();
        self.ctrl.clear();
        self.readable.clear();
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn queue(&mut self, key: Key, op: u16, flags: u32) {
        if op == op::CREDIT_UPDATE {
            match self.conns.get_mut(&key) {
                Some(c) if !c.credit_update_queued => c.credit_update_queued = true,
                _ => return,
            }
        }
        self.ctrl.push_back(Ctrl { key, op, flags });
    }

    /// Watches the listener again after an fd was freed.
    fn resume_listener(&mut self) {
        if !self.listener_paused {
            return;
        }
        let ev = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
        if self
            .rx_epoll
            .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
            .is_ok()
        {
            self.listener_paused = false;
        }
    }

    /// Queues a reset of `key` for the guest.
    fn send_rst(&mut self, key: Key) {
        self.ctrl.push_back(Ctrl {
            key,
            op: op::RST,
            flags: 0,
        });
    }

    /// Closes a connection; with `rst` the guest is told.
    fn close(&mut self, key: Key, rst: bool) {
        self.resume_listener();
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if rst {
                self.send_rst(key);
            }
        }
    }

    /// Registers a connection in the epoll sets its state calls for.
    fn update_interest(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let (fd, token) = (c.stream.as_raw_fd(), c.token);
        let (want_rx, want_tx) = (c.wants_rx(), !c.to_host.is_empty());
        let set = |ep: &Epoll, on: &mut bool, want: bool, events: EventSet| {
            if *on == want {
                return Ok(());
            }
            let op = if want {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            ep.ctl(op, fd, EpollEvent::new(events, token))?;
            *on = want;
            Ok::<(), io::Error>(())
        };
        let r = set(&self.rx_epoll, &mut c.in_rx, want_rx, EventSet::IN)
            .and_then(|_| set(&self.tx_epoll, &mut c.in_tx, want_tx, EventSet::OUT));
        if let Err(e) = r {
            self.log
                .warn(|| format!("vsock: cannot watch a host socket: {e}"));
            self.close(key, true);
        }
    }

    // ---- packets from the guest

    /// Handles one packet the guest sent.
    pub fn guest_packet(&mut self, h: &Header, payload: &[u8]) {
        if h.src_cid != self.guest_cid {
            self.log.warn(|| {
                format!(
                    "vsock: dropped a packet from CID {} (the guest is CID {})",
                    h.src_cid, self.guest_cid
                )
            });
            return;
        }
        let key = Key {
            local: h.dst_port,
            peer: h.src_port,
        };
        let reject = |m: &mut Muxer| {
            if h.op != op::RST {
                m.send_rst(key);
            }
        };
        if h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            return reject(self);
        }
        if h.op == op::REQUEST {
            if self.conns.contains_key(&key) {
                return self.close(key, true);
            }
            return self.guest_connect(key, h);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return reject(self);
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE => self.guest_accepted(key),
            op::RW => self.guest_data(key, payload),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.queue(key, op::CREDIT_UPDATE, 0),
            op::SHUTDOWN => {
                c.peer_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush(key);
            }
            op::RST => return self.close(key, false),
            _ => return self.close(key, true),
        }
        self.update_interest(key);
    }

    /// A guest REQUEST to host port `key.local`: connect to `PATH_<port>`.
    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.len() >= MAX_CONNS {
            self.log
                .warn(|| format!("vsock: refused a guest connection: {MAX_CONNS} are open"));
            return self.send_rst(key);
        }
        let mut target = self.path.as_os_str().to_owned();
        target.push(format!("_{}", key.local));
        let stream = match connect_nonblocking(Path::new(&target)) {
            Ok(s) => s,
            Err(_) => return self.send_rst(key),
        };
        let token = self.token();
        let mut c = Conn::new(stream, token, State::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.conns.insert(key, c);
        self.tokens.insert(token, key);
        self.queue(key, op::RESPONSE, 0);
        self.update_interest(key);
    }

    /// The guest accepted a host-initiated connection: tell the host program.
    fn guest_accepted(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != State::Connecting {
            return self.close(key, true);
        }
        c.state = State::Established;
        // A socket that just connected has its whole receive buffer free: the short line fits.
        let line = format!("OK {}\n", key.local);
        if !matches!(c.stream.write(line.as_bytes()), Ok(n) if n == line.len()) {
            self.close(key, true);
        }
    }

    fn guest_data(&mut self, key: Key, payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != State::Established || c.peer_shut & SHUTDOWN_SEND != 0 {
            return self.close(key, true);
        }
        if c.to_host.len() + payload.len() > CONN_BUF as usize {
            self.log.warn(|| {
                format!(
                    "vsock: the guest sent past its credit on port {}: connection reset",
                    key.local
                )
            });
            return self.close(key, true);
        }
        // Nothing queued: straight to the socket, buffering only what it does not take.
        let mut rest = payload;
        if c.to_host.is_empty() {
            match c.stream.write(payload) {
                Ok(n) => {
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    rest = &payload[n..];
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close(key, true),
            }
        }
        c.to_host.extend(rest);
        self.flush(key);
    }

    /// Writes what waits for the host; carries out the guest's shutdowns once it is written.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close(key, true),
            }
        }
        if c.fwd_cnt.wrapping_sub(c.last_fwd_sent) >= CREDIT_UPDATE_AFTER {
            self.queue(key, op::CREDIT_UPDATE, 0);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.to_host.is_empty() {
            if c.peer_shut & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                return self.close(key, true);
            }
            if c.peer_shut & SHUTDOWN_SEND != 0 && !c.host_shut_wr {
                c.host_shut_wr = true;
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        self.update_interest(key);
    }

    // ---- host events

    /// Serves what rx_epoll reports: new host clients, CONNECT lines, readable connections
    /// (read later by [`Muxer::fill_rx`]).
    pub fn poll_rx(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 32];
        let n = self.rx_epoll.wait(0, &mut events)?;
        for ev in &events[..n] {
            let token = ev.data();
            if token == TOKEN_LISTENER {
                self.accept();
            } else if let Some(&key) = self.tokens.get(&token) {
                if !self.readable.contains(&key) {
                    self.readable.push(key);
                }
            } else {
                self.pending_line(token);
            }
        }
        Ok(())
    }

    /// Serves what tx_epoll reports: host sockets with room for buffered bytes.
    pub fn poll_tx(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 32];
        let n = self.tx_epoll.wait(0, &mut events)?;
        for ev in &events[..n] {
            if let Some(&key) = self.tokens.get(&ev.data()) {
                self.flush(key);
            }
        }
        Ok(())
    }

    /// Resets host-initiated connections the guest has not answered in time (their clients
    /// may be gone; nothing else would free their slots).
    fn expire_connecting(&mut self) {
        let stale: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Connecting && c.since.elapsed() > CONNECT_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.close(key, true);
        }
    }

    fn accept(&mut self) {
        self.expire_connecting();
        for _ in 0..8 {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    self.log.warn(|| {
                        format!("vsock: out of file descriptors ({e}): new host clients wait")
                    });
                    let fd = self.listener.as_raw_fd();
                    if self
                        .rx_epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                        .is_ok()
                    {
                        self.listener_paused = true;
                    }
                    return;
                }
                Err(e) => {
                    self.log.warn(|| format!("vsock: accept failed: {e}"));
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                self.pending.pop_front();
            }
            let token = self.token();
            let ev = EpollEvent::new(EventSet::IN, token);
            if self
                .rx_epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                .is_ok()
            {
                self.pending.push_back(Pending {
                    stream,
                    token,
                    line: Vec::new(),
                });
            }
        }
    }

    /// Reads a host client's CONNECT line (never past its newline: what follows is stream data).
    fn pending_line(&mut self, token: u64) {
        let Some(i) = self.pending.iter().position(|p| p.token == token) else {
            return;
        };
        let p = &mut self.pending[i];
        let mut peek = [0u8; MAX_LINE];
        // SAFETY: recv writes at most `peek.len()` bytes into `peek`, which outlives the call.
        let n = unsafe {
            libc::recv(
                p.stream.as_raw_fd(),
                peek.as_mut_ptr().cast(),
                peek.len(),
                libc::MSG_PEEK,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == ErrorKind::WouldBlock {
            return;
        }
        let n = n.max(0) as usize;
        let take = peek[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |nl| nl + 1);
        let mut got = vec![0u8; take];
        let ok = n > 0 && matches!(p.stream.read(&mut got), Ok(r) if r == take);
        p.line.extend_from_slice(&got);
        if !ok || p.line.len() > MAX_LINE {
            self.pending.remove(i);
            self.resume_listener();
            return;
        }
        if p.line.last() != Some(&b'\n') {
            return;
        }
        let Some(p) = self.pending.remove(i) else {
            return;
        };
        let _ = self.rx_epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        match parse_connect(&p.line) {
            Some(port) if self.conns.len() < MAX_CONNS => self.host_connect(p, port),
            _ => {}
        }
    }

    /// A host client asked for guest port `port`: send the guest a REQUEST.
    fn host_connect(&mut self, p: Pending, port: u32) {
        let key = loop {
            let local = self.next_local_port;
            self.next_local_port = local.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            let key = Key { local, peer: port };
            if !self.conns.contains_key(&key) {
                break key;
            }
        };
        self.conns
            .insert(key, Conn::new(p.stream, p.token, State::Connecting));
        self.tokens.insert(p.token, key);
        self.queue(key, op::REQUEST, 0);
    }

    // ---- packets to the guest

    fn header(&mut self, c: &Ctrl) -> Header {
        let fwd_cnt = match self.conns.get_mut(&c.key) {
            Some(conn) => {
                conn.last_fwd_sent = conn.fwd_cnt;
                if c.op == op::CREDIT_UPDATE {
                    conn.credit_update_queued = false;
                }
                conn.fwd_cnt
            }
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: c.key.local,
            dst_port: c.key.peer,
            len: 0,
            kind: TYPE_STREAM,
            op: c.op,
            flags: c.flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    /// Fills the guest's receive buffers: control packets first, then data of readable host
    /// sockets. Returns false when buffers ran out with packets still to send (the caller
    /// stops watching rx_epoll until the guest posts more).
    pub fn fill_rx(&mut self, rx: &mut Rx, scratch: &mut [u8]) -> Result<bool, DeviceError> {
        if !self.send_ctrl(rx)? {
            return Ok(false);
        }
        let readable = std::mem::take(&mut self.readable);
        for key in readable {
            if !self.read_host(key, rx, scratch)? {
                return Ok(false);
            }
        }
        self.send_ctrl(rx)
    }

    fn send_ctrl(&mut self, rx: &mut Rx) -> Result<bool, DeviceError> {
        while let Some(c) = self.ctrl.front().copied() {
            let Some((head, buf)) = rx.pop()? else {
                return Ok(false);
            };
            self.ctrl.pop_front();
            let h = self.header(&c);
            rx.deliver(head, &buf, &h, &[])?;
        }
        Ok(true)
    }

    /// Reads host socket `key` into receive buffers while the guest has credit.
    fn read_host(
        &mut self,
        key: Key,
        rx: &mut Rx,
        scratch: &mut [u8],
    ) -> Result<bool, DeviceError> {
        for _ in 0..PACKETS_PER_EVENT {
            let Some(c) = self.conns.get(&key) else {
                return Ok(true);
            };
            if !c.wants_rx() {
                break;
            }
            let Some((head, buf)) = rx.pop()? else {
                // Not served yet: the next poll reports it again.
                return Ok(false);
            };
            if buf.payload_room() == 0 {
                // Too small for data (a hostile guest's buffer): returned empty.
                rx.discard(head)?;
                continue;
            }
            let Some(c) = self.conns.get_mut(&key) else {
                return Ok(true);
            };
            let room = buf
                .payload_room()
                .min(c.credit() as usize)
                .min(scratch.len());
            match c.stream.read(&mut scratch[..room]) {
                Ok(0) => {
                    rx.undo();
                    c.host_eof = true;
                    self.queue(key, op::SHUTDOWN, SHUTDOWN_SEND);
                    break;
                }
                Ok(n) => {
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    let h = self.header(&Ctrl {
                        key,
                        op: op::RW,
                        flags: 0,
                    });
                    rx.deliver(head, &buf, &h, &scratch[..n])?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    rx.undo();
                    break;
                }
                Err(_) => {
                    rx.undo();
                    self.close(key, true);
                    return Ok(true);
                }
            }
        }
        self.update_interest(key);
        Ok(true)
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `CONNECT <port>\n` (Firecracker's hybrid vsock handshake).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?.strip_suffix('\n')?;
    port.trim_end_matches('\r').parse().ok()
}

/// Binds the listener, replacing a stale socket file.
fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |source| ListenError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket(path.to_path_buf()));
        }
        // Without blocking: a listener whose backlog is full is in use too.
        match connect_nonblocking(path) {
            Ok(_) => return Err(ListenError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(ListenError::InUse(path.to_path_buf()))
            }
            Err(_) => {}
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    UnixListener::bind(path).map_err(io)
}

/// Connects to a Unix socket without blocking: a listener whose backlog is full refuses.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket this function just created and owns nowhere else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call.
    let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}
