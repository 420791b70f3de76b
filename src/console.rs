//! The host terminal side of the guest console: raw mode, stop signals, QEMU-style
//! `C-a` escapes, and the thread that feeds stdin to the guest's UART.
//!
//! Typical use by the VMM:
//! ```ignore
//! console::install_panic_hook();
//! console::install_stop_signals(vm.clone())?;
//! let _raw = console::RawTerminal::new()?; // restored on drop
//! console::spawn_stdin_reader(serial.clone(), vm.clone(), Box::new(print_stats))?;
//! // ... run; before std::process::exit, call console::restore_terminal().
//! ```

use std::io::{self, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialDevice;
use crate::devices::VmControl;

/// The escape character: Ctrl-A.
pub const ESCAPE_CHAR: u8 = 0x01;

/// Printed for `C-a h`.
pub const ESCAPE_HELP: &str = "C-a h  print this help\r\n\
C-a x  exit ferrovm\r\n\
C-a s  print exit statistics\r\n\
C-a C-a  send C-a\r\n";

// ---------------------------------------------------------------------------------------
// Raw terminal mode
// ---------------------------------------------------------------------------------------

/// The terminal settings from before raw mode; set once, read from any context.
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();
/// True while stdin is in raw mode and must be restored.
static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Puts stdin in raw mode (like QEMU's `-serial stdio`: the guest sends `\r\n` itself) and
/// restores it when dropped. Does nothing when stdin is not a terminal.
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a TTY.
    pub fn new() -> io::Result<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(Self { active: false });
        }
        // SAFETY: termios is plain data; all-zero is a valid value to be overwritten.
        let mut current: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `current` is a valid, writable termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut current) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Keep the first saved state: it is the user's original terminal.
        let mut raw = *SAVED_TERMIOS.get_or_init(|| current);
        // SAFETY: `raw` is a valid termios; cfmakeraw only edits its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        RAW_ACTIVE.store(true, Ordering::SeqCst);
        // SAFETY: `raw` is a valid termios read by the call.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            RAW_ACTIVE.store(false, Ordering::SeqCst);
            return Err(io::Error::last_os_error());
        }
        Ok(Self { active: true })
    }

    /// True when stdin is a terminal that was switched to raw mode.
    pub fn is_active(&self) -> bool {
        self.active
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            restore_terminal();
        }
    }
}

/// True while stdin is in raw mode (output lines then need `\r\n`).
pub fn raw_mode_active() -> bool {
    RAW_ACTIVE.load(Ordering::SeqCst)
}

/// Restores stdin's original settings if raw mode is on. Safe to call more than once, from a
/// panic hook, a signal handler or right before `std::process::exit` (which skips `Drop`):
/// it only does an atomic swap, a `OnceLock` read and `tcsetattr`.
pub fn restore_terminal() {
    if !RAW_ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    if let Some(saved) = SAVED_TERMIOS.get() {
        // SAFETY: `saved` is a valid termios obtained from tcgetattr; tcsetattr is
        // async-signal-safe.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

/// Makes panics restore the terminal before the panic message is printed.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        previous(info);
    }));
}

// ---------------------------------------------------------------------------------------
// Stop signals
// ---------------------------------------------------------------------------------------

/// The VM the signal handler stops. Set before the handler is installed.
static SIGNAL_STOP: OnceLock<VmControl> = OnceLock::new();
/// Stop signals received so far.
static SIGNALS_SEEN: AtomicU32 = AtomicU32::new(0);

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The handler for [`STOP_SIGNALS`]. The first signal asks the VM to stop; a second one
/// (the VMM did not shut down in time) restores the terminal and exits with `128 + sig`.
extern "C" fn on_stop_signal(sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot; saving it keeps the
    // interrupted code's errno intact.
    let saved_errno = unsafe { *libc::__errno_location() };
    if SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst) > 0 {
        restore_terminal();
        // SAFETY: _exit is async-signal-safe and does not return.
        unsafe { libc::_exit(128 + sig) };
    }
    // VmControl::stop is an atomic store plus a write(2) to an eventfd: both are
    // async-signal-safe, and OnceLock::get is a plain atomic load.
    if let Some(vm) = SIGNAL_STOP.get() {
        vm.stop();
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Makes SIGINT, SIGTERM and SIGHUP stop the VM (see [`on_stop_signal`]). Only the first
/// `stop` handle passed in a process is used.
pub fn install_stop_signals(stop: VmControl) -> io::Result<()> {
    if SIGNAL_STOP.set(stop).is_err() {
        log::warn!("console: stop signals already installed; keeping the first VM handle");
    }
    // SAFETY: sigaction is plain data; all-zero is valid (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    for sig in STOP_SIGNALS {
        // SAFETY: `action` is fully initialised and its handler only does
        // async-signal-safe work; the old action is not requested.
        if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Escape sequences
// ---------------------------------------------------------------------------------------

/// What the console should do with a chunk of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EscapeAction {
    /// Send these bytes to the guest.
    Forward(Vec<u8>),
    /// `C-a x`: stop the VM.
    Quit,
    /// `C-a h`: print [`ESCAPE_HELP`].
    Help,
    /// `C-a s`: print exit statistics.
    Stats,
}

/// Splits console input into guest bytes and `C-a` commands. Keeps state between calls, so
/// an escape split across two reads is still recognised.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_escape: bool,
}

