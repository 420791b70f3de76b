//! A Linux TAP device opened through /dev/net/tun with a virtio-net header on every frame
//! (IFF_VNET_HDR), the host end of a virtio-net device. All the unsafe code of the network
//! device lives here.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `virtio_net_hdr_v1` (virtio 1.x: the header always carries `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1 for the terminating NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// TUNSETOFFLOAD flags (what the TAP may hand us, i.e. what the guest may receive).
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;

/// Why a TAP could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot open /dev/net/tun for TAP {name:?} (is the tun module loaded?)")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "TAP {name:?} does not exist and this process may not create it (creating a TAP needs \
         CAP_NET_ADMIN); pre-create one owned by your user: \
         `ip tuntap add dev {name} mode tap user {user} vnet_hdr && ip link set {name} up`"
    )]
    CannotCreate { name: String, user: String },
    #[error(
        "no permission to attach to TAP {name:?}: it is owned by another user/group and this \
         process lacks CAP_NET_ADMIN; re-create it owned by your user: \
         `ip tuntap del dev {name} mode tap && ip tuntap add dev {name} mode tap user {user} vnet_hdr`"
    )]
    PermissionDenied { name: String, user: String },
    #[error("TAP {name:?} is busy: another process is attached to it")]
    Busy { name: String },
    #[error("network interface {name:?} exists but is not a TAP device")]
    NotTap { name: String },
    #[error("{op} on TAP {name:?} failed")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` reduced to the fields TUNSETIFF uses (the kernel copies 40 bytes).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn validate_ifname(name: &str) -> Result<(), TapError> {
    let bad = |reason| {
        Err(TapError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_IFNAME_LEN {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not interface names");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return bad("contains '/', ':', NUL or whitespace");
    }
    Ok(())
}

/// Whether an interface called `name` exists in this thread's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The user to name in "pre-create the TAP" hints.
fn current_user() -> String {
    if let Ok(u) = std::env::var("USER") {
        if !u.is_empty() && u.bytes().all(|b| b.is_ascii_graphic()) {
            return u;
        }
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    uid.to_string()
}

/// An open TAP queue. Reads and writes never block.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// TUN_F_* offloads the TAP accepted when probed.
    supported_offloads: u32,
}

impl Tap {
    /// Opens the TAP `name`, creating it when the process has CAP_NET_ADMIN, with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte virtio 1.x header and O_NONBLOCK.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        validate_ifname(name)?;
        let exists = interface_exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;

        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        // validate_ifname guarantees at most 15 bytes: the name stays NUL-terminated.
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a live, properly sized
        // (40 bytes) and aligned buffer for the duration of the call, and `file` is open.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match err.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) if exists => TapError::PermissionDenied {
                    name,
                    user: current_user(),
                },
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::CannotCreate {
                    name,
                    user: current_user(),
                },
                Some(libc::EBUSY) => TapError::Busy { name },
                Some(libc::EINVAL) if exists => TapError::NotTap { name },
                _ => TapError::Ioctl {
                    name,
                    op: "TUNSETIFF",
                    source: err,
                },
            });
        }
        // The kernel may report the name it actually used; keep ours (it asked for an exact one).
        let actual = CStr::from_bytes_until_nul(&req.name)
            .ok()
            .and_then(|c| c.to_str().ok())
            .unwrap_or(name)
            .to_string();

        let mut tap = Tap {
            file,
            name: actual,
            supported_offloads: 0,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer; `hdr_len` outlives the call.
        let ret = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        tap.supported_offloads = tap.probe_offloads();
        tap.set_offload(0)
            .map_err(|e| tap.ioctl_error("TUNSETOFFLOAD", e))?;
        Ok(tap)
    }

    fn ioctl_error(&self, op: &'static str, source: io::Error) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            op,
            source,
        }
    }

    /// Finds which offloads the TAP accepts (the kernel rejects unknown flags with EINVAL).
    fn probe_offloads(&self) -> u32 {
        let mut ok = 0;
        if self.set_offload(TUN_F_CSUM).is_err() {
            return 0;
        }
        ok |= TUN_F_CSUM;
        for flag in [TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO] {
            if self.set_offload(ok | flag).is_ok() {
                ok |= flag;
            }
        }
        ok
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TUN_F_* flags this TAP accepts.
    pub fn supported_offloads(&self) -> u32 {
        self.supported_offloads
    }

    /// Tells the kernel which offloaded (partial checksum, GSO) frames it may hand us.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value (an unsigned long argument); no memory
        // is passed, and `file` is an open TAP.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads one frame (virtio-net header first). `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which is valid and
        // exclusively borrowed for the call.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (virtio-net header first) gathered from `iov`.
    pub fn writev(&self, iov: &[&[u8]]) -> io::Result<usize> {
        const MAX_IOV: usize = 64;
        if iov.len() > MAX_IOV {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut vecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        for (v, s) in vecs.iter_mut().zip(iov) {
            v.iov_base = s.as_ptr() as *mut libc::c_void;
            v.iov_len = s.len();
        }
        // SAFETY: the first `iov.len()` iovecs point to live slices borrowed for the whole call;
        // writev only reads through them.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                vecs.as_ptr(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Moves the calling thread into the network namespace at `path` (e.g. /run/netns/NAME).
#[cfg(test)]
pub(crate) fn enter_netns(path: &std::path::Path) -> io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: `ns` is an open namespace file; setns only changes the calling thread's namespace.
    let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Drops CAP_NET_ADMIN from the calling thread's effective set (capabilities are per thread).
#[cfg(test)]
pub(crate) fn drop_net_admin() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` records (version 3) into `data` and reads `hdr`; both
    // are live, properly laid out buffers for the duration of the call.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: capset reads `hdr` and two `Data` records; pid 0 means the calling thread only.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_ifname("tap0").is_ok());
        assert!(validate_ifname("a23456789012345").is_ok());
        let err = validate_ifname("a234567890123456").unwrap_err();
        assert!(err.to_string().contains("a234567890123456"), "{err}");
        assert!(err.to_string().contains("15 bytes"), "{err}");
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "a\0b"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_name_is_rejected_before_any_syscall() {
        assert!(matches!(
            Tap::open("this-name-is-too-long"),
            Err(TapError::InvalidName { .. })
        ));
    }

    #[test]
    fn permission_errors_name_the_capability_and_the_fix() {
        let e = TapError::CannotCreate {
            name: "tap7".into(),
            user: "alice".into(),
        };
        let s = e.to_string();
        assert!(s.contains("CAP_NET_ADMIN"), "{s}");
        assert!(
            s.contains("ip tuntap add dev tap7 mode tap user alice vnet_hdr"),
            "{s}"
        );
        let s = TapError::PermissionDenied {
            name: "tap7".into(),
            user: "alice".into(),
        }
        .to_string();
        assert!(s.contains("CAP_NET_ADMIN"), "{s}");
        assert!(
            s.contains("ip tuntap add dev tap7 mode tap user alice vnet_hdr"),
            "{s}"
        );
    }
}
