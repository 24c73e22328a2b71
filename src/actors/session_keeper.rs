//! SessionKeeper: issues session tokens, checks them, slides their idle expiry, sweeps the dead.
//!
//! What a session is and how long it lives is decided in [`crate::session`]; where the sessions
//! are kept is the storage's business ([`crate::storage::Sessions`]: an in-memory table over the
//! session log, or Redis). Operations that wait for I/O finish in a task of their own, so the
//! keeper goes on with its next message.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;

use super::answer;
use crate::crypto::TokenHash;
use crate::session::{Issued, SessionInfo, SessionPolicy, SessionSummary};
use crate::storage::{SessionReader, Sessions, Storage};
use crate::{Clock, Error, Metrics};

/// Time between the steps of a sweep pass (each visits a part of the sessions), in which the
/// keeper's worker thread is free for other tasks.
const SWEEP_STEP_GAP: Duration = Duration::from_millis(2);

/// The actor. Configuration comes in [`SessionKeeperArgs`].
pub struct SessionKeeper;

/// What the keeper is started with.
#[derive(Clone)]
pub struct SessionKeeperArgs {
    /// Where sessions are kept.
    pub storage: Storage,
    /// Source of "now" for every expiry decision.
    pub clock: Clock,
    /// How long sessions live.
    pub policy: SessionPolicy,
    /// The default app's appid: the app of sessions stored without one.
    pub default_app: Arc<str>,
    /// Time between sweeps of expired sessions.
    pub sweep_interval: Duration,
    /// Where the live-session gauge is kept.
    pub metrics: Arc<Metrics>,
    /// Where the keeper publishes the reader of its table for checks that read it directly
    /// (sled only); empty while no keeper runs, so that nobody reads a dead keeper's table.
    pub reader: Arc<ReaderSlot>,
}

/// The current keeper's reader, if it has one.
pub type ReaderSlot = RwLock<Option<SessionReader>>;

/// The sessions and the sweep timer.
pub struct SessionKeeperState {
    clock: Clock,
    sessions: Sessions,
    sweeper: JoinHandle<()>,
    /// Whether a sweep pass is under way (it takes several messages).
    sweeping: bool,
    reader: Arc<ReaderSlot>,
}

/// Messages of the keeper.
pub enum SessionKeeperMsg {
    /// Issue a token for a user who just logged in.
    Issue {
        /// The user's uid.
        uid: u64,
        /// The app logged in through (`None`: the default app).
        appid: Option<Arc<str>>,
        /// The user's openid in that app.
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
        /// Answered once the sessions are updated, durably.
        reply: RpcReplyPort<Result<(), Error>>,
    },
    /// The live sessions of a user (for the admin).
    List(u64, RpcReplyPort<Result<Vec<SessionSummary>, Error>>),
    /// End every session of a user, durably; answers how many ended.
    RevokeUser(u64, RpcReplyPort<Result<usize, Error>>),
    /// How many sessions are held (expired ones not yet swept included).
    Count(RpcReplyPort<Result<usize, Error>>),
    /// Start a pass that deletes expired sessions (sent by the keeper's own interval timer).
    Sweep,
    /// Go on with the pass (sent by the keeper to itself a moment later, so that other messages
    /// and tasks come between).
    SweepOn,
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
        let sessions = args
            .storage
            .load_sessions(args.policy, args.default_app, args.metrics)
            .await;
        *args.reader.write().unwrap_or_else(|p| p.into_inner()) = sessions.reader();
        Ok(SessionKeeperState {
            sessions,
            clock: args.clock,
            sweeper,
            sweeping: false,
            reader: args.reader,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.sweeper.abort();
        *state.reader.write().unwrap_or_else(|p| p.into_inner()) = None;
        state.sessions.persist()?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.clock.now();
        let sessions = &mut state.sessions;
        match message {
            SessionKeeperMsg::Issue {
                uid,
                appid,
                openid,
                unionid,
                reply,
            } => answer(sessions.issue(uid, appid, openid, unionid, now), reply),
            SessionKeeperMsg::Check(hash, reply) => answer(sessions.check(hash, now), reply),
            SessionKeeperMsg::Revoke(hash, reply) => answer(sessions.revoke(hash, now), reply),
            SessionKeeperMsg::SetUnionid {
                uid,
                unionid,
                reply,
            } => answer(sessions.set_unionid(uid, unionid), reply),
            SessionKeeperMsg::List(uid, reply) => answer(sessions.list(uid, now), reply),
            SessionKeeperMsg::RevokeUser(uid, reply) => {
                answer(sessions.revoke_user(uid, now), reply)
            }
            SessionKeeperMsg::Count(reply) => answer(sessions.count(), reply),
            // A tick while a pass goes on changes nothing: the pass is already sweeping.
            SessionKeeperMsg::Sweep if state.sweeping => {}
            SessionKeeperMsg::Sweep | SessionKeeperMsg::SweepOn => {
                state.sweeping = sessions.sweep(now);
                if state.sweeping {
                    // Sent at once, the steps would run back to back in one turn of the keeper's
                    // task, holding a worker thread for the whole pass: 15-20 ms at a million
                    // sessions, which stalled logins for 45 ms (benches/HISTORY.md).
                    myself.send_after(SWEEP_STEP_GAP, || SessionKeeperMsg::SweepOn);
                }
            }
            #[cfg(feature = "fault-injection")]
            SessionKeeperMsg::Inject(fault) => fault.strike("SessionKeeper").await,
        }
        Ok(())
    }
}
