//! The "bench" device: what the `bench-exits` micro-guests and the exit-statistics tests talk
//! to. Port I/O at [`layout::BENCH_PORT`] (offsets below), a 4 KiB MMIO page, two
//! ioeventfd-only addresses and an irqfd-driven interrupt line (see layout.rs).
//!
//! | offset | in | out |
//! |---|---|---|
//! | 0x0 data  | 0x5a bytes | ignored |
//! | 0x4 param | next benchmark parameter (N, R, ...; 0 when none) | ignored |
//! | 0x8 mark  | all-ones | 1 start repetition, 2 end repetition, 3 start / 4 stop interrupt thread |
//! | 0xc tsc   | all-ones | guest TSC delta of the repetition: low 32 bits, then high |
//!
//! Everything the guest can make the device store is capped ([`MAX_SAMPLES`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout;
use crate::bus::BusDeviceMut;
use crate::devices::{IrqLine, VmControl};
use crate::kvm::vm::Vm;
use crate::resources::Buses;

pub const OFF_DATA: u64 = 0x0;
pub const OFF_PARAM: u64 = 0x4;
pub const OFF_MARK: u64 = 0x8;
pub const OFF_TSC: u64 = 0xc;
/// Samples kept per run (a guest cannot grow the log without bound).
pub const MAX_SAMPLES: usize = 100_000;
/// Mark value that makes the vCPU thread call getppid, which no seccomp filter allows.
pub const SECCOMP_PROBE: u32 = 0x5ec;
/// What the data port and the MMIO page read as.
pub const READ_VALUE: u8 = 0x5a;

/// What one benchmark run recorded: the host time and guest TSC delta of each repetition.
#[derive(Debug, Default)]
pub struct BenchLog {
    params: Vec<u32>,
    next_param: usize,
    rep_start: Option<Instant>,
    pub host_ns: Vec<u64>,
    pub guest_tsc: Vec<u64>,
    tsc_low: Option<u32>,
}

impl BenchLog {
    /// A log whose parameter port returns `params` in order.
    pub fn new(params: Vec<u32>) -> Self {
        Self {
            params,
            ..Default::default()
        }
    }

    pub fn param(&mut self) -> u32 {
        let v = self.params.get(self.next_param).copied().unwrap_or(0);
        self.next_param = self.next_param.saturating_add(1);
        v
    }

    /// Handles a mark value; returns it for the caller's own actions (3/4).
    pub fn mark(&mut self, v: u32) -> u32 {
        match v {
            1 => self.rep_start = Some(Instant::now()),
            2 => {
                if let Some(t) = self.rep_start.take() {
                    if self.host_ns.len() < MAX_SAMPLES {
                        self.host_ns.push(t.elapsed().as_nanos() as u64);
                    }
                }
            }
            _ => {}
        }
        v
    }

    pub fn tsc(&mut self, v: u32) {
        match self.tsc_low.take() {
            None => self.tsc_low = Some(v),
            Some(lo) => {
                if self.guest_tsc.len() < MAX_SAMPLES {
                    self.guest_tsc.push(u64::from(v) << 32 | u64::from(lo));
                }
            }
        }
    }
}

/// Little-endian value of up to 4 bytes.
pub fn le32(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .rev()
        .fold(0u32, |acc, &b| acc << 8 | u32::from(b))
}

/// The host side of the HLT/irqfd benchmark: raises the interrupt once after every interrupt
/// the guest handled, while the guest's count is below its limit (guest RAM at
/// [`layout::BENCH_SHARED_START`]). Ends on `stop`, or after 10 s without progress.
pub fn spawn_pinger(
    mem: GuestMemoryMmap,
    raise: impl Fn() + Send + 'static,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bench-irq".into())
        .spawn(move || {
            let count_at = GuestAddress(layout::BENCH_SHARED_START);
            let limit_at = GuestAddress(layout::BENCH_SHARED_START + 8);
            let mut last = u64::MAX;
            let mut progress = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let (Ok(count), Ok(limit)) = (
                    mem.load::<u64>(count_at, Ordering::Acquire),
                    mem.load::<u64>(limit_at, Ordering::Acquire),
                ) else {
                    return;
                };
                if count != last && count < limit {
                    last = count;
                    raise();
                    progress = Instant::now();
                } else if progress.elapsed() > Duration::from_secs(10) {
                    return;
                } else {
                    std::hint::spin_loop();
                }
            }
        })
}

