//! SessionKeeper: issues session tokens, checks them, slides their idle expiry, sweeps the dead.
//!
//! The live sessions are held in memory (rebuilt from sled at start), so a check costs a hash
//! lookup and no disk access. Sliding expiry is tracked in memory too and written back only when
//! the last use moved by a tenth of the idle TTL: a check does not write on every call, and a crash
//! can at worst make a session expire that tenth earlier.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;

use crate::crypto::{TokenHash, new_token, session_id, token_hash};
use crate::group_commit::GroupCommit;
use crate::store::{SessionRecord, Store};
use crate::{Clock, Error, Metrics};

/// Live sessions one user may hold; a login beyond it ends the user's oldest session. It bounds
/// the per-user index (and what one account logging in in a loop can cost).
pub const MAX_SESSIONS_PER_USER: usize = 64;

/// The actor. Configuration comes in [`SessionKeeperArgs`].
pub struct SessionKeeper;

/// What the keeper is started with.
#[derive(Clone)]
pub struct SessionKeeperArgs {
    /// The database.
    pub store: Store,
    /// Shared flushes, for logouts that must be durable before the answer.
    pub commit: GroupCommit,
    /// Source of "now" for every expiry decision.
    pub clock: Clock,
    /// Seconds a session lives without use.
    pub idle_ttl: u64,
    /// Seconds a session lives at most.
    pub max_ttl: u64,
    /// Time between sweeps of expired sessions.
    pub sweep_interval: Duration,
    /// Where the live-session gauge is kept.
    pub metrics: Arc<Metrics>,
}

/// The live sessions and the handles needed to persist them.
pub struct SessionKeeperState {
    args: SessionKeeperArgs,
    sessions: HashMap<TokenHash, Live>,
    /// uid -> the hashes of that user's sessions, to update or end them all at once.
    by_uid: HashMap<u64, Vec<TokenHash>>,
    sweeper: JoinHandle<()>,
}

