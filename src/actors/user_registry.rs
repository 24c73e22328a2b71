//! UserRegistry: the users in sled, registered or refreshed on every login.
//!
//! Writes happen one message at a time, so the upsert of one openid never races another. New
//! registrations and profile or phone updates are answered only once on disk; the wait for the
//! disk happens in a spawned task (group commit), so the actor goes on with the next message.

use std::collections::HashMap;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::group_commit::GroupCommit;
use crate::store::{Store, UserKey};
use crate::upstream::Code2Session;
use crate::user::{Phone, Profile, User};
use crate::{Clock, Error};

/// The actor. Configuration comes in [`UserRegistryArgs`].
pub struct UserRegistry;

/// What the registry is started with (and its whole state: everything else is in sled).
#[derive(Clone)]
pub struct UserRegistryArgs {
    /// The database.
    pub store: Store,
    /// Shared flushes, for registrations that must be durable before the answer.
    pub commit: GroupCommit,
    /// Source of created/updated times.
    pub clock: Clock,
}

/// The registry's handles, and the registrations written but not yet on disk.
pub struct UserRegistryState {
    args: UserRegistryArgs,
    /// Openids whose registration waits for its flush. A second login of such a user must wait
    /// for it too: answering it earlier would acknowledge a uid a crash could still take back.
    pending: HashMap<String, usize>,
}

/// The outcome of a login for the user's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The user's stable id.
    pub uid: u64,
    /// The user's openid.
    pub openid: String,
    /// The unionid, if WeChat ever reported one.
    pub unionid: Option<String>,
    /// Whether this login created the user.
    pub is_new: bool,
}

/// Messages of the registry.
pub enum UserRegistryMsg {
    /// Register the user WeChat named, or store its new session_key.
    Upsert(Code2Session, RpcReplyPort<Result<Registration, Error>>),
    /// The current session_key of the user with this openid.
    SessionKey(String, RpcReplyPort<Result<String, Error>>),
    /// Store a decrypted profile on the user with this openid, durably.
    SaveProfile(String, Profile, RpcReplyPort<Result<User, Error>>),
    /// Store a decrypted phone number on the user with this openid, durably.
    SavePhone(String, Phone, RpcReplyPort<Result<User, Error>>),
    /// Replace the session_key of the user with this openid, durably (after WeChat reset it).
    SetSessionKey(String, String, RpcReplyPort<Result<User, Error>>),
    /// Find a user.
    Find(UserKey, RpcReplyPort<Result<Option<User>, Error>>),
    /// How many users are registered.
    Count(RpcReplyPort<Result<usize, Error>>),
    /// The flush that made this openid's registration durable has completed.
    Flushed(String),
    /// Test hook: suffer a fault inside the handler.
    #[cfg(feature = "fault-injection")]
    Inject(crate::Fault),
}

impl Actor for UserRegistry {
    type Msg = UserRegistryMsg;
    type State = UserRegistryState;
    type Arguments = UserRegistryArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: UserRegistryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(UserRegistryState {
            args,
            pending: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.args.clock.now();
        match message {
            UserRegistryMsg::Upsert(login, reply) => {
                let upserted = state.args.store.upsert_user(
                    &login.openid,
                    &login.session_key,
                    login.unionid.as_deref(),
                    now,
                );
                match upserted {
                    Ok((user, is_new)) => {
                        let registration = Registration {
                            uid: user.uid,
                            openid: user.openid,
                            unionid: user.unionid,
                            is_new,
                        };
                        if is_new || state.pending.contains_key(&registration.openid) {
                            *state
                                .pending
                                .entry(registration.openid.clone())
                                .or_default() += 1;
                            let openid = registration.openid.clone();
                            state.args.commit.then(move |durable| {
                                let _ = myself.cast(UserRegistryMsg::Flushed(openid));
                                let _ = reply.send(durable.map(|()| registration));
                            });
                        } else {
                            let _ = reply.send(Ok(registration));
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            UserRegistryMsg::SessionKey(openid, reply) => {
                let found = state.args.store.find_user(&UserKey::Openid(openid));
                let _ = reply.send(found.and_then(|user| {
                    user.map(|user| user.session_key)
                        .ok_or(Error::InvalidSession)
                }));
            }
            UserRegistryMsg::SaveProfile(openid, profile, reply) => {
                match state.args.store.save_profile(&openid, &profile, now) {
                    Ok(user) => state.durable_reply(reply, User::from(user)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            UserRegistryMsg::SavePhone(openid, phone, reply) => {
                match state.args.store.save_phone(&openid, &phone, now) {
                    Ok(user) => state.durable_reply(reply, User::from(user)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            UserRegistryMsg::SetSessionKey(openid, session_key, reply) => {
                match state.args.store.set_session_key(&openid, &session_key, now) {
                    Ok(user) => state.durable_reply(reply, User::from(user)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            UserRegistryMsg::Flushed(openid) => {
                if let Some(waiting) = state.pending.get_mut(&openid) {
                    *waiting -= 1;
                    if *waiting == 0 {
                        state.pending.remove(&openid);
                    }
                }
            }
            UserRegistryMsg::Count(reply) => {
                let _ = reply.send(Ok(state.args.store.user_count()));
            }
            UserRegistryMsg::Find(key, reply) => {
                let _ = reply.send(
                    state
                        .args
                        .store
                        .find_user(&key)
                        .map(|user| user.map(User::from)),
                );
            }
            #[cfg(feature = "fault-injection")]
            UserRegistryMsg::Inject(fault) => fault.strike("UserRegistry").await,
        }
        Ok(())
    }
}

impl UserRegistryState {
    /// Answers `value` once the writes so far are on disk, without holding up the actor.
    fn durable_reply<T: Send + 'static>(&self, reply: RpcReplyPort<Result<T, Error>>, value: T) {
        self.args.commit.then(move |durable| {
            let _ = reply.send(durable.map(|()| value));
        });
    }
}
