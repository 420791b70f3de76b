//! QEMU-compatible `isa-debug-exit` at port 0xf4: test kernels write a value to end the run.
//!
//! A write of `V` (1, 2 or 4 bytes, little-endian) asks for [`StopRequest::DebugExit`]`(V)`;
//! ferrovm then exits with status `(V << 1) | 1`, as QEMU does. Reads return all-ones.
//! Insert at port [`DEBUG_EXIT_PORT`] with length [`DEBUG_EXIT_LEN`].

use crate::bus::BusDeviceMut;
use crate::devices::{StopRequest, VmControl};

/// QEMU's default `iobase`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Bytes decoded (enough for a 32-bit `out`).
pub const DEBUG_EXIT_LEN: u64 = 4;

/// The debug-exit device.
pub struct DebugExit {
    vm: VmControl,
}

impl DebugExit {
    /// A device that stops `vm` when written.
    pub fn new(vm: VmControl) -> Self {
        Self { vm }
    }
}

impl BusDeviceMut for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // Little-endian value of the first (up to) 4 bytes.
        let value = data
            .iter()
            .take(4)
            .rev()
            .fold(0u32, |acc, &b| acc << 8 | u32::from(b));
        log::info!("debug-exit: guest wrote {value:#x}");
        self.vm.request_stop(StopRequest::DebugExit(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_value(data: &[u8]) -> Option<StopRequest> {
        let vm = VmControl::new().unwrap();
        DebugExit::new(vm.clone()).write(0, data);
        vm.request()
    }

    #[test]
    fn values_of_each_size() {
        assert_eq!(exit_value(&[0x10]), Some(StopRequest::DebugExit(0x10)));
        assert_eq!(
            exit_value(&[0x34, 0x12]),
            Some(StopRequest::DebugExit(0x1234))
        );
        assert_eq!(
            exit_value(&[0x78, 0x56, 0x34, 0x12]),
            Some(StopRequest::DebugExit(0x1234_5678))
        );
        let mut d = [0u8; 2];
        DebugExit::new(VmControl::new().unwrap()).read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }
}
