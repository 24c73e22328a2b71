//! Where users and sessions live: the one interface the UserRegistry, the SessionKeeper, the
//! WeChatExchanger, the broker, the signer (its keys), the revocation feed and the admin export
//! use, so that none of them knows which store it runs on.
//!
//! - sled (the default, one machine, [`sled`]): users in sled trees, sessions in an in-memory
//!   table rebuilt from their own log, both made durable by one group commit.
//! - Redis (`WXBROKER_STORE=redis://...`, several brokers sharing users and sessions, [`redis`]):
//!   every operation is one atomic script or command on the server, with no per-broker cache.
//!
//! Each operation returns a [`Pending`]: done at once (sled's in-memory work), or a future that
//! the caller hands to a task of its own (a flush to wait for, a Redis round trip), so that an
//! actor never waits for I/O between two messages. Nothing here knows of actors or HTTP.
//!
//! The broker's budget of calls to WeChat per user and minute ([`CallBudget`]) is counted here
//! too: in memory with sled, on the server with Redis, so that brokers share it.

pub mod call_budget;
pub mod redis;
pub mod sled;
mod uid_set;

use std::sync::Arc;

use futures_util::future::BoxFuture;

use self::call_budget::LocalCounts;
use self::redis::{Redis, RedisFeed};
use self::sled::DataDir;
use self::sled::group_commit::GroupCommit;
use self::sled::keys::SledKeys;
use self::sled::revocations::SledRevocations;
pub use self::sled::sessions::FastCheck;
use self::sled::sessions::{SessionTable, SledSessions};
use self::sled::users::SledUsers;
use self::uid_set::UidSet;
use crate::crypto::{TokenHash, new_token};
use crate::keyring::{AccessPolicy, KeyRecord};
use crate::revocation::{Cursor, FeedEvent, Page};
use crate::session::{Issued, SessionInfo, SessionPolicy, SessionSummary};
use crate::upstream::Code2Session;
use crate::user::{Phone, Profile, Registration, User, UserKey};
use crate::{Clock, Config, Error, Metrics};

/// The outcome of a storage operation: known now, or once a future completes.
pub enum Pending<T> {
    /// Already done.
    Ready(Result<T, Error>),
    /// Done when this completes (it owns everything it needs).
    Later(BoxFuture<'static, Result<T, Error>>),
}

impl<T: Send + 'static> Pending<T> {
    /// Calls `then` with the outcome: now if it is known, else from a spawned task, so that the
    /// caller never waits.
    pub fn then(self, then: impl FnOnce(Result<T, Error>) + Send + 'static) {
        match self {
            Pending::Ready(outcome) => then(outcome),
            Pending::Later(future) => {
                tokio::spawn(async move { then(future.await) });
            }
        }
    }

    /// The same outcome, transformed.
    pub fn map<U: Send + 'static>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Pending<U> {
        match self {
            Pending::Ready(outcome) => Pending::Ready(outcome.map(f)),
            Pending::Later(future) => Pending::Later(Box::pin(async move { future.await.map(f) })),
        }
    }

    /// The outcome, waiting for it if needed (for tests and offline tools).
    pub async fn wait(self) -> Result<T, Error> {
        match self {
            Pending::Ready(outcome) => outcome,
            Pending::Later(future) => future.await,
        }
    }
}

/// The storage a broker runs on, as opened once per broker; the actors build their views from it
/// at every (re)start. Cheap to clone.
#[derive(Clone)]
pub enum Storage {
    /// The data dir, with its group commit.
    Sled {
        /// Users and the session log.
        data: DataDir,
        /// Shared flushes.
        commit: GroupCommit,
    },
    /// A Redis server.
    Redis(Redis),
}

