use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_queue::mock::MockSplitQueue;

use super::*;
use crate::devices::virtio::{ActiveQueue, Runner, VirtioInterrupt, VirtioInterruptType};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x100_0000;
const RXQ: GuestAddress = GuestAddress(0);
const TXQ: GuestAddress = GuestAddress(0x1_0000);
const DATA: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A backend that hands out queued frames and records written ones.
struct Fake {
    rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
    tx: Arc<Mutex<Vec<Vec<u8>>>>,
    readable: EventFd,
}

#[derive(Clone)]
struct FakeHandle {
    rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
    tx: Arc<Mutex<Vec<Vec<u8>>>>,
    readable: Arc<EventFd>,
}

impl FakeHandle {
    fn push(&self, frame: Vec<u8>) {
        self.rx.lock().unwrap().push_back(frame);
        self.readable.write(1).unwrap();
    }
    fn sent(&self) -> Vec<Vec<u8>> {
        self.tx.lock().unwrap().clone()
    }
    fn queued(&self) -> usize {
        self.rx.lock().unwrap().len()
    }
}

fn fake() -> (Fake, FakeHandle) {
    let readable = EventFd::new(EFD_NONBLOCK).unwrap();
    let h = FakeHandle {
        rx: Arc::default(),
        tx: Arc::default(),
        readable: Arc::new(readable.try_clone().unwrap()),
    };
    (
        Fake {
            rx: h.rx.clone(),
            tx: h.tx.clone(),
            readable,
        },
        h,
    )
}

impl AsRawFd for Fake {
    fn as_raw_fd(&self) -> RawFd {
        self.readable.as_raw_fd()
    }
}

impl NetBackend for Fake {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self.rx.lock().unwrap();
        match rx.pop_front() {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => {
                let _ = self.readable.read();
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }
    fn write_frame(&mut self, iov: &[&[u8]]) -> io::Result<usize> {
        let f = iov.concat();
        let n = f.len();
        self.tx.lock().unwrap().push(f);
        Ok(n)
    }
    fn accepts_tx_offloads(&self) -> bool {
        true
    }
}

use crate::devices::virtio::test_chains::add_chain;

fn used(q: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = q.used().idx().load();
    (0..n)
        .map(|i| {
            let e = q.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

/// A frame as the TAP delivers it: a zeroed header, then `len` payload bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

struct Bed<'a> {
    rxq: MockSplitQueue<'a, GuestMemoryMmap>,
    txq: MockSplitQueue<'a, GuestMemoryMmap>,
    nq: NetQueues,
    h: FakeHandle,
    stats: Arc<NetStats>,
}

fn bed(mem: &GuestMemoryMmap, acked: u64) -> Bed<'_> {
    let rxq = MockSplitQueue::create(mem, RXQ, QUEUE_SIZE);
    let txq = MockSplitQueue::create(mem, TXQ, QUEUE_SIZE);
    let (f, h) = fake();
    let stats = Arc::new(NetStats::default());
    let nq = NetQueues::new(
        mem.clone(),
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        Box::new(f),
        acked,
        stats.clone(),
    );
    Bed {
        rxq,
        txq,
        nq,
        h,
        stats,
    }
}

const BASE: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX;

// ---- configuration ------------------------------------------------------------------

#[test]
fn parses_user_net_options() {
    let c = parse_net_option("user").unwrap();
    assert_eq!(c.attach, NetAttach::User { hostfwd: vec![] });
    let c = parse_net_option(
        "user,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::53-:5353,mac=02:00:00:00:00:07",
    )
    .unwrap();
    let NetAttach::User { hostfwd } = c.attach else {
        panic!("not user")
    };
    assert_eq!(
        hostfwd,
        vec![
            HostFwd {
                proto: FwdProto::Tcp,
                addr: Some("127.0.0.1".parse().unwrap()),
                host_port: 2222,
                guest_port: 22
            },
            HostFwd {
                proto: FwdProto::Udp,
                addr: None,
                host_port: 53,
                guest_port: 5353
            }
        ]
    );
    assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 7]));
    assert_eq!(
        parse_hostfwd("::8080-:80").unwrap().proto,
        FwdProto::Tcp,
        "an empty protocol is tcp, as in QEMU"
    );
    for (bad, words) in [
        ("user,tap=t", "exclude"),
        ("user,user", "twice"),
        ("tap=t,hostfwd=tcp::1-:2", "needs user"),
        ("user=1", "unknown key"),
        ("user,hostfwd=sctp::1-:2", "sctp"),
        ("user,hostfwd=tcp::1:2", "no '-'"),
        ("user,hostfwd=tcp::0-:2", "host port 0"),
        ("user,hostfwd=tcp::70000-:2", "70000"),
        ("user,hostfwd=tcp::1-10.0.2.15:2", "guest address"),
        ("user,hostfwd=tcp:localhost:1-:2", "not an IP address"),
        ("user,hostfwd=tcp:[::1:1-:2", "unclosed"),
        ("user,hostfwd=tcp::1-:", "guest port"),
        ("mac=02:00:00:00:00:01", "tap=NAME or user"),
    ] {
        let e = parse_net_option(bad).expect_err(bad).to_string();
        assert!(e.contains(words), "{bad:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn user_net_offers_no_offloads_it_cannot_do() {
    // The passt stream carries plain frames: the device must not let the guest hand it
    // partial checksums or GSO frames.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let stream = crate::devices::virtio::passt::FrameStream::new(a).unwrap();
    let net = Net::with_backend("user", USER_NET_DEFAULT_MAC, Box::new(stream));
    let f = net.features();
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
    ] {
        assert_eq!(f & bit, 0, "feature {bit:#x} offered");
    }
    assert_ne!(f & VIRTIO_NET_F_MRG_RXBUF, 0);
}

