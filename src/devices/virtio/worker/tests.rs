use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};
use virtio_queue::QueueT;

use super::*;

/// Counts events per slot; fails on the first event when asked.
struct Counting {
    served: Arc<Mutex<Vec<usize>>>,
    fail: bool,
}

impl VirtioHandler for Counting {
    fn queue_event(&mut self, slot: usize, _ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        lock(&self.served).push(slot);
        if self.fail {
            return Err(DeviceError::new("boom"));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Irq(Mutex<Vec<VirtioInterruptType>>);

impl VirtioInterrupt for Irq {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        lock(&self.0).push(kind);
        Ok(())
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether thread `name` is gone within 2 s: a joined thread's kernel task can outlive
/// pthread_join by a moment, a leaked one stays.
fn thread_gone(name: &str) -> bool {
    let t0 = Instant::now();
    while thread_alive(name) {
        if t0.elapsed() > Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

static NAMES: AtomicUsize = AtomicUsize::new(0);

/// A unique thread name (the kernel keeps 15 bytes of it).
fn unique_name() -> String {
    format!("wtest-{}", NAMES.fetch_add(1, Ordering::Relaxed))
}

/// Whether a thread of this process has the name `name`.
fn thread_alive(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .any(|c| c.trim_end() == name)
}

/// A started worker and the test's ends of it: driver-side kicks, served slots, interrupts
/// raised, the NEEDS_RESET flag.
type Started = (
    Worker,
    Vec<EventFd>,
    Arc<Mutex<Vec<usize>>>,
    Arc<Irq>,
    Arc<AtomicBool>,
);

fn start(name: &str, fail: bool, kicks: usize) -> Started {
    let served = Arc::new(Mutex::new(Vec::new()));
    let driver: Vec<EventFd> = (0..kicks)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let worker_kicks = driver.iter().map(|k| k.try_clone().unwrap()).collect();
    let irq = Arc::new(Irq::default());
    let failed = Arc::new(AtomicBool::new(false));
    let handler = Box::new(Counting {
        served: served.clone(),
        fail,
    });
    let w = Worker::start(name, handler, worker_kicks, irq.clone(), failed.clone())
        .map_err(|(e, _)| e)
        .unwrap();
    (w, driver, served, irq, failed)
}

#[test]
fn serves_every_queue_at_start_then_on_kicks() {
    let (w, kicks, served, _irq, _) = start(&unique_name(), false, 2);
    wait_until("start pass", || lock(&served).len() == 2);
    kicks[1].write(1).unwrap();
    wait_until("kick", || lock(&served).len() == 3);
    assert_eq!(lock(&served)[2], 1);
    assert!(w.stop().is_some(), "the handler comes back");
}

#[test]
fn pause_holds_kicks_until_resume() {
    let (w, kicks, served, _irq, _) = start(&unique_name(), false, 1);
    wait_until("start pass", || lock(&served).len() == 1);
    assert!(w.pause());
    kicks[0].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(lock(&served).len(), 1, "nothing served while paused");
    w.resume();
    wait_until("served after resume", || lock(&served).len() == 2);
    // Pause twice, then stop while paused: the thread still ends.
    assert!(w.pause());
    assert!(w.pause());
    drop(w);
}

#[test]
fn a_failure_sets_needs_reset_raises_config_and_stops_serving() {
    let (w, kicks, served, irq, failed) = start(&unique_name(), true, 1);
    wait_until("failure", || failed.load(Ordering::SeqCst));
    wait_until("config irq", || {
        lock(&irq.0).contains(&VirtioInterruptType::Config)
    });
    for _ in 0..3 {
        kicks[0].write(1).unwrap();
    }
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(lock(&served).len(), 1, "kicks after a failure are ignored");
    assert_eq!(lock(&irq.0).len(), 1, "one configuration interrupt");
    drop(w);
}

#[test]
fn stopping_joins_the_thread() {
    let name = unique_name();
    let (w, _kicks, served, _irq, _) = start(&name, false, 1);
    wait_until("start pass", || lock(&served).len() == 1);
    assert!(thread_alive(&name));
    drop(w);
    assert!(thread_gone(&name), "the worker thread is gone after drop");
}

/// A device for the [`Runner`] tests: one queue, a handler that counts.
struct Dev {
    served: Arc<Mutex<Vec<usize>>>,
    name: String,
    handed_back: usize,
}

impl VirtioDevice for Dev {
    fn device_type(&self) -> u32 {
        4
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _acked: u64,
        queues: Vec<(u16, virtio_queue::Queue)>,
    ) -> Result<Box<dyn VirtioHandler>, ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 1,
            });
        }
        Ok(Box::new(Counting {
            served: self.served.clone(),
            fail: false,
        }))
    }
    fn deactivate(&mut self, handler: Box<dyn VirtioHandler>) {
        assert!(downcast::<Counting>(handler).is_some());
        self.handed_back += 1;
    }
}

fn queue(kick: &EventFd) -> ActiveQueue {
    ActiveQueue {
        index: 0,
        queue: virtio_queue::Queue::new(16).unwrap(),
        kick: kick.try_clone().unwrap(),
    }
}

#[test]
fn runner_activates_resets_and_leaves_no_thread() {
    let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 16)]).unwrap();
    let name = unique_name();
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut r = Runner::new(Box::new(Dev {
        served: served.clone(),
        name: name.clone(),
        handed_back: 0,
    }));
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(Irq::default());
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    for round in 1..=3 {
        r.activate(mem.clone(), 0, vec![queue(&kick)], irq.clone())
            .unwrap();
        assert!(matches!(
            r.activate(mem.clone(), 0, vec![], irq.clone()),
            Err(ActivateError::AlreadyActive)
        ));
        wait_until("start pass", || lock(&served).len() == round);
        assert!(r.pause());
        r.resume();
        assert_eq!(r.reset().map(|k| k.len()), Some(1));
        assert!(thread_gone(&name));
        assert_eq!(r.device().handed_back, round);
    }
    assert!(r.reset().is_none());
    // A failed activation: NEEDS_RESET, no thread, the kicks come back on reset.
    let err = r.activate(
        mem.clone(),
        0,
        vec![queue(&kick), queue(&kick)],
        irq.clone(),
    );
    assert!(matches!(
        err,
        Err(ActivateError::QueueCount { got: 2, want: 1 })
    ));
    assert!(r.needs_reset());
    assert!(thread_gone(&name));
    assert_eq!(r.reset().map(|k| k.len()), Some(2));
    assert!(!r.needs_reset());
    r.activate(mem, 0, vec![queue(&kick)], irq).unwrap();
    drop(r);
    assert!(thread_gone(&name), "dropping the runner joins the worker");
}

