use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::muxer::{ListenError, Muxer, CONN_BUF, HOST_CID};
use super::packet::{op, read_packet, Header, PacketError, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::rx::Rx;
use super::*;

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;
const BUF_BASE: u64 = 0x10_0000;
const BUF_STRIDE: u64 = 0x1_1000;
/// Header + 64 KiB.
const BIG: u32 = (HDR_LEN + MAX_PAYLOAD) as u32;

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A private folder for one test's sockets.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("ferrovm-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The driver side of the receive queue.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    q: MockSplitQueue<'a, GuestMemoryMmap>,
    queue: Queue,
    posted: u16,
    seen: u16,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let q = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let queue = q.create_queue().unwrap();
        Guest {
            mem,
            q,
            queue,
            posted: 0,
            seen: 0,
        }
    }

    /// Posts `n` receive buffers of `len` bytes each.
    fn post(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            assert!(self.posted.wrapping_sub(self.seen) < QSIZE, "ring full");
            let d = self.posted % QSIZE;
            let addr = BUF_BASE + u64::from(d) * BUF_STRIDE;
            let desc = SplitDescriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0);
            self.q
                .desc_table()
                .store(d, RawDescriptor::from(desc))
                .unwrap();
            let avail = self.q.avail();
            avail.ring().ref_at(d as usize).unwrap().store(d);
            self.posted = self.posted.wrapping_add(1);
            avail.idx().store(self.posted);
        }
    }

    /// The packets returned since the last call.
    fn take(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.q.used();
        let mut out = Vec::new();
        while self.seen != used.idx().load() {
            let e = used
                .ring()
                .ref_at((self.seen % QSIZE) as usize)
                .unwrap()
                .load();
            self.seen = self.seen.wrapping_add(1);
            let addr = GuestAddress(BUF_BASE + u64::from(e.id()) * BUF_STRIDE);
            if e.len() == 0 {
                continue;
            }
            let mut raw = vec![0u8; e.len() as usize];
            self.mem.read_slice(&mut raw, addr).unwrap();
            let h = Header::from_bytes(raw[..HDR_LEN].try_into().unwrap());
            assert_eq!(h.len as usize, raw.len() - HDR_LEN, "len field = payload");
            out.push((h, raw[HDR_LEN..].to_vec()));
        }
        out
    }
}

/// One round of the device's loop: host events, then a fill. Returns fill's answer.
fn pump(m: &mut Muxer, g: &mut Guest) -> bool {
    m.poll_rx().unwrap();
    m.poll_tx().unwrap();
    let mut scratch = vec![0u8; MAX_PAYLOAD];
    let mut rx = Rx::new(g.mem, &mut g.queue);
    m.fill_rx(&mut rx, &mut scratch).unwrap()
}

/// Pumps until `cond` holds on the packets collected (host sockets answer asynchronously).
fn pump_until(
    m: &mut Muxer,
    g: &mut Guest,
    mut cond: impl FnMut(&[(Header, Vec<u8>)]) -> bool,
) -> Vec<(Header, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    loop {
        pump(m, g);
        got.extend(g.take());
        if cond(&got) {
            return got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "condition not met; packets: {:?}",
            got.iter().map(|(h, _)| h).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn from_guest(src_port: u32, dst_port: u32, op: u16, flags: u32, buf_alloc: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        kind: packet::TYPE_STREAM,
        op,
        flags,
        buf_alloc,
        fwd_cnt: 0,
    }
}

fn payload_of(got: &[(Header, Vec<u8>)]) -> Vec<u8> {
    got.iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, p)| p.clone())
        .collect()
}

// ---- options and packets -------------------------------------------------------------

