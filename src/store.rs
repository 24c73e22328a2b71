//! Users in sled trees, sessions in their own log. Synchronous and actor-free, so it is tested
//! directly.
//!
//! Trees:
//! - `users`: openid -> [`UserRecord`] (JSON)
//! - `uids`: uid (big-endian u64) -> openid, the index for finding a user by uid
//! - `unionids`: unionid -> uid (big-endian u64), the index for finding a user by unionid
//! - `meta`: `next_uid` -> the next uid to hand out (big-endian u64)
//!
//! Sessions: `sessions.log` ([`crate::session_log`]), SHA-256 of a token -> [`SessionRecord`]; the
//! token itself is never stored. Versions before it kept them in a `sessions` tree, which
//! [`Store::open`] moves into the log.

use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use crate::Error;
use crate::crypto::TokenHash;
use crate::session_log::SessionLog;
use crate::user::{Phone, Profile, User};

const NEXT_UID: &[u8] = b"next_uid";

/// A registered mini program user as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    /// Our own stable id for the user: handed out once, never reused.
    pub uid: u64,
    /// The user's id within this mini program.
    pub openid: String,
    /// The user's id across the company's WeChat apps, once WeChat reveals it.
    pub unionid: Option<String>,
    /// The current session_key (base64, as WeChat sent it). Never leaves the process.
    pub session_key: String,
    /// Unix seconds of the first login.
    pub created_at: u64,
    /// Unix seconds of the last change (login or profile update).
    pub updated_at: u64,
    /// The latest decrypted profile.
    #[serde(default)]
    pub profile: Option<Profile>,
    /// The latest decrypted phone number.
    #[serde(default)]
    pub phone: Option<Phone>,
}

impl From<UserRecord> for User {
    fn from(record: UserRecord) -> User {
        User {
            uid: record.uid,
            openid: record.openid,
            unionid: record.unionid,
            profile: record.profile,
            phone: record.phone,
            created_at: record.created_at,
            updated_at: record.updated_at,
        }
    }
}

/// How to find a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserKey {
    /// By our uid.
    Uid(u64),
    /// By openid.
    Openid(String),
    /// By unionid.
    Unionid(String),
}

/// A live session as stored, keyed by the hash of its token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// The user the session belongs to.
    pub uid: u64,
    /// Copied from the user so that a check needs no second lookup.
    pub openid: String,
    /// Copied from the user at login.
    pub unionid: Option<String>,
    /// Unix seconds of the login that issued the token.
    pub created_at: u64,
    /// Unix seconds of the last use that was persisted (uses in between slide it in memory only).
    pub last_seen: u64,
    /// Unix seconds after which the token is dead whatever its use (the absolute TTL).
    pub expires_at: u64,
}

#[cfg(test)]
impl SessionRecord {
    /// A session of user `uid` (openid `o{uid}`), for the store's tests.
    pub(crate) fn sample(uid: u64, unionid: Option<&str>) -> SessionRecord {
        SessionRecord {
            uid,
            openid: format!("o{uid}"),
            unionid: unionid.map(str::to_owned),
            created_at: 10,
            last_seen: 20,
            expires_at: 30,
        }
    }
}

/// The broker's embedded database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    users: sled::Tree,
    uids: sled::Tree,
    meta: sled::Tree,
    unionids: sled::Tree,
    sessions: Arc<SessionLog>,
}