impl Storage {
    /// Opens what `config` names: Redis when `WXBROKER_STORE` is set, else the data dir. With
    /// signed access tokens on, every revocation is recorded in the revocation feed.
    ///
    /// The stores file the default app's identities and sessions without an appid (as before
    /// several apps), so data read with another app as the default would hand one mini
    /// program's users, session_keys and sessions to another: a store whose default app was
    /// recorded ([`Health::record_default_app`]) refuses another one.
    pub async fn open(config: &Config, metrics: &Arc<Metrics>) -> Result<Storage, Error> {
        let keep = config.access_policy().map(|policy| policy.keep());
        let default_app = config
            .served_apps()?
            .into_iter()
            .next()
            .map(|app| app.appid);
        match &config.store {
            Some(url) => {
                let redis = Redis::connect(url.expose()).await?;
                if let (Some(appid), Some(held)) = (&default_app, redis.default_app().await?) {
                    same_default_app("Redis", held, appid)?;
                }
                Ok(Storage::Redis(redis.with_revocations(keep.unwrap_or(0))))
            }
            None => {
                let data = DataDir::open(&config.data_dir, config.cache_mb)?;
                if let (Some(appid), Some(held)) = (&default_app, data.users().default_app()?) {
                    same_default_app("The data dir", held, appid)?;
                }
                if let Some(keep) = keep {
                    data.revocations().enable(keep, config.clock.now())?;
                }
                let commit = GroupCommit::start(data.clone(), metrics.clone());
                Ok(Storage::Sled { data, commit })
            }
        }
    }

    /// The signing keys of access tokens.
    pub(crate) fn keys(&self) -> Keys {
        match self {
            Storage::Sled { data, .. } => Keys::Sled(data.keys().clone()),
            Storage::Redis(redis) => Keys::Redis(redis.clone()),
        }
    }

    /// The revocation feed: its reads, and (with Redis) a follower of its own for the broker,
    /// started at the first subscription. The origin of a feed used for the first time is
    /// dated by `clock`.
    pub fn feed(&self, clock: Clock) -> Feed {
        match self {
            Storage::Sled { data, .. } => Feed::Sled(data.revocations().clone()),
            Storage::Redis(redis) => Feed::Redis(RedisFeed::new(redis.clone(), clock)),
        }
    }

    /// The UserRegistry's view.
    pub fn users(&self) -> Users {
        match self {
            Storage::Sled { data, commit } => {
                Users::Sled(SledUsers::new(data.users().clone(), commit.clone()))
            }
            Storage::Redis(redis) => Users::Redis(redis.clone()),
        }
    }

    /// The SessionKeeper's view; with sled, the table is read from the session log here. A
    /// session whose record names no app is `default_app`'s.
    pub async fn load_sessions(
        &self,
        policy: SessionPolicy,
        default_app: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Sessions {
        match self {
            Storage::Sled { data, commit } => {
                let (data, commit) = (data.clone(), commit.clone());
                // Reading a million sessions takes seconds: on a runtime worker it would stall
                // the tasks queued there, and a keeper restarted by its supervisor loads while
                // the broker serves.
                let loaded = tokio::task::spawn_blocking(move || {
                    SledSessions::load(data, commit, policy, default_app, metrics)
                })
                .await;
                // A panic while loading panics here, as before: the keeper fails to start and is
                // restarted. (Cancelled only as the runtime shuts down; `into_panic` panics then.)
                Sessions::Sled(loaded.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
            }
            Storage::Redis(redis) => Sessions::Redis(redis.clone(), policy, default_app),
        }
    }

    /// Where login codes are booked across brokers (only a shared store needs it: one broker
    /// remembers them in its WeChatExchanger).
    pub fn code_book(&self) -> Option<CodeBook> {
        match self {
            Storage::Sled { .. } => None,
            Storage::Redis(redis) => Some(CodeBook(redis.clone())),
        }
    }

    /// The budget of `per_min` calls to WeChat per user and minute (0: no budget): counted in
    /// this broker's memory with sled, in Redis (shared by every broker) with Redis.
    pub fn call_budget(&self, per_min: u32) -> CallBudget {
        match self {
            _ if per_min == 0 => CallBudget::Off,
            Storage::Sled { .. } => CallBudget::Local {
                counts: Arc::new(LocalCounts::default()),
                per_min,
            },
            Storage::Redis(redis) => CallBudget::Redis {
                redis: redis.clone(),
                per_min,
            },
        }
    }

    /// What the broker itself needs of the storage.
    pub fn health(&self) -> Health {
        match self {
            Storage::Sled { data, commit } => Health::Sled(data.clone(), commit.ended()),
            Storage::Redis(redis) => Health::Redis(redis.clone()),
        }
    }
}

/// `Ok` when `held`, the default app recorded in `place`, is `appid`, the one configured as
/// the default; else the error saying what to change.
pub fn same_default_app(place: &str, held: String, appid: &str) -> Result<(), Error> {
    if held == appid {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{place} holds the users of the mini program {held} as its default app, but {appid} is \
         configured as the default (WECHAT_APPID, or the first of [[apps]]): list {held} first, \
         or give {appid} a store of its own"
    )))
}

