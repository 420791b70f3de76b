use super::*;
use crate::devices::pci::config::{COMMAND_MEMORY, REG_CAP_PTR, REG_COMMAND};
use crate::devices::pci::msix::tests::FakeRouter;
use crate::devices::pci::IoEvent;
use crate::devices::virtio::{ActivateError, DeviceError, VirtioHandler, WorkerCtx};

/// (index, size, descriptor table) of each queue handed to the device.
type Queues = Vec<(u16, u16, u64)>;

#[derive(Default)]
struct Log {
    activated: Option<(u64, Queues)>,
    resets: usize,
    fail: bool,
    fail_worker: bool,
    served: Vec<usize>,
    hold: Arc<std::sync::atomic::AtomicBool>,
    hold_timed_out: bool,
}

struct FakeDevice(Arc<Mutex<Log>>);

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 128]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | 1 << 6
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn name(&self) -> String {
        "fake".into()
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        acked: u64,
        queues: Vec<(u16, Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        let mut l = self.0.lock().unwrap();
        if l.fail {
            return Err(ActivateError::AlreadyActive);
        }
        let qs = queues
            .iter()
            .map(|(i, q)| (*i, q.size(), q.desc_table()))
            .collect();
        l.activated = Some((acked, qs));
        Ok(Box::new(FakeHandler(self.0.clone())))
    }
    fn deactivate(&mut self, _handler: Box<dyn VirtioHandler>) {
        let mut l = self.0.lock().unwrap();
        l.resets += 1;
        l.activated = None;
    }
}

/// Serves nothing; fails on demand (`Log::fail_worker`) to test NEEDS_RESET.
struct FakeHandler(Arc<Mutex<Log>>);

