//! Differencing VHDs, built here per the VHD specification (QEMU cannot create them) over
//! parents made by `qemu-img`: reads fall through to the parent where the sector bitmap is
//! clear, writes allocate blocks without copying and set the bits of the sectors written,
//! the parent is found through every kind of locator and the parent name, and hostile
//! locators, missing or wrong parents and loops fail in one line.

use std::path::{Path, PathBuf};

use vmm_sys_util::tempdir::TempDir;

use super::super::test_util::*;
use super::super::{open, DiskError};
use super::checksum;

/// One parent locator entry: platform code and data, with optional lies about where the
/// data is and how long it is.
struct Loc {
    code: &'static [u8; 4],
    data: Vec<u8>,
    at: Option<u64>,
    len: Option<u32>,
}

fn loc(code: &'static [u8; 4], data: Vec<u8>) -> Loc {
    Loc {
        code,
        data,
        at: None,
        len: None,
    }
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// A differencing child.
struct Child {
    size: u64,
    block: u32,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    parent_name: String,
    locs: Vec<Loc>,
}

fn footer(c: &Child) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&512u64.to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&c.size.to_be_bytes());
    f[48..56].copy_from_slice(&c.size.to_be_bytes());
    f[56..60].copy_from_slice(&[0x10, 0, 16, 63]);
    f[60..64].copy_from_slice(&4u32.to_be_bytes());
    f[68..84].copy_from_slice(&c.uuid);
    let sum = checksum(&f, 64);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The image bytes: footer copy, dynamic header, BAT (all unallocated), locator data, footer.
fn build(c: &Child) -> Vec<u8> {
    let entries = c.size.div_ceil(u64::from(c.block)) as u32;
    let bat_len = (u64::from(entries) * 4).div_ceil(512) * 512;
    let mut img = footer(c).to_vec();
    let mut h = [0u8; 1024];
    h[..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&1536u64.to_be_bytes());
    h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    h[28..32].copy_from_slice(&entries.to_be_bytes());
    h[32..36].copy_from_slice(&c.block.to_be_bytes());
    h[40..56].copy_from_slice(&c.parent_uuid);
    let name: Vec<u8> = c
        .parent_name
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    h[64..64 + name.len()].copy_from_slice(&name);
    let mut data = Vec::new();
    let data_at = 1536 + bat_len;
    for (k, l) in c.locs.iter().enumerate() {
        let e = &mut h[576 + 24 * k..600 + 24 * k];
        let at = data_at + data.len() as u64;
        let space = (l.data.len() as u64).div_ceil(512) * 512;
        e[..4].copy_from_slice(l.code);
        e[4..8].copy_from_slice(&((space / 512) as u32).to_be_bytes());
        e[8..12].copy_from_slice(&l.len.unwrap_or(l.data.len() as u32).to_be_bytes());
        e[16..24].copy_from_slice(&l.at.unwrap_or(at).to_be_bytes());
        data.extend_from_slice(&l.data);
        data.resize(space as usize + (at - data_at) as usize, 0);
    }
    let sum = checksum(&h, 36);
    h[36..40].copy_from_slice(&sum.to_be_bytes());
    img.extend_from_slice(&h);
    img.extend(std::iter::repeat_n(0xffu8, bat_len as usize));
    img.extend_from_slice(&data);
    img.extend_from_slice(&footer(c));
    img
}

/// A dynamic (or fixed) parent made by qemu-img from reference data: its path, what
/// qemu-img reads from it, and its unique id.
fn parent(d: &TempDir, name: &str, sub: &str) -> Option<(PathBuf, Vec<u8>, [u8; 16])> {
    let src = p(d, "src.raw");
    std::fs::write(&src, reference(3 * MIB, 17)).unwrap();
    let img = p(d, name);
    let o = format!("subformat={sub}");
    qemu_ok(&["convert", "-O", "vpc", "-o", &o, s(&src), s(&img)])?;
    let back = p(d, "back.raw");
    qemu_ok(&["convert", "-f", "vpc", "-O", "raw", s(&img), s(&back)]).unwrap();
    let f = std::fs::read(&img).unwrap();
    let uuid = f[f.len() - 512 + 68..f.len() - 512 + 84]
        .try_into()
        .unwrap();
    Some((img, std::fs::read(back).unwrap(), uuid))
}

fn child_of(size: u64, parent_uuid: [u8; 16], locs: Vec<Loc>) -> Child {
    Child {
        size,
        block: 64 * 1024,
        uuid: [0x5c; 16],
        parent_uuid,
        parent_name: String::new(),
        locs,
    }
}

fn write_child(path: &Path, c: &Child) {
    std::fs::write(path, build(c)).unwrap();
}

/// The sector bitmap of block `b` of the child at `path` (64 KiB blocks: 16 bytes used).
fn bitmap_of(path: &Path, b: usize) -> Vec<u8> {
    let f = std::fs::read(path).unwrap();
    let bat = u32::from_be_bytes(f[1536 + 4 * b..1540 + 4 * b].try_into().unwrap());
    assert_ne!(bat, u32::MAX, "block {b} unallocated");
    f[bat as usize * 512..bat as usize * 512 + 16].to_vec()
}

