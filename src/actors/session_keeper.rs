//! SessionKeeper: issues session tokens, checks them, slides their idle expiry, sweeps the dead.
//!
//! What a session is and how long it lives is decided here and in [`SessionPolicy`]; where the
//! sessions are kept is the backend's business ([`crate::backend::Sessions`]: an in-memory table
//! over sled, or Redis). Operations that wait for I/O finish in a task of their own, so the keeper
//! goes on with its next message.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;

use crate::backend::sled_sessions::SessionTable;
use crate::backend::{Backend, SessionPolicy, Sessions};
use crate::crypto::TokenHash;
use crate::{Clock, Error, Metrics};

/// Live sessions one user may hold; a login beyond it ends the user's oldest session. It bounds
/// the per-user index (and what one account logging in in a loop can cost).
pub const MAX_SESSIONS_PER_USER: usize = 64;

/// The actor. Configuration comes in [`SessionKeeperArgs`].
pub struct SessionKeeper;

/// What the keeper is started with.
#[derive(Clone)]
pub struct SessionKeeperArgs {
    /// Where sessions are kept.
    pub backend: Backend,
    /// Source of "now" for every expiry decision.
    pub clock: Clock,
    /// How long sessions live.
    pub policy: SessionPolicy,
    /// Time between sweeps of expired sessions.
    pub sweep_interval: Duration,
    /// Where the live-session gauge is kept.
    pub metrics: Arc<Metrics>,
    /// Where the keeper publishes its table for checks that read it directly (sled only); empty
    /// while no keeper runs, so that nobody reads a dead keeper's table.
    pub table: Arc<TableSlot>,
}

/// The current keeper's session table, if it has one.
pub type TableSlot = RwLock<Option<Arc<SessionTable>>>;

/// The sessions and the sweep timer.
pub struct SessionKeeperState {
    clock: Clock,
    sessions: Sessions,
    sweeper: JoinHandle<()>,
    table: Arc<TableSlot>,
}

/// A freshly issued session token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The token for the client (the "3rd session"); only its hash is kept.
    pub token: String,
    /// Seconds the token stays valid if it is not used.
    pub expires_in: u64,
}

/// Who a valid session token belongs to. Its JSON form (camelCase) is the `/v1/session` answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// The user's stable id.
    pub uid: u64,
    /// The user's openid.
    pub openid: String,
    /// The user's unionid, if known.
    pub unionid: Option<String>,
    /// Unix seconds at which the session expires unless used again.
    pub expires_at: u64,
}

/// A session as the admin sees it: its id is the token's hash, never the token. Its JSON form
/// (camelCase) is an entry of the admin's session list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    /// Lowercase hex of the token's SHA-256: names the session without letting anyone use it.
    pub id: String,
    /// Unix seconds of the login.
    pub created_at: u64,
    /// Unix seconds of the last use.
    pub last_seen: u64,
    /// Unix seconds at which it expires unless used again.
    pub expires_at: u64,
}

/// Messages of the keeper.
pub enum SessionKeeperMsg {
    /// Issue a token for a user who just logged in.
    Issue {
        /// The user's uid.
        uid: u64,
        /// The user's openid.
        openid: String,
        /// The user's unionid, if known.
        unionid: Option<String>,
        /// Where the token goes.
        reply: RpcReplyPort<Result<Issued, Error>>,
    },
    /// Check (and slide) the session with this token hash.
    Check(TokenHash, RpcReplyPort<Result<SessionInfo, Error>>),
    /// End the session with this token hash, durably.
    Revoke(TokenHash, RpcReplyPort<Result<(), Error>>),
    /// Record a unionid learned after login on all of the user's sessions.
    SetUnionid {
        /// The user's uid.
        uid: u64,
        /// The unionid WeChat revealed.
        unionid: String,
        /// Answered once the sessions are updated.
        reply: RpcReplyPort<Result<(), Error>>,
    },
    /// The live sessions of a user (for the admin).
    Sessions(u64, RpcReplyPort<Result<Vec<SessionSummary>, Error>>),
    /// End every session of a user, durably; answers how many ended.
    RevokeUser(u64, RpcReplyPort<Result<usize, Error>>),
    /// How many sessions are held (expired ones not yet swept included).
    Count(RpcReplyPort<Result<usize, Error>>),
    /// Delete expired sessions (sent by the keeper's own interval timer).
    Sweep,
    /// Test hook: suffer a fault inside the handler.
    #[cfg(feature = "fault-injection")]
    Inject(crate::Fault),
}

impl Actor for SessionKeeper {
    type Msg = SessionKeeperMsg;
    type State = SessionKeeperState;
    type Arguments = SessionKeeperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SessionKeeperArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let sweeper = myself.send_interval(args.sweep_interval, || SessionKeeperMsg::Sweep);
        let sessions = args.backend.sessions(args.policy, args.metrics).await;
        *args.table.write().unwrap_or_else(|p| p.into_inner()) = sessions.table();
        Ok(SessionKeeperState {
            sessions,
            clock: args.clock,
            sweeper,
            table: args.table,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.sweeper.abort();
        *state.table.write().unwrap_or_else(|p| p.into_inner()) = None;
        state.sessions.persist()?;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.clock.now();
        let sessions = &mut state.sessions;
        match message {
            SessionKeeperMsg::Issue {
                uid,
                openid,
                unionid,
                reply,
            } => sessions.issue(uid, openid, unionid, now).answer(reply),
            SessionKeeperMsg::Check(hash, reply) => sessions.check(hash, now).answer(reply),
            SessionKeeperMsg::Revoke(hash, reply) => sessions.revoke(hash, now).answer(reply),
            SessionKeeperMsg::SetUnionid {
                uid,
                unionid,
                reply,
            } => sessions.set_unionid(uid, unionid).answer(reply),
            SessionKeeperMsg::Sessions(uid, reply) => sessions.list(uid, now).answer(reply),
            SessionKeeperMsg::RevokeUser(uid, reply) => {
                sessions.revoke_user(uid, now).answer(reply)
            }
            SessionKeeperMsg::Count(reply) => sessions.count().answer(reply),
            SessionKeeperMsg::Sweep => {
                if let Err(e) = sessions.sweep(now) {
                    tracing::error!(error = %e, "sweeping expired sessions failed; retrying at the next sweep");
                }
            }
            #[cfg(feature = "fault-injection")]
            SessionKeeperMsg::Inject(fault) => fault.strike("SessionKeeper").await,
        }
        Ok(())
    }
}
