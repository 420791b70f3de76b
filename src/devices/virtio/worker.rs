//! The one worker lifecycle every virtio device runs on.
//!
//! A device model implements [`VirtioHandler`] (what to do when a queue is kicked or a backend
//! fd becomes readable) and returns one from [`VirtioDevice::activate`]. [`Runner`] owns the
//! device and, while the driver has it running, one [`Worker`] thread:
//!
//! - started when the transport activates the device (DRIVER_OK), with clones of the queue
//!   kick eventfds, the transport's interrupt handle and the device's backend fds;
//! - an epoll loop over the kicks, the backend fds, the INTx resample eventfd (when the
//!   transport has one) and a control eventfd (pause, resume, stop);
//! - a handler error marks the device as needing a reset ([`Runner::needs_reset`], which the
//!   transport reports as DEVICE_NEEDS_RESET) and raises a configuration interrupt; the worker
//!   then stops serving its queues until the driver resets the device;
//! - stopped and *joined* on reset and on drop; the handler comes back to the device
//!   ([`VirtioDevice::deactivate`]), so a backend (a TAP) survives driver resets.
//!
//! Pausing stops taking new work: the worker finishes the event it is handling (handlers
//! complete their in-flight I/O before returning) and then waits only on its control fd, so
//! kicks stay pending in their eventfds and are served after [`Worker::resume`].

use std::any::Any;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use crate::ratelimit::RateLimit;

/// A queue the device could not serve any more: the device needs a reset.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

impl DeviceError {
    pub fn new(msg: impl std::fmt::Display) -> Self {
        Self(msg.to_string())
    }
}

/// What the worker gives a handler to act on its loop.
pub struct WorkerCtx<'a> {
    interrupt: &'a dyn VirtioInterrupt,
    epoll: &'a Epoll,
    backend_fds: &'a [RawFd],
    backend_watched: &'a mut [bool],
    rerun: &'a mut [bool],
}

impl WorkerCtx<'_> {
    /// Raises the interrupt of queue `index`.
    pub fn signal_used(&self, index: u16) -> io::Result<()> {
        self.interrupt.trigger(VirtioInterruptType::Queue(index))
    }

    /// Serves queue slot `slot` again after the other pending events (a handler that stopped
    /// at its batch limit with work left).
    pub fn rerun(&mut self, slot: usize) {
        if let Some(r) = self.rerun.get_mut(slot) {
            *r = true;
        }
    }

    /// Starts or stops watching backend fd `id` (e.g. no receive buffers: stop reading the TAP).
    /// The fd is removed from epoll rather than masked: EPOLLERR/EPOLLHUP are reported even
    /// with an empty mask and would make the loop spin.
    pub fn watch_backend(&mut self, id: usize, on: bool) -> io::Result<()> {
        let (Some(&fd), Some(watched)) =
            (self.backend_fds.get(id), self.backend_watched.get_mut(id))
        else {
            return Ok(());
        };
        if *watched == on {
            return Ok(());
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, token_backend(id)))?;
        *watched = on;
        Ok(())
    }
}

/// A device's request processing, run by the worker thread. `slot` is the position of a queue
/// in the list handed to [`VirtioDevice::activate`] (its virtio index is in that list).
pub trait VirtioHandler: Send + Any {
    /// Called once on the worker thread before any event (e.g. to set up an io_uring, which
    /// belongs to the thread that made it).
    fn started(&mut self) {}

