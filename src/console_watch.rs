//! Watches the guest console for the lines that say how a run ended when the guest cannot
//! say it otherwise: Linux's "Kernel panic - not syncing" and SeaBIOS's "No bootable device."
//! (after which the firmware resets the machine).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What was seen on the console so far.
#[derive(Default)]
pub struct Seen {
    pub panic: AtomicBool,
    pub no_boot_device: AtomicBool,
}

impl Seen {
    pub fn panicked(&self) -> bool {
        self.panic.load(Ordering::SeqCst)
    }
    pub fn found_no_boot_device(&self) -> bool {
        self.no_boot_device.load(Ordering::SeqCst)
    }
}

const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
const NO_BOOT_MARKER: &[u8] = b"No bootable device.";
/// Longest line prefix examined (the markers sit near the start of their lines).
const LINE_MAX: usize = 256;

/// A console sink that looks at each line before passing the bytes on.
pub struct ConsoleWatch {
    inner: Box<dyn Write + Send>,
    seen: Arc<Seen>,
    line: Vec<u8>,
}

impl ConsoleWatch {
    pub fn new(inner: Box<dyn Write + Send>, seen: Arc<Seen>) -> Self {
        Self {
            inner,
            seen,
            line: Vec::new(),
        }
    }
}

impl Write for ConsoleWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.line.clear();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
                if self.line.ends_with(PANIC_MARKER) {
                    self.seen.panic.store(true, Ordering::SeqCst);
                }
                if self.line.ends_with(NO_BOOT_MARKER) {
                    self.seen.no_boot_device.store(true, Ordering::SeqCst);
                }
            }
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_anywhere_in_a_line_and_split_writes() {
        let seen = Arc::new(Seen::default());
        let mut w = ConsoleWatch::new(Box::new(std::io::sink()), seen.clone());
        w.write_all(b"[    1.0] Kernel pan").unwrap();
        assert!(!seen.panicked());
        w.write_all(b"ic - not syncing: VFS\n").unwrap();
        assert!(seen.panicked());
        assert!(!seen.found_no_boot_device());
        w.write_all(b"\x1b[0mNo bootable device.  Retrying in 5 seconds.\r\n")
            .unwrap();
        assert!(seen.found_no_boot_device());
        // A long line is examined only up to LINE_MAX bytes.
        let seen = Arc::new(Seen::default());
        let mut w = ConsoleWatch::new(Box::new(std::io::sink()), seen.clone());
        w.write_all(&[b'x'; LINE_MAX]).unwrap();
        w.write_all(NO_BOOT_MARKER).unwrap();
        assert!(!seen.found_no_boot_device());
    }
}
