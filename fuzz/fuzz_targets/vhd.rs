//! VHD (fixed and dynamic): footer and its copy, dynamic header, BAT, sector bitmaps; then
//! reads, writes (block allocation), write-zeroes, discard and flush.
//! Input: a 33-byte op script, then the image file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferrovm_fuzz::diskfuzz::run(data, ferrovm::disk::Format::Vhd, "image.vhd");
});
