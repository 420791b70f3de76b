//! 16550A UART (COM1), a thin adapter around [`vm_superio::Serial`].
//!
//! vm-superio models the registers; this file connects it to an [`IrqLine`], to the
//! [`BusDevice`] interface and to a host writer that never makes the guest fail.

use std::io::{self, Write};

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::{Serial, Trigger};

use crate::bus::BusDeviceMut;
use crate::devices::IrqLine;

/// Number of I/O ports a UART decodes.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Lets vm-superio raise the UART's interrupt through an [`IrqLine`].
struct IrqTrigger(IrqLine);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The host side of the transmitter. Writing never fails: the guest must not notice a
/// closed pipe or a full disk. The first error is logged; a broken pipe mutes the output.
struct GuestOutput {
    out: Box<dyn Write + Send>,
    error_logged: bool,
    muted: bool,
}

impl GuestOutput {
    fn report(&mut self, err: io::Error) {
        if err.kind() == io::ErrorKind::BrokenPipe {
            self.muted = true;
        }
        if !self.error_logged {
            self.error_logged = true;
            log::warn!("serial: host output failed ({err}); further errors are ignored");
        }
    }
}

impl Write for GuestOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.muted {
            if let Err(e) = self.out.write_all(buf) {
                self.report(e);
            }
        }
        Ok(buf.len())
    }

    /// vm-superio flushes after every transmitted byte, so interactive output is immediate.
    fn flush(&mut self) -> io::Result<()> {
        if !self.muted {
            if let Err(e) = self.out.flush() {
                self.report(e);
            }
        }
        Ok(())
    }
}

/// A 16550A UART. Insert it on the port I/O bus with length [`SERIAL_PORT_LEN`].
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, GuestOutput>,
}

impl SerialDevice {
    /// A UART raising `irq` and transmitting to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        let out = GuestOutput {
            out,
            error_logged: false,
            muted: false,
        };
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues guest-bound bytes in the receive FIFO and raises the RX interrupt.
    ///
    /// Returns how many bytes were accepted (0 when the FIFO is full or the UART is in
    /// loopback mode); the caller retries the rest later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(SerialError::FullFifo) => 0,
            // The bytes are queued; only the interrupt was lost.
            Err(e) => {
                SERIAL_LOG.warn(|| format!("serial: failed to raise RX interrupt: {e}"));
                room
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

/// Failures the guest can repeat at will (interrupt delivery), rate-limited.
static SERIAL_LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new(5);

impl BusDeviceMut for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) if u64::from(off) < SERIAL_PORT_LEN => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (&[value], Ok(off)) = (data, u8::try_from(offset)) else {
            return;
        };
        if u64::from(off) >= SERIAL_PORT_LEN {
            return;
        }
        if let Err(e) = self.uart.write(off, value) {
            SERIAL_LOG.warn(|| format!("serial: register write failed: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the test can inspect.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn transmit_and_receive() {
        let irq = IrqLine::new().unwrap();
        let out = Shared::default();
        let mut dev = SerialDevice::new(irq.clone(), Box::new(out.clone()));
        for b in b"hi\r\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\r\n");

        dev.write(1, &[0x01]); // IER: RX data available
        let _ = irq.eventfd().read();
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        let mut b = [0u8];
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'b');
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 0);
    }

    #[test]
    fn fifo_capacity_is_respected() {
        let mut dev = SerialDevice::new(IrqLine::new().unwrap(), Box::new(io::sink()));
        let big = [b'x'; 100];
        let first = dev.enqueue_input(&big);
        assert!(first > 0 && first < big.len());
        assert_eq!(dev.enqueue_input(&big), 0);
        assert_eq!(dev.input_capacity(), 0);
        assert_eq!(dev.enqueue_input(&[]), 0);
    }

    #[test]
    fn bad_accesses_and_broken_output() {
        let mut dev = SerialDevice::new(IrqLine::new().unwrap(), Box::new(Broken));
        dev.write(0, b"x");
        dev.write(0, b"y");
        dev.write(0, &[1, 2]);
        dev.write(100, &[1]);
        let mut w = [0u8; 2];
        dev.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        let mut b = [0u8];
        dev.read(9, &mut b);
        assert_eq!(b[0], 0xff);
        dev.read(5, &mut b);
        assert_eq!(b[0] & 0x60, 0x60, "transmitter still reports empty");
    }
}
