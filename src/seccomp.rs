//! System-call filters (seccomp-bpf, the rust-vmm `seccompiler` crate), one per thread kind,
//! each installed by the thread itself before it touches anything the guest controls: a vCPU
//! before its first KVM_RUN, a device worker before its first queue, the console reader before
//! its first read, the VM's event loop before it waits.
//!
//! `--seccomp on` (default): a call outside the thread's list raises SIGSYS; the handler
//! prints one line naming the call and the thread and ends ferrovm with status 5.
//! `--seccomp log`: the call is allowed and the kernel logs it (`audit: type=1326 ... comm=
//! <thread> syscall=N`, in dmesg). `--seccomp off`: no filter.
//!
//! The thread that builds VMs (main, or the caller of `vmm::run`) keeps no filter: it opens
//! files, starts helper daemons and, with `--reboot restart`, builds the VM again; it handles
//! no guest input while the VM runs (it waits for the event-loop thread).
//!
//! Filters stack: a thread inherits its creator's. Device workers start when the guest sets
//! DRIVER_OK, on a vCPU thread, so the vCPU list includes what a worker needs; each worker
//! then narrows itself to the worker list. The lists live next to each other below, grouped
//! by what needs them, so that adding a device shows what it must add.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

include!(concat!(env!("OUT_DIR"), "/syscall_names.rs"));

/// Exit status of a ferrovm stopped by a forbidden system call.
pub const SECCOMP_EXIT_STATUS: i32 = 5;

/// `--seccomp on|log|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    #[default]
    On,
    Log,
    Off,
}

impl SeccompMode {
    pub fn parse(s: &str) -> Option<SeccompMode> {
        match s {
            "on" => Some(SeccompMode::On),
            "log" => Some(SeccompMode::Log),
            "off" => Some(SeccompMode::Off),
            _ => None,
        }
    }
}

/// The kinds of thread that run while a guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and the devices' register handlers; starts and stops device workers.
    Vcpu,
    /// Serves one virtio device's queues and backends.
    Worker,
    /// Reads the terminal (stdin) for the guest's console.
    ConsoleReader,
    /// Waits for the VM to stop, suspends and wakes it, prints live statistics.
    EventLoop,
    /// `ferrovm run -- CMD`: relays the command's streams between vsock sockets and stdio.
    RunRelay,
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for {0:?} threads: {1}")]
    Build(ThreadKind, String),
    #[error("cannot install the seccomp filter for {0:?} threads: {1}")]
    Install(ThreadKind, String),
}

/// The mode `vmm::run` set for the VM's threads (device workers read it where they start).
static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the mode the threads of the VM being built install.
pub fn set_mode(mode: SeccompMode) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

/// The mode last set by [`set_mode`].
pub fn mode() -> SeccompMode {
    match MODE.load(Ordering::Relaxed) {
        0 => SeccompMode::On,
        1 => SeccompMode::Log,
        _ => SeccompMode::Off,
    }
}

// ---- the lists ------------------------------------------------------------------------

/// Every thread: memory, futexes, clocks, signals, thread exit, logging to stderr.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_pread64, // KVM's statistics fds (live figures from any thread)
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_prctl,
];

/// Starting, naming and joining threads (a vCPU starts device workers).
/// `clone` is allowed with CLONE_THREAD only (threads, not processes); `clone3`, whose flags
/// a filter cannot read, answers ENOSYS so the C library falls back to `clone`.
const THREADS: &[i64] = &[
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_tgkill,
    // A new worker narrows itself with its own filter (filters only ever add up).
    libc::SYS_seccomp,
];

/// Device workers: disk images (raw, qcow2, VHD; io_uring with direct=on), TAP and passt
/// frames, vsock and vhost-user sockets, eventfds and epoll sets made at activation.
const WORKER: &[i64] = &[
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_dup,
];

/// The event loop: kicks vCPUs (tgkill), S3 suspend and wake (KVM ioctls on the vCPUs; the
/// RTC alarm reads the C library's time zone, a read-only open).
const EVENT_LOOP: &[i64] = &[libc::SYS_tgkill];

