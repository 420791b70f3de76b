//! Guest RAM: private anonymous memory, or memfd-backed shared memory when another process
//! (a vhost-user backend such as virtiofsd) must map it too.
//!
//! Both are mapped with MAP_NORESERVE: only what the guest touches is backed. Shared RAM is one
//! memfd per region (sealed against shrinking, so the backend can never see it truncated),
//! mapped MAP_SHARED; the backend gets the fds with SET_MEM_TABLE.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Why guest RAM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot create a {len}-byte shared memory file for guest RAM (memfd)")]
    Memfd {
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// Creates a memfd of `len` bytes that can grow but never shrink.
fn memfd(len: usize) -> io::Result<File> {
    let name = c"ferrovm-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid memfd_create flags.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    // SAFETY: F_ADD_SEALS on an fd we own, with valid seal flags.
    if unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Maps guest RAM over `ranges` (start, length); `shared` = memfd-backed MAP_SHARED.
pub fn guest_ram(
    ranges: &[(GuestAddress, usize)],
    total: u64,
    shared: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let map_err = |source| MemoryError::Map {
        size: total,
        source,
    };
    if !shared {
        return GuestMemoryMmap::<()>::from_ranges(ranges).map_err(map_err);
    }
    let mut with_files = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let file = memfd(len).map_err(|source| MemoryError::Memfd { len, source })?;
        with_files.push((start, len, Some(FileOffset::new(file, 0))));
    }
    GuestMemoryMmap::<()>::from_ranges_with_files(with_files).map_err(map_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn shared_ram_is_backed_by_a_file_others_can_map() {
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)];
        let mem = guest_ram(&ranges, 3 << 20, true).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        let r = mem.find_region(GuestAddress(0)).unwrap();
        let f = r.file_offset().expect("shared RAM has a file").file();
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut word, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0x1234_5678);
        // Sealed: nobody can shrink it under the guest.
        assert!(f.set_len(0).is_err());
        let private = guest_ram(&ranges, 3 << 20, false).unwrap();
        assert!(private
            .find_region(GuestAddress(0))
            .unwrap()
            .file_offset()
            .is_none());
    }
}
