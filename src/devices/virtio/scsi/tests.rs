//! virtio-scsi CD-ROM tests: the command set on its own, then whole requests through a
//! split queue in real guest memory (no KVM), hostile chains included.

use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cdrom::{CdRom, Reply, Sense};
use super::request::{Kind, Server, Sizes};
use super::{parse_cdrom_option, Target, BLOCK_SIZE};
use crate::devices::virtio::test_chains::add_chain;
use crate::disk::mem::MemDisk;

fn cdb(bytes: &[u8]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..bytes.len()].copy_from_slice(bytes);
    c
}

fn data(r: Reply) -> Vec<u8> {
    match r {
        Reply::Data(d) => d,
        other => panic!("expected data, got {other:?}"),
    }
}

#[test]
fn the_unit_answers_what_firmware_and_linux_ask() {
    let cd = CdRom::new(100 * BLOCK_SIZE + 512, "s1");
    assert_eq!(cd.blocks(), 100, "a partial block is not visible");
    // INQUIRY: a removable CD/DVD device; VPD pages; cut to the allocation length.
    let inq = data(cd.command(0, &cdb(&[0x12, 0, 0, 0, 36])));
    assert_eq!((inq[0], inq[1], inq.len()), (0x05, 0x80, 36));
    assert_eq!(data(cd.command(0, &cdb(&[0x12, 0, 0, 0, 5]))).len(), 5);
    assert_eq!(
        data(cd.command(0, &cdb(&[0x12, 1, 0, 0, 255]))),
        [5, 0, 0, 3, 0, 0x80, 0x83]
    );
    assert_eq!(
        &data(cd.command(0, &cdb(&[0x12, 1, 0x80, 0, 255])))[4..],
        b"s1"
    );
    assert_eq!(
        cd.command(0, &cdb(&[0x12, 1, 0x55, 0, 255])),
        Reply::Check(Sense::INVALID_FIELD)
    );
    // Another LUN of the target: "no such LUN" from INQUIRY, an error for anything else.
    assert_eq!(data(cd.command(3, &cdb(&[0x12, 0, 0, 0, 36])))[0], 0x7f);
    assert_eq!(
        cd.command(3, &cdb(&[0x00])),
        Reply::Check(Sense::LUN_NOT_SUPPORTED)
    );
    // READ CAPACITY: last LBA 99, 2048-byte blocks, in both sizes.
    assert_eq!(
        data(cd.command(0, &cdb(&[0x25]))),
        [0, 0, 0, 99, 0, 0, 8, 0]
    );
    let cap16 = data(cd.command(0, &cdb(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32])));
    assert_eq!(&cap16[..12], &[0, 0, 0, 0, 0, 0, 0, 99, 0, 0, 8, 0]);
    // REPORT LUNS: LUN 0.
    assert_eq!(
        data(cd.command(0, &cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16]))),
        [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // MODE SENSE(10) page 0x2a: header, then the capabilities page.
    let ms = data(cd.command(0, &cdb(&[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 128])));
    assert_eq!((ms[0], ms[1], ms[8], ms[9]), (0, 26, 0x2a, 18));
    assert_eq!(
        cd.command(0, &cdb(&[0x5a, 0, 0x05, 0, 0, 0, 0, 0, 128])),
        Reply::Check(Sense::INVALID_FIELD)
    );
    // The TOC: track 1 at 0, the lead-out at 100 (LBA) or 00:03:25 (MSF: 250 frames).
    let toc = data(cd.command(0, &cdb(&[0x43, 0, 0, 0, 0, 0, 0, 0, 100])));
    assert_eq!(toc.len(), 20);
    assert_eq!((toc[6], toc[14]), (1, 0xaa));
    assert_eq!(&toc[16..20], &[0, 0, 0, 100]);
    let toc = data(cd.command(0, &cdb(&[0x43, 2, 0, 0, 0, 0, 0, 0, 100])));
    assert_eq!(&toc[16..20], &[0, 0, 3, 25]);
    // Session info through the SFF-8020 format bits in byte 9.
    let s = data(cd.command(0, &cdb(&[0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40])));
    assert_eq!((s.len(), s[1], s[6]), (12, 10, 1));
    // GET CONFIGURATION: current profile CD-ROM; event status: medium present.
    let gc = data(cd.command(0, &cdb(&[0x46, 0, 0, 0, 0, 0, 0, 0, 255])));
    assert_eq!(&gc[6..8], &[0, 8]);
    let ev = data(cd.command(0, &cdb(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])));
    assert_eq!(ev, [0, 4, 4, 0x10, 0, 2, 0, 0]);
}