#[test]
fn parses_net_options() {
    assert_eq!(
        parse_net_option("tap=tap0").unwrap(),
        NetConfig {
            attach: NetAttach::Tap("tap0".into()),
            mac: None
        }
    );
    assert_eq!(
        parse_net_option("tap=tap0,mac=52:54:00:AB:cd:0f").unwrap(),
        NetConfig {
            attach: NetAttach::Tap("tap0".into()),
            mac: Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
        }
    );
    assert_eq!(
        parse_net_option("mac=02-00-00-00-00-01,tap=t").unwrap().mac,
        Some([2, 0, 0, 0, 0, 1])
    );
    for bad in [
        "",
        "mac=52:54:00:00:00:01",
        "tap=",
        "tap=averyveryverylongname",
        "tap=a,tap=b",
        "tap=a,foo=1",
        "tap=a,mac=52:54:00:00:00",
        "tap=a,mac=52:54:00:00:00:01:02",
        "tap=a,mac=52:54:00:00:00:zz",
        "tap=a,mac=525:4:00:00:00:01",
        "tap=a,mac=+2:54:00:00:00:01",
    ] {
        assert!(parse_net_option(bad).is_err(), "{bad:?} accepted");
    }
    let e = parse_net_option("tap=a,mac=01:00:5e:00:00:01").unwrap_err();
    assert!(matches!(e, NetConfigError::MulticastMac { .. }), "{e}");
    assert!(e.to_string().contains("01:00:5e:00:00:01"));
    let e = Net::new(&NetConfig {
        attach: NetAttach::Tap("t".into()),
        mac: Some([1, 0, 0, 0, 0, 1]),
    })
    .err()
    .unwrap();
    assert!(
        matches!(e, NetError::Config(NetConfigError::MulticastMac { .. })),
        "{e}"
    );
    let e = Net::new(&NetConfig {
        attach: NetAttach::Tap("0123456789abcdefg".into()),
        mac: None,
    })
    .err()
    .unwrap();
    assert!(
        matches!(e, NetError::Tap(TapError::InvalidName { .. })),
        "{e}"
    );
    let e = parse_net_option("tap=a,mac=xx").unwrap_err();
    assert!(e.to_string().contains("\"xx\""), "{e}");
}

