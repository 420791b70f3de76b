//! A vCPU: its boot-time state and its run loop.
//!
//! The run loop is one `match` on the exit reason. Port I/O and MMIO go to the buses; the
//! exits that end the VM are returned to the VMM as a [`VcpuStop`].

use std::sync::Arc;

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::x86_64::cpu_features::CpuFeatures;
use crate::arch::x86_64::{boot::EntryMode, cpuid, regs};
use crate::bus::Bus;
use crate::devices::VmControl;
use crate::exit_stats::{ExitKind, Reason, VcpuExitStats};

/// What failed while setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0}: KVM_SET_CPUID2 failed")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: KVM_SET_MSRS failed")]
    SetMsrs(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {index}: KVM_SET_MSRS set only {set} of {wanted} MSRs")]
    PartialMsrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("vCPU {0}: building the MSR list failed")]
    MsrList(u8),
    #[error("vCPU {0}: KVM_SET_FPU failed")]
    SetFpu(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: KVM_GET/SET_LAPIC failed")]
    Lapic(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: KVM_GET/SET_SREGS failed")]
    Sregs(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: KVM_SET_REGS failed")]
    Regs(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: KVM_SET_MP_STATE failed")]
    MpState(u8, #[source] kvm_ioctls::Error),
}

/// Why a vCPU left its run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VMM asked (guest power-off through a device, host signal, console quit).
    Requested,
    /// KVM_EXIT_SHUTDOWN: triple fault.
    TripleFault { dump: String },
    /// KVM_SYSTEM_EVENT: shutdown (1), reset (2), crash (3).
    SystemEvent { kind: u32 },
    /// KVM_EXIT_INTERNAL_ERROR or KVM_EXIT_FAIL_ENTRY, or an unexpected exit.
    Failed { reason: String, dump: String },
}

/// A vCPU ready to run.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    control: VmControl,
    /// Exit statistics (this thread is the only writer; see [`crate::exit_stats`]).
    pub stats: Arc<VcpuExitStats>,
    unknown_log: RateLimit,
    /// The power-on state an S3 wake returns to (captured by [`Self::configure`]).
    reset_sregs: Option<kvm_bindings::kvm_sregs>,
    reset_lapic: Option<kvm_bindings::kvm_lapic_state>,
    /// Where a level-triggered EOI goes with a split irqchip (the userspace IOAPIC).
    eoi: Option<Arc<dyn EoiTarget>>,
}

/// Receives the EOIs KVM reports for vectors the userspace IOAPIC delivered level-triggered
/// (KVM_EXIT_IOAPIC_EOI; split irqchip only).
pub trait EoiTarget: Send + Sync {
    fn eoi(&self, vector: u8);
}

impl Vcpu {
    pub fn new(fd: VcpuFd, index: u8, pio: Arc<Bus>, mmio: Arc<Bus>, control: VmControl) -> Self {
        let stats = Arc::new(VcpuExitStats::new(index, true, mmio.ranges().map(|r| r.2)));
        Self {
            fd,
            index,
            pio,
            mmio,
            control,
            stats,
            unknown_log: RateLimit::new(20),
            reset_sregs: None,
            reset_lapic: None,
            eoi: None,
        }
    }

    /// Sends this vCPU's KVM_EXIT_IOAPIC_EOI exits to `target` (split irqchip).
    pub fn set_eoi_target(&mut self, target: Arc<dyn EoiTarget>) {
        self.eoi = Some(target);
    }

    fn ioapic_eoi(&self, vector: u8) -> ExitKind {
        match &self.eoi {
            Some(t) => t.eoi(vector),
            None => {
                self.unknown_log
                    .log(|| format!("vCPU {}: IOAPIC EOI {vector:#x} without one", self.index));
            }
        }
        ExitKind::Plain(Reason::IoapicEoi)
    }

    /// Turns exit statistics recording on or off (before the vCPU runs; default on).
    pub fn set_stats_recording(&mut self, on: bool) {
        let names = self.mmio.ranges().map(|r| r.2);
        self.stats = Arc::new(VcpuExitStats::new(self.index, on, names));
    }

    /// Sets the state every vCPU needs: CPUID (with `--cpu`'s `features`), MSRs, FPU and
    /// LAPIC LINT pins.
    pub fn configure(
        &mut self,
        supported: &CpuId,
        irqchip: cpuid::IrqchipFeatures,
        cpus: u8,
        features: &CpuFeatures,
    ) -> Result<(), VcpuError> {
        let i = self.index;
        if i == 0 {
            // Exit handling is timed with the TSC at the rate KVM reports.
            if let Ok(khz) = self.fd.get_tsc_khz() {
                crate::exit_stats::clock::set_tsc_khz(khz);
            }
        }
        let mut cpuid = cpuid::vcpu_cpuid(supported, i, cpus, irqchip);
        features.apply(cpuid.as_mut_slice());
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::SetCpuid(i, e))?;
        let entries = regs::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList(i))?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuError::SetMsrs(i, e))?;
        if set != entries.len() {
            return Err(VcpuError::PartialMsrs {
                index: i,
                set,
                wanted: entries.len(),
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(|e| VcpuError::SetFpu(i, e))?;
        let mut lapic = self.fd.get_lapic().map_err(|e| VcpuError::Lapic(i, e))?;
        regs::set_lint_pins(&mut lapic.regs);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| VcpuError::Lapic(i, e))?;
        self.reset_lapic = Some(lapic);
        self.reset_sregs = Some(self.fd.get_sregs().map_err(|e| VcpuError::Sregs(i, e))?);
        Ok(())
    }

    /// After an S3 wake: the boot processor starts in real mode at `vector` (CS = vector >> 4,
    /// IP = vector & 0xf, data segments 0, as firmware enters the FACS waking vector); the
    /// others wait for INIT/SIPI. The LAPIC returns to its power-on state; RAM is untouched.
    fn wake_at(&mut self, vector: u32) -> Result<(), VcpuError> {
        let i = self.index;
        if let Some(lapic) = &self.reset_lapic {
            self.fd
                .set_lapic(lapic)
                .map_err(|e| VcpuError::Lapic(i, e))?;
        }
        let mp_state = if i == 0 {
            kvm_bindings::KVM_MP_STATE_RUNNABLE
        } else {
            kvm_bindings::KVM_MP_STATE_INIT_RECEIVED
        };
        self.fd
            .set_mp_state(kvm_bindings::kvm_mp_state { mp_state })
            .map_err(|e| VcpuError::MpState(i, e))?;
        if i != 0 {
            return Ok(());
        }
        let mut sregs = match self.reset_sregs {
            Some(s) => s,
            None => self.fd.get_sregs().map_err(|e| VcpuError::Sregs(i, e))?,
        };
        sregs.cs.selector = (vector >> 4) as u16; // vector < 1 MiB: checked by the caller
        sregs.cs.base = u64::from(vector >> 4) << 4;
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            s.selector = 0;
            s.base = 0;
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| VcpuError::Sregs(i, e))?;
        let regs = kvm_bindings::kvm_regs {
            rip: u64::from(vector & 0xf),
            rflags: 2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(|e| VcpuError::Regs(i, e))
    }

    /// Sets the boot processor's registers for the kernel entry. Application processors keep
    /// their reset state and wait for INIT/SIPI from the guest (the in-kernel LAPIC does that).
    pub fn set_boot_registers(&self, mode: EntryMode) -> Result<(), VcpuError> {
        let i = self.index;
        let sregs = self.fd.get_sregs().map_err(|e| VcpuError::Sregs(i, e))?;
        self.fd
            .set_sregs(&regs::boot_sregs(sregs, mode))
            .map_err(|e| VcpuError::Sregs(i, e))?;
        self.fd
            .set_regs(&regs::boot_regs(mode))
            .map_err(|e| VcpuError::Regs(i, e))
    }

    /// Reads back the registers (for tests and `-v` dumps).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the guest until something ends the VM.
    pub fn run(&mut self) -> VcpuStop {
        if self.index == 0 {
            if let Some(start) = crate::START.get() {
                log::debug!(
                    "first KVM_RUN {} us after start",
                    start.elapsed().as_micros()
                );
            }
        }
        loop {
            if self.control.is_stopping() {
                return VcpuStop::Requested;
            }
            if self.control.is_suspended() {
                // S3: no further guest instruction until the VMM wakes the VM.
                let Some(vector) = self.control.park() else {
                    return VcpuStop::Requested;
                };
                if let Err(e) = self.wake_at(vector) {
                    return VcpuStop::Failed {
                        reason: format!("S3 wake: {e}"),
                        dump: String::new(),
                    };
                }
                continue;
            }
            // The element size of string port I/O (`rep outs/ins`: count > 1) is only in
            // kvm_run; read through this pointer, which stays valid as long as the vCPU fd.
            let run_ptr: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
            let io = Dispatch {
                pio: &self.pio,
                mmio: &self.mmio,
                log: &self.unknown_log,
                index: self.index,
            };
            let exit = self.fd.run();
            let t0 = self.stats.start();
            let (kind, stop) = match exit {
                Ok(VcpuExit::IoOut(port, data)) => (io.out(run_ptr, port, data), None),
                Ok(VcpuExit::IoIn(port, data)) => (io.inp(run_ptr, port, data), None),
                Ok(VcpuExit::MmioRead(addr, data)) => (io.mmio(addr, Access::Read(data)), None),
                Ok(VcpuExit::MmioWrite(addr, data)) => (io.mmio(addr, Access::Write(data)), None),
                Ok(VcpuExit::Hlt) => {
                    // Only without an in-kernel LAPIC; nothing can wake this vCPU.
                    let stop = VcpuStop::Failed {
                        reason: "HLT with interrupts impossible".into(),
                        dump: self.dump(),
                    };
                    (ExitKind::Plain(Reason::Hlt), Some(stop))
                }
                Ok(VcpuExit::Shutdown) => (
                    ExitKind::Plain(Reason::Shutdown),
                    Some(VcpuStop::TripleFault { dump: self.dump() }),
                ),
                Ok(VcpuExit::SystemEvent(kind, _)) => (
                    ExitKind::Plain(Reason::SystemEvent),
                    Some(VcpuStop::SystemEvent { kind }),
                ),
                Ok(VcpuExit::InternalError) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: KVM filled the `internal` member: the exit reason is
                    // KVM_EXIT_INTERNAL_ERROR.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    let stop = VcpuStop::Failed {
                        reason: format!("KVM internal error (suberror {suberror})"),
                        dump: self.dump(),
                    };
                    (ExitKind::Plain(Reason::InternalError), Some(stop))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    let stop = VcpuStop::Failed {
                        reason: format!(
                            "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
                        ),
                        dump: self.dump(),
                    };
                    (ExitKind::Plain(Reason::Other), Some(stop))
                }
                Ok(VcpuExit::Intr) => (ExitKind::Plain(Reason::Intr), None),
                Ok(VcpuExit::IoapicEoi(vector)) => (self.ioapic_eoi(vector), None),
                Ok(other) => {
                    self.unknown_log
                        .log(|| format!("vCPU {}: ignored exit {other:?}", self.index));
                    (ExitKind::Plain(Reason::Other), None)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    (ExitKind::Plain(Reason::Intr), None)
                }
                Err(e) => {
                    let stop = VcpuStop::Failed {
                        reason: format!("KVM_RUN failed: {e}"),
                        dump: String::new(),
                    };
                    (ExitKind::Plain(Reason::Other), Some(stop))
                }
            };
            self.stats.record(kind, t0);
            if let Some(stop) = stop {
                return stop;
            }
        }
    }

    /// A one-screen register dump for error reports.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        if let Ok(r) = self.fd.get_regs() {
            s += &format!(
                "vCPU {}: rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n",
                self.index, r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
            );
        }
        if let Ok(sr) = self.fd.get_sregs() {
            s += &format!(
                "  cs={:#x} (l={} db={}) cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n",
                sr.cs.selector, sr.cs.l, sr.cs.db, sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer
            );
        }
        s
    }
}

