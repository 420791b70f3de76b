//! The only code that touches KVM file descriptors.
pub mod interrupts;
pub mod selftest;
pub mod stats;
pub mod vcpu;
pub mod vm;