    /// Serves queue `slot`: called at start (requests may be queued before DRIVER_OK) and on
    /// every kick. Must complete what it started before returning.
    fn queue_event(&mut self, slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError>;

    /// Backend fds to watch (readable = [`VirtioHandler::backend_event`] with its index).
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Backend fd `id` is readable.
    fn backend_event(&mut self, _id: usize, _ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        Ok(())
    }
}

const TOKEN_CONTROL: u64 = 0;
const TOKEN_RESAMPLE: u64 = 1;
const TOKEN_KICK_BASE: u64 = 1 << 16;
const TOKEN_BACKEND_BASE: u64 = 1 << 32;

fn token_backend(id: usize) -> u64 {
    TOKEN_BACKEND_BASE + id as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    Pause,
    Stop,
}

/// State shared between a [`Worker`] handle and its thread.
struct Shared {
    command: Mutex<Command>,
    /// True while the thread waits in the paused state.
    paused: Mutex<bool>,
    paused_cv: Condvar,
    control: EventFd,
    needs_reset: Arc<AtomicBool>,
}

/// What the thread needs besides the handler.
struct Setup {
    name: String,
    kicks: Vec<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
    shared: Arc<Shared>,
}

/// A running worker thread. Dropping it stops and joins the thread.
pub struct Worker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Option<Box<dyn VirtioHandler>>>>,
    name: String,
}

