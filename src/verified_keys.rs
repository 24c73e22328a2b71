//! `checksession` answers that said a user's session_key is current, reused for a short time so
//! that a client asking `verify=wechat` on every launch does not cost a call to WeChat each time.
//!
//! An answer is held per uid and app (a person has a session_key per mini program) together with a
//! keyed hash of the session_key it was about: once the
//! stored key changes (a new login, a reset, on this broker or another one on the same Redis),
//! the next check sees a different key and asks WeChat again. What a reused answer cannot see is
//! a `wx.login` whose code never reached us (WeChat rotated the key behind our back): for up to
//! [`REUSE_SECS`] the answer stays "valid", and a decryption with that key then fails with
//! `decrypt_failed`, which also drops the held answer. Answers that the key is stale are never
//! held.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

/// Seconds a "valid" answer from WeChat's `checksession` is reused for the same uid and key.
pub const REUSE_SECS: u64 = 60;

/// The valid answers of the last [`REUSE_SECS`], per uid and app.
pub struct VerifiedKeys {
    /// Keyed per process, so that nobody can make another key's hash collide with one held.
    keys: RandomState,
    /// How many apps the broker serves (their indexes run from 0).
    apps: usize,
    held: Mutex<Generations>,
}

/// Two generations, each [`REUSE_SECS`] long: an answer is held in the one current when it came,
/// and dropped with it once both are older than an answer can be reused. Nothing walks the maps.
#[derive(Default)]
struct Generations {
    /// When the current generation started (unix seconds).
    started: u64,
    current: HashMap<(u64, usize), Held>,
    previous: HashMap<(u64, usize), Held>,
}

/// One valid answer: which key it was about, and until when it may be reused.
#[derive(Clone, Copy)]
struct Held {
    key_hash: u64,
    until: u64,
}

impl Default for VerifiedKeys {
    fn default() -> Self {
        VerifiedKeys::new(1)
    }
}

impl VerifiedKeys {
    /// Answers for a broker of `apps` apps.
    pub fn new(apps: usize) -> VerifiedKeys {
        VerifiedKeys {
            keys: RandomState::new(),
            apps,
            held: Mutex::default(),
        }
    }

    /// Whether WeChat said within the last [`REUSE_SECS`] before `now` that `session_key` is the
    /// current key of `uid` in the app of index `app`.
    pub fn holds(&self, uid: u64, app: usize, session_key: &str, now: u64) -> bool {
        let key_hash = self.keys.hash_one(session_key);
        let mut held = self.lock(now);
        let Generations {
            current, previous, ..
        } = &mut *held;
        current
            .get(&(uid, app))
            .or_else(|| previous.get(&(uid, app)))
            .is_some_and(|h| h.key_hash == key_hash && now < h.until)
    }

    /// Records that WeChat said at `now` that `session_key` is the current key of `uid` in the
    /// app of index `app`.
    pub fn insert(&self, uid: u64, app: usize, session_key: &str, now: u64) {
        let key_hash = self.keys.hash_one(session_key);
        let mut held = self.lock(now);
        held.previous.remove(&(uid, app));
        let until = now + REUSE_SECS;
        held.current.insert((uid, app), Held { key_hash, until });
    }

    /// Drops whatever answer is held for `uid`, in every app (its keys were reset, or one failed
    /// to decrypt).
    pub fn forget(&self, uid: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for app in 0..self.apps {
            held.current.remove(&(uid, app));
            held.previous.remove(&(uid, app));
        }
    }

    /// The generations, moved on to `now` first.
    fn lock(&self, now: u64) -> std::sync::MutexGuard<'_, Generations> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let age = now.saturating_sub(held.started);
        if age >= 2 * REUSE_SECS {
            held.current.clear();
            held.previous.clear();
            held.started = now;
        } else if age >= REUSE_SECS {
            held.previous = std::mem::take(&mut held.current);
            held.started = now;
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_790_000_000;

    #[test]
    fn a_valid_answer_is_reused_for_its_key_until_it_is_too_old() {
        let verified = VerifiedKeys::default();
        assert!(!verified.holds(1, 0, "k1", T));
        verified.insert(1, 0, "k1", T);
        assert!(verified.holds(1, 0, "k1", T));
        assert!(verified.holds(1, 0, "k1", T + REUSE_SECS - 1));
        assert!(!verified.holds(1, 0, "k1", T + REUSE_SECS));
        assert!(
            !verified.holds(1, 0, "k2", T + 1),
            "another key is asked about anew"
        );
        assert!(!verified.holds(2, 0, "k1", T + 1), "another user too");
    }

    #[test]
    fn answers_outlive_a_change_of_generation_and_are_dropped_after() {
        let verified = VerifiedKeys::default();
        verified.insert(1, 0, "k1", T);
        verified.insert(2, 0, "k2", T + REUSE_SECS - 1);
        // A new generation starts: user 2's answer, from the old one, is still good.
        verified.insert(3, 0, "k3", T + REUSE_SECS);
        assert!(verified.holds(2, 0, "k2", T + REUSE_SECS));
        assert!(verified.holds(2, 0, "k2", T + 2 * REUSE_SECS - 2));
        assert!(!verified.holds(2, 0, "k2", T + 2 * REUSE_SECS - 1));
        assert!(verified.holds(3, 0, "k3", T + 2 * REUSE_SECS - 1));
        assert!(!verified.holds(3, 0, "k3", T + 2 * REUSE_SECS));
        let held = verified.held.lock().unwrap();
        assert_eq!(
            held.current.len() + held.previous.len(),
            1,
            "users 1 and 2 are gone"
        );
    }

    #[test]
    fn a_persons_answers_in_two_apps_are_held_side_by_side() {
        let verified = VerifiedKeys::new(2);
        verified.insert(1, 0, "key-in-main", T);
        verified.insert(1, 1, "key-in-lite", T);
        assert!(verified.holds(1, 0, "key-in-main", T + 1));
        assert!(verified.holds(1, 1, "key-in-lite", T + 1));
        assert!(!verified.holds(1, 0, "key-in-lite", T + 1));
        verified.forget(1);
        assert!(!verified.holds(1, 0, "key-in-main", T + 1));
        assert!(!verified.holds(1, 1, "key-in-lite", T + 1));
    }

    #[test]
    fn a_forgotten_or_replaced_answer_is_not_reused() {
        let verified = VerifiedKeys::default();
        verified.insert(1, 0, "k1", T);
        verified.forget(1);
        assert!(!verified.holds(1, 0, "k1", T));
        verified.insert(1, 0, "k1", T);
        verified.insert(1, 0, "k2", T + 1);
        assert!(!verified.holds(1, 0, "k1", T + 1));
        assert!(verified.holds(1, 0, "k2", T + 1));
    }
}
