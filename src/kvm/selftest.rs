//! `ferrovm selftest`: proves that /dev/kvm can run a guest, independently of any kernel image.
//!
//! It creates a VM with 64 KiB of RAM, runs a few real-mode instructions and checks that every
//! exit arrives in order with the expected data: port write, port read, MMIO write, MMIO read, HLT.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

/// What failed during the self-test.
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot map guest memory")]
    Mmap(#[source] std::io::Error),
    #[error("KVM_SET_USER_MEMORY_REGION failed")]
    SetMemory(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VCPU failed")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    #[error("cannot set vCPU registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    #[error("exit {index}: expected {expected}, got {got}")]
    UnexpectedExit {
        index: usize,
        expected: &'static str,
        got: String,
    },
}

/// Real-mode program, loaded at 0x1000:
/// ```text
/// mov dx, 0x3f8 ; mov al, 'K' ; out dx, al      -> IoOut(0x3f8, [0x4b])
/// in al, dx                                     -> IoIn(0x3f8, 1 byte); we return 0x5a
/// mov [0x8000], al                              -> MmioWrite(0x8000, [0x5a])  (no RAM there)
/// mov al, [0x8000]                              -> MmioRead(0x8000, 1 byte)
/// hlt                                           -> Hlt
/// ```
const CODE: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'K', // mov al, 'K'
    0xee, // out dx, al
    0xec, // in al, dx
    0xa2, 0x00, 0x80, // mov [0x8000], al
    0xa0, 0x00, 0x80, // mov al, [0x8000]
    0xf4, // hlt
];

const MEM_SIZE: usize = 0x8000;
const CODE_ADDR: u64 = 0x1000;

/// Outcome of a successful self-test.
pub struct SelftestReport {
    pub api_version: i32,
    pub exits: Vec<String>,
}

/// Runs the self-test on `/dev/kvm`.
pub fn run() -> Result<SelftestReport, SelftestError> {
    let kvm = Kvm::new().map_err(SelftestError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(SelftestError::CreateVm)?;

    // SAFETY: an anonymous private mapping; the result is checked before use and unmapped
    // only after the VM is gone (at the end of this function).
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(SelftestError::Mmap(std::io::Error::last_os_error()));
    }
    let result = run_in(&vm, host as *mut u8);
    drop(vm);
    // SAFETY: `host` is the mapping created above, with the same length; the VM that used it
    // has been dropped.
    unsafe { libc::munmap(host, MEM_SIZE) };
    result.map(|exits| SelftestReport {
        api_version: kvm.get_api_version(),
        exits,
    })
}

fn run_in(vm: &kvm_ioctls::VmFd, host: *mut u8) -> Result<Vec<String>, SelftestError> {
    // SAFETY: `host` points to MEM_SIZE writable bytes and CODE fits at CODE_ADDR.
    unsafe {
        std::ptr::copy_nonoverlapping(CODE.as_ptr(), host.add(CODE_ADDR as usize), CODE.len());
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region describes a live mapping that outlives the VM (see `run`).
    unsafe { vm.set_user_memory_region(region) }.map_err(SelftestError::SetMemory)?;

    let mut vcpu = vm.create_vcpu(0).map_err(SelftestError::CreateVcpu)?;
    let mut sregs = vcpu.get_sregs().map_err(SelftestError::SetRegs)?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).map_err(SelftestError::SetRegs)?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(SelftestError::SetRegs)?;

    let expected = ["IoOut", "IoIn", "MmioWrite", "MmioRead", "Hlt"];
    let mut seen = Vec::new();
    for (index, &want) in expected.iter().enumerate() {
        let exit = vcpu.run().map_err(SelftestError::Run)?;
        let (ok, got) = match exit {
            VcpuExit::IoOut(port, data) => (
                want == "IoOut" && port == 0x3f8 && data == b"K",
                format!("IoOut(port {port:#x}, {data:x?})"),
            ),
            VcpuExit::IoIn(port, data) => {
                data.fill(0x5a);
                (
                    want == "IoIn" && port == 0x3f8 && data.len() == 1,
                    format!("IoIn(port {port:#x}, {} byte)", data.len()),
                )
            }
            VcpuExit::MmioWrite(addr, data) => (
                want == "MmioWrite" && addr == 0x8000 && data == [0x5a],
                format!("MmioWrite({addr:#x}, {data:x?})"),
            ),
            VcpuExit::MmioRead(addr, data) => {
                data.fill(0);
                (
                    want == "MmioRead" && addr == 0x8000 && data.len() == 1,
                    format!("MmioRead({addr:#x}, {} byte)", data.len()),
                )
            }
            VcpuExit::Hlt => (want == "Hlt", "Hlt".to_string()),
            other => (false, format!("{other:?}")),
        };
        if !ok {
            return Err(SelftestError::UnexpectedExit {
                index,
                expected: want,
                got,
            });
        }
        seen.push(got);
    }
    Ok(seen)
}
