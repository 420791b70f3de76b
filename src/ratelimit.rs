//! Rate-limited logging for messages a guest (or a remote peer) can trigger at will: at most
//! `burst` messages, then one in every 10,000, each with its occurrence count, so a hostile
//! guest cannot flood the host log. Thread-safe (`&self`), cheap when suppressed.

use std::sync::atomic::{AtomicU64, Ordering};

/// One call site's budget of log lines.
#[derive(Debug)]
pub struct RateLimit {
    burst: u64,
    count: AtomicU64,
}

impl RateLimit {
    pub const fn new(burst: u64) -> Self {
        Self {
            burst,
            count: AtomicU64::new(0),
        }
    }

    fn admit(&self) -> Option<u64> {
        let n = self.count.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        (n <= self.burst || n % 10_000 == 0).then_some(n)
    }

    fn emit(&self, level: log::Level, msg: impl FnOnce() -> String) -> bool {
        let Some(n) = self.admit() else {
            return false;
        };
        if log::log_enabled!(level) {
            let suffix = if n == self.burst {
                " (further messages like this are suppressed)"
            } else {
                ""
            };
            log::log!(level, "{} (occurrence {n}){suffix}", msg());
        }
        true
    }

    /// Logs at debug level; returns whether the message passed the limit.
    pub fn log(&self, msg: impl FnOnce() -> String) -> bool {
        self.emit(log::Level::Debug, msg)
    }

    /// Logs at warning level; returns whether the message passed the limit.
    pub fn warn(&self, msg: impl FnOnce() -> String) -> bool {
        self.emit(log::Level::Warn, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_caps_messages() {
        let r = RateLimit::new(3);
        let logged = (0..100_000).filter(|_| r.log(String::new)).count();
        assert_eq!(logged, 3 + 10);
        let w = RateLimit::new(1);
        assert!(w.warn(|| "first".into()));
        assert!(!w.warn(|| "second".into()));
    }
}