#[test]
fn generated_mac_is_stable_local_unicast() {
    let a = mac_from_name("tap0");
    assert_eq!(a, mac_from_name("tap0"));
    assert_ne!(a, mac_from_name("tap1"));
    assert_eq!(a[0] & 1, 0, "unicast");
    assert_eq!(a[0] & 2, 2, "locally administered");
    assert_eq!(&a[..3], &[0x52, 0x54, 0x00]);
    assert_eq!(
        format_mac(&[0x52, 0x54, 0, 0xa, 0xb, 0xc]),
        "52:54:00:0a:0b:0c"
    );
}

#[test]
fn config_space_and_features() {
    let (f, _h) = fake();
    let net = Net::with_backend("t0", MAC, Box::new(f));
    assert_eq!(net.device_type(), TYPE_NET);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let mut c = [0xffu8; 16];
    net.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "LINK_UP");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "max_virtqueue_pairs");
    assert!(c[10..].iter().all(|&b| b == 0));
    let mut b = [0xffu8; 2];
    net.read_config(4, &mut b);
    assert_eq!(b, [2, 3]);
    net.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);
    let feat = net.features();
    for f in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_RING_EVENT_IDX,
        VIRTIO_F_RING_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
    ] {
        assert_ne!(feat & f, 0, "{f:#x}");
    }
    // The fake backend accepts no TUN offloads: no guest offloads offered.
    assert_eq!(feat & VIRTIO_NET_F_GUEST_CSUM, 0);
    assert_eq!(feat & VIRTIO_NET_F_GUEST_TSO4, 0);
    assert_eq!(
        Net::tun_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6),
        tap::TUN_F_CSUM | tap::TUN_F_TSO6
    );
}

// ---- TX -----------------------------------------------------------------------------

#[test]
fn tx_gathers_a_frame_from_several_descriptors() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE);
    let f = frame(100, 1);
    mem.write_slice(&f[..VNET_HDR_LEN], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&f[VNET_HDR_LEN..], GuestAddress(DATA + 0x1000))
        .unwrap();
    add_chain(
        &b.txq,
        0,
        &[
            (DATA, VNET_HDR_LEN as u32, false),
            (DATA + 0x1000, 100, false),
        ],
    );
    let (used_added, more) = b.nq.process_tx();
    assert!(used_added && !more);
    assert_eq!(b.h.sent(), vec![f]);
    assert_eq!(used(&b.txq), vec![(0, 0)]);
    let s = b.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes), (1, 100));
}

#[test]
fn tx_hostile_chains_are_dropped_returned_and_counted() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE);
    let good = frame(60, 9);
    mem.write_slice(&good, GuestAddress(DATA)).unwrap();
    let glen = good.len() as u32;
    // 0: a device-writable descriptor in a TX chain.
    add_chain(&b.txq, 0, &[(DATA, 12, false), (DATA + 12, 60, true)]);
    // 2: an address outside guest memory.
    add_chain(&b.txq, 2, &[(MEM_SIZE as u64 - 8, 64, false)]);
    // 3: shorter than the virtio-net header.
    add_chain(&b.txq, 3, &[(DATA, 11, false)]);
    // 4: larger than MAX_FRAME_LEN + header.
    add_chain(
        &b.txq,
        4,
        &[(DATA, 65536, false), (DATA + 0x2_0000, 65536, false)],
    );
    // 6: a GSO header although HOST_TSO4 was not negotiated.
    mem.write_slice(
        &[0, vnet::VIRTIO_NET_HDR_GSO_TCPV4 as u8],
        GuestAddress(DATA + 0x8_0000),
    )
    .unwrap();
    add_chain(&b.txq, 6, &[(DATA + 0x8_0000, 80, false)]);
    // 7: a good frame after all that.
    add_chain(&b.txq, 7, &[(DATA, glen, false)]);
    b.nq.process_tx();
    assert_eq!(b.h.sent(), vec![good]);
    assert_eq!(
        used(&b.txq),
        vec![(0, 0), (2, 0), (3, 0), (4, 0), (6, 0), (7, 0)]
    );
    let s = b.stats.snapshot();
    assert_eq!(s.tx_dropped_malformed, 2);
    assert_eq!(s.tx_dropped_too_short, 1);
    assert_eq!(s.tx_dropped_oversized, 1);
    assert_eq!(s.tx_dropped_bad_header, 1);
    assert_eq!(s.tx_frames, 1);
}

