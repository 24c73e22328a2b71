//! The tokens a verifier has verified, so that a token seen before costs one hash lookup instead
//! of a signature check.
//!
//! Keyed by a 64-bit keyed hash (SipHash with a random key) of the token's last bytes, which are
//! its signature's and as good as random; an entry holds the whole token, compared on every hit,
//! so a different token with the same key is a miss, never a false match. Each entry remembers
//! the revocation generation it was last checked against: while no revocation has come since,
//! a hit needs nothing else.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::jwt::AccessClaims;

/// Shards of the cache (each behind its own lock).
const SHARDS: usize = 16;
/// Bytes of the token's end that are hashed.
const TAIL: usize = 32;

/// A verified token.
struct Entry {
    token: Box<str>,
    claims: Arc<AccessClaims>,
    /// The revocation generation it was last checked against.
    generation: AtomicU64,
}

/// The verified tokens, bounded.
pub(super) struct Cache {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    /// Entries a shard holds at most.
    per_shard: usize,
}

/// Keys are already hashes: the map uses them as they are.
type Shard = HashMap<u64, Entry, BuildHasherDefault<Identity>>;

/// What a hit found.
pub(super) struct Hit {
    /// The token's claims.
    pub claims: Arc<AccessClaims>,
    /// The revocation generation it was last checked against.
    pub generation: u64,
}

impl Cache {
    /// A cache of at most about `capacity` tokens.
    pub fn new(capacity: usize) -> Cache {
        Cache {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    /// The key of `token`.
    pub fn key(&self, token: &str) -> u64 {
        let bytes = token.as_bytes();
        self.hasher
            .hash_one(&bytes[bytes.len().saturating_sub(TAIL)..])
    }

    fn shard(&self, key: u64) -> &RwLock<Shard> {
        &self.shards[(key >> 60) as usize % SHARDS]
    }

    /// The entry of `token`, if it was verified before.
    pub fn get(&self, token: &str, key: u64) -> Option<Hit> {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        let entry = shard.get(&key).filter(|entry| *entry.token == *token)?;
        Some(Hit {
            claims: entry.claims.clone(),
            generation: entry.generation.load(Ordering::Relaxed),
        })
    }

    /// Records that `token` was checked against revocation generation `generation`.
    pub fn checked(&self, token: &str, key: u64, generation: u64) {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = shard.get(&key).filter(|entry| *entry.token == *token) {
            entry.generation.fetch_max(generation, Ordering::Relaxed);
        }
    }

    /// Keeps a verified token. A full shard first drops the tokens expired at `now` (with
    /// `leeway`), then, if still full, half of the rest.
    pub fn insert(
        &self,
        token: &str,
        key: u64,
        claims: Arc<AccessClaims>,
        generation: u64,
        now: u64,
        leeway: u64,
    ) {
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, entry| now < entry.claims.exp.saturating_add(leeway));
            if shard.len() >= self.per_shard {
                let mut keep = false;
                shard.retain(|_, _| {
                    keep = !keep;
                    keep
                });
            }
        }
        shard.insert(
            key,
            Entry {
                token: token.into(),
                claims,
                generation: AtomicU64::new(generation),
            },
        );
    }

    /// Tokens held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// A hasher that passes a `u64` key through.
#[derive(Default)]
pub(super) struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; fold anything else in, should it ever be.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Arc<AccessClaims> {
        Arc::new(AccessClaims {
            iss: "i".into(),
            aud: "a".into(),
            appid: None,
            sub: "1".into(),
            openid: "o".into(),
            unionid: None,
            sid: "s".into(),
            iat: 0,
            exp,
            jti: "j".into(),
        })
    }

    #[test]
    fn a_hit_needs_the_same_token_not_just_the_same_key() {
        let cache = Cache::new(100);
        let key = cache.key("header.payload.signature");
        cache.insert("header.payload.signature", key, claims(10), 3, 0, 0);
        let hit = cache.get("header.payload.signature", key).unwrap();
        assert_eq!((hit.claims.exp, hit.generation), (10, 3));
        // Another token forced onto the same key is a miss.
        assert!(cache.get("other.payload.signature", key).is_none());
        cache.checked("header.payload.signature", key, 5);
        assert_eq!(
            cache
                .get("header.payload.signature", key)
                .unwrap()
                .generation,
            5
        );
        assert_ne!(cache.key("a.b.c"), cache.key("a.b.d"));
    }

    #[test]
    fn a_full_cache_drops_expired_tokens_then_half() {
        let cache = Cache::new(SHARDS * 4);
        for i in 0..1000u64 {
            let token = format!("t.{i}.sig-{i:040}");
            cache.insert(&token, cache.key(&token), claims(i % 2 * 100), 0, 50, 0);
        }
        assert!(cache.len() <= SHARDS * 4, "{}", cache.len());
        assert!(cache.len() >= SHARDS, "{}", cache.len());
    }
}
