//! QEMU's `isa-debugcon` at port 0x402: firmware (SeaBIOS, OVMF debug builds) writes its log
//! here one byte at a time. Reads return 0xe9, which is how SeaBIOS decides the port is there;
//! without `--firmware-log` ferrovm has no device at 0x402 and the firmware stays quiet (and
//! spends no exit per character). The log file stops growing at [`MAX_LOG`] bytes.

use std::io::Write;

use crate::bus::BusDeviceMut;

/// The port QEMU's PC puts the firmware debug console at.
pub const DEBUGCON_PORT: u16 = 0x402;
/// The readback value firmware probes for.
const READBACK: u8 = 0xe9;
/// Largest log written; the guest cannot fill the host's disk.
pub const MAX_LOG: u64 = 16 << 20;

/// The debug console, writing to `out`.
pub struct DebugCon {
    out: Box<dyn Write + Send>,
    written: u64,
}

impl DebugCon {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out, written: 0 }
    }
}

impl BusDeviceMut for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(READBACK);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if self.written >= MAX_LOG {
            return;
        }
        let n = data.len().min((MAX_LOG - self.written) as usize);
        self.written += n as u64;
        let _ = self.out.write_all(&data[..n]);
        if self.written == MAX_LOG {
            let _ = self.out.write_all(b"\n[ferrovm: firmware log truncated]\n");
        }
        // Unbuffered writer (a File): a crash loses nothing.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn logs_bytes_reads_e9_and_stops_at_the_cap() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut d = DebugCon::new(Box::new(Shared(buf.clone())));
        let mut b = [0u8; 1];
        d.read(0, &mut b);
        assert_eq!(b, [0xe9]);
        d.write(0, b"SeaBIOS");
        assert_eq!(&buf.lock().unwrap()[..], b"SeaBIOS");
        for _ in 0..(MAX_LOG / 4096 + 2) {
            d.write(0, &[b'x'; 4096]);
        }
        let len = buf.lock().unwrap().len() as u64;
        assert!(len < MAX_LOG + 64, "{len}");
    }
}
