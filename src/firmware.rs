//! Tiny guest programs assembled at build time from firmware/*.S (see build.rs).
