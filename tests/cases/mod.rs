//! Nested-tier case groups beyond the boot cases in nested.rs.
pub mod blk;
pub mod net;
