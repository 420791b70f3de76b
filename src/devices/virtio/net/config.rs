//! `--net` options: `tap=NAME[,mac=MAC]` (a host TAP) or
//! `user[,hostfwd=[tcp|udp]:[ADDR]:PORT-:GUESTPORT ...][,mac=MAC]` (user-mode networking
//! through passt, no root needed).

use std::net::IpAddr;

use crate::devices::virtio::tap::{self, TapError};

/// What one `--net` option asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub attach: NetAttach,
    pub mac: Option<[u8; 6]>,
}

/// The host end of a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetAttach {
    /// An existing (or creatable) TAP interface.
    Tap(String),
    /// A passt process started for this NIC: DHCP, DNS and NAT to what the host reaches.
    User { hostfwd: Vec<HostFwd> },
}

/// Transport of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwdProto {
    Tcp,
    Udp,
}

/// `hostfwd=`: connections to ADDR:PORT on the host go to GUESTPORT on the guest's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    pub proto: FwdProto,
    /// Host address to bind; `None` = every address (QEMU's default).
    pub addr: Option<IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
}

/// A malformed `--net` option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("--net {input:?}: give tap=NAME or user")]
    MissingBackend { input: String },
    #[error("--net {input:?}: tap=NAME and user exclude each other")]
    TwoBackends { input: String },
    #[error(
        "--net {input:?}: unknown key {key:?} (expected tap=NAME[,mac=MAC] or \
         user[,hostfwd=tcp:[ADDR]:PORT-:GUESTPORT][,mac=MAC])"
    )]
    UnknownKey { input: String, key: String },
    #[error("--net {input:?}: {key} given twice")]
    Duplicate { input: String, key: &'static str },
    #[error("--net {input:?}: hostfwd needs user networking (--net user,hostfwd=...)")]
    HostFwdWithoutUser { input: String },
    #[error(
        "--net: invalid hostfwd={spec:?}: {reason} (expected [tcp|udp]:[ADDR]:PORT-:GUESTPORT, \
         e.g. tcp:127.0.0.1:2222-:22)"
    )]
    BadHostFwd { spec: String, reason: String },
    #[error("--net {input:?}: invalid TAP name {name:?}: {reason}")]
    BadTapName {
        input: String,
        name: String,
        reason: String,
    },
    #[error("invalid MAC address {mac:?}: expected six hex bytes like 52:54:00:12:34:56")]
    BadMac { mac: String },
    #[error(
        "MAC address {mac:?} is a multicast address; a NIC needs a unicast one (first byte even)"
    )]
    MulticastMac { mac: String },
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`), rejecting multicast addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetConfigError> {
    let bad = || NetConfigError::BadMac { mac: s.to_string() };
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(NetConfigError::MulticastMac { mac: s.to_string() });
    }
    Ok(mac)
}

/// Parses a port number 1..=65535.
fn parse_port(s: &str, what: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err(format!("{what} 0 is not a port")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{what} {s:?} is not a number 1..65535")),
    }
}

/// Parses QEMU's `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`; the guest address
/// must be empty (the guest has one address, which passt gives it).
pub fn parse_hostfwd(spec: &str) -> Result<HostFwd, NetConfigError> {
    let bad = |reason: String| NetConfigError::BadHostFwd {
        spec: spec.to_string(),
        reason,
    };
    let (proto, rest) = match spec.split_once(':') {
        Some(("tcp" | "", rest)) => (FwdProto::Tcp, rest),
        Some(("udp", rest)) => (FwdProto::Udp, rest),
        Some((p, _)) => return Err(bad(format!("protocol {p:?} is not tcp or udp"))),
        None => return Err(bad("no ':'".into())),
    };
    // An IPv6 host address is bracketed, so the first '-' after it splits host and guest.
    let after_addr = if rest.starts_with('[') {
        rest.find(']').ok_or_else(|| bad("unclosed '['".into()))?
    } else {
        0
    };
    let dash = rest[after_addr..]
        .find('-')
        .ok_or_else(|| bad("no '-' between host and guest part".into()))?;
    let (host, guest) = (&rest[..after_addr + dash], &rest[after_addr + dash + 1..]);
    let (addr, port) = host
        .rsplit_once(':')
        .ok_or_else(|| bad("host part is not [ADDR]:PORT".into()))?;
    let addr = match addr.trim_start_matches('[').trim_end_matches(']') {
        "" => None,
        a => Some(
            a.parse::<IpAddr>()
                .map_err(|_| bad(format!("{a:?} is not an IP address")))?,
        ),
    };
    let host_port = parse_port(port, "host port").map_err(bad)?;
    let (gaddr, gport) = guest
        .rsplit_once(':')
        .ok_or_else(|| bad("guest part is not :GUESTPORT".into()))?;
    if !gaddr.is_empty() {
        return Err(bad(format!(
            "guest address {gaddr:?} cannot be chosen: the guest's own address is used"
        )));
    }
    let guest_port = parse_port(gport, "guest port").map_err(bad)?;
    Ok(HostFwd {
        proto,
        addr,
        host_port,
        guest_port,
    })
}

/// Parses `tap=NAME[,mac=MAC]` or `user[,hostfwd=...]*[,mac=MAC]`.
pub fn parse_net_option(s: &str) -> Result<NetConfig, NetConfigError> {
    let input = || s.to_string();
    let mut tap_name = None;
    let mut user = false;
    let mut hostfwd = Vec::new();
    let mut mac = None;
    for item in s.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match (key, item.contains('=')) {
            ("tap", _) if tap_name.is_some() => {
                return Err(NetConfigError::Duplicate {
                    input: input(),
                    key: "tap",
                })
            }
            ("tap", _) => {
                tap::validate_ifname(value).map_err(|e| NetConfigError::BadTapName {
                    input: input(),
                    name: value.to_string(),
                    reason: match e {
                        TapError::InvalidName { reason, .. } => reason.to_string(),
                        other => other.to_string(),
                    },
                })?;
                tap_name = Some(value.to_string());
            }
            ("user", false) if user => {
                return Err(NetConfigError::Duplicate {
                    input: input(),
                    key: "user",
                })
            }
            ("user", false) => user = true,
            ("hostfwd", true) => hostfwd.push(parse_hostfwd(value)?),
            ("mac", _) if mac.is_some() => {
                return Err(NetConfigError::Duplicate {
                    input: input(),
                    key: "mac",
                })
            }
            ("mac", _) => mac = Some(parse_mac(value)?),
            _ => {
                return Err(NetConfigError::UnknownKey {
                    input: input(),
                    key: key.to_string(),
                })
            }
        }
    }
    let attach = match (tap_name, user) {
        (Some(_), true) => return Err(NetConfigError::TwoBackends { input: input() }),
        (Some(_), false) if !hostfwd.is_empty() => {
            return Err(NetConfigError::HostFwdWithoutUser { input: input() })
        }
        (Some(name), false) => NetAttach::Tap(name),
        (None, true) => NetAttach::User { hostfwd },
        (None, false) => return Err(NetConfigError::MissingBackend { input: input() }),
    };
    Ok(NetConfig { attach, mac })
}

/// A stable, locally administered unicast MAC derived from the TAP name: 52:54:00 followed by
/// three bytes of an FNV-1a hash of the name.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = h.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

/// The MAC of a user-mode NIC without `mac=`: QEMU's first default, which guests and tools
/// written for QEMU's user networking expect.
pub const USER_NET_DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