/// A session in memory: the stored record plus the last use not yet written back.
struct Live {
    record: SessionRecord,
    last_seen: u64,
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
        let mut state = SessionKeeperState {
            args,
            sessions: HashMap::new(),
            by_uid: HashMap::new(),
            sweeper,
        };
        let store = state.args.store.clone();
        for entry in store.sessions() {
            // A session can always be given up (its user logs in again); the broker cannot.
            match entry {
                Ok((hash, record)) => state.remember(hash, record),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable session record"),
            }
        }
        tracing::info!(sessions = state.sessions.len(), "session table loaded");
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.sweeper.abort();
        state.write_back_last_seen()?;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SessionKeeperMsg::Issue {
                uid,
                openid,
                unionid,
                reply,
            } => {
                let _ = reply.send(state.issue(uid, openid, unionid));
            }
            SessionKeeperMsg::Check(hash, reply) => {
                let _ = reply.send(state.check(&hash));
            }
            SessionKeeperMsg::Revoke(hash, reply) => match state.revoke(&hash) {
                Ok(()) => state.args.commit.then(move |durable| {
                    let _ = reply.send(durable);
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            SessionKeeperMsg::SetUnionid {
                uid,
                unionid,
                reply,
            } => {
                let _ = reply.send(state.set_unionid(uid, &unionid));
            }
            SessionKeeperMsg::Sessions(uid, reply) => {
                let _ = reply.send(Ok(state.sessions_of(uid)));
            }
            SessionKeeperMsg::RevokeUser(uid, reply) => match state.revoke_user(uid) {
                Ok(count) => state.args.commit.then(move |durable| {
                    let _ = reply.send(durable.map(|()| count));
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            SessionKeeperMsg::Count(reply) => {
                let _ = reply.send(Ok(state.sessions.len()));
            }
            SessionKeeperMsg::Sweep => {
                if let Err(e) = state.sweep() {
                    tracing::error!(error = %e, "sweeping expired sessions failed; retrying at the next sweep");
                }
            }
            #[cfg(feature = "fault-injection")]
            SessionKeeperMsg::Inject(fault) => fault.strike("SessionKeeper").await,
        }
        Ok(())
    }
}

impl SessionKeeperState {
    fn issue(
        &mut self,
        uid: u64,
        openid: String,
        unionid: Option<String>,
    ) -> Result<Issued, Error> {
        let token =
            new_token().map_err(|e| Error::Unavailable(format!("the OS RNG failed: {e}")))?;
        let hash = token_hash(&token);
        let now = self.args.clock.now();
        let record = SessionRecord {
            uid,
            openid,
            unionid,
            created_at: now,
            last_seen: now,
            expires_at: now.saturating_add(self.args.max_ttl),
        };
        // Order in the index is not age after a restart (it is rebuilt in key order).
        let oldest = self
            .by_uid
            .get(&uid)
            .filter(|hashes| hashes.len() >= MAX_SESSIONS_PER_USER)
            .and_then(|hashes| {
                hashes
                    .iter()
                    .min_by_key(|hash| self.sessions.get(*hash).map(|live| live.record.created_at))
                    .copied()
            });
        if let Some(oldest) = oldest {
            self.forget(&oldest);
            self.args.store.remove_session(&oldest)?;
        }
        let unionid = record.unionid.clone();
        self.args.store.put_session(&hash, &record)?;
        self.remember(hash, record);
        // A unionid WeChat reports now also belongs on the user's older sessions.
        if let Some(unionid) = unionid {
            self.set_unionid(uid, &unionid)?;
        }
        Ok(Issued {
            token,
            expires_in: self.args.idle_ttl.min(self.args.max_ttl),
        })
    }

    fn check(&mut self, hash: &TokenHash) -> Result<SessionInfo, Error> {
        let now = self.args.clock.now();
        let idle_ttl = self.args.idle_ttl;
        let live = self.sessions.get_mut(hash).ok_or(Error::InvalidSession)?;
        if live.expired(now, idle_ttl) {
            self.forget(hash);
            self.args.store.remove_session(hash)?;
            return Err(Error::InvalidSession);
        }
        live.last_seen = live.last_seen.max(now);
        if live.last_seen - live.record.last_seen >= (idle_ttl / 10).max(1) {
            live.record.last_seen = live.last_seen;
            self.args.store.put_session(hash, &live.record)?;
        }
        Ok(SessionInfo {
            uid: live.record.uid,
            openid: live.record.openid.clone(),
            unionid: live.record.unionid.clone(),
            expires_at: live.expires_at(idle_ttl),
        })
    }

    fn revoke(&mut self, hash: &TokenHash) -> Result<(), Error> {
        let live = self.forget(hash).ok_or(Error::InvalidSession)?;
        self.args.store.remove_session(hash)?;
        if live.expired(self.args.clock.now(), self.args.idle_ttl) {
            return Err(Error::InvalidSession);
        }
        Ok(())
    }

    fn sweep(&mut self) -> Result<(), Error> {
        let now = self.args.clock.now();
        let idle_ttl = self.args.idle_ttl;
        let expired: Vec<TokenHash> = self
            .sessions
            .iter()
            .filter(|(_, live)| live.expired(now, idle_ttl))
            .map(|(hash, _)| *hash)
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        for hash in &expired {
            self.forget(hash);
        }
        self.args.store.remove_sessions(&expired)?;
        tracing::debug!(removed = expired.len(), "swept expired sessions");
        Ok(())
    }

    fn sessions_of(&self, uid: u64) -> Vec<SessionSummary> {
        let now = self.args.clock.now();
        let idle_ttl = self.args.idle_ttl;
        self.by_uid
            .get(&uid)
            .into_iter()
            .flatten()
            .filter_map(|hash| Some((hash, self.sessions.get(hash)?)))
            .filter(|(_, live)| !live.expired(now, idle_ttl))
            .map(|(hash, live)| SessionSummary {
                id: session_id(hash),
                created_at: live.record.created_at,
                last_seen: live.last_seen,
                expires_at: live.expires_at(idle_ttl),
            })
            .collect()
    }

    fn revoke_user(&mut self, uid: u64) -> Result<usize, Error> {
        let now = self.args.clock.now();
        let hashes = self.by_uid.get(&uid).cloned().unwrap_or_default();
        let mut live = 0;
        for hash in &hashes {
            if self
                .forget(hash)
                .is_some_and(|s| !s.expired(now, self.args.idle_ttl))
            {
                live += 1;
            }
        }
        self.args.store.remove_sessions(&hashes)?;
        Ok(live)
    }

    fn set_unionid(&mut self, uid: u64, unionid: &str) -> Result<(), Error> {
        for hash in self.by_uid.get(&uid).into_iter().flatten() {
            if let Some(live) = self.sessions.get_mut(hash)
                && live.record.unionid.as_deref() != Some(unionid)
            {
                live.record.unionid = Some(unionid.to_owned());
                self.args.store.put_session(hash, &live.record)?;
            }
        }
        Ok(())
    }

    /// Adds a session to the table and its user's index.
    fn remember(&mut self, hash: TokenHash, record: SessionRecord) {
        self.by_uid.entry(record.uid).or_default().push(hash);
        let last_seen = record.last_seen;
        self.sessions.insert(hash, Live { record, last_seen });
        self.args
            .metrics
            .live_sessions
            .set(self.sessions.len() as i64);
    }

    /// Removes a session from the table and its user's index (not from the store).
    fn forget(&mut self, hash: &TokenHash) -> Option<Live> {
        let live = self.sessions.remove(hash)?;
        self.args
            .metrics
            .live_sessions
            .set(self.sessions.len() as i64);
        if let Some(hashes) = self.by_uid.get_mut(&live.record.uid) {
            hashes.retain(|h| h != hash);
            if hashes.is_empty() {
                self.by_uid.remove(&live.record.uid);
            }
        }
        Some(live)
    }

    /// Persists every last use that was only held in memory (at a clean stop).
    fn write_back_last_seen(&mut self) -> Result<(), Error> {
        for (hash, live) in &mut self.sessions {
            if live.last_seen > live.record.last_seen {
                live.record.last_seen = live.last_seen;
                self.args.store.put_session(hash, &live.record)?;
            }
        }
        Ok(())
    }
}

impl Live {
    fn expires_at(&self, idle_ttl: u64) -> u64 {
        self.last_seen
            .saturating_add(idle_ttl)
            .min(self.record.expires_at)
    }

    fn expired(&self, now: u64, idle_ttl: u64) -> bool {
        now >= self.expires_at(idle_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keeper(dir: &tempfile::TempDir, clock: &Clock) -> SessionKeeperState {
        let store = Store::open(dir.path(), 8).unwrap();
        SessionKeeperState {
            args: SessionKeeperArgs {
                commit: GroupCommit::start(store.db().clone(), Default::default()),
                metrics: Default::default(),
                store,
                clock: clock.clone(),
                idle_ttl: 1000,
                max_ttl: 5000,
                sweep_interval: Duration::from_secs(3600),
            },
            sessions: HashMap::new(),
            by_uid: HashMap::new(),
            sweeper: tokio::spawn(async {}),
        }
    }

    fn stored_last_seen(state: &SessionKeeperState, hash: &TokenHash) -> u64 {
        let stored = state
            .args
            .store
            .sessions()
            .map(Result::unwrap)
            .find(|(h, _)| h == hash);
        stored.unwrap().1.last_seen
    }

    #[tokio::test]
    async fn checks_write_the_last_use_only_when_it_moved_a_tenth_of_the_idle_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(10_000);
        let mut state = keeper(&dir, &clock);
        let issued = state.issue(1, "o".into(), None).unwrap();
        let hash = token_hash(&issued.token);

        clock.advance(99);
        assert_eq!(state.check(&hash).unwrap().expires_at, 10_099 + 1000);
        assert_eq!(
            stored_last_seen(&state, &hash),
            10_000,
            "under a tenth: memory only"
        );

        clock.advance(1);
        state.check(&hash).unwrap();
        assert_eq!(
            stored_last_seen(&state, &hash),
            10_100,
            "a tenth: written back"
        );
    }

    #[tokio::test]
    async fn an_expired_session_is_refused_and_forgotten_before_any_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(10_000);
        let mut state = keeper(&dir, &clock);
        let hash = token_hash(&state.issue(1, "o".into(), None).unwrap().token);
        clock.advance(1000);
        assert_eq!(state.check(&hash), Err(Error::InvalidSession));
        assert_eq!(state.args.store.sessions().count(), 0);
        assert!(state.sessions.is_empty() && state.by_uid.is_empty());
    }

    #[tokio::test]
    async fn a_user_beyond_the_session_cap_loses_the_oldest_session() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(10_000);
        let mut state = keeper(&dir, &clock);
        let hashes: Vec<TokenHash> = (0..=MAX_SESSIONS_PER_USER)
            .map(|_| token_hash(&state.issue(1, "o1".into(), None).unwrap().token))
            .collect();
        assert_eq!(state.check(&hashes[0]), Err(Error::InvalidSession));
        for hash in &hashes[1..] {
            assert!(state.check(hash).is_ok());
        }
        assert_eq!(state.args.store.sessions().count(), MAX_SESSIONS_PER_USER);
    }

    #[tokio::test]
    async fn the_cap_evicts_the_oldest_session_whatever_the_index_order() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(10_000);
        let mut state = keeper(&dir, &clock);
        let mut hashes = Vec::new();
        for _ in 0..MAX_SESSIONS_PER_USER {
            clock.advance(1);
            hashes.push(token_hash(
                &state.issue(1, "o1".into(), None).unwrap().token,
            ));
        }
        // After a restart the index is in key order, not age order.
        state.by_uid.get_mut(&1).unwrap().reverse();
        state.issue(1, "o1".into(), None).unwrap();
        assert_eq!(state.check(&hashes[0]), Err(Error::InvalidSession));
        assert!(state.check(&hashes[MAX_SESSIONS_PER_USER - 1]).is_ok());
    }

    #[tokio::test]
    async fn a_late_unionid_reaches_every_session_of_the_user_only() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(10_000);
        let mut state = keeper(&dir, &clock);
        let a1 = token_hash(&state.issue(1, "o1".into(), None).unwrap().token);
        let a2 = token_hash(&state.issue(1, "o1".into(), None).unwrap().token);
        let b = token_hash(&state.issue(2, "o2".into(), None).unwrap().token);
        state.set_unionid(1, "u1").unwrap();
        for hash in [a1, a2] {
            assert_eq!(state.check(&hash).unwrap().unionid.as_deref(), Some("u1"));
        }
        assert_eq!(state.check(&b).unwrap().unionid, None);
        let stored: Vec<_> = state.args.store.sessions().map(Result::unwrap).collect();
        assert_eq!(
            stored.iter().filter(|(_, r)| r.unionid.is_some()).count(),
            2
        );
    }
}