/// qemu-img opens a differencing VHD as a dynamic one (without its parent): what it reads
/// is the child's own layer. Every sector the child changed must be there, and every
/// non-zero sector there must be what ferrovm reads through the chain.
fn own_layer_reads_like_qemu(d: &TempDir, child: &Path, want: &[u8], pdata: &[u8]) {
    let own = p(d, "own.raw");
    qemu_ok(&["convert", "-f", "vpc", "-O", "raw", s(child), s(&own)]).unwrap();
    let own = std::fs::read(own).unwrap();
    assert_eq!(own.len(), want.len());
    let sectors = own.chunks(512).zip(want.chunks(512)).zip(pdata.chunks(512));
    for (i, ((o, w), p)) in sectors.enumerate() {
        let zero = o.iter().all(|b| *b == 0);
        assert!(zero || o == w, "sector {i}: qemu-img reads other bytes");
        assert!(w == p || o == w, "sector {i}: changed but not in the child");
    }
}

#[test]
fn differencing_reads_fall_through_and_writes_set_only_their_bits() {
    let d = dir();
    for sub in ["dynamic", "fixed"] {
        let Some((par, pdata, uuid)) = parent(&d, &format!("parent-{sub}.vhd"), sub) else {
            return;
        };
        let before = std::fs::read(&par).unwrap();
        let child = p(&d, &format!("child-{sub}.vhd"));
        let name = format!(".\\parent-{sub}.vhd");
        let c = child_of(pdata.len() as u64, uuid, vec![loc(b"W2ru", utf16le(&name))]);
        write_child(&child, &c);
        let disk = open(&opts(&child, false)).unwrap();
        assert_eq!(disk.as_vhd().unwrap().disk_type(), "differencing");
        assert!(read_all(disk.as_ref(), 100 * 1024) == pdata, "{sub}");
        // The parent is locked shared: readable by others, writable by nobody.
        assert!(matches!(
            open(&opts(&par, false)),
            Err(DiskError::Locked { .. })
        ));
        drop(open(&opts(&par, true)).unwrap());
        let mut want = pdata.clone();
        let blk = 3 * 64 * 1024;
        let mut one = |off: usize, len: usize, v: u8| {
            let mut x = vec![v; len];
            want[off..off + len].copy_from_slice(&x);
            write(disk.as_ref(), &mut x, off as u64);
        };
        // One sector into an unallocated block: only its bit.
        one(blk + 1024, 512, 0xa1);
        let mut bm = vec![0u8; 16];
        bm[0] = 0x20;
        assert_eq!(bitmap_of(&child, 3), bm, "{sub}");
        // Sectors 9..12 of the same block, and a write that is not sector-aligned.
        one(blk + 9 * 512, 3 * 512, 0xa2);
        one(blk + 20 * 512 + 100, 300, 0xa3);
        bm[1] = 0x70;
        bm[2] = 0x08;
        assert_eq!(bitmap_of(&child, 3), bm, "{sub}");
        assert!(read_all(disk.as_ref(), 128 * 1024 + 512) == want, "{sub}");
        scribble(disk.as_ref(), &mut want, 31, 200);
        assert!(read_all(disk.as_ref(), MIB as usize) == want, "{sub}");
        drop(disk);
        assert!(
            std::fs::read(&par).unwrap() == before,
            "{sub}: the parent changed"
        );
        own_layer_reads_like_qemu(&d, &child, &want, &pdata);
        let disk = open(&opts(&child, true)).unwrap();
        assert!(
            read_all(disk.as_ref(), 300 * 1024) == want,
            "{sub}: after reopening"
        );
    }
}

#[test]
fn differencing_chains_and_qcow2_over_a_differencing_vhd() {
    let d = dir();
    let Some((par, pdata, uuid)) = parent(&d, "base.vhd", "dynamic") else {
        return;
    };
    let size = pdata.len() as u64;
    let mid = p(&d, "mid.vhd");
    let mut c = child_of(size, uuid, vec![loc(b"W2ru", utf16le(".\\base.vhd"))]);
    c.uuid = [1; 16];
    write_child(&mid, &c);
    let mut want = pdata.clone();
    {
        let m = open(&opts(&mid, false)).unwrap();
        scribble(m.as_ref(), &mut want, 8, 100);
    }
    let top = p(&d, "top.vhd");
    let mut c = child_of(size, [1; 16], vec![loc(b"W2ru", utf16le("mid.vhd"))]);
    c.uuid = [2; 16];
    write_child(&top, &c);
    {
        let t = open(&opts(&top, false)).unwrap();
        assert!(read_all(t.as_ref(), 200 * 1024) == want);
        scribble(t.as_ref(), &mut want, 9, 100);
    }
    // A qcow2 overlay of the differencing chain reads through all of it.
    let q = p(&d, "over.qcow2");
    if qemu_ok(&["create", "-f", "qcow2", "-b", "top.vhd", "-F", "vpc", s(&q)]).is_none() {
        return;
    }
    let disk = open(&opts(&q, true)).unwrap();
    assert!(read_all(disk.as_ref(), MIB as usize) == want);
    let info = super::super::info::describe(&q, None).unwrap();
    for line in [
        "vhd type: differencing",
        "parent image 3",
        "locator 0 W2ru: mid.vhd",
    ] {
        assert!(info.contains(line), "{line} not in:\n{info}");
    }
    let _ = par;
}

