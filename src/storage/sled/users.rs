//! Users on one machine: sled trees ([`UserDb`], synchronous, tested directly) and the
//! UserRegistry's view of them ([`SledUsers`]), which answers writes once the group commit has
//! made them durable.
//!
//! Trees:
//! - `users`: identity key -> [`UserRecord`] (JSON): the openid for the default app (the only
//!   key before several apps), `appid:openid` for the others ([`identity_key`])
//! - `uids`: uid (big-endian u64) -> the identity key of the uid's first identity, the index for
//!   finding a user by uid
//! - `identities`: uid (big-endian u64) followed by an identity key -> nothing: the identities
//!   that joined the uid later (a login through another app whose unionid the uid holds)
//! - `unionids`: unionid -> uid (big-endian u64), the index for finding a user by unionid
//! - `meta`: `next_uid` -> the next uid to hand out (big-endian u64); `default_app` -> the appid
//!   whose identities are filed without one (the revocation feed keeps its origin and horizon
//!   there too: `revocations.rs`)

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ::sled::Transactional;
use ::sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use super::group_commit::GroupCommit;
use super::{decode, encode};
use crate::Error;
use crate::storage::Pending;
use crate::upstream::Code2Session;
use crate::user::{
    Identity, Phone, Profile, Registration, User, UserKey, UserRecord, identity_key,
};

const NEXT_UID: &[u8] = b"next_uid";
const DEFAULT_APP: &[u8] = b"default_app";

/// The users' trees in the data dir's database. Cheap to clone.
#[derive(Clone)]
pub struct UserDb {
    users: ::sled::Tree,
    uids: ::sled::Tree,
    meta: ::sled::Tree,
    unionids: ::sled::Tree,
    identities: ::sled::Tree,
    /// Identity keys whose registration is not known to be on disk (see [`SledUsers`]): kept here,
    /// with the trees, so that a UserRegistry restarted meanwhile still sees them.
    unflushed: Arc<Mutex<HashSet<String>>>,
}

impl UserDb {
    /// Opens the trees in `db`, dropping what a registration cut short by a crash left.
    pub fn open(db: &::sled::Db) -> Result<UserDb, Error> {
        let users = UserDb {
            users: db.open_tree("users")?,
            uids: db.open_tree("uids")?,
            meta: db.open_tree("meta")?,
            unionids: db.open_tree("unionids")?,
            identities: db.open_tree("identities")?,
            unflushed: Arc::default(),
        };
        users.drop_unfinished_registration()?;
        Ok(users)
    }

    /// The default app recorded by [`UserDb::claim_default_app`], if any yet.
    pub fn default_app(&self) -> Result<Option<String>, Error> {
        let held = self.meta.get(DEFAULT_APP)?;
        Ok(held.map(|appid| String::from_utf8_lossy(&appid).into()))
    }

    /// The default app of this data: `appid` if none was recorded yet (a new data dir, or one
    /// from before several apps), which it then is, durably.
    pub fn claim_default_app(&self, appid: &str) -> Result<String, Error> {
        let claimed =
            self.meta
                .compare_and_swap(DEFAULT_APP, None::<&[u8]>, Some(appid.as_bytes()))?;
        match claimed {
            Ok(()) => {
                self.meta.flush()?;
                Ok(appid.to_owned())
            }
            Err(held) => Ok(String::from_utf8_lossy(&held.current.unwrap_or_default()).into()),
        }
    }

    /// Registers `openid` or refreshes its session_key; returns the user and whether it is new.
    ///
    /// Without sled transactions, which cost a log write of their own each: every write to a
    /// user comes from the one UserRegistry, one at a time, so nothing interleaves. A new user is
    /// written key by key in an order that a crash may cut anywhere without a uid ever being
    /// handed out twice: the uid index first, then the user, then the counter (which
    /// [`UserDb::open`] moves past the largest uid in the index). A `unionid` reported now is kept;
    /// `None` never erases one.
    ///
    /// An identity met for the first time whose `unionid` already belongs to a uid joins that uid
    /// (the person logged in through another of the company's apps): not new. The one writer
    /// makes this atomic too: two first logins of one person through two apps end with one uid.
    pub fn upsert(
        &self,
        appid: Option<&str>,
        openid: &str,
        session_key: &str,
        unionid: Option<&str>,
        now: u64,
    ) -> Result<(UserRecord, bool), Error> {
        let (user, registered) = self.register(appid, openid, session_key, unionid, now)?;
        Ok((user, registered == Registered::NewUid))
    }