#[test]
fn tx_accepts_negotiated_gso() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4);
    let mut f = frame(200, 3);
    f[0] = vnet::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    f[1] = vnet::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    add_chain(&b.txq, 0, &[(DATA, f.len() as u32, false)]);
    b.nq.process_tx();
    assert_eq!(b.h.sent(), vec![f]);
}

// ---- RX -----------------------------------------------------------------------------

fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn rx_without_buffers_does_not_read_the_backend() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE);
    b.h.push(frame(50, 0));
    let st = b.nq.process_rx();
    assert!(st.starved && !st.used);
    assert_eq!(b.h.queued(), 1, "frame must stay in the TAP");
    // The guest adds a buffer and kicks: the frame arrives, header num_buffers = 1.
    add_chain(&b.rxq, 0, &[(DATA, 2048, true)]);
    let st = b.nq.process_rx();
    assert!(st.used);
    assert_eq!(used(&b.rxq), vec![(0, 62)]);
    let mut want = frame(50, 0);
    want[NUM_BUFFERS_OFFSET] = 1;
    assert_eq!(read_guest(&mem, DATA, 62), want);
    assert_eq!(b.stats.snapshot().rx_frames, 1);
}

#[test]
fn rx_frame_too_big_without_mrg_rxbuf_is_dropped_and_buffer_kept() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE);
    add_chain(&b.rxq, 0, &[(DATA, 100, true)]);
    b.h.push(frame(1000, 0));
    b.h.push(frame(40, 5));
    b.nq.process_rx();
    // The big frame is dropped, the small one lands in the same buffer.
    assert_eq!(used(&b.rxq), vec![(0, 52)]);
    let mut want = frame(40, 5);
    want[NUM_BUFFERS_OFFSET] = 1;
    assert_eq!(read_guest(&mem, DATA, 52), want);
    let s = b.stats.snapshot();
    assert_eq!((s.rx_dropped_too_big, s.rx_frames), (1, 1));
}

#[test]
fn rx_mrg_rxbuf_spreads_a_frame_over_chains() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE | VIRTIO_NET_F_MRG_RXBUF);
    // The header straddles two descriptors of the first chain.
    add_chain(&b.rxq, 0, &[(DATA, 11, true), (DATA + 0x100, 1489, true)]);
    add_chain(&b.rxq, 2, &[(DATA + 0x1000, 1500, true)]);
    add_chain(&b.rxq, 3, &[(DATA + 0x2000, 1500, true)]);
    let f = frame(3000, 7);
    b.h.push(f.clone());
    let st = b.nq.process_rx();
    assert!(st.used);
    assert_eq!(used(&b.rxq), vec![(0, 1500), (2, 1500), (3, 12)]);
    let mut got = read_guest(&mem, DATA, 11);
    got.extend(read_guest(&mem, DATA + 0x100, 1489));
    got.extend(read_guest(&mem, DATA + 0x1000, 1500));
    got.extend(read_guest(&mem, DATA + 0x2000, 12));
    let mut want = f;
    want[NUM_BUFFERS_OFFSET] = 3;
    assert_eq!(got, want);
}

