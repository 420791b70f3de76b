//! x86_64 specifics: guest-physical layout, boot protocol, CPU state.
pub mod layout;