impl EscapeParser {
    /// A parser in its initial state (no pending `C-a`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `input`, returning actions in order (adjacent guest bytes are merged).
    pub fn feed(&mut self, input: &[u8]) -> Vec<EscapeAction> {
        let mut actions = Vec::new();
        let mut forward = Vec::new();
        for &byte in input {
            if !self.after_escape {
                if byte == ESCAPE_CHAR {
                    self.after_escape = true;
                } else {
                    forward.push(byte);
                }
                continue;
            }
            self.after_escape = false;
            let command = match byte {
                ESCAPE_CHAR => {
                    forward.push(ESCAPE_CHAR);
                    continue;
                }
                b'x' | b'X' => EscapeAction::Quit,
                b'h' | b'H' => EscapeAction::Help,
                b's' | b'S' => EscapeAction::Stats,
                _ => continue, // unknown escapes are dropped
            };
            if !forward.is_empty() {
                actions.push(EscapeAction::Forward(std::mem::take(&mut forward)));
            }
            actions.push(command);
        }
        if !forward.is_empty() {
            actions.push(EscapeAction::Forward(forward));
        }
        actions
    }
}

// ---------------------------------------------------------------------------------------
// Stdin reader
// ---------------------------------------------------------------------------------------

/// How often the reader re-checks [`VmControl::is_stopping`] (the VMM may consume the stop
/// eventfd before this thread sees it).
const STOP_POLL_INTERVAL_MS: libc::c_int = 200;
/// Delay between attempts to push input into a full receive FIFO.
const FIFO_RETRY_DELAY: Duration = Duration::from_millis(5);

/// Starts the thread that forwards stdin to `serial`, handling `C-a` escapes.
///
/// Forwarded bytes are pushed into the UART's receive FIFO; when it is full the thread
/// waits for the guest to drain it (and stops reading stdin meanwhile). `C-a x` prints a
/// message and stops the VM; `C-a s` calls `on_stats`; `C-a h` prints [`ESCAPE_HELP`].
/// End of file on stdin (or a hangup) ends the thread without stopping the VM. The thread
/// polls stdin together with the stop eventfd and also ends once the VM is stopping, so
/// it can be joined.
pub fn spawn_stdin_reader(
    serial: Arc<Mutex<SerialDevice>>,
    stop: VmControl,
    on_stats: Box<dyn FnMut() + Send>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("console-stdin".into())
        .spawn(move || read_loop(libc::STDIN_FILENO, &serial, &stop, on_stats))
}

/// Whether the reader should read, keep waiting, or end.
enum Wait {
    Readable,
    Again,
    End,
}

/// Waits until `fd` is readable or the VM stops.
fn wait_input(fd: RawFd, stop_event: &EventFd, stop: &VmControl) -> Wait {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop_event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structures for the whole call.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, STOP_POLL_INTERVAL_MS) };
    if stop.is_stopping() {
        return Wait::End;
    }
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Wait::Again;
        }
        log::warn!("console: poll on stdin failed: {err}");
        return Wait::End;
    }
    match fds[0].revents {
        0 => Wait::Again,
        r if r & libc::POLLNVAL != 0 => Wait::End,
        // POLLIN, or POLLHUP/POLLERR: read() reports the data, EOF or error.
        _ => Wait::Readable,
    }
}