#[test]
fn rx_mrg_rxbuf_waits_for_more_buffers_mid_frame() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE | VIRTIO_NET_F_MRG_RXBUF);
    add_chain(&b.rxq, 0, &[(DATA, 1000, true)]);
    b.h.push(frame(1500, 1));
    let st = b.nq.process_rx();
    assert!(
        st.starved && !st.used,
        "nothing published for a partial frame"
    );
    assert_eq!(used(&b.rxq), vec![]);
    // EVENT_IDX: avail_event asks for a kick as soon as the next buffer arrives.
    let avail_event = b.rxq.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 1);
    add_chain(&b.rxq, 1, &[(DATA + 0x1000, 1000, true)]);
    let st = b.nq.process_rx();
    assert!(st.used);
    assert_eq!(used(&b.rxq), vec![(0, 1000), (1, 512)]);
    assert_eq!(
        read_guest(&mem, DATA + NUM_BUFFERS_OFFSET as u64, 2),
        [2, 0]
    );
}

#[test]
fn rx_malformed_chains_are_returned_empty() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE);
    // 0: device-readable; 1: outside guest memory; 2: zero length; 3: good.
    add_chain(&b.rxq, 0, &[(DATA, 2048, false)]);
    add_chain(&b.rxq, 1, &[(MEM_SIZE as u64 - 4, 2048, true)]);
    add_chain(&b.rxq, 2, &[(DATA, 0, true)]);
    add_chain(&b.rxq, 3, &[(DATA + 0x1000, 2048, true)]);
    b.h.push(frame(64, 2));
    b.nq.process_rx();
    assert_eq!(used(&b.rxq), vec![(0, 0), (1, 0), (2, 0), (3, 76)]);
    let s = b.stats.snapshot();
    assert_eq!((s.rx_malformed_chains, s.rx_frames), (3, 1));
}

#[test]
fn rx_runt_from_backend_is_dropped() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE);
    add_chain(&b.rxq, 0, &[(DATA, 2048, true)]);
    b.h.push(vec![0; 5]);
    b.nq.process_rx();
    assert_eq!(used(&b.rxq), vec![]);
    assert_eq!(b.stats.snapshot().rx_dropped_runt, 1);
}

// ---- worker thread ------------------------------------------------------------------