#[test]
fn reads_are_bounded_and_writes_are_not_commands() {
    let cd = CdRom::new(100 * BLOCK_SIZE, "s");
    assert_eq!(
        cd.command(0, &cdb(&[0x28, 0, 0, 0, 0, 17, 0, 0, 2])),
        Reply::Read {
            offset: 17 * 2048,
            len: 4096
        }
    );
    assert_eq!(
        cd.command(0, &cdb(&[0x28, 0, 0, 0, 0, 99, 0, 0, 2])),
        Reply::Check(Sense::LBA_OUT_OF_RANGE)
    );
    // READ(16) whose end overflows 64 bits.
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    c[13] = 1;
    assert_eq!(cd.command(0, &c), Reply::Check(Sense::LBA_OUT_OF_RANGE));
    assert_eq!(cd.command(0, &cdb(&[0x28])), Reply::Good, "zero blocks");
    for write in [0x0a, 0x2a, 0xaa, 0x8a, 0x15, 0x55, 0xff] {
        assert_eq!(
            cd.command(0, &cdb(&[write])),
            Reply::Check(Sense::INVALID_OPCODE),
            "opcode {write:#x}"
        );
    }
}

/// A queue at guest address 0 with the used ring at 0x4000, and the image "ISO": block N is
/// filled with byte N.
fn setup() -> (GuestMemoryMmap, Server) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let image: Vec<u8> = (0..8u8)
        .flat_map(|b| std::iter::repeat_n(b, BLOCK_SIZE as usize))
        .collect();
    let disk = Arc::new(MemDisk::new("test.iso", image));
    let unit = CdRom::new(8 * BLOCK_SIZE, "t");
    let targets = Arc::new(vec![Target { disk, unit }]);
    let server = Server::new(targets, Sizes { sense: 96, cdb: 32 });
    (mem, server)
}

fn queue(vq: &MockSplitQueue<GuestMemoryMmap>) -> Queue {
    let mut q = vq.create_queue::<Queue>().unwrap();
    q.set_used_ring_address(Some(0x4000), Some(0));
    q
}

fn used_len(mem: &GuestMemoryMmap, i: u64) -> u32 {
    mem.read_obj(GuestAddress(0x4000 + 4 + 8 * i + 4)).unwrap()
}

/// A command header for target `t`, LUN 0, with `cdb` at 0x10000.
fn put_command(mem: &GuestMemoryMmap, t: u8, c: &[u8]) {
    let mut h = vec![0u8; 19 + 32];
    h[..4].copy_from_slice(&[1, t, 0x40, 0]);
    h[19..19 + c.len()].copy_from_slice(c);
    mem.write_slice(&h, GuestAddress(0x10000)).unwrap();
}

#[test]
fn a_read_lands_in_guest_memory_across_descriptors() {
    let (mem, mut server) = setup();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    put_command(&mem, 0, &[0x28, 0, 0, 0, 0, 3, 0, 0, 2]);
    // Header in one descriptor; response split across two; data in two uneven pieces.
    add_chain(
        &vq,
        0,
        &[
            (0x10000, 51, false),
            (0x20000, 50, true),
            (0x20100, 58, true),
            (0x30000, 1000, true),
            (0x40000, 3096, true),
        ],
    );
    let mut q = queue(&vq);
    server.drain(&mem, &mut q, Kind::Command).unwrap();
    assert_eq!(used_len(&mem, 0), 108 + 4096);
    let mut resp = [0u8; 12];
    mem.read_slice(&mut resp, GuestAddress(0x20000)).unwrap();
    assert_eq!(&resp[..12], &[0; 12], "no sense, resid 0, GOOD, OK");
    let mut a = vec![0u8; 1000];
    mem.read_slice(&mut a, GuestAddress(0x30000)).unwrap();
    assert!(a.iter().all(|&b| b == 3));
    let mut b = vec![0u8; 3096];
    mem.read_slice(&mut b, GuestAddress(0x40000)).unwrap();
    assert!(b[..1048].iter().all(|&x| x == 3) && b[1048..].iter().all(|&x| x == 4));
}

