//! The host terminal side of the guest console: raw mode, stop signals, QEMU-style
//! `C-a` escapes, and the thread that feeds stdin to the guest's UART.
//!
//! Everything here is per VM, so several VMs can run in one process, one after another or
//! at the same time: each holds its own guards, and a stop signal stops every VM registered
//! at that moment. Typical use by the VMM, for one VM:
//! ```ignore
//! console::install_panic_hook(); // one hook per process, whatever the number of calls
//! let _signals = console::StopSignals::register(control.clone())?; // until dropped
//! let _raw = stdio.then(console::RawTerminal::new).transpose()?; // nests, restores on drop
//! let reader = console::spawn_stdin_reader(serial.clone(), control.clone(), on_stats)?;
//! // ... run until `control` stops ...
//! reader.join(); // (dropping it also ends and joins the thread)
//! // Before std::process::exit (which skips Drop), call console::restore_terminal().
//! ```

use std::io::{self, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
/// True while the terminal is in raw mode and must be restored.
static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);
/// How many live [`RawTerminal`]s use raw mode; the last one to drop restores it.
static RAW_USERS: Mutex<usize> = Mutex::new(0);
/// The console terminal: stdin (tests point it at a pseudo-terminal).
static TERM_FD: AtomicI32 = AtomicI32::new(libc::STDIN_FILENO);

/// Puts stdin in raw mode (like QEMU's `-serial stdio`: the guest sends `\r\n` itself) and
/// restores it when dropped. Does nothing when stdin is not a terminal.
///
/// Guards nest: with several VMs on stdio in one process, the terminal stays raw until the
/// last guard is dropped, then gets the settings from before the first one.
#[must_use = "raw mode ends when the guard is dropped"]
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a TTY (or keeps it raw for one more user).
    pub fn new() -> io::Result<Self> {
        let fd = TERM_FD.load(Ordering::SeqCst);
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(Self { active: false });
        }
        let mut users = RAW_USERS.lock().unwrap_or_else(|e| e.into_inner());
        // Also re-enters raw mode after an emergency restore_terminal().
        if !RAW_ACTIVE.load(Ordering::SeqCst) {
            enter_raw_mode(fd)?;
        }
        *users += 1;
        Ok(Self { active: true })
    }

    /// True when stdin is a terminal that was switched to raw mode.
    pub fn is_active(&self) -> bool {
        self.active
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let mut users = RAW_USERS.lock().unwrap_or_else(|e| e.into_inner());
        *users = users.saturating_sub(1);
        if *users == 0 {
            restore_terminal();
        }
    }
}