#[test]
fn parent_locators_and_the_parent_name_resolve_like_hyper_v() {
    let d = dir();
    let Some((par, pdata, uuid)) = parent(&d, "my parent.vhd", "dynamic") else {
        return;
    };
    let abs = s(&par).to_string();
    let win_abs = format!("C:{}", abs.replace('/', "\\"));
    let url = format!("file://localhost{}", abs.replace(' ', "%20"));
    let stale = || loc(b"W2ru", utf16le(".\\gone.vhd"));
    let cases: Vec<(&str, Vec<Loc>, &str)> = vec![
        ("w2ku", vec![stale(), loc(b"W2ku", utf16le(&win_abs))], ""),
        ("macx", vec![loc(b"MacX", url.into_bytes())], ""),
        ("name", vec![stale()], "my parent.vhd"),
        ("name-abs", vec![], "D:\\Hyper-V\\my parent.vhd"),
        (
            "unknown-code",
            vec![loc(b"Mac ", vec![1; 40])],
            "my parent.vhd",
        ),
    ];
    for (what, locs, name) in cases {
        let child = p(&d, &format!("{what}.vhd"));
        let mut c = child_of(pdata.len() as u64, uuid, locs);
        c.parent_name = name.into();
        write_child(&child, &c);
        let disk = open(&opts(&child, true)).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(read_all(disk.as_ref(), MIB as usize) == pdata, "{what}");
    }
}

#[test]
fn hostile_differencing_vhds_fail_in_one_line() {
    let d = dir();
    let Some((par, pdata, uuid)) = parent(&d, "p.vhd", "dynamic") else {
        return;
    };
    let size = pdata.len() as u64;
    let good = || loc(b"W2ru", utf16le("p.vhd"));
    let raw = p(&d, "raw.img");
    std::fs::write(&raw, vec![0u8; size as usize]).unwrap();
    let mut cases: Vec<(&str, Child, &str)> = vec![
        (
            "outside",
            child_of(
                size,
                uuid,
                vec![Loc {
                    at: Some(1 << 40),
                    ..good()
                }],
            ),
            "lie outside the file",
        ),
        (
            "huge",
            child_of(
                size,
                uuid,
                vec![Loc {
                    len: Some(1 << 30),
                    ..good()
                }],
            ),
            "1073741824 bytes (at most 65536)",
        ),
        (
            "odd",
            child_of(
                size,
                uuid,
                vec![Loc {
                    len: Some(3),
                    ..good()
                }],
            ),
            "odd number",
        ),
        (
            "missing",
            child_of(size, uuid, vec![loc(b"W2ru", utf16le("nope.vhd"))]),
            "parent image not found (tried",
        ),
        (
            "no-locator",
            child_of(size, uuid, vec![]),
            "without a parent locator",
        ),
        (
            "uuid",
            child_of(size, [7; 16], vec![good()]),
            "not 07070707-",
        ),
        (
            "self",
            child_of(size, [0x5c; 16], vec![loc(b"W2ru", utf16le("self.vhd"))]),
            "loops back",
        ),
        (
            "not-vhd",
            child_of(size, uuid, vec![loc(b"W2ru", utf16le("raw.img"))]),
            "not a vhd image",
        ),
    ];
    cases.push((
        "bad-url",
        child_of(size, uuid, vec![loc(b"MacX", b"http://x/p.vhd".to_vec())]),
        "not a file:// URL",
    ));
    for (name, c, want) in cases {
        let child = p(&d, &format!("{name}.vhd"));
        write_child(&child, &c);
        let msg = open_err(&child, true);
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(!msg.contains('\n'), "{name}: not one line: {msg}");
    }
    // More than 16 levels.
    let mut prev = ("p.vhd".to_string(), uuid);
    let mut last = PathBuf::new();
    for i in 0..17u8 {
        let name = format!("deep{i}.vhd");
        let mut c = child_of(size, prev.1, vec![loc(b"W2ru", utf16le(&prev.0))]);
        c.uuid = [i + 100; 16];
        last = p(&d, &name);
        write_child(&last, &c);
        prev = (name, c.uuid);
    }
    assert!(open_err(&last, true).contains("longer than 16"));
    let _ = par;
}

#[test]
fn differencing_vhd_bytes_follow_the_spec() {
    // The hand-built image parses as qemu sees VHDs: footer and header checksums hold.
    let c = child_of(MIB, [3; 16], vec![loc(b"W2ru", utf16le("x.vhd"))]);
    let img = build(&c);
    let f: [u8; 512] = img[img.len() - 512..].try_into().unwrap();
    assert_eq!(super::parse_footer(&f).unwrap(), MIB);
    assert_eq!(checksum(&img[512..1536], 36).to_be_bytes(), img[548..552]);
}
