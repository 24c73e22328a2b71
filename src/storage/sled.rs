//! Storage on one machine, in the data dir: users in sled trees ([`users`]), with the signing keys
//! of access tokens ([`keys`]) and the revocation feed ([`revocations`]); sessions in an
//! in-memory table ([`sessions`]) rebuilt at start from their own append-only log
//! ([`session_log`]), and one background task that makes both durable for every writer that waits
//! ([`group_commit`]). Everything here but the group commit is synchronous and free of actors, so
//! it is tested directly.
//!
//! When is a write durable? Registrations, profile, phone and session_key updates, logouts and
//! revocations (with their events in the revocation feed) are answered only after the group
//! commit's next flush; a session issued or slid
//! is written to the log's buffer at once and reaches the disk with the next flush, which comes at
//! most [`group_commit::SESSION_LOG_EVERY`] later.

pub mod group_commit;
pub mod keys;
pub mod revocations;
pub mod session_log;
pub mod sessions;
pub mod users;

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use self::keys::SledKeys;
use self::revocations::SledRevocations;
use self::session_log::SessionLog;
use self::users::UserDb;
use crate::Error;
use crate::crypto::TokenHash;

/// A broker's data dir, opened: the sled database (users) and the session log. Cheap to clone.
#[derive(Clone)]
pub struct DataDir {
    db: ::sled::Db,
    users: UserDb,
    log: Arc<SessionLog>,
    /// The signing keys of access tokens.
    keys: SledKeys,
    /// The revocation feed.
    revocations: Arc<SledRevocations>,
}

impl DataDir {
    /// Opens (or creates) the data dir `dir` with a page cache of `cache_mb` MiB.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<DataDir, Error> {
        let db = ::sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb * 1024 * 1024)
            .open()
            .map_err(|e| {
                Error::Storage(format!(
                    "cannot open the database in {}: {e}. Check that the directory is writable \
                     and that no other wxbroker uses it, or point WXBROKER_DATA_DIR elsewhere",
                    dir.display()
                ))
            })?;
        let data = DataDir {
            users: UserDb::open(&db)?,
            log: Arc::new(SessionLog::open(dir)?),
            keys: SledKeys::open(&db)?,
            revocations: Arc::new(SledRevocations::open(&db)?),
            db,
        };
        data.move_sessions_out_of_sled()?;
        Ok(data)
    }

    /// The users.
    pub fn users(&self) -> &UserDb {
        &self.users
    }

    /// The sessions on disk.
    pub fn session_log(&self) -> &Arc<SessionLog> {
        &self.log
    }

    /// The signing keys of access tokens.
    pub fn keys(&self) -> &SledKeys {
        &self.keys
    }

    /// The revocation feed.
    pub fn revocations(&self) -> &Arc<SledRevocations> {
        &self.revocations
    }

    /// Puts every write made so far on disk, users and sessions. Blocks: the group commit calls
    /// it on tokio's blocking pool.
    pub fn flush(&self) -> Result<(), Error> {
        self.log.flush()?;
        self.db.flush()?;
        Ok(())
    }

    /// Puts the users' writes so far on disk, without blocking the runtime (the group commit
    /// runs it beside the session log's flush).
    pub async fn flush_users(&self) -> Result<(), Error> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Whether the database answers a read.
    pub fn answers(&self) -> bool {
        self.db.contains_key(b"readyz").is_ok()
    }

    /// Moves the sessions a version before the log kept in a sled tree into the log (once: the
    /// tree is dropped after the log is synced; a crash in between moves the same records again).
    fn move_sessions_out_of_sled(&self) -> Result<(), Error> {
        if !self.db.tree_names().iter().any(|name| name == b"sessions") {
            return Ok(());
        }
        let tree = self.db.open_tree("sessions")?;
        let mut moved = 0;
        for entry in tree.iter() {
            let moved_one = entry.map_err(Error::from).and_then(|(key, value)| {
                let hash = <TokenHash>::try_from(key.as_ref())
                    .map_err(|_| Error::Storage("a session key is not 32 bytes".into()))?;
                self.log.put(&hash, &decode(&value)?)
            });
            match moved_one {
                Ok(()) => moved += 1,
                // A session can always be given up (its user logs in again); the broker cannot.
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable session record"),
            }
        }
        self.log.flush()?;
        self.db.drop_tree("sessions")?;
        // Made durable before anything else is written: a tree coming back would be moved again,
        // over removals written since.
        self.db.flush()?;
        tracing::info!(sessions = moved, "moved the sessions into the session log");
        Ok(())
    }
}

/// JSON, the encoding of sled's records.
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Storage(format!("corrupt record: {e}")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::session::SessionRecord;

    fn open(dir: &tempfile::TempDir) -> DataDir {
        DataDir::open(dir.path(), 8).unwrap()
    }

    #[test]
    fn sessions_round_trip_are_removed_and_survive_a_reopen_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let data = open(&dir);
        data.session_log()
            .put(&[1; 32], &SessionRecord::sample(1, None))
            .unwrap();
        data.session_log()
            .put(&[2; 32], &SessionRecord::sample(2, None))
            .unwrap();
        data.session_log()
            .put(&[3; 32], &SessionRecord::sample(3, None))
            .unwrap();
        let all: HashMap<_, _> = data.session_log().replay().unwrap().into_iter().collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[&[1; 32]], SessionRecord::sample(1, None));

        data.session_log().remove(&[[2; 32], [3; 32]]);
        data.flush().unwrap();
        drop(data);
        let data = open(&dir);
        let all: Vec<_> = data.session_log().replay().unwrap().into_iter().collect();
        assert_eq!(all, [([1; 32], SessionRecord::sample(1, None))]);
    }

    #[test]
    fn sessions_kept_in_a_sled_tree_by_earlier_versions_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = ::sled::open(dir.path()).unwrap();
            let tree = db.open_tree("sessions").unwrap();
            tree.insert([1; 32], encode(&SessionRecord::sample(1, None)))
                .unwrap();
            tree.insert([2; 32], encode(&SessionRecord::sample(2, None)))
                .unwrap();
            tree.insert(b"not a hash", encode(&SessionRecord::sample(3, None)))
                .unwrap();
            db.flush().unwrap();
        }
        let data = open(&dir);
        let moved: HashMap<_, _> = data.session_log().replay().unwrap().into_iter().collect();
        assert_eq!(moved.len(), 2);
        assert_eq!(moved[&[2; 32]], SessionRecord::sample(2, None));
        assert!(!data.db.tree_names().contains(&"sessions".into()));
        drop(data);

        let data = open(&dir);
        assert_eq!(data.session_log().replay().unwrap(), moved);
    }

    #[test]
    fn an_unopenable_directory_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = DataDir::open(&file, 8).err().unwrap();
        assert!(
            matches!(&err, Error::Storage(m) if m.contains("not-a-dir")),
            "{err}"
        );
    }
}
