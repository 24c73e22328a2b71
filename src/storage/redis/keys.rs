//! The signing keys of access tokens in Redis, shared by every broker: `signing_keys` (kid -> the
//! key as JSON, written once) and `signing_keys:retired` (kid -> unix seconds). The first broker
//! to start adds the first key; a rotation on any broker retires every key and adds one, in one
//! script, so that exactly one key signs whatever brokers rotate at once.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;

use super::Redis;
use crate::Error;
use crate::keyring::{AccessPolicy, KeyRecord};
use crate::storage::Pending;

/// ARGV: kid, key JSON ('' to add none). Adds the key if none is stored. Returns the keys and
/// their retirements.
static SIGNING_KEYS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("signing_keys.lua")));

/// ARGV: kid, key JSON, now, keep. Retires every key, drops those retired `keep` seconds ago,
/// adds the new one. Returns as `SIGNING_KEYS`.
static ROTATE_KEYS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("rotate_keys.lua")));

/// What both scripts return: kid -> JSON, kid -> retired_at.
type Stored = (HashMap<String, String>, HashMap<String, u64>);

impl Redis {
    /// The stored keys, after storing `first` if there is none yet.
    pub(crate) fn ensure_keys(&self, first: KeyRecord) -> Pending<Vec<KeyRecord>> {
        self.run(
            &SIGNING_KEYS,
            vec![first.kid.clone(), first.encode()],
            records,
        )
    }

    /// The stored keys.
    pub(crate) fn list_keys(&self) -> Pending<Vec<KeyRecord>> {
        self.run(&SIGNING_KEYS, vec![String::new(), String::new()], records)
    }

    /// Retires every key at `now`, adds `fresh`, drops the keys no longer published.
    pub(crate) fn rotate_keys(
        &self,
        fresh: KeyRecord,
        policy: AccessPolicy,
        now: u64,
    ) -> Pending<Vec<KeyRecord>> {
        let args = vec![
            fresh.kid.clone(),
            fresh.encode(),
            now.to_string(),
            policy.keep().to_string(),
        ];
        self.run(&ROTATE_KEYS, args, records)
    }
}

/// The records of what a script returned.
fn records((keys, retired): Stored) -> Result<Vec<KeyRecord>, Error> {
    keys.into_iter()
        .map(|(kid, json)| {
            let mut key = KeyRecord::decode(json.as_bytes())?;
            key.retired_at = retired.get(&kid).copied();
            Ok(key)
        })
        .collect()
}