/// Saves `fd`'s settings (the first time only: they are the user's original terminal) and
/// switches it to raw mode.
fn enter_raw_mode(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios is plain data; all-zero is a valid value to be overwritten.
    let mut current: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `current` is a valid, writable termios.
    if unsafe { libc::tcgetattr(fd, &mut current) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = *SAVED_TERMIOS.get_or_init(|| current);
    // SAFETY: `raw` is a valid termios; cfmakeraw only edits its flags.
    unsafe { libc::cfmakeraw(&mut raw) };
    RAW_ACTIVE.store(true, Ordering::SeqCst);
    // SAFETY: `raw` is a valid termios read by the call.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        RAW_ACTIVE.store(false, Ordering::SeqCst);
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True while stdin is in raw mode (output lines then need `\r\n`).
pub fn raw_mode_active() -> bool {
    RAW_ACTIVE.load(Ordering::SeqCst)
}

/// Restores stdin's original settings if raw mode is on, whatever [`RawTerminal`]s are
/// alive. Safe to call more than once, from a panic hook, a signal handler or right before
/// `std::process::exit` (which skips `Drop`): it only does atomics, a `OnceLock` read and
/// `tcsetattr`.
pub fn restore_terminal() {
    if !RAW_ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    if let Some(saved) = SAVED_TERMIOS.get() {
        // SAFETY: `saved` is a valid termios obtained from tcgetattr; tcsetattr is
        // async-signal-safe.
        unsafe { libc::tcsetattr(TERM_FD.load(Ordering::SeqCst), libc::TCSANOW, saved) };
    }
}

/// Makes panics restore the terminal before the panic message is printed. Installs one
/// hook per process however often it is called (once per VM is fine).
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

// ---------------------------------------------------------------------------------------
// Stop signals
// ---------------------------------------------------------------------------------------

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// How many VMs can be registered for stop signals at the same time.
pub const MAX_SIGNAL_VMS: usize = 64;

/// Set in a slot once a signal stopped its VM (a `Box<VmControl>` address has the low bit
/// clear).
const SIGNALLED: usize = 1;

/// The registered VMs: 0 for a free slot, otherwise the exposed address of a leaked
/// `Box<VmControl>`, ORed with [`SIGNALLED`]. Read by the signal handler with atomics only.
static STOP_SLOTS: [AtomicUsize; MAX_SIGNAL_VMS] = [const { AtomicUsize::new(0) }; MAX_SIGNAL_VMS];
/// Signal handlers currently reading [`STOP_SLOTS`]; a slot's box is freed only when this
/// is zero after the slot was cleared.
static HANDLERS_RUNNING: AtomicUsize = AtomicUsize::new(0);
/// Whether [`on_stop_signal`] is installed (set once; a failure can be retried).
static HANDLER_INSTALLED: Mutex<bool> = Mutex::new(false);

/// Makes SIGINT, SIGTERM and SIGHUP stop one VM while the guard lives.
///
/// Any number of VMs (up to [`MAX_SIGNAL_VMS`]) can be registered at once, sequentially or
/// concurrently; a signal stops every VM registered at that moment. A signal that finds a
/// registered VM it already stopped (that VM did not shut down in time), or finds no VM at
/// all, restores the terminal and exits the process with `128 + signal`. The count is per
/// registration: a VM registered after an earlier one was stopped and dropped its guard is
/// stopped, not killed, by the next signal.
#[must_use = "the VM is unregistered when the guard is dropped"]
pub struct StopSignals {
    slot: usize,
}

impl StopSignals {
    /// Registers `control` (installing the process-wide handler the first time).
    pub fn register(control: VmControl) -> io::Result<Self> {
        install_signal_handler()?;
        let addr = Box::into_raw(Box::new(control)).expose_provenance();
        debug_assert_eq!(addr & SIGNALLED, 0);
        for (slot, cell) in STOP_SLOTS.iter().enumerate() {
            if cell
                .compare_exchange(0, addr, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Ok(Self { slot });
            }
        }
        // SAFETY: `addr` comes from Box::into_raw above and was never published.
        drop(unsafe { Box::from_raw(std::ptr::with_exposed_provenance_mut::<VmControl>(addr)) });
        Err(io::Error::other(format!(
            "more than {MAX_SIGNAL_VMS} VMs registered for stop signals"
        )))
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        let value = STOP_SLOTS[self.slot].swap(0, Ordering::SeqCst);
        // A handler that started before the swap may still use the box; one that starts
        // after it sees the free slot.
        while HANDLERS_RUNNING.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        let ptr = std::ptr::with_exposed_provenance_mut::<VmControl>(value & !SIGNALLED);
        if !ptr.is_null() {
            // SAFETY: the slot held the only copy of this Box::into_raw pointer; it is
            // cleared now and no handler still reads it.
            drop(unsafe { Box::from_raw(ptr) });
        }
    }
}

/// What a stop signal does once it has stopped the registered VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterSignal {
    /// Every registered VM was asked to stop for the first time.
    Wait,
    /// No VM is registered, or one was already stopped by an earlier signal: exit now.
    Exit,
}

/// Stops every registered VM and marks it signalled. Async-signal-safe: atomics only, plus
/// [`VmControl::stop`] (an atomic store and a write(2) to an eventfd).
fn stop_registered_vms() -> AfterSignal {
    HANDLERS_RUNNING.fetch_add(1, Ordering::SeqCst);
    let (mut registered, mut repeated) = (false, false);
    for cell in &STOP_SLOTS {
        let mark = |v: usize| (v != 0).then_some(v | SIGNALLED);
        let Ok(value) = cell.fetch_update(Ordering::SeqCst, Ordering::SeqCst, mark) else {
            continue;
        };
        registered = true;
        repeated |= value & SIGNALLED != 0;
        let vm = std::ptr::with_exposed_provenance::<VmControl>(value & !SIGNALLED);
        // SAFETY: the slot was non-zero, so `vm` is a live Box<VmControl>: its guard frees
        // it only after clearing the slot and seeing HANDLERS_RUNNING at zero.
        unsafe { (*vm).stop() };
    }
    HANDLERS_RUNNING.fetch_sub(1, Ordering::SeqCst);
    if registered && !repeated {
        AfterSignal::Wait
    } else {
        AfterSignal::Exit
    }
}

/// The last stop signal received (0: none).
static LAST_STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The signal that stopped the VM, if one did (a command run exits with 128 + it).
pub fn stop_signal() -> Option<i32> {
    match LAST_STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The handler for [`STOP_SIGNALS`]: see [`StopSignals`].
extern "C" fn on_stop_signal(sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot; saving it keeps the
    // interrupted code's errno intact.
    let saved_errno = unsafe { *libc::__errno_location() };
    LAST_STOP_SIGNAL.store(sig, Ordering::SeqCst);
    if stop_registered_vms() == AfterSignal::Exit {
        restore_terminal();
        // SAFETY: _exit is async-signal-safe and does not return.
        unsafe { libc::_exit(128 + sig) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Installs [`on_stop_signal`] for [`STOP_SIGNALS`], once per process.
fn install_signal_handler() -> io::Result<()> {
    let mut installed = HANDLER_INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
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
    *installed = true;
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

/// True while a [`StdinReader`] thread owns stdin.
static STDIN_CLAIMED: AtomicBool = AtomicBool::new(false);

/// Exclusive use of stdin by one VM's console; released when the reader thread ends.
struct StdinClaim(());

impl StdinClaim {
    fn acquire() -> io::Result<Self> {
        if STDIN_CLAIMED.swap(true, Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "stdin is already the console of another VM in this process \
                 (use --serial off or --serial file=PATH for the others)",
            ));
        }
        Ok(Self(()))
    }
}

impl Drop for StdinClaim {
    fn drop(&mut self) {
        STDIN_CLAIMED.store(false, Ordering::SeqCst);
    }
}

/// When the reader thread must end: its VM is stopping, or its [`StdinReader`] asked.
struct ReaderExit {
    vm: VmControl,
    quit: Arc<AtomicBool>,
    /// Readable once `quit` is set (a dup of the [`StdinReader`]'s eventfd).
    wake: EventFd,
}

impl ReaderExit {
    fn now(&self) -> bool {
        self.vm.is_stopping() || self.quit.load(Ordering::SeqCst)
    }
}

/// The thread that forwards stdin to a VM's UART (see [`spawn_stdin_reader`]). Joining or
/// dropping it ends the thread, whether or not the VM stopped, and waits for it.
#[must_use = "dropping the reader ends its thread"]
pub struct StdinReader {
    thread: Option<JoinHandle<()>>,
    quit: Arc<AtomicBool>,
    wake: EventFd,
}

impl StdinReader {
    /// Ends the reader thread (if the VM has not ended it already) and waits for it.
    pub fn join(mut self) -> std::thread::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> std::thread::Result<()> {
        self.quit.store(true, Ordering::SeqCst);
        // A failed write means the counter is saturated: the thread is woken anyway.
        let _ = self.wake.write(1);
        match self.thread.take() {
            Some(t) => t.join(),
            None => Ok(()),
        }
    }
}

impl Drop for StdinReader {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Starts the thread that forwards stdin to `serial`, handling `C-a` escapes.
///
/// Forwarded bytes are pushed into the UART's receive FIFO; when it is full the thread
/// waits for the guest to drain it (and stops reading stdin meanwhile). `C-a x` prints a
/// message and stops the VM; `C-a s` calls `on_stats`; `C-a h` prints [`ESCAPE_HELP`].
/// End of file on stdin (or a hangup) ends the thread without stopping the VM. The thread
/// also ends once the VM is stopping or the returned [`StdinReader`] is joined or dropped.
///
/// Only one reader can own stdin at a time in a process: while one runs, this fails with
/// [`io::ErrorKind::ResourceBusy`].
pub fn spawn_stdin_reader(
    serial: Arc<dyn ConsoleInput>,
    stop: VmControl,
    on_stats: Box<dyn FnMut() + Send>,
) -> io::Result<StdinReader> {
    let claim = StdinClaim::acquire()?;
    spawn_reader(libc::STDIN_FILENO, serial, stop, on_stats, Some(claim))
}

/// [`spawn_stdin_reader`] on any descriptor; `claim` is released when the thread ends.
fn spawn_reader(
    fd: RawFd,
    serial: Arc<dyn ConsoleInput>,
    vm: VmControl,
    on_stats: Box<dyn FnMut() + Send>,
    claim: Option<StdinClaim>,
) -> io::Result<StdinReader> {
    let quit = Arc::new(AtomicBool::new(false));
    let wake = EventFd::new(EFD_NONBLOCK)?;
    let exit = ReaderExit {
        vm,
        quit: quit.clone(),
        wake: wake.try_clone()?,
    };
    let thread = std::thread::Builder::new()
        .name("console-stdin".into())
        .spawn(move || {
            let _claim = claim;
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::ConsoleReader) {
                print_stderr(&format!("ferrovm: {e}; the console takes no input\r\n"));
                return;
            }
            read_loop(fd, &*serial, &exit, on_stats);
        })?;
    Ok(StdinReader {
        thread: Some(thread),
        quit,
        wake,
    })
}

/// Whether the reader should read, keep waiting, or end.
enum Wait {
    Readable,
    Again,
    End,
}

/// Waits until `fd` is readable or the reader must end.
fn wait_input(fd: RawFd, exit: &ReaderExit) -> Wait {
    use std::os::fd::AsRawFd;
    let mut fds = [fd, exit.vm.event().as_raw_fd(), exit.wake.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `fds` is a valid array of pollfd structures for the whole call.
    let ret = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            STOP_POLL_INTERVAL_MS,
        )
    };
    if exit.now() {
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

/// Reads once from `fd` after poll said it is readable. `None` ends the reader (end of
/// input or an error); `Some(0)` means try again.
fn read_input(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    match usize::try_from(n) {
        Ok(0) => {
            log::debug!("console: end of input, no longer reading stdin");
            None
        }
        Ok(n) => Some(n.min(buf.len())),
        Err(_) => {
            let err = io::Error::last_os_error();
            if matches!(
                err.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                return Some(0);
            }
            log::warn!("console: reading stdin failed: {err}");
            None
        }
    }
}

/// The reader thread's body; reads `fd` (stdin, or a pipe in tests).
fn read_loop(
    fd: RawFd,
    serial: &dyn ConsoleInput,
    exit: &ReaderExit,
    mut on_stats: Box<dyn FnMut() + Send>,
) {
    let mut parser = EscapeParser::new();
    let mut buf = [0u8; 256];
    loop {
        match wait_input(fd, exit) {
            Wait::Readable => {}
            Wait::Again => continue,
            Wait::End => return,
        }
        let Some(n) = read_input(fd, &mut buf) else {
            return;
        };
        for action in parser.feed(&buf[..n]) {
            match action {
                EscapeAction::Forward(bytes) => {
                    if !push_input(serial, &bytes, exit) {
                        return;
                    }
                }
                EscapeAction::Quit => {
                    print_stderr("ferrovm: quit from console (C-a x)\r\n");
                    exit.vm.stop();
                    return;
                }
                EscapeAction::Help => print_stderr(ESCAPE_HELP),
                EscapeAction::Stats => on_stats(),
            }
        }
    }
}

/// Where typed input goes: the UART's receive FIFO, or the virtio console's inbox.
pub trait ConsoleInput: Send + Sync {
    /// Takes what fits of `bytes` now; returns how many (0 when full).
    fn enqueue_input(&self, bytes: &[u8]) -> usize;
}

impl ConsoleInput for Mutex<SerialDevice> {
    fn enqueue_input(&self, bytes: &[u8]) -> usize {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(bytes)
    }
}

/// Pushes `bytes` into the console input, waiting while it is full. Returns false if the
/// reader had to end before everything was delivered.
fn push_input(serial: &dyn ConsoleInput, mut bytes: &[u8], exit: &ReaderExit) -> bool {
    loop {
        let taken = serial.enqueue_input(bytes);
        bytes = bytes.get(taken..).unwrap_or_default();
        if bytes.is_empty() {
            return true;
        }
        if exit.now() {
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
    use crate::bus::BusDeviceMut;
    use crate::devices::IrqLine;
    use std::sync::atomic::AtomicU32;
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
            &*serial,
            &exit_for(&vm),
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
        read_loop(rd, &*serial, &exit_for(&vm), Box::new(|| {}));
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
        let pusher = std::thread::spawn(move || push_input(&*s, &big, &exit_for(&v)));
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

    /// A [`ReaderExit`] for `vm` with no owner asking it to end.
    fn exit_for(vm: &VmControl) -> ReaderExit {
        ReaderExit {
            vm: vm.clone(),
            quit: Arc::default(),
            wake: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// Joins `reader` and checks that it ended within a second.
    fn join_soon(reader: StdinReader) {
        let start = std::time::Instant::now();
        reader.join().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn reader_thread_ends_when_the_vm_stops() {
        let (rd, wr) = pipe();
        let vm = VmControl::new().unwrap();
        let reader = spawn_reader(rd, serial(), vm.clone(), Box::new(|| {}), None).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        vm.stop();
        // The VM's stop ends the thread: join only waits for it.
        let start = std::time::Instant::now();
        while !reader.thread.as_ref().unwrap().is_finished() {
            assert!(start.elapsed() < Duration::from_secs(1));
            std::thread::sleep(Duration::from_millis(1));
        }
        join_soon(reader);
        close(rd);
        close(wr);
    }

    #[test]
    fn dropping_the_reader_ends_its_thread_without_stopping_the_vm() {
        let (rd, wr) = pipe();
        let vm = VmControl::new().unwrap();
        // Idle on input, then stuck on a full FIFO nobody drains.
        for input in [&b""[..], &[b'z'; 200][..]] {
            write_fd(wr, input);
            let reader = spawn_reader(rd, serial(), vm.clone(), Box::new(|| {}), None).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            join_soon(reader);
            assert!(!vm.is_stopping());
        }
        close(rd);
        close(wr);
    }

    #[test]
    fn stdin_has_one_reader_at_a_time() {
        let claim = StdinClaim::acquire().unwrap();
        let err = StdinClaim::acquire().err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        drop(claim);
        drop(StdinClaim::acquire().unwrap());
    }

    /// Signal tests share the process-wide registry: run them one at a time.
    static SIGNAL_TESTS: Mutex<()> = Mutex::new(());

    fn signal_lock() -> std::sync::MutexGuard<'static, ()> {
        SIGNAL_TESTS.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(sig: libc::c_int) {
        // SAFETY: raise runs the installed handler on this thread before returning.
        assert_eq!(unsafe { libc::raise(sig) }, 0);
    }

    #[test]
    fn signal_stops_every_registered_vm_then_rearms() {
        let _serial = signal_lock();
        let (a, b) = (VmControl::new().unwrap(), VmControl::new().unwrap());
        let guard_a = StopSignals::register(a.clone()).unwrap();
        let guard_b = StopSignals::register(b.clone()).unwrap();
        raise(libc::SIGTERM);
        assert!(a.is_stopping() && b.is_stopping());
        drop((guard_a, guard_b));

        // A VM registered afterwards is stopped, not killed, by its first signal.
        let c = VmControl::new().unwrap();
        let guard_c = StopSignals::register(c.clone()).unwrap();
        raise(libc::SIGTERM);
        assert!(c.is_stopping());
        // A second signal while `c` is still registered would exit the process.
        assert_eq!(stop_registered_vms(), AfterSignal::Exit);
        drop(guard_c);
        assert_eq!(stop_registered_vms(), AfterSignal::Exit, "no VM registered");

        let d = VmControl::new().unwrap();
        let _guard_d = StopSignals::register(d.clone()).unwrap();
        assert_eq!(stop_registered_vms(), AfterSignal::Wait);
        assert!(d.is_stopping());
    }

    #[test]
    fn registry_slots_are_reused() {
        let _serial = signal_lock();
        let vm = VmControl::new().unwrap();
        let mut guards: Vec<_> = (0..MAX_SIGNAL_VMS)
            .map(|_| StopSignals::register(vm.clone()).unwrap())
            .collect();
        assert!(StopSignals::register(vm.clone()).is_err(), "registry full");
        drop(guards.swap_remove(7));
        guards.push(StopSignals::register(vm.clone()).unwrap());
        drop(guards);
        assert!(STOP_SLOTS.iter().all(|s| s.load(Ordering::SeqCst) == 0));
    }

    #[test]
    fn unregistering_races_with_handlers() {
        let _serial = signal_lock();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let signaller = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                stop_registered_vms();
                std::hint::spin_loop();
            }
        });
        for _ in 0..500 {
            let vm = VmControl::new().unwrap();
            drop(StopSignals::register(vm).unwrap());
        }
        done.store(true, Ordering::SeqCst);
        signaller.join().unwrap();
    }

    /// Opens a pseudo-terminal pair; returns (master, slave).
    fn open_pty() -> (RawFd, RawFd) {
        // SAFETY: plain libc calls on descriptors this test owns; `name` has room for the
        // NUL-terminated slave path ptsname_r writes.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(master >= 0);
            assert_eq!(libc::grantpt(master), 0);
            assert_eq!(libc::unlockpt(master), 0);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(master, name.as_mut_ptr(), name.len()), 0);
            let slave = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            assert!(slave >= 0);
            (master, slave)
        }
    }

    fn canonical(fd: RawFd) -> bool {
        // SAFETY: termios is plain data, filled in by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid, writable termios.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        t.c_lflag & libc::ICANON != 0
    }

    #[test]
    fn raw_terminal_guards_nest() {
        let (master, slave) = open_pty();
        assert!(canonical(slave));
        TERM_FD.store(slave, Ordering::SeqCst);
        let first = RawTerminal::new().unwrap();
        let second = RawTerminal::new().unwrap();
        assert!(first.is_active() && second.is_active() && raw_mode_active());
        assert!(!canonical(slave));
        drop(first);
        assert!(!canonical(slave), "still raw for the second VM");
        drop(second);
        assert!(canonical(slave) && !raw_mode_active());

        // Raw again for a later VM; an emergency restore wins over live guards.
        let third = RawTerminal::new().unwrap();
        assert!(!canonical(slave));
        restore_terminal();
        assert!(canonical(slave));
        drop(third);
        assert!(canonical(slave));
        TERM_FD.store(libc::STDIN_FILENO, Ordering::SeqCst);
        close(slave);
        close(master);
    }
}