    /// [`UserDb::upsert`], saying also whether an identity was written for the first time.
    fn register(
        &self,
        appid: Option<&str>,
        openid: &str,
        session_key: &str,
        unionid: Option<&str>,
        now: u64,
    ) -> Result<(UserRecord, Registered), Error> {
        let key = identity_key(appid, openid);
        let Some(bytes) = self.users.get(key.as_bytes())? else {
            let fresh = |uid| UserRecord {
                uid,
                appid: appid.map(str::to_owned),
                openid: openid.to_owned(),
                unionid: unionid.map(str::to_owned),
                session_key: session_key.to_owned(),
                created_at: now,
                updated_at: now,
                profile: None,
                phone: None,
            };
            if let Some(uid) = self.holder(unionid)? {
                let user = fresh(uid);
                // The link first: a crash before the user leaves a link to nothing, which the
                // listing skips, and the next login joins again.
                self.identities.insert(link(uid, &key), &[])?;
                self.users.insert(key.as_bytes(), encode(&user))?;
                return Ok((user, Registered::Joined));
            }
            let user = fresh(self.next_uid()?);
            self.uids.insert(user.uid.to_be_bytes(), key.as_bytes())?;
            if let Some(unionid) = unionid {
                self.unionids
                    .insert(unionid.as_bytes(), &user.uid.to_be_bytes())?;
            }
            self.users.insert(key.as_bytes(), encode(&user))?;
            self.meta.insert(NEXT_UID, &(user.uid + 1).to_be_bytes())?;
            return Ok((user, Registered::NewUid));
        };
        let old: UserRecord = decode(&bytes)?;
        let mut user = old.clone();
        user.session_key = session_key.to_owned();
        if let Some(unionid) = unionid {
            user.unionid = Some(unionid.to_owned());
        }
        user.updated_at = now;
        if user.unionid == old.unionid {
            self.users.insert(key.as_bytes(), encode(&user))?;
        } else {
            let trees = (&self.users, &self.uids, &self.unionids);
            trees
                .transaction(|(users, uids, unionids)| {
                    write_user(users, uids, unionids, Some(&old), &user)?;
                    Ok::<_, ConflictableTransactionError<Error>>(())
                })
                .map_err(abort_or_storage)?;
        }
        Ok((user, Registered::Known))
    }

    /// The uid that `unionid` belongs to, if it is indexed (to a uid that still has its first
    /// identity).
    fn holder(&self, unionid: Option<&str>) -> Result<Option<u64>, Error> {
        let Some(unionid) = unionid else {
            return Ok(None);
        };
        let Some(uid) = self.unionids.get(unionid.as_bytes())? else {
            return Ok(None);
        };
        Ok(self.uids.contains_key(&uid)?.then_some(decode_u64(&uid)?))
    }

