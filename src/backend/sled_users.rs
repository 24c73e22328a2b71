//! Users on one machine: sled trees, written at once, made durable through the group commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Pending;
use crate::Error;
use crate::actors::user_registry::Registration;
use crate::group_commit::GroupCommit;
use crate::store::{Store, UserKey, UserRecord};
use crate::upstream::Code2Session;
use crate::user::{Phone, Profile, User};

/// The users in sled, and the registrations written but not yet on disk.
pub struct SledUsers {
    store: Store,
    commit: GroupCommit,
    /// Openids whose registration waits for its flush. A second login of such a user must wait
    /// for it too: answering it earlier would acknowledge a uid a crash could still take back.
    pending: Arc<Mutex<HashMap<String, usize>>>,
}

impl SledUsers {
    /// The users in `store`.
    pub fn new(store: Store, commit: GroupCommit) -> SledUsers {
        SledUsers {
            store,
            commit,
            pending: Arc::default(),
        }
    }

    pub(super) fn upsert(&mut self, login: Code2Session, now: u64) -> Pending<Registration> {
        let upserted = self.store.upsert_user(
            &login.openid,
            &login.session_key,
            login.unionid.as_deref(),
            now,
        );
        let (user, is_new) = match upserted {
            Ok(upserted) => upserted,
            Err(e) => return Pending::Ready(Err(e)),
        };
        let registration = Registration {
            uid: user.uid,
            openid: user.openid,
            unionid: user.unionid,
            is_new,
        };
        let openid = registration.openid.clone();
        {
            let mut pending = self.pending.lock().expect("pending lock");
            if !is_new && !pending.contains_key(&openid) {
                return Pending::Ready(Ok(registration));
            }
            *pending.entry(openid.clone()).or_default() += 1;
        }
        let (commit, pending) = (self.commit.clone(), self.pending.clone());
        Pending::Later(Box::pin(async move {
            let durable = commit.durable().await;
            let mut pending = pending.lock().expect("pending lock");
            if let Some(waiting) = pending.get_mut(&openid) {
                *waiting -= 1;
                if *waiting == 0 {
                    pending.remove(&openid);
                }
            }
            durable.map(|()| registration)
        }))
    }

    pub(super) fn session_key(&self, openid: &str) -> Pending<String> {
        let found = self.store.find_user(&UserKey::Openid(openid.to_owned()));
        Pending::Ready(found.and_then(|user| {
            user.map(|user| user.session_key)
                .ok_or(Error::InvalidSession)
        }))
    }

    pub(super) fn save_profile(
        &mut self,
        openid: &str,
        profile: &Profile,
        now: u64,
    ) -> Pending<User> {
        self.durable(self.store.save_profile(openid, profile, now))
    }

    pub(super) fn save_phone(&mut self, openid: &str, phone: &Phone, now: u64) -> Pending<User> {
        self.durable(self.store.save_phone(openid, phone, now))
    }

    pub(super) fn replace_session_key(
        &mut self,
        openid: &str,
        old: &str,
        new: &str,
        now: u64,
    ) -> Pending<User> {
        self.durable(self.store.replace_session_key(openid, old, new, now))
    }

    pub(super) fn find(&self, key: &UserKey) -> Pending<Option<User>> {
        Pending::Ready(self.store.find_user(key).map(|user| user.map(User::from)))
    }

    pub(super) fn count(&self) -> Pending<usize> {
        Pending::Ready(Ok(self.store.user_count()))
    }

    /// The user once the write is on disk, or the write's error at once.
    fn durable(&self, written: Result<UserRecord, Error>) -> Pending<User> {
        match written {
            Ok(user) => {
                let commit = self.commit.clone();
                Pending::Later(Box::pin(async move {
                    commit.durable().await.map(|()| User::from(user))
                }))
            }
            Err(e) => Pending::Ready(Err(e)),
        }
    }
}
