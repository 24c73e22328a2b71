//! UserRegistry: the users, registered or refreshed on every login.
//!
//! Writes start one message at a time, so the upsert of one openid never races another on this
//! broker (and the storage's upsert is atomic, so neither across brokers). New registrations and
//! profile or phone updates are answered only once durable; that wait happens in a spawned task,
//! so the actor goes on with the next message. Where users are kept is the storage's business
//! ([`crate::storage::Users`]).

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::answer;
use crate::storage::{Storage, Users};
use crate::upstream::Code2Session;
use crate::user::{Phone, Profile, Registration, User, UserKey};
use crate::{Clock, Error};

/// The actor. Configuration comes in [`UserRegistryArgs`].
pub struct UserRegistry;

/// What the registry is started with.
#[derive(Clone)]
pub struct UserRegistryArgs {
    /// Where users are kept.
    pub storage: Storage,
    /// Source of created/updated times.
    pub clock: Clock,
}

/// The registry's view of the users.
pub struct UserRegistryState {
    users: Users,
    clock: Clock,
}

/// Messages of the registry.
pub enum UserRegistryMsg {
    /// Register the identity WeChat named in the app (`None`: the default app), or store its new
    /// session_key; a new identity whose unionid a uid holds joins that uid.
    Upsert(
        Option<String>,
        Code2Session,
        RpcReplyPort<Result<Registration, Error>>,
    ),
    /// The current session_key of the identity with this key (`crate::user::identity_key`;
    /// the messages below name identities so too).
    SessionKey(String, RpcReplyPort<Result<String, Error>>),
    /// Store a decrypted profile on the user with this openid, durably; refused
    /// (`UnionidConflict`) when its unionid differs from the user's or is another user's.
    SaveProfile(String, Profile, RpcReplyPort<Result<User, Error>>),
    /// Store a decrypted phone number on the user with this openid, durably.
    SavePhone(String, Phone, RpcReplyPort<Result<User, Error>>),
    /// Replace the session_key of the user with this openid, durably (after WeChat reset it),
    /// unless it is no longer the one that was reset.
    ReplaceSessionKey {
        /// The user's openid.
        openid: String,
        /// The key WeChat reset.
        old: String,
        /// The key WeChat answered.
        new: String,
        /// Answered once durable.
        reply: RpcReplyPort<Result<User, Error>>,
    },
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
        Ok(UserRegistryState {
            users: args.storage.users(),
            clock: args.clock,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.clock.now();
        let users = &mut state.users;
        match message {
            UserRegistryMsg::Upsert(appid, login, reply) => {
                answer(users.upsert(appid.as_deref(), login, now), reply)
            }
            UserRegistryMsg::SessionKey(openid, reply) => answer(users.session_key(openid), reply),
            UserRegistryMsg::SaveProfile(openid, profile, reply) => {
                answer(users.save_profile(openid, profile, now), reply)
            }
            UserRegistryMsg::SavePhone(openid, phone, reply) => {
                answer(users.save_phone(openid, phone, now), reply)
            }
            UserRegistryMsg::ReplaceSessionKey {
                openid,
                old,
                new,
                reply,
            } => answer(users.replace_session_key(openid, old, new, now), reply),
            UserRegistryMsg::Find(key, reply) => answer(users.find(key), reply),
            UserRegistryMsg::Count(reply) => answer(users.count(), reply),
            #[cfg(feature = "fault-injection")]
            UserRegistryMsg::Inject(fault) => fault.strike("UserRegistry").await,
        }
        Ok(())
    }
}
