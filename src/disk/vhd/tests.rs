//! VHD against qemu-img's "vpc": reads match `qemu-img convert -O raw`, writes match the same
//! writes applied to raw bytes (`qemu-img compare`), the fixed footer stays intact, and
//! hostile footers, headers and BATs fail cleanly.

use vm_memory::VolatileSlice;

use super::super::test_util::*;
use super::super::{open, DiskOptions, Format};

/// Makes a VHD of `subformat` from `data` with qemu-img; returns it and what qemu-img reads.
fn make(
    d: &vmm_sys_util::tempdir::TempDir,
    name: &str,
    subformat: &str,
    data: &[u8],
) -> Option<(std::path::PathBuf, Vec<u8>)> {
    let src = p(d, "src.raw");
    std::fs::write(&src, data).unwrap();
    let img = p(d, name);
    let o = format!("subformat={subformat}");
    qemu_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        &o,
        s(&src),
        s(&img),
    ])?;
    let back = p(d, "back.raw");
    qemu_ok(&["convert", "-f", "vpc", "-O", "raw", s(&img), s(&back)])?;
    Some((img, std::fs::read(&back).unwrap()))
}

#[test]
fn fixed_and_dynamic_read_and_write_like_qemu() {
    let d = dir();
    let data = reference(5 * MIB + 4096, 21);
    for sub in ["fixed", "dynamic"] {
        let Some((img, want0)) = make(&d, &format!("{sub}.vhd"), sub, &data) else {
            return;
        };
        let footer = {
            let f = std::fs::read(&img).unwrap();
            f[f.len() - 512..].to_vec()
        };
        let disk = open(&opts(&img, false)).unwrap();
        assert_eq!(disk.format(), Format::Vhd);
        assert_eq!(disk.size(), want0.len() as u64, "{sub}");
        assert!(read_all(disk.as_ref(), 300 * 1024) == want0, "{sub}");
        let mut want = want0.clone();
        scribble(disk.as_ref(), &mut want, 77, 300);
        assert!(read_all(disk.as_ref(), MIB as usize) == want, "{sub}");
        drop(disk);
        compare_as(&img, Some("vpc"), &want, &d);
        let f = std::fs::read(&img).unwrap();
        assert!(f[f.len() - 512..] == footer[..], "{sub}: footer changed");
    }
}

#[test]
fn empty_dynamic_image_allocates_blocks_on_write() {
    let d = dir();
    let img = p(&d, "e.vhd");
    if qemu_ok(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        s(&img),
        "64M",
    ])
    .is_none()
    {
        return;
    }
    let disk = open(&opts(&img, false)).unwrap();
    let mut want = vec![0u8; disk.size() as usize];
    let before = std::fs::metadata(&img).unwrap().len();
    scribble(disk.as_ref(), &mut want, 5, 200);
    drop(disk);
    assert!(std::fs::metadata(&img).unwrap().len() > before);
    compare_as(&img, Some("vpc"), &want, &d);
    // Opens again, and detects the format without being told.
    let disk = open(&opts(&img, true)).unwrap();
    assert!(read_all(disk.as_ref(), MIB as usize) == want);
}

#[test]
fn hostile_vhds_fail_cleanly() {
    let d = dir();
    let data = reference(4 * MIB, 3);
    let Some((img, _)) = make(&d, "h.vhd", "dynamic", &data) else {
        return;
    };
    let len = std::fs::metadata(&img).unwrap().len();
    // A footer byte changed: the checksum no longer matches (both copies).
    let bad = p(&d, "sum.vhd");
    std::fs::copy(&img, &bad).unwrap();
    patch(&bad, len - 512 + 40, &[0x7f]);
    patch(&bad, 40, &[0x7f]);
    assert!(
        open_err(&bad, true).contains("checksum"),
        "{}",
        open_err(&bad, true)
    );
    // A BAT entry beyond the file: that request fails, the process goes on.
    let bad = p(&d, "bat.vhd");
    std::fs::copy(&img, &bad).unwrap();
    let bat = {
        let f = std::fs::read(&bad).unwrap();
        u64::from_be_bytes(f[512 + 16..512 + 24].try_into().unwrap())
    };
    patch(&bad, bat, &0x7fff_0000u32.to_be_bytes());
    let disk = open(&DiskOptions {
        format: Some(Format::Vhd),
        ..opts(&bad, true)
    })
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let err = disk
        .read_at(&[VolatileSlice::from(&mut buf[..])], 0)
        .unwrap_err();
    assert!(err.to_string().contains("beyond the file"), "{err}");
    // Too many BAT entries for the file.
    let bad = p(&d, "entries.vhd");
    std::fs::copy(&img, &bad).unwrap();
    patch(&bad, 512 + 28, &0x00ff_ffffu32.to_be_bytes());
    assert!(open_err(&bad, true).contains("header checksum"));
}