impl Store {
    /// Opens (or creates) the database in `dir` with a page cache of `cache_mb` MiB.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Store, Error> {
        let db = sled::Config::new()
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
        let store = Store {
            users: db.open_tree("users")?,
            uids: db.open_tree("uids")?,
            meta: db.open_tree("meta")?,
            unionids: db.open_tree("unionids")?,
            sessions: Arc::new(SessionLog::open(dir)?),
            db,
        };
        store.drop_unfinished_registration()?;
        store.move_sessions_out_of_sled()?;
        Ok(store)
    }

    /// The underlying database, for what only touches users.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Puts every write made so far on disk: users and sessions.
    pub fn flush(&self) -> Result<(), Error> {
        self.sessions.flush()?;
        self.db.flush()?;
        Ok(())
    }

    /// [`Store::flush`] without blocking the runtime; the group commit's one disk sync.
    pub async fn flush_async(&self) -> Result<(), Error> {
        let (sessions, db) = tokio::join!(self.flush_sessions(), self.db.flush_async());
        sessions?;
        db?;
        Ok(())
    }

    /// Puts the sessions written so far on disk, without blocking the runtime.
    pub async fn flush_sessions(&self) -> Result<(), Error> {
        let sessions = self.sessions.clone();
        tokio::task::spawn_blocking(move || sessions.flush())
            .await
            .map_err(|e| Error::Storage(format!("writing the session log failed: {e}")))?
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
                self.sessions.put(&hash, &decode(&value)?)
            });
            match moved_one {
                Ok(()) => moved += 1,
                // A session can always be given up (its user logs in again); the broker cannot.
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable session record"),
            }
        }
        self.sessions.flush()?;
        self.db.drop_tree("sessions")?;
        // Made durable before anything else is written: a tree coming back would be moved again,
        // over removals written since.
        self.db.flush()?;
        tracing::info!(sessions = moved, "moved the sessions into the session log");
        Ok(())
    }

    /// Registers `openid` or refreshes its session_key; returns the user and whether it is new.
    ///
    /// Without sled transactions, which cost a log write of their own each: every write to a
    /// user comes from the one UserRegistry, one at a time, so nothing interleaves. A new user is
    /// written key by key in an order that a crash may cut anywhere without a uid ever being
    /// handed out twice: the uid index first, then the user, then the counter (which
    /// [`Store::open`] moves past the largest uid in the index). A `unionid` reported now is kept;
    /// `None` never erases one.
    pub fn upsert_user(
        &self,
        openid: &str,
        session_key: &str,
        unionid: Option<&str>,
        now: u64,
    ) -> Result<(UserRecord, bool), Error> {
        let Some(bytes) = self.users.get(openid)? else {
            let user = UserRecord {
                uid: self.next_uid()?,
                openid: openid.to_owned(),
                unionid: unionid.map(str::to_owned),
                session_key: session_key.to_owned(),
                created_at: now,
                updated_at: now,
                profile: None,
                phone: None,
            };
            self.uids
                .insert(user.uid.to_be_bytes(), openid.as_bytes())?;
            if let Some(unionid) = unionid {
                self.unionids
                    .insert(unionid.as_bytes(), &user.uid.to_be_bytes())?;
            }
            self.users.insert(openid.as_bytes(), encode(&user))?;
            self.meta.insert(NEXT_UID, &(user.uid + 1).to_be_bytes())?;
            return Ok((user, true));
        };
        let old: UserRecord = decode(&bytes)?;
        let mut user = old.clone();
        user.session_key = session_key.to_owned();
        if let Some(unionid) = unionid {
            user.unionid = Some(unionid.to_owned());
        }
        user.updated_at = now;
        if user.unionid == old.unionid {
            self.users.insert(openid.as_bytes(), encode(&user))?;
        } else {
            let trees = (&self.users, &self.unionids);
            trees
                .transaction(|(users, unionids)| {
                    write_user(users, unionids, Some(&old), &user)?;
                    Ok::<_, ConflictableTransactionError<Error>>(())
                })
                .map_err(abort_or_storage)?;
        }
        Ok((user, false))
    }

    /// The uid the next new user gets: past the counter and past every uid in the index (a
    /// registration cut short by a crash may have written its index entry only).
    fn next_uid(&self) -> Result<u64, Error> {
        let counter = match self.meta.get(NEXT_UID)? {
            Some(bytes) => decode_u64(&bytes)?,
            None => 1,
        };
        let past_index = match self.uids.last()? {
            Some((largest, _)) => decode_u64(&largest)? + 1,
            None => 1,
        };
        Ok(counter.max(past_index))
    }

    /// Removes what a registration cut short by a crash left: index entries at or past the
    /// counter whose user is missing or has another uid. Their uids stay spent.
    fn drop_unfinished_registration(&self) -> Result<(), Error> {
        let counter = match self.meta.get(NEXT_UID)? {
            Some(bytes) => decode_u64(&bytes)?,
            None => 1,
        };
        let next = self.next_uid()?;
        for entry in self.uids.range(counter.to_be_bytes()..) {
            let (uid, openid) = entry?;
            let finished = match self.users.get(&openid)? {
                Some(bytes) => decode::<UserRecord>(&bytes)?.uid.to_be_bytes() == *uid,
                None => false,
            };
            if !finished {
                self.uids.remove(&uid)?;
            }
        }
        if next > counter {
            self.meta.insert(NEXT_UID, &next.to_be_bytes())?;
        }
        Ok(())
    }

    /// Stores a decrypted profile on the user; its unionId, if any, becomes the user's unionid.
    pub fn save_profile(
        &self,
        openid: &str,
        profile: &Profile,
        now: u64,
    ) -> Result<UserRecord, Error> {
        self.update_user(openid, now, |user| {
            if let Some(unionid) = &profile.union_id {
                user.unionid = Some(unionid.clone());
            }
            user.profile = Some(profile.clone());
        })
    }

    /// Stores a decrypted phone number on the user.
    pub fn save_phone(&self, openid: &str, phone: &Phone, now: u64) -> Result<UserRecord, Error> {
        self.update_user(openid, now, |user| user.phone = Some(phone.clone()))
    }

    /// Replaces the user's session_key `old` by `new` (after WeChat reset it); a key that
    /// changed meanwhile (a login stored a newer one) is kept.
    pub fn replace_session_key(
        &self,
        openid: &str,
        old: &str,
        new: &str,
        now: u64,
    ) -> Result<UserRecord, Error> {
        self.update_user(openid, now, |user| {
            if user.session_key == old {
                user.session_key = new.to_owned();
            }
        })
    }

    fn update_user(
        &self,
        openid: &str,
        now: u64,
        change: impl Fn(&mut UserRecord),
    ) -> Result<UserRecord, Error> {
        let trees = (&self.users, &self.unionids);
        let result = trees.transaction(|(users, unionids)| {
            let bytes = users.get(openid)?.ok_or_else(|| {
                ConflictableTransactionError::Abort(Error::Storage(format!("no user {openid}")))
            })?;
            let old: UserRecord = decode(&bytes).map_err(ConflictableTransactionError::Abort)?;
            let mut user = old.clone();
            change(&mut user);
            user.updated_at = now;
            write_user(users, unionids, Some(&old), &user)?;
            Ok(user)
        });
        result.map_err(abort_or_storage)
    }

    /// Finds a user by uid, openid or unionid.
    pub fn find_user(&self, key: &UserKey) -> Result<Option<UserRecord>, Error> {
        let (openid, uid) = match key {
            UserKey::Openid(openid) => (Some(sled::IVec::from(openid.as_bytes())), None),
            UserKey::Uid(uid) => (self.uids.get(uid.to_be_bytes())?, Some(*uid)),
            UserKey::Unionid(unionid) => match self.unionids.get(unionid)? {
                Some(uid) => (self.uids.get(&uid)?, Some(decode_u64(&uid)?)),
                None => (None, None),
            },
        };
        let Some(openid) = openid else {
            return Ok(None);
        };
        let user: Option<UserRecord> = self.users.get(openid)?.map(|b| decode(&b)).transpose()?;
        // An index entry left by an unfinished registration names a user with another uid.
        Ok(user.filter(|user| uid.is_none_or(|uid| user.uid == uid)))
    }

    /// Every user, in openid order (for export).
    pub fn users(&self) -> impl Iterator<Item = Result<UserRecord, Error>> + '_ {
        self.users.iter().map(|entry| decode(&entry?.1))
    }

    /// How many users are registered. sled counts by walking the tree: for the admin's stats,
    /// not for anything per request.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Writes a user as it was exported, keeping its uid; the uid counter moves past it so that
    /// the uid is never handed out again. Replaces a user with the same openid.
    pub fn import_user(&self, user: &UserRecord) -> Result<(), Error> {
        let trees = (&self.users, &self.uids, &self.meta, &self.unionids);
        let result = trees.transaction(|(users, uids, meta, unionids)| {
            if let Some(owner) = uids.get(user.uid.to_be_bytes())?
                && owner != user.openid.as_bytes()
            {
                return Err(ConflictableTransactionError::Abort(Error::InvalidRequest(
                    format!("uid {} already belongs to another openid", user.uid),
                )));
            }
            let old = match users.get(user.openid.as_bytes())? {
                Some(bytes) => Some(
                    decode::<UserRecord>(&bytes).map_err(ConflictableTransactionError::Abort)?,
                ),
                None => None,
            };
            if let Some(old) = &old
                && old.uid != user.uid
            {
                uids.remove(&old.uid.to_be_bytes())?;
            }
            let next = match meta.get(NEXT_UID)? {
                Some(bytes) => decode_u64(&bytes).map_err(ConflictableTransactionError::Abort)?,
                None => 1,
            };
            if user.uid >= next {
                let after = user.uid.checked_add(1).ok_or_else(|| {
                    ConflictableTransactionError::Abort(Error::InvalidRequest(
                        "uid is too large to leave room for new users".into(),
                    ))
                })?;
                meta.insert(NEXT_UID, &after.to_be_bytes())?;
            }
            uids.insert(&user.uid.to_be_bytes(), user.openid.as_bytes())?;
            write_user(users, unionids, old.as_ref(), user)?;
            Ok(())
        });
        result.map_err(abort_or_storage)
    }

    /// Writes (or overwrites) a session. Not flushed: the caller decides what must be durable.
    pub fn put_session(&self, hash: &TokenHash, session: &SessionRecord) -> Result<(), Error> {
        self.sessions.put(hash, session)
    }

    /// Deletes sessions. Not flushed either.
    pub fn remove_sessions<'a>(&self, hashes: impl IntoIterator<Item = &'a TokenHash>) {
        self.sessions.remove(hashes);
    }

    /// Every stored session, for rebuilding the SessionKeeper's table at start.
    pub fn sessions(&self) -> Result<impl Iterator<Item = (TokenHash, SessionRecord)>, Error> {
        Ok(self.sessions.sessions()?.into_iter())
    }

    /// Whether the session log holds so many superseded records beside the `live` ones that it is
    /// worth rewriting ([`Store::compact_sessions`]): at most a quarter of the file is live.
    pub fn sessions_need_compacting(&self, live: usize) -> bool {
        self.sessions.frames() > 4 * live as u64 + COMPACT_SLACK
    }

    /// Rewrites the session log with `live`, which must be every stored session.
    pub fn compact_sessions<'a>(
        &self,
        live: impl IntoIterator<Item = (&'a TokenHash, &'a SessionRecord)>,
    ) -> Result<(), Error> {
        self.sessions.compact(live)
    }
}