    /// Every identity of `uid`: its first, then those that joined it, in key order.
    pub fn identities(&self, uid: u64) -> Result<Vec<Identity>, Error> {
        let prefix = uid.to_be_bytes();
        let first = self.uids.get(prefix)?;
        let joined = self.identities.scan_prefix(prefix).keys();
        let keys = first
            .into_iter()
            .map(Ok)
            .chain(joined.map(|key| key.map(|key| ::sled::IVec::from(&key[prefix.len()..]))));
        let mut identities = Vec::new();
        for key in keys {
            let Some(bytes) = self.users.get(key?)? else {
                continue;
            };
            let user: UserRecord = decode(&bytes)?;
            if user.uid == uid {
                identities.push(Identity {
                    appid: user.appid,
                    openid: user.openid,
                });
            }
        }
        Ok(identities)
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

    /// Stores a decrypted profile on the user. Its unionId, if any, may confirm the user's
    /// unionid or give one to a user who has none; it never changes one (a login's, WeChat's own
    /// word, or an earlier profile's) nor takes one bound to another uid: then
    /// [`Error::UnionidConflict`] and nothing is stored. The client chooses the IV, so it can
    /// rewrite the start of what decrypts.
    pub fn save_profile(
        &self,
        key: &str,
        profile: &Profile,
        now: u64,
    ) -> Result<UserRecord, Error> {
        let claim = profile.union_id.as_deref();
        self.update_user(key, now, claim, |user| {
            if let Some(unionid) = claim {
                user.unionid = Some(unionid.to_owned());
            }
            user.profile = Some(profile.clone());
        })
    }

    /// Stores a decrypted phone number on the user.
    pub fn save_phone(&self, key: &str, phone: &Phone, now: u64) -> Result<UserRecord, Error> {
        self.update_user(key, now, None, |user| user.phone = Some(phone.clone()))
    }

    /// Replaces the user's session_key `old` by `new` (after WeChat reset it); a key that
    /// changed meanwhile (a login stored a newer one) is kept.
    pub fn replace_session_key(
        &self,
        key: &str,
        old: &str,
        new: &str,
        now: u64,
    ) -> Result<UserRecord, Error> {
        self.update_user(key, now, None, |user| {
            if user.session_key == old {
                user.session_key = new.to_owned();
            }
        })
    }

    /// Changes the user in one transaction. `claim` is a unionid the change names (from
    /// encrypted data): checked against the user's own and the index in the same transaction.
    fn update_user(
        &self,
        key: &str,
        now: u64,
        claim: Option<&str>,
        change: impl Fn(&mut UserRecord),
    ) -> Result<UserRecord, Error> {
        let trees = (&self.users, &self.uids, &self.unionids);
        let result = trees.transaction(|(users, uids, unionids)| {
            let bytes = users.get(key)?.ok_or_else(|| {
                ConflictableTransactionError::Abort(Error::Storage(format!("no user {key}")))
            })?;
            let old: UserRecord = decode(&bytes).map_err(ConflictableTransactionError::Abort)?;
            if let Some(claim) = claim {
                let own = old.unionid.as_deref().is_none_or(|own| own == claim);
                let holder = unionids.get(claim.as_bytes())?;
                let free = holder.is_none_or(|uid| *uid == old.uid.to_be_bytes());
                if !(own && free) {
                    return Err(ConflictableTransactionError::Abort(Error::UnionidConflict));
                }
            }
            let mut user = old.clone();
            change(&mut user);
            user.updated_at = now;
            write_user(users, uids, unionids, Some(&old), &user)?;
            Ok(user)
        });
        result.map_err(abort_or_storage)
    }

    /// Finds a user by uid, openid or unionid.
    pub fn find(&self, key: &UserKey) -> Result<Option<UserRecord>, Error> {
        let (openid, uid) = match key {
            UserKey::Openid(openid) => (Some(sled::IVec::from(openid.as_bytes())), None),
            UserKey::Identity(id) => {
                let key = identity_key(id.appid.as_deref(), &id.openid);
                (Some(sled::IVec::from(key.as_bytes())), None)
            }
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

    /// The user `key` finds, with every identity of its uid.
    pub fn find_user(&self, key: &UserKey) -> Result<Option<User>, Error> {
        let Some(record) = self.find(key)? else {
            return Ok(None);
        };
        let identities = self.identities(record.uid)?;
        let mut user = User::from(record);
        user.identities = identities;
        Ok(Some(user))
    }

    /// Every user, in openid order (for export).
    pub fn iter(&self) -> impl Iterator<Item = Result<UserRecord, Error>> + '_ {
        self.users.iter().map(|entry| decode(&entry?.1))
    }

    /// Up to `limit` users in openid order, those after the openid `after` (from the first without
    /// one): a page of an export while the broker serves. Each user is read whole, as last
    /// written; sled's iterators take no lock a writer waits for, and a user's key (its openid)
    /// never changes, so a walk from page to page meets every user stored all along exactly once.
    pub fn page(&self, after: Option<&str>, limit: usize) -> Result<Vec<UserRecord>, Error> {
        let entries = match after {
            Some(after) => self.users.range::<&[u8], _>((
                std::ops::Bound::Excluded(after.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.users.iter(),
        };
        entries.take(limit).map(|entry| decode(&entry?.1)).collect()
    }

    /// How many users (uids: persons, however many apps they logged in through) are registered.
    /// sled counts by walking the tree: for the admin's stats, not for anything per request.
    pub fn count(&self) -> usize {
        self.uids.len()
    }

    /// Writes a user as it was exported, keeping its uid; the uid counter moves past it so that
    /// the uid is never handed out again. Replaces a user with the same openid.
    pub fn import(&self, user: &UserRecord) -> Result<(), Error> {
        let trees = (
            &self.users,
            &self.uids,
            &self.meta,
            &self.unionids,
            &self.identities,
        );
        let result = trees.transaction(|(users, uids, meta, unionids, identities)| {
            let key = user.key();
            let mut joins = None;
            if let Some(owner) = uids.get(user.uid.to_be_bytes())?
                && owner != key.as_bytes()
            {
                // Another identity of the uid: of another app it joins the uid (an export of
                // several apps), of the same app it is a conflict.
                let owner_app = match users.get(&owner)? {
                    Some(bytes) => {
                        decode::<UserRecord>(&bytes)
                            .map_err(ConflictableTransactionError::Abort)?
                            .appid
                    }
                    None => None,
                };
                if owner_app == user.appid {
                    return Err(ConflictableTransactionError::Abort(Error::InvalidRequest(
                        format!("uid {} already belongs to another openid", user.uid),
                    )));
                }
                joins = Some(owner);
            }
            let old = match users.get(key.as_bytes())? {
                Some(bytes) => Some(
                    decode::<UserRecord>(&bytes).map_err(ConflictableTransactionError::Abort)?,
                ),
                None => None,
            };
            if let Some(old) = &old
                && old.uid != user.uid
            {
                // The identity leaves its old uid: as that uid's first identity, or as one that
                // joined it (whose first identity stays where it is).
                let old_uid = old.uid.to_be_bytes();
                if uids.get(old_uid)?.as_deref() == Some(key.as_bytes()) {
                    uids.remove(&old_uid)?;
                } else {
                    identities.remove(link(old.uid, &key))?;
                }
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
            match joins {
                // The default app's identity is a uid's first, whatever order the lines come in.
                Some(owner) if user.appid.is_none() => {
                    let owner = String::from_utf8_lossy(&owner);
                    identities.insert(link(user.uid, &owner), &[])?;
                    uids.insert(&user.uid.to_be_bytes(), key.as_bytes())?;
                }
                Some(_) => {
                    identities.insert(link(user.uid, &key), &[])?;
                }
                None => {
                    uids.insert(&user.uid.to_be_bytes(), key.as_bytes())?;
                }
            }
            write_user(users, uids, unionids, old.as_ref(), user)?;
            Ok(())
        });
        result.map_err(abort_or_storage)
    }
}

/// What a login did to the users' trees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Registered {
    /// A new identity with a new uid: a new user.
    NewUid,
    /// A new identity that joined the uid of its unionid.
    Joined,
    /// An identity already stored.
    Known,
}

/// The `identities` key that links the identity `key` to `uid`.
fn link(uid: u64, key: &str) -> Vec<u8> {
    let mut link = uid.to_be_bytes().to_vec();
    link.extend_from_slice(key.as_bytes());
    link
}

/// Writes a user and keeps the unionid index in step with it.
fn write_user(
    users: &TransactionalTree,
    uids: &TransactionalTree,
    unionids: &TransactionalTree,
    old: Option<&UserRecord>,
    user: &UserRecord,
) -> Result<(), UnabortableTransactionError> {
    let old_unionid = old.and_then(|old| old.unionid.as_deref());
    let uid = user.uid.to_be_bytes();
    if old_unionid != user.unionid.as_deref() {
        // The index names the uid that first held a unionid: an identity that gets one later
        // (its app bound to the Open Platform since) keeps its own uid and takes no other's.
        // An old unionid's entry goes with the uid's first identity only: one that joined the
        // uid leaves it to the first, which still holds it.
        let first = uids
            .get(uid)?
            .is_some_and(|key| *key == *user.key().as_bytes());
        if let Some(old_unionid) = old_unionid
            && first
            && unionids
                .get(old_unionid.as_bytes())?
                .is_some_and(|held| *held == uid)
        {
            unionids.remove(old_unionid.as_bytes())?;
        }
        if let Some(unionid) = &user.unionid
            && unionids.get(unionid.as_bytes())?.is_none()
        {
            unionids.insert(unionid.as_bytes(), &uid)?;
        }
    }
    users.insert(user.key().as_bytes(), encode(user))?;
    Ok(())
}

fn abort_or_storage(err: TransactionError<Error>) -> Error {
    match err {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

fn decode_u64(bytes: &[u8]) -> Result<u64, Error> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::Storage("corrupt uid counter".into()))?;
    Ok(u64::from_be_bytes(array))
}

/// The users in sled, answered once durable.
///
/// A registration is marked not yet durable when it is written ([`UserDb`] keeps the marks), and
/// the mark is cleared by the first flush after it that succeeds (a failed one leaves it). A login
/// of a marked user waits for a flush too: answering it earlier would acknowledge a uid a crash
/// could still take back.
pub struct SledUsers {
    users: UserDb,
    commit: GroupCommit,
}

impl SledUsers {
    /// The users in `users`, made durable by `commit`.
    pub fn new(users: UserDb, commit: GroupCommit) -> SledUsers {
        SledUsers { users, commit }
    }

    pub(crate) fn upsert(
        &mut self,
        appid: Option<&str>,
        login: Code2Session,
        now: u64,
    ) -> Pending<Registration> {
        let upserted = self.users.register(
            appid,
            &login.openid,
            &login.session_key,
            login.unionid.as_deref(),
            now,
        );
        let (user, registered) = match upserted {
            Ok(upserted) => upserted,
            Err(e) => return Pending::Ready(Err(e)),
        };
        let is_new = registered == Registered::NewUid;
        // A joined identity is answered once durable too: its uid is acknowledged with it.
        let written = registered != Registered::Known;
        let key = user.key().into_owned();
        let registration = Registration {
            uid: user.uid,
            openid: user.openid,
            unionid: user.unionid,
            is_new,
        };
        {
            let mut pending = self.users.unflushed.lock().expect("unflushed lock");
            if !written && !pending.contains(&key) {
                return Pending::Ready(Ok(registration));
            }
            pending.insert(key.clone());
        }
        let (commit, pending) = (self.commit.clone(), self.users.unflushed.clone());
        Pending::Later(Box::pin(async move {
            let durable = commit.durable().await;
            if durable.is_ok() {
                // This flush began after the registration was written, whichever login waited.
                pending.lock().expect("unflushed lock").remove(&key);
            }
            durable.map(|()| registration)
        }))
    }

    pub(crate) fn session_key(&self, key: &str) -> Pending<String> {
        // `Openid` finds by the key as it is: the default app's keys are the openids.
        let found = self.users.find(&UserKey::Openid(key.to_owned()));
        Pending::Ready(found.and_then(|user| {
            user.map(|user| user.session_key)
                .ok_or(Error::InvalidSession)
        }))
    }

    pub(crate) fn save_profile(&mut self, key: &str, profile: &Profile, now: u64) -> Pending<User> {
        self.commit
            .after(self.users.save_profile(key, profile, now).map(User::from))
    }

    pub(crate) fn save_phone(&mut self, key: &str, phone: &Phone, now: u64) -> Pending<User> {
        self.commit
            .after(self.users.save_phone(key, phone, now).map(User::from))
    }

    pub(crate) fn replace_session_key(
        &mut self,
        key: &str,
        old: &str,
        new: &str,
        now: u64,
    ) -> Pending<User> {
        self.commit.after(
            self.users
                .replace_session_key(key, old, new, now)
                .map(User::from),
        )
    }

    pub(crate) fn find(&self, key: &UserKey) -> Pending<Option<User>> {
        Pending::Ready(self.users.find_user(key))
    }

    pub(crate) fn count(&self) -> Pending<usize> {
        Pending::Ready(Ok(self.users.count()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> (::sled::Db, UserDb) {
        let db = crate::storage::sled::open_in(dir.path());
        let users = UserDb::open(&db).unwrap();
        (db, users)
    }

    #[test]
    fn a_joined_identity_whose_unionid_changes_leaves_the_uids_entry_to_its_first() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, users) = open(&dir);
        let (ann, _) = users.upsert(None, "o-ann", "k1", Some("u-ann"), 1).unwrap();
        let (lite, _) = users
            .upsert(Some("wxlite"), "l-ann", "k2", Some("u-ann"), 2)
            .unwrap();
        assert_eq!(lite.uid, ann.uid);
        // The lite app moved to another Open Platform account: WeChat names another unionid.
        users
            .upsert(Some("wxlite"), "l-ann", "k3", Some("u-ann-2"), 3)
            .unwrap();
        let holder = users.find(&UserKey::Unionid("u-ann".into())).unwrap();
        assert_eq!(holder.map(|user| user.uid), Some(ann.uid));
        // The first identity's own change still moves the entry.
        users
            .upsert(None, "o-ann", "k4", Some("u-ann-3"), 4)
            .unwrap();
        assert_eq!(users.find(&UserKey::Unionid("u-ann".into())).unwrap(), None);
        let holder = users.find(&UserKey::Unionid("u-ann-3".into())).unwrap();
        assert_eq!(holder.map(|user| user.uid), Some(ann.uid));
    }

    #[test]
    fn a_registration_cut_short_by_a_crash_never_hands_its_uid_out_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, users) = open(&dir);
            users.upsert(None, "o-a", "k", None, 100).unwrap();
            // As if the process died after the index entry of o-b's registration, the first of
            // its writes: no user, no counter.
            users.uids.insert(2u64.to_be_bytes(), "o-b").unwrap();
            db.flush().unwrap();
        }
        let (_db, users) = open(&dir);
        assert_eq!(users.find(&UserKey::Uid(2)).unwrap(), None);
        // o-b logs in again: a new uid, and uid 2 never names it nor anyone else.
        let (b, new) = users.upsert(None, "o-b", "k", None, 200).unwrap();
        assert!(new);
        assert_eq!(b.uid, 3);
        assert_eq!(users.find(&UserKey::Uid(2)).unwrap(), None);
        assert_eq!(users.find(&UserKey::Uid(3)).unwrap().unwrap().openid, "o-b");
        let (c, _) = users.upsert(None, "o-c", "k", None, 300).unwrap();
        assert_eq!(c.uid, 4);
    }

    #[test]
    fn new_users_get_increasing_uids_and_known_ones_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, users) = open(&dir);
        let (alice, new) = users.upsert(None, "o-alice", "k1", None, 100).unwrap();
        assert!(new);
        assert_eq!(alice.uid, 1);
        let (bob, new) = users.upsert(None, "o-bob", "k2", None, 101).unwrap();
        assert!(new);
        assert_eq!(bob.uid, 2);

        let (again, new) = users
            .upsert(None, "o-alice", "k3", Some("u-alice"), 200)
            .unwrap();
        assert!(!new);
        assert_eq!(again.uid, 1);
        assert_eq!(again.session_key, "k3");
        assert_eq!(again.unionid.as_deref(), Some("u-alice"));
        assert_eq!((again.created_at, again.updated_at), (100, 200));

        // A later login without unionid does not erase it.
        let (later, _) = users.upsert(None, "o-alice", "k4", None, 300).unwrap();
        assert_eq!(later.unionid.as_deref(), Some("u-alice"));
        assert_eq!(users.find(&UserKey::Uid(1)).unwrap().unwrap(), later);
        assert_eq!(
            users
                .find(&UserKey::Unionid("u-alice".into()))
                .unwrap()
                .unwrap(),
            later
        );
        assert_eq!(
            users
                .find(&UserKey::Openid("o-bob".into()))
                .unwrap()
                .unwrap()
                .uid,
            2
        );
        assert_eq!(users.find(&UserKey::Uid(3)).unwrap(), None);
        assert_eq!(
            users.find(&UserKey::Unionid("u-nobody".into())).unwrap(),
            None
        );
    }

    #[test]
    fn profiles_and_phones_are_stored_and_index_the_unionid() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, users) = open(&dir);
        users.upsert(None, "o-eve", "k", None, 1).unwrap();
        let profile = Profile {
            open_id: Some("o-eve".into()),
            union_id: Some("u-eve".into()),
            nick_name: Some("Eve".into()),
            ..Profile::default()
        };
        let user = users.save_profile("o-eve", &profile, 5).unwrap();
        assert_eq!(
            (user.unionid.as_deref(), user.updated_at),
            (Some("u-eve"), 5)
        );
        let phone = Phone {
            phone_number: "13800138000".into(),
            pure_phone_number: "13800138000".into(),
            country_code: "86".into(),
        };
        users.save_phone("o-eve", &phone, 6).unwrap();
        let found = users
            .find(&UserKey::Unionid("u-eve".into()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.profile, found.phone),
            (Some(profile), Some(phone.clone()))
        );
        assert!(matches!(
            users.save_phone("o-nobody", &phone, 7),
            Err(Error::Storage(_))
        ));
    }

    #[test]
    fn a_profile_confirms_a_unionid_but_never_changes_nor_moves_one() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, users) = open(&dir);
        users.upsert(None, "o-ann", "k", Some("u-ann"), 1).unwrap();
        users.upsert(None, "o-bob", "k", None, 1).unwrap();
        let claiming = |unionid: &str| Profile {
            union_id: Some(unionid.into()),
            nick_name: Some("forged".into()),
            ..Profile::default()
        };
        // Another user's unionid, and a unionid other than the one the login gave.
        for (openid, unionid) in [("o-bob", "u-ann"), ("o-ann", "u-evil")] {
            assert_eq!(
                users.save_profile(openid, &claiming(unionid), 2),
                Err(Error::UnionidConflict)
            );
        }
        let ann = users
            .find(&UserKey::Openid("o-ann".into()))
            .unwrap()
            .unwrap();
        let bob = users
            .find(&UserKey::Openid("o-bob".into()))
            .unwrap()
            .unwrap();
        assert_eq!((ann.unionid.as_deref(), ann.profile), (Some("u-ann"), None));
        assert_eq!((bob.unionid, bob.profile, bob.updated_at), (None, None, 1));
        let index = |unionid: &str| users.find(&UserKey::Unionid(unionid.into())).unwrap();
        assert_eq!(index("u-ann").unwrap().openid, "o-ann");
        assert_eq!(index("u-evil"), None);

        // The same unionid again is fine; a free one goes to a user without any, then stays.
        users.save_profile("o-ann", &claiming("u-ann"), 3).unwrap();
        users.save_profile("o-bob", &claiming("u-bob"), 3).unwrap();
        assert_eq!(index("u-bob").unwrap().openid, "o-bob");
        assert_eq!(
            users.save_profile("o-bob", &claiming("u-bob2"), 4),
            Err(Error::UnionidConflict)
        );
        assert_eq!(index("u-bob2"), None);
    }

    #[test]
    fn pages_give_every_user_once_while_users_come_and_change() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, users) = open(&dir);
        for i in 0..25 {
            users
                .upsert(None, &format!("o-{i:02}"), "k", None, 1)
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        for round in 0.. {
            let page = users.page(after.as_deref(), 10).unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.openid.clone());
            seen.extend(page.iter().map(|user| user.openid.clone()));
            // Between pages: a user before the cursor and one after it change, new ones come.
            users.upsert(None, "o-00", "k2", None, 2).unwrap();
            users.upsert(None, "o-24", "k2", None, 2).unwrap();
            users
                .upsert(None, &format!("o-new-{round}"), "k", None, 2)
                .unwrap();
        }
        let before: Vec<String> = (0..25).map(|i| format!("o-{i:02}")).collect();
        assert!(
            seen.windows(2).all(|pair| pair[0] < pair[1]),
            "in openid order, none twice: {seen:?}"
        );
        for openid in &before {
            assert!(seen.contains(openid), "{openid}");
        }
    }

    #[test]
    fn uids_are_not_reused_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, users) = open(&dir);
            users.upsert(None, "o-1", "k", None, 1).unwrap();
            users.upsert(None, "o-2", "k", None, 1).unwrap();
            db.flush().unwrap();
        }
        let (_db, users) = open(&dir);
        let (user, new) = users.upsert(None, "o-3", "k", None, 2).unwrap();
        assert!(new);
        assert_eq!(user.uid, 3);
        let (old, new) = users.upsert(None, "o-1", "k2", None, 3).unwrap();
        assert_eq!((old.uid, new), (1, false));
    }

    #[test]
    fn an_identity_of_another_app_joins_the_uid_of_its_unionid_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, users) = open(&dir);
            let (main, new) = users.upsert(None, "o-ann", "k1", Some("u-ann"), 1).unwrap();
            assert_eq!((main.uid, new), (1, true));
            let (lite, new) = users
                .upsert(Some("wx-lite"), "l-ann", "k2", Some("u-ann"), 2)
                .unwrap();
            assert_eq!(
                (lite.uid, new, lite.appid.as_deref()),
                (1, false, Some("wx-lite"))
            );
            // Without a unionid, a stranger; a unionid nobody holds, a new uid too.
            let (bob, new) = users
                .upsert(Some("wx-lite"), "l-bob", "k", None, 3)
                .unwrap();
            assert_eq!((bob.uid, new), (2, true));
            let (cy, new) = users
                .upsert(Some("wx-lite"), "l-cy", "k", Some("u-cy"), 3)
                .unwrap();
            assert_eq!((cy.uid, new), (3, true));
            db.flush().unwrap();
        }
        let (_db, users) = open(&dir);
        let ann = users.find_user(&UserKey::Uid(1)).unwrap().unwrap();
        assert_eq!((ann.appid, ann.openid.as_str()), (None, "o-ann"));
        let listed: Vec<_> = ann
            .identities
            .iter()
            .map(|id| (id.appid.as_deref(), id.openid.as_str()))
            .collect();
        assert_eq!(listed, [(None, "o-ann"), (Some("wx-lite"), "l-ann")]);
        // Each identity keeps its own session_key; the default app's key is its openid alone.
        let lite = Identity {
            appid: Some("wx-lite".into()),
            openid: "l-ann".into(),
        };
        let found = users.find(&UserKey::Identity(lite)).unwrap().unwrap();
        assert_eq!((found.uid, found.session_key.as_str()), (1, "k2"));
        assert_eq!(users.find(&UserKey::Openid("l-ann".into())).unwrap(), None);
        assert_eq!(
            users
                .find(&UserKey::Openid("o-ann".into()))
                .unwrap()
                .unwrap()
                .session_key,
            "k1"
        );
        // The next new person after reopening gets a fresh uid.
        let (dee, new) = users.upsert(None, "o-dee", "k", None, 4).unwrap();
        assert_eq!((dee.uid, new), (4, true));
    }
}