/// The reader thread's body; reads `fd` (stdin, or a pipe in tests).
fn read_loop(
    fd: RawFd,
    serial: &Mutex<SerialDevice>,
    stop: &VmControl,
    mut on_stats: Box<dyn FnMut() + Send>,
) {
    let mut parser = EscapeParser::new();
    let mut buf = [0u8; 256];
    loop {
        match wait_input(fd, stop.event(), stop) {
            Wait::Readable => {}
            Wait::Again => continue,
            Wait::End => return,
        }
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let n = match usize::try_from(n) {
            Ok(0) => {
                log::debug!("console: end of input, no longer reading stdin");
                return;
            }
            Ok(n) => n.min(buf.len()),
            Err(_) => {
                let err = io::Error::last_os_error();
                if matches!(
                    err.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                log::warn!("console: reading stdin failed: {err}");
                return;
            }
        };
        for action in parser.feed(&buf[..n]) {
            match action {
                EscapeAction::Forward(bytes) => {
                    if !push_input(serial, &bytes, stop) {
                        return;
                    }
                }
                EscapeAction::Quit => {
                    print_stderr("ferrovm: quit from console (C-a x)\r\n");
                    stop.stop();
                    return;
                }
                EscapeAction::Help => print_stderr(ESCAPE_HELP),
                EscapeAction::Stats => on_stats(),
            }
        }
    }
}

/// Pushes `bytes` into the UART, waiting while its FIFO is full. Returns false if the VM
/// stopped before everything was delivered.
fn push_input(serial: &Mutex<SerialDevice>, mut bytes: &[u8], stop: &VmControl) -> bool {
    loop {
        let taken = serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(bytes);
        bytes = bytes.get(taken..).unwrap_or_default();
        if bytes.is_empty() {
            return true;
        }
        if stop.is_stopping() {
            return false;
        }
        std::thread::sleep(FIFO_RETRY_DELAY);
    }
}

/// Best-effort message to the user; the console has nowhere to report a failure.
fn print_stderr(msg: &str) {
    let mut err = io::stderr().lock();
    let _ = err.write_all(msg.as_bytes());
    let _ = err.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::IrqLine;
    use EscapeAction::*;

    fn fwd(b: &[u8]) -> EscapeAction {
        Forward(b.to_vec())
    }

    #[test]
    fn escapes() {
        let mut p = EscapeParser::new();
        assert_eq!(p.feed(b"abc"), [fwd(b"abc")]);
        assert_eq!(p.feed(b"a\x01xb"), [fwd(b"a"), Quit, fwd(b"b")]);
        assert_eq!(p.feed(b"\x01h\x01s"), [Help, Stats]);
        assert_eq!(p.feed(b"a\x01\x01b"), [fwd(b"a\x01b")]);
        assert_eq!(p.feed(b"a\x01qb"), [fwd(b"ab")], "unknown escape dropped");
        assert_eq!(p.feed(b""), []);
    }

    #[test]
    fn escapes_split_across_reads() {
        let mut p = EscapeParser::new();
        assert_eq!(p.feed(b"ab\x01"), [fwd(b"ab")]);
        assert_eq!(p.feed(b"x"), [Quit]);
        assert_eq!(p.feed(b"\x01"), []);
        assert_eq!(p.feed(b"\x01z"), [fwd(b"\x01z")]);
        assert_eq!(p.feed(b"\x01"), []);
        assert_eq!(p.feed(b"\x01"), [fwd(b"\x01")]);
    }

    fn pipe() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    }

    fn write_fd(fd: RawFd, bytes: &[u8]) {
        // SAFETY: `bytes` is valid for reads of its length.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n, bytes.len() as isize);
    }

    fn close(fd: RawFd) {
        // SAFETY: the test owns `fd` and closes it once.
        unsafe { libc::close(fd) };
    }

    fn received(serial: &Mutex<SerialDevice>) -> Vec<u8> {
        let mut dev = serial.lock().unwrap();
        let mut out = Vec::new();
        let mut b = [0u8];
        loop {
            dev.read(5, &mut b);
            if b[0] & 1 == 0 {
                return out;
            }
            dev.read(0, &mut b);
            out.push(b[0]);
        }
    }

    fn serial() -> Arc<Mutex<SerialDevice>> {
        let dev = SerialDevice::new(IrqLine::new().unwrap(), Box::new(io::sink()));
        Arc::new(Mutex::new(dev))
    }

    #[test]
    fn reader_forwards_and_quits() {
        let (rd, wr) = pipe();
        let serial = serial();
        let vm = VmControl::new().unwrap();
        let stats = Arc::new(AtomicU32::new(0));
        let s = stats.clone();
        write_fd(wr, b"ls\x01s\r\x01x ignored");
        read_loop(
            rd,
            &serial,
            &vm,
            Box::new(move || {
                s.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert!(vm.is_stopping());
        assert_eq!(stats.load(Ordering::SeqCst), 1);
        assert_eq!(received(&serial), b"ls\r");
        close(rd);
        close(wr);
    }

    #[test]
    fn reader_eof_does_not_stop_vm() {
        let (rd, wr) = pipe();
        let serial = serial();
        let vm = VmControl::new().unwrap();
        write_fd(wr, b"hello");
        close(wr);
        read_loop(rd, &serial, &vm, Box::new(|| {}));
        assert!(!vm.is_stopping());
        assert_eq!(received(&serial), b"hello");
        close(rd);
    }

    #[test]
    fn full_fifo_waits_for_the_guest_or_the_stop() {
        let serial = serial();
        let vm = VmControl::new().unwrap();
        let big = vec![b'y'; 200];
        let (s, v) = (serial.clone(), vm.clone());
        let pusher = std::thread::spawn(move || push_input(&s, &big, &v));
        // The guest drains the FIFO a few times, then the VM stops.
        let mut got = 0;
        for _ in 0..50 {
            got += received(&serial).len();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(got > 64, "drained {got}");
        vm.stop();
        let done = pusher.join().unwrap();
        got += received(&serial).len();
        assert!(done == (got == 200));
    }

    #[test]
    fn signal_stops_vm() {
        let vm = VmControl::new().unwrap();
        install_stop_signals(vm.clone()).unwrap();
        // SAFETY: raise delivers SIGHUP to this thread; the handler was just installed.
        unsafe { libc::raise(libc::SIGHUP) };
        assert!(vm.is_stopping());
        for sig in STOP_SIGNALS {
            // SAFETY: restoring the default disposition.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}
