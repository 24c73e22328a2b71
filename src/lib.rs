//! wxbroker: a session broker for WeChat Mini Program login.
//!
//! A mini program posts the code from `wx.login`; the broker exchanges it with WeChat for the
//! user's openid and session_key, registers the user, and answers a random session token (the
//! "3rd session") that the client sends with every later request. The session_key and the app
//! secret never leave the process.
//!
//! # Layout
//!
//! - [`run`]: the whole server (the binary's body): sandbox fallback, broker, HTTP front end,
//!   graceful shutdown. Takes an already bound listener (see [`bind`] for one with a backlog
//!   that survives a burst of connections) and a shutdown future. [`serve`] does the same for a
//!   broker started by the caller.
//! - `server.rs`: the HTTP server (hyper with header-read timeout, connection cap and each
//!   client's share of it, lingering close, drain).
//! - `http/`: warp routes, handlers and the error-to-JSON mapping ([`routes`]); `admin.rs` (the
//!   admin API), `rate_limit.rs`, `tokens.rs` (signed access tokens and their keys) and
//!   `revocations.rs` (the revocation feed as server-sent events).
//! - [`Broker`] (`broker.rs`): starts the supervised actors; typed async API for embedders.
//!   [`BrokerClient`] (`client.rs`): the same questions asked of a broker over HTTP.
//! - `actors/`: `supervisor`, `wechat_exchanger`, `user_registry`, `session_keeper`, `decryptor`,
//!   `access_token_keeper`; `actors.rs` hands a storage outcome to the caller. They see
//!   [`storage`]'s interface, never sled or Redis.
//! - The domain's words, which every layer speaks and which depend on no layer: `user.rs`
//!   ([`User`], [`UserRecord`], [`UserKey`], [`Registration`], [`Profile`], [`Phone`],
//!   [`EncryptedData`]) and `session.rs` ([`SessionInfo`], [`SessionSummary`], [`Issued`],
//!   [`SessionRecord`], [`SessionPolicy`], [`MAX_SESSIONS_PER_USER`]).
//! - [`storage`]: where users and sessions live. `storage.rs` is the one interface;
//!   `storage/sled.rs` and `storage/sled/` the data dir (users in sled trees, sessions in memory
//!   over their own log, the group commit, the signing keys in `keys.rs` and the revocation feed
//!   in `revocations.rs`); `storage/redis.rs` and `storage/redis/` (the same signing keys and
//!   feed, and the Lua scripts), the store several brokers share; `call_budget.rs` (each user's calls to WeChat
//!   this minute) and `uid_set.rs` (the uids an export has handed out).
//! - `used_codes.rs`: the login codes exchanged recently, kept without pauses.
//! - `trusted_proxies.rs`: the client's address behind trusted reverse proxies ([`TrustedProxies`]).
//! - [`tls`]: the process's rustls provider (aws-lc-rs), installed before every HTTPS client.
//! - `verified_keys.rs`: WeChat's recent "this session_key is current" answers, reused briefly.
//! - `upstream.rs`: the WeChat HTTP client, its reply envelope and errcodes, `code2Session`;
//!   [`server_api`]: the APIs that take an access_token (token, phone by code, session_key).
//! - Signed access tokens: [`jwt`] (the format), `keyring.rs` (signing keys), `signer.rs` (the
//!   broker's signer), [`revocation`] and `feed.rs` (the revocation feed), and [`edge`]: the
//!   verifier that edge hosts run, without a broker (`edge/cache.rs` the tokens seen before,
//!   `edge/follow.rs` following a broker's keys and feed).
//! - [`backup`]: offline export and import of the users as JSON lines (no session_key); a
//!   serving broker streams the same lines at `GET /admin/export` ([`storage::UserExport`]).
//! - [`crypto`]: session tokens and their hashes; AES-CBC for `encryptedData`; signatures.
//! - [`Sandbox`] (`sandbox.rs`, `sandbox/server_api.rs`): a loopback stand-in for WeChat.
//! - Several mini programs: [`App`] (`config.rs`, the config file's `[[apps]]`) and
//!   [`Identity`] (`user.rs`): one uid per person, an identity per app, linked by unionid.
//! - [`Config`] (`config.rs`), [`Clock`] (`clock.rs`), [`Error`] (`error.rs`), [`Metrics`]
//!   (`metrics.rs`); `fault.rs`, faults injected into actors in tests (feature `fault-injection`).
//! - `bin/wxbroker-load/`: the load tool, a binary of its own (see the README's Performance).
//!
//! # Embedding
//!
//! ```no_run
//! # async fn demo() -> Result<(), wxbroker::Error> {
//! use wxbroker::{Broker, Config, Sandbox, SandboxOptions};
//! let sandbox = Sandbox::start(SandboxOptions::default()).await?;
//! let mut config = Config::default();
//! sandbox.configure(&mut config);
//! let broker = Broker::start(&config).await?;
//! let login = broker.login("alice.1").await?;
//! let session = broker.check_session(&login.token).await?;
//! assert_eq!(session.uid, login.uid);
//! broker.shutdown().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod actors;
pub mod backup;
mod broker;
mod client;
mod clock;
mod config;
pub mod crypto;
pub mod edge;
mod error;
#[cfg(feature = "fault-injection")]
mod fault;
mod feed;
mod http;
pub mod jwt;
mod keyring;
mod metrics;
pub mod revocation;
mod sandbox;
mod server;
pub mod server_api;
mod session;
mod signer;
pub mod storage;
pub mod tls;
mod trusted_proxies;
pub mod upstream;
mod used_codes;
mod user;
mod verified_keys;

