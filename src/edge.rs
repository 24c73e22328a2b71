//! Verifying access tokens where requests land, without asking the broker each time:
//! [`Verifier`], for edge hosts and services in other regions. It needs no broker in the
//! process, no actors and no store: a broker's URL and the feed's secret.
//!
//! It fetches the broker's JWKS (again at once for a `kid` it does not know, at most once per
//! interval), follows the revocation feed (`GET /v1/revocations`) and verifies each token on its
//! own: the `EdDSA` signature, `exp` and `iat` with a small leeway, `iss`, `aud`, and that
//! neither its session nor, before the token's `iat`, all of its user's sessions were revoked. A
//! token seen before is answered from a cache in one hash lookup. While the broker is
//! unreachable it goes on verifying with what it knows (tokens expire within minutes), and
//! reconnects with backoff, resuming the feed from its last cursor; until it has read the feed
//! once, it refuses every token.
//!
//! - `cache`: the verified tokens.
//! - `follow`: the JWKS fetches and the feed's reader.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wxbroker::Error> {
//! use std::sync::Arc;
//! use warp::Filter;
//! use wxbroker::edge::{Verifier, VerifierOptions};
//! use wxbroker::jwt::AccessClaims;
//!
//! let options = VerifierOptions::new("http://broker:8080", "wx-appid", "the-verifier-token");
//! let verifier = Verifier::start(options)?;
//! let orders = warp::path!("api" / "orders")
//!     .and(verifier.require())
//!     .map(|claims: Arc<AccessClaims>| warp::reply::json(&claims.sub))
//!     .recover(wxbroker::recover);
//! # Ok(()) }
//! ```

mod cache;
mod follow;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::future::{self, Either};
use reqwest::Url;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use warp::{Filter, Rejection};

use self::cache::Cache;
use crate::config::DEFAULT_ISSUER;
use crate::http::{Problem, bearer_token};
use crate::jwt::{self, AccessClaims, Expect, JwkSet, Refusal, VerifyingKey};
use crate::revocation::Revocation;
use crate::{Clock, Error, Secret};

/// How a [`Verifier`] is set up. [`VerifierOptions::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct VerifierOptions {
    /// The broker's base URL (`http://host:port`): where the JWKS and the feed are.
    pub broker: String,
    /// The tokens' expected `aud`: the mini program's appid.
    pub audience: String,
    /// More accepted `aud`s: the other appids of a broker that serves several mini programs
    /// (a token's `aud` is the app its session was opened through).
    pub more_audiences: Vec<String>,
    /// The tokens' expected `iss`: the broker's `WXBROKER_ISSUER`.
    pub issuer: String,
    /// The feed's secret: the broker's `WXBROKER_VERIFIER_TOKEN`.
    pub verifier_token: Secret,
    /// Seconds of clock difference forgiven on `exp` and `iat` (at most 30).
    pub leeway: u64,
    /// Verified tokens kept for fast answers.
    pub cache_capacity: usize,
    /// Shortest time between two JWKS fetches for unknown `kid`s: tokens with made-up `kid`s
    /// cost the broker at most one fetch per interval.
    pub refetch_interval: Duration,
    /// Time between routine JWKS fetches.
    pub jwks_refresh: Duration,
    /// Longest wait between two attempts to reach the broker.
    pub max_backoff: Duration,
    /// Source of "now" (tests move it by hand).
    pub clock: Clock,
}

impl VerifierOptions {
    /// The defaults for the broker at `broker`, the appid `audience` and the feed's secret.
    pub fn new(
        broker: impl Into<String>,
        audience: impl Into<String>,
        verifier_token: impl Into<String>,
    ) -> VerifierOptions {
        VerifierOptions {
            broker: broker.into(),
            audience: audience.into(),
            more_audiences: Vec::new(),
            issuer: DEFAULT_ISSUER.into(),
            verifier_token: Secret::new(verifier_token),
            leeway: 5,
            cache_capacity: 100_000,
            refetch_interval: Duration::from_secs(1),
            jwks_refresh: Duration::from_secs(300),
            max_backoff: Duration::from_secs(5),
            clock: Clock::system(),
        }
    }
}

impl VerifierOptions {
    /// The defaults for a broker that serves several mini programs: tokens for any of
    /// `audiences` (their appids; the first is `audience`) are accepted.
    pub fn for_apps(
        broker: impl Into<String>,
        audiences: impl IntoIterator<Item = impl Into<String>>,
        verifier_token: impl Into<String>,
    ) -> VerifierOptions {
        let mut audiences = audiences.into_iter().map(Into::into);
        let first = audiences.next().unwrap_or_default();
        let mut options = VerifierOptions::new(broker, first, verifier_token);
        options.more_audiences = audiences.collect();
        options
    }
}

/// Most leeway a verifier allows: revocations and retired keys are kept a minute past the
/// tokens' lifetime, which a larger leeway would eat into.
pub const MAX_LEEWAY: u64 = 30;

