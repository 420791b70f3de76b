//! Guest RAM: private anonymous memory, or memfd-backed shared memory when another process
//! (a vhost-user backend such as virtiofsd) must map it too.
//!
//! Every region is mapped at a 2 MiB-aligned host address, so that guest-physical and host
//! virtual addresses agree modulo 2 MiB: only then can KVM back the guest with 2 MiB pages in
//! its nested page tables (the guest base addresses are 2 MiB-aligned by the layout). Kernels
//! before 6.7 place large anonymous mappings at any 4 KiB boundary, so the alignment is done
//! here: a reservation 2 MiB larger than the region, the region mapped over it with
//! MAP_FIXED, the slack unmapped.
//!
//! Backing, per [`RamBacking`]:
//! - transparent huge pages (default): `madvise(MADV_HUGEPAGE)`, effective when the host's
//!   `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise` (for shared RAM:
//!   `shmem_enabled`); `thp=off` is `MADV_NOHUGEPAGE` (4 KiB pages even when the host's
//!   setting is `always`);
//! - `hugepages=on`: hugetlbfs pages (MAP_HUGETLB / MFD_HUGETLB) from the host's pool, which
//!   must hold enough 2 MiB pages (`/proc/sys/vm/nr_hugepages`): checked at start, not at the
//!   guest's first touch.
//!
//! Ordinary RAM is mapped with MAP_NORESERVE: only what the guest touches is backed. Shared
//! RAM is one memfd per region (sealed against shrinking, so the backend can never see it
//! truncated), mapped MAP_SHARED; the backend gets the fds with SET_MEM_TABLE.
//!
//! The mappings belong to [`RamMappings`], which unmaps each one when the last
//! `GuestMemoryMmap` referring to it is gone (several VMs can live in one process).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::null_mut;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The alignment of every guest RAM mapping (the x86 large page).
pub const RAM_ALIGN: usize = 2 << 20;

/// How guest RAM is backed (`--memory SIZE[,thp=on|off][,hugepages=on|off]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamBacking {
    /// Share the RAM with another process (memfd, MAP_SHARED).
    pub shared: bool,
    /// Ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`).
    pub thp: bool,
    /// Back the RAM with hugetlbfs pages.
    pub hugetlb: bool,
}

impl Default for RamBacking {
    fn default() -> Self {
        Self {
            shared: false,
            thp: true,
            hugetlb: false,
        }
    }
}

