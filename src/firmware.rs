//! Tiny guest programs assembled at build time from firmware/*.S (see build.rs and
//! firmware/common.inc). They are 64-bit ELF files without a PVH note, so ferrovm enters them
//! in long mode like a bzImage: they exercise the real boot path in milliseconds.

include!(concat!(env!("OUT_DIR"), "/firmware.rs"));

/// The ELF bytes of firmware program `name`.
pub fn get(name: &str) -> Option<&'static [u8]> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}
