//! The domain's words for signing keys: a key as stored ([`KeyRecord`]), the set a broker signs
//! and publishes with ([`KeyRing`]), and how long retired keys and revocations are kept
//! ([`AccessPolicy`]). Depends on nothing of ours but `jwt` and `error`.
//!
//! One key signs at a time (the newest, never retired). Rotation retires it; a retired key stays
//! published until every token it can have signed has expired: its retirement, plus the tokens'
//! lifetime, plus [`ACCESS_SLACK`] (which also covers a broker on a shared store that signs with
//! it for a few seconds more, until it rereads the keys).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::TryRng;
use rand::rngs::SysRng;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::jwt::{AccessClaims, Jwk, JwkSet, SigningKey, VerifyingKey, sign, thumbprint};

/// Seconds beyond an access token's lifetime that its key stays published and a revocation stays
/// in the feed: covers a token signed just after a check that a revocation then overtook, brokers
/// that reread the keys every few seconds, and the verifiers' leeway on `exp`.
pub const ACCESS_SLACK: u64 = 60;

/// How long access tokens live, and what follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Seconds an access token lives at most (`WXBROKER_ACCESS_TOKEN_TTL`, > 0).
    pub ttl: u64,
}

impl AccessPolicy {
    /// Seconds a retired key stays published, and a revocation stays in the feed, after the fact.
    pub fn keep(&self) -> u64 {
        self.ttl + ACCESS_SLACK
    }

    /// Whether `key` is still published at `now`.
    pub fn published(&self, key: &KeyRecord, now: u64) -> bool {
        key.retired_at
            .is_none_or(|retired| now < retired.saturating_add(self.keep()))
    }
}

/// A signing key as the store keeps it. The seed is the private key: it never leaves the store
/// but to sign, and `Debug` does not show it.
#[derive(Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key's id: the thumbprint of its public key.
    pub kid: String,
    /// The 32-byte Ed25519 seed, base64url.
    #[serde(with = "seed")]
    seed: [u8; 32],
    /// Unix seconds of its creation.
    pub created_at: u64,
    /// Unix seconds at which a newer key replaced it; `None` while it signs.
    pub retired_at: Option<u64>,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

impl KeyRecord {
    /// A new key from 32 bytes of the OS CSPRNG.
    pub fn generate(now: u64) -> Result<KeyRecord, Error> {
        let mut seed = [0u8; 32];
        SysRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| Error::Unavailable(format!("the OS RNG failed: {e}")))?;
        let kid = thumbprint(&SigningKey::from_bytes(&seed).verifying_key());
        Ok(KeyRecord {
            kid,
            seed,
            created_at: now,
            retired_at: None,
        })
    }

    /// The private key.
    fn signing_key(&self) -> SigningKey {
        SigningKey::from_bytes(&self.seed)
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing_key().verifying_key()
    }

    /// The stored form (JSON), for the stores.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a key record serializes")
    }

    /// A record from its stored form.
    pub fn decode(text: &[u8]) -> Result<KeyRecord, Error> {
        serde_json::from_slice(text)
            .map_err(|e| Error::Storage(format!("a signing key record is corrupt: {e}")))
    }
}

/// The keys after a rotation at `now`: every key retired, a `fresh` one added to sign, and those
/// no longer published dropped.
pub fn rotated(
    mut keys: Vec<KeyRecord>,
    fresh: KeyRecord,
    policy: AccessPolicy,
    now: u64,
) -> Vec<KeyRecord> {
    for key in &mut keys {
        key.retired_at.get_or_insert(now);
    }
    keys.retain(|key| policy.published(key, now));
    keys.push(fresh);
    keys
}

