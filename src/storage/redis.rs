//! Users, sessions and used login codes in a Redis server that several brokers share.
//!
//! Every operation that reads and then writes is one Lua script, so it is atomic on the server:
//! two brokers registering the same openid at once get one uid, and a logout on one broker is
//! seen by the next check on any other (there is no per-broker cache to go stale). A session's
//! idle expiry is the key's own TTL; a check moves it (and writes) only when the last use moved
//! by a tenth of the idle TTL.
//!
//! Keys, all under `wxb:`:
//! - `user:{key}`: an identity (key: the openid for the default app, the only key before several
//!   apps; `appid:openid` for the others): hash of `uid`, `appid` (not for the default app),
//!   `openid`, `unionid`, `session_key`, `created_at`, `updated_at`, `profile` and `phone` (JSON)
//! - `uid:{uid}` -> the key of the uid's first identity; `identities:{uid}`: set of the keys of
//!   the identities that joined the uid later (through another app, by unionid);
//!   `unionid:{unionid}` -> uid; `next_uid`: the last uid handed out; `user_count` (uids);
//!   `default_app`: the appid whose identities are filed without one; `migrated_at`: when
//!   `wxbroker migrate` finished filling it (unix seconds)
//! - `session:{id}` (id: hex SHA-256 of the token): hash of `uid`, `appid` (not for the default
//!   app), `openid`, `unionid`, `created_at`, `last_seen`, `expires_at`; TTL = the idle deadline
//! - `sessions:{uid}`: sorted set of the user's session ids by creation
//! - `code:{hex SHA-256 of the code}` (of `appid:code` for another app than the default): a login
//!   code exchanged (or being exchanged) by some broker, for the code's 5-minute life
//! - `signing_keys`: hash of kid -> the access-token signing key (JSON, with its private seed);
//!   `signing_keys:retired`: kid -> unix seconds of its retirement
//! - `revocations`: the stream of the revocation feed; `revocations:origin`,
//!   `revocations:horizon`
//! - `calls:{uid}:{minute}`: the calls to WeChat the user's requests made in that minute (unix
//!   seconds / 60), for the budget of `WXBROKER_WECHAT_CALLS_PER_MIN`; gone two minutes after
//!   its first call
//!
//! The scripts are the `.lua` files beside this one, included at build time. They compute some of
//! the keys they touch, so Redis Cluster is not supported: one
//! server (with replicas or Sentinel in front, through a `redis://` URL that reaches the primary).

mod keys;
mod revocations;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};
use sha2::{Digest, Sha256};

use super::{Booking, Pending};
use crate::Error;
use crate::crypto::{TokenHash, hex, session_id, token_hash};
use crate::session::{
    Issued, MAX_SESSIONS_PER_USER, SessionInfo, SessionPolicy, SessionRecord, SessionSummary,
};
use crate::upstream::Code2Session;
use crate::user::{
    Identity, Phone, Profile, Registration, User, UserKey, UserRecord, identity_key,
};

pub use self::revocations::RedisFeed;

/// Every key of wxbroker starts with this.
const PREFIX: &str = "wxb:";
/// How long a login code is remembered: WeChat's codes live about five minutes.
const CODE_LIFETIME_SECS: u64 = 300;
/// How long a user's call counter for one minute lives: past its minute, with room for brokers
/// whose clocks run a little behind the one that created it.
const CALL_COUNTER_SECS: u64 = 2 * super::call_budget::WINDOW_SECS;

/// A connection to the shared Redis (multiplexed, reconnecting). Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    con: ConnectionManager,
    /// For connections of their own (the revocation feed's blocking reads).
    client: redis::Client,
    /// Seconds a revocation stays in the feed; 0 while the feed is off.
    keep_revocations: u64,
}