/// The command relay: its vsock listeners and stdio.
const RUN_RELAY: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_splice,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
];

/// ioctl request types allowed, per thread kind: KVM's (0xAE), TUN's (b'T', 0x54: TAP
/// offloads and terminal attributes share it) and io_uring none (it has its own calls).
const IOCTL_KVM: u64 = 0xae;
const IOCTL_TTY_TUN: u64 = 0x54;

/// Kinds that may open files, read-only only (`openat` with O_WRONLY or O_RDWR is refused):
/// a vCPU (virtio-rng's /dev/urandom at activation; the C library's time zone for the RTC)
/// and the event loop (the RTC alarm).
fn opens_read_only(kind: ThreadKind) -> bool {
    matches!(kind, ThreadKind::Vcpu | ThreadKind::EventLoop)
}

fn lists(kind: ThreadKind) -> (Vec<i64>, &'static [u64]) {
    let mut v: Vec<i64> = BASE.to_vec();
    let ioctls: &'static [u64] = match kind {
        ThreadKind::Vcpu => {
            v.extend(THREADS);
            v.extend(WORKER);
            &[IOCTL_KVM, IOCTL_TTY_TUN]
        }
        ThreadKind::Worker => {
            v.extend(WORKER);
            &[IOCTL_TTY_TUN]
        }
        // The console reader: stdin and the terminal, nothing beyond the base.
        ThreadKind::ConsoleReader => &[IOCTL_TTY_TUN],
        ThreadKind::EventLoop => {
            v.extend(EVENT_LOOP);
            &[IOCTL_KVM, IOCTL_TTY_TUN]
        }
        ThreadKind::RunRelay => {
            v.extend(RUN_RELAY);
            &[IOCTL_TTY_TUN]
        }
    };
    v.sort_unstable();
    v.dedup();
    (v, ioctls)
}

/// A rule: argument `arg` (of `len`) masked with `mask` equals `value`.
fn masked(arg: u8, len: SeccompCmpArgLen, mask: u64, value: u64) -> Result<SeccompRule, String> {
    let cond = SeccompCondition::new(arg, len, SeccompCmpOp::MaskedEq(mask), value)
        .map_err(|e| e.to_string())?;
    SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
}

/// The filter for `kind`; a call outside it gets `mismatch`.
fn filter(kind: ThreadKind, mismatch: SeccompAction) -> Result<SeccompFilter, String> {
    use SeccompCmpArgLen::{Dword, Qword};
    let (calls, ioctl_types) = lists(kind);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        calls.into_iter().map(|nr| (nr, Vec::new())).collect();
    // ioctl request bits 15:8 are the type (`_IOC_TYPE`).
    let ioctl: Vec<SeccompRule> = ioctl_types
        .iter()
        .map(|&t| masked(1, Dword, 0xff00, t << 8))
        .collect::<Result<_, _>>()?;
    if !ioctl.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl);
    }
    if kind == ThreadKind::Vcpu {
        let thread = libc::CLONE_THREAD as u64;
        rules.insert(libc::SYS_clone, vec![masked(0, Qword, thread, thread)?]);
    }
    if opens_read_only(kind) {
        let rdonly = masked(2, Dword, libc::O_ACCMODE as u64, libc::O_RDONLY as u64)?;
        rules.insert(libc::SYS_openat, vec![rdonly]);
    }
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| e.to_string())
}

/// Compiles `f` and installs it on the calling thread.
fn apply(kind: ThreadKind, f: Result<SeccompFilter, String>) -> Result<(), SeccompError> {
    let f = f.map_err(|e| SeccompError::Build(kind, e))?;
    let prog: seccompiler::BpfProgram = f
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(kind, e.to_string()))?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(kind, e.to_string()))
}

/// Installs the filter for `kind` on the calling thread, as the VM's mode says.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    install_mode(kind, mode())
}

