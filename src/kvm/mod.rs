//! The only code that touches KVM file descriptors.
