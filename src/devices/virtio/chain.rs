//! Helpers for a descriptor chain's buffers once it has been walked and checked: the
//! device-readable and device-writable parts as lists of guest-memory slices, treated as one
//! byte stream each (virtio 1.x: a device must not assume where one descriptor ends).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryMmap, VolatileSlice};

/// Walks `chain` into `descs` (cleared first), at most `limit` descriptors. Returns false for
/// a chain that is not whole: longer than `limit`, or cut short by virtio-queue, which ends
/// the walk silently on a loop, a bad `next` index, an unreadable descriptor or a 4 GiB
/// overflow (the last descriptor then still says NEXT).
pub fn walk(
    chain: DescriptorChain<&GuestMemoryMmap>,
    limit: usize,
    descs: &mut Vec<Descriptor>,
) -> bool {
    descs.clear();
    for d in chain {
        if descs.len() == limit {
            return false;
        }
        descs.push(d);
    }
    descs.last().is_some_and(|d| !d.has_next())
}

/// The total length of `bufs` in bytes.
pub fn total(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Copies the first `out.len()` bytes of `bufs` into `out` and removes them from `bufs`.
/// None when `bufs` is shorter.
pub fn take_front(bufs: &mut Vec<VolatileSlice<'_>>, out: &mut [u8]) -> Option<()> {
    if total(bufs) < out.len() as u64 {
        return None;
    }
    let mut need = out.len();
    let mut filled = 0usize;
    let mut drop_n = 0usize;
    for b in bufs.iter_mut() {
        if need == 0 {
            break;
        }
        let n = b.len().min(need);
        b.subslice(0, n).ok()?.copy_to(&mut out[filled..filled + n]);
        filled += n;
        need -= n;
        if n == b.len() {
            drop_n += 1;
        } else {
            *b = b.offset(n).ok()?;
        }
    }
    bufs.drain(..drop_n);
    Some(())
}

/// Removes the last `n` bytes of `bufs`. None when `bufs` is shorter.
pub fn trim_back(bufs: &mut Vec<VolatileSlice<'_>>, mut n: usize) -> Option<()> {
    while n > 0 {
        let last = bufs.pop()?;
        if last.len() > n {
            bufs.push(last.subslice(0, last.len() - n).ok()?);
            n = 0;
        } else {
            n -= last.len();
        }
    }
    Some(())
}

/// The bytes `[offset, offset + len)` of `bufs`, as slices. None when `bufs` is shorter.
pub fn sub_range<'a>(
    bufs: &[VolatileSlice<'a>],
    mut offset: u64,
    mut len: u64,
) -> Option<Vec<VolatileSlice<'a>>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = b.len() as u64;
        if offset >= blen {
            offset -= blen;
            continue;
        }
        let n = (blen - offset).min(len);
        // Both bounds are within `b` by construction.
        out.push(b.subslice(offset as usize, n as usize).ok()?);
        len -= n;
        offset = 0;
    }
    (len == 0).then_some(out)
}

/// Copies `data` to the start of `bufs`, as far as they reach. Returns the bytes copied.
pub fn write_front(bufs: &[VolatileSlice<'_>], data: &[u8]) -> usize {
    let mut done = 0;
    for b in bufs {
        if done == data.len() {
            break;
        }
        let n = b.len().min(data.len() - done);
        if let Ok(s) = b.subslice(0, n) {
            s.copy_from(&data[done..done + n]);
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

    fn slices<'a>(mem: &'a GuestMemoryMmap, parts: &[(u64, usize)]) -> Vec<VolatileSlice<'a>> {
        parts
            .iter()
            .map(|&(a, l)| {
                let mut it = mem
                    .get_slices(GuestAddress(a), l, Permissions::Write)
                    .unwrap();
                it.next().unwrap().unwrap()
            })
            .collect()
    }

    #[test]
    fn byte_streams_across_descriptor_boundaries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        mem.write_slice(&[1, 2, 3, 4, 5, 6, 7], GuestAddress(0x100))
            .unwrap();
        let mut bufs = slices(&mem, &[(0x100, 3), (0x103, 4)]);
        assert_eq!(total(&bufs), 7);
        let mut head = [0u8; 5];
        take_front(&mut bufs, &mut head).unwrap();
        assert_eq!(head, [1, 2, 3, 4, 5]);
        assert_eq!(total(&bufs), 2);
        assert!(take_front(&mut bufs, &mut [0u8; 3]).is_none());

        let bufs = slices(&mem, &[(0x200, 2), (0x300, 3), (0x400, 4)]);
        let mid = sub_range(&bufs, 1, 6).unwrap();
        assert_eq!(total(&mid), 6);
        assert_eq!(write_front(&mid, &[9; 10]), 6);
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x400)).unwrap();
        assert_eq!(b, [9, 9, 0, 0]);
        assert!(sub_range(&bufs, 5, 5).is_none());
        assert!(sub_range(&bufs, 9, 0).unwrap().is_empty());

        let mut bufs = slices(&mem, &[(0x200, 2), (0x300, 3)]);
        trim_back(&mut bufs, 4).unwrap();
        assert_eq!(total(&bufs), 1);
        assert!(trim_back(&mut bufs, 2).is_none());
    }
}
