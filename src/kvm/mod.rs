//! The only code that touches KVM file descriptors.
pub mod selftest;
pub mod vcpu;
pub mod vm;
