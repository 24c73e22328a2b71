//! Login codes exchanged recently, remembered for their lifetime without ever pausing their owner.
//!
//! At a busy login rate a lifetime of five minutes holds millions of codes. In one map they would
//! cost a pause at every doubling (every entry moved) and at every pruning pass (every entry
//! visited): hundreds of milliseconds during which no login is answered. Here a code is kept as a
//! keyed 64-bit hash, in generations a tenth of the lifetime long: the oldest is dropped whole once
//! all of its codes have outlived the lifetime, and nothing walks the rest. A generation still holds
//! a tenth of the lifetime's codes (600,000 at 20,000 logins a second), so each new one is sized
//! for as many as the last: growing, it would move every code at each doubling (9 ms at the last
//! one of 600,000, measured; 80 µs at most per insert presized).
//!
//! A login looks its code up in every generation, so the sets take the keyed hash as their own
//! hash instead of hashing it again: it is already uniform and secret.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use nohash_hasher::BuildNoHashHasher;
use tokio::time::Instant;

/// The codes first used during one generation, by their keyed hash.
type Codes = HashSet<u64, BuildNoHashHasher<u64>>;

/// Generations per lifetime: a code is remembered for at least the lifetime, and at most a tenth
/// longer.
const GENERATIONS: u32 = 10;

/// The codes used within the last lifetime.
pub struct UsedCodes {
    lifetime: Duration,
    /// Keyed per process, so that nobody can make two codes collide on purpose (by chance they do
    /// about once in 2^64).
    keys: RandomState,
    /// Oldest first: when each generation started, and the codes first used during it.
    generations: VecDeque<(Instant, Codes)>,
}

impl UsedCodes {
    /// Remembers codes for `lifetime`.
    pub fn new(lifetime: Duration) -> UsedCodes {
        UsedCodes {
            lifetime,
            keys: RandomState::new(),
            generations: VecDeque::new(),
        }
    }

    /// Whether `code` was used within the lifetime before `now`.
    pub fn contains(&mut self, code: &str, now: Instant) -> bool {
        let key = self.keys.hash_one(code);
        self.holds(key, now)
    }

    /// Records `code` as used at `now`; `false` if it was already.
    pub fn insert(&mut self, code: &str, now: Instant) -> bool {
        let key = self.keys.hash_one(code);
        if self.holds(key, now) {
            return false;
        }
        self.add(key, now)
    }

    /// Records `code` as used at `now`, which its caller found it was not (by
    /// [`UsedCodes::contains`]) and has not recorded since: the generations are not looked at again.
    pub fn record(&mut self, code: &str, now: Instant) {
        let key = self.keys.hash_one(code);
        self.forget_old(now);
        self.add(key, now);
    }

    /// Adds `key` to the generation of `now`; `false` if it held it already.
    fn add(&mut self, key: u64, now: Instant) -> bool {
        let span = self.span();
        match self.generations.back_mut() {
            Some((started, codes)) if now < *started + span => codes.insert(key),
            last => {
                let expected = last.map_or(0, |(_, codes)| codes.len());
                let mut codes = Codes::with_capacity_and_hasher(
                    expected + expected / 8,
                    BuildNoHashHasher::default(),
                );
                codes.insert(key);
                self.generations.push_back((now, codes));
                true
            }
        }
    }

    /// Whether a code hashed to `key` was used within the lifetime before `now`.
    fn holds(&mut self, key: u64, now: Instant) -> bool {
        self.forget_old(now);
        self.generations
            .iter()
            .any(|(_, codes)| codes.contains(&key))
    }

    fn span(&self) -> Duration {
        self.lifetime / GENERATIONS
    }

    /// Drops the generations whose every code is older than the lifetime.
    fn forget_old(&mut self, now: Instant) {
        let span = self.span();
        while let Some((started, _)) = self.generations.front()
            && *started + span + self.lifetime <= now
        {
            self.generations.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_is_remembered_for_its_lifetime_and_then_forgotten() {
        let lifetime = Duration::from_secs(300);
        let mut used = UsedCodes::new(lifetime);
        let t0 = Instant::now();
        assert!(used.insert("a", t0));
        assert!(!used.insert("a", t0), "used twice");
        assert!(used.insert("b", t0 + Duration::from_secs(100)));
        assert!(used.contains("a", t0 + lifetime - Duration::from_millis(1)));
        assert!(!used.contains("c", t0 + lifetime));
        // Forgotten by a tenth of the lifetime after it ended, with its generation.
        assert!(!used.contains("a", t0 + lifetime + lifetime / 10));
        assert!(used.contains("b", t0 + lifetime + lifetime / 10));
        assert!(!used.contains(
            "b",
            t0 + Duration::from_secs(100) + lifetime + lifetime / 10
        ));
        assert!(used.generations.is_empty());
    }

    #[test]
    fn a_recorded_code_is_used_in_its_generation() {
        let lifetime = Duration::from_secs(100);
        let mut used = UsedCodes::new(lifetime);
        let t0 = Instant::now();
        assert!(!used.contains("a", t0));
        used.record("a", t0 + Duration::from_secs(15));
        assert!(used.contains("a", t0 + Duration::from_secs(15)));
        assert!(
            !used.insert("a", t0 + Duration::from_secs(20)),
            "used twice"
        );
        assert!(used.contains("a", t0 + Duration::from_secs(114)));
        assert!(!used.contains("a", t0 + Duration::from_secs(125)));
    }

    #[test]
    fn a_new_generation_has_room_for_as_many_codes_as_the_last() {
        let lifetime = Duration::from_secs(100);
        let mut used = UsedCodes::new(lifetime);
        let t0 = Instant::now();
        for code in 0..1000u32 {
            assert!(used.insert(&code.to_string(), t0));
        }
        assert!(used.insert("next", t0 + lifetime / 10));
        let (_, newest) = used.generations.back().unwrap();
        assert_eq!(newest.len(), 1);
        assert!(newest.capacity() >= 1000, "{}", newest.capacity());
    }

    #[test]
    fn generations_stay_a_tenth_of_the_lifetime_long() {
        let mut used = UsedCodes::new(Duration::from_secs(100));
        let t0 = Instant::now();
        for second in 0..100u64 {
            assert!(used.insert(&second.to_string(), t0 + Duration::from_secs(second)));
        }
        assert_eq!(used.generations.len(), 10);
        assert!(used.generations.iter().all(|(_, codes)| codes.len() == 10));
        assert!((0..100u64).all(|s| used.contains(&s.to_string(), t0 + Duration::from_secs(100))));
    }
}
