//! Broker: starts the actors and offers the typed async API that the HTTP front end and
//! embedders use. Every call into an actor has a timeout; a dead or slow actor becomes
//! [`Error::Unavailable`], never a hang.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort};
use tokio::sync::watch;

use crate::actors::access_token_keeper::{AccessTokenKeeperArgs, AccessTokenKeeperMsg};
use crate::actors::decryptor::{DecryptorArgs, DecryptorMsg};
use crate::actors::session_keeper::{SessionKeeperArgs, SessionKeeperMsg};
use crate::actors::supervisor::{Children, Slot, Supervisor, SupervisorArgs, SupervisorMsg};
use crate::actors::user_registry::{UserRegistryArgs, UserRegistryMsg};
use crate::actors::wechat_exchanger::{WeChatExchangerArgs, WeChatExchangerMsg};
use crate::crypto::{TokenHash, is_token_shaped, parse_session_id, session_id, token_hash};
use crate::feed::{FeedStream, Source};
use crate::jwt::JwkSet;
use crate::revocation::Cursor;
use crate::session::{SessionInfo, SessionSummary};
use crate::signer::{AccessToken, Rotation, Signer, Subject};
use crate::storage::{CallBudget, FastCheck, Feed, Health, Storage, UserExport};
use crate::upstream::{Upstream, UpstreamConfig};
use crate::user::{EncryptedData, Identity, Phone, Profile, User, UserKey, identity_key};
use crate::verified_keys::VerifiedKeys;
use crate::{Config, Error, Metrics, Secret};

/// Extra time a call gets when it waits for a disk flush.
const FLUSH_ALLOWANCE: Duration = Duration::from_secs(10);

/// Longest login code we pass to WeChat; real ones are about 32 characters.
pub const MAX_CODE_LEN: usize = 256;

/// What a successful login gives the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    /// The session token ("3rd session") the client sends as `Authorization: Bearer`.
    pub token: String,
    /// Seconds the token stays valid if it is not used.
    pub expires_in: u64,
    /// Whether this login registered the user.
    pub is_new: bool,
    /// The user's stable id.
    pub uid: u64,
    /// A signed access token for edge verifiers, while they are on (`WXBROKER_ACCESS_TOKEN_TTL`).
    pub access_token: Option<AccessToken>,
}

/// Counts for the admin's stats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Registered users.
    pub users: usize,
    /// Sessions held (expired ones not yet swept included).
    pub live_sessions: usize,
}

/// A running broker. Cheap to clone; all clones drive the same actors.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    metrics: Arc<Metrics>,
    children: Arc<Children>,
    supervisor: ActorRef<SupervisorMsg>,
    /// Turns `false` when the supervisor has stopped (shut down or gave up).
    supervisor_alive: watch::Receiver<bool>,
    storage: Health,
    /// The apps served, the default first; a message to an actor names one by its index.
    apps: Vec<ServedApp>,
    /// What each user's requests may still spend of WeChat's quota this minute.
    call_budget: CallBudget,
    /// WeChat's recent "this session_key is current" answers, reused for `verify=wechat`.
    verified: VerifiedKeys,
    call_timeout: Duration,
    /// A call that may wait for a disk flush: a slow disk must not turn a write that will succeed
    /// into a 503 (a login's code would be spent for nothing).
    durable_timeout: Duration,
    /// Exchanges wait for WeChat, retries included, so they get a longer timeout.
    exchange_timeout: Duration,
    /// A token fetch may try both token endpoints, each with retries, and once more forced.
    token_timeout: Duration,
    /// Signs access tokens, while they are on.
    signer: Option<Arc<Signer>>,
    /// The revocation feed, while access tokens are on.
    feed: Option<Feed>,
    /// Turns `true` when the broker drains: long-lived answers (the feed) end.
    draining: watch::Sender<bool>,
}

/// One mini program the broker serves.
struct ServedApp {
    /// Its appid, shared by every session of the app (no copy per check).
    appid: Arc<str>,
    /// Its WeChat client, for the server APIs called from the request's own task.
    upstream: Upstream,
    /// `wxbroker_app_logins_total` for the two outcomes of a login that worked, resolved once.
    new_logins: prometheus::IntCounter,
    returning_logins: prometheus::IntCounter,
}

