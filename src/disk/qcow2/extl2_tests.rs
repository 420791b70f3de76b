//! qcow2 images with extended L2 entries (subclusters), made by `qemu-img create` and filled
//! by `qemu-io`: ferrovm reads the same bytes as `qemu-img convert -O raw`, through backing
//! chains too; a writable open refuses in one line; hostile bitmaps fail the request.

use std::path::{Path, PathBuf};
use std::process::Command;

use vm_memory::VolatileSlice;
use vmm_sys_util::tempdir::TempDir;

use super::super::test_util::*;
use super::super::{open, DiskBackend};
use super::OFFSET_MASK;

/// Runs `qemu-io -f FORMAT -c CMD... IMG`; `None` when qemu-io is not installed.
fn qemu_io(img: &Path, format: &str, cmds: &[&str]) -> Option<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = match c.arg(img).output() {
        Ok(o) => o,
        Err(_) => {
            let test = std::thread::current().name().unwrap_or("?").to_string();
            crate::test_support::skipped(&test, "qemu-io not installed (apt install qemu-utils)");
            return None;
        }
    };
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.is_empty(),
        "qemu-io {cmds:?}: {err}"
    );
    Some(())
}

/// What qemu-img reads from `img` (as raw bytes).
fn qemu_reads(d: &TempDir, img: &Path) -> Vec<u8> {
    let raw = p(d, "qemu-reads.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_ok(&["convert", "-O", "raw", s(img), s(&raw)]).unwrap();
    std::fs::read(raw).unwrap()
}

/// Creates an extended-L2 image with `cluster_size` over `backing` (a name relative to the
/// image's folder, and its format), or of `size` without one.
fn create(d: &TempDir, name: &str, cs: &str, backing: Option<(&str, &str)>) -> Option<PathBuf> {
    let img = p(d, name);
    let _ = std::fs::remove_file(&img);
    let o = format!("extended_l2=on,cluster_size={cs}");
    let mut args = vec!["create", "-f", "qcow2", "-o", &o];
    if let Some((b, f)) = backing {
        args.extend(["-b", b, "-F", f]);
    }
    args.push(s(&img));
    if backing.is_none() {
        args.push("4M");
    }
    qemu_ok(&args)?;
    Some(img)
}

/// Writes that leave allocated, zero and unallocated subclusters side by side, partial
/// subclusters (copy-on-write from the backing file inside QEMU) and whole clusters.
const WRITES: [&str; 9] = [
    "write -P 0xab 4k 4k",
    "write -P 0xcd 61k 9k",
    "write -z 200k 16k",
    "write -P 0x11 1M 64k",
    "write -P 0x22 1100k 512",
    "write -z 1101k 1k",
    "write -P 0x33 2047k 3k",
    "discard 1M 4k",
    "write -P 0x44 3583k 1k",
];

fn assert_reads_like_qemu(d: &TempDir, img: &Path, what: &str) {
    let want = qemu_reads(d, img);
    let disk = open(&opts(img, true)).unwrap();
    assert_eq!(disk.size(), want.len() as u64, "{what}");
    for chunk in [512 * 3, 96 * 1024 + 512, MIB as usize] {
        assert!(
            read_all(disk.as_ref(), chunk) == want,
            "{what}: chunk {chunk} differs from qemu-img"
        );
    }
    let report = disk.as_qcow2().unwrap().check().unwrap();
    assert_eq!(report.summary(), "none", "{what}");
}

#[test]
fn extended_l2_reads_match_qemu_img_for_every_cluster_size() {
    let d = dir();
    for cs in ["16k", "64k", "2M"] {
        let Some(img) = create(&d, &format!("e{cs}.qcow2"), cs, None) else {
            return;
        };
        if qemu_io(&img, "qcow2", &WRITES).is_none() {
            return;
        }
        assert!(open(&opts(&img, true))
            .unwrap()
            .as_qcow2()
            .unwrap()
            .header()
            .extended_l2());
        assert_reads_like_qemu(&d, &img, &format!("cluster {cs}"));
    }
    // Compressed clusters have no subclusters.
    let src = p(&d, "src.raw");
    std::fs::write(&src, reference(3 * MIB, 5)).unwrap();
    let img = p(&d, "c.qcow2");
    let o = "extended_l2=on,cluster_size=32k";
    qemu_ok(&["convert", "-c", "-O", "qcow2", "-o", o, s(&src), s(&img)]).unwrap();
    qemu_io(&img, "qcow2", &WRITES[..3]).unwrap();
    assert_reads_like_qemu(&d, &img, "compressed");
}

#[test]
fn extended_l2_backing_chain_falls_through_unallocated_subclusters() {
    let d = dir();
    std::fs::write(p(&d, "base.raw"), reference(4 * MIB, 9)).unwrap();
    let Some(mid) = create(&d, "mid.qcow2", "64k", Some(("base.raw", "raw"))) else {
        return;
    };
    if qemu_io(&mid, "qcow2", &WRITES).is_none() {
        return;
    }
    assert_reads_like_qemu(&d, &mid, "ext-L2 over raw");
    // The top: other subclusters of the same clusters, and zeros over backing data.
    let top = create(&d, "top.qcow2", "64k", Some(("mid.qcow2", "qcow2"))).unwrap();
    let writes = [
        "write -P 0x55 0 2k",
        "write -P 0x66 6k 1k",
        "write -z 64k 2k",
        "write -P 0x77 1030k 6k",
        "write -z 2M 128k",
    ];
    qemu_io(&top, "qcow2", &writes).unwrap();
    assert_reads_like_qemu(&d, &top, "ext-L2 over ext-L2 over raw");
    let info = super::super::info::describe(&top, None).unwrap();
    let on = "extended L2: on (32 subclusters of 2048 bytes";
    assert!(
        info.matches(on).count() == 2 && info.contains("backing image 2:"),
        "{info}"
    );
    // A standard qcow2 over the extended one reads through it too.
    let std_top = p(&d, "std.qcow2");
    let args = ["create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2"];
    qemu_ok(&[&args[..], &[s(&std_top)]].concat()).unwrap();
    qemu_io(&std_top, "qcow2", &["write -P 0x88 5k 1k"]).unwrap();
    assert_reads_like_qemu(&d, &std_top, "qcow2 over the chain");
}

#[test]
fn extended_l2_is_read_only_and_serves_throwaway_overlays() {
    let d = dir();
    let Some(img) = create(&d, "ro.qcow2", "64k", None) else {
        return;
    };
    if qemu_io(&img, "qcow2", &WRITES).is_none() {
        return;
    }
    let msg = open_err(&img, false);
    assert!(
        msg.contains("extended L2 entries") && msg.contains("readonly=on"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "not one line: {msg}");
    let want = qemu_reads(&d, &img);
    let before = std::fs::read(&img).unwrap();
    {
        let t = super::super::overlay::open_throwaway(&opts(&img, false)).unwrap();
        assert!(read_all(t.as_ref(), 256 * 1024) == want);
        let mut x = vec![9u8; 3584];
        write(t.as_ref(), &mut x, 4096 + 512);
        let mut got = vec![0u8; 4096];
        t.read_at(&[VolatileSlice::from(&mut got[..])], 4096)
            .unwrap();
        assert!(got[..512] == want[4096..4608] && got[512..] == x[..]);
    }
    assert!(std::fs::read(&img).unwrap() == before, "the base changed");
}

/// The host offset of the L2 table mapping guest cluster 0.
fn first_l2(img: &Path) -> u64 {
    let disk = open(&opts(img, true)).unwrap();
    let st = disk.as_qcow2().unwrap().lock().unwrap();
    st.l1[0] & OFFSET_MASK
}

fn read_err(disk: &dyn DiskBackend, off: u64) -> String {
    let mut buf = vec![0u8; 4096];
    match disk.read_at(&[VolatileSlice::from(&mut buf[..])], off) {
        Ok(()) => panic!("read at {off} worked"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_subcluster_bitmaps_fail_the_request() {
    let d = dir();
    let Some(base) = create(&d, "h.qcow2", "64k", None) else {
        return;
    };
    if qemu_io(
        &base,
        "qcow2",
        &["write -P 0xab 4k 4k", "write -P 1 64k 4k"],
    )
    .is_none()
    {
        return;
    }
    let l2 = first_l2(&base);
    let desc = u64::from_be_bytes(
        std::fs::read(&base).unwrap()[l2 as usize..][..8]
            .try_into()
            .unwrap(),
    );
    let cases: [(&str, u64, u64, &str); 4] = [
        (
            "both",
            l2 + 8,
            0x0000_000c_0000_000c,
            "both allocated and zero",
        ),
        ("no-host", l2, 0, "no host cluster"),
        ("zero-flag", l2, desc | 1, "zero flag"),
        ("compressed", l2, desc | 1 << 62, "compressed cluster with"),
    ];
    for (name, at, v, want) in cases {
        let img = p(&d, &format!("{name}.qcow2"));
        std::fs::copy(&base, &img).unwrap();
        patch(&img, at, &v.to_be_bytes());
        let disk = open(&opts(&img, true)).unwrap();
        let msg = read_err(disk.as_ref(), 0);
        assert!(msg.contains(want) && msg.contains(s(&img)), "{name}: {msg}");
        // The next cluster still reads.
        let mut buf = vec![0u8; 4096];
        disk.read_at(&[VolatileSlice::from(&mut buf[..])], 65536)
            .unwrap();
        assert!(buf.iter().all(|b| *b == 1), "{name}");
    }
    // Subclusters smaller than 512 bytes.
    let img = p(&d, "small.qcow2");
    std::fs::copy(&base, &img).unwrap();
    patch(&img, 20, &13u32.to_be_bytes());
    let msg = open_err(&img, true);
    assert!(
        msg.contains("extended L2 entries with cluster_bits 13"),
        "{msg}"
    );
}