use std::future::Future;

use tokio::net::TcpListener;
use warp::{Filter, Reply};

pub use actors::decryptor::{open_phone, open_profile};
pub use actors::supervisor::ActorKind;
pub use broker::{Broker, Login, MAX_CODE_LEN, Stats};
pub use client::BrokerClient;
pub use clock::Clock;
pub use config::{App, Config, LogFormat, Secret};
pub use error::Error;
#[cfg(feature = "fault-injection")]
pub use fault::Fault;
pub use feed::{FeedItem, FeedStream};
pub use http::{recover, require_session, routes};
pub use keyring::{ACCESS_SLACK, AccessPolicy};
pub use metrics::Metrics;
pub use sandbox::{SANDBOX_APPID, SANDBOX_APPIDS, SANDBOX_LITE_APPID, Sandbox, SandboxOptions};
pub use server::{ClientAddr, LISTEN_BACKLOG, PeerAddr, bind};
pub use session::{
    Issued, MAX_SESSIONS_PER_USER, SessionInfo, SessionPolicy, SessionRecord, SessionSummary,
};
pub use signer::{AccessToken, KeyInfo, Rotation};
pub use trusted_proxies::TrustedProxies;
pub use user::{
    EncryptedData, Identity, Phone, Profile, Registration, User, UserKey, UserRecord, identity_key,
};

/// Serves the broker on `listener` until `shutdown` resolves, then drains and flushes.
///
/// Reads the secret files `config` names ([`Config::read_secret_files`]). Without credentials in
/// `config`, starts a [`Sandbox`] and uses it (and says so loudly); only on a loopback
/// `listener` unless `config.sandbox` says so ([`Config::check_sandbox`]), else an
/// [`Error::Config`]. Returns an error if the actors fail beyond their restart cap.
pub async fn run(
    listener: TcpListener,
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.read_secret_files()?;
    config.validate()?;
    let listen = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("the listener has no address: {e}")))?;
    config.check_sandbox(listen)?;
    let sandbox = match config.credentials()? {
        Some(_) => {
            if config.sandbox {
                tracing::warn!(
                    "WXBROKER_SANDBOX is set, but so are WECHAT_APPID and WECHAT_SECRET: \
                     serving real WeChat, no sandbox"
                );
            }
            None
        }
        None => {
            let sandbox = Sandbox::start(SandboxOptions {
                latency: std::time::Duration::from_millis(config.sandbox_latency_ms),
                ..SandboxOptions::default()
            })
            .await?;
            sandbox.configure(&mut config);
            tracing::warn!(
                url = %sandbox.url(),
                "SANDBOX MODE: WECHAT_APPID and WECHAT_SECRET are not set, so logins go to a \
                 built-in fake WeChat. Set both to serve real users."
            );
            Some(sandbox)
        }
    };
    let broker = Broker::start(&config).await?;
    if sandbox.is_none() {
        check_credentials(&broker).await?;
    }
    #[cfg(feature = "fault-injection")]
    strike_from_env(&broker);
    let mut app = routes(broker.clone()).map(Reply::into_response).boxed();
    if let Some(sandbox) = &sandbox {
        app = sandbox.client_routes().or(app).unify().boxed();
    }
    serve_app(listener, broker, app, shutdown).await
}