/// Superseded records tolerated whatever the number of live sessions, so that a small table is
/// not rewritten over and over.
const COMPACT_SLACK: u64 = 100_000;

/// Writes a user and keeps the unionid index in step with it.
fn write_user(
    users: &TransactionalTree,
    unionids: &TransactionalTree,
    old: Option<&UserRecord>,
    user: &UserRecord,
) -> Result<(), UnabortableTransactionError> {
    let old_unionid = old.and_then(|old| old.unionid.as_deref());
    if old_unionid != user.unionid.as_deref() {
        if let Some(old_unionid) = old_unionid {
            unionids.remove(old_unionid.as_bytes())?;
        }
        if let Some(unionid) = &user.unionid {
            unionids.insert(unionid.as_bytes(), &user.uid.to_be_bytes())?;
        }
    }
    users.insert(user.openid.as_bytes(), encode(user))?;
    Ok(())
}

fn abort_or_storage(err: TransactionError<Error>) -> Error {
    match err {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Storage(format!("corrupt record: {e}")))
}

fn decode_u64(bytes: &[u8]) -> Result<u64, Error> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::Storage("corrupt uid counter".into()))?;
    Ok(u64::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(dir.path(), 8).unwrap()
    }

    #[test]
    fn a_registration_cut_short_by_a_crash_never_hands_its_uid_out_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = store(&dir);
            store.upsert_user("o-a", "k", None, 100).unwrap();
            // As if the process died after the index entry of o-b's registration, the first of
            // its writes: no user, no counter.
            store.uids.insert(2u64.to_be_bytes(), "o-b").unwrap();
            store.db().flush().unwrap();
        }
        let store = store(&dir);
        assert_eq!(store.find_user(&UserKey::Uid(2)).unwrap(), None);
        // o-b logs in again: a new uid, and uid 2 never names it nor anyone else.
        let (b, new) = store.upsert_user("o-b", "k", None, 200).unwrap();
        assert!(new);
        assert_eq!(b.uid, 3);
        assert_eq!(store.find_user(&UserKey::Uid(2)).unwrap(), None);
        assert_eq!(
            store.find_user(&UserKey::Uid(3)).unwrap().unwrap().openid,
            "o-b"
        );
        let (c, _) = store.upsert_user("o-c", "k", None, 300).unwrap();
        assert_eq!(c.uid, 4);
    }

    #[test]
    fn new_users_get_increasing_uids_and_known_ones_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let (alice, new) = store.upsert_user("o-alice", "k1", None, 100).unwrap();
        assert!(new);
        assert_eq!(alice.uid, 1);
        let (bob, new) = store.upsert_user("o-bob", "k2", None, 101).unwrap();
        assert!(new);
        assert_eq!(bob.uid, 2);

        let (again, new) = store
            .upsert_user("o-alice", "k3", Some("u-alice"), 200)
            .unwrap();
        assert!(!new);
        assert_eq!(again.uid, 1);
        assert_eq!(again.session_key, "k3");
        assert_eq!(again.unionid.as_deref(), Some("u-alice"));
        assert_eq!((again.created_at, again.updated_at), (100, 200));

        // A later login without unionid does not erase it.
        let (later, _) = store.upsert_user("o-alice", "k4", None, 300).unwrap();
        assert_eq!(later.unionid.as_deref(), Some("u-alice"));
        assert_eq!(store.find_user(&UserKey::Uid(1)).unwrap().unwrap(), later);
        assert_eq!(
            store
                .find_user(&UserKey::Unionid("u-alice".into()))
                .unwrap()
                .unwrap(),
            later
        );
        assert_eq!(
            store
                .find_user(&UserKey::Openid("o-bob".into()))
                .unwrap()
                .unwrap()
                .uid,
            2
        );
        assert_eq!(store.find_user(&UserKey::Uid(3)).unwrap(), None);
        assert_eq!(
            store
                .find_user(&UserKey::Unionid("u-nobody".into()))
                .unwrap(),
            None
        );
    }

    #[test]
    fn profiles_and_phones_are_stored_and_index_the_unionid() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        store.upsert_user("o-eve", "k", None, 1).unwrap();
        let profile = Profile {
            open_id: Some("o-eve".into()),
            union_id: Some("u-eve".into()),
            nick_name: Some("Eve".into()),
            ..Profile::default()
        };
        let user = store.save_profile("o-eve", &profile, 5).unwrap();
        assert_eq!(
            (user.unionid.as_deref(), user.updated_at),
            (Some("u-eve"), 5)
        );
        let phone = Phone {
            phone_number: "13800138000".into(),
            pure_phone_number: "13800138000".into(),
            country_code: "86".into(),
        };
        store.save_phone("o-eve", &phone, 6).unwrap();
        let found = store
            .find_user(&UserKey::Unionid("u-eve".into()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.profile, found.phone),
            (Some(profile), Some(phone.clone()))
        );
        assert!(matches!(
            store.save_phone("o-nobody", &phone, 7),
            Err(Error::Storage(_))
        ));
    }

    #[test]
    fn uids_are_not_reused_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = store(&dir);
            store.upsert_user("o-1", "k", None, 1).unwrap();
            store.upsert_user("o-2", "k", None, 1).unwrap();
            store.db().flush().unwrap();
        }
        let store = store(&dir);
        let (user, new) = store.upsert_user("o-3", "k", None, 2).unwrap();
        assert!(new);
        assert_eq!(user.uid, 3);
        let (old, new) = store.upsert_user("o-1", "k2", None, 3).unwrap();
        assert_eq!((old.uid, new), (1, false));
    }

    #[test]
    fn sessions_round_trip_are_removed_and_survive_a_reopen_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        store
            .put_session(&[1; 32], &SessionRecord::sample(1, None))
            .unwrap();
        store
            .put_session(&[2; 32], &SessionRecord::sample(2, None))
            .unwrap();
        store
            .put_session(&[3; 32], &SessionRecord::sample(3, None))
            .unwrap();
        let all: HashMap<_, _> = store.sessions().unwrap().collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[&[1; 32]], SessionRecord::sample(1, None));

        store.remove_sessions(&[[2; 32], [3; 32]]);
        store.flush().unwrap();
        drop(store);
        let store = self::store(&dir);
        let all: Vec<_> = store.sessions().unwrap().collect();
        assert_eq!(all, [([1; 32], SessionRecord::sample(1, None))]);
    }

    #[test]
    fn sessions_kept_in_a_sled_tree_by_earlier_versions_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let tree = db.open_tree("sessions").unwrap();
            tree.insert([1; 32], encode(&SessionRecord::sample(1, None)))
                .unwrap();
            tree.insert([2; 32], encode(&SessionRecord::sample(2, None)))
                .unwrap();
            tree.insert(b"not a hash", encode(&SessionRecord::sample(3, None)))
                .unwrap();
            db.flush().unwrap();
        }
        let store = store(&dir);
        let moved: HashMap<_, _> = store.sessions().unwrap().collect();
        assert_eq!(moved.len(), 2);
        assert_eq!(moved[&[2; 32]], SessionRecord::sample(2, None));
        assert!(!store.db().tree_names().contains(&"sessions".into()));
        drop(store);

        let store = self::store(&dir);
        assert_eq!(store.sessions().unwrap().collect::<HashMap<_, _>>(), moved);
    }

    #[test]
    fn an_unopenable_directory_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = Store::open(&file, 8).err().unwrap();
        assert!(
            matches!(&err, Error::Storage(m) if m.contains("not-a-dir")),
            "{err}"
        );
    }
}