#[test]
fn errors_come_back_as_sense_bad_target_or_overrun() {
    let (mem, mut server) = setup();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut q = queue(&vq);
    let resp = |mem: &GuestMemoryMmap| {
        let mut r = [0u8; 30];
        mem.read_slice(&mut r, GuestAddress(0x20000)).unwrap();
        r
    };
    // An unknown opcode: CHECK CONDITION with ILLEGAL REQUEST / invalid opcode sense.
    put_command(&mem, 0, &[0xea]);
    add_chain(&vq, 0, &[(0x10000, 51, false), (0x20000, 108, true)]);
    server.drain(&mem, &mut q, Kind::Command).unwrap();
    let r = resp(&mem);
    assert_eq!((r[0], r[10], r[11]), (18, 0x02, 0));
    assert_eq!((r[12], r[14], r[24]), (0x70, 0x05, 0x20));
    // A target that does not exist.
    put_command(&mem, 5, &[0x00]);
    add_chain(&vq, 2, &[(0x10000, 51, false), (0x20000, 108, true)]);
    server.drain(&mem, &mut q, Kind::Command).unwrap();
    assert_eq!(resp(&mem)[11], 3, "VIRTIO_SCSI_S_BAD_TARGET");
    // A read bigger than the data buffer: OVERRUN, nothing transferred.
    put_command(&mem, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 2]);
    add_chain(
        &vq,
        4,
        &[
            (0x10000, 51, false),
            (0x20000, 108, true),
            (0x30000, 2048, true),
        ],
    );
    server.drain(&mem, &mut q, Kind::Command).unwrap();
    assert_eq!(resp(&mem)[11], 1, "VIRTIO_SCSI_S_OVERRUN");
    assert_eq!(used_len(&mem, 2), 108);
    // No room for the response, a header cut short, writable before readable: unanswered.
    add_chain(&vq, 7, &[(0x10000, 51, false), (0x20000, 50, true)]);
    add_chain(&vq, 9, &[(0x10000, 10, false), (0x20000, 108, true)]);
    add_chain(
        &vq,
        11,
        &[
            (0x20000, 108, true),
            (0x10000, 51, false),
            (0x30000, 8, true),
        ],
    );
    server.drain(&mem, &mut q, Kind::Command).unwrap();
    for i in 3..6 {
        assert_eq!(used_len(&mem, i), 0, "used element {i}");
    }
}

#[test]
fn control_requests_complete_and_a_stuck_ring_stops() {
    let (mem, mut server) = setup();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut q = queue(&vq);
    // TMF LOGICAL UNIT RESET on target 0, then on target 9.
    let mut tmf = vec![0u8; 24];
    tmf[4] = 5;
    tmf[8..12].copy_from_slice(&[1, 0, 0x40, 0]);
    mem.write_slice(&tmf, GuestAddress(0x10000)).unwrap();
    tmf[9] = 9;
    mem.write_slice(&tmf, GuestAddress(0x10100)).unwrap();
    mem.write_slice(&[0xffu8; 2], GuestAddress(0x20000))
        .unwrap();
    add_chain(&vq, 0, &[(0x10000, 24, false), (0x20000, 1, true)]);
    add_chain(&vq, 2, &[(0x10100, 24, false), (0x20001, 1, true)]);
    server.drain(&mem, &mut q, Kind::Control).unwrap();
    let mut r = [0u8; 2];
    mem.read_slice(&mut r, GuestAddress(0x20000)).unwrap();
    assert_eq!(r, [0, 3], "FUNCTION COMPLETE, then BAD TARGET");
    // A driver that moves the available index past anything it wrote.
    vq.avail().idx().store(1000);
    assert!(server.drain(&mem, &mut q, Kind::Control).is_err());
}

#[test]
fn cdrom_options() {
    let c = parse_cdrom_option("/x/debian.iso").unwrap();
    assert!(c.readonly && c.path.ends_with("debian.iso"));
    let c = parse_cdrom_option("path=a,b.iso").unwrap_err();
    assert!(c.to_string().contains("KEY=VALUE"), "{c}");
    let c = parse_cdrom_option("path=a.iso,bootindex=0").unwrap();
    assert_eq!(c.bootindex, Some(0));
    for bad in ["path=a.iso,readonly=off", "path=a.iso,overlay=on", ""] {
        assert!(parse_cdrom_option(bad).is_err(), "{bad}");
    }
}