impl Worker {
    /// Starts thread `name` serving `handler` on `kicks` (one per queue slot). On failure the
    /// handler is handed back with the error (always, in fact: a failed spawn never runs it).
    pub fn start(
        name: &str,
        handler: Box<dyn VirtioHandler>,
        kicks: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: Arc<AtomicBool>,
    ) -> Result<Worker, (io::Error, Option<Box<dyn VirtioHandler>>)> {
        let control = match EventFd::new(EFD_NONBLOCK) {
            Ok(c) => c,
            Err(e) => return Err((e, Some(handler))),
        };
        let shared = Arc::new(Shared {
            command: Mutex::new(Command::Run),
            paused: Mutex::new(false),
            paused_cv: Condvar::new(),
            control,
            needs_reset,
        });
        let setup = Setup {
            name: name.to_string(),
            kicks,
            interrupt,
            shared: shared.clone(),
        };
        // The handler waits in a slot the thread empties, so that a failed spawn leaves it
        // with us.
        let slot = Arc::new(Mutex::new(Some(handler)));
        let thread_slot = slot.clone();
        let spawned = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let handler = lock(&thread_slot).take()?;
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Worker) {
                    log::error!("{}: {e}", setup.name);
                    return Some(handler); // never served: the device stays unusable
                }
                Some(run(setup, handler))
            });
        match spawned {
            Ok(thread) => Ok(Worker {
                shared,
                thread: Some(thread),
                name: name.to_string(),
            }),
            Err(e) => Err((e, lock(&slot).take())),
        }
    }

    fn command(&self, c: Command) {
        *lock(&self.shared.command) = c;
        // A failed write means the counter is saturated: a wake-up is pending anyway.
        let _ = self.shared.control.write(1);
    }

    /// Stops taking new work and waits until the thread is idle (its current event done).
    /// Returns false when the thread is gone.
    pub fn pause(&self) -> bool {
        self.command(Command::Pause);
        let mut paused = lock(&self.shared.paused);
        while !*paused {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return false;
            }
            paused = self
                .shared
                .paused_cv
                .wait_timeout(paused, std::time::Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    /// Serves queues again after [`Worker::pause`]; kicks that arrived meanwhile are served.
    pub fn resume(&self) {
        self.command(Command::Run);
    }

    /// Stops and joins the thread; returns the handler (None if the thread panicked).
    pub fn stop(mut self) -> Option<Box<dyn VirtioHandler>> {
        self.join()
    }

    fn join(&mut self) -> Option<Box<dyn VirtioHandler>> {
        let thread = self.thread.take()?;
        self.command(Command::Stop);
        match thread.join() {
            Ok(h) => h,
            Err(_) => {
                log::error!("{}: the worker thread panicked", self.name);
                None
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.join());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The worker thread: runs the event loop, then hands the handler back.
fn run(setup: Setup, mut handler: Box<dyn VirtioHandler>) -> Box<dyn VirtioHandler> {
    handler.started();
    if let Err(e) = event_loop(&setup, handler.as_mut()) {
        log::error!("{}: worker stopped: {e}", setup.name);
    }
    // Wake a pause() that may be waiting for a thread that is gone.
    *lock(&setup.shared.paused) = true;
    setup.shared.paused_cv.notify_all();
    handler
}

/// Epoll registrations of the loop: control, resample, kicks, backends.
fn register(setup: &Setup, epoll: &Epoll, backend_fds: &[RawFd]) -> io::Result<()> {
    let add = |fd: RawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(setup.shared.control.as_raw_fd(), TOKEN_CONTROL)?;
    if let Some(r) = setup.interrupt.resample_event() {
        add(r.as_raw_fd(), TOKEN_RESAMPLE)?;
    }
    for (i, k) in setup.kicks.iter().enumerate() {
        add(k.as_raw_fd(), TOKEN_KICK_BASE + i as u64)?;
    }
    for (i, &fd) in backend_fds.iter().enumerate() {
        add(fd, token_backend(i))?;
    }
    Ok(())
}

/// Records a handler failure: NEEDS_RESET and a configuration interrupt, once.
fn fail(setup: &Setup, log: &RateLimit, e: DeviceError) {
    if setup.shared.needs_reset.swap(true, Ordering::SeqCst) {
        return;
    }
    log.warn(|| format!("{}: device failed, it needs a reset: {e}", setup.name));
    if let Err(e) = setup.interrupt.trigger(VirtioInterruptType::Config) {
        log.warn(|| {
            format!(
                "{}: cannot raise the configuration interrupt: {e}",
                setup.name
            )
        });
    }
}

/// Blocks in the paused state until the command is Run or Stop. Returns false on Stop.
fn wait_paused(setup: &Setup) -> bool {
    *lock(&setup.shared.paused) = true;
    setup.shared.paused_cv.notify_all();
    let go_on = loop {
        match *lock(&setup.shared.command) {
            Command::Run => break true,
            Command::Stop => break false,
            Command::Pause => {}
        }
        let mut p = libc::pollfd {
            fd: setup.shared.control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd whose fd stays open (owned by `setup`) during the call.
        unsafe { libc::poll(&mut p, 1, -1) };
        let _ = setup.shared.control.read();
    };
    *lock(&setup.shared.paused) = false;
    go_on
}

/// One pass of the loop: serves the wanted queues, then the wanted backends, stopping at the
/// first error; queues the handler asked to rerun are wanted again afterwards.
fn serve_pass(
    handler: &mut dyn VirtioHandler,
    ctx: &mut WorkerCtx,
    want_queue: &mut [bool],
    want_backend: &mut [bool],
) -> Result<(), DeviceError> {
    let mut result = Ok(());
    for (slot, want) in want_queue.iter_mut().enumerate() {
        if std::mem::take(want) && result.is_ok() {
            result = handler.queue_event(slot, ctx);
        }
    }
    for (id, want) in want_backend.iter_mut().enumerate() {
        if std::mem::take(want) && result.is_ok() {
            result = handler.backend_event(id, ctx);
        }
    }
    // Queues a handler left work on are served again after a look at the other events.
    for (want, r) in want_queue.iter_mut().zip(ctx.rerun.iter_mut()) {
        *want |= std::mem::take(r);
    }
    result
}

/// Serves `handler` on the calling thread the way its worker would, without the thread:
/// `started`, every one of its `nqueues` queues once, then whatever is pending (queues it asked
/// to rerun, backend fds that are readable) for at most `max_passes` passes. For the fuzz
/// targets and tests, where spawning a thread (and installing its seccomp filter) per
/// activation costs far more than the requests. Kicks are not watched: nothing kicks here.
pub fn serve_inline(
    handler: &mut dyn VirtioHandler,
    interrupt: &dyn VirtioInterrupt,
    nqueues: usize,
    max_passes: usize,
) -> io::Result<Result<(), DeviceError>> {
    let epoll = Epoll::new()?;
    let backend_fds = handler.backend_fds();
    for (i, &fd) in backend_fds.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token_backend(i)),
        )?;
    }
    handler.started();
    let mut backend_watched = vec![true; backend_fds.len()];
    let mut want_queue = vec![true; nqueues];
    let mut want_backend = vec![false; backend_fds.len()];
    let mut rerun = vec![false; nqueues];
    let mut events = [EpollEvent::default(); 16];
    for _ in 0..max_passes {
        let mut ctx = WorkerCtx {
            interrupt,
            epoll: &epoll,
            backend_fds: &backend_fds,
            backend_watched: &mut backend_watched,
            rerun: &mut rerun,
        };
        if let Err(e) = serve_pass(handler, &mut ctx, &mut want_queue, &mut want_backend) {
            return Ok(Err(e));
        }
        let n = epoll.wait(0, &mut events)?;
        for ev in &events[..n] {
            let id = ev.data().saturating_sub(TOKEN_BACKEND_BASE) as usize;
            if let Some(w) = want_backend.get_mut(id) {
                *w = true;
            }
        }
        if !want_queue.iter().chain(&want_backend).any(|w| *w) {
            break;
        }
    }
    Ok(Ok(()))
}

fn event_loop(setup: &Setup, handler: &mut dyn VirtioHandler) -> io::Result<()> {
    let epoll = Epoll::new()?;
    let backend_fds = handler.backend_fds();
    register(setup, &epoll, &backend_fds)?;
    let mut backend_watched = vec![true; backend_fds.len()];
    let nq = setup.kicks.len();
    // Requests may be queued before DRIVER_OK: serve every queue once at start.
    let mut want_queue = vec![true; nq];
    let mut want_backend = vec![false; backend_fds.len()];
    let mut rerun = vec![false; nq];
    let log = RateLimit::new(5);
    let mut events = [EpollEvent::default(); 16];
    loop {
        if !setup.shared.needs_reset.load(Ordering::SeqCst) {
            let mut ctx = WorkerCtx {
                interrupt: setup.interrupt.as_ref(),
                epoll: &epoll,
                backend_fds: &backend_fds,
                backend_watched: &mut backend_watched,
                rerun: &mut rerun,
            };
            if let Err(e) = serve_pass(handler, &mut ctx, &mut want_queue, &mut want_backend) {
                fail(setup, &log, e);
                // A readable backend nobody serves would wake the loop forever.
                for id in 0..ctx.backend_fds.len() {
                    let _ = ctx.watch_backend(id, false);
                }
            }
        }
        let timeout = if want_queue.iter().any(|w| *w) { 0 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_CONTROL => {
                    let _ = setup.shared.control.read();
                    let cmd = *lock(&setup.shared.command);
                    match cmd {
                        Command::Stop => return Ok(()),
                        Command::Pause if !wait_paused(setup) => return Ok(()),
                        _ => {}
                    }
                }
                TOKEN_RESAMPLE => {
                    if let Some(r) = setup.interrupt.resample_event() {
                        let _ = r.read();
                    }
                    setup.interrupt.resample();
                }
                t if t >= TOKEN_BACKEND_BASE => {
                    if let Some(w) = want_backend.get_mut((t - TOKEN_BACKEND_BASE) as usize) {
                        *w = true;
                    }
                }
                t => {
                    let slot = (t - TOKEN_KICK_BASE) as usize;
                    if let Some(k) = setup.kicks.get(slot) {
                        // Consume the kick (the count is irrelevant); epoll said it is readable.
                        let _ = k.read();
                        want_queue[slot] = true;
                    }
                }
            }
        }
        if setup.shared.needs_reset.load(Ordering::SeqCst) {
            // Failed: kicks and backend events are consumed and ignored until reset.
            want_queue.fill(false);
            want_backend.fill(false);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runner: a device and its worker lifecycle (what the transport drives)
// ---------------------------------------------------------------------------------------------

/// A virtio device plus the lifecycle of its one worker. The transport (and device unit tests)
/// activate, reset and query a device only through this type.
pub struct Runner<D: VirtioDevice + ?Sized> {
    device: Box<D>,
    worker: Option<Worker>,
    /// A handler whose worker was stopped by the caller ([`Runner::park`]), for the next reset.
    parked: Option<Box<dyn VirtioHandler>>,
    /// The kick eventfds handed over at activation, given back at reset.
    kicks: Vec<EventFd>,
    active: bool,
    needs_reset: Arc<AtomicBool>,
}

impl<D: VirtioDevice + ?Sized> Runner<D> {
    pub fn new(device: Box<D>) -> Self {
        Self {
            device,
            worker: None,
            parked: None,
            kicks: Vec::new(),
            active: false,
            needs_reset: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// True when the device failed and waits for a driver reset (DEVICE_NEEDS_RESET).
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// True while activated (until reset), failed or not.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Starts the device on `queues`. On failure the device is marked NEEDS_RESET (the caller
    /// raises the configuration interrupt) and keeps the kicks until reset.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active {
            return Err(ActivateError::AlreadyActive);
        }
        self.active = true;
        self.needs_reset.store(false, Ordering::SeqCst);
        let mut worker_kicks = Vec::with_capacity(queues.len());
        let mut qs = Vec::with_capacity(queues.len());
        for q in queues {
            match q.kick.try_clone() {
                Ok(k) => worker_kicks.push(k),
                Err(e) => {
                    self.kicks.push(q.kick);
                    return self.failed(ActivateError::Worker(e));
                }
            }
            self.kicks.push(q.kick);
            qs.push((q.index, q.queue));
        }
        let handler = match self.device.activate(mem, acked_features, qs) {
            Ok(h) => h,
            Err(e) => return self.failed(e),
        };
        let name = self.device.name();
        match Worker::start(
            &name,
            handler,
            worker_kicks,
            interrupt,
            self.needs_reset.clone(),
        ) {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err((e, handler)) => {
                if let Some(h) = handler {
                    self.device.deactivate(h);
                }
                self.failed(ActivateError::Worker(e))
            }
        }
    }

    fn failed(&mut self, e: ActivateError) -> Result<(), ActivateError> {
        self.needs_reset.store(true, Ordering::SeqCst);
        Err(e)
    }

    /// Takes the worker out, so the caller can stop (join) it without holding its own locks;
    /// it hands the handler back with [`Runner::park`] before the reset.
    pub fn take_worker(&mut self) -> Option<Worker> {
        self.worker.take()
    }

    /// Keeps the handler of a worker stopped through [`Runner::take_worker`] until the reset.
    pub fn park(&mut self, handler: Option<Box<dyn VirtioHandler>>) {
        if let Some(h) = handler {
            if let Some(old) = self.parked.replace(h) {
                self.device.deactivate(old);
            }
        }
    }

    /// Gives the handler back to the device and returns the kick eventfds (None when not
    /// active).
    fn finish_reset(&mut self, handler: Option<Box<dyn VirtioHandler>>) -> Option<Vec<EventFd>> {
        if let Some(h) = handler.or_else(|| self.parked.take()) {
            self.device.deactivate(h);
        }
        self.needs_reset.store(false, Ordering::SeqCst);
        if !std::mem::take(&mut self.active) {
            return None;
        }
        Some(std::mem::take(&mut self.kicks))
    }

    /// Stops the worker (joined) and returns the kicks; None when the device was not active.
    pub fn reset(&mut self) -> Option<Vec<EventFd>> {
        let handler = self.take_worker().and_then(Worker::stop);
        self.finish_reset(handler)
    }

    /// Pauses the worker (see [`Worker::pause`]); true when there is none or it paused.
    pub fn pause(&self) -> bool {
        self.worker.as_ref().is_none_or(Worker::pause)
    }

    pub fn resume(&self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }
}

impl<D: VirtioDevice + ?Sized> Drop for Runner<D> {
    fn drop(&mut self) {
        drop(self.reset());
    }
}

/// Downcasts a handler given back by the worker to the device's own type.
pub fn downcast<T: VirtioHandler>(h: Box<dyn VirtioHandler>) -> Option<Box<T>> {
    let any: Box<dyn Any> = h;
    any.downcast::<T>().ok()
}

#[cfg(test)]
mod tests;
