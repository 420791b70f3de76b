//! Helpers for the disk format tests: qemu-img as the reference, temp folders, deterministic
//! data, and random requests mirrored on raw bytes.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vm_memory::VolatileSlice;
use vmm_sys_util::tempdir::TempDir;

use super::{open, DiskBackend, DiskOptions};

pub const MIB: u64 = 1 << 20;

/// Runs qemu-img; `None` (and a SKIPPED line) when it is not installed.
pub fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("qemu-img").args(args).output() {
        Ok(o) => Some(o),
        Err(_) => {
            let test = std::thread::current().name().unwrap_or("?").to_string();
            crate::test_support::skipped(&test, "qemu-img not installed (apt install qemu-utils)");
            None
        }
    }
}

pub fn qemu_ok(args: &[&str]) -> Option<String> {
    let o = qemu_img(args)?;
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

pub fn dir() -> TempDir {
    TempDir::new_with_prefix("/var/tmp/ferrovm-qcow2-test").unwrap()
}

pub fn p(d: &TempDir, name: &str) -> PathBuf {
    d.as_path().join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Deterministic pseudo-random numbers (xorshift64*).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Raw bytes with some compressible runs, some noise and some zero ranges.
pub fn reference(len: u64, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = vec![0u8; len as usize];
    let mut off = 0usize;
    while off < v.len() {
        let n = (r.below(96 * 1024) as usize + 1).min(v.len() - off);
        match r.below(4) {
            0 => {}
            1 => v[off..off + n].fill(r.next() as u8),
            _ => v[off..off + n].iter_mut().for_each(|b| *b = r.next() as u8),
        }
        off += n;
    }
    v
}

pub fn opts(path: &Path, readonly: bool) -> DiskOptions {
    DiskOptions {
        path: path.to_path_buf(),
        readonly,
        direct: false,
        format: None,
    }
}

pub fn read_all(d: &dyn DiskBackend, chunk: usize) -> Vec<u8> {
    let mut out = vec![0u8; d.size() as usize];
    let mut off = 0usize;
    while off < out.len() {
        let n = chunk.min(out.len() - off);
        // Two segments, as a guest request has.
        let (a, b) = out[off..off + n].split_at_mut(n / 3 / 512 * 512);
        let bufs = [VolatileSlice::from(a), VolatileSlice::from(b)];
        d.read_at(&bufs, off as u64).unwrap();
        off += n;
    }
    out
}

pub fn write(d: &dyn DiskBackend, data: &mut [u8], off: u64) {
    d.write_at(&[VolatileSlice::from(data)], off).unwrap();
}

/// `qemu-img check` on `img`: no errors, no leaks.
pub fn check_clean(img: &Path) {
    if let Some(o) = qemu_img(&["check", s(img)]) {
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "qemu-img check {}: {out}{}",
            img.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("No errors were found"), "{out}");
    }
}

/// `qemu-img compare` of `img` with raw bytes `want` (callers check the sizes: qemu-img only warns).
pub fn compare(img: &Path, want: &[u8], d: &TempDir) {
    compare_as(img, None, want, d)
}

/// [`compare`] with the format of `img` given (qemu does not probe fixed VHDs).
pub fn compare_as(img: &Path, format: Option<&str>, want: &[u8], d: &TempDir) {
    let raw = p(d, "want.raw");
    std::fs::write(&raw, want).unwrap();
    let mut args = vec!["compare", "-F", "raw"];
    if let Some(f) = format {
        args.extend(["-f", f]);
    }
    args.extend([s(img), s(&raw)]);
    qemu_ok(&args);
}

/// Random writes, zeroes and discards, mirrored on raw bytes.
pub fn scribble(disk: &dyn DiskBackend, want: &mut [u8], seed: u64, ops: usize) {
    let mut r = Rng(seed);
    let size = want.len() as u64;
    for _ in 0..ops {
        let off = r.below(size / 512) * 512;
        let len = ((r.below(64) + 1) * 512 * if r.below(8) == 0 { 64 } else { 1 }).min(size - off);
        match r.below(10) {
            0 => {
                disk.write_zeroes(off, len, r.below(2) == 0).unwrap();
                want[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                disk.discard(off, len).unwrap();
                // A discard is a hint: mirror what the image now reads.
                let mut got = vec![0u8; len as usize];
                disk.read_at(&[VolatileSlice::from(&mut got[..])], off)
                    .unwrap();
                want[off as usize..(off + len) as usize].copy_from_slice(&got);
            }
            2 => disk.flush().unwrap(),
            _ => {
                let mut buf: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
                want[off as usize..(off + len) as usize].copy_from_slice(&buf);
                write(disk, &mut buf, off);
            }
        }
    }
}

/// Patches big-endian `bytes` into `img` at `off`.
pub fn patch(img: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

pub fn open_err(img: &Path, readonly: bool) -> String {
    match open(&opts(img, readonly)) {
        Ok(_) => panic!("{} opened", img.display()),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            msg
        }
    }
}