impl VirtioHandler for FakeHandler {
    fn queue_event(&mut self, slot: usize, _ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        let hold = {
            let mut l = self.0.lock().unwrap();
            l.served.push(slot);
            if l.fail_worker {
                return Err(DeviceError::new("injected failure"));
            }
            l.hold.clone()
        };
        // A slow request: busy until the test releases it (or 5 s pass).
        let t0 = std::time::Instant::now();
        while hold.load(std::sync::atomic::Ordering::SeqCst) {
            if t0.elapsed().as_secs() >= 5 {
                self.0.lock().unwrap().hold_timed_out = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }
}

#[derive(Default)]
struct FakeIoEvents(Mutex<Vec<(bool, u64)>>);

impl IoEventRegistry for FakeIoEvents {
    fn register_event(&self, ev: IoEvent, _fd: &EventFd) -> io::Result<()> {
        assert_eq!((ev.pio, ev.datamatch), (false, None));
        self.0.lock().unwrap().push((true, ev.addr));
        Ok(())
    }
    fn unregister_event(&self, ev: IoEvent, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().push((false, ev.addr));
        Ok(())
    }
}

struct Setup {
    dev: VirtioPciDevice,
    log: Arc<Mutex<Log>>,
    ioevents: Arc<FakeIoEvents>,
}

fn setup() -> Setup {
    let log = Arc::new(Mutex::new(Log::default()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let ioevents = Arc::new(FakeIoEvents::default());
    let mut dev = VirtioPciDevice::new(
        Box::new(FakeDevice(log.clone())),
        mem,
        Arc::new(FakeRouter::default()),
        ioevents.clone(),
        IntxLine::new().unwrap(),
    )
    .unwrap();
    dev.assign_bar(0, 0xc000_0000);
    Setup { dev, log, ioevents }
}

fn w(d: &mut VirtioPciDevice, off: u64, v: u64, len: usize) {
    d.bar_write(0, off, &v.to_le_bytes()[..len]);
}

fn r(d: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(0, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn features(d: &mut VirtioPciDevice) -> u64 {
    w(d, 0x00, 0, 4);
    let lo = r(d, 0x04, 4);
    w(d, 0x00, 1, 4);
    lo | r(d, 0x04, 4) << 32
}

fn ack(d: &mut VirtioPciDevice, f: u64) {
    w(d, 0x08, 0, 4);
    w(d, 0x0c, f & 0xffff_ffff, 4);
    w(d, 0x08, 1, 4);
    w(d, 0x0c, f >> 32, 4);
}

fn setup_queue(d: &mut VirtioPciDevice, q: u16, size: u16, base: u64) {
    w(d, 0x16, q.into(), 2);
    w(d, 0x18, size.into(), 2);
    w(d, 0x20, base, 4);
    w(d, 0x24, 0, 4);
    w(d, 0x28, base + 0x1000, 8);
    w(d, 0x30, base + 0x2000, 8);
    w(d, 0x1c, 1, 2);
}

#[test]
fn header_and_capabilities() {
    let mut s = setup();
    let mut b = [0u8; 4];
    s.dev.config_read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1042_1af4);
    s.dev.config_read(8, &mut b);
    assert_eq!(b[0], 1, "revision");
    let regs = *s.dev.config().regs();
    let mut p = regs[REG_CAP_PTR] as usize;
    let mut found = vec![];
    while p != 0 {
        if regs[p] == CAP_VENDOR {
            let off = u32::from_le_bytes(regs[p + 8..p + 12].try_into().unwrap());
            found.push((regs[p + 3], regs[p + 4], off));
            if regs[p + 3] == CAP_NOTIFY {
                assert_eq!(regs[p + 2], 20);
                assert_eq!(&regs[p + 16..p + 20], &4u32.to_le_bytes());
            }
        } else {
            assert_eq!(regs[p], msix::CAP_ID);
            assert_eq!(
                u16::from_le_bytes([regs[p + 2], regs[p + 3]]),
                2,
                "3 vectors"
            );
            found.push((
                0x11,
                0,
                u32::from_le_bytes(regs[p + 4..p + 8].try_into().unwrap()),
            ));
        }
        p = regs[p + 1] as usize;
    }
    assert_eq!(
        found,
        vec![
            (1, 0, 0),
            (2, 0, 0x3000),
            (3, 0, 0x1000),
            (4, 0, 0x2000),
            (5, 0, 0),
            (0x11, 0, 0x4000)
        ]
    );
    assert_eq!(r(&mut s.dev, 0x12, 2), 2, "num_queues");
    assert_eq!(r(&mut s.dev, 0x2003, 1), 3, "device config");
}

#[test]
fn feature_negotiation_and_refusal() {
    let mut s = setup();
    let d = &mut s.dev;
    assert_eq!(
        features(d),
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | 1 << 6
    );
    w(d, 0x14, 1 | 2, 1);
    // A feature the device does not offer: FEATURES_OK does not stick.
    ack(d, VIRTIO_F_VERSION_1 | 1 << 7);
    w(d, 0x14, 1 | 2 | 8, 1);
    assert_eq!(r(d, 0x14, 1), 3);
    // Without VERSION_1: refused too.
    ack(d, 1 << 6);
    w(d, 0x14, 1 | 2 | 8, 1);
    assert_eq!(r(d, 0x14, 1), 3);
    ack(d, VIRTIO_F_VERSION_1 | 1 << 6);
    w(d, 0x14, 1 | 2 | 8, 1);
    assert_eq!(r(d, 0x14, 1), 0xb);
    // Features are frozen after FEATURES_OK; clearing status bits is ignored.
    ack(d, VIRTIO_F_VERSION_1);
    w(d, 0x08, 1, 4);
    assert_eq!(r(d, 0x0c, 4), 1);
    w(d, 0x14, 1, 1);
    assert_eq!(r(d, 0x14, 1), 0xb);
}

#[test]
fn queue_setup_activation_and_reset() {
    let mut s = setup();
    let d = &mut s.dev;
    w(d, 0x14, 3, 1);
    ack(d, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX);
    w(d, 0x14, 0xb, 1);
    // Queue size: must be a power of two no larger than the maximum.
    w(d, 0x16, 1, 2);
    assert_eq!(r(d, 0x18, 2), 128);
    for bad in [0u64, 3, 100, 256] {
        w(d, 0x18, bad, 2);
        assert_eq!(r(d, 0x18, 2), 128, "size {bad}");
    }
    w(d, 0x18, 64, 2);
    assert_eq!(r(d, 0x18, 2), 64);
    assert_eq!(r(d, 0x1e, 2), 1, "queue_notify_off");
    // Out-of-range queue: reads zero, writes ignored.
    w(d, 0x16, 9, 2);
    assert_eq!(r(d, 0x18, 2), 0);
    w(d, 0x1c, 1, 2);
    // MSI-X vectors: 3 exist; 7 is refused.
    w(d, 0x16, 0, 2);
    w(d, 0x1a, 7, 2);
    assert_eq!(r(d, 0x1a, 2), u64::from(NO_VECTOR));
    w(d, 0x1a, 1, 2);
    assert_eq!(r(d, 0x1a, 2), 1);
    setup_queue(d, 0, 256, 0x10000);
    setup_queue(d, 1, 64, 0x20000);
    assert_eq!(r(d, 0x20, 8), 0x20000);
    // Enabled queues are frozen.
    w(d, 0x20, 0x30000, 8);
    assert_eq!(r(d, 0x20, 8), 0x20000);
    w(d, 0x14, 0xf, 1);
    assert_eq!(r(d, 0x14, 1), 0xf);
    let (acked, qs) = s.log.lock().unwrap().activated.clone().unwrap();
    assert_eq!(acked, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX);
    assert_eq!(qs, vec![(0, 256, 0x10000), (1, 64, 0x20000)]);

    // Reset: the device is stopped and every register is back to its initial value.
    let before = s.log.lock().unwrap().resets;
    w(d, 0x14, 0, 1);
    assert_eq!(s.log.lock().unwrap().resets, before + 1);
    assert_eq!(r(d, 0x14, 1), 0);
    w(d, 0x16, 1, 2);
    assert_eq!(r(d, 0x18, 2), 128);
    assert_eq!(r(d, 0x1c, 2), 0);
    assert_eq!(r(d, 0x20, 8), 0);
    assert_eq!(r(d, 0x1a, 2), u64::from(NO_VECTOR));
    w(d, 0x08, 0, 4);
    assert_eq!(r(d, 0x0c, 4), 0);
}

#[test]
fn failed_activation_needs_reset_and_raises_config_interrupt() {
    let mut s = setup();
    s.log.lock().unwrap().fail = true;
    let d = &mut s.dev;
    w(d, 0x14, 3, 1);
    ack(d, VIRTIO_F_VERSION_1);
    w(d, 0x14, 0xb, 1);
    setup_queue(d, 0, 256, 0x10000);
    w(d, 0x14, 0xf, 1);
    assert_eq!(r(d, 0x14, 1), 0x4f);
    assert_eq!(r(d, 0x1000, 1), u64::from(ISR_CONFIG), "ISR: config change");
    assert_eq!(r(d, 0x1000, 1), 0, "ISR clears on read");
    // Rings outside guest memory also fail activation.
    s.log.lock().unwrap().fail = false;
    w(d, 0x14, 0, 1);
    w(d, 0x14, 3, 1);
    ack(d, VIRTIO_F_VERSION_1);
    w(d, 0x14, 0xb, 1);
    setup_queue(d, 0, 256, 0x1_0000_0000);
    w(d, 0x14, 0xf, 1);
    assert_eq!(r(d, 0x14, 1) & u64::from(STATUS_NEEDS_RESET), 0x40);
    assert!(s.log.lock().unwrap().activated.is_none());
}

#[test]
fn kicks_follow_the_bar() {
    let mut s = setup();
    assert!(s.ioevents.0.lock().unwrap().is_empty(), "not decoded yet");
    s.dev
        .config_write(REG_COMMAND as u16, &COMMAND_MEMORY.to_le_bytes());
    assert_eq!(
        *s.ioevents.0.lock().unwrap(),
        vec![(true, 0xc000_3000), (true, 0xc000_3004)]
    );
    s.ioevents.0.lock().unwrap().clear();
    s.dev.config_write(0x10, &0xc010_0000u32.to_le_bytes());
    assert_eq!(
        *s.ioevents.0.lock().unwrap(),
        vec![
            (false, 0xc000_3000),
            (true, 0xc010_3000),
            (false, 0xc000_3004),
            (true, 0xc010_3004)
        ]
    );
    // A notify write that reaches userspace signals the kick eventfd.
    w(&mut s.dev, 0x3004, 1, 2);
    assert_eq!(s.dev.kicks[1].read().unwrap(), 1);
    assert!(s.dev.kicks[0].read().is_err());
}

#[test]
fn pci_cfg_window_reaches_the_bar() {
    let mut s = setup();
    let c = s.dev.pci_cfg_cap;
    // bar 0, offset 0x12 (num_queues), length 2
    s.dev.config_write((c + 4) as u16, &[0]);
    s.dev.config_write((c + 8) as u16, &0x12u32.to_le_bytes());
    s.dev.config_write((c + 12) as u16, &2u32.to_le_bytes());
    let mut b = [0u8; 4];
    s.dev.config_read((c + 16) as u16, &mut b);
    assert_eq!(&b[..2], &[2, 0]);
    // A write through the window: device_feature_select = 1.
    s.dev.config_write((c + 8) as u16, &0u32.to_le_bytes());
    s.dev.config_write((c + 12) as u16, &4u32.to_le_bytes());
    s.dev.config_write((c + 16) as u16, &1u32.to_le_bytes());
    assert_eq!(r(&mut s.dev, 0, 4), 1);
}

#[test]
fn hostile_bar_and_config_accesses() {
    let mut s = setup();
    let mut b = [0u8; 8];
    for off in [
        0u64,
        1,
        0x13,
        0x37,
        0x38,
        0xfff,
        0x1000,
        0x1001,
        0x2fff,
        0x3001,
        0x3ffe,
        0x4000,
        0x402f,
        0x5000,
        0x5007,
        0x7ffc,
        0x7fff,
        0x8000,
        u64::MAX,
        u64::MAX - 3,
    ] {
        for len in [1usize, 2, 3, 4, 8] {
            s.dev.bar_write(0, off, &[0xff; 8][..len]);
            s.dev.bar_read(0, off, &mut b[..len]);
            s.dev.bar_write(3, off, &[0xff; 8][..len]);
            s.dev.bar_read(3, off, &mut b[..len]);
        }
    }
    for reg in [
        0u16, 3, 0x3f, 0x40, 0x4f, 0x50, 0x5d, 0xfe, 0xff, 0x100, 0xffc,
    ] {
        for len in [1usize, 2, 4] {
            s.dev.config_write(reg, &[0xff; 4][..len]);
            s.dev.config_read(reg, &mut b[..len]);
        }
    }
    // The status byte written with all-ones: FEATURES_OK refused (nothing acked), the rest
    // is frozen or ignored; nothing panicked.
    let st = r(&mut s.dev, 0x14, 1) as u8;
    assert_eq!(st & STATUS_FEATURES_OK, 0);
}

/// Brings the device up to DRIVER_OK with queue 0 at `base`.
fn bring_up(d: &mut VirtioPciDevice, base: u64) {
    w(d, 0x14, 3, 1);
    ack(d, VIRTIO_F_VERSION_1);
    w(d, 0x14, 0xb, 1);
    setup_queue(d, 0, 256, base);
    w(d, 0x14, 0xf, 1);
}

#[test]
fn worker_failure_reaches_the_driver_as_needs_reset() {
    let mut s = setup();
    s.log.lock().unwrap().fail_worker = true;
    let d = &mut s.dev;
    bring_up(d, 0x10000);
    // The worker serves each queue once at start; the handler fails.
    let t0 = std::time::Instant::now();
    while r(d, 0x14, 1) & u64::from(STATUS_NEEDS_RESET) == 0 {
        assert!(t0.elapsed().as_secs() < 5, "NEEDS_RESET never appeared");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(r(d, 0x14, 1), 0x4f);
    assert_eq!(
        r(d, 0x1000, 1),
        u64::from(ISR_CONFIG),
        "config interrupt raised"
    );
    // Kicks after the failure are not served.
    let served = s.log.lock().unwrap().served.len();
    w(d, 0x3000, 0, 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(s.log.lock().unwrap().served.len(), served);
    // A driver reset recovers: the next activation serves again and reports no failure.
    s.log.lock().unwrap().fail_worker = false;
    w(d, 0x14, 0, 1);
    assert_eq!(r(d, 0x14, 1), 0);
    bring_up(d, 0x10000);
    let t0 = std::time::Instant::now();
    while s.log.lock().unwrap().served.len() == served {
        assert!(t0.elapsed().as_secs() < 5, "not served after reset");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(r(d, 0x14, 1), 0xf);
}

#[test]
fn reset_stops_the_worker_outside_the_device_lock() {
    use crate::devices::pci::PciFunction;
    use std::sync::atomic::Ordering;
    let s = setup();
    let hold = s.log.lock().unwrap().hold.clone();
    hold.store(true, Ordering::SeqCst);
    let dev = Arc::new(VirtioPci::new(s.dev));
    let wr =
        |d: &VirtioPci, off: u64, v: u64, len: usize| d.bar_write(0, off, &v.to_le_bytes()[..len]);
    let rd = |d: &VirtioPci, off: u64| {
        let mut b = [0u8; 1];
        d.bar_read(0, off, &mut b);
        b[0]
    };
    wr(&dev, 0x14, 3, 1);
    for (sel, f) in [
        (0u64, VIRTIO_F_VERSION_1 & 0xffff_ffff),
        (1, VIRTIO_F_VERSION_1 >> 32),
    ] {
        wr(&dev, 0x08, sel, 4);
        wr(&dev, 0x0c, f, 4);
    }
    wr(&dev, 0x14, 0xb, 1);
    for (off, v, len) in [
        (0x16, 0, 2),
        (0x20, 0x10000, 8),
        (0x28, 0x11000, 8),
        (0x30, 0x12000, 8),
        (0x1c, 1, 2),
    ] {
        wr(&dev, off, v, len);
    }
    wr(&dev, 0x14, 0xf, 1);
    // The worker is now busy in a slow request.
    let t0 = std::time::Instant::now();
    while s.log.lock().unwrap().served.is_empty() {
        assert!(t0.elapsed().as_secs() < 5);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let resetter = {
        let dev = dev.clone();
        std::thread::spawn(move || dev.bar_write(0, 0x14, &[0]))
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Another vCPU reads the device while the reset waits for the worker: not blocked, and
    // the reset is not complete yet.
    assert_eq!(rd(&dev, 0x14), 0xf);
    hold.store(false, Ordering::SeqCst);
    resetter.join().unwrap();
    assert_eq!(rd(&dev, 0x14), 0, "reset complete once the worker stopped");
    let l = s.log.lock().unwrap();
    assert!(!l.hold_timed_out, "the register read waited for the worker");
    assert_eq!(l.resets, 1, "the handler went back to the device");
}