/// What booking a login code across brokers found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Booking {
    /// This broker booked it: exchange it.
    Booked,
    /// Another broker is exchanging it right now: the client may retry in a moment.
    InFlight,
    /// Some broker exchanged it already.
    Used,
}

/// Login codes booked across brokers (`SET NX` semantics, for a code's 5-minute life).
#[derive(Clone)]
pub struct CodeBook(Redis);

impl CodeBook {
    /// Books `code` for this broker, unless another broker holds or has used it.
    pub async fn book(&self, code: &str) -> Result<Booking, Error> {
        self.0.book_code(code).await
    }

    /// The booked code was exchanged.
    pub async fn done(&self, code: &str) -> Result<(), Error> {
        self.0.code_done(code).await
    }

    /// The booked code's exchange failed: another try may reach WeChat.
    pub async fn release(&self, code: &str) -> Result<(), Error> {
        self.0.release_code(code).await
    }
}

/// How many calls to WeChat each user's requests may make per minute (see [`call_budget`]).
/// Cheap to clone.
#[derive(Clone)]
pub enum CallBudget {
    /// No budget (`WXBROKER_WECHAT_CALLS_PER_MIN=0`): nothing is counted.
    Off,
    /// Counted in this broker's memory (sled: one broker).
    Local {
        /// The current minute's counts.
        counts: Arc<LocalCounts>,
        /// Calls per user and minute.
        per_min: u32,
    },
    /// Counted in Redis, so that every broker on it spends the same budget.
    Redis {
        /// The shared server.
        redis: Redis,
        /// Calls per user and minute.
        per_min: u32,
    },
}

impl CallBudget {
    /// Spends one call to WeChat of `uid`'s budget at `now` (unix seconds); once the minute's
    /// calls are spent, [`Error::RateLimited`] with the seconds left in the minute.
    pub fn spend(&self, uid: u64, now: u64) -> Pending<()> {
        let window = call_budget::window(now);
        match self {
            CallBudget::Off => Pending::Ready(Ok(())),
            CallBudget::Local { counts, per_min } => Pending::Ready(call_budget::within(
                counts.count(uid, window),
                *per_min,
                now,
            )),
            CallBudget::Redis { redis, per_min } => {
                let (redis, per_min) = (redis.clone(), *per_min);
                Pending::Later(Box::pin(async move {
                    let count = redis.count_call(uid, window).await?;
                    call_budget::within(count, per_min, now)
                }))
            }
        }
    }
}

/// The part of the storage the broker itself uses: whether it answers, the flush at shutdown, and
/// the export of users.
/// It holds no group commit, whose task (and its handle on the database) must end with the
/// actors, so that a stopped broker's data dir can be opened again at once.
#[derive(Clone)]
pub enum Health {
    /// The data dir, and the end of its group commit task.
    Sled(DataDir, tokio::sync::watch::Receiver<bool>),
    /// Redis.
    Redis(Redis),
}

impl Health {
    /// Records `appid` as the default app of the stored data, or checks that it is the one
    /// recorded. The binary records it once WeChat has accepted the app's credentials, so that a
    /// mistyped appid never binds a store.
    pub async fn record_default_app(&self, appid: &str) -> Result<(), Error> {
        match self {
            Health::Sled(data, _) => same_default_app(
                "The data dir",
                data.users().claim_default_app(appid)?,
                appid,
            ),
            Health::Redis(redis) => {
                same_default_app("Redis", redis.claim_default_app(appid).await?, appid)
            }
        }
    }

