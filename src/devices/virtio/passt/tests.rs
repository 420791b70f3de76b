use super::*;
use crate::devices::virtio::net::{parse_hostfwd, MAX_FRAME_LEN};

const BUF: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

fn pair() -> (FrameStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (FrameStream::new(a).unwrap(), b)
}

fn record(frame: &[u8]) -> Vec<u8> {
    [&(frame.len() as u32).to_be_bytes()[..], frame].concat()
}

fn frame(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn reads_records_split_anywhere() {
    let (mut s, mut peer) = pair();
    let f1 = frame(60, 1);
    let f2 = frame(1514, 2);
    let f3 = frame(65534, 3);
    let bytes = [record(&f1), record(&f2), record(&f3)].concat();
    let mut buf = vec![0xffu8; BUF];
    let mut got = Vec::new();
    // Feed the stream in awkward pieces: inside the prefix, inside the body, across records.
    for chunk in bytes.chunks(1001) {
        peer.write_all(chunk).unwrap();
        loop {
            match s.read_frame(&mut buf) {
                Ok(n) => {
                    assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN], "header zeroed");
                    got.push(buf[VNET_HDR_LEN..n].to_vec());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(got, vec![f1, f2, f3]);
}

#[test]
fn oversized_and_runt_records_are_dropped_without_losing_framing() {
    let (mut s, mut peer) = pair();
    let big = frame(MAX_FRAME_LEN + 1, 4);
    let good = frame(100, 5);
    peer.write_all(&record(&big)).unwrap();
    peer.write_all(&record(&[1, 2, 3])).unwrap();
    peer.write_all(&record(&good)).unwrap();
    let mut buf = vec![0u8; BUF];
    let mut results = Vec::new();
    loop {
        match s.read_frame(&mut buf) {
            Ok(n) => results.push(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    let last = results.pop().unwrap();
    assert!(
        results.iter().all(Vec::is_empty),
        "dropped records read as 0"
    );
    assert_eq!(results.len(), 2);
    assert_eq!(&last[VNET_HDR_LEN..], &good[..]);
    // A buffer too small for a frame drops that frame, not the stream.
    peer.write_all(&record(&good)).unwrap();
    peer.write_all(&record(&good)).unwrap();
    let mut small = vec![0u8; 64];
    assert_eq!(s.read_frame(&mut small).unwrap(), 0);
    let n = s.read_frame(&mut buf).unwrap();
    assert_eq!(&buf[VNET_HDR_LEN..n], &good[..]);
}

#[test]
fn peer_closing_is_an_error_not_a_frame() {
    let (mut s, peer) = pair();
    drop(peer);
    let e = s.read_frame(&mut vec![0u8; BUF]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(s.write_frame(&[&[0u8; 60]]).is_err());
}

#[test]
fn writes_strip_the_header_and_prefix_the_length() {
    let (mut s, mut peer) = pair();
    let f = frame(1514, 6);
    let mut data = vec![0u8; VNET_HDR_LEN];
    data.extend_from_slice(&f);
    let (a, b) = data.split_at(5);
    assert_eq!(s.write_frame(&[a, b]).unwrap(), data.len());
    let mut got = vec![0u8; 4 + f.len()];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got, record(&f));
}

/// A peer that stops reading: frames are kept or dropped, never cut, and the writer never
/// blocks for long.
#[test]
fn a_stalled_peer_never_corrupts_the_stream() {
    let (mut s, mut peer) = pair();
    let mut sent = 0usize;
    let mut dropped = 0usize;
    let start = Instant::now();
    for i in 0..400u32 {
        let f = frame(9000, i as u8);
        let data = [&[0u8; VNET_HDR_LEN][..], &f].concat();
        match s.write_frame(&[&data]) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dropped += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(dropped > 0, "the socket buffer never filled");
    assert!(start.elapsed() < Duration::from_secs(30));
    // Drain while sending the stuck tail: every record that arrives is whole.
    peer.set_nonblocking(true).unwrap();
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    for _ in 0..1000 {
        match peer.read(&mut chunk) {
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if s.flush_rest().unwrap() {
                    if let Ok(n) = peer.read(&mut chunk) {
                        bytes.extend_from_slice(&chunk[..n]);
                    }
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    let mut records = 0;
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        assert_eq!(len, 9000, "record {records} has a torn length");
        rest = &rest[4 + len..];
        records += 1;
    }
    assert_eq!(records, sent);
}

#[test]
fn forward_arguments() {
    let f = parse_hostfwd("tcp:127.0.0.1:2222-:22").unwrap();
    assert_eq!(passt_forward_args(&f), ["-t", "127.0.0.1/2222:22"]);
    let f = parse_hostfwd("udp::5353-:53").unwrap();
    assert_eq!(passt_forward_args(&f), ["-u", "5353:53"]);
    let f = parse_hostfwd(":[::1]:8080-:80").unwrap();
    assert_eq!(passt_forward_args(&f), ["-t", "::1/8080:80"]);
}

fn passt_installed() {
    assert!(
        find_program("passt", &[]).is_some(),
        "passt is not installed: run scripts/setup-host (Debian package passt)"
    );
}

#[test]
fn real_passt_starts_and_stops_with_its_device() {
    passt_installed();
    let p = Passt::spawn(&[]).unwrap_or_else(|e| panic!("{e}"));
    let pid = p.daemon.child.id();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(p);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "passt {pid} outlived its device"
    );
}

#[test]
fn real_passt_errors_are_one_line_and_name_the_cause() {
    passt_installed();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let fwd = parse_hostfwd(&format!("tcp:127.0.0.1:{port}-:22")).unwrap();
    let e = Passt::spawn(&[fwd])
        .err()
        .expect("a busy port was forwarded");
    let msg = e.to_string();
    assert!(matches!(e, PasstError::Failed { .. }), "{msg}");
    assert!(msg.contains(&port.to_string()), "{msg}");
    assert!(!msg.contains('\n') && !msg.contains("syslog"), "{msg}");
}