#[test]
fn parses_vsock_options() {
    assert_eq!(
        parse_vsock_option("cid=3,socket=/tmp/v.sock").unwrap(),
        VsockConfig {
            cid: 3,
            socket: "/tmp/v.sock".into()
        }
    );
    assert_eq!(
        parse_vsock_option("socket=s,cid=4294967294").unwrap().cid,
        0xFFFF_FFFE
    );
    for (bad, words) in [
        ("socket=s", "missing cid"),
        ("cid=3", "missing socket"),
        ("cid=2,socket=s", "3 to"),
        ("cid=4294967295,socket=s", "3 to"),
        ("cid=x,socket=s", "3 to"),
        ("cid=3,socket=", "empty"),
        ("cid=3,cid=4,socket=s", "twice"),
        ("cid=3,socket=s,port=1", "unknown key"),
    ] {
        let e = parse_vsock_option(bad).expect_err(bad).to_string();
        assert!(e.contains(words), "{bad:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn headers_round_trip_little_endian() {
    let h = Header {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 2,
        src_port: 0xAABB_CCDD,
        dst_port: 7,
        len: 9,
        kind: 1,
        op: op::RW,
        flags: 3,
        buf_alloc: 0x1234,
        fwd_cnt: 0x5678,
    };
    let b = h.to_bytes();
    assert_eq!(b[0], 0x08, "src_cid is little-endian");
    assert_eq!(&b[16..20], &[0xDD, 0xCC, 0xBB, 0xAA]);
    assert_eq!(Header::from_bytes(&b), h);
}

/// Reads the packet of a one-chain TX queue whose guest memory holds `bytes` at 0x20_0000.
fn read_tx(bytes: &[u8], descs: &[(u64, u32, bool)]) -> Result<(Header, Vec<u8>), PacketError> {
    let mem = guest_mem();
    mem.write_slice(bytes, GuestAddress(0x20_0000)).unwrap();
    let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    crate::devices::virtio::test_chains::add_chain(&q, 0, descs);
    let mut queue: Queue = q.create_queue().unwrap();
    let chain = queue.iter(&mem).unwrap().next().unwrap();
    let mut payload = Vec::new();
    read_packet(&mem, chain, &mut payload).map(|h| (h, payload))
}

#[test]
fn tx_packets_are_read_across_descriptors_and_checked() {
    let mut h = from_guest(5, 6, op::RW, 0, 0);
    h.len = 10;
    let mut bytes = h.to_bytes().to_vec();
    bytes.extend(b"0123456789");
    let n = bytes.len() as u32;
    // Header split over two descriptors, payload over two more.
    let split = [
        (0x20_0000, 20, false),
        (0x20_0014, 30, false),
        (0x20_0032, n - 50, false),
    ];
    let (got, payload) = read_tx(&bytes, &split).unwrap();
    assert_eq!(got, h);
    assert_eq!(payload, b"0123456789");

    let bad = |descs: &[(u64, u32, bool)]| read_tx(&bytes, descs).unwrap_err();
    assert_eq!(bad(&[(0x20_0000, n, true)]), PacketError::WritableInTx);
    assert_eq!(bad(&[(0x20_0000, 20, false)]), PacketError::ShortHeader);
    assert_eq!(
        bad(&[(0x20_0000, 50, false)]),
        PacketError::ShortPayload(10)
    );
    assert_eq!(
        bad(&[(MEM_SIZE as u64 - 8, 44, false)]),
        PacketError::BadAddress
    );
    h.len = u32::MAX;
    assert_eq!(
        read_tx(&h.to_bytes(), &[(0x20_0000, 44, false)]).unwrap_err(),
        PacketError::TooLong(u32::MAX)
    );
}

// ---- the listener ----------------------------------------------------------------------

#[test]
fn the_socket_path_is_checked_and_removed() {
    let dir = Dir::new("path");
    let path = dir.sock();
    std::fs::write(&path, b"x").unwrap();
    assert!(matches!(
        Muxer::new(GUEST_CID, &path),
        Err(ListenError::NotASocket(_))
    ));
    std::fs::remove_file(&path).unwrap();
    let busy = UnixListener::bind(&path).unwrap();
    let e = Muxer::new(GUEST_CID, &path).err().expect("in use");
    assert!(matches!(e, ListenError::InUse(_)), "{e}");
    drop(busy);
    // A stale socket file (nobody listening) is replaced; the path goes with the muxer.
    let m = Muxer::new(GUEST_CID, &path).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(m);
    assert!(!path.exists());
}

// ---- guest-initiated connections -----------------------------------------------------

fn port_path(dir: &Dir, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", dir.sock().display()))
}

#[test]
fn guest_connections_reach_path_port_and_carry_data_both_ways() {
    let dir = Dir::new("guest");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    let service = UnixListener::bind(port_path(&dir, 1234)).unwrap();
    g.post(16, BIG);

    m.guest_packet(&from_guest(5000, 1234, op::REQUEST, 0, 65536), &[]);
    let got = pump_until(&mut m, &mut g, |p| !p.is_empty());
    let (h, _) = &got[0];
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, 1234, 5000));
    assert_eq!(
        (h.src_cid, h.dst_cid, h.buf_alloc),
        (HOST_CID, GUEST_CID, CONN_BUF)
    );
    let (mut host, _) = service.accept().unwrap();

    m.guest_packet(&from_guest(5000, 1234, op::RW, 0, 65536), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world").unwrap();
    let got = pump_until(&mut m, &mut g, |p| payload_of(p).len() >= 5);
    assert_eq!(payload_of(&got), b"world");
    assert_eq!(got[0].0.fwd_cnt, 5, "the guest learns what was forwarded");

    // The host closes its end: the guest is told it will get no more.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let got = pump_until(&mut m, &mut g, |p| {
        p.iter().any(|(h, _)| h.op == op::SHUTDOWN)
    });
    let last = got.last().unwrap().0;
    assert_eq!((last.op, last.flags), (op::SHUTDOWN, SHUTDOWN_SEND));

    // The guest closes both ways: ferrovm resets the connection and closes the socket.
    m.guest_packet(
        &from_guest(
            5000,
            1234,
            op::SHUTDOWN,
            SHUTDOWN_RCV | SHUTDOWN_SEND,
            65536,
        ),
        &[],
    );
    let got = pump_until(&mut m, &mut g, |p| p.iter().any(|(h, _)| h.op == op::RST));
    assert_eq!(got.len(), 1);
    assert_eq!(m.connections(), 0);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn connections_to_nothing_and_stray_packets_get_a_reset() {
    let dir = Dir::new("nothing");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(8, BIG);
    m.guest_packet(&from_guest(5000, 99, op::REQUEST, 0, 65536), &[]);
    m.guest_packet(&from_guest(5001, 98, op::RW, 0, 65536), b"x");
    // A packet with a wrong source CID is dropped without an answer.
    let mut spoofed = from_guest(5002, 97, op::REQUEST, 0, 65536);
    spoofed.src_cid = 77;
    m.guest_packet(&spoofed, &[]);
    // An RST for nothing is not answered (no RST ping-pong).
    m.guest_packet(&from_guest(5003, 96, op::RST, 0, 0), &[]);
    let got = pump_until(&mut m, &mut g, |p| p.len() >= 2);
    let ops: Vec<_> = got.iter().map(|(h, _)| (h.op, h.dst_port)).collect();
    assert_eq!(ops, [(op::RST, 5000), (op::RST, 5001)]);
    std::thread::sleep(Duration::from_millis(20));
    pump(&mut m, &mut g);
    assert!(g.take().is_empty());
    assert_eq!(m.connections(), 0);
}

