//! The host end of a command's streams: the guest init connects to host ports 1 (stdout),
//! 2 (stderr), 3 (status) and 4 (stdin) over vsock, which reach the Unix listeners
//! `SOCKET_<port>` made here before the VM starts. One thread copies ports 1 and 2 to
//! ferrovm's stdout and stderr, ferrovm's stdin to port 4 (unless it is a terminal: then the
//! command gets an empty stdin), and keeps the status line.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const OUT: usize = 0;
const ERR: usize = 1;
const STATUS: usize = 2;
const IN: usize = 3;
/// The vsock port of each channel.
const PORTS: [u32; 4] = [1, 2, 3, 4];
/// Longest status line kept.
const STATUS_MAX: usize = 512;
/// How long the streams may take to end after the VM did.
const DRAIN_AFTER_STOP: Duration = Duration::from_secs(2);

/// The running relay.
pub struct Relay {
    stop: EventFd,
    thread: Option<JoinHandle<Option<String>>>,
}

#[derive(Default)]
struct Chan {
    listener: Option<UnixListener>,
    stream: Option<UnixStream>,
    eof: bool,
}

impl Relay {
    /// Listens on `<socket>_<port>` for each channel and starts the thread.
    pub fn start(socket: &Path) -> io::Result<Relay> {
        let mut chans: [Chan; 4] = Default::default();
        for (c, port) in chans.iter_mut().zip(PORTS) {
            let mut path = socket.as_os_str().to_owned();
            path.push(format!("_{port}"));
            let l = UnixListener::bind(&path)?;
            l.set_nonblocking(true)?;
            c.listener = Some(l);
        }
        // SAFETY: isatty only inspects fd 0.
        let relay_stdin = unsafe { libc::isatty(0) } == 0;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("run-relay".into())
            .spawn(move || {
                crate::seccomp::install(crate::seccomp::ThreadKind::RunRelay)
                    .map_err(|e| eprintln!("ferrovm: {e}"))
                    .ok()?;
                run(chans, &stop2, relay_stdin)
            })?;
        Ok(Relay {
            stop,
            thread: Some(thread),
        })
    }

    /// Called once the VM has ended: lets the streams drain, returns the status line.
    pub fn finish(mut self) -> Option<String> {
        let _ = self.stop.write(1);
        self.thread.take()?.join().ok().flatten()
    }
}

impl Drop for Relay {
    /// A relay dropped without [`Relay::finish`] (setup failed later) still ends its thread.
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one poll slot watches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watch {
    Stop,
    Accept(usize),
    Read(usize),
    Stdin,
    StdinOut,
}

struct State {
    chans: [Chan; 4],
    status: Vec<u8>,
    pending: Vec<u8>,
    stdin_done: bool,
    relay_stdin: bool,
}

fn run(chans: [Chan; 4], stop: &EventFd, relay_stdin: bool) -> Option<String> {
    let mut s = State {
        chans,
        status: Vec::new(),
        pending: Vec::new(),
        stdin_done: !relay_stdin,
        relay_stdin,
    };
    let mut deadline: Option<Instant> = None;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if [OUT, ERR, STATUS].iter().all(|&i| s.chans[i].eof) {
            break;
        }
        let watches = s.watches(deadline.is_none(), stop.as_raw_fd());
        let mut fds: Vec<libc::pollfd> = watches
            .iter()
            .map(|&(fd, events, _)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        let timeout = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).as_millis() as i32,
            None => -1,
        };
        if deadline.is_some() && timeout == 0 {
            break;
        }
        // SAFETY: `fds` is a valid array of fds.len() pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 && io::Error::last_os_error().kind() != ErrorKind::Interrupted {
            break;
        }
        for (pfd, &(_, _, what)) in fds.iter().zip(&watches) {
            if pfd.revents == 0 {
                continue;
            }
            if what == Watch::Stop {
                // A guest that never connected has nothing to drain.
                let connected = s.chans.iter().any(|c| c.stream.is_some() || c.eof);
                deadline = Some(
                    Instant::now()
                        + if connected {
                            DRAIN_AFTER_STOP
                        } else {
                            Duration::ZERO
                        },
                );
            } else {
                s.serve(what, &mut buf);
            }
        }
    }
    (!s.status.is_empty()).then(|| String::from_utf8_lossy(&s.status).trim().to_string())
}

