//! A read-only disk whose contents live in memory (the cloud-init seed).

use std::io;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

use super::io::{scatter, total_len};
use super::{DiskBackend, Format, SECTOR_SIZE};

/// Bytes served read-only; the length is rounded up to whole sectors with zeros.
#[derive(Debug)]
pub struct MemDisk {
    name: PathBuf,
    data: Vec<u8>,
}

impl MemDisk {
    /// `name` is what messages call the disk.
    pub fn new(name: &str, mut data: Vec<u8>) -> MemDisk {
        data.resize(
            (data.len() as u64).div_ceil(SECTOR_SIZE) as usize * SECTOR_SIZE as usize,
            0,
        );
        MemDisk {
            name: PathBuf::from(name),
            data,
        }
    }

    fn refuse(&self) -> io::Result<()> {
        Err(super::io::eio(format!(
            "{} is read-only",
            self.name.display()
        )))
    }
}

impl DiskBackend for MemDisk {
    fn path(&self) -> &Path {
        &self.name
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn readonly(&self) -> bool {
        true
    }

    fn read_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let n = total_len(bufs) as u64;
        if !super::in_range(offset, n, self.size()) {
            return Err(super::out_of_range(&self.name, offset, n));
        }
        scatter(bufs, 0, &self.data[offset as usize..(offset + n) as usize]);
        Ok(())
    }

    fn write_at(&self, _bufs: &[VolatileSlice<'_>], _offset: u64) -> io::Result<()> {
        self.refuse()
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.refuse()
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        self.refuse()
    }
}