    /// Whether the storage answers a read.
    pub async fn answers(&self) -> bool {
        match self {
            Health::Sled(data, _) => data.answers(),
            Health::Redis(redis) => redis.ping().await.is_ok(),
        }
    }

    /// Makes every write so far durable (at shutdown, once the actors have stopped), stops any
    /// compaction from replacing the session log, and waits (briefly) for the group commit task
    /// to let go of the database, so that it can be opened again at once. Redis persists on its
    /// own terms.
    pub async fn flush(&self) -> Result<(), Error> {
        match self {
            Health::Sled(data, commit_ended) => {
                let flushed = data.clone();
                tokio::task::spawn_blocking(move || {
                    flushed.flush()?;
                    // A compaction still running gives up at once, and lets go of the data dir.
                    flushed.session_log().close();
                    flushed
                        .session_log()
                        .wait_idle(std::time::Duration::from_secs(10));
                    Ok::<_, Error>(())
                })
                .await
                .map_err(|e| Error::Storage(format!("the final flush failed: {e}")))??;
                let mut ended = commit_ended.clone();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    ended.wait_for(|ended| *ended),
                )
                .await;
                Ok(())
            }
            Health::Redis(_) => Ok(()),
        }
    }
}

impl Health {
    /// Every user, a page at a time, for a backup while the broker serves.
    pub fn export_users(&self) -> UserExport {
        UserExport(match self {
            Health::Sled(data, _) => Walk::Sled {
                data: data.clone(),
                after: None,
                done: false,
            },
            Health::Redis(redis) => Walk::Redis {
                redis: redis.clone(),
                cursor: 0,
                seen: Default::default(),
                done: false,
            },
        })
    }
}

/// Users an export reads from the store at a time: a few hundred lines of JSON.
pub const EXPORT_PAGE: usize = 256;

/// Every registered user, read a page at a time while the broker serves (`GET /admin/export`):
/// at most a page of users in memory, no lock a login waits for, no actor involved.
///
/// What a walk to its end gives: every user registered before it began, exactly once, each as
/// stored at some instant of the walk (a user is read whole: one sled value, one `HGETALL`); a
/// user registered meanwhile may come or not. With sled, the walk ends by putting the users'
/// writes on disk, so no user it gave can be lost to a crash of the broker after it (a
/// registration still being flushed when it was read, say).
pub struct UserExport(Walk);

/// Where a walk over the users is.
enum Walk {
    /// In key order, through sled's tree, one page on tokio's blocking pool at a time.
    Sled {
        /// The data dir.
        data: DataDir,
        /// The key of the last identity given.
        after: Option<String>,
        /// Whether every user was given.
        done: bool,
    },
    /// In Redis's `SCAN` order, dropping a key met again.
    Redis {
        /// The server.
        redis: Redis,
        /// `SCAN`'s cursor.
        cursor: u64,
        /// The uids given so far, per app (compact: see [`UidSet`]; a uid has one identity per
        /// app).
        seen: std::collections::HashMap<Option<String>, UidSet>,
        /// Whether `SCAN` has come back to 0.
        done: bool,
    },
}

