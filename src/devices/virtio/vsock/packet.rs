//! virtio-vsock packets (virtio 1.2, 5.10.6): a 44-byte little-endian header, then `len` bytes
//! of payload, spread over the descriptors of one chain (readable on TX, writable on RX).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Bytes in a packet header.
pub const HDR_LEN: usize = 44;
/// The only socket type offered (no VIRTIO_VSOCK_F_SEQPACKET).
pub const TYPE_STREAM: u16 = 1;
/// The largest payload one packet carries (Linux sends at most 64 KiB per packet).
pub const MAX_PAYLOAD: usize = 64 << 10;

/// Packet operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive (RCV) or send (SEND) no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            kind: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain carries no usable packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("a TX chain has a device-writable descriptor")]
    WritableInTx,
    #[error("an RX chain has a device-readable descriptor")]
    ReadableInRx,
    #[error("the chain ends inside the packet header")]
    ShortHeader,
    #[error("the header announces {0} payload bytes, more than the 64 KiB a packet may carry")]
    TooLong(u32),
    #[error("the chain ends before the {0} payload bytes its header announces")]
    ShortPayload(u32),
    #[error("a descriptor points outside guest memory")]
    BadAddress,
}

/// Reads the packet of a TX chain: returns its header and leaves its payload in `payload`.
pub fn read_packet<M: GuestMemory>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    payload: &mut Vec<u8>,
) -> Result<Header, PacketError> {
    let mut hdr = [0u8; HDR_LEN];
    let mut got = 0usize;
    let mut header: Option<Header> = None;
    payload.clear();
    for d in descs {
        if d.is_write_only() {
            return Err(PacketError::WritableInTx);
        }
        let (mut addr, mut left) = (d.addr(), d.len() as usize);
        if got < HDR_LEN {
            let n = left.min(HDR_LEN - got);
            mem.read_slice(&mut hdr[got..got + n], addr)
                .map_err(|_| PacketError::BadAddress)?;
            got += n;
            left -= n;
            addr = addr.checked_add(n as u64).ok_or(PacketError::BadAddress)?;
            if got < HDR_LEN {
                continue;
            }
            let h = Header::from_bytes(&hdr);
            if h.len as usize > MAX_PAYLOAD {
                return Err(PacketError::TooLong(h.len));
            }
            header = Some(h);
        }
        let want = header.map_or(0, |h| h.len as usize);
        let n = left.min(want - payload.len());
        if n > 0 {
            let at = payload.len();
            payload.resize(at + n, 0);
            mem.read_slice(&mut payload[at..], addr)
                .map_err(|_| PacketError::BadAddress)?;
        }
        if payload.len() == want {
            break;
        }
    }
    let h = header.ok_or(PacketError::ShortHeader)?;
    if payload.len() < h.len as usize {
        return Err(PacketError::ShortPayload(h.len));
    }
    Ok(h)
}

/// The writable buffers of one RX chain.
#[derive(Debug, Default)]
pub struct RxBuffer {
    segs: Vec<(GuestAddress, usize)>,
    cap: usize,
}

impl RxBuffer {
    pub fn new(descs: impl Iterator<Item = Descriptor>) -> Result<RxBuffer, PacketError> {
        let mut b = RxBuffer::default();
        for d in descs {
            if !d.is_write_only() {
                return Err(PacketError::ReadableInRx);
            }
            b.segs.push((d.addr(), d.len() as usize));
            b.cap = b.cap.saturating_add(d.len() as usize);
        }
        if b.cap < HDR_LEN {
            return Err(PacketError::ShortHeader);
        }
        Ok(b)
    }

    /// Payload bytes this buffer holds after a header.
    pub fn payload_room(&self) -> usize {
        (self.cap - HDR_LEN).min(MAX_PAYLOAD)
    }

    /// Writes `hdr` (its `len` set to the payload's) and `payload`; returns the bytes written.
    pub fn write<M: GuestMemory>(
        &self,
        mem: &M,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        let payload = &payload[..payload.len().min(self.payload_room())];
        let mut h = *hdr;
        h.len = payload.len() as u32;
        let bytes = h.to_bytes();
        let mut parts = [&bytes[..], payload];
        let mut written = 0usize;
        for &(addr, len) in &self.segs {
            let mut off = 0usize;
            for part in parts.iter_mut() {
                let n = part.len().min(len - off);
                if n == 0 {
                    continue;
                }
                let at = addr
                    .checked_add(off as u64)
                    .ok_or(PacketError::BadAddress)?;
                mem.write_slice(&part[..n], at)
                    .map_err(|_| PacketError::BadAddress)?;
                *part = &part[n..];
                off += n;
                written += n;
            }
            if parts.iter().all(|p| p.is_empty()) {
                break;
            }
        }
        Ok(written as u32)
    }
}