// ---- host-initiated connections -----------------------------------------------------

#[test]
fn host_connect_handshake_opens_a_guest_stream() {
    let dir = Dir::new("host");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(16, BIG);
    let mut client = UnixStream::connect(dir.sock()).unwrap();
    // Stream data right behind the line must not be eaten by the handshake.
    client.write_all(b"CONNECT 52\nearly").unwrap();
    let got = pump_until(&mut m, &mut g, |p| !p.is_empty());
    let req = got[0].0;
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid),
        (op::REQUEST, 52, GUEST_CID)
    );
    assert!(req.src_port >= 1 << 30);

    let mut resp = from_guest(52, req.src_port, op::RESPONSE, 0, 65536);
    resp.fwd_cnt = 0;
    m.guest_packet(&resp, &[]);
    let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
    client.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());

    let got = pump_until(&mut m, &mut g, |p| payload_of(p).len() >= 5);
    assert_eq!(payload_of(&got), b"early");
    m.guest_packet(&from_guest(52, req.src_port, op::RW, 0, 65536), b"pong");
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // The guest refuses: the host program's socket closes.
    m.guest_packet(&from_guest(52, req.src_port, op::RST, 0, 0), &[]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn bad_connect_lines_close_the_client() {
    let dir = Dir::new("badline");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(8, BIG);
    let lines: [&[u8]; 4] = [
        b"CONNECT\n",
        b"HELLO 5\n",
        b"CONNECT 99999999999\n",
        &[b'A'; 100],
    ];
    let mut clients: Vec<UnixStream> = lines
        .iter()
        .map(|l| {
            let mut c = UnixStream::connect(dir.sock()).unwrap();
            c.write_all(l).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c
        })
        .collect();
    for _ in 0..20 {
        pump(&mut m, &mut g);
        std::thread::sleep(Duration::from_millis(2));
    }
    for (c, l) in clients.iter_mut().zip(lines) {
        // Closed: EOF, or a reset where ferrovm dropped unread bytes.
        let mut rest = Vec::new();
        match c.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty()),
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{:?}",
                String::from_utf8_lossy(l)
            ),
        }
    }
    assert!(g.take().is_empty(), "no request reached the guest");
    assert_eq!(m.connections(), 0);
}

