//! qcow2 against the reference implementation: images made by `qemu-img` read back the
//! same bytes as `qemu-img convert -O raw`; after ferrovm writes, `qemu-img check` finds no
//! errors or leaks and `qemu-img compare` matches the same writes applied to raw bytes.
//! Hostile images are built here by patching headers and tables.

use std::path::PathBuf;

use vm_memory::VolatileSlice;
use vmm_sys_util::tempdir::TempDir;

use super::super::test_util::*;
use super::super::{open, DiskError, DiskOptions, Format};
use super::*;

#[test]
fn reads_match_qemu_img_for_every_cluster_size_and_compression() {
    let d = dir();
    let src = p(&d, "src.raw");
    let data = reference(3 * MIB + 512 * 7, 7);
    std::fs::write(&src, &data).unwrap();
    for (cs, extra) in [
        ("512", &[][..]),
        ("4096", &[][..]),
        ("65536", &["-c"][..]),
        ("65536", &["-c", "-o", "compression_type=zstd"][..]),
        ("2097152", &["-c"][..]),
        ("65536", &["-o", "compat=0.10"][..]),
        ("16384", &["-o", "refcount_bits=1"][..]),
    ] {
        let img = p(&d, &format!("t-{cs}.qcow2"));
        let _ = std::fs::remove_file(&img);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        let o = format!("cluster_size={cs}");
        args.extend(["-o", &o]);
        args.extend(extra);
        args.extend([s(&src), s(&img)]);
        if qemu_ok(&args).is_none() {
            return;
        }
        let disk = open(&opts(&img, true)).unwrap();
        assert_eq!(disk.format(), Format::Qcow2);
        assert_eq!(disk.size(), data.len() as u64);
        for chunk in [512 * 3, 128 * 1024 + 512, MIB as usize] {
            assert!(
                read_all(disk.as_ref(), chunk) == data,
                "cluster {cs} {extra:?} chunk {chunk}"
            );
        }
    }
}

#[test]
fn writes_pass_qemu_img_check_and_compare() {
    let d = dir();
    let src = p(&d, "src.raw");
    let data = reference(4 * MIB, 11);
    std::fs::write(&src, &data).unwrap();
    for (i, (cs, extra)) in [
        ("65536", &[][..]),
        ("512", &[][..]),
        ("65536", &["-c"][..]),
        ("65536", &["-o", "compat=0.10"][..]),
        ("4096", &["-o", "refcount_bits=1"][..]),
        ("4096", &["-o", "refcount_bits=64"][..]),
        ("2097152", &[][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let img = p(&d, &format!("w{i}.qcow2"));
        let o = format!("cluster_size={cs}");
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", &o];
        args.extend(extra);
        args.extend([s(&src), s(&img)]);
        if qemu_ok(&args).is_none() {
            return;
        }
        let mut want = data.clone();
        {
            let disk = open(&opts(&img, false)).unwrap();
            scribble(disk.as_ref(), &mut want, 0x1234 + i as u64, 300);
            assert!(
                read_all(disk.as_ref(), 256 * 1024) == want,
                "case {cs} {extra:?}"
            );
        }
        check_clean(&img);
        compare(&img, &want, &d);
    }
}

#[test]
fn refcount_table_grows_under_many_small_clusters() {
    let d = dir();
    let img = p(&d, "grow.qcow2");
    if qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&img),
        "16M",
    ])
    .is_none()
    {
        return;
    }
    let before = qemu_ok(&["info", "--output=json", s(&img)]).unwrap();
    let mut want = vec![0u8; 16 * MIB as usize];
    {
        let disk = open(&opts(&img, false)).unwrap();
        let mut r = Rng(5);
        for off in (0..16 * MIB).step_by(64 * 1024) {
            let mut buf: Vec<u8> = (0..64 * 1024).map(|_| r.next() as u8).collect();
            want[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
            write(disk.as_ref(), &mut buf, off);
        }
    }
    let h = {
        let disk = open(&opts(&img, true)).unwrap();
        disk.as_qcow2().unwrap().header()
    };
    assert!(h.refcount_table_clusters > 1, "{before}: {h:?}");
    check_clean(&img);
    compare(&img, &want, &d);
}

#[test]
fn backing_chain_reads_fall_through_and_writes_copy_on_write() {
    let d = dir();
    let base = p(&d, "base.raw");
    let mid = p(&d, "mid.qcow2");
    let top = p(&d, "top.qcow2");
    let data = reference(2 * MIB + 4096, 3);
    std::fs::write(&base, &data).unwrap();
    // Relative names, resolved against the overlay's folder.
    if qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ])
    .is_none()
    {
        return;
    }
    qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ])
    .unwrap();
    // A partial-cluster write into the middle image: copy-on-write from the raw base.
    let at = 70_144usize;
    let mut want = data.clone();
    {
        let m = open(&opts(&mid, false)).unwrap();
        let mut x = vec![0x5au8; 2560];
        want[at..at + x.len()].copy_from_slice(&x);
        write(m.as_ref(), &mut x, at as u64);
    }
    {
        let t = open(&opts(&top, false)).unwrap();
        assert!(read_all(t.as_ref(), 100_000 / 512 * 512) == want);
        scribble(t.as_ref(), &mut want, 99, 200);
        // The backing images are locked shared: nobody may write them meanwhile.
        assert!(matches!(
            open(&opts(&mid, false)),
            Err(DiskError::Locked { .. })
        ));
        assert!(open(&opts(&mid, true)).is_ok());
    }
    assert!(
        std::fs::read(&base).unwrap() == data,
        "the raw base changed"
    );
    check_clean(&top);
    check_clean(&mid);
    compare(&top, &want, &d);
}

