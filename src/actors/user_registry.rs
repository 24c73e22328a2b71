//! UserRegistry: the users in sled, registered or refreshed on every login.
//!
//! Writes happen one message at a time, so the upsert of one openid never races another. New
//! registrations and profile or phone updates are answered only once on disk; the wait for the
//! disk happens in a spawned task (group commit), so the actor goes on with the next message.

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

/// The registry keeps nothing in memory beyond its handles: it is rebuilt from sled by design.
pub type UserRegistryState = UserRegistryArgs;

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
    /// Find a user.
    Find(UserKey, RpcReplyPort<Result<Option<User>, Error>>),
    /// How many users are registered.
    Count(RpcReplyPort<Result<usize, Error>>),
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
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.clock.now();
        match message {
            UserRegistryMsg::Upsert(login, reply) => {
                let upserted = state.store.upsert_user(
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
                        if is_new {
                            state.durable_reply(reply, registration);
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
                let found = state.store.find_user(&UserKey::Openid(openid));
                let _ = reply.send(found.and_then(|user| {
                    user.map(|user| user.session_key)
                        .ok_or(Error::InvalidSession)
                }));
            }
            UserRegistryMsg::SaveProfile(openid, profile, reply) => {
                match state.store.save_profile(&openid, &profile, now) {
                    Ok(user) => state.durable_reply(reply, User::from(user)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            UserRegistryMsg::SavePhone(openid, phone, reply) => {
                match state.store.save_phone(&openid, &phone, now) {
                    Ok(user) => state.durable_reply(reply, User::from(user)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            UserRegistryMsg::Count(reply) => {
                let _ = reply.send(Ok(state.store.user_count()));
            }
            UserRegistryMsg::Find(key, reply) => {
                let _ = reply.send(state.store.find_user(&key).map(|user| user.map(User::from)));
            }
            #[cfg(feature = "fault-injection")]
            UserRegistryMsg::Inject(fault) => fault.strike("UserRegistry").await,
        }
        Ok(())
    }
}

impl UserRegistryArgs {
    /// Answers `value` once the writes so far are on disk, without holding up the actor.
    fn durable_reply<T: Send + 'static>(&self, reply: RpcReplyPort<Result<T, Error>>, value: T) {
        self.commit.then(move |durable| {
            let _ = reply.send(durable.map(|()| value));
        });
    }
}