/// Asks for `reruns` reruns of slot 0, and serves a readable backend fd once per event.
struct Rerunning {
    served: Vec<usize>,
    reruns: usize,
    backend: EventFd,
    backend_events: usize,
}

impl VirtioHandler for Rerunning {
    fn queue_event(&mut self, slot: usize, ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        self.served.push(slot);
        if slot == 0 && self.reruns > 0 {
            self.reruns -= 1;
            ctx.rerun(0);
        }
        Ok(())
    }
    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.backend.as_raw_fd()]
    }
    fn backend_event(&mut self, _id: usize, _ctx: &mut WorkerCtx) -> Result<(), DeviceError> {
        self.backend_events += 1;
        let _ = self.backend.read();
        Ok(())
    }
}

#[test]
fn serve_inline_runs_the_start_pass_reruns_and_readable_backends() {
    let mut h = Rerunning {
        served: Vec::new(),
        reruns: 2,
        backend: EventFd::new(EFD_NONBLOCK).unwrap(),
        backend_events: 0,
    };
    h.backend.write(1).unwrap();
    let irq = Irq::default();
    serve_inline(&mut h, &irq, 2, 64).unwrap().unwrap();
    assert_eq!(h.served, [0, 1, 0, 0]);
    assert_eq!(h.backend_events, 1);
    // A handler that always asks again is cut off after max_passes.
    h.served.clear();
    h.reruns = usize::MAX;
    serve_inline(&mut h, &irq, 1, 5).unwrap().unwrap();
    assert_eq!(h.served.len(), 5);
    // A failure is returned, not retried.
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut failing = Counting {
        served: served.clone(),
        fail: true,
    };
    assert!(serve_inline(&mut failing, &irq, 3, 64).unwrap().is_err());
    assert_eq!(*lock(&served), [0]);
}
