//! How many calls to WeChat each user's requests made this minute: the budget that keeps one
//! token from spending WeChat's quota for everybody (`WXBROKER_WECHAT_CALLS_PER_MIN`).
//!
//! A minute is a whole window of the broker's clock (`now / 60`), so that every broker on one
//! Redis counts into the same window (their clocks agree, as session expiry already needs). With
//! sled the counts live in this broker's memory ([`LocalCounts`]); with Redis in one counter per
//! user and minute on the server (`calls:{uid}:{minute}`, see [`super::redis`]), shared by every
//! broker.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::Error;

/// The length of a budget window, in seconds.
pub const WINDOW_SECS: u64 = 60;

/// The window `now` (unix seconds) falls in.
pub fn window(now: u64) -> u64 {
    now / WINDOW_SECS
}

/// `Ok` when a call counted as the `count`th of its window is within `per_min`; else the refusal,
/// with the seconds left until the window ends (1 to 60) as the client's `Retry-After`.
pub fn within(count: u64, per_min: u32, now: u64) -> Result<(), Error> {
    if count <= u64::from(per_min) {
        Ok(())
    } else {
        Err(Error::RateLimited {
            retry_after_secs: WINDOW_SECS - now % WINDOW_SECS,
        })
    }
}

/// The counts of the current window in this broker's memory, for a broker on sled.
#[derive(Default)]
pub struct LocalCounts {
    minute: Mutex<Minute>,
}

/// One window's counts: the map holds only users who called WeChat in it, and is dropped whole
/// when the next window begins.
#[derive(Default)]
struct Minute {
    window: u64,
    counts: HashMap<u64, u64>,
}

impl LocalCounts {
    /// Counts one call of `uid` in window `window`; returns the window's count so far, this one
    /// included.
    pub fn count(&self, uid: u64, window: u64) -> u64 {
        let mut minute = self.minute.lock().unwrap_or_else(|e| e.into_inner());
        // A clock stepped back starts a new window too: a user then gets a fresh budget early.
        let stale = (minute.window != window).then(|| {
            minute.window = window;
            std::mem::take(&mut minute.counts)
        });
        let count = minute.counts.entry(uid).or_insert(0);
        *count += 1;
        let count = *count;
        drop(minute);
        // The last window's map is freed outside the lock.
        drop(stale);
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_user_and_start_again_each_window() {
        let counts = LocalCounts::default();
        let now = 1_790_000_000;
        let w = window(now);
        assert_eq!((1..=3).map(|_| counts.count(7, w)).last(), Some(3));
        assert_eq!(
            counts.count(8, w),
            1,
            "another user has a budget of their own"
        );
        assert_eq!(counts.count(7, w + 1), 1, "the next minute starts afresh");
        assert_eq!(counts.count(8, w + 1), 1, "for everybody");
    }

    #[test]
    fn a_refusal_says_when_the_window_ends() {
        let start = 1_789_999_980 + 40; // 40 s into a window
        assert_eq!(start % WINDOW_SECS, 40);
        assert_eq!(within(20, 20, start), Ok(()));
        assert_eq!(
            within(21, 20, start),
            Err(Error::RateLimited {
                retry_after_secs: 20
            })
        );
        assert_eq!(
            within(21, 20, start - 40),
            Err(Error::RateLimited {
                retry_after_secs: 60
            })
        );
        assert_eq!(
            within(1, 0, start),
            Err(Error::RateLimited {
                retry_after_secs: 20
            }),
            "a budget of 0 is never spent here: the caller turns the budget off instead"
        );
    }
}
