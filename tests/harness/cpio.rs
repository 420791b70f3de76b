//! Minimal writer for the "newc" (SVR4, no CRC) cpio format the Linux
//! initramfs unpacker understands. Files are streamed, not buffered.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    pos: u64,
}

const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl CpioWriter<BufWriter<File>> {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self::new(BufWriter::with_capacity(
            1 << 20,
            File::create(path)?,
        )))
    }
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1000,
            pos: 0,
        }
    }

    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = ((4 - (self.pos % 4)) % 4) as usize;
        self.put(&[0u8; 3][..pad])
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        assert!(!name.is_empty() || mode == 0, "empty cpio name");
        if size > u32::MAX as u64 {
            return Err(io::Error::other(format!(
                "{name}: too big for cpio newc ({size} bytes)"
            )));
        }
        self.ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let hdr =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name.len() + 1, 0
        );
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, S_IFDIR | 0o755, 0, (0, 0))
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, S_IFCHR | perm, 0, (major, minor))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, S_IFLNK | 0o777, target.len() as u64, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad4()
    }

    pub fn bytes(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, S_IFREG | perm, data.len() as u64, (0, 0))?;
        self.put(data)?;
        self.pad4()
    }

    /// Copies a host file (following symlinks) into the archive.
    pub fn file(&mut self, name: &str, perm: u32, src: &Path) -> io::Result<()> {
        let mut f = File::open(src)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        let size = f.metadata()?.len();
        self.header(name, S_IFREG | perm, size, (0, 0))?;
        let n = io::copy(&mut f, &mut self.out)?;
        if n != size {
            return Err(io::Error::other(format!(
                "{}: size changed while copying",
                src.display()
            )));
        }
        self.pos += n;
        self.pad4()
    }

    /// Writes the trailer and flushes; the archive is padded to 512 bytes.
    pub fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.header_trailer()?;
        let pad = ((512 - (self.pos % 512)) % 512) as usize;
        self.put(&vec![0u8; pad])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header_trailer(&mut self) -> io::Result<()> {
        let name = "TRAILER!!!";
        let hdr =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, name.len() + 1, 0
        );
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()
    }
}