/// The port I/O side (one instance also serves the MMIO page).
pub struct BenchDevice {
    log: Arc<Mutex<BenchLog>>,
    mem: GuestMemoryMmap,
    irq: IrqLine,
    control: VmControl,
    /// The running pinger thread (`bench-exits` hlt-irqfd) and its stop flag; joined on stop.
    pinger: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl BenchDevice {
    fn lock(&self) -> std::sync::MutexGuard<'_, BenchLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop_pinger(&mut self) {
        if let Some((stop, thread)) = self.pinger.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

impl Drop for BenchDevice {
    fn drop(&mut self) {
        self.stop_pinger();
    }
}

impl BusDeviceMut for BenchDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            OFF_DATA => data.fill(READ_VALUE),
            OFF_PARAM => {
                let v = self.lock().param().to_le_bytes();
                for (d, s) in data.iter_mut().zip(v.iter().chain(std::iter::repeat(&0))) {
                    *d = *s;
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            OFF_MARK => {
                let mark = self.lock().mark(le32(data));
                match mark {
                    3 if self.pinger.is_none() => {
                        let stop = Arc::new(AtomicBool::new(false));
                        let irq = self.irq.clone();
                        let control = self.control.clone();
                        let s2 = stop.clone();
                        let raise = move || {
                            if control.is_stopping() {
                                s2.store(true, Ordering::Relaxed);
                            }
                            let _ = irq.trigger();
                        };
                        if let Ok(t) = spawn_pinger(self.mem.clone(), raise, stop.clone()) {
                            self.pinger = Some((stop, t));
                        }
                    }
                    4 => self.stop_pinger(),
                    SECCOMP_PROBE => {
                        // A system call no vCPU filter allows (the seccomp test): harmless
                        // when filters are off.
                        // SAFETY: getppid takes no arguments and has no effect.
                        unsafe { libc::syscall(libc::SYS_getppid) };
                    }
                    _ => {}
                }
            }
            OFF_TSC => self.lock().tsc(le32(data)),
            _ => {}
        }
    }
}

/// The MMIO page: reads return [`READ_VALUE`], writes are dropped.
pub struct BenchMmio;

impl BusDeviceMut for BenchMmio {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(READ_VALUE);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Eventfds that must live as long as the VM.
pub struct BenchFds {
    _ioeventfds: Vec<EventFd>,
}

/// Puts the bench device on both buses and registers its ioeventfds and irqfd.
pub fn attach(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    buses: &mut Buses,
    control: &VmControl,
    log: Arc<Mutex<BenchLog>>,
) -> Result<BenchFds, crate::vmm::VmmError> {
    use crate::resources::{PlaceError, Sharing, Space};
    use crate::vmm::VmmError;
    use kvm_ioctls::IoEventAddress;
    buses
        .claims
        .claim_gsi(layout::BENCH_GSI, "bench", Sharing::Exclusive)
        .map_err(PlaceError::from)?;
    let irq = IrqLine::new().map_err(VmmError::EventFd)?;
    vm.register_irqfd(irq.eventfd(), layout::BENCH_GSI)?;
    let dev = BenchDevice {
        log,
        mem: mem.clone(),
        irq,
        control: control.clone(),
        pinger: None,
    };
    buses.add(
        Space::Pio,
        u64::from(layout::BENCH_PORT),
        layout::BENCH_PORT_LEN,
        "bench",
        Arc::new(Mutex::new(dev)),
    )?;
    buses.add(
        Space::Mmio,
        layout::BENCH_MMIO_START,
        layout::BENCH_MMIO_LEN,
        "bench",
        Arc::new(Mutex::new(BenchMmio)),
    )?;
    let port = u64::from(layout::BENCH_IOEVENTFD_PORT);
    let claims = &mut buses.claims;
    claims
        .claim(Space::Pio, port, 4, "bench ioeventfd")
        .and_then(|()| {
            claims.claim(
                Space::Mmio,
                layout::BENCH_IOEVENTFD_MMIO,
                8,
                "bench ioeventfd",
            )
        })
        .map_err(PlaceError::from)?;
    let mut fds = Vec::new();
    for addr in [
        IoEventAddress::Pio(port),
        IoEventAddress::Mmio(layout::BENCH_IOEVENTFD_MMIO),
    ] {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_ioevent(&fd, addr)?;
        fds.push(fd);
    }
    Ok(BenchFds { _ioeventfds: fds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_protocol() {
        let mut l = BenchLog::new(vec![100, 3]);
        assert_eq!((l.param(), l.param(), l.param()), (100, 3, 0));
        l.mark(2); // end without start: ignored
        l.mark(1);
        l.mark(2);
        assert_eq!(l.host_ns.len(), 1);
        l.tsc(0x10);
        l.tsc(0x1);
        assert_eq!(l.guest_tsc, vec![0x1_0000_0010]);
        assert_eq!(le32(&[0x78, 0x56, 0x34, 0x12, 0xff]), 0x1234_5678);
        assert_eq!(le32(&[]), 0);
    }
}