#[test]
fn created_overlays_pass_check_and_hold_their_writes() {
    let d = dir();
    let base = p(&d, "base.raw");
    let data = reference(MIB, 8);
    std::fs::write(&base, &data).unwrap();
    let ov = p(&d, "ov.qcow2");
    let cfg = DiskOptions {
        format: None,
        ..opts(&ov, false)
    };
    let mut want = data.clone();
    {
        let disk = super::super::overlay::open_persistent(&cfg, &base).unwrap();
        scribble(disk.as_ref(), &mut want, 4, 100);
    }
    check_clean(&ov);
    compare(&ov, &want, &d);
    if let Some(info) = qemu_ok(&["info", s(&ov)]) {
        assert!(
            info.contains("backing file:") && info.contains("base.raw"),
            "{info}"
        );
    }
    // Re-opening with the same base works; with another base it refuses.
    drop(super::super::overlay::open_persistent(&cfg, &base).unwrap());
    let other = p(&d, "other.raw");
    std::fs::write(&other, &data).unwrap();
    let err = super::super::overlay::open_persistent(&cfg, &other).unwrap_err();
    assert!(err.to_string().contains("not an overlay of"), "{err}");
    // A throwaway overlay leaves the base and the folder as they were.
    {
        let t = super::super::overlay::open_throwaway(&opts(&base, false)).unwrap();
        let mut x = vec![1u8; 4096];
        write(t.as_ref(), &mut x, 0);
        t.flush().unwrap();
    }
    assert!(std::fs::read(&base).unwrap() == data);
    for e in std::fs::read_dir("/var/tmp").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(&format!("ferrovm-overlay-{}-", std::process::id())),
            "{name} left behind"
        );
    }
}

fn fresh(d: &TempDir, name: &str, extra: &[&str]) -> Option<PathBuf> {
    let img = p(d, name);
    let _ = std::fs::remove_file(&img);
    let src = p(d, "h.raw");
    std::fs::write(&src, reference(MIB, 2)).unwrap();
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend(extra);
    args.extend([s(&src), s(&img)]);
    qemu_ok(&args)?;
    Some(img)
}

#[test]
fn hostile_headers_are_refused_at_open() {
    let d = dir();
    let Some(base) = fresh(&d, "base.qcow2", &[]) else {
        return;
    };
    let h = open(&opts(&base, true))
        .unwrap()
        .as_qcow2()
        .unwrap()
        .header();
    let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
        ("huge-l1", 36, u32::MAX.to_be_bytes().to_vec(), "L1 table"),
        (
            "l1-past-eof",
            40,
            (1u64 << 40).to_be_bytes().to_vec(),
            "beyond the end",
        ),
        (
            "rt-overlaps-l1",
            48,
            h.l1_table_offset.to_be_bytes().to_vec(),
            "overlap",
        ),
        (
            "bad-cluster-bits",
            20,
            30u32.to_be_bytes().to_vec(),
            "cluster_bits",
        ),
        (
            "long-backing",
            8,
            [0, 0, 0, 0, 0, 0, 0x2, 0, 0, 0, 0x28, 0].to_vec(),
            "backing file name",
        ),
        (
            "unknown-bit",
            72,
            (1u64 << 9).to_be_bytes().to_vec(),
            "incompatible feature bit 9",
        ),
        ("encrypted", 32, 1u32.to_be_bytes().to_vec(), "encryption"),
        ("version", 4, 4u32.to_be_bytes().to_vec(), "version 4"),
        (
            "l1-entry-past-eof",
            h.l1_table_offset,
            (0x8000_0000_0000_0000u64 | 1 << 40).to_be_bytes().to_vec(),
            "beyond the end of the file",
        ),
        (
            "l1-entry-on-header",
            h.l1_table_offset,
            0u64.to_be_bytes().to_vec(),
            "",
        ),
        (
            "refblock-on-l1",
            h.refcount_table_offset,
            h.l1_table_offset.to_be_bytes().to_vec(),
            "overlaps",
        ),
    ];
    for (name, off, bytes, want) in cases {
        let img = p(&d, &format!("{name}.qcow2"));
        std::fs::copy(&base, &img).unwrap();
        patch(&img, off, &bytes);
        if name == "l1-entry-on-header" {
            // An L1 entry of 0 is legal ("unallocated"): the image opens.
            assert!(open(&opts(&img, true)).is_ok());
            continue;
        }
        let msg = open_err(&img, true);
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(!msg.contains('\n'), "{name}: not one line: {msg}");
    }
    // Extended L2 entries: readable, not writable.
    let img = p(&d, "extl2.qcow2");
    std::fs::copy(&base, &img).unwrap();
    patch(&img, 72, &16u64.to_be_bytes());
    assert!(open(&opts(&img, true)).is_ok());
    assert!(open_err(&img, false).contains("extended L2"));
    // The dirty bit: readable, not writable.
    let img = p(&d, "dirty.qcow2");
    std::fs::copy(&base, &img).unwrap();
    patch(&img, 72, &1u64.to_be_bytes());
    assert!(open(&opts(&img, true)).is_ok());
    assert!(open_err(&img, false).contains("dirty bit"));
}

