//! A minimal i8042 PS/2 controller with nothing plugged in.
//!
//! It exists so that Linux's probe finishes quickly and so that the guest can reset the
//! machine through the controller's reset line. Insert it at port 0x60 with length 5:
//! offset 0 is the data port (0x60), offset 4 the command/status port (0x64).
//!
//! There is no keyboard or mouse and no interrupt line. Bytes written to the devices are
//! dropped. The AUX loopback command (0xD3) deliberately answers 0 instead of echoing:
//! Linux then skips its AUX IRQ delivery test, which would wait 250 ms for an interrupt
//! this controller cannot raise.

use crate::bus::BusDeviceMut;
use crate::devices::{StopRequest, VmControl};

/// Offset of the data port (0x60).
const DATA: u64 = 0;
/// Offset of the command/status port (0x64).
const COMMAND: u64 = 4;

/// Status register: output buffer full.
const STATUS_OBF: u8 = 0x01;
/// Status register: the output byte comes from the AUX (mouse) side.
const STATUS_AUX: u8 = 0x20;

/// Command byte bits toggled by the enable/disable commands.
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
/// Power-on command byte: keyboard interrupt, AUX disabled, scancode translation.
const DEFAULT_CTR: u8 = 0x61;
/// Output port bit 0 drives the CPU reset line (active low).
const OUTPUT_PORT_RESET: u8 = 0x01;
/// Power-on output port: reset line high, A20 enabled.
const DEFAULT_OUTPUT_PORT: u8 = 0x03;

/// A command that waits for its parameter on the data port.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pending {
    None,
    WriteCommandByte,
    WriteOutputPort,
    WriteKbdOutput,
    WriteAuxOutput,
    WriteToAux,
}

/// The PS/2 controller.
pub struct I8042 {
    vm: VmControl,
    command_byte: u8,
    output_port: u8,
    /// The byte waiting in the output buffer and whether it comes from the AUX side.
    output: Option<(u8, bool)>,
    pending: Pending,
}

impl I8042 {
    /// A controller that asks `vm` to reset when the guest pulses the reset line.
    pub fn new(vm: VmControl) -> Self {
        Self {
            vm,
            command_byte: DEFAULT_CTR,
            output_port: DEFAULT_OUTPUT_PORT,
            output: None,
            pending: Pending::None,
        }
    }

    fn reply(&mut self, byte: u8) {
        self.output = Some((byte, false));
    }

    fn status(&self) -> u8 {
        match self.output {
            Some((_, true)) => STATUS_OBF | STATUS_AUX,
            Some((_, false)) => STATUS_OBF,
            None => 0,
        }
    }

    fn command(&mut self, cmd: u8) {
        self.pending = Pending::None;
        match cmd {
            0x20 => self.reply(self.command_byte),
            0x60 => self.pending = Pending::WriteCommandByte,
            0xa7 => self.command_byte |= CTR_AUX_DISABLE,
            0xa8 => self.command_byte &= !CTR_AUX_DISABLE,
            0xa9 | 0xab => self.reply(0x00), // interface test: no error
            0xaa => self.reply(0x55),        // controller self-test passed
            0xad => self.command_byte |= CTR_KBD_DISABLE,
            0xae => self.command_byte &= !CTR_KBD_DISABLE,
            0xd0 => self.reply(self.output_port),
            0xd1 => self.pending = Pending::WriteOutputPort,
            0xd2 => self.pending = Pending::WriteKbdOutput,
            0xd3 => self.pending = Pending::WriteAuxOutput,
            0xd4 => self.pending = Pending::WriteToAux,
            // Pulse output lines; bit 0 clear pulses the reset line.
            0xf0..=0xff if cmd & 1 == 0 => self.reset("pulse command"),
            0xf0..=0xff => {}
            _ => log::debug!("i8042: ignoring command {cmd:#04x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteCommandByte => self.command_byte = value,
            Pending::WriteOutputPort => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET == 0 {
                    self.reset("output port write");
                }
            }
            Pending::WriteKbdOutput => self.reply(value),
            // See the module documentation: no echo, so Linux skips the AUX IRQ test.
            Pending::WriteAuxOutput => self.output = Some((0x00, true)),
            // No keyboard and no mouse: nothing answers.
            Pending::WriteToAux | Pending::None => {}
        }
    }

    fn reset(&self, why: &str) {
        log::debug!("i8042: reset requested ({why})");
        self.vm.request_stop(StopRequest::Reset);
    }
}

impl BusDeviceMut for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() != 1 {
            return;
        }
        match offset {
            DATA => data[0] = self.output.take().map_or(0, |(b, _)| b),
            COMMAND => data[0] = self.status(),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else {
            return;
        };
        match offset {
            DATA => self.data(value),
            COMMAND => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(dev: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        dev.read(off, &mut b);
        b[0]
    }

    fn command_with_reply(dev: &mut I8042, cmd: u8) -> u8 {
        dev.write(COMMAND, &[cmd]);
        assert_eq!(rd(dev, COMMAND) & STATUS_OBF, STATUS_OBF);
        let v = rd(dev, DATA);
        assert_eq!(rd(dev, COMMAND), 0);
        v
    }

    #[test]
    fn linux_probe_sequence() {
        let vm = VmControl::new().unwrap();
        let mut dev = I8042::new(vm.clone());
        assert_eq!(rd(&mut dev, COMMAND), 0);
        assert_eq!(command_with_reply(&mut dev, 0xaa), 0x55);
        assert_eq!(command_with_reply(&mut dev, 0xab), 0x00);
        assert_eq!(command_with_reply(&mut dev, 0xa9), 0x00);
        dev.write(COMMAND, &[0x60]);
        dev.write(DATA, &[0x47]);
        assert_eq!(command_with_reply(&mut dev, 0x20), 0x47);
        dev.write(COMMAND, &[0xa7]);
        assert_eq!(
            command_with_reply(&mut dev, 0x20) & CTR_AUX_DISABLE,
            CTR_AUX_DISABLE
        );
        dev.write(COMMAND, &[0xa8]);
        assert_eq!(command_with_reply(&mut dev, 0x20) & CTR_AUX_DISABLE, 0);
        dev.write(COMMAND, &[0xd3]);
        dev.write(DATA, &[0x5a]);
        assert_eq!(rd(&mut dev, COMMAND), STATUS_OBF | STATUS_AUX);
        assert_ne!(rd(&mut dev, DATA), 0x5a);
        // Keyboard bytes go nowhere.
        dev.write(DATA, &[0xf2]);
        assert_eq!(rd(&mut dev, COMMAND), 0);
        assert_eq!(rd(&mut dev, 2), 0xff);
        assert!(!vm.is_stopping());
    }

    #[test]
    fn reset_line() {
        let vm = VmControl::new().unwrap();
        let mut dev = I8042::new(vm.clone());
        dev.write(COMMAND, &[0xd1]);
        dev.write(DATA, &[0x03]);
        assert!(!vm.is_stopping());
        dev.write(COMMAND, &[0xfe]);
        assert_eq!(vm.request(), Some(StopRequest::Reset));

        let vm = VmControl::new().unwrap();
        let mut dev = I8042::new(vm.clone());
        dev.write(COMMAND, &[0xd1]);
        dev.write(DATA, &[0x02]);
        assert_eq!(vm.request(), Some(StopRequest::Reset));
    }
}