/// Why guest RAM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM")]
    Map {
        size: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot map {size} bytes of guest RAM from hugetlbfs pages: the host's pool (/proc/sys/vm/nr_hugepages) has too few free 2 MiB pages")]
    HugePages {
        size: usize,
        #[source]
        source: io::Error,
    },
    #[error("guest RAM region of {0} bytes is not a multiple of 2 MiB, as hugepages=on needs")]
    HugeSize(usize),
    #[error("cannot describe guest RAM to the memory manager")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest RAM region at {0:#x} ends beyond the address space")]
    Overflow(u64),
    #[error("guest RAM regions are invalid")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot create a {len}-byte shared memory file for guest RAM (memfd)")]
    Memfd {
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// Creates a memfd of `len` bytes that can grow but never shrink.
fn memfd(len: usize, hugetlb: bool) -> io::Result<File> {
    let name = c"ferrovm-guest-ram";
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugetlb {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid memfd_create flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
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

/// Owns the guest RAM mappings: each is unmapped once no `GuestMemoryMmap` uses it.
pub struct RamMappings(Vec<Arc<MmapRegion>>);

impl Drop for RamMappings {
    fn drop(&mut self) {
        for region in self.0.drain(..) {
            // Only this clone left: nothing can reach the memory any more. Otherwise a
            // thread still holds guest memory; leaving the mapping is the safe choice.
            if Arc::strong_count(&region) != 1 {
                log::debug!("guest RAM still in use at teardown: left mapped");
                continue;
            }
            // SAFETY: `map_aligned` mapped exactly this range, and no other reference to it
            // exists (the last Arc is ours), so nothing can access it after this call.
            unsafe { libc::munmap(region.as_ptr().cast(), region.size()) };
        }
    }
}

/// Maps `len` bytes (of `file`, or anonymous) at a RAM_ALIGN-aligned address.
fn map_aligned(len: usize, file: Option<&File>, backing: RamBacking) -> io::Result<(*mut u8, i32)> {
    let mut flags = match file {
        Some(_) => libc::MAP_SHARED,
        None => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
    };
    if backing.hugetlb {
        // No MAP_NORESERVE: the pool is checked now, not with a SIGBUS at the guest's touch.
        if file.is_none() {
            flags |= libc::MAP_HUGETLB;
        }
    } else {
        flags |= libc::MAP_NORESERVE;
    }
    let reserve = len
        .checked_add(RAM_ALIGN)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new PROT_NONE reservation at an address of the kernel's choice; it touches no
    // existing mapping.
    let base = unsafe {
        libc::mmap(
            null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = (base as usize).next_multiple_of(RAM_ALIGN);
    let fd = file.map_or(-1, |f| f.as_raw_fd());
    // SAFETY: [start, start + len) lies inside the reservation just made, which nothing else
    // uses, so MAP_FIXED replaces only that.
    let addr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: the slack before and after the region belongs to the reservation made above.
    unsafe {
        let head = start - base as usize;
        if head > 0 {
            libc::munmap(base, head);
        }
        let tail = reserve - head - len;
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    if addr == libc::MAP_FAILED {
        // SAFETY: the region's part of the reservation is still ours to release.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
        return Err(err);
    }
    if !backing.hugetlb {
        let advice = match backing.thp {
            true => libc::MADV_HUGEPAGE,
            false => libc::MADV_NOHUGEPAGE,
        };
        // SAFETY: advice on the mapping just made; it changes no contents. A host without THP
        // answers EINVAL, which only means no huge pages.
        unsafe { libc::madvise(addr, len, advice) };
    }
    Ok((addr.cast(), flags))
}

/// Maps one region; `Err` names what failed.
fn region(len: usize, backing: RamBacking) -> Result<Arc<MmapRegion>, MemoryError> {
    if backing.hugetlb && len % RAM_ALIGN != 0 {
        return Err(MemoryError::HugeSize(len));
    }
    let file = match backing.shared {
        true => {
            Some(memfd(len, backing.hugetlb).map_err(|source| MemoryError::Memfd { len, source })?)
        }
        false => None,
    };
    let (addr, flags) =
        map_aligned(len, file.as_ref(), backing).map_err(|source| match backing.hugetlb {
            true => MemoryError::HugePages { size: len, source },
            false => MemoryError::Map { size: len, source },
        })?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: `addr` starts a live mapping of exactly `len` bytes with these prot and flags,
    // owned from now on by the RamMappings that keeps this region.
    let mut builder =
        unsafe { vm_memory::mmap::MmapRegionBuilder::new(len).with_raw_mmap_pointer(addr) }
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .with_hugetlbfs(backing.hugetlb);
    if let Some(f) = file {
        builder = builder.with_file_offset(FileOffset::new(f, 0));
    }
    builder.build().map(Arc::new).map_err(|e| {
        // SAFETY: the mapping was made above and nothing refers to it yet.
        unsafe { libc::munmap(addr.cast(), len) };
        MemoryError::Region(e)
    })
}

/// Maps guest RAM over `ranges` (start, length) as `backing` says.
pub fn guest_ram(
    ranges: &[(GuestAddress, usize)],
    backing: RamBacking,
) -> Result<(RamMappings, GuestMemoryMmap), MemoryError> {
    let mut owned = RamMappings(Vec::with_capacity(ranges.len()));
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let mapping = region(len, backing)?;
        owned.0.push(mapping.clone());
        let r = GuestRegionMmap::with_arc(mapping, start).ok_or(MemoryError::Overflow(start.0))?;
        regions.push(Arc::new(r));
    }
    let mem = GuestMemoryMmap::from_arc_regions(regions).map_err(MemoryError::Regions)?;
    Ok((owned, mem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    fn host_addr(mem: &GuestMemoryMmap, at: u64) -> usize {
        mem.get_host_address(GuestAddress(at)).unwrap() as usize
    }

    #[test]
    fn shared_ram_is_backed_by_a_file_others_can_map() {
        let ranges = [(GuestAddress(0), 2 << 20), (GuestAddress(4 << 20), 2 << 20)];
        let shared = RamBacking {
            shared: true,
            ..Default::default()
        };
        let (_owner, mem) = guest_ram(&ranges, shared).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        let r = mem.find_region(GuestAddress(0)).unwrap();
        let f = r.file_offset().expect("shared RAM has a file").file();
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut word, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0x1234_5678);
        // Sealed: nobody can shrink it under the guest.
        assert!(f.set_len(0).is_err());
        let (_owner, private) = guest_ram(&ranges, RamBacking::default()).unwrap();
        assert!(private
            .find_region(GuestAddress(0))
            .unwrap()
            .file_offset()
            .is_none());
    }

    #[test]
    fn every_region_is_2mib_aligned_and_unmapped_when_unused() {
        let ranges = [
            (GuestAddress(0), 3 << 20),
            (GuestAddress(1 << 32), (6 << 20) + 4096),
        ];
        for shared in [false, true] {
            let backing = RamBacking {
                shared,
                ..Default::default()
            };
            let (owner, mem) = guest_ram(&ranges, backing).unwrap();
            let low = host_addr(&mem, 0);
            let high = host_addr(&mem, 1 << 32);
            assert_eq!(low % RAM_ALIGN, 0, "shared={shared}");
            assert_eq!(high % RAM_ALIGN, 0, "shared={shared}");
            mem.write_obj(7u64, GuestAddress((6 << 20) + (1 << 32)))
                .unwrap();
            let clone = mem.clone();
            drop(mem);
            // A clone still uses the memory: teardown must leave it mapped.
            drop(owner);
            assert_eq!(
                clone
                    .read_obj::<u64>(GuestAddress((6 << 20) + (1 << 32)))
                    .unwrap(),
                7
            );
            drop(clone);
            let (owner, mem) = guest_ram(&ranges, backing).unwrap();
            let low = host_addr(&mem, 0);
            drop(mem);
            drop(owner);
            // Unmapped: this process no longer maps exactly that range (another test's
            // mapping may take the address, but not with the same bounds by chance).
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let range = format!("{low:x}-{:x} ", low + (3 << 20));
            let gone = !maps.lines().any(|l| l.starts_with(&range));
            assert!(gone, "guest RAM at {low:#x} still mapped (shared={shared})");
        }
    }

    #[test]
    fn hugetlb_needs_whole_2mib_pages() {
        let backing = RamBacking {
            hugetlb: true,
            ..Default::default()
        };
        let ranges = [(GuestAddress(0), (2 << 20) + 4096)];
        let err = guest_ram(&ranges, backing).err().unwrap();
        assert!(err.to_string().contains("multiple of 2 MiB"), "{err}");
    }
}