impl UserExport {
    /// The next users, or `None` once every user was given.
    pub async fn next_page(&mut self) -> Result<Option<Vec<User>>, Error> {
        match &mut self.0 {
            Walk::Sled { done: true, .. } | Walk::Redis { done: true, .. } => Ok(None),
            Walk::Sled { data, after, done } => {
                let (users, from) = (data.users().clone(), after.clone());
                let page =
                    tokio::task::spawn_blocking(move || users.page(from.as_deref(), EXPORT_PAGE))
                        .await
                        .map_err(|e| {
                            Error::Storage(format!("reading users for the export failed: {e}"))
                        })??;
                let Some(last) = page.last() else {
                    data.flush_users().await?;
                    *done = true;
                    return Ok(None);
                };
                *after = Some(last.key().into_owned());
                Ok(Some(page.into_iter().map(User::from).collect()))
            }
            Walk::Redis {
                redis,
                cursor,
                seen,
                done,
            } => loop {
                let (next, records) = redis.user_page(*cursor, EXPORT_PAGE).await?;
                (*cursor, *done) = (next, next == 0);
                let page: Vec<User> = records
                    .into_iter()
                    .filter(|user| seen.entry(user.appid.clone()).or_default().insert(user.uid))
                    .map(User::from)
                    .collect();
                // SCAN may answer a step with no key that matches.
                match (page.is_empty(), *done) {
                    (false, _) => return Ok(Some(page)),
                    (true, true) => return Ok(None),
                    (true, false) => {}
                }
            },
        }
    }
}

impl Health {
    /// Makes the next `n` flushes of the group commit fail (`fault-injection` only); `false`
    /// on Redis, which has none.
    #[cfg(feature = "fault-injection")]
    pub fn fail_flushes(&self, n: u32) -> bool {
        match self {
            Health::Sled(data, _) => {
                data.fail_flushes(n);
                true
            }
            Health::Redis(_) => false,
        }
    }
}

/// The fast path of session checks: the keeper's table, read without a trip through its mailbox
/// (sled only; with Redis every check is a script on the server).
#[derive(Clone)]
pub struct SessionReader(Arc<SessionTable>);

impl SessionReader {
    /// Checks the session of `hash` at `now`, changing nothing but its last use in memory.
    pub fn check(&self, hash: &TokenHash, now: u64) -> FastCheck {
        self.0.check(hash, now)
    }
}

/// The registered users.
pub enum Users {
    /// In sled, on this machine.
    Sled(SledUsers),
    /// In a Redis server shared by every broker.
    Redis(Redis),
}

impl Users {
    /// Registers the identity WeChat named in the app `appid` (`None`: the default app), or
    /// stores its new session_key (and unionid). A new identity whose unionid belongs to a uid
    /// joins it (not new), in the same atomic step.
    pub fn upsert(
        &mut self,
        appid: Option<&str>,
        login: Code2Session,
        now: u64,
    ) -> Pending<Registration> {
        match self {
            Users::Sled(users) => users.upsert(appid, login, now),
            Users::Redis(redis) => redis.upsert_user(appid, login, now),
        }
    }

    /// The current session_key of the identity filed under `key` (see
    /// [`crate::user::identity_key`]); the other methods name identities so too.
    pub fn session_key(&self, key: String) -> Pending<String> {
        match self {
            Users::Sled(users) => users.session_key(&key),
            Users::Redis(redis) => redis.session_key(key),
        }
    }

    /// Stores a decrypted profile, durably. Its unionId may confirm the user's unionid or give
    /// one to a user who has none; one that differs from the user's own or is bound to another
    /// uid is [`Error::UnionidConflict`], and nothing is stored.
    pub fn save_profile(&mut self, openid: String, profile: Profile, now: u64) -> Pending<User> {
        match self {
            Users::Sled(users) => users.save_profile(&openid, &profile, now),
            Users::Redis(redis) => redis.save_profile(openid, profile, now),
        }
    }

    /// Stores a phone number, durably.
    pub fn save_phone(&mut self, openid: String, phone: Phone, now: u64) -> Pending<User> {
        match self {
            Users::Sled(users) => users.save_phone(&openid, &phone, now),
            Users::Redis(redis) => redis.save_phone(openid, phone, now),
        }
    }

    /// Replaces the session_key `old` by `new` (after WeChat reset it), durably; a key that
    /// changed meanwhile (a login stored a newer one) is kept.
    pub fn replace_session_key(
        &mut self,
        openid: String,
        old: String,
        new: String,
        now: u64,
    ) -> Pending<User> {
        match self {
            Users::Sled(users) => users.replace_session_key(&openid, &old, &new, now),
            Users::Redis(redis) => redis.replace_session_key(openid, old, new, now),
        }
    }

