//! Emulated devices. Devices never touch KVM: they get guest memory, an [`IrqLine`] and a
//! [`VmControl`] to ask for the VM to stop; the boot recipe wires those to irqfds and the event loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
}

impl VmControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(VmControlInner {
                request: Mutex::new(None),
                stopping: AtomicBool::new(false),
                event: EventFd::new(EFD_NONBLOCK)?,
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

    /// Readable when a stop was requested.
    pub fn event(&self) -> &EventFd {
        &self.inner.event
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

pub mod acpi_pm;
pub mod cmos;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod virtio;