/// [`install`] with an explicit mode.
pub fn install_mode(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On => SeccompAction::Trap,
    };
    install_sigsys_handler();
    apply(kind, filter(kind, mismatch))?;
    if kind == ThreadKind::Vcpu {
        // Stacked on the list (which allows clone3): ERRNO outranks ALLOW.
        let rules = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
        let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
        let f = SeccompFilter::new(rules, SeccompAction::Allow, enosys, TargetArch::x86_64);
        apply(kind, f.map_err(|e| e.to_string()))?;
    }
    Ok(())
}

/// The name of system call `nr` (x86_64), if known.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES.iter().find(|e| e.0 == nr).map(|e| e.1)
}

fn install_sigsys_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO; the handler only
        // calls async-signal-safe functions (prctl, write, _exit).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = sigsys_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        }
    });
}

/// Appends `n` in decimal to `buf` at `at`; returns the new end.
fn put_num(buf: &mut [u8], mut at: usize, n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        if at < buf.len() {
            buf[at] = d;
            at += 1;
        }
    }
    at
}

fn put(buf: &mut [u8], mut at: usize, s: &[u8]) -> usize {
    for &b in s {
        if at < buf.len() {
            buf[at] = b;
            at += 1;
        }
    }
    at
}

/// The one line for a forbidden call `nr` made by thread `thread`.
fn message(buf: &mut [u8], thread: &[u8], nr: i64) -> usize {
    let mut at = put(buf, 0, b"ferrovm: seccomp: thread '");
    at = put(buf, at, thread);
    at = put(buf, at, b"' made a system call it may not make: ");
    match syscall_name(nr) {
        Some(name) => at = put(buf, at, name.as_bytes()),
        None => at = put(buf, at, b"syscall"),
    }
    at = put(buf, at, b" (");
    at = put_num(buf, at, nr as u64);
    put(
        buf,
        at,
        b"); stopping (--seccomp log lets it through and logs it)\n",
    )
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SIGSYS's siginfo: si_call_addr (pointer) at offset 16, si_syscall (int) at 24.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name` (allowed in every filter).
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let mut buf = [0u8; 256];
    let n = message(&mut buf, &name[..len], nr.into());
    // SAFETY: write and _exit are async-signal-safe; buf holds n initialised bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        crate::console::restore_terminal(); // async-signal-safe: an atomic and tcsetattr
        libc::_exit(SECCOMP_EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_and_names_are_known() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Worker,
            ThreadKind::ConsoleReader,
            ThreadKind::EventLoop,
            ThreadKind::RunRelay,
        ] {
            let f = filter(kind, SeccompAction::Trap).unwrap();
            let prog: seccompiler::BpfProgram = f.try_into().unwrap();
            assert!(!prog.is_empty());
        }
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        let mut buf = [0u8; 256];
        let n = message(&mut buf, b"vcpu0", libc::SYS_openat);
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            line.contains("thread 'vcpu0'") && line.contains("openat (257)"),
            "{line}"
        );
        assert_eq!(SeccompMode::parse("log"), Some(SeccompMode::Log));
        assert_eq!(SeccompMode::parse("maybe"), None);
    }

    #[test]
    fn a_worker_may_not_open_files() {
        // In a thread of its own (filters cannot be removed): `log` mode lets the call
        // through, so the test process survives; the kernel logs it.
        let t = std::thread::spawn(|| {
            install_mode(ThreadKind::Worker, SeccompMode::Log).unwrap();
            std::fs::File::open("/dev/null").is_ok()
        });
        assert!(t.join().unwrap(), "log mode allows the call");
        let (calls, _) = lists(ThreadKind::Worker);
        assert!(!calls.contains(&libc::SYS_openat) && !opens_read_only(ThreadKind::Worker));
        assert!(!calls.contains(&libc::SYS_execve));
        let (calls, _) = lists(ThreadKind::Vcpu);
        assert!(!calls.contains(&libc::SYS_execve) && !calls.contains(&libc::SYS_fork));
        assert!(
            !calls.contains(&libc::SYS_clone),
            "clone only with CLONE_THREAD, as a rule"
        );
    }
}