#[test]
fn hostile_tables_fail_the_request_not_the_process() {
    let d = dir();
    let Some(img) = fresh(&d, "c.qcow2", &["-c"]) else {
        return;
    };
    // Find the first compressed cluster and corrupt its bytes.
    let (entry, _) = {
        let disk = open(&opts(&img, true)).unwrap();
        let q = disk.as_qcow2().unwrap();
        let mut st = q.lock().unwrap();
        let l2_off = st.l1[0] & OFFSET_MASK;
        st.load_l2(l2_off).unwrap();
        let e = st
            .l2
            .get(l2_off)
            .unwrap()
            .data
            .iter()
            .copied()
            .find(|e| e & FLAG_COMPRESSED != 0);
        (e.unwrap(), l2_off)
    };
    let shift = 62 - (16 - 8);
    let host = entry & ((1u64 << shift) - 1);
    patch(&img, host, &[0xff; 64]);
    let disk = open(&opts(&img, false)).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let err = disk
        .read_at(&[VolatileSlice::from(&mut buf[..])], 0)
        .unwrap_err();
    assert!(err.to_string().contains("does not decompress"), "{err}");
    drop(disk);

    // A data cluster whose refcount is 0: reads work, writes fail with an error.
    let Some(img) = fresh(&d, "r.qcow2", &[]) else {
        return;
    };
    let (l2_off, first, rt) = {
        let disk = open(&opts(&img, true)).unwrap();
        let q = disk.as_qcow2().unwrap();
        let mut st = q.lock().unwrap();
        let l2_off = st.l1[0] & OFFSET_MASK;
        st.load_l2(l2_off).unwrap();
        let first = st.l2.get(l2_off).unwrap().data[0] & OFFSET_MASK;
        (l2_off, first, st.reftable[0])
    };
    let _ = l2_off;
    patch(&img, rt + (first / 65536) * 2, &[0, 0]);
    let disk = open(&opts(&img, false)).unwrap();
    let mut buf = vec![7u8; 4096];
    disk.read_at(&[VolatileSlice::from(&mut buf[..])], 0)
        .unwrap();
    let err = disk
        .write_at(&[VolatileSlice::from(&mut buf[..])], 0)
        .unwrap_err();
    assert!(err.to_string().contains("refcount 0"), "{err}");
    // Requests outside the disk are refused by the backend too.
    assert!(disk
        .read_at(&[VolatileSlice::from(&mut buf[..])], disk.size())
        .is_err());
    let _ = l2_off;
}

#[test]
fn backing_loops_and_deep_chains_refuse() {
    let d = dir();
    let a = p(&d, "a.qcow2");
    let b = p(&d, "b.qcow2");
    if qemu_ok(&["create", "-f", "qcow2", s(&a), "1M"]).is_none() {
        return;
    }
    qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
    ])
    .unwrap();
    // Point a back at b.
    qemu_ok(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]).unwrap();
    assert!(open_err(&b, true).contains("loops back"));
    let mut prev = p(&d, "c0.qcow2");
    qemu_ok(&["create", "-f", "qcow2", s(&prev), "1M"]).unwrap();
    for i in 1..=MAX_CHAIN + 1 {
        let next = p(&d, &format!("c{i}.qcow2"));
        let name = format!("c{}.qcow2", i - 1);
        qemu_ok(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            &name,
            "-F",
            "qcow2",
            s(&next),
        ])
        .unwrap();
        prev = next;
    }
    assert!(open_err(&prev, true).contains("longer than 16"));
}

#[test]
fn format_is_detected_and_a_forced_raw_is_allowed() {
    let d = dir();
    let Some(img) = fresh(&d, "f.qcow2", &[]) else {
        return;
    };
    assert_eq!(open(&opts(&img, true)).unwrap().format(), Format::Qcow2);
    let raw = open(&DiskOptions {
        format: Some(Format::Raw),
        ..opts(&img, true)
    })
    .unwrap();
    assert_eq!(raw.format(), Format::Raw);
    let src = p(&d, "h.raw");
    let err = open(&DiskOptions {
        format: Some(Format::Qcow2),
        ..opts(&src, true)
    })
    .unwrap_err();
    assert!(err.to_string().contains("not a qcow2 image"), "{err}");
}