impl Redis {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port/db`).
    pub async fn connect(url: &str) -> Result<Redis, Error> {
        let shown = redacted(url);
        let client = redis::Client::open(url)
            .map_err(|e| Error::Config(format!("bad WXBROKER_STORE {shown}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let mut con = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| Error::Config(format!("cannot reach Redis at {shown}: {e}")))?;
        let cluster: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut con)
            .await
            .map_err(|e| Error::Config(format!("Redis at {shown} does not answer INFO: {e}")))?;
        if cluster.contains("cluster_enabled:1") {
            return Err(Error::Config(format!(
                "Redis at {shown} is a Redis Cluster node, which wxbroker does not support: point \
                 WXBROKER_STORE at a single Redis server (or a proxy presenting one)"
            )));
        }
        // Managed Redis services may refuse CONFIG; then there is nothing to check.
        let eviction: Result<(String, String), _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut con)
            .await;
        if let Ok((_, policy)) = eviction
            && policy.starts_with("allkeys")
        {
            tracing::warn!(
                policy,
                "Redis may evict any key under memory pressure: users and the uid counter could \
                 be lost and uids handed out twice; set maxmemory-policy noeviction"
            );
        }
        Ok(Redis {
            con,
            client,
            keep_revocations: 0,
        })
    }

    /// The same connection, recording every revocation in the feed for `keep` seconds.
    pub fn with_revocations(mut self, keep: u64) -> Redis {
        self.keep_revocations = keep;
        self
    }

    /// Whether the server answers.
    pub async fn ping(&self) -> Result<(), Error> {
        let mut con = self.con.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut con)
            .await
            .map(drop)
            .map_err(storage)
    }

    /// The default app recorded by [`Redis::claim_default_app`], if any yet.
    pub async fn default_app(&self) -> Result<Option<String>, Error> {
        let mut con = self.con.clone();
        redis::cmd("GET")
            .arg(format!("{PREFIX}default_app"))
            .query_async(&mut con)
            .await
            .map_err(storage)
    }

    /// The default app of this data: `appid` if none was recorded yet (a new Redis, or one from
    /// before several apps), which it then is.
    pub async fn claim_default_app(&self, appid: &str) -> Result<String, Error> {
        let mut con = self.con.clone();
        let _: Option<String> = redis::cmd("SET")
            .arg(format!("{PREFIX}default_app"))
            .arg(appid)
            .arg("NX")
            .query_async(&mut con)
            .await
            .map_err(storage)?;
        Ok(self
            .default_app()
            .await?
            .unwrap_or_else(|| appid.to_owned()))
    }

    /// When a migration into this Redis finished (unix seconds), if one did.
    pub async fn migrated_at(&self) -> Result<Option<u64>, Error> {
        let mut con = self.con.clone();
        redis::cmd("GET")
            .arg(format!("{PREFIX}migrated_at"))
            .query_async(&mut con)
            .await
            .map_err(storage)
    }

    /// Records that a migration into this Redis finished at `now`.
    pub async fn mark_migrated(&self, now: u64) -> Result<(), Error> {
        let mut con = self.con.clone();
        redis::cmd("SET")
            .arg(format!("{PREFIX}migrated_at"))
            .arg(now)
            .query_async::<String>(&mut con)
            .await
            .map(drop)
            .map_err(storage)
    }

    /// Books `code` as being exchanged by this broker, unless some broker already booked it.
    pub async fn book_code(&self, code: &str) -> Result<Booking, Error> {
        let mut con = self.con.clone();
        let booked: Option<String> = BOOK_CODE
            .key(code_key(code))
            .arg(CODE_LIFETIME_SECS)
            .invoke_async(&mut con)
            .await
            .map_err(storage)?;
        Ok(match booked.as_deref() {
            None => Booking::Booked,
            Some("done") => Booking::Used,
            Some(_) => Booking::InFlight,
        })
    }

    /// Marks a booked code as exchanged: a replay anywhere is `code_used` from now on.
    pub async fn code_done(&self, code: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        redis::cmd("SET")
            .arg(code_key(code))
            .arg("done")
            .arg("XX")
            .arg("KEEPTTL")
            .query_async::<Option<String>>(&mut con)
            .await
            .map(drop)
            .map_err(storage)
    }

    /// Gives up the booking of a code whose exchange failed, so that a retry may reach WeChat.
    pub async fn release_code(&self, code: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        redis::cmd("DEL")
            .arg(code_key(code))
            .query_async::<i64>(&mut con)
            .await
            .map(drop)
            .map_err(storage)
    }

    /// Counts one call to WeChat made for `uid` in the budget window `window`; returns the
    /// window's count so far, this call included, as every broker on this Redis has counted it.
    pub async fn count_call(&self, uid: u64, window: u64) -> Result<u64, Error> {
        let mut con = self.con.clone();
        COUNT_CALL
            .key(format!("{PREFIX}calls:{uid}:{window}"))
            .arg(CALL_COUNTER_SECS)
            .invoke_async(&mut con)
            .await
            .map_err(storage)
    }

    /// Runs `invocation` in a task-owned future.
    fn run<T, R>(
        &self,
        script: &'static Script,
        args: Vec<String>,
        then: impl FnOnce(R) -> Result<T, Error> + Send + 'static,
    ) -> Pending<T>
    where
        T: Send + 'static,
        R: FromRedisValue + Send + 'static,
    {
        let mut con = self.con.clone();
        Pending::Later(Box::pin(async move {
            let mut invocation = script.prepare_invoke();
            invocation.arg(PREFIX);
            for arg in &args {
                invocation.arg(arg);
            }
            let raw: R = invocation.invoke_async(&mut con).await.map_err(storage)?;
            then(raw)
        }))
    }

    // Users.

    pub(crate) fn upsert_user(
        &self,
        appid: Option<&str>,
        login: Code2Session,
        now: u64,
    ) -> Pending<Registration> {
        let args = vec![
            identity_key(appid, &login.openid).into_owned(),
            login.openid.clone(),
            login.session_key,
            login.unionid.unwrap_or_default(),
            now.to_string(),
            appid.unwrap_or_default().to_owned(),
        ];
        let openid = login.openid;
        self.run(
            &UPSERT_USER,
            args,
            move |(is_new, uid, unionid): (i64, u64, String)| {
                Ok(Registration {
                    uid,
                    openid,
                    unionid: Some(unionid).filter(|u| !u.is_empty()),
                    is_new: is_new == 1,
                })
            },
        )
    }

    pub(crate) fn session_key(&self, key: String) -> Pending<String> {
        let mut con = self.con.clone();
        Pending::Later(Box::pin(async move {
            let key: Option<String> = redis::cmd("HGET")
                .arg(format!("{PREFIX}user:{key}"))
                .arg("session_key")
                .query_async(&mut con)
                .await
                .map_err(storage)?;
            key.ok_or(Error::InvalidSession)
        }))
    }

    /// Stores a profile; its unionId may confirm the user's unionid or give one to a user who
    /// has none, never change one nor take another uid's (`UnionidConflict`, nothing written),
    /// checked and written in one script.
    pub(crate) fn save_profile(&self, openid: String, profile: Profile, now: u64) -> Pending<User> {
        let unionid = profile.union_id.clone().unwrap_or_default();
        let json = serde_json::to_string(&profile).expect("a profile serializes");
        self.update_user(openid, now, unionid, ("profile", json), None)
    }

    pub(crate) fn save_phone(&self, openid: String, phone: Phone, now: u64) -> Pending<User> {
        let json = serde_json::to_string(&phone).expect("a phone serializes");
        self.update_user(openid, now, String::new(), ("phone", json), None)
    }

    pub(crate) fn replace_session_key(
        &self,
        openid: String,
        old: String,
        new: String,
        now: u64,
    ) -> Pending<User> {
        self.update_user(openid, now, String::new(), ("session_key", new), Some(old))
    }

    fn update_user(
        &self,
        openid: String,
        now: u64,
        unionid: String,
        (field, value): (&str, String),
        expect: Option<String>,
    ) -> Pending<User> {
        let mut args = vec![
            openid.clone(),
            now.to_string(),
            unionid,
            field.into(),
            value,
        ];
        args.extend(expect);
        self.run(&UPDATE_USER, args, move |reply: redis::Value| {
            let fields: Vec<String> = match reply {
                redis::Value::Nil => return Err(Error::Storage(format!("no user {openid}"))),
                redis::Value::Int(0) => return Err(Error::UnionidConflict),
                fields => redis::from_redis_value(fields)
                    .map_err(|e| Error::Storage(format!("Redis: a user update answered {e}")))?,
            };
            user_record(fields).map(User::from)
        })
    }

    /// The identity `key` finds, with every identity of its uid.
    pub(crate) fn find_user(&self, key: UserKey) -> Pending<Option<User>> {
        let (kind, value) = match key {
            UserKey::Uid(uid) => ("uid", uid.to_string()),
            UserKey::Openid(openid) => ("key", openid),
            UserKey::Identity(id) => (
                "key",
                identity_key(id.appid.as_deref(), &id.openid).into_owned(),
            ),
            UserKey::Unionid(unionid) => ("unionid", unionid),
        };
        self.run(
            &FIND_USER,
            vec![kind.into(), value],
            |found: Option<(Vec<String>, Vec<String>)>| {
                let Some((fields, ids)) = found else {
                    return Ok(None);
                };
                let mut user = User::from(user_record(fields)?);
                let mut ids = ids.into_iter();
                while let (Some(appid), Some(openid)) = (ids.next(), ids.next()) {
                    let appid = Some(appid).filter(|appid| !appid.is_empty());
                    user.identities.push(Identity { appid, openid });
                }
                Ok(Some(user))
            },
        )
    }

    pub(crate) fn user_count(&self) -> Pending<usize> {
        let mut con = self.con.clone();
        Pending::Later(Box::pin(async move {
            let count: Option<usize> = redis::cmd("GET")
                .arg(format!("{PREFIX}user_count"))
                .query_async(&mut con)
                .await
                .map_err(storage)?;
            Ok(count.unwrap_or(0))
        }))
    }

    /// One step of a walk over every user (`SCAN` over `user:*`, from `cursor`, 0 at the start):
    /// the cursor to go on from (0 once the walk is over) and the users of this step, each read
    /// whole by one `HGETALL`. A walk meets every key that exists from its start to its end,
    /// but may meet a key more than once (when Redis shrinks its table meanwhile): the caller
    /// drops repeats.
    pub(crate) async fn user_page(
        &self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<UserRecord>), Error> {
        let mut con = self.con.clone();
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{PREFIX}user:*"))
            .arg("COUNT")
            .arg(count)
            .query_async(&mut con)
            .await
            .map_err(storage)?;
        if keys.is_empty() {
            return Ok((next, Vec::new()));
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("HGETALL").arg(key);
        }
        let hashes: Vec<HashMap<String, String>> =
            pipe.query_async(&mut con).await.map_err(storage)?;
        let users = hashes
            .into_iter()
            .filter(|fields| !fields.is_empty())
            .map(|fields| user_record(fields.into_iter().flat_map(|(f, v)| [f, v]).collect()))
            .collect::<Result<_, _>>()?;
        Ok((next, users))
    }

    /// Writes a user from another store, keeping its uid (the uid counter moves past it); a user
    /// already here is kept as it is. Returns whether the user was written.
    pub fn import_user(&self, user: &UserRecord) -> Pending<bool> {
        let json = |value: Option<String>| value.unwrap_or_default();
        let args = vec![
            user.uid.to_string(),
            user.openid.clone(),
            user.unionid.clone().unwrap_or_default(),
            user.session_key.clone(),
            user.created_at.to_string(),
            user.updated_at.to_string(),
            json(
                user.profile
                    .as_ref()
                    .map(|p| serde_json::to_string(p).expect("serializes")),
            ),
            json(
                user.phone
                    .as_ref()
                    .map(|p| serde_json::to_string(p).expect("serializes")),
            ),
            user.key().into_owned(),
            user.appid.clone().unwrap_or_default(),
        ];
        self.run(&IMPORT_USER, args, |imported: i64| Ok(imported == 1))
    }

    // Sessions.

    pub(crate) fn issue_session(
        &self,
        policy: SessionPolicy,
        token: String,
        record: SessionRecord,
        now: u64,
    ) -> Pending<Issued> {
        let uid = record.uid;
        let put = self.put_session(policy, &token_hash(&token), &record, now);
        // A unionid WeChat reports now also belongs on the user's older sessions.
        let spread = record
            .unionid
            .map(|unionid| self.set_session_unionid(uid, unionid));
        let expires_in = policy.expires_in();
        Pending::Later(Box::pin(async move {
            put.wait().await?;
            if let Some(spread) = spread {
                spread.wait().await?;
            }
            Ok(Issued { token, expires_in })
        }))
    }

    /// Stores a fresh session record.
    fn put_session(
        &self,
        policy: SessionPolicy,
        hash: &TokenHash,
        record: &SessionRecord,
        now: u64,
    ) -> Pending<()> {
        self.write_session(policy, hash, record, now, false)
            .map(drop)
    }

    /// Stores a session moved from another store, unless one with its id is here already or it
    /// is dead at `now`. Returns whether it was written.
    pub fn import_session(
        &self,
        policy: SessionPolicy,
        hash: &TokenHash,
        record: &SessionRecord,
        now: u64,
    ) -> Pending<bool> {
        self.write_session(policy, hash, record, now, true)
    }

    fn write_session(
        &self,
        policy: SessionPolicy,
        hash: &TokenHash,
        record: &SessionRecord,
        now: u64,
        only_new: bool,
    ) -> Pending<bool> {
        let deadline = policy.deadline(record.last_seen, record.expires_at);
        if deadline <= now {
            return Pending::Ready(Ok(false));
        }
        let args = vec![
            session_id(hash),
            record.uid.to_string(),
            record.openid.clone(),
            record.unionid.clone().unwrap_or_default(),
            record.created_at.to_string(),
            record.last_seen.to_string(),
            record.expires_at.to_string(),
            ((deadline - now) * 1000).to_string(),
            (record.expires_at.saturating_sub(now) * 1000).to_string(),
            MAX_SESSIONS_PER_USER.to_string(),
            if only_new { "new" } else { "" }.to_owned(),
            record.appid.as_deref().unwrap_or_default().to_owned(),
        ];
        self.run(&PUT_SESSION, args, |written: i64| Ok(written == 1))
    }

    pub(crate) fn check_session(
        &self,
        policy: SessionPolicy,
        default_app: Arc<str>,
        hash: TokenHash,
        now: u64,
    ) -> Pending<SessionInfo> {
        let args = vec![
            session_id(&hash),
            now.to_string(),
            policy.idle_ttl.to_string(),
            policy.write_back_step().to_string(),
        ];
        self.run(
            &CHECK_SESSION,
            args,
            move |found: Option<(u64, String, String, u64, String)>| {
                let (uid, openid, unionid, expires_at, appid) =
                    found.ok_or(Error::InvalidSession)?;
                Ok(SessionInfo {
                    uid,
                    appid: match appid.is_empty() {
                        true => default_app,
                        false => Arc::from(appid),
                    },
                    openid,
                    unionid: Some(unionid).filter(|u| !u.is_empty()),
                    expires_at,
                })
            },
        )
    }

    pub(crate) fn revoke_session(
        &self,
        policy: SessionPolicy,
        hash: TokenHash,
        now: u64,
    ) -> Pending<()> {
        let args = vec![
            session_id(&hash),
            now.to_string(),
            policy.idle_ttl.to_string(),
            self.keep_revocations.to_string(),
        ];
        self.run(&REVOKE_SESSION, args, |live: i64| {
            if live == 1 {
                Ok(())
            } else {
                Err(Error::InvalidSession)
            }
        })
    }

    pub(crate) fn revoke_user_sessions(
        &self,
        policy: SessionPolicy,
        uid: u64,
        now: u64,
    ) -> Pending<usize> {
        let args = vec![
            uid.to_string(),
            now.to_string(),
            policy.idle_ttl.to_string(),
            self.keep_revocations.to_string(),
        ];
        self.run(&REVOKE_USER, args, |live: usize| Ok(live))
    }

    pub(crate) fn set_session_unionid(&self, uid: u64, unionid: String) -> Pending<()> {
        self.run(
            &SET_UNIONID,
            vec![uid.to_string(), unionid],
            |_: i64| Ok(()),
        )
    }

    pub(crate) fn list_sessions(
        &self,
        policy: SessionPolicy,
        uid: u64,
        now: u64,
    ) -> Pending<Vec<SessionSummary>> {
        let args = vec![
            uid.to_string(),
            now.to_string(),
            policy.idle_ttl.to_string(),
        ];
        self.run(
            &LIST_SESSIONS,
            args,
            |rows: Vec<(String, u64, u64, u64)>| {
                Ok(rows
                    .into_iter()
                    .map(|(id, created_at, last_seen, expires_at)| SessionSummary {
                        id,
                        created_at,
                        last_seen,
                        expires_at,
                    })
                    .collect())
            },
        )
    }

    /// Sessions stored. Walks the keyspace (SCAN): for the admin's stats, not per request.
    pub fn session_count(&self) -> Pending<usize> {
        let mut con = self.con.clone();
        Pending::Later(Box::pin(async move {
            let mut cursor = 0u64;
            let mut seen = std::collections::HashSet::new();
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{PREFIX}session:*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut con)
                    .await
                    .map_err(storage)?;
                // SCAN may return a key more than once.
                seen.extend(keys);
                if next == 0 {
                    return Ok(seen.len());
                }
                cursor = next;
            }
        }))
    }
}

/// A Redis that cannot be reached is a 503 (retry), anything else a storage failure.
fn storage(err: redis::RedisError) -> Error {
    if err.is_io_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || err.is_timeout()
    {
        Error::Unavailable(format!("Redis is unreachable: {err}"))
    } else {
        Error::Storage(format!("Redis: {err}"))
    }
}

fn code_key(code: &str) -> String {
    format!("{PREFIX}code:{}", hex(&Sha256::digest(code.as_bytes())))
}

/// `url` without its password (nor a query, where `redis+unix` URLs may carry one), for messages.
fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("REDACTED"));
            }
            parsed.set_query(None);
            parsed.to_string()
        }
        Err(_) => "(unparsable URL)".into(),
    }
}

/// A user from the field/value list of its hash.
fn user_record(fields: Vec<String>) -> Result<UserRecord, Error> {
    let mut map: HashMap<String, String> = HashMap::new();
    let mut pairs = fields.into_iter();
    while let (Some(field), Some(value)) = (pairs.next(), pairs.next()) {
        map.insert(field, value);
    }
    let bad = |what: &str| Error::Storage(format!("Redis: a user record has a bad {what}"));
    let number = |field: &str| -> Result<u64, Error> {
        map.get(field)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(field))
    };
    let json = |field: &str| -> Result<Option<serde_json::Value>, Error> {
        map.get(field)
            .map(|v| serde_json::from_str(v).map_err(|_| bad(field)))
            .transpose()
    };
    let appid = map.get("appid").cloned();
    Ok(UserRecord {
        uid: number("uid")?,
        appid,
        created_at: number("created_at")?,
        updated_at: number("updated_at")?,
        profile: json("profile")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| bad("profile"))?,
        phone: json("phone")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| bad("phone"))?,
        openid: map.remove("openid").ok_or_else(|| bad("openid"))?,
        unionid: map.remove("unionid"),
        session_key: map.remove("session_key").unwrap_or_default(),
    })
}

/// A script from the `.lua` files beside this one, joined in order (helpers ahead of the
/// script that calls them), read at build time and loaded into Redis at first use.
macro_rules! script {
    ($($file:literal),+) => {
        LazyLock::new(|| Script::new(concat!($(include_str!(concat!("redis/", $file, ".lua"))),+)))
    };
}

/// KEYS: the code's key. ARGV: lifetime in seconds. Books the code (`pending`) and returns nil, or
/// returns the booking another broker holds (`pending` or `done`).
static BOOK_CODE: LazyLock<Script> = script!("book_code");

/// KEYS: a user's call counter for one minute. ARGV: its lifetime in seconds. Counts one call
/// (INCR, and EXPIRE on the first) and returns the count.
static COUNT_CALL: LazyLock<Script> = script!("count_call");

// The other scripts. ARGV[1] is always the key prefix.

/// ARGV: identity key, openid, session_key, unionid ('' for none), now, appid ('' for the default
/// app). Returns {is_new, uid, unionid or ''}; a new identity whose unionid a uid holds joins it.
static UPSERT_USER: LazyLock<Script> = script!("bind_unionid", "upsert_user");

/// ARGV: identity key, now, unionid ('' for none), field, value[, expected current value of the field:
/// if it holds another, it is kept]. Returns the user's fields, nil (no user), or 0 when the
/// unionid differs from the user's own or is bound to another uid (nothing written).
static UPDATE_USER: LazyLock<Script> = script!("bind_unionid", "update_user");

/// ARGV: 'uid' | 'key' | 'unionid', value. Returns the identity's fields and the uid's identities
/// (appid or '', openid, ...), or nil.
static FIND_USER: LazyLock<Script> = script!("find_user");

/// ARGV: uid, openid, unionid, session_key, created_at, updated_at, profile, phone ('' for none),
/// identity key, appid ('' for the default app). A user already in Redis is kept as it is (it may
/// have logged in there since): returns 0. An identity of another app joins the uid.
static IMPORT_USER: LazyLock<Script> = script!("bind_unionid", "import_user");

/// ARGV: id, uid, openid, unionid, created_at, last_seen, expires_at, ttl_ms (to the idle
/// deadline), life_ms (to the absolute one), max_per_user, 'new' to keep an existing session,
/// appid ('' for the default app). Ends the user's oldest sessions beyond the cap first. The user's index lives as long as its
/// longest-lived session (its TTL only ever grows). Returns 1 if written.
static PUT_SESSION: LazyLock<Script> = script!("put_session");

/// ARGV: id, now, idle_ttl, step. Returns {uid, openid, unionid or '', deadline, appid or ''}, or
/// nil when the session is unknown or dead (then it is deleted).
static CHECK_SESSION: LazyLock<Script> = script!("check_session");

/// ARGV: id, now, idle_ttl, keep. Returns 1 if a live session ended (recorded in the revocation
/// feed for `keep` seconds, when it is not 0), 0 if it was dead, -1 if unknown.
static REVOKE_SESSION: LazyLock<Script> = script!("revocation_feed", "revoke_session");

/// ARGV: uid, now, idle_ttl, keep. Ends every session of the user (recorded in the revocation
/// feed for `keep` seconds, when it is not 0); returns how many were live.
static REVOKE_USER: LazyLock<Script> = script!("revocation_feed", "revoke_user");

/// ARGV: uid, unionid. Puts the unionid on every session of the user.
static SET_UNIONID: LazyLock<Script> = script!("set_unionid");

/// ARGV: uid, now, idle_ttl. Returns {{id, created_at, last_seen, deadline}, ...} of the live
/// sessions of the user, oldest first.
static LIST_SESSIONS: LazyLock<Script> = script!("list_sessions");
