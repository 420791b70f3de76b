//! Emulated devices. Devices never touch KVM: they get guest memory, an [`IrqLine`] and a
//! [`VmControl`] to ask for the VM to stop; the boot recipe wires those to irqfds and the event loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest asked the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// ACPI S5 (poweroff).
    PowerOff,
    /// i8042 reset line, ACPI reset register or port 0xcf9.
    Reset,
    /// isa-debug-exit: ferrovm exits with `(value << 1) | 1`.
    DebugExit(u32),
}

/// A cloneable handle devices use to stop the VM. The first request wins.
#[derive(Clone)]
pub struct VmControl {
    inner: Arc<VmControlInner>,
}

struct VmControlInner {
    request: Mutex<Option<StopRequest>>,
    stopping: AtomicBool,
    event: EventFd,
    /// ACPI S3: set by the guest's sleep request, cleared by [`VmControl::wake`].
    suspended: AtomicBool,
    sleep: Mutex<SleepState>,
    sleep_changed: Condvar,
}

/// Where the vCPUs are in a suspend/wake cycle.
#[derive(Default)]
struct SleepState {
    /// vCPUs waiting in [`VmControl::park`].
    parked: usize,
    /// Counts wakes; a parked vCPU leaves when it changes.
    wakes: u64,
    /// Where the vCPUs resume (the FACS waking vector).
    vector: u32,
}

impl VmControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(VmControlInner {
                request: Mutex::new(None),
                stopping: AtomicBool::new(false),
                event: EventFd::new(EFD_NONBLOCK)?,
                suspended: AtomicBool::new(false),
                sleep: Mutex::new(SleepState::default()),
                sleep_changed: Condvar::new(),
            }),
        })
    }

    /// Records `req` (unless a request is already pending) and wakes whoever waits on [`Self::event`].
    pub fn request_stop(&self, req: StopRequest) {
        let mut slot = self.inner.request.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(req);
        }
        self.inner.stopping.store(true, Ordering::SeqCst);
        // A failed write means the counter is saturated: a wake-up is pending anyway.
        let _ = self.inner.event.write(1);
    }

    /// Marks the VM as stopping without a guest request (host signal, VMM error, console quit).
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _ = self.inner.event.write(1);
    }

    /// True once anyone asked the VM to stop.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// The guest's request, if any.
    pub fn request(&self) -> Option<StopRequest> {
        *self.inner.request.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Readable when a stop or a suspend was requested.
    pub fn event(&self) -> &EventFd {
        &self.inner.event
    }

    /// The guest asked for S3: every vCPU parks before its next guest instruction, and the
    /// VMM (woken through [`Self::event`]) waits for a wake event.
    pub fn request_suspend(&self) {
        self.inner.suspended.store(true, Ordering::SeqCst);
        let _ = self.inner.event.write(1);
    }

    /// True between a suspend request and the wake.
    pub fn is_suspended(&self) -> bool {
        self.inner.suspended.load(Ordering::SeqCst)
    }

    fn sleep_state(&self) -> std::sync::MutexGuard<'_, SleepState> {
        self.inner.sleep.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPU side: waits until the VM wakes (returns the waking vector) or stops (`None`).
    pub fn park(&self) -> Option<u32> {
        let mut st = self.sleep_state();
        st.parked += 1;
        self.inner.sleep_changed.notify_all();
        let wakes = st.wakes;
        // stop() is async-signal-safe and cannot notify: look at it every few ms.
        while st.wakes == wakes && !self.is_stopping() {
            st = self
                .inner
                .sleep_changed
                .wait_timeout(st, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.parked -= 1;
        (st.wakes != wakes).then_some(st.vector)
    }

    /// VMM side: waits until `n` vCPUs are parked, calling `kick` (to get them out of
    /// KVM_RUN) every few ms. False if the VM stops first.
    pub fn wait_parked(&self, n: usize, kick: impl Fn()) -> bool {
        let mut st = self.sleep_state();
        while st.parked < n {
            if self.is_stopping() {
                return false;
            }
            drop(st);
            kick();
            st = self.sleep_state();
            st = self
                .inner
                .sleep_changed
                .wait_timeout(st, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// VMM side: resumes the parked vCPUs at `vector`.
    pub fn wake(&self, vector: u32) {
        let mut st = self.sleep_state();
        st.vector = vector;
        st.wakes += 1;
        self.inner.suspended.store(false, Ordering::SeqCst);
        self.inner.sleep_changed.notify_all();
    }
}

/// An interrupt line a device raises. Backed by an eventfd that the boot recipe registers as
/// a KVM irqfd (edge-triggered GSI), so raising it never leaves the device's thread.
#[derive(Clone)]
pub struct IrqLine {
    fd: Arc<EventFd>,
}

impl IrqLine {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            fd: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Raises the interrupt (edge).
    pub fn trigger(&self) -> std::io::Result<()> {
        self.fd.write(1)
    }

    /// The eventfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }
}

/// Level-triggered interrupt lines a device sets high or low (the VMM implements it with
/// KVM_IRQ_LINE; the call returns once the irqchip has the new level).
pub trait IrqLevel: Send + Sync {
    fn set_level(&self, gsi: u32, high: bool) -> std::io::Result<()>;
}

pub mod acpi_pm;
pub mod cmos;
pub mod debug_exit;
pub mod debugcon;
pub mod dma;
pub mod edu;
pub mod fw_cfg;
pub mod i8042;
pub mod ioapic;
pub mod pci;
pub mod pci_testdev;
pub mod serial;
pub mod testdev;
pub mod virtio;
pub mod vtd;