/// Verifies access tokens offline (see the module's docs). Cheap to clone; the background tasks
/// stop when the last clone is dropped.
#[derive(Clone)]
pub struct Verifier {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("broker", &self.shared.base.as_str())
            .field("synced", &self.is_synced())
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// The background tasks, aborted when the last verifier goes.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// What the verifier knows, shared with its tasks.
struct Shared {
    base: Url,
    http: reqwest::Client,
    verifier_token: Secret,
    expect: Expect,
    clock: Clock,
    refetch_interval: Duration,
    max_backoff: Duration,
    keys: RwLock<HashMap<String, VerifyingKey>>,
    /// When an unknown `kid` last made it fetch the JWKS; held during the fetch (one at a time).
    refetched: tokio::sync::Mutex<Option<Instant>>,
    revoked: RwLock<Revoked>,
    /// Moves on with every revocation, so that a cached token is checked again.
    generation: AtomicU64,
    cache: Cache,
    synced: watch::Sender<bool>,
    synced_fast: AtomicBool,
    connected: AtomicBool,
    cursor: Mutex<Option<String>>,
}

/// The revocations a verifier holds, each until every token it concerns has expired.
#[derive(Default)]
struct Revoked {
    /// Session id -> until.
    sids: HashMap<String, u64>,
    /// uid -> (not before, until).
    users: HashMap<u64, (u64, u64)>,
    /// Tokens issued before this are refused (a reset of the feed).
    not_before: u64,
    /// When entries past their `until` were last dropped.
    pruned_at: u64,
}

impl Verifier {
    /// Starts verifying for the broker of `options`: fetches its keys and follows its feed in the
    /// background (needs a Tokio runtime). Tokens are refused until the feed has been read once;
    /// [`Verifier::synced`] waits for that.
    pub fn start(options: VerifierOptions) -> Result<Verifier, Error> {
        let base = Url::parse(&options.broker)
            .map_err(|e| Error::Config(format!("bad broker URL {:?}: {e}", options.broker)))?;
        if options.leeway > MAX_LEEWAY {
            return Err(Error::Config(format!(
                "a verifier's leeway is at most {MAX_LEEWAY} s"
            )));
        }
        crate::tls::install_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(follow::CONNECT_TIMEOUT)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        let shared = Arc::new(Shared {
            base,
            http,
            verifier_token: options.verifier_token,
            expect: Expect {
                issuer: options.issuer,
                audiences: std::iter::once(options.audience)
                    .chain(options.more_audiences)
                    .collect(),
                leeway: options.leeway,
            },
            clock: options.clock,
            refetch_interval: options.refetch_interval,
            max_backoff: options.max_backoff,
            keys: RwLock::default(),
            refetched: tokio::sync::Mutex::new(None),
            revoked: RwLock::default(),
            generation: AtomicU64::new(0),
            cache: Cache::new(options.cache_capacity),
            synced: watch::channel(false).0,
            synced_fast: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            cursor: Mutex::new(None),
        });
        let tasks = vec![
            tokio::spawn(follow::keep_keys(shared.clone(), options.jwks_refresh)),
            tokio::spawn(follow::follow_feed(shared.clone())),
        ];
        Ok(Verifier {
            shared,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// Verifies `token` with what the verifier knows, without any network call: a token seen
    /// before costs one hash lookup, a new one a signature check. A `kid` it does not know is
    /// [`Refusal::UnknownKey`] ([`Verifier::verify`] fetches the keys then).
    pub fn check(&self, token: &str) -> Result<Arc<AccessClaims>, Refusal> {
        self.shared.check(token)
    }

    /// As [`Verifier::check`], fetching the broker's keys first if the token names a key the
    /// verifier does not know (at most once per `refetch_interval`).
    pub async fn verify(&self, token: &str) -> Result<Arc<AccessClaims>, Refusal> {
        match self.shared.check(token) {
            Err(Refusal::UnknownKey) => {
                self.shared.refetch_keys().await;
                self.shared.check(token)
            }
            outcome => outcome,
        }
    }

    /// A warp filter that extracts the caller's claims from its `Authorization: Bearer` access
    /// token, or rejects with the same 401 JSON as the broker's `/v1/session` (finish the route
    /// with `.recover(wxbroker::recover)`).
    pub fn require(
        &self,
    ) -> impl Filter<Extract = (Arc<AccessClaims>,), Error = Rejection> + Clone + use<> {
        let verifier = self.clone();
        warp::header::optional::<String>("authorization")
            .or_else(|_| async { Ok::<_, Rejection>((None,)) })
            .and_then(move |authorization: Option<String>| {
                // Answered at once, without touching the verifier's reference counts (shared
                // by every request, on every core), unless the keys must be fetched first.
                let checked =
                    bearer_token(authorization.as_deref()).map(|token| verifier.check(token));
                match checked {
                    Ok(Err(Refusal::UnknownKey)) => {
                        let verifier = verifier.clone();
                        Either::Left(async move {
                            let token = bearer_token(authorization.as_deref())?;
                            refused(verifier.verify(token).await)
                        })
                    }
                    Ok(outcome) => Either::Right(future::ready(refused(outcome))),
                    Err(rejection) => Either::Right(future::ready(Err(rejection))),
                }
            })
    }

    /// Whether the feed has been read once (tokens are refused before).
    pub fn is_synced(&self) -> bool {
        self.shared.synced_fast.load(Ordering::Acquire)
    }

    /// Waits until the feed has been read once.
    pub async fn synced(&self) {
        let mut synced = self.shared.synced.subscribe();
        let _ = synced.wait_for(|synced| *synced).await;
    }

    /// Whether the feed is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// The cursor of the last feed event read (what a reconnection resumes from).
    pub fn cursor(&self) -> Option<String> {
        self.shared.cursor()
    }

    /// Fetches the broker's keys now.
    pub async fn refresh_keys(&self) -> Result<usize, Error> {
        follow::fetch_keys(&self.shared)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    }
}

/// `outcome` with its refusal logged and turned into the 401 the broker answers.
fn refused(outcome: Result<Arc<AccessClaims>, Refusal>) -> Result<Arc<AccessClaims>, Rejection> {
    outcome.map_err(|refusal| {
        tracing::debug!(%refusal, "refused an access token");
        Problem::reject(Error::InvalidSession)
    })
}

impl Shared {
    fn check(&self, token: &str) -> Result<Arc<AccessClaims>, Refusal> {
        if !self.synced_fast.load(Ordering::Acquire) {
            return Err(Refusal::NotSynced);
        }
        let now = self.clock.now();
        let generation = self.generation.load(Ordering::Acquire);
        let key = self.cache.key(token);
        if let Some(hit) = self.cache.get(token, key) {
            if now >= hit.claims.exp.saturating_add(self.expect.leeway) {
                return Err(Refusal::Expired);
            }
            if hit.generation != generation {
                self.check_revocations(&hit.claims)?;
                self.cache.checked(token, key, generation);
            }
            return Ok(hit.claims);
        }
        let parsed = jwt::parse(token)?;
        let verifying_key = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(parsed.kid())
            .cloned()
            .ok_or(Refusal::UnknownKey)?;
        let claims = parsed.claims()?;
        self.expect.check(&claims, now)?;
        parsed.verify(&verifying_key)?;
        self.check_revocations(&claims)?;
        let claims = Arc::new(claims);
        self.cache.insert(
            token,
            key,
            claims.clone(),
            generation,
            now,
            self.expect.leeway,
        );
        Ok(claims)
    }

    fn check_revocations(&self, claims: &AccessClaims) -> Result<(), Refusal> {
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        let user_cut = claims
            .uid()
            .and_then(|uid| revoked.users.get(&uid))
            .is_some_and(|&(not_before, _)| claims.iat < not_before);
        if claims.iat < revoked.not_before || user_cut || revoked.sids.contains_key(&claims.sid) {
            return Err(Refusal::Revoked);
        }
        Ok(())
    }

    /// Applies a revocation from the feed.
    fn revoke(&self, revocation: &Revocation) {
        let until = revocation.until.saturating_add(self.expect.leeway);
        {
            let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
            if let Some(sid) = &revocation.sid {
                revoked.sids.insert(sid.clone(), until);
            }
            if let Some(not_before) = revocation.not_before {
                let entry = revoked
                    .users
                    .entry(revocation.uid)
                    .or_insert((not_before, until));
                *entry = (entry.0.max(not_before), entry.1.max(until));
            }
            for sid in &revocation.sids {
                revoked.sids.insert(sid.clone(), until);
            }
            revoked.prune(self.clock.now());
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Applies a reset of the feed: tokens issued before `not_before` are refused.
    fn reset(&self, not_before: u64) {
        {
            let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
            revoked.not_before = revoked.not_before.max(not_before);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn set_synced(&self) {
        if !self.synced_fast.swap(true, Ordering::AcqRel) {
            tracing::info!("read the revocation feed: verifying tokens");
        }
        self.synced.send_replace(true);
    }

    fn has_keys(&self) -> bool {
        !self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    fn cursor(&self) -> Option<String> {
        self.cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_cursor(&self, cursor: String) {
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = Some(cursor);
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("a path joins a base URL")
    }

    /// Replaces the keys by those of `set`; returns how many are usable.
    fn install_keys(&self, set: &JwkSet) -> usize {
        let keys: HashMap<_, _> = set
            .keys
            .iter()
            .filter_map(|jwk| Some((jwk.kid.clone(), jwk.verifying_key()?)))
            .collect();
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        count
    }

    /// Fetches the keys for an unknown `kid`, unless another call did within the interval (or
    /// is doing it now: then this waits for it).
    async fn refetch_keys(&self) {
        let mut last = self.refetched.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.refetch_interval) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = follow::fetch_keys(self).await {
            tracing::warn!(error = %e, "cannot fetch the broker's JWKS for an unknown kid");
        }
    }
}

impl Revoked {
    /// Drops the entries past their `until` (at most every ten seconds).
    fn prune(&mut self, now: u64) {
        if now < self.pruned_at.saturating_add(10) {
            return;
        }
        self.pruned_at = now;
        self.sids.retain(|_, until| now <= *until);
        self.users.retain(|_, (_, until)| now <= *until);
    }
}