impl Broker {
    /// Opens the storage and starts the supervised actors.
    ///
    /// Needs WeChat credentials in `config` (see [`crate::Sandbox`] to try it without WeChat).
    pub async fn start(config: &Config) -> Result<Broker, Error> {
        config.validate()?;
        let apps = config.served_apps()?;
        let Some(default) = apps.first() else {
            return Err(Error::Config(
                "Broker::start needs WECHAT_APPID and WECHAT_SECRET (or [[apps]])".into(),
            ));
        };
        let metrics = Arc::new(Metrics::new());
        let storage = Storage::open(config, &metrics).await?;
        let signer = Signer::start(&storage, config).await?;
        let feed = signer.as_ref().map(|_| storage.feed(config.clock.clone()));
        if let Some(feed) = &feed {
            // Marks the feed's origin, if this is its first use: tokens can be issued from now on.
            feed.read(Cursor::START, 0, config.clock.now())
                .wait()
                .await?;
        }
        let upstream = Upstream::new(UpstreamConfig {
            base: config.api_base.clone(),
            appid: default.appid.clone(),
            secret: default.secret.clone(),
            connect_timeout: Duration::from_millis(config.upstream_connect_timeout_ms),
            timeout: Duration::from_millis(config.upstream_timeout_ms),
            retries: config.upstream_retries,
            metrics: metrics.clone(),
        })?;
        let upstreams = apps
            .iter()
            .map(|app| upstream.for_app(&app.appid, app.secret.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let served: Vec<ServedApp> = upstreams
            .iter()
            .map(|upstream| {
                let logins = |outcome: &str| {
                    let labels = [upstream.appid(), outcome];
                    metrics.app_logins.with_label_values(&labels)
                };
                ServedApp {
                    appid: Arc::from(upstream.appid()),
                    upstream: upstream.clone(),
                    new_logins: logins("new"),
                    returning_logins: logins("returning"),
                }
            })
            .collect();
        let exchange_timeout = upstream.worst_case() + config.call_timeout();
        // Room for two fetches (a stale token: plain, then forced), each of which may fall back
        // from stable_token to cgi-bin/token.
        let token_timeout = upstream.worst_case() * 4 + config.call_timeout();
        let children = Arc::new(Children::default());
        let args = SupervisorArgs {
            children: children.clone(),
            wechat_exchanger: WeChatExchangerArgs {
                upstreams: upstreams.clone(),
                claims: storage.code_book(),
                max_inflight: config.max_inflight,
                metrics: metrics.clone(),
            },
            user_registry: UserRegistryArgs {
                storage: storage.clone(),
                clock: config.clock.clone(),
            },
            session_keeper: SessionKeeperArgs {
                storage: storage.clone(),
                clock: config.clock.clone(),
                policy: config.session_policy(),
                default_app: served[0].appid.clone(),
                sweep_interval: Duration::from_secs(config.sweep_interval_secs),
                metrics: metrics.clone(),
                reader: children.session_reader.clone(),
            },
            decryptor: DecryptorArgs,
            access_token_keeper: AccessTokenKeeperArgs {
                upstreams,
                metrics: metrics.clone(),
            },
            metrics: metrics.clone(),
        };
        let (supervisor, handle) = Actor::spawn(None, Supervisor, args)
            .await
            .map_err(|e| Error::Unavailable(format!("the actors did not start: {e}")))?;
        let (alive_tx, supervisor_alive) = watch::channel(true);
        tokio::spawn(async move {
            let _ = handle.await;
            let _ = alive_tx.send(false);
        });
        Ok(Broker {
            inner: Arc::new(Inner {
                config: config.clone(),
                metrics,
                children,
                supervisor,
                supervisor_alive,
                storage: storage.health(),
                apps: served,
                call_budget: storage.call_budget(config.wechat_calls_per_min),
                verified: VerifiedKeys::new(apps.len()),
                call_timeout: config.call_timeout(),
                durable_timeout: config.call_timeout() + FLUSH_ALLOWANCE,
                exchange_timeout,
                token_timeout,
                signer,
                feed,
                draining: watch::channel(false).0,
            }),
        })
    }

    /// Logs a user in with a code from `wx.login` of the default app: exchange, register, issue
    /// a token.
    pub async fn login(&self, code: &str) -> Result<Login, Error> {
        self.login_to(None, code).await
    }

    /// Logs a user in with a code from `wx.login` of the mini program `appid` (`None`: the
    /// default app): exchange with that app's credentials, register (a person WeChat gives a
    /// unionid that a uid already holds joins that uid), issue a token for that app.
    /// [`Error::UnknownApp`] if the broker does not serve `appid`.
    pub async fn login_to(&self, appid: Option<&str>, code: &str) -> Result<Login, Error> {
        let app = match appid {
            None => Ok(0),
            Some(appid) => self.app_index(appid),
        };
        let outcome = match &app {
            Ok(app) => self.login_inner(*app, code).await,
            Err(e) => Err(e.clone()),
        };
        let label = match &outcome {
            Ok(login) if login.is_new => "new",
            Ok(_) => "returning",
            Err(e) => e.code(),
        };
        let metrics = &self.inner.metrics;
        metrics.logins.with_label_values(&[label]).inc();
        if let Ok(app) = app {
            let served = &self.inner.apps[app];
            match &outcome {
                Ok(login) if login.is_new => served.new_logins.inc(),
                Ok(_) => served.returning_logins.inc(),
                Err(e) => {
                    let labels = [&*served.appid, e.code()];
                    metrics.app_logins.with_label_values(&labels).inc()
                }
            }
        }
        outcome
    }

    async fn login_inner(&self, app: usize, code: &str) -> Result<Login, Error> {
        check_code(code)?;
        let wechat = self
            .ask(
                &self.inner.children.wechat_exchanger,
                self.inner.exchange_timeout,
                |reply| WeChatExchangerMsg::Exchange(app, code.to_owned(), reply),
            )
            .await?;
        let stored_app = self.stored_app(app).map(str::to_owned);
        let user = self
            .ask(
                &self.inner.children.user_registry,
                self.inner.durable_timeout,
                |reply| UserRegistryMsg::Upsert(stored_app, wechat, reply),
            )
            .await?;
        let (openid, unionid) = match &self.inner.signer {
            Some(_) => (user.openid.clone(), user.unionid.clone()),
            None => Default::default(),
        };
        let appid = &self.inner.apps[app].appid;
        let issued = self
            .ask(
                &self.inner.children.session_keeper,
                self.inner.call_timeout,
                |reply| SessionKeeperMsg::Issue {
                    uid: user.uid,
                    appid: (app != 0).then(|| appid.clone()),
                    openid: user.openid,
                    unionid: user.unionid,
                    reply,
                },
            )
            .await?;
        let access_token = self.inner.signer.as_ref().map(|signer| {
            let now = self.inner.config.clock.now();
            let subject = Subject {
                uid: user.uid,
                appid,
                openid: &openid,
                unionid: unionid.as_deref(),
                sid: session_id(&token_hash(&issued.token)),
                session_expires_at: now + issued.expires_in,
            };
            self.inner.metrics.access_tokens_signed.inc();
            signer.sign(subject, now)
        });
        Ok(Login {
            token: issued.token,
            expires_in: issued.expires_in,
            is_new: user.is_new,
            uid: user.uid,
            access_token,
        })
    }

    /// The appids the broker serves, the default first.
    pub fn appids(&self) -> impl Iterator<Item = &str> {
        self.inner.apps.iter().map(|app| &*app.appid)
    }

    /// The index of the app `appid` among those served; [`Error::UnknownApp`] if none.
    fn app_index(&self, appid: &str) -> Result<usize, Error> {
        self.inner
            .apps
            .iter()
            .position(|app| &*app.appid == appid)
            .ok_or(Error::UnknownApp)
    }

    /// How the stores name the app of index `app`: `None` for the default app (so that data from
    /// before several apps stays the default app's), its appid for the others.
    fn stored_app(&self, app: usize) -> Option<&str> {
        (app != 0).then(|| &*self.inner.apps[app].appid)
    }

    /// The app of `session` and the key its identity is stored under; a session of an app no
    /// longer served is invalid (its user logs in again).
    fn identity_of(&self, session: &SessionInfo) -> Result<(usize, String), Error> {
        let app = self
            .app_index(&session.appid)
            .map_err(|_| Error::InvalidSession)?;
        let key = identity_key(self.stored_app(app), &session.openid).into_owned();
        Ok((app, key))
    }

    /// `user` as answered: its appid and those of its identities named, the default app's too.
    fn name_apps(&self, mut user: User) -> User {
        let default = &self.inner.apps[0].appid;
        user.appid.get_or_insert_with(|| default.to_string());
        for identity in &mut user.identities {
            identity.appid.get_or_insert_with(|| default.to_string());
        }
        user
    }

    /// Whether the broker signs access tokens (`WXBROKER_ACCESS_TOKEN_TTL` is not 0).
    pub fn signs_access_tokens(&self) -> bool {
        self.inner.signer.is_some()
    }

    fn signer(&self) -> Result<&Signer, Error> {
        self.inner.signer.as_deref().ok_or_else(|| {
            Error::InvalidRequest(
                "signed access tokens are off (WXBROKER_ACCESS_TOKEN_TTL=0)".into(),
            )
        })
    }

    /// A fresh signed access token for the session of `token`, checked (and slid) as
    /// [`Broker::check_session`] does.
    pub async fn access_token(&self, token: &str) -> Result<AccessToken, Error> {
        let signer = self.signer()?;
        let session = self.check_session(token).await?;
        let subject = Subject {
            uid: session.uid,
            appid: &session.appid,
            openid: &session.openid,
            unionid: session.unionid.as_deref(),
            sid: session_id(&token_hash(token)),
            session_expires_at: session.expires_at,
        };
        self.inner.metrics.access_tokens_signed.inc();
        Ok(signer.sign(subject, self.inner.config.clock.now()))
    }

    /// The public keys that verify access tokens, as stored right now.
    pub async fn jwks(&self) -> Result<JwkSet, Error> {
        self.signer()?.jwks().await
    }

    /// Retires the signing key: a new one signs from now on; the old one stays published until
    /// every token it signed has expired.
    pub async fn rotate_signing_key(&self) -> Result<Rotation, Error> {
        self.signer()?.rotate().await
    }

    /// The revocation feed for a verifier that has seen everything up to `since` (all of it
    /// without one). Ends when the broker drains (see [`Broker::drain`]).
    pub fn revocation_feed(&self, since: Option<Cursor>) -> Result<FeedStream, Error> {
        let (Some(feed), Some(policy)) = (&self.inner.feed, self.inner.config.access_policy())
        else {
            return Err(Error::InvalidRequest(
                "signed access tokens are off (WXBROKER_ACCESS_TOKEN_TTL=0)".into(),
            ));
        };
        let source = Source {
            feed: feed.clone(),
            ttl: policy.ttl,
            clock: self.inner.config.clock.clone(),
            draining: self.inner.draining.subscribe(),
            open: self.inner.metrics.revocation_feeds.clone(),
        };
        Ok(crate::feed::serve(source, since.unwrap_or(Cursor::START)))
    }

    /// Ends the long-lived answers (revocation feeds), so that a graceful stop of the HTTP server
    /// is not held up by them. [`crate::serve`] and [`crate::run`] call it when they stop; an
    /// embedder serving [`crate::routes`] itself calls it before stopping its server.
    pub fn drain(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Who `token` belongs to; using it slides its idle expiry.
    pub async fn check_session(&self, token: &str) -> Result<SessionInfo, Error> {
        let outcome = if is_token_shaped(token) {
            let hash = token_hash(token);
            match self.check_in_table(&hash) {
                Some(outcome) => outcome,
                None => {
                    self.ask(
                        &self.inner.children.session_keeper,
                        self.inner.call_timeout,
                        |reply| SessionKeeperMsg::Check(hash, reply),
                    )
                    .await
                }
            }
        } else {
            Err(Error::InvalidSession)
        };
        let metrics = &self.inner.metrics;
        match &outcome {
            Ok(_) => metrics.valid_checks.inc(),
            Err(e) => metrics.session_checks.with_label_values(&[e.code()]).inc(),
        }
        outcome
    }

    /// A check straight from the keeper's table, when it needs no change; `None` when the keeper
    /// must answer (it expired, its last use is due to be written, or no table is published).
    fn check_in_table(&self, hash: &TokenHash) -> Option<Result<SessionInfo, Error>> {
        let slot = self.inner.children.session_reader.read().ok()?;
        let reader = slot.as_ref()?;
        match reader.check(hash, self.inner.config.clock.now()) {
            FastCheck::Valid(info) => Some(Ok(info)),
            FastCheck::Unknown => Some(Err(Error::InvalidSession)),
            FastCheck::NeedsKeeper => None,
        }
    }

    /// Ends the session of `token`; once this returns, the logout survives a crash.
    pub async fn logout(&self, token: &str) -> Result<(), Error> {
        if !is_token_shaped(token) {
            return Err(Error::InvalidSession);
        }
        let hash = token_hash(token);
        self.ask(
            &self.inner.children.session_keeper,
            self.inner.call_timeout,
            |reply| SessionKeeperMsg::Revoke(hash, reply),
        )
        .await
    }

    /// Decrypts the profile the session's user sent, stores it (durably) and returns it.
    ///
    /// The profile must name the session's openid. A unionid in it may confirm the user's or
    /// give one to a user who has none (then it shows on all of the user's sessions); one that
    /// differs from the user's own or belongs to another user is [`Error::UnionidConflict`], and
    /// nothing is stored.
    pub async fn userinfo(&self, token: &str, data: EncryptedData) -> Result<Profile, Error> {
        let session = self.check_session(token).await?;
        let (_, key) = self.identity_of(&session)?;
        let session_key = self.session_key(&key).await?;
        let profile = self
            .ask(
                &self.inner.children.decryptor,
                self.inner.call_timeout,
                |reply| DecryptorMsg::Profile {
                    appid: session.appid.clone(),
                    session_key,
                    openid: session.openid.clone(),
                    data,
                    reply,
                },
            )
            .await
            .inspect_err(|e| self.doubt_session_key(session.uid, e))?;
        // The store decides whether the unionid may be the user's (atomically, across brokers):
        // only then does it go on the sessions, so a refused one shows nowhere.
        let saved = profile.clone();
        let user = self
            .ask(
                &self.inner.children.user_registry,
                self.inner.durable_timeout,
                |reply| UserRegistryMsg::SaveProfile(key, saved, reply),
            )
            .await?;
        // Sent even when this session already shows it: the user's other sessions may not.
        // Answered once on disk, like the profile: a crash between the two leaves the sessions
        // without the unionid until the next login, never with one the user does not hold.
        if let Some(unionid) = user.unionid.filter(|_| profile.union_id.is_some()) {
            self.ask(
                &self.inner.children.session_keeper,
                self.inner.durable_timeout,
                |reply| SessionKeeperMsg::SetUnionid {
                    uid: session.uid,
                    unionid,
                    reply,
                },
            )
            .await?;
        }
        Ok(profile)
    }

    /// Decrypts the phone number the session's user sent, stores it (durably) and returns it.
    pub async fn phone(&self, token: &str, data: EncryptedData) -> Result<Phone, Error> {
        let session = self.check_session(token).await?;
        let (_, key) = self.identity_of(&session)?;
        let session_key = self.session_key(&key).await?;
        let phone = self
            .ask(
                &self.inner.children.decryptor,
                self.inner.call_timeout,
                |reply| DecryptorMsg::Phone {
                    appid: session.appid.clone(),
                    session_key,
                    data,
                    reply,
                },
            )
            .await
            .inspect_err(|e| self.doubt_session_key(session.uid, e))?;
        let saved = phone.clone();
        self.ask(
            &self.inner.children.user_registry,
            self.inner.durable_timeout,
            |reply| UserRegistryMsg::SavePhone(key, saved, reply),
        )
        .await?;
        Ok(phone)
    }

    /// Learns the phone number behind `code`, from the phone-number button, through WeChat's
    /// `getuserphonenumber`; stores it (durably) on the session's user and returns it. Unlike
    /// [`Broker::phone`] it needs no session_key, so a rotated key cannot make it fail.
    ///
    /// Each call spends one of the user's calls to WeChat (`WXBROKER_WECHAT_CALLS_PER_MIN`):
    /// once they are spent, [`Error::RateLimited`] until the minute ends.
    pub async fn phone_by_code(&self, token: &str, code: &str) -> Result<Phone, Error> {
        let session = self.check_session(token).await?;
        check_code(code)?;
        let (app, key) = self.identity_of(&session)?;
        self.spend_wechat_call(session.uid).await?;
        let upstream = &self.inner.apps[app].upstream;
        let phone = self
            .with_access_token(app, |access_token| async move {
                upstream.phone_number(&access_token, code).await
            })
            .await?;
        let saved = phone.clone();
        self.ask(
            &self.inner.children.user_registry,
            self.inner.durable_timeout,
            |reply| UserRegistryMsg::SavePhone(key, saved, reply),
        )
        .await?;
        Ok(phone)
    }

    /// Checks `token` as [`Broker::check_session`] does, then asks WeChat (`checksession`)
    /// whether the session_key stored for its user is still current:
    /// [`Error::SessionKeyExpired`] if the client has called `wx.login` since without logging in
    /// here, so that it logs in again before sending encrypted data.
    ///
    /// WeChat's answer that the key is current is reused for the same uid and key for
    /// [`crate::verified_keys::REUSE_SECS`] seconds, at no cost; a call to WeChat spends one of
    /// the user's calls (`WXBROKER_WECHAT_CALLS_PER_MIN`), and once they are spent the answer is
    /// [`Error::RateLimited`] until the minute ends.
    pub async fn verify_session_key(&self, token: &str) -> Result<SessionInfo, Error> {
        let session = self.check_session(token).await?;
        let (app, key) = self.identity_of(&session)?;
        let session_key = self.session_key(&key).await?;
        let verified = &self.inner.verified;
        let now = self.inner.config.clock.now();
        if verified.holds(session.uid, app, &session_key, now) {
            return Ok(session);
        }
        self.spend_wechat_call(session.uid).await?;
        let upstream = &self.inner.apps[app].upstream;
        let (openid, key) = (&session.openid, &session_key);
        match self
            .with_access_token(app, |access_token| async move {
                upstream.check_session_key(&access_token, openid, key).await
            })
            .await
        {
            Ok(()) => verified.insert(session.uid, app, &session_key, now),
            Err(e) => {
                self.doubt_session_key(session.uid, &e);
                return Err(e);
            }
        }
        Ok(session)
    }

    /// Spends one call to WeChat of `uid`'s budget for this minute.
    async fn spend_wechat_call(&self, uid: u64) -> Result<(), Error> {
        let now = self.inner.config.clock.now();
        self.inner.call_budget.spend(uid, now).wait().await
    }

    /// After `err`, a reused answer that `uid`'s session_key is current is not to be trusted:
    /// WeChat called it stale, or data sealed with the current one did not open.
    fn doubt_session_key(&self, uid: u64, err: &Error) {
        if matches!(err, Error::SessionKeyExpired | Error::DecryptFailed) {
            self.inner.verified.forget(uid);
        }
    }

    /// Has WeChat replace the session_key of each identity of user `uid`
    /// (`resetusersessionkey`, with the access_token of the identity's app) and stores the new
    /// ones, durably. Returns whether the user exists.
    pub async fn reset_session_key(&self, uid: u64) -> Result<bool, Error> {
        let Some(user) = self.find_user(UserKey::Uid(uid)).await? else {
            return Ok(false);
        };
        // Whatever WeChat answers, the keys it holds may change: ask it again next time.
        self.inner.verified.forget(user.uid);
        for identity in &user.identities {
            // An identity of an app no longer served cannot be reset: its app's token is gone.
            let Some(app) = (identity.appid.as_deref()).and_then(|a| self.app_index(a).ok()) else {
                continue;
            };
            let key = identity_key(self.stored_app(app), &identity.openid).into_owned();
            let session_key = self.session_key(&key).await?;
            let upstream = &self.inner.apps[app].upstream;
            let (openid, old) = (&identity.openid, &session_key);
            let new_key = self
                .with_access_token(app, |access_token| async move {
                    upstream.reset_session_key(&access_token, openid, old).await
                })
                .await?;
            // A login meanwhile stored a newer key than the one reset: that one stays.
            self.ask(
                &self.inner.children.user_registry,
                self.inner.durable_timeout,
                |reply| UserRegistryMsg::ReplaceSessionKey {
                    openid: key,
                    old: session_key.clone(),
                    new: new_key,
                    reply,
                },
            )
            .await?;
        }
        self.inner.verified.forget(user.uid);
        Ok(true)
    }

    /// Asks WeChat for the app's access_token, as the start does with real credentials: `Ok`
    /// when WeChat accepts the appid, the secret and this server's IP; otherwise why not
    /// ([`Error::CredentialsRejected`] is the operator's to fix; anything else may pass). The
    /// token is kept for the first call that needs one.
    pub async fn check_credentials(&self) -> Result<(), Error> {
        self.check_credentials_of(0).await
    }

    /// Records the default app in the store, or checks that it is the one recorded (see
    /// [`crate::storage::Health::record_default_app`]): [`crate::run`] does it once WeChat has
    /// accepted the default app's credentials; an embedder calls it when it knows them good.
    pub async fn record_default_app(&self) -> Result<(), Error> {
        let appid = &self.inner.apps[0].appid;
        self.inner.storage.record_default_app(appid).await
    }

    /// [`Broker::check_credentials`] for the app of index `app` (in [`Broker::appids`] order).
    pub async fn check_credentials_of(&self, app: usize) -> Result<(), Error> {
        self.ask(
            &self.inner.children.access_token_keeper,
            self.inner.token_timeout,
            |reply| AccessTokenKeeperMsg::Get(app, reply),
        )
        .await
        .map(drop)
    }

    /// Runs `call` with the app's access_token. If WeChat calls the token stale, a new one is
    /// fetched (one fetch, however many callers meet the stale token) and `call` runs once more.
    async fn with_access_token<T, F, Fut>(&self, app: usize, call: F) -> Result<T, Error>
    where
        F: Fn(Secret) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let token = self
            .ask(
                &self.inner.children.access_token_keeper,
                self.inner.token_timeout,
                |reply| AccessTokenKeeperMsg::Get(app, reply),
            )
            .await?;
        match call(token.clone()).await {
            Err(Error::AccessTokenStale(_)) => {
                let fresh = self
                    .ask(
                        &self.inner.children.access_token_keeper,
                        self.inner.token_timeout,
                        |reply| AccessTokenKeeperMsg::Stale(app, token, reply),
                    )
                    .await?;
                call(fresh).await
            }
            outcome => outcome,
        }
    }

    /// The stored identity behind `token` (the session's app and openid), with every identity
    /// of its uid.
    pub async fn me(&self, token: &str) -> Result<User, Error> {
        let session = self.check_session(token).await?;
        let (app, _) = self.identity_of(&session)?;
        let identity = Identity {
            appid: self.stored_app(app).map(str::to_owned),
            openid: session.openid,
        };
        self.find_user(UserKey::Identity(identity))
            .await?
            .ok_or(Error::InvalidSession)
    }

    /// Finds a user by uid (its first identity), openid (in the default app), an identity or
    /// unionid, with every identity of its uid; appids are named, the default app's too.
    pub async fn find_user(&self, key: UserKey) -> Result<Option<User>, Error> {
        // The stores file the default app's identities without an appid.
        let key = match key {
            UserKey::Identity(Identity {
                appid: Some(appid),
                openid,
            }) if *appid == *self.inner.apps[0].appid => UserKey::Openid(openid),
            key => key,
        };
        let found = self
            .ask(
                &self.inner.children.user_registry,
                self.inner.call_timeout,
                |reply| UserRegistryMsg::Find(key, reply),
            )
            .await?;
        Ok(found.map(|user| self.name_apps(user)))
    }

    /// Every registered user, a page at a time, read from the store while the broker serves (a
    /// backup: `GET /admin/export`); see [`UserExport`] for what it gives.
    pub fn export_users(&self) -> UserExport {
        self.inner.storage.export_users()
    }

    /// The broker's metrics (rendered at `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The configuration the broker was started with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The live sessions of user `uid`.
    pub async fn user_sessions(&self, uid: u64) -> Result<Vec<SessionSummary>, Error> {
        self.ask(
            &self.inner.children.session_keeper,
            self.inner.call_timeout,
            |reply| SessionKeeperMsg::List(uid, reply),
        )
        .await
    }

    /// Ends the session whose id (the hex SHA-256 of its token) is `id`, durably.
    pub async fn revoke_session(&self, id: &str) -> Result<(), Error> {
        let hash = parse_session_id(id).ok_or(Error::InvalidSession)?;
        self.ask(
            &self.inner.children.session_keeper,
            self.inner.call_timeout,
            |reply| SessionKeeperMsg::Revoke(hash, reply),
        )
        .await
    }

    /// Ends every session of user `uid`, durably; returns how many were live.
    pub async fn revoke_user_sessions(&self, uid: u64) -> Result<usize, Error> {
        self.ask(
            &self.inner.children.session_keeper,
            self.inner.call_timeout,
            |reply| SessionKeeperMsg::RevokeUser(uid, reply),
        )
        .await
    }

    /// Registered users and held sessions.
    pub async fn stats(&self) -> Result<Stats, Error> {
        Ok(Stats {
            users: self
                .ask(
                    &self.inner.children.user_registry,
                    self.inner.call_timeout,
                    UserRegistryMsg::Count,
                )
                .await?,
            live_sessions: self.session_count().await?,
        })
    }

    /// Sessions held, expired ones not yet swept included.
    pub async fn session_count(&self) -> Result<usize, Error> {
        self.ask(
            &self.inner.children.session_keeper,
            self.inner.call_timeout,
            SessionKeeperMsg::Count,
        )
        .await
    }

    /// Whether every actor runs and the supervisor has not given up.
    pub fn is_ready(&self) -> bool {
        *self.inner.supervisor_alive.borrow() && self.inner.children.all_running()
    }

    /// Whether the storage (sled or Redis) answers a read.
    pub async fn store_answers(&self) -> bool {
        self.inner.storage.answers().await
    }

    /// Resolves when the supervisor has stopped: after [`Broker::shutdown`], or when actors
    /// failed more often than the restart cap allows.
    pub async fn stopped(&self) {
        let mut alive = self.inner.supervisor_alive.clone();
        let _ = alive.wait_for(|alive| !alive).await;
    }

    /// Stops the actors (each persists what it holds) and flushes the storage.
    pub async fn shutdown(&self) -> Result<(), Error> {
        let inner = &self.inner;
        self.drain();
        if let Some(signer) = &inner.signer {
            signer.close();
        }
        if let Some(feed) = &inner.feed {
            feed.close();
        }
        let _ = inner
            .supervisor
            .call(SupervisorMsg::StopChildren, Some(Duration::from_secs(15)))
            .await;
        inner.supervisor.stop(Some("broker shutdown".into()));
        self.stopped().await;
        inner.storage.flush().await?;
        Ok(())
    }

    /// Makes one actor suffer `fault`, to test supervision and timeouts. Only with the
    /// `fault-injection` feature.
    ///
    /// # Panics
    /// If that actor is not running.
    #[cfg(feature = "fault-injection")]
    pub fn inject(&self, kind: crate::ActorKind, fault: crate::Fault) {
        assert!(self.try_inject(kind, fault), "{kind:?} is not running");
    }

    /// Makes the next `n` group-commit flushes fail, as a disk that refuses writes would: every
    /// write waiting for them gets an error. `false` on Redis. Only with the `fault-injection`
    /// feature.
    #[cfg(feature = "fault-injection")]
    pub fn fail_flushes(&self, n: u32) -> bool {
        self.inner.storage.fail_flushes(n)
    }

    /// [`Broker::inject`], or `false` if that actor is not running.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn try_inject(&self, kind: crate::ActorKind, fault: crate::Fault) -> bool {
        use crate::ActorKind;
        fn cast<M: ractor::Message>(slot: &Slot<M>, message: M) -> bool {
            slot.get().is_some_and(|actor| actor.cast(message).is_ok())
        }
        let c = &self.inner.children;
        match kind {
            ActorKind::WeChatExchanger => {
                cast(&c.wechat_exchanger, WeChatExchangerMsg::Inject(fault))
            }
            ActorKind::UserRegistry => cast(&c.user_registry, UserRegistryMsg::Inject(fault)),
            ActorKind::SessionKeeper => cast(&c.session_keeper, SessionKeeperMsg::Inject(fault)),
            ActorKind::Decryptor => cast(&c.decryptor, DecryptorMsg::Inject(fault)),
            ActorKind::AccessTokenKeeper => {
                cast(&c.access_token_keeper, AccessTokenKeeperMsg::Inject(fault))
            }
        }
    }

    async fn session_key(&self, key: &str) -> Result<String, Error> {
        self.ask(
            &self.inner.children.user_registry,
            self.inner.call_timeout,
            |reply| UserRegistryMsg::SessionKey(key.to_owned(), reply),
        )
        .await
    }

    /// Calls the child in `slot` with a timeout, mapping every way the call can fail
    /// (restarting, dead, too slow) to `Unavailable`.
    async fn ask<M, T>(
        &self,
        slot: &Slot<M>,
        timeout: Duration,
        message: impl FnOnce(RpcReplyPort<Result<T, Error>>) -> M,
    ) -> Result<T, Error>
    where
        M: ractor::Message,
        T: Send + 'static,
    {
        let what = slot.kind().name();
        let actor: ActorRef<M> = slot
            .get()
            .ok_or_else(|| Error::Unavailable(format!("the {what} is restarting")))?;
        match actor.call(message, Some(timeout)).await {
            Ok(CallResult::Success(result)) => result,
            Ok(CallResult::Timeout) => Err(Error::Unavailable(format!(
                "the {what} did not answer in time"
            ))),
            Ok(CallResult::SenderError) | Err(_) => {
                Err(Error::Unavailable(format!("the {what} stopped")))
            }
        }
    }
}

/// A login code must be something WeChat could have issued: short, printable ASCII.
fn check_code(code: &str) -> Result<(), Error> {
    if code.is_empty() {
        return Err(Error::InvalidRequest("code is empty".into()));
    }
    if code.len() > MAX_CODE_LEN {
        return Err(Error::InvalidRequest(format!(
            "code is longer than {MAX_CODE_LEN} characters"
        )));
    }
    if !code.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidRequest(
            "code may only contain printable ASCII characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_checked_before_they_reach_wechat() {
        assert!(check_code("061abcDEF").is_ok());
        assert!(check_code(&"a".repeat(MAX_CODE_LEN)).is_ok());
        for bad in ["", " ", "a b", "abc\n", "é", &"a".repeat(MAX_CODE_LEN + 1)] {
            assert!(
                matches!(check_code(bad), Err(Error::InvalidRequest(_))),
                "{bad:?}"
            );
        }
    }
}