    /// Finds a user by uid, openid or unionid.
    pub fn find(&self, key: UserKey) -> Pending<Option<User>> {
        match self {
            Users::Sled(users) => users.find(&key),
            Users::Redis(redis) => redis.find_user(key),
        }
    }

    /// How many users are registered.
    pub fn count(&self) -> Pending<usize> {
        match self {
            Users::Sled(users) => users.count(),
            Users::Redis(redis) => redis.user_count(),
        }
    }
}

/// The live sessions.
pub enum Sessions {
    /// In memory, written to the session log.
    Sled(SledSessions),
    /// In a Redis server shared by every broker; expiry is Redis's own TTL. With the appid of
    /// sessions stored without one.
    Redis(Redis, SessionPolicy, Arc<str>),
}

impl Sessions {
    /// Issues a token for a user who just logged in; a unionid also goes on the user's older
    /// sessions.
    pub fn issue(
        &mut self,
        uid: u64,
        appid: Option<Arc<str>>,
        openid: String,
        unionid: Option<String>,
        now: u64,
    ) -> Pending<Issued> {
        let token = match new_token() {
            Ok(token) => token,
            Err(e) => {
                return Pending::Ready(Err(Error::Unavailable(format!("the OS RNG failed: {e}"))));
            }
        };
        match self {
            Sessions::Sled(sessions) => {
                Pending::Ready(sessions.issue(token, uid, appid, openid, unionid, now))
            }
            Sessions::Redis(redis, policy, _) => {
                let record = policy.fresh_record(uid, appid, openid, unionid, now);
                redis.issue_session(*policy, token, record, now)
            }
        }
    }

    /// Who the session belongs to; slides its idle expiry.
    pub fn check(&mut self, hash: TokenHash, now: u64) -> Pending<SessionInfo> {
        match self {
            Sessions::Sled(sessions) => Pending::Ready(sessions.check(&hash, now)),
            Sessions::Redis(redis, policy, default_app) => {
                redis.check_session(*policy, default_app.clone(), hash, now)
            }
        }
    }

    /// Ends a session, durably; `InvalidSession` if it was not live.
    pub fn revoke(&mut self, hash: TokenHash, now: u64) -> Pending<()> {
        match self {
            Sessions::Sled(sessions) => sessions.revoke(&hash, now),
            Sessions::Redis(redis, policy, _) => redis.revoke_session(*policy, hash, now),
        }
    }

    /// Ends every session of a user, durably; how many were live.
    pub fn revoke_user(&mut self, uid: u64, now: u64) -> Pending<usize> {
        match self {
            Sessions::Sled(sessions) => sessions.revoke_user(uid, now),
            Sessions::Redis(redis, policy, _) => redis.revoke_user_sessions(*policy, uid, now),
        }
    }

    /// Records a unionid learned after login on all of the user's sessions, durably.
    pub fn set_unionid(&mut self, uid: u64, unionid: String) -> Pending<()> {
        match self {
            Sessions::Sled(sessions) => sessions.set_unionid_durably(uid, &unionid),
            Sessions::Redis(redis, ..) => redis.set_session_unionid(uid, unionid),
        }
    }

    /// The live sessions of a user.
    pub fn list(&self, uid: u64, now: u64) -> Pending<Vec<SessionSummary>> {
        match self {
            Sessions::Sled(sessions) => Pending::Ready(Ok(sessions.list(uid, now))),
            Sessions::Redis(redis, policy, _) => redis.list_sessions(*policy, uid, now),
        }
    }

    /// Sessions held (with sled, expired ones not yet swept included).
    pub fn count(&self) -> Pending<usize> {
        match self {
            Sessions::Sled(sessions) => Pending::Ready(Ok(sessions.len())),
            Sessions::Redis(redis, ..) => redis.session_count(),
        }
    }

    /// The fast path for checks (sled only).
    pub fn reader(&self) -> Option<SessionReader> {
        match self {
            Sessions::Sled(sessions) => Some(SessionReader(sessions.table())),
            Sessions::Redis(..) => None,
        }
    }

