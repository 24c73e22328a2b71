//! The signing keys of access tokens on one machine: the sled tree `signing_keys`
//! (kid -> [`KeyRecord`] as JSON). Synchronous; every change is flushed before it returns, so a
//! key that signed a token is never lost to a crash.

use std::sync::{Arc, Mutex};

use crate::Error;
use crate::keyring::{AccessPolicy, KeyRecord, rotated};

/// The keys' tree. Cheap to clone.
#[derive(Clone)]
pub struct SledKeys {
    tree: ::sled::Tree,
    db: ::sled::Db,
    /// One change at a time (two rotations at once would both retire the same key).
    changing: Arc<Mutex<()>>,
}

impl SledKeys {
    /// Opens the tree in `db`.
    pub fn open(db: &::sled::Db) -> Result<SledKeys, Error> {
        Ok(SledKeys {
            tree: db.open_tree("signing_keys")?,
            db: db.clone(),
            changing: Arc::default(),
        })
    }

    /// Every stored key.
    pub fn list(&self) -> Result<Vec<KeyRecord>, Error> {
        self.tree
            .iter()
            .values()
            .map(|value| KeyRecord::decode(&value?))
            .collect()
    }

    /// The stored keys, after creating the first one at `now` if there is none. Blocks for a
    /// flush when it creates one.
    pub fn ensure(&self, policy: AccessPolicy, now: u64) -> Result<Vec<KeyRecord>, Error> {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let keys = self.list()?;
        if keys.iter().any(|key| key.retired_at.is_none()) {
            return Ok(keys);
        }
        self.write(keys, KeyRecord::generate(now)?, policy, now)
    }

    /// Retires every key, adds a new one that signs from now on, drops those no longer
    /// published. Blocks for a flush.
    pub fn rotate(&self, policy: AccessPolicy, now: u64) -> Result<Vec<KeyRecord>, Error> {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let keys = self.list()?;
        self.write(keys, KeyRecord::generate(now)?, policy, now)
    }

    fn write(
        &self,
        keys: Vec<KeyRecord>,
        fresh: KeyRecord,
        policy: AccessPolicy,
        now: u64,
    ) -> Result<Vec<KeyRecord>, Error> {
        let kept = rotated(keys.clone(), fresh, policy, now);
        for old in &keys {
            if !kept.iter().any(|key| key.kid == old.kid) {
                self.tree.remove(old.kid.as_bytes())?;
            }
        }
        for key in &kept {
            self.tree
                .insert(key.kid.as_bytes(), key.encode().as_bytes())?;
        }
        self.db.flush()?;
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: AccessPolicy = AccessPolicy { ttl: 300 };

    #[test]
    fn the_first_key_is_made_once_and_kept_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let db = crate::storage::sled::open_in(dir.path());
            let keys = SledKeys::open(&db).unwrap();
            let made = keys.ensure(POLICY, 100).unwrap();
            assert_eq!(made.len(), 1);
            assert_eq!(keys.ensure(POLICY, 200).unwrap()[0].kid, made[0].kid);
            made[0].kid.clone()
        };
        let db = crate::storage::sled::open_in(dir.path());
        let keys = SledKeys::open(&db).unwrap();
        assert_eq!(keys.ensure(POLICY, 300).unwrap()[0].kid, first);
    }

    #[test]
    fn rotation_retires_the_signing_key_and_later_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::storage::sled::open_in(dir.path());
        let keys = SledKeys::open(&db).unwrap();
        let policy = POLICY;
        let first = keys.ensure(policy, 100).unwrap().remove(0);
        let after = keys.rotate(policy, 200).unwrap();
        assert_eq!(after.len(), 2);
        let stored = keys.list().unwrap();
        let old = stored.iter().find(|k| k.kid == first.kid).unwrap();
        assert_eq!(old.retired_at, Some(200));
        assert_eq!(stored.iter().filter(|k| k.retired_at.is_none()).count(), 1);

        let later = 200 + policy.keep();
        let after = keys.rotate(policy, later).unwrap();
        assert_eq!(after.len(), 2);
        assert!(keys.list().unwrap().iter().all(|k| k.kid != first.kid));
    }
}