/// The keys a broker signs and publishes with, as read from the store at one moment.
pub struct KeyRing {
    /// The key that signs: the newest of those never retired.
    active: (String, SigningKey),
    /// Every published key, newest first.
    published: Vec<(KeyRecord, VerifyingKey)>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("active", &self.active.0)
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// The ring of `keys` at `now`; `None` if none of them may sign.
    pub fn new(keys: &[KeyRecord], policy: AccessPolicy, now: u64) -> Option<KeyRing> {
        let active = keys
            .iter()
            .filter(|key| key.retired_at.is_none())
            .max_by_key(|key| (key.created_at, key.kid.clone()))?;
        let mut published: Vec<_> = keys
            .iter()
            .filter(|key| policy.published(key, now))
            .map(|key| (key.clone(), key.verifying_key()))
            .collect();
        published.sort_by_key(|(key, _)| std::cmp::Reverse(key.created_at));
        Some(KeyRing {
            active: (active.kid.clone(), active.signing_key()),
            published,
        })
    }

    /// The id of the key that signs.
    pub fn active_kid(&self) -> &str {
        &self.active.0
    }

    /// `claims` signed with the active key.
    pub fn sign(&self, claims: &AccessClaims) -> String {
        sign(&self.active.1, &self.active.0, claims)
    }

    /// The published keys as a JWK Set.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.published.iter().map(|(_, key)| Jwk::of(key)).collect(),
        }
    }

    /// The published keys' records (kid and times; the seed stays inside).
    pub fn published(&self) -> impl Iterator<Item = &KeyRecord> {
        self.published.iter().map(|(key, _)| key)
    }
}

/// The seed as base64url in the stored JSON.
mod seed {
    use super::*;

    pub fn serialize<S: serde::Serializer>(seed: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(seed))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut seed = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(&text, &mut seed) {
            Ok(32) => Ok(seed),
            _ => Err(serde::de::Error::custom(
                "a key seed is not 32 bytes of base64url",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: AccessPolicy = AccessPolicy { ttl: 300 };

    #[test]
    fn the_newest_unretired_key_signs_and_retired_ones_stay_published_for_a_while() {
        let first = KeyRecord::generate(100).unwrap();
        let ring = KeyRing::new(std::slice::from_ref(&first), POLICY, 100).unwrap();
        assert_eq!(ring.active_kid(), first.kid);

        let second = KeyRecord::generate(200).unwrap();
        let keys = rotated(vec![first.clone()], second.clone(), POLICY, 200);
        assert_eq!(keys[0].retired_at, Some(200));
        let ring = KeyRing::new(&keys, POLICY, 200).unwrap();
        assert_eq!(ring.active_kid(), second.kid);
        let kids: Vec<_> = ring.jwks().keys.into_iter().map(|k| k.kid).collect();
        assert_eq!(kids, [second.kid.clone(), first.kid.clone()]);

        // Until its tokens have expired, and the slack on top.
        let last = 200 + 300 + ACCESS_SLACK - 1;
        assert_eq!(
            KeyRing::new(&keys, POLICY, last).unwrap().jwks().keys.len(),
            2
        );
        let ring = KeyRing::new(&keys, POLICY, last + 1).unwrap();
        assert_eq!(ring.jwks().keys.len(), 1);
        // The next rotation drops it from the store too.
        let third = KeyRecord::generate(last + 1).unwrap();
        let keys = rotated(keys, third, POLICY, last + 1);
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|k| k.kid != first.kid));
    }

    #[test]
    fn the_seed_is_stored_but_never_shown() {
        let key = KeyRecord::generate(1).unwrap();
        let seed = URL_SAFE_NO_PAD.encode(key.seed);
        assert!(key.encode().contains(&seed));
        let back = KeyRecord::decode(key.encode().as_bytes()).unwrap();
        assert_eq!(back.verifying_key(), key.verifying_key());
        let ring = KeyRing::new(std::slice::from_ref(&key), POLICY, 1).unwrap();
        for shown in [format!("{key:?}"), format!("{ring:?}")] {
            assert!(
                !shown.contains(&seed) && shown.contains(&key.kid),
                "{shown}"
            );
        }
        assert!(KeyRecord::decode(br#"{"kid":"k","seed":"AAAA","created_at":1}"#).is_err());
    }
}
