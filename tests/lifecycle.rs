//! Fast tier: several VMs in one process (as `bench-exits` and the control API run them), one
//! after another and at the same time. When each ends, nothing of it may remain: no vCPU,
//! device-worker or console thread, no KVM VM file descriptor (nor any other descriptor),
//! and no guest RAM mapping.

use std::path::PathBuf;

use ferrovm::config::{SerialMode, VmConfig};
use ferrovm::devices::virtio::block::DiskConfig;
use ferrovm::vmm::{self, VmOutcome};

/// Names of this process's threads.
fn threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|c| c.trim_end().to_string())
        .collect()
}

/// How many KVM VM descriptors this process holds.
fn kvm_vm_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("kvm-vm"))
        .count()
}

/// A VM with every kind of device the command line can add: two vCPUs, a disk, virtio-rng,
/// the bench device; the guest prints and powers off.
fn config(dir: &std::path::Path, n: usize) -> VmConfig {
    let kernel = dir.join("hello.elf");
    std::fs::write(&kernel, ferrovm::firmware::get("hello").unwrap()).unwrap();
    let disk = dir.join(format!("disk{n}.img"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    VmConfig {
        cpus: 2,
        mem_size: 64 << 20,
        serial: SerialMode::Off,
        rng: true,
        bench_device: true,
        disks: vec![DiskConfig::new(disk)],
        ..VmConfig::with_kernel(kernel)
    }
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrovm-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Mappings of exactly one VM's guest RAM size (64 MiB) in this process.
fn guest_ram_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?.0.split_once('-')?;
            let len = u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?;
            Some(len == 64 << 20)
        })
        .filter(|&is_ram| is_ram)
        .count()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Threads of this process that were not there `before` (or are there twice now).
fn extra_threads(before: &[String]) -> Vec<String> {
    let now = threads();
    now.iter()
        .filter(|t| !before.contains(t) || now.iter().filter(|u| u == t).count() > 1)
        .cloned()
        .collect()
}

fn assert_nothing_left(before: &[String], what: &str) {
    // A joined thread's kernel task can outlive pthread_join by a moment (the kernel wakes
    // the joiner before the task is gone from /proc): give exiting threads a bounded grace.
    let t0 = std::time::Instant::now();
    let mut extra = extra_threads(before);
    while !extra.is_empty() && t0.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(10));
        extra = extra_threads(before);
    }
    assert!(extra.is_empty(), "{what}: threads left behind: {extra:?}");
    assert_eq!(kvm_vm_fds(), 0, "{what}: a KVM VM descriptor is still open");
    assert_eq!(guest_ram_mappings(), 0, "{what}: guest RAM is still mapped");
}

#[test]
fn vms_in_one_process_leave_no_thread_or_vm_fd_behind() {
    let dir = scratch();
    let before = threads();
    assert_eq!(kvm_vm_fds(), 0);
    assert_eq!(guest_ram_mappings(), 0);
    let mut fds = None;
    for n in 0..3 {
        assert_eq!(vmm::run(config(&dir, n)).unwrap(), VmOutcome::PowerOff);
        assert_nothing_left(&before, &format!("after sequential VM {n}"));
        // The first VM makes the process-wide ones (the SIGUSR1 eventfd, the stop-signal
        // pipe); every later VM must leave the count where it found it.
        let now = open_fds();
        let base = *fds.get_or_insert(now);
        assert_eq!(now, base, "after sequential VM {n}: descriptors left open");
    }
    let (a, b) = (config(&dir, 10), config(&dir, 11));
    let ta = std::thread::spawn(move || vmm::run(a).unwrap());
    let tb = std::thread::spawn(move || vmm::run(b).unwrap());
    assert_eq!(ta.join().unwrap(), VmOutcome::PowerOff);
    assert_eq!(tb.join().unwrap(), VmOutcome::PowerOff);
    assert_nothing_left(&before, "after two concurrent VMs");
    let _ = std::fs::remove_dir_all(&dir);
}