/// Stops the start when WeChat refuses the credentials of an app or this server's IP, naming
/// what to fix; a WeChat that cannot be reached only warns, since it may come back before the
/// first login.
async fn check_credentials(broker: &Broker) -> Result<(), Error> {
    let appids: Vec<String> = broker.appids().map(str::to_owned).collect();
    for (index, appid) in appids.iter().enumerate() {
        let appid = appid.as_str();
        match broker.check_credentials_of(index).await {
            Ok(()) => {
                tracing::info!(
                    appid,
                    "WeChat accepts the credentials: serving this mini program"
                );
                if index == 0 {
                    // Only now: a mistyped appid must not bind the store to itself.
                    if let Err(e) = broker.record_default_app().await {
                        broker.shutdown().await?;
                        return Err(e);
                    }
                }
            }
            Err(err) => match err.credentials_fix(appid) {
                Some(fix) => {
                    broker.shutdown().await?;
                    return Err(Error::Config(fix));
                }
                None => tracing::warn!(
                    appid,
                    error = %err,
                    "could not check the credentials with WeChat at start; serving anyway"
                ),
            },
        }
    }
    Ok(())
}

/// Serves a started broker's routes on `listener` until `shutdown` resolves (or the actors give
/// up), then drains in-flight requests and shuts the broker down.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let app = routes(broker.clone()).map(Reply::into_response).boxed();
    serve_app(listener, broker, app, shutdown).await
}

async fn serve_app(
    listener: TcpListener,
    broker: Broker,
    app: warp::filters::BoxedFilter<(warp::reply::Response,)>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    if let Ok(addr) = listener.local_addr() {
        let data_dir = broker.config().data_dir.display().to_string();
        tracing::info!(%addr, data_dir, "wxbroker is serving");
    }
    let gave_up = std::sync::atomic::AtomicBool::new(false);
    let stop = async {
        tokio::select! {
            () = shutdown => {}
            () = broker.stopped() => gave_up.store(true, std::sync::atomic::Ordering::Relaxed),
        }
        tracing::info!("shutting down: draining in-flight requests");
        broker.drain();
    };
    let limits = broker.config().server_limits();
    let refusal = http::too_many_connections;
    server::serve_http(listener, app, refusal, limits, broker.metrics(), stop).await;
    broker.shutdown().await?;
    if gave_up.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::Unavailable(
            "actors failed more often than the restart cap allows; see the log".into(),
        ));
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Names the actor that the `fault-injection` build of the binary makes panic each time it runs,
/// so that a test can watch the real binary give up past the restart cap (nothing else from
/// outside can make an actor fail); or, as `flush:N`, makes the first N group-commit flushes fail.
#[cfg(feature = "fault-injection")]
const FAULT_ENV: &str = "WXBROKER_FAULT";

#[cfg(feature = "fault-injection")]
/// With [`FAULT_ENV`] set to an actor's name (`session_keeper`, ...), makes that actor panic each
/// time it runs, until the broker stops; set to `flush:N`, fails the first N flushes.
fn strike_from_env(broker: &Broker) {
    let Ok(name) = std::env::var(FAULT_ENV) else {
        return;
    };
    if let Some(count) = name.strip_prefix("flush:") {
        match count.parse() {
            Ok(n) if broker.fail_flushes(n) => {
                tracing::warn!(flushes = n, "{FAULT_ENV}: failing the first flushes")
            }
            _ => tracing::warn!(name, "{FAULT_ENV}: flush:N takes a count, and the data dir"),
        }
        return;
    }
    let Some(kind) = ActorKind::ALL.into_iter().find(|kind| kind.name() == name) else {
        tracing::warn!(name, "{FAULT_ENV} names no actor");
        return;
    };
    tracing::warn!(
        actor = name,
        "{FAULT_ENV}: panicking the actor each time it runs"
    );
    let broker = broker.clone();
    tokio::spawn(async move {
        let strikes = async {
            loop {
                broker.try_inject(kind, Fault::Panic);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            () = strikes => {}
            () = broker.stopped() => {}
        }
    });
}