impl State {
    fn watches(&self, with_stop: bool, stop: RawFd) -> Vec<(RawFd, i16, Watch)> {
        let mut w = Vec::new();
        if with_stop {
            w.push((stop, libc::POLLIN, Watch::Stop));
        }
        for (i, c) in self.chans.iter().enumerate() {
            if let Some(l) = &c.listener {
                w.push((l.as_raw_fd(), libc::POLLIN, Watch::Accept(i)));
            }
            if let (Some(st), false, true) = (&c.stream, c.eof, i != IN) {
                w.push((st.as_raw_fd(), libc::POLLIN, Watch::Read(i)));
            }
        }
        if let Some(st) = &self.chans[IN].stream {
            if !self.pending.is_empty() {
                w.push((st.as_raw_fd(), libc::POLLOUT, Watch::StdinOut));
            } else if !self.stdin_done {
                w.push((0, libc::POLLIN, Watch::Stdin));
            }
        }
        w
    }

    fn serve(&mut self, what: Watch, buf: &mut [u8]) {
        match what {
            Watch::Stop => {}
            Watch::Accept(i) => self.accept(i),
            Watch::Read(i) => self.read(i, buf),
            Watch::Stdin => {
                // SAFETY: reads at most buf.len() bytes into `buf` from fd 0.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    self.pending.extend_from_slice(&buf[..n as usize]);
                } else if n == 0 || io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                    self.end_stdin();
                }
            }
            Watch::StdinOut => {
                let Some(st) = &mut self.chans[IN].stream else {
                    return;
                };
                match st.write(&self.pending) {
                    Ok(n) => {
                        self.pending.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {
                        self.pending.clear();
                        self.stdin_done = true;
                    }
                }
                if self.pending.is_empty() && self.stdin_done {
                    self.end_stdin();
                }
            }
        }
    }

    fn end_stdin(&mut self) {
        self.stdin_done = true;
        if self.pending.is_empty() {
            if let Some(st) = &self.chans[IN].stream {
                let _ = st.shutdown(std::net::Shutdown::Write);
            }
        }
    }

    fn accept(&mut self, i: usize) {
        let c = &mut self.chans[i];
        let Some(l) = &c.listener else {
            return;
        };
        let st = match l.accept() {
            Ok((st, _)) => st,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return
            }
            // (EMFILE): a listener that stays readable would spin the loop; the channel is lost.
            Err(_) => {
                c.listener = None;
                c.eof = true;
                return;
            }
        };
        // One connection per channel.
        c.listener = None;
        if i == IN {
            let _ = st.set_nonblocking(true);
            if !self.relay_stdin {
                let _ = st.shutdown(std::net::Shutdown::Write);
            }
        }
        c.stream = Some(st);
    }

    fn read(&mut self, i: usize, buf: &mut [u8]) {
        let c = &mut self.chans[i];
        let Some(st) = &mut c.stream else {
            return;
        };
        let n = match st.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
                return
            }
            Err(_) => 0,
        };
        if n == 0 {
            // Closing tells the guest everything arrived.
            c.eof = true;
            c.stream = None;
            return;
        }
        let data = &buf[..n];
        let written = match i {
            OUT => {
                let mut o = io::stdout().lock();
                o.write_all(data).and_then(|_| o.flush())
            }
            ERR => io::stderr().lock().write_all(data),
            _ => {
                let room = STATUS_MAX.saturating_sub(self.status.len());
                self.status.extend_from_slice(&data[..data.len().min(room)]);
                Ok(())
            }
        };
        // A closed stdout or stderr (`ferrovm run -- yes | head -1`): the stream is closed
        // towards the guest too, whose writer then gets EPIPE, as it would on the host.
        if written.is_err() {
            let c = &mut self.chans[i];
            c.eof = true;
            c.stream = None;
        }
    }
}
