//! Wall-clock time in unix seconds, injectable so that tests can move time by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The source of "now" for every expiry and timestamp the broker keeps.
///
/// Session expiry is stored as unix seconds, so it is measured on the wall clock; tests use
/// [`Clock::manual`] to expire sessions without waiting.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// `None` reads the system clock; `Some` is a hand-moved clock shared by all its clones.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Clock { manual: None }
    }

    /// A clock that stands at `start` (unix seconds) until [`Clock::advance`] moves it.
    pub fn manual(start: u64) -> Self {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(start))),
        }
    }

    /// The current time in unix seconds.
    pub fn now(&self) -> u64 {
        match &self.manual {
            Some(t) => t.load(Ordering::Relaxed),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// Moves a manual clock forward by `secs`.
    ///
    /// # Panics
    /// On the system clock, which nobody can move.
    pub fn advance(&self, secs: u64) {
        let t = self
            .manual
            .as_ref()
            .expect("Clock::advance on the system clock");
        t.fetch_add(secs, Ordering::Relaxed);
    }
}