/// A guest MMIO access: the bytes to fill, or the bytes written.
enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// Sends port I/O and MMIO exits to the buses (borrows only the fields it needs, so the run
/// loop can use it while the exit borrows the vCPU fd).
struct Dispatch<'a> {
    pio: &'a Bus,
    mmio: &'a Bus,
    log: &'a RateLimit,
    index: u8,
}

impl Dispatch<'_> {
    fn out(&self, run: *const kvm_bindings::kvm_run, port: u16, data: &[u8]) -> ExitKind {
        let size = pio_element_size(run, data.len());
        if data
            .chunks(size)
            .any(|d| self.pio.write(u64::from(port), d).is_none())
        {
            self.log.log(|| {
                format!(
                    "vCPU {}: write to unclaimed port {port:#x}: {data:x?}",
                    self.index
                )
            });
        }
        ExitKind::Pio { write: true, port }
    }

    fn inp(&self, run: *const kvm_bindings::kvm_run, port: u16, data: &mut [u8]) -> ExitKind {
        let size = pio_element_size(run, data.len());
        let mut unclaimed = false;
        for d in data.chunks_mut(size) {
            unclaimed |= self.pio.read(u64::from(port), d).is_none();
        }
        if unclaimed {
            self.log
                .log(|| format!("vCPU {}: read from unclaimed port {port:#x}", self.index));
        }
        ExitKind::Pio { write: false, port }
    }

    fn mmio(&self, addr: u64, access: Access) -> ExitKind {
        let (device, write) = match access {
            Access::Read(data) => (self.mmio.read(addr, data), false),
            Access::Write(data) => (self.mmio.write(addr, data), true),
        };
        if device.is_none() {
            let what = if write { "write to" } else { "read from" };
            self.log
                .log(|| format!("vCPU {}: {what} unclaimed MMIO {addr:#x}", self.index));
        }
        ExitKind::Mmio { write, device }
    }
}

/// The size of one element of the port I/O exit in `run` whose data is `len` bytes: `len`
/// itself for a single access, the access size for string I/O (each element goes to the
/// device separately, in order, as on hardware).
fn pio_element_size(run: *const kvm_bindings::kvm_run, len: usize) -> usize {
    if len <= 4 {
        return len.max(1);
    }
    // SAFETY: `run` is the vCPU's mapped kvm_run, alive as long as the fd; the exit reason is
    // KVM_EXIT_IO, so `io` is the union member KVM filled. The read goes through a raw place
    // (no reference is made), and the `io` header does not overlap the data bytes the caller
    // holds a slice of (they are at io.data_offset, past the header).
    let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read() };
    match usize::from(size) {
        s @ (1 | 2 | 4) if len % s == 0 => s,
        _ => len,
    }
}

pub use crate::ratelimit::RateLimit;
