//! x86_64 specifics: guest-physical layout, boot protocol, CPU state.
pub mod boot;
pub mod cpu_features;
pub mod cpuid;
pub mod layout;
pub mod multiboot;
pub mod regs;
