//! A minimal i8042 PS/2 controller, with a keyboard plugged in for firmware boots.
//!
//! It exists so that Linux's probe finishes quickly and so that the guest can reset the
//! machine through the controller's reset line. Insert it at port 0x60 with length 5:
//! offset 0 is the data port (0x60), offset 4 the command/status port (0x64).
//!
//! A direct kernel boot has nothing plugged in and no interrupt line: bytes written to the
//! devices are dropped. A firmware boot ([`I8042::with_keyboard`]) has a keyboard that
//! answers the commands firmware and Linux's atkbd send (reset and self-test, identify,
//! LEDs, typematic rate, scancode set, enable/disable scanning) and never has a key to send
//! (the console is the serial port); IRQ 1 is raised whenever a byte reaches the output
//! buffer with the keyboard interrupt enabled in the command byte. There is never a mouse.
//! The AUX loopback command (0xD3) deliberately answers 0 instead of echoing: Linux then
//! skips its AUX IRQ delivery test, which would wait 250 ms for an interrupt that never
//! comes.

use std::collections::VecDeque;

use crate::bus::BusDeviceMut;
use crate::devices::{IrqLine, StopRequest, VmControl};

/// Offset of the data port (0x60).
const DATA: u64 = 0;
/// Offset of the command/status port (0x64).
const COMMAND: u64 = 4;

/// Status register: output buffer full.
const STATUS_OBF: u8 = 0x01;
/// Status register: the output byte comes from the AUX (mouse) side.
const STATUS_AUX: u8 = 0x20;

/// Command byte: keyboard interrupt enable.
const CTR_KBD_INT: u8 = 0x01;
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

/// Keyboard command replies.
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
/// Most bytes queued from the keyboard (a reply is at most 3).
const KBD_QUEUE_MAX: usize = 16;

/// The keyboard and its interrupt line.
struct Keyboard {
    irq: IrqLine,
    /// A command that waits for its parameter byte (0xed LEDs, 0xf0 scancode set, 0xf3 rate).
    pending: Option<u8>,
    scancode_set: u8,
}

/// The PS/2 controller.
pub struct I8042 {
    vm: VmControl,
    command_byte: u8,
    output_port: u8,
    /// Bytes for the output buffer and whether they come from the AUX side; the first is in
    /// the buffer now.
    output: VecDeque<(u8, bool)>,
    pending: Pending,
    keyboard: Option<Keyboard>,
}

impl I8042 {
    /// A controller that asks `vm` to reset when the guest pulses the reset line.
    pub fn new(vm: VmControl) -> Self {
        Self {
            vm,
            command_byte: DEFAULT_CTR,
            output_port: DEFAULT_OUTPUT_PORT,
            output: VecDeque::new(),
            pending: Pending::None,
            keyboard: None,
        }
    }

    /// A controller with a keyboard whose interrupt is `irq` (ISA IRQ 1).
    pub fn with_keyboard(vm: VmControl, irq: IrqLine) -> Self {
        Self {
            keyboard: Some(Keyboard {
                irq,
                pending: None,
                scancode_set: 2,
            }),
            ..Self::new(vm)
        }
    }

    /// A controller reply: it replaces whatever was waiting.
    fn reply(&mut self, byte: u8) {
        self.output.clear();
        self.push(byte, false);
    }

    /// Queues a byte; raises IRQ 1 when it lands in the empty output buffer.
    fn push(&mut self, byte: u8, aux: bool) {
        if self.output.len() >= KBD_QUEUE_MAX {
            return;
        }
        self.output.push_back((byte, aux));
        if self.output.len() == 1 {
            self.raise();
        }
    }

    /// IRQ 1 for a keyboard-side byte in the output buffer, if the command byte enables it.
    fn raise(&self) {
        let kbd_byte = matches!(self.output.front(), Some((_, false)));
        let enabled = self.command_byte & CTR_KBD_INT != 0;
        if let (true, true, Some(k)) = (kbd_byte, enabled, &self.keyboard) {
            let _ = k.irq.trigger();
        }
    }

