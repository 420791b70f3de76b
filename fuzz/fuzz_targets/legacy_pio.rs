//! The port-I/O register files: the 16550 serial port, the i8042 (with and without the
//! keyboard), the CMOS/RTC (index + data, alarm), the ACPI PM block (PM1 event/control,
//! sleep and reset, PM timer) and the 0xcf9 reset port. A sequence of (device, offset,
//! size, value, read/write) ops, interleaved with host-side events (serial input, RTC wake).
#![no_main]
use libfuzzer_sys::fuzz_target;

use ferrovm::bus::BusDeviceMut;
use ferrovm::devices::acpi_pm::{AcpiPm, ResetPort, ACPI_PM_LEN};
use ferrovm::devices::cmos::Cmos;
use ferrovm::devices::i8042::I8042;
use ferrovm::devices::serial::{SerialDevice, SERIAL_PORT_LEN};
use ferrovm::devices::{IrqLine, VmControl};
use ferrovm_fuzz::{access_size, Input};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let vm = VmControl::new().unwrap();
    let irq = IrqLine::new().unwrap();
    let mut serial = SerialDevice::new(irq.clone(), Box::new(std::io::sink()));
    let mut kbd = if inp.bool() {
        I8042::with_keyboard(vm.clone(), irq.clone())
    } else {
        I8042::new(vm.clone())
    };
    let mut cmos = Cmos::new(u64::from(inp.u32()) << 8, u64::from(inp.u32()) << 16);
    let mut pm = AcpiPm::new(vm.clone());
    let mut reset = ResetPort::new(vm.clone());
    while !inp.is_empty() {
        let kind = inp.u8();
        let dev = inp.u8();
        let off = inp.u8();
        let size = access_size(kind >> 1);
        let value = inp.u64().to_le_bytes();
        let mut buf = [0u8; 8];
        let (d, len): (&mut dyn BusDeviceMut, u64) = match dev % 6 {
            0 => (&mut serial, SERIAL_PORT_LEN),
            // 0x60 and 0x64 are two one-port ranges on the bus; the device sees offsets 0 and 4.
            1 => (&mut kbd, 5),
            2 => (&mut cmos, 2),
            3 => (&mut pm, ACPI_PM_LEN),
            4 => (&mut reset, 1),
            _ => {
                match off % 4 {
                    0 => {
                        serial.enqueue_input(&value[..size]);
                    }
                    1 => {
                        let _ = serial.input_capacity();
                    }
                    2 => {
                        let _ = cmos.alarm_fired_since(u64::from(value[0]));
                        let _ = pm.rtc_wake_enabled();
                    }
                    _ => pm.woken_by_rtc(),
                }
                continue;
            }
        };
        // Mostly inside the device's range (what the bus hands it), sometimes past it.
        let offset = if off & 0x80 != 0 {
            u64::from(off)
        } else {
            u64::from(off) % len
        };
        if kind & 1 == 0 {
            d.read(offset, &mut buf[..size]);
        } else {
            d.write(offset, &value[..size]);
        }
    }
    let _ = vm.request();
});