// ---- flow control -----------------------------------------------------------------------

/// A guest connection to a fresh service on `port`, established, with the guest window.
fn established(m: &mut Muxer, g: &mut Guest, dir: &Dir, port: u32, window: u32) -> UnixStream {
    let service = UnixListener::bind(port_path(dir, port)).unwrap();
    m.guest_packet(&from_guest(5000, port, op::REQUEST, 0, window), &[]);
    pump_until(m, g, |p| p.iter().any(|(h, _)| h.op == op::RESPONSE));
    service.accept().unwrap().0
}

#[test]
fn the_host_is_read_only_as_far_as_the_guest_has_credit() {
    let dir = Dir::new("credit");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(32, BIG);
    let mut host = established(&mut m, &mut g, &dir, 7, 100);
    host.write_all(&[7u8; 1000]).unwrap();
    let got = pump_until(&mut m, &mut g, |p| payload_of(p).len() >= 100);
    for _ in 0..10 {
        pump(&mut m, &mut g);
    }
    let mut all = payload_of(&got);
    all.extend(payload_of(&g.take()));
    assert_eq!(all.len(), 100, "no byte past the window");

    // The guest consumed 100 bytes: 100 more may come.
    let mut upd = from_guest(5000, 7, op::CREDIT_UPDATE, 0, 100);
    upd.fwd_cnt = 100;
    m.guest_packet(&upd, &[]);
    let got = pump_until(&mut m, &mut g, |p| payload_of(p).len() >= 100);
    assert_eq!(payload_of(&got).len(), 100);

    // A credit request is answered with the host side's counters.
    m.guest_packet(&from_guest(5000, 7, op::CREDIT_REQUEST, 0, 100), &[]);
    let got = pump_until(&mut m, &mut g, |p| {
        p.iter().any(|(h, _)| h.op == op::CREDIT_UPDATE)
    });
    let cu = got
        .iter()
        .find(|(h, _)| h.op == op::CREDIT_UPDATE)
        .unwrap()
        .0;
    assert_eq!((cu.buf_alloc, cu.fwd_cnt), (CONN_BUF, 0));
}

#[test]
fn a_guest_sending_past_its_credit_is_reset_and_memory_stays_bounded() {
    let dir = Dir::new("overrun");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(32, BIG);
    // The host program never reads.
    let _host = established(&mut m, &mut g, &dir, 8, 65536);
    let chunk = vec![1u8; MAX_PAYLOAD];
    let mut sent = 0usize;
    while m.connections() == 1 {
        m.guest_packet(&from_guest(5000, 8, op::RW, 0, 65536), &chunk);
        sent += chunk.len();
        assert!(sent < 64 << 20, "never reset");
    }
    let got = pump_until(&mut m, &mut g, |p| p.iter().any(|(h, _)| h.op == op::RST));
    assert_eq!(got.last().unwrap().0.dst_port, 5000);
}

#[test]
fn without_receive_buffers_fill_reports_starvation_and_resumes() {
    let dir = Dir::new("starve");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    let _service = UnixListener::bind(port_path(&dir, 9)).unwrap();
    m.guest_packet(&from_guest(5000, 9, op::REQUEST, 0, 65536), &[]);
    assert!(!pump(&mut m, &mut g), "a control packet waits: starved");
    assert_eq!(m.ctrl_backlog(), 1);
    // Buffers too small for a header are returned empty, not used for packets.
    g.post(2, 16);
    assert!(!pump(&mut m, &mut g));
    assert!(g.take().is_empty());
    g.post(1, BIG);
    assert!(pump(&mut m, &mut g));
    assert_eq!(g.take()[0].0.op, op::RESPONSE);
    assert_eq!(m.ctrl_backlog(), 0);
}

