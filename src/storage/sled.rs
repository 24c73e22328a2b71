//! Storage on one machine, in the data dir: users in sled trees ([`users`]), with the signing keys
//! of access tokens ([`keys`]) and the revocation feed ([`revocations`]); sessions in an
//! in-memory table ([`sessions`]) rebuilt at start from their own append-only log
//! ([`session_log`]), and one background task that makes both durable for every writer that waits
//! ([`group_commit`]). Everything here but the group commit and the export's last flush
//! ([`DataDir::flush_users`]) is synchronous and free of actors, so it is tested directly.
//!
//! Who may read it? The directory is created 0700 and every file in it is made 0600 at opening
//! (the database holds every user's session_key in plaintext); the session log creates its own
//! files 0600. Files sled creates later follow the process umask (the binary sets 0077) inside the
//! 0700 directory.
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

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
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

/// What sled says of a data dir that another process (or another broker in this one) holds open.
pub const LOCKED: &str = "could not acquire lock";
/// How long opening waits for another holder of the data dir's lock to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled as `config` says, waiting up to [`LOCK_WAIT`] for its lock: a database closed a
/// moment ago in this process (an embedder's restart, a test's reopen) lets go of it only when
/// sled's last thread for it ends, which can come just after its last handle was dropped.
pub(crate) fn open_waiting(config: &::sled::Config) -> ::sled::Result<::sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(e) if e.to_string().contains(LOCKED) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            opened => return opened,
        }
    }
}

/// A test's sled database in `dir`, opened as a reopen after a drop needs ([`open_waiting`]).
#[cfg(test)]
pub(crate) fn open_in(dir: &std::path::Path) -> ::sled::Db {
    open_waiting(&::sled::Config::new().path(dir)).unwrap()
}

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
    /// Group-commit flushes still to fail on purpose (`fault-injection` only).
    #[cfg(feature = "fault-injection")]
    failing_flushes: Arc<std::sync::atomic::AtomicU32>,
}

impl DataDir {
    /// Opens (or creates) the data dir `dir` with a page cache of `cache_mb` MiB.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<DataDir, Error> {
        // sled would create it with the umask's mode; an existing one is the operator's choice.
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    Error::Storage(format!(
                        "cannot create the data dir {}: {e}. Point WXBROKER_DATA_DIR at a \
                         writable place",
                        dir.display()
                    ))
                })?;
        }
        let config = ::sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb * 1024 * 1024);
        let db = open_waiting(&config).map_err(|e| {
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
            #[cfg(feature = "fault-injection")]
            failing_flushes: Arc::default(),
        };
        data.move_sessions_out_of_sled()?;
        restrict_files(dir);
        Ok(data)
    }

    /// Makes the group commit's next `n` flushes fail without writing anything, as a disk that
    /// refuses writes would (`fault-injection` only).
    #[cfg(feature = "fault-injection")]
    pub fn fail_flushes(&self, n: u32) {
        self.failing_flushes
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether this flush is to fail on purpose (counting it).
    #[cfg(feature = "fault-injection")]
    pub(crate) fn injected_flush_failure(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let failing = &self.failing_flushes;
        failing
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
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

/// Takes away what the group and others may do with the files in `dir` (sled's, written with the
/// umask's mode) and its directories. A file that cannot be changed is named in a WARN, not an
/// error: the broker still works.
fn restrict_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let (path, Ok(meta)) = (entry.path(), entry.metadata()) else {
            continue;
        };
        let mode = meta.permissions().mode();
        let wanted = match meta.is_dir() {
            true => mode & 0o700,
            false => mode & 0o600,
        };
        if wanted != mode & 0o777 {
            let restricted = std::fs::set_permissions(&path, PermissionsExt::from_mode(wanted));
            if let Err(e) = restricted {
                tracing::warn!(file = %path.display(), error = %e, "cannot restrict the mode");
            }
        }
        if meta.is_dir() {
            restrict_files(&path);
        }
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

    /// The mode of `path` and of everything under it, as (path, mode) pairs.
    fn modes(path: &Path) -> Vec<(std::path::PathBuf, u32)> {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let mut found = vec![(path.to_owned(), mode)];
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                found.extend(modes(&entry.unwrap().path()));
            }
        }
        found
    }

    #[test]
    fn the_data_dir_is_created_0700_and_every_file_in_it_made_0600() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let data = DataDir::open(&dir, 8).unwrap();
        data.users().upsert(None, "o-1", "k", None, 1).unwrap();
        data.session_log()
            .put(&[1; 32], &SessionRecord::sample(1, None))
            .unwrap();
        data.flush().unwrap();
        drop(data);
        // As an earlier version (or a umask of 022) left them.
        std::fs::write(dir.join("stray"), b"x").unwrap();
        for (path, _) in modes(&dir).into_iter().skip(1) {
            let open = if path.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(&path, PermissionsExt::from_mode(open)).unwrap();
        }

        let data = DataDir::open(&dir, 8).unwrap();
        assert!(data.session_log().compact().unwrap().is_some());
        let found = modes(&dir);
        assert!(found.len() > 4, "{found:?}");
        for (path, mode) in found {
            let expected = if path.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode, expected, "{}", path.display());
        }
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