    /// Deletes expired sessions, a part at a time (Redis expires them itself); with sled, has
    /// the session log rewritten beside the caller when it is worth it. Returns whether the sweep
    /// goes on: the caller sweeps again after its other work.
    pub fn sweep(&mut self, now: u64) -> bool {
        match self {
            Sessions::Sled(sessions) => sessions.sweep(now),
            Sessions::Redis(..) => false,
        }
    }

    /// Persists what only memory holds (at a clean stop).
    pub fn persist(&mut self) -> Result<(), Error> {
        match self {
            Sessions::Sled(sessions) => sessions.write_back_last_seen(),
            Sessions::Redis(..) => Ok(()),
        }
    }
}

/// The signing keys of access tokens (crate-private: the private keys stay inside).
#[derive(Clone)]
pub(crate) enum Keys {
    /// In the data dir.
    Sled(SledKeys),
    /// In Redis, shared by every broker.
    Redis(Redis),
}

impl Keys {
    /// The stored keys, after creating the first one at `now` if none signs yet.
    pub(crate) fn ensure(&self, policy: AccessPolicy, now: u64) -> Pending<Vec<KeyRecord>> {
        match self {
            Keys::Sled(keys) => blocking(keys.clone(), move |keys| keys.ensure(policy, now)),
            Keys::Redis(redis) => match KeyRecord::generate(now) {
                Ok(first) => redis.ensure_keys(first),
                Err(e) => Pending::Ready(Err(e)),
            },
        }
    }

    /// The stored keys.
    pub(crate) fn list(&self) -> Pending<Vec<KeyRecord>> {
        match self {
            Keys::Sled(keys) => blocking(keys.clone(), |keys| keys.list()),
            Keys::Redis(redis) => redis.list_keys(),
        }
    }

    /// Retires every key at `now` and adds a new one that signs from now on, durably; drops the
    /// keys no longer published.
    pub(crate) fn rotate(&self, policy: AccessPolicy, now: u64) -> Pending<Vec<KeyRecord>> {
        match self {
            Keys::Sled(keys) => blocking(keys.clone(), move |keys| keys.rotate(policy, now)),
            Keys::Redis(redis) => match KeyRecord::generate(now) {
                Ok(fresh) => redis.rotate_keys(fresh, policy, now),
                Err(e) => Pending::Ready(Err(e)),
            },
        }
    }
}

/// `work` on tokio's blocking pool (it waits for a sled flush).
fn blocking<S: Send + 'static, T: Send + 'static>(
    store: S,
    work: impl FnOnce(S) -> Result<T, Error> + Send + 'static,
) -> Pending<T> {
    Pending::Later(Box::pin(async move {
        tokio::task::spawn_blocking(move || work(store))
            .await
            .map_err(|e| Error::Storage(format!("a storage task failed: {e}")))?
    }))
}

/// The revocation feed: events recorded where sessions are revoked (by the storage itself), read
/// back from a cursor, and handed to subscribers as they are recorded.
#[derive(Clone)]
pub enum Feed {
    /// In the data dir.
    Sled(Arc<SledRevocations>),
    /// In Redis, followed by this broker.
    Redis(RedisFeed),
}

impl Feed {
    /// Up to `limit` events after `after`, and what the feed knows of itself.
    pub fn read(&self, after: Cursor, limit: usize, now: u64) -> Pending<Page> {
        match self {
            Feed::Sled(feed) => Pending::Ready(feed.read(after, limit)),
            Feed::Redis(feed) => feed.read(after, limit, now),
        }
    }

    /// Every event recorded from now on (by any broker, with Redis): whatever is read after this
    /// returns, the events recorded since reach the receiver.
    pub async fn subscribe(&self) -> Result<tokio::sync::broadcast::Receiver<FeedEvent>, Error> {
        match self {
            Feed::Sled(feed) => Ok(feed.subscribe()),
            Feed::Redis(feed) => feed.subscribe().await,
        }
    }

    /// Stops following (at broker shutdown).
    pub fn close(&self) {
        if let Feed::Redis(feed) = self {
            feed.close();
        }
    }
}