#[test]
fn a_reset_closes_every_connection_but_keeps_listening() {
    let dir = Dir::new("reset");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(8, BIG);
    let mut host = established(&mut m, &mut g, &dir, 10, 65536);
    m.reset();
    assert_eq!(m.connections(), 0);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(UnixStream::connect(dir.sock()).is_ok(), "still listening");
}

#[test]
fn device_reports_its_cid_and_three_queues() {
    let dir = Dir::new("device");
    let dev = Vsock::new(&VsockConfig {
        cid: 7,
        socket: dir.sock(),
    })
    .unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    let mut cfg = [0xFFu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 7);
    let mut hi = [0xFFu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
}

#[test]
fn half_closes_in_both_orders_end_in_one_reset() {
    let dir = Dir::new("halfclose");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(64, BIG);
    // The guest sends, then shuts down sending; the host reads to EOF and closes.
    let mut host = established(&mut m, &mut g, &dir, 11, 65536);
    m.guest_packet(&from_guest(5000, 11, op::RW, 0, 65536), b"data");
    m.guest_packet(
        &from_guest(5000, 11, op::SHUTDOWN, SHUTDOWN_SEND, 65536),
        &[],
    );
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"data");
    drop(host);
    let p = pump_until(&mut m, &mut g, |p| {
        p.iter().any(|(h, _)| h.op == op::SHUTDOWN)
    });
    assert_eq!(p.last().unwrap().0.flags, SHUTDOWN_SEND);
    m.guest_packet(
        &from_guest(5000, 11, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 65536),
        &[],
    );
    pump_until(&mut m, &mut g, |p| p.iter().any(|(h, _)| h.op == op::RST));
    assert_eq!(m.connections(), 0);
}

#[test]
fn a_large_guest_stream_to_a_slow_host_closes_cleanly() {
    let dir = Dir::new("bigclose");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(200, BIG);
    let host = established(&mut m, &mut g, &dir, 12, 65536);
    let reader = std::thread::spawn(move || {
        let mut host = host;
        let mut total = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            match host.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(e) => panic!("{e}"),
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    });
    // The guest sends within its credit, as a Linux guest does.
    let chunk = vec![5u8; MAX_PAYLOAD];
    let (mut sent, mut fwd) = (0u32, 0u32);
    while sent < 4 << 20 {
        if sent - fwd + chunk.len() as u32 <= CONN_BUF {
            m.guest_packet(&from_guest(5000, 12, op::RW, 0, 65536), &chunk);
            sent += chunk.len() as u32;
        }
        pump(&mut m, &mut g);
        for (h, _) in g.take() {
            fwd = h.fwd_cnt;
        }
        if g.posted.wrapping_sub(g.seen) < 100 {
            g.post(100, BIG);
        }
    }
    m.guest_packet(
        &from_guest(5000, 12, op::SHUTDOWN, SHUTDOWN_SEND, 65536),
        &[],
    );
    let got = pump_until(&mut m, &mut g, |p| {
        p.iter().any(|(h, _)| h.op == op::SHUTDOWN)
    });
    assert!(got.iter().all(|(h, _)| h.op != op::RST), "{got:?}");
    assert_eq!(reader.join().unwrap(), 4 << 20);
    m.guest_packet(
        &from_guest(5000, 12, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 65536),
        &[],
    );
    pump_until(&mut m, &mut g, |p| p.iter().any(|(h, _)| h.op == op::RST));
    assert_eq!(m.connections(), 0);
}

#[test]
fn unanswered_host_connections_expire() {
    let dir = Dir::new("expire");
    let mem = guest_mem();
    let mut g = Guest::new(&mem);
    let mut m = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
    g.post(16, BIG);
    let mut client = UnixStream::connect(dir.sock()).unwrap();
    client.write_all(b"CONNECT 77\n").unwrap();
    let got = pump_until(&mut m, &mut g, |p| !p.is_empty());
    assert_eq!(got[0].0.op, op::REQUEST);
    assert_eq!(m.connections(), 1);
    // The guest never answers; the client is gone; a later client's arrival sweeps it.
    drop(client);
    std::thread::sleep(Duration::from_millis(2100));
    let _next = UnixStream::connect(dir.sock()).unwrap();
    let got = pump_until(&mut m, &mut g, |p| p.iter().any(|(h, _)| h.op == op::RST));
    assert_eq!(got.last().unwrap().0.dst_port, 77);
    assert_eq!(m.connections(), 0);
}