#[derive(Default)]
struct Irq(Mutex<Vec<VirtioInterruptType>>);
impl VirtioInterrupt for Irq {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        self.0.lock().unwrap().push(kind);
        Ok(())
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn active_queues(
    rxq: &MockSplitQueue<GuestMemoryMmap>,
    txq: &MockSplitQueue<GuestMemoryMmap>,
    kicks: Vec<EventFd>,
) -> Vec<ActiveQueue> {
    let mut k = kicks.into_iter();
    vec![
        ActiveQueue {
            index: RX_QUEUE,
            queue: rxq.create_queue().unwrap(),
            kick: k.next().unwrap(),
        },
        ActiveQueue {
            index: TX_QUEUE,
            queue: txq.create_queue().unwrap(),
            kick: k.next().unwrap(),
        },
    ]
}

#[test]
fn worker_serves_kicks_and_survives_reset() {
    let mem = guest_mem();
    let (f, h) = fake();
    let mut net = Runner::new(Box::new(Net::with_backend("fake0", MAC, Box::new(f))));
    assert!(net.reset().is_none(), "not active yet");
    let irq = Arc::new(Irq::default());
    let kicks = [
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    for round in 0..2u8 {
        let rxq = MockSplitQueue::create(&mem, RXQ, QUEUE_SIZE);
        let txq = MockSplitQueue::create(&mem, TXQ, QUEUE_SIZE);
        let kick_rx = kicks[0].try_clone().unwrap();
        let kick_tx = kicks[1].try_clone().unwrap();
        net.activate(
            mem.clone(),
            if round == 0 {
                net.device().features() & !VIRTIO_F_RING_EVENT_IDX
            } else {
                net.device().features()
            },
            active_queues(
                &rxq,
                &txq,
                kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            ),
            irq.clone(),
        )
        .unwrap();
        assert!(matches!(
            net.activate(mem.clone(), 0, vec![], irq.clone()),
            Err(ActivateError::AlreadyActive)
        ));

        let f = frame(30, round);
        mem.write_slice(&f, GuestAddress(DATA)).unwrap();
        add_chain(&txq, 0, &[(DATA, f.len() as u32, false)]);
        kick_tx.write(1).unwrap();
        wait_for("tx", || h.sent().len() == usize::from(round) + 1);
        wait_for("tx used", || used(&txq).len() == 1);

        add_chain(&rxq, 0, &[(DATA + 0x1000, 2048, true)]);
        kick_rx.write(1).unwrap();
        h.push(frame(40, round));
        wait_for("rx used", || used(&rxq).len() == 1);
        assert_eq!(used(&rxq)[0], (0, 52));
        wait_for("irqs", || {
            let v = irq.0.lock().unwrap();
            v.contains(&VirtioInterruptType::Queue(0)) && v.contains(&VirtioInterruptType::Queue(1))
        });
        irq.0.lock().unwrap().clear();

        let back = net.reset().expect("active");
        assert_eq!(back.len(), 2);
        assert!(net.reset().is_none());
    }
    let s = net.device().stats();
    assert_eq!((s.tx_frames, s.rx_frames), (2, 2));
    let (f2, _) = fake();
    let mut bad = Runner::new(Box::new(Net::with_backend("fake1", MAC, Box::new(f2))));
    assert!(matches!(
        bad.activate(mem.clone(), 0, vec![], irq),
        Err(ActivateError::QueueCount { got: 0, want: 2 })
    ));
}

// ---- a real TAP in a private network namespace ----------------------------------------

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct NetNs(String);
impl Drop for NetNs {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

/// The permission errors come from the real kernel: a thread without CAP_NET_ADMIN cannot
/// create a TAP nor attach to someone else's, but can attach to one created for its user.
#[test]
fn real_tap_permission_errors() {
    let ns = NetNs(format!("ferrovm-perm-{}", std::process::id()));
    if !ip(&["netns", "add", &ns.0]) {
        crate::test_support::skipped(
            "real_tap_permission_errors",
            "cannot create a network namespace (not root, or no `ip`)",
        );
        return;
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .unwrap();
    let other = if uid == "4242" { "4243" } else { "4242" };
    for (dev, user) in [("fvother0", other), ("fvmine0", uid.as_str())] {
        assert!(ip(&[
            "-n", &ns.0, "tuntap", "add", "dev", dev, "mode", "tap", "user", user, "vnet_hdr"
        ]));
    }
    let path = std::path::PathBuf::from("/run/netns").join(&ns.0);
    let (missing, other, mine) = std::thread::spawn(move || {
        tap::enter_netns(&path).unwrap();
        tap::drop_net_admin().unwrap();
        (
            Tap::open("fvmissing0"),
            Tap::open("fvother0"),
            Tap::open("fvmine0"),
        )
    })
    .join()
    .unwrap();
    let e = missing.unwrap_err();
    assert!(matches!(e, TapError::CannotCreate { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
    assert!(
        msg.contains("ip tuntap add dev fvmissing0 mode tap user"),
        "{msg}"
    );
    let e = other.unwrap_err();
    assert!(matches!(e, TapError::PermissionDenied { .. }), "{e}");
    assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
    let mine = mine.expect("a TAP owned by this user opens without CAP_NET_ADMIN");
    assert_ne!(mine.supported_offloads() & tap::TUN_F_CSUM, 0);
}

/// ARP request from the guest (10.213.0.2, MAC) for 10.213.0.1, the TAP's address in the
/// namespace; the namespace's kernel must answer through the TAP.
#[test]
fn real_tap_in_a_netns_answers_arp() {
    // Creating a namespace needs root (CAP_SYS_ADMIN).
    let ns = NetNs(format!("ferrovm-test-{}", std::process::id()));
    if !ip(&["netns", "add", &ns.0]) {
        crate::test_support::skipped(
            "real_tap_in_a_netns_answers_arp",
            "cannot create a network namespace (not root, or no `ip`)",
        );
        return;
    }
    let path = std::path::PathBuf::from("/run/netns").join(&ns.0);
    let tap = std::thread::spawn(move || {
        tap::enter_netns(&path).map_err(|e| e.to_string())?;
        Tap::open("fvtap0").map_err(|e| e.to_string())
    })
    .join()
    .unwrap()
    .expect("TAP in the namespace");
    assert_eq!(tap.name(), "fvtap0");
    let off = tap.supported_offloads();
    assert_ne!(off & tap::TUN_F_CSUM, 0, "offloads {off:#x}");
    assert!(ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.213.0.1/24",
        "dev",
        "fvtap0"
    ]));
    assert!(ip(&["-n", &ns.0, "link", "set", "fvtap0", "up"]));

    let mem = guest_mem();
    let rxq = MockSplitQueue::create(&mem, RXQ, QUEUE_SIZE);
    let txq = MockSplitQueue::create(&mem, TXQ, QUEUE_SIZE);
    let stats = Arc::new(NetStats::default());
    let mut nq = NetQueues::new(
        mem.clone(),
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        Box::new(tap),
        BASE | VIRTIO_NET_F_MRG_RXBUF,
        stats.clone(),
    );
    let mut arp = vec![0u8; VNET_HDR_LEN];
    arp.extend([0xff; 6]);
    arp.extend(MAC);
    arp.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend(MAC);
    arp.extend([10, 213, 0, 2]);
    arp.extend([0; 6]);
    arp.extend([10, 213, 0, 1]);
    mem.write_slice(&arp, GuestAddress(DATA)).unwrap();
    add_chain(&txq, 0, &[(DATA, arp.len() as u32, false)]);
    for i in 0..16u16 {
        add_chain(
            &rxq,
            i,
            &[(DATA + 0x1_0000 + u64::from(i) * 0x1000, 4096, true)],
        );
    }
    nq.process_tx();
    assert_eq!(stats.snapshot().tx_frames, 1, "{:?}", stats.snapshot());

    // The kernel may also send IPv6 noise; look for the ARP reply among what arrives.
    let t = Instant::now();
    let mut seen = 0;
    loop {
        assert!(t.elapsed() < Duration::from_secs(5), "no ARP reply");
        nq.process_rx();
        let u = used(&rxq);
        let found = u[seen..].iter().any(|&(id, len)| {
            let f = read_guest(&mem, DATA + 0x1_0000 + u64::from(id) * 0x1000, len as usize);
            f.len() >= VNET_HDR_LEN + 42
                && f[VNET_HDR_LEN..VNET_HDR_LEN + 6] == MAC
                && f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x08, 0x06]
                && f[VNET_HDR_LEN + 20..VNET_HDR_LEN + 22] == [0, 2]
                && f[VNET_HDR_LEN + 28..VNET_HDR_LEN + 32] == [10, 213, 0, 1]
        });
        if found {
            break;
        }
        seen = u.len();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(stats.snapshot().rx_frames >= 1);
}

/// A driver that moves the available index far past any chain it wrote must not make the
/// worker spin: TX and RX give up after one retry, count a queue error and wait for a kick.
#[test]
fn avail_index_ahead_of_the_ring_does_not_spin() {
    let mem = guest_mem();
    let mut b = bed(&mem, BASE);
    b.txq.avail().idx().store(1000);
    let (used_tx, more) = b.nq.process_tx();
    assert!(!used_tx && !more);
    assert!(b.h.sent().is_empty());
    b.h.push(frame(50, 0));
    b.rxq.avail().idx().store(1000);
    let st = b.nq.process_rx();
    assert!(st.starved && !st.used);
    assert!(b.stats.snapshot().queue_errors >= 2);
}
