//! ACPI S3 (suspend to RAM), the VMM's half: what the firmware does on a PC.
//!
//! The guest writes SLP_TYP = S3 with SLP_EN (`devices::acpi_pm`); every vCPU then parks
//! before its next instruction ([`VmControl::park`]). [`suspend`] waits until all are parked,
//! then until a wake event: the RTC alarm (`devices::cmos`) with PM1_EN.RTC_EN set, the only
//! wake source of this machine (no power button, no wake-on-LAN). On wake, PM1_STS gets
//! WAK_STS | RTC_STS and the vCPUs resume at the FACS Firmware_Waking_Vector: the boot
//! processor in real mode, the others waiting for INIT/SIPI, RAM untouched. A zero (or
//! impossible) vector means the OS left no resume path: the VM resets, as a firmware would
//! boot afresh. Devices keep their state (the guest's drivers reinitialise them on resume).

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::devices::acpi_pm::AcpiPm;
use crate::devices::cmos::Cmos;
use crate::devices::{StopRequest, VmControl};

/// What an S3 wake needs: the wake sources and where the waking vector is.
pub struct WakeSources<'a> {
    pub pm: &'a Mutex<AcpiPm>,
    pub cmos: &'a Mutex<Cmos>,
    pub mem: &'a GuestMemoryMmap,
    /// The FACS's Firmware_Waking_Vector.
    pub waking_vector: GuestAddress,
}

/// How often a suspended VM looks at its wake sources.
const WAKE_POLL: Duration = Duration::from_millis(20);

/// Runs one suspend/wake cycle after the guest asked for S3. Returns when the vCPUs run
/// again, or when the VM is stopping (host signal, console quit) or resetting.
pub fn suspend(control: &VmControl, vcpus: &[JoinHandle<()>], wake: &WakeSources) {
    let since = unix_seconds();
    let kick = || {
        for t in vcpus.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(SIGRTMIN());
        }
    };
    if !control.wait_parked(vcpus.len(), kick) {
        return;
    }
    log::info!("S3: all vCPUs suspended; waiting for the RTC alarm");
    loop {
        if control.is_stopping() {
            return;
        }
        let enabled = lock(wake.pm).rtc_wake_enabled();
        if enabled && lock(wake.cmos).alarm_fired_since(since) {
            break;
        }
        std::thread::sleep(WAKE_POLL);
    }
    lock(wake.pm).woken_by_rtc();
    let vector: u32 = wake.mem.read_obj(wake.waking_vector).unwrap_or(0);
    if vector == 0 || vector >= 0x10_0000 {
        log::info!("S3: waking vector {vector:#x} is not a real-mode address: resetting");
        control.request_stop(StopRequest::Reset); // parked vCPUs see it and end
        return;
    }
    log::info!("S3: RTC alarm; resuming at the waking vector {vector:#x}");
    control.wake(vector);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