    fn status(&self) -> u8 {
        match self.output.front() {
            Some((_, true)) => STATUS_OBF | STATUS_AUX,
            Some((_, false)) => STATUS_OBF,
            None => 0,
        }
    }

    /// A byte the guest sent to the keyboard; queues its replies.
    fn keyboard_byte(&mut self, value: u8) {
        let Some(k) = &mut self.keyboard else { return };
        let replies: &[u8] = match (k.pending.take(), value) {
            (Some(0xf0), 0) => &[KBD_ACK, k.scancode_set],
            (Some(0xf0), set @ 1..=3) => {
                k.scancode_set = set;
                &[KBD_ACK]
            }
            (Some(_), _) => &[KBD_ACK],
            (None, 0xff) => &[KBD_ACK, KBD_BAT_OK], // reset and self-test passed
            (None, 0xf2) => &[KBD_ACK, 0xab, 0x83], // MF2 keyboard
            (None, 0xee) => &[0xee],                // echo
            (None, cmd @ (0xed | 0xf0 | 0xf3)) => {
                k.pending = Some(cmd);
                &[KBD_ACK]
            }
            (None, 0xf6) => {
                k.scancode_set = 2;
                &[KBD_ACK]
            }
            // Enable/disable scanning, typematic/make-break modes, resend: nothing to change.
            (None, _) => &[KBD_ACK],
        };
        let replies = replies.to_vec();
        for b in replies {
            self.push(b, false);
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
            Pending::WriteCommandByte => {
                self.command_byte = value;
                self.raise();
            }
            Pending::WriteOutputPort => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET == 0 {
                    self.reset("output port write");
                }
            }
            Pending::WriteKbdOutput => self.push(value, false),
            // See the module documentation: no echo, so Linux skips the AUX IRQ test.
            Pending::WriteAuxOutput => {
                self.output.clear();
                self.push(0x00, true);
            }
            // No mouse: nothing answers.
            Pending::WriteToAux => {}
            Pending::None => self.keyboard_byte(value),
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
            DATA => {
                data[0] = self.output.pop_front().map_or(0, |(b, _)| b);
                if !self.output.is_empty() {
                    self.raise();
                }
            }
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
    fn keyboard_answers_firmware_and_atkbd() {
        let vm = VmControl::new().unwrap();
        let irq = IrqLine::new().unwrap();
        let mut dev = I8042::with_keyboard(vm, IrqLine { fd: irq.fd.clone() });
        let kbd = |dev: &mut I8042, b: u8| {
            dev.write(DATA, &[b]);
            let mut got = vec![];
            while rd(dev, COMMAND) & STATUS_OBF != 0 {
                got.push(rd(dev, DATA));
            }
            got
        };
        assert_eq!(kbd(&mut dev, 0xff), [0xfa, 0xaa]);
        assert_eq!(kbd(&mut dev, 0xf2), [0xfa, 0xab, 0x83]);
        assert_eq!(kbd(&mut dev, 0xed), [0xfa]);
        assert_eq!(kbd(&mut dev, 0x07), [0xfa]);
        assert_eq!(kbd(&mut dev, 0xf0), [0xfa]);
        assert_eq!(kbd(&mut dev, 0x00), [0xfa, 2]);
        assert_eq!(kbd(&mut dev, 0xf4), [0xfa]);
        assert_eq!(kbd(&mut dev, 0xee), [0xee]);
        // The default command byte enables the keyboard interrupt: one edge per byte loaded.
        assert!(irq.fd.read().unwrap() >= 10);
        dev.write(COMMAND, &[0x60]);
        dev.write(DATA, &[0x00]);
        assert_eq!(kbd(&mut dev, 0xff), [0xfa, 0xaa]);
        assert!(irq.fd.read().is_err(), "no interrupt with KBD_INT clear");
        // A flood of commands never queues more than the cap.
        for _ in 0..100 {
            dev.write(DATA, &[0xff]);
        }
        let mut n = 0;
        while rd(&mut dev, COMMAND) & STATUS_OBF != 0 {
            rd(&mut dev, DATA);
            n += 1;
        }
        assert_eq!(n, KBD_QUEUE_MAX);
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
