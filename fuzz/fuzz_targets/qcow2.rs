//! qcow2: header, extensions, L1/refcount table checks at open, then reads, writes,
//! write-zeroes, discard and flush through the L2 cache, compressed clusters and the
//! backing fall-through, and `check` (what `ferrovm img check` runs).
//! Input: a 33-byte op script, then the image file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferrovm_fuzz::diskfuzz::run(data, ferrovm::disk::Format::Qcow2, "image.qcow2");
});
