//! Configuration: defaults, overridden by an optional TOML file, by environment variables, by flags.
//!
//! The library takes a [`Config`] value; only the binary parses it from the command line
//! ([`Config::load_from`], [`Config::layered_args`]). clap is the one source of truth for every
//! setting's flag, environment variable and default; the file's keys are the long flag names, and
//! its values go in as flags wherever neither the command line nor the environment sets them.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::builder::PossibleValue;
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command, CommandFactory, FromArgMatches, Parser, ValueEnum};
use reqwest::Url;

use crate::{Clock, Error};

/// WeChat's production API.
pub const DEFAULT_API_BASE: &str = "https://api.weixin.qq.com";
/// Where the binary listens unless told otherwise: loopback, so nothing is exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where sled keeps users and sessions.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Seconds a session lives without use (sliding).
pub const DEFAULT_SESSION_IDLE_TTL: u64 = 7200;
/// Seconds a session lives at most, however busy.
pub const DEFAULT_SESSION_MAX_TTL: u64 = 86400;
/// Upstream code exchanges in flight at once; beyond it logins get 503 at once.
pub const DEFAULT_MAX_INFLIGHT: usize = 256;
/// Total time for one upstream attempt, connect included.
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 5000;
/// Time to establish the upstream connection.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 2000;
/// Retries after WeChat answers "system busy" (errcode -1).
pub const DEFAULT_UPSTREAM_RETRIES: u32 = 2;
/// How long the front end waits for a local actor before answering 503.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 2000;
/// Seconds between sweeps that delete expired sessions.
pub const DEFAULT_SWEEP_INTERVAL: u64 = 60;
/// Time a client has to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Connections open at once from one client address (an IPv6 client's /64).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// Fewest characters an admin token may have: a bearer secret must not be guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;
/// Time in-flight requests get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Logins per minute from one client address, sustained (0 turns the limit off).
pub const DEFAULT_LOGIN_RATE_PER_MIN: u32 = 120;
/// Logins from one client address allowed at once before the rate applies.
pub const DEFAULT_LOGIN_BURST: u32 = 30;
/// Calls to WeChat per minute that one user's requests may cause (0 turns the budget off).
pub const DEFAULT_WECHAT_CALLS_PER_MIN: u32 = 20;
/// sled's page cache in MiB (sled's own default of 1 GiB is far more than a broker needs).
pub const DEFAULT_CACHE_MB: u64 = 64;
/// Seconds a signed access token lives (0 turns them off).
pub const DEFAULT_ACCESS_TOKEN_TTL: u64 = 300;
/// The `iss` of signed access tokens.
pub const DEFAULT_ISSUER: &str = "wxbroker";
/// Shortest bearer secret of the revocation feed.
pub const MIN_VERIFIER_TOKEN_LEN: usize = 32;

/// Everything a broker needs to run. Secrets are redacted in `Debug`.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "wxbroker",
    version,
    about = "Session broker for WeChat Mini Program login"
)]
pub struct Config {
    /// TOML file of settings, keyed by long flag name (`session_idle_ttl = 3600`); the environment
    /// and flags override it. If it holds a secret, make it readable by the service only.
    #[arg(long = "config", env = "WXBROKER_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// The mini program's appid. With neither appid nor secret set, a built-in sandbox WeChat is used.
    #[arg(long, env = "WECHAT_APPID")]
    pub appid: Option<String>,

    /// The mini program's app secret. Never logged, never sent anywhere but WeChat.
    #[arg(long, env = "WECHAT_SECRET", hide_env_values = true)]
    pub secret: Option<Secret>,

    /// File holding the app secret, instead of `--secret`: a systemd credential or a container
    /// secret, so that the secret is in no environment or command line. Read at start.
    #[arg(long, env = "WECHAT_SECRET_FILE", value_name = "FILE")]
    pub secret_file: Option<PathBuf>,

    /// Base URL of WeChat's API (tests and the sandbox point it at loopback).
    #[arg(long, env = "WECHAT_API_BASE", default_value = DEFAULT_API_BASE)]
    pub api_base: Url,

    /// Address the HTTP front end listens on.
    #[arg(long, env = "WXBROKER_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Directory of the embedded database (created if missing).
    #[arg(long, env = "WXBROKER_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Where users and sessions live when several brokers share them: `redis://host:port/db`.
    /// Without it, in sled in the data dir (one broker).
    #[arg(long, env = "WXBROKER_STORE", hide_env_values = true)]
    pub store: Option<Secret>,

    /// Seconds a session stays valid without use; every use slides it.
    #[arg(long, env = "WXBROKER_SESSION_IDLE_TTL", default_value_t = DEFAULT_SESSION_IDLE_TTL)]
    pub session_idle_ttl: u64,

    /// Seconds a session stays valid at most, counted from login.
    #[arg(long, env = "WXBROKER_SESSION_MAX_TTL", default_value_t = DEFAULT_SESSION_MAX_TTL)]
    pub session_max_ttl: u64,

    /// Code exchanges with WeChat in flight at once; logins beyond it get 503 upstream_busy.
    #[arg(long, env = "WXBROKER_MAX_INFLIGHT", default_value_t = DEFAULT_MAX_INFLIGHT)]
    pub max_inflight: usize,

    /// Milliseconds one call to WeChat may take in total.
    #[arg(long, env = "WXBROKER_UPSTREAM_TIMEOUT_MS", default_value_t = DEFAULT_UPSTREAM_TIMEOUT_MS)]
    pub upstream_timeout_ms: u64,

    /// Milliseconds to connect to WeChat.
    #[arg(
        long,
        env = "WXBROKER_UPSTREAM_CONNECT_TIMEOUT_MS",
        default_value_t = DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS
    )]
    pub upstream_connect_timeout_ms: u64,

    /// Retries (with backoff) when WeChat answers "system busy".
    #[arg(long, env = "WXBROKER_UPSTREAM_RETRIES", default_value_t = DEFAULT_UPSTREAM_RETRIES)]
    pub upstream_retries: u32,

    /// Milliseconds the front end waits for a local actor before answering 503.
    #[arg(long, env = "WXBROKER_CALL_TIMEOUT_MS", default_value_t = DEFAULT_CALL_TIMEOUT_MS)]
    pub call_timeout_ms: u64,

    /// Seconds between sweeps that delete expired sessions from memory and disk.
    #[arg(long, env = "WXBROKER_SWEEP_INTERVAL", default_value_t = DEFAULT_SWEEP_INTERVAL)]
    pub sweep_interval_secs: u64,

    /// Milliseconds a client has to send its request headers (slow or idle clients are cut off).
    #[arg(long, env = "WXBROKER_HEADER_READ_TIMEOUT_MS", default_value_t = DEFAULT_HEADER_READ_TIMEOUT_MS)]
    pub header_read_timeout_ms: u64,

    /// Connections open at once; beyond it new connections wait to be accepted.
    #[arg(long, env = "WXBROKER_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Connections open at once from one client IP (an IPv6 client's /64); beyond it that
    /// client's new connections are refused at once (429); 0 turns the limit off.
    #[arg(
        long,
        env = "WXBROKER_MAX_CONNECTIONS_PER_IP",
        default_value_t = DEFAULT_MAX_CONNECTIONS_PER_IP
    )]
    pub max_connections_per_ip: usize,

    /// Reverse proxies (comma-separated addresses or CIDR networks) whose `X-Forwarded-For` or
    /// `Forwarded: for=` is believed: from one of them, the client is the rightmost address there
    /// that is not a trusted proxy. Rate limits, the admin failure limit and logs use it; the
    /// connection caps count TCP peers. Default: none (the headers are ignored).
    #[arg(long, env = "WXBROKER_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<crate::TrustedProxies>,

    /// Milliseconds in-flight requests get to finish at shutdown.
    #[arg(long, env = "WXBROKER_DRAIN_TIMEOUT_MS", default_value_t = DEFAULT_DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: u64,

    /// Logins per minute from one client IP, sustained; 0 turns the limit off.
    #[arg(long, env = "WXBROKER_LOGIN_RATE_PER_MIN", default_value_t = DEFAULT_LOGIN_RATE_PER_MIN)]
    pub login_rate_per_min: u32,

    /// Logins from one client IP allowed in a burst before the per-minute rate applies.
    #[arg(long, env = "WXBROKER_LOGIN_BURST", default_value_t = DEFAULT_LOGIN_BURST)]
    pub login_burst: u32,

    /// Calls to WeChat per minute that one user's requests may cause (`verify=wechat`, phone
    /// numbers by code), counted per uid, across brokers on Redis; 0 turns the budget off.
    #[arg(long, env = "WXBROKER_WECHAT_CALLS_PER_MIN", default_value_t = DEFAULT_WECHAT_CALLS_PER_MIN)]
    pub wechat_calls_per_min: u32,

    /// Bearer secret of the admin routes (`/admin/...`), at least 32 characters; without it they
    /// are off (404).
    #[arg(long, env = "WXBROKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// Seconds a signed access token (a JWT for edge verifiers, given with each login and by
    /// `POST /v1/token`) lives; 0 turns signed tokens, their keys and the revocation feed off.
    #[arg(long, env = "WXBROKER_ACCESS_TOKEN_TTL", default_value_t = DEFAULT_ACCESS_TOKEN_TTL)]
    pub access_token_ttl: u64,

    /// The `iss` claim of signed access tokens, which verifiers check.
    #[arg(long, env = "WXBROKER_ISSUER", default_value = DEFAULT_ISSUER)]
    pub issuer: String,

    /// Bearer secret of the revocation feed (`GET /v1/revocations`) that edge verifiers follow
    /// (at least 32 characters); without it the feed is off (404).
    #[arg(long, env = "WXBROKER_VERIFIER_TOKEN", hide_env_values = true)]
    pub verifier_token: Option<Secret>,
    /// File holding the admin token, instead of `--admin-token` (as `--secret-file`).
    #[arg(long, env = "WXBROKER_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Milliseconds the built-in sandbox WeChat waits before each answer (sandbox mode only; for
    /// load tests that imitate WeChat's latency).
    #[arg(long, env = "WXBROKER_SANDBOX_LATENCY_MS", default_value_t = 0)]
    pub sandbox_latency_ms: u64,

    /// Serve the built-in sandbox WeChat even on an address that is not loopback (without
    /// WECHAT_APPID and WECHAT_SECRET): anyone who reaches it can log in as anyone.
    #[arg(
        long,
        env = "WXBROKER_SANDBOX",
        value_parser = clap::builder::BoolishValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value_t = false
    )]
    pub sandbox: bool,

    /// MiB of page cache for the embedded database.
    #[arg(long, env = "WXBROKER_CACHE_MB", default_value_t = DEFAULT_CACHE_MB)]
    pub cache_mb: u64,

    /// Format of log lines: readable text, or one JSON object per line for log collectors.
    #[arg(long, env = "WXBROKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Source of wall-clock time; tests replace it with a manual clock.
    #[arg(skip)]
    pub clock: Clock,

    /// More mini programs, from the config file's `[[apps]]` ([`Config::read_app_list`]): after
    /// the one `appid`/`secret` name, if they do; else the first of them is the default app.
    #[arg(skip)]
    pub apps: Vec<App>,
}

/// One mini program the broker serves: `[[apps]]` in the config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct App {
    /// Its appid.
    pub appid: String,
    /// Its app secret (redacted in `Debug`).
    pub secret: Secret,
    /// A name for people (logs, the README's examples); optional.
    pub name: Option<String>,
}

/// What clap gives for an empty command line, so that each default is written once, in its
/// `#[arg]`. The environment is left out: a default is the same wherever it runs.
impl Default for Config {
    fn default() -> Self {
        let matches = Config::command()
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(["wxbroker"])
            .expect("the defaults parse");
        Config::from_arg_matches(&matches).expect("the defaults parse")
    }
}

/// How the binary writes its log lines (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event, for a terminal or a plain log file.
    #[default]
    Human,
    /// One JSON object per event, for log collectors that index fields.
    Json,
}

// By hand rather than derived: the derive turns the variants' docs into per-value help, which
// switches the whole `--help` to its long layout.
impl ValueEnum for LogFormat {
    fn value_variants<'a>() -> &'a [Self] {
        &[LogFormat::Human, LogFormat::Json]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }))
    }
}

impl LogFormat {
    /// Whether log lines are JSON objects: what the binary asks to pick its formatter.
    pub fn is_json(self) -> bool {
        self == LogFormat::Json
    }
}

impl Config {
    /// Parses a command line (program name first) with the config file layered in: defaults <
    /// file < environment < flags. Every mistake, in the file or on the command line, is an
    /// [`Error::Config`]; the binary uses [`Config::layered_args`] instead, to keep clap's own
    /// help output and exit codes.
    pub fn load_from(args: impl IntoIterator<Item = impl Into<OsString>>) -> Result<Config, Error> {
        let args = Config::layered_args::<Config>(args)?;
        let mut config =
            Config::parse_layered::<Config>(args).map_err(|e| Error::Config(clap_message(&e)))?;
        config.read_app_list()?;
        Ok(config)
    }

    /// The command line `args` with the settings of the config file (`--config`, or
    /// `WXBROKER_CONFIG`) inserted as flags, each only where neither the command line nor the
    /// environment sets it, ready for `P::parse_from`.
    ///
    /// `P` is [`Config`] or a parser that flattens it (the binary's, which adds subcommands).
    /// An unreadable file, an unknown key or a value of the wrong type is an error naming the file
    /// and the key. A command line that does not parse comes back unchanged, so that the real
    /// parse reports it with clap's usage (and `--help` and `--version` work as usual).
    pub fn layered_args<P: CommandFactory>(
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Result<Vec<OsString>, Error> {
        layer_file(&P::command(), args.into_iter().map(Into::into).collect())
    }

    /// Parses `args` (from [`Config::layered_args`]) into `P`, as `P::try_parse_from` does, but a
    /// value refused that came from an environment variable is named by that variable: the
    /// operator looks for it in a unit or compose file, not in a command line no one typed.
    pub fn parse_layered<P: Parser>(args: Vec<OsString>) -> Result<P, clap::Error> {
        P::try_parse_from(&args).map_err(|err| name_the_variable(P::command(), &args, err))
    }

    /// The config file (`--config`) if it holds a secret (a setting whose value is never shown:
    /// the app secret, the admin token, the store URL) and the group or others may read it: the
    /// binary warns about it at start. `None` without a file, or one it cannot read.
    pub fn exposed_config_file(&self) -> Option<&Path> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.config_file.as_deref()?;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o044 == 0 {
            return None;
        }
        let cmd = Config::command();
        let settings = file_settings(&cmd, path).ok()?;
        let secret = settings.iter().any(|(arg, _)| arg.is_hide_env_values_set());
        // Every app of `[[apps]]` holds its secret.
        let apps = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .is_some_and(|table| table.contains_key(APPS_KEY));
        (secret || apps).then_some(path)
    }

    /// Reads the secrets named by `secret_file` and `admin_token_file` into `secret` and
    /// `admin_token` (the file's text without its final line break), and clears those two
    /// settings. [`crate::run`] calls it; an embedder that starts a [`crate::Broker`] itself calls
    /// it first. A secret given both ways, or a file that cannot be read or is empty, is an error
    /// naming the variable.
    ///
    /// It also reads the config file's `[[apps]]` ([`Config::read_app_list`]), which hold secrets
    /// too.
    pub fn read_secret_files(&mut self) -> Result<(), Error> {
        self.read_app_list()?;
        read_secret_file(&mut self.secret_file, &mut self.secret, "WECHAT_SECRET")?;
        read_secret_file(
            &mut self.admin_token_file,
            &mut self.admin_token,
            "WXBROKER_ADMIN_TOKEN",
        )
    }

    /// The default app's appid and secret, or `None` when no app is set (sandbox mode).
    ///
    /// Only one of appid and secret set is an error: it is almost always a typo in a deployment.
    pub fn credentials(&self) -> Result<Option<(String, Secret)>, Error> {
        Ok(self
            .served_apps()?
            .into_iter()
            .next()
            .map(|app| (app.appid, app.secret)))
    }

    /// Every app the broker serves, the default first: the one `appid`/`secret` name (if they
    /// do), then the config file's `[[apps]]`. Empty in sandbox mode (no app set). An appid
    /// listed twice, or an app without its appid or secret, is an error naming it.
    pub fn served_apps(&self) -> Result<Vec<App>, Error> {
        let single = match (&self.appid, &self.secret) {
            (Some(appid), Some(secret)) if !appid.is_empty() && !secret.0.is_empty() => Some(App {
                appid: appid.clone(),
                secret: secret.clone(),
                name: None,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "set both WECHAT_APPID and WECHAT_SECRET (or neither, for the sandbox WeChat)"
                        .into(),
                ));
            }
        };
        let apps: Vec<App> = single
            .into_iter()
            .chain(self.apps.iter().cloned())
            .collect();
        let mut seen = HashSet::new();
        for app in &apps {
            if app.appid.is_empty() || app.secret.0.is_empty() {
                return Err(Error::Config(
                    "[[apps]]: every app needs a non-empty appid and secret".into(),
                ));
            }
            // What a WeChat appid is made of: it goes into store keys (where `:` separates it
            // from the openid) and into the `X-Wx-Appid` header.
            let well_formed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if !app.appid.chars().all(well_formed) || app.appid.len() > 64 {
                return Err(Error::Config(format!(
                    "[[apps]]: appid {} is not an appid (at most 64 letters, digits, `_` or `-`)",
                    app.appid
                )));
            }
            if !seen.insert(app.appid.as_str()) {
                return Err(Error::Config(format!(
                    "[[apps]]: appid {} is listed twice (WECHAT_APPID is the first app, when set)",
                    app.appid
                )));
            }
        }
        Ok(apps)
    }

    /// Reads the config file's `[[apps]]` (`appid`, `secret`, optional `name`) into `apps`,
    /// replacing what it held; nothing without a config file. A key other than those three, or a
    /// value that is not a string, is an error naming the app's place in the list and the key
    /// (never the value: it may be the secret).
    pub fn read_app_list(&mut self) -> Result<(), Error> {
        let Some(path) = &self.config_file else {
            return Ok(());
        };
        let shown = path.display();
        let table = read_table(path)?;
        self.apps = app_list(&table)
            .map_err(|what| Error::Config(format!("config file {shown}, {what}")))?;
        Ok(())
    }

    /// Whether the built-in sandbox WeChat may serve on `listen` when no credentials are set:
    /// on a loopback address, or anywhere once the operator asked for it (`WXBROKER_SANDBOX`).
    /// Anyone who reaches the sandbox can log in as anyone, so a public address without
    /// credentials is refused rather than served by accident.
    pub fn check_sandbox(&self, listen: SocketAddr) -> Result<(), Error> {
        if self.credentials()?.is_some() || self.sandbox || listen.ip().to_canonical().is_loopback()
        {
            return Ok(());
        }
        Err(Error::Config(format!(
            "WECHAT_APPID and WECHAT_SECRET are not set and {listen} is not a loopback address: \
             the built-in sandbox WeChat would let anyone who reaches it log in as anyone. Set \
             WECHAT_APPID and WECHAT_SECRET to serve real users, or WXBROKER_SANDBOX=1 \
             (--sandbox) to serve the sandbox on this address anyway"
        )))
    }

    /// Checks `store`: a URL the Redis backend can use, if set.
    pub fn validate_store(&self) -> Result<(), Error> {
        if let Some(store) = &self.store {
            let url = store.expose();
            if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
                return Err(Error::Config(
                    "WXBROKER_STORE must be a redis:// (or redis+unix://) URL; TLS (rediss://) \
                     and Redis Cluster are not supported"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Checks the values that would make the broker misbehave rather than fail loudly.
    pub fn validate(&self) -> Result<(), Error> {
        self.credentials()?;
        self.validate_store()?;
        let positive = [
            ("WXBROKER_SESSION_IDLE_TTL", self.session_idle_ttl),
            ("WXBROKER_SESSION_MAX_TTL", self.session_max_ttl),
            ("WXBROKER_MAX_INFLIGHT", self.max_inflight as u64),
            ("WXBROKER_UPSTREAM_TIMEOUT_MS", self.upstream_timeout_ms),
            (
                "WXBROKER_UPSTREAM_CONNECT_TIMEOUT_MS",
                self.upstream_connect_timeout_ms,
            ),
            ("WXBROKER_CALL_TIMEOUT_MS", self.call_timeout_ms),
            ("WXBROKER_SWEEP_INTERVAL", self.sweep_interval_secs),
            (
                "WXBROKER_HEADER_READ_TIMEOUT_MS",
                self.header_read_timeout_ms,
            ),
            ("WXBROKER_MAX_CONNECTIONS", self.max_connections as u64),
            ("WXBROKER_LOGIN_BURST", u64::from(self.login_burst)),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be greater than 0")));
            }
        }
        // An empty token turns the admin routes off, as an unset one does.
        if let Some(token) = self.admin_token.as_ref().map(Secret::expose)
            && !token.is_empty()
            && token.chars().count() < MIN_ADMIN_TOKEN_LEN
        {
            return Err(Error::Config(format!(
                "WXBROKER_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LEN} characters (a \
                 random one: openssl rand -hex 32)"
            )));
        }
        // Bounds that keep the time arithmetic far from overflowing.
        const TEN_YEARS: u64 = 10 * 365 * 24 * 3600;
        let at_most = [
            (
                "WXBROKER_SESSION_IDLE_TTL",
                self.session_idle_ttl,
                TEN_YEARS,
            ),
            ("WXBROKER_SESSION_MAX_TTL", self.session_max_ttl, TEN_YEARS),
            (
                "WXBROKER_UPSTREAM_RETRIES",
                u64::from(self.upstream_retries),
                10,
            ),
            (
                "WXBROKER_UPSTREAM_TIMEOUT_MS",
                self.upstream_timeout_ms,
                600_000,
            ),
            ("WXBROKER_CALL_TIMEOUT_MS", self.call_timeout_ms, 600_000),
            ("WXBROKER_ACCESS_TOKEN_TTL", self.access_token_ttl, 86_400),
        ];
        for (name, value, max) in at_most {
            if value > max {
                return Err(Error::Config(format!("{name} must be at most {max}")));
            }
        }
        if self.issuer.is_empty() {
            return Err(Error::Config("WXBROKER_ISSUER must not be empty".into()));
        }
        if let Some(token) = &self.verifier_token
            && token.expose().len() < MIN_VERIFIER_TOKEN_LEN
        {
            return Err(Error::Config(format!(
                "WXBROKER_VERIFIER_TOKEN must be at least {MIN_VERIFIER_TOKEN_LEN} characters"
            )));
        }
        Ok(())
    }

    /// How long sessions live, from the two TTLs.
    pub fn session_policy(&self) -> crate::SessionPolicy {
        crate::SessionPolicy {
            idle_ttl: self.session_idle_ttl,
            max_ttl: self.session_max_ttl,
        }
    }

    /// How long signed access tokens live, or `None` when they are off.
    pub fn access_policy(&self) -> Option<crate::AccessPolicy> {
        (self.access_token_ttl > 0).then_some(crate::AccessPolicy {
            ttl: self.access_token_ttl,
        })
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub(crate) fn server_limits(&self) -> crate::server::ServerLimits {
        crate::server::ServerLimits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            trusted_proxies: self.trusted_proxies.clone().unwrap_or_default(),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
        }
    }
}

/// Moves the content of the file `file` names into `secret` (see [`Config::read_secret_files`]);
/// `name` is the secret's variable, the file's is `name` with `_FILE`.
fn read_secret_file(
    file: &mut Option<PathBuf>,
    secret: &mut Option<Secret>,
    name: &str,
) -> Result<(), Error> {
    let Some(path) = file.take() else {
        return Ok(());
    };
    if secret.is_some() {
        return Err(Error::Config(format!(
            "set {name} or {name}_FILE, not both"
        )));
    }
    let shown = path.display();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Config(format!("{name}_FILE: cannot read {shown}: {e}")))?;
    // `echo secret > file` adds a line break that is no part of the secret.
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(Error::Config(format!("{name}_FILE: {shown} is empty")));
    }
    *secret = Some(Secret::new(value));
    Ok(())
}

/// The key of the app list in the config file (a list of tables, not a flag).
const APPS_KEY: &str = "apps";

/// The apps of `[[apps]]` in a parsed config file (see [`Config::read_app_list`]); the error
/// names the place, never a value.
fn app_list(table: &toml::Table) -> Result<Vec<App>, String> {
    let Some(list) = table.get(APPS_KEY) else {
        return Ok(Vec::new());
    };
    let toml::Value::Array(list) = list else {
        return Err("key `apps`: expected a list of tables ([[apps]])".into());
    };
    let mut apps = Vec::new();
    for (n, entry) in list.iter().enumerate() {
        let at = |what: &str| format!("[[apps]] number {}: {what}", n + 1);
        let toml::Value::Table(entry) = entry else {
            return Err(at("expected a table with appid and secret"));
        };
        let text = |key: &str| -> Result<Option<String>, String> {
            match entry.get(key) {
                None => Ok(None),
                Some(toml::Value::String(value)) => Ok(Some(value.clone())),
                Some(_) => Err(at(&format!("key `{key}`: expected a string"))),
            }
        };
        let (appid, secret, name) = (text("appid")?, text("secret")?, text("name")?);
        if let Some(key) = entry
            .keys()
            .find(|key| !["appid", "secret", "name"].contains(&key.as_str()))
        {
            return Err(at(&format!(
                "key `{key}`: unknown (an app takes appid, secret and name)"
            )));
        }
        let appid = appid.ok_or_else(|| at("key `appid` is missing"))?;
        let secret = secret.ok_or_else(|| at("key `secret` is missing"))?;
        apps.push(App {
            appid,
            secret: Secret(secret),
            name,
        });
    }
    Ok(apps)
}

/// Long flag names a config file cannot set: the file itself, and clap's own flags.
const NOT_FROM_FILE: [&str; 3] = ["config", "help", "version"];

/// Inserts the config file's settings into `args` (see [`Config::layered_args`]).
fn layer_file(cmd: &Command, mut args: Vec<OsString>) -> Result<Vec<OsString>, Error> {
    // A first parse tells where the file is and which settings the command line or the
    // environment already give. If it fails, the caller's own parse says why, with clap's usage.
    let Ok(matches) = cmd.clone().try_get_matches_from(&args) else {
        return Ok(args);
    };
    let Some(path) = file_path(cmd, &matches) else {
        return Ok(args);
    };
    let mut flags = Vec::new();
    for (arg, value) in file_settings(cmd, &path)? {
        let given = matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if let (false, Some(long)) = (given, arg.get_long()) {
            // `--name=value` keeps a value that starts with `-` a value.
            flags.push(OsString::from(format!("--{long}={value}")));
        }
    }
    // Right after the program name: before any subcommand, where the flattened flags belong.
    let at = args.len().min(1);
    args.splice(at..at, flags);
    Ok(args)
}

/// `err` about a flag's value, reworded to name the environment variable it came from when the
/// flag is not on the command line and the variable is set; any other error unchanged.
fn name_the_variable(mut cmd: Command, args: &[OsString], err: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return err;
    }
    // clap shows the flag as it renders it: `--listen <LISTEN>`, `--sandbox[=<SANDBOX>]`.
    let Some(ContextValue::String(shown)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    cmd.build();
    let Some(arg) = cmd.get_arguments().find(|arg| arg.to_string() == *shown) else {
        return err;
    };
    let (Some(long), Some(var)) = (arg.get_long(), arg.get_env()) else {
        return err;
    };
    let flag = format!("--{long}");
    let typed = args.iter().skip(1).any(|given| {
        let given = given.to_string_lossy();
        given == flag || given.starts_with(&format!("{flag}="))
    });
    if typed || std::env::var_os(var).is_none() {
        return err;
    }
    let var = var.to_string_lossy();
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) if !arg.is_hide_env_values_set() => {
            format!(" '{value}'")
        }
        _ => String::new(),
    };
    let why = match (
        err.get(ContextKind::ValidValue),
        std::error::Error::source(&err),
    ) {
        (Some(ContextValue::Strings(valid)), _) => format!("possible values: {}", valid.join(", ")),
        (_, Some(source)) => source.to_string(),
        _ => "not a valid value".into(),
    };
    clap::Error::raw(
        err.kind(),
        format!("invalid value{value} for the environment variable {var}: {why}"),
    )
    .format(&mut cmd)
}

/// The config file named on the command line or in the environment, if any.
fn file_path(cmd: &Command, matches: &ArgMatches) -> Option<PathBuf> {
    let arg = cmd
        .get_arguments()
        .find(|arg| arg.get_long() == Some("config"))?;
    let mut values = matches.get_raw(arg.get_id().as_str())?;
    values.next().map(PathBuf::from)
}

/// The config file at `path` as a TOML table.
fn read_table(path: &Path) -> Result<toml::Table, Error> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read the config file {shown}: {e}")))?;
    text.parse().map_err(|e: toml::de::Error| {
        Error::Config(format!(
            "the config file {shown} is not valid TOML: {}",
            toml_error(&text, &e)
        ))
    })
}

/// The settings of the file at `path`, each with its flag and the value as it would be typed
/// after the flag, already checked by the flag's own parser.
fn file_settings<'c>(cmd: &'c Command, path: &Path) -> Result<Vec<(&'c Arg, String)>, Error> {
    let shown = path.display();
    let table = read_table(path)?;
    let mut seen = HashSet::new();
    let mut settings = Vec::new();
    for (key, value) in &table {
        // The app list is read by `Config::read_app_list`.
        if key == APPS_KEY && value.is_array() {
            continue;
        }
        let at = |what: String| Error::Config(format!("config file {shown}, key `{key}`: {what}"));
        let long = key.replace('_', "-");
        if long == "config" {
            return Err(at("a config file cannot name another one".into()));
        }
        let arg = cmd
            .get_arguments()
            .find(|arg| {
                arg.get_long() == Some(long.as_str()) && !NOT_FROM_FILE.contains(&long.as_str())
            })
            .ok_or_else(|| {
                at(
                    "unknown setting (the keys are the long flag names that `wxbroker --help` \
                    lists, e.g. session_idle_ttl)"
                        .into(),
                )
            })?;
        if !seen.insert(arg.get_id().clone()) {
            return Err(at("set twice (once spelt with `_`, once with `-`)".into()));
        }
        let value = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::Boolean(flag) => flag.to_string(),
            other => {
                return Err(at(format!(
                    "expected a string or a number, found {}",
                    other.type_str()
                )));
            }
        };
        check_value(arg, &value).map_err(at)?;
        settings.push((arg, value));
    }
    Ok(settings)
}

/// Runs `value` through the flag's own parser, so that a wrong type is reported against the file
/// and its key rather than as a command-line mistake the user never typed.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let long = arg.get_long().unwrap_or_default();
    let probe = Command::new("wxbroker")
        .no_binary_name(true)
        .arg(arg.clone());
    match probe.try_get_matches_from([format!("--{long}={value}")]) {
        Ok(_) => Ok(()),
        // clap's message would quote the value, and a hidden value is a secret.
        Err(_) if arg.is_hide_env_values_set() => Err("invalid value".into()),
        Err(e) => Err(clap_message(&e)),
    }
}

/// A TOML syntax error as a line number and a message, without the excerpt of the file that the
/// error's `Display` shows: the offending line may hold the secret.
fn toml_error(text: &str, err: &toml::de::Error) -> String {
    match err.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
            format!("line {line}: {}", err.message())
        }
        None => err.message().to_owned(),
    }
}

/// clap's message for `err` on one line, without the usage hint that follows it.
fn clap_message(err: &clap::Error) -> String {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// A secret string (the app secret) that never shows in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it (the WeChat request).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"[redacted]\")")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_redacts_the_secret() {
        let config = Config {
            appid: Some("wx123".into()),
            secret: Some(Secret::new("very-secret-value")),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }

    /// Checks `config` against the defaults the constants above document.
    fn assert_documented_defaults(config: &Config) {
        assert_eq!(config.config_file, None);
        assert_eq!(config.appid, None);
        assert_eq!(config.secret, None);
        assert_eq!(config.secret_file, None);
        assert_eq!(config.api_base.as_str(), format!("{DEFAULT_API_BASE}/"));
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.data_dir, Path::new(DEFAULT_DATA_DIR));
        assert_eq!(config.store, None);
        assert_eq!(config.session_idle_ttl, DEFAULT_SESSION_IDLE_TTL);
        assert_eq!(config.session_max_ttl, DEFAULT_SESSION_MAX_TTL);
        assert_eq!(config.max_inflight, DEFAULT_MAX_INFLIGHT);
        assert_eq!(config.upstream_timeout_ms, DEFAULT_UPSTREAM_TIMEOUT_MS);
        assert_eq!(
            config.upstream_connect_timeout_ms,
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS
        );
        assert_eq!(config.upstream_retries, DEFAULT_UPSTREAM_RETRIES);
        assert_eq!(config.call_timeout_ms, DEFAULT_CALL_TIMEOUT_MS);
        assert_eq!(config.sweep_interval_secs, DEFAULT_SWEEP_INTERVAL);
        assert_eq!(
            config.header_read_timeout_ms,
            DEFAULT_HEADER_READ_TIMEOUT_MS
        );
        assert_eq!(config.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            config.max_connections_per_ip,
            DEFAULT_MAX_CONNECTIONS_PER_IP
        );
        assert!(!config.sandbox);
        assert_eq!(config.drain_timeout_ms, DEFAULT_DRAIN_TIMEOUT_MS);
        assert_eq!(config.login_rate_per_min, DEFAULT_LOGIN_RATE_PER_MIN);
        assert_eq!(config.login_burst, DEFAULT_LOGIN_BURST);
        assert_eq!(config.wechat_calls_per_min, DEFAULT_WECHAT_CALLS_PER_MIN);
        assert_eq!(config.admin_token, None);
        assert_eq!(config.access_token_ttl, DEFAULT_ACCESS_TOKEN_TTL);
        assert_eq!(config.issuer, DEFAULT_ISSUER);
        assert_eq!(config.verifier_token, None);
        assert_eq!(config.admin_token_file, None);
        assert_eq!(config.sandbox_latency_ms, 0);
        assert_eq!(config.cache_mb, DEFAULT_CACHE_MB);
        assert_eq!(config.log_format, LogFormat::Human);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        assert_documented_defaults(&Config::default());
    }

    #[test]
    fn defaults_ignore_the_environment() {
        // The test above, rerun by a child process whose environment sets every variable that
        // Config reads; a child, because other tests read this process's environment meanwhile.
        // "1" is no setting's default, and no URL, address or log format.
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.args(["--exact", "config::tests::defaults_are_the_documented_ones"]);
        for arg in Config::command().get_arguments() {
            if let Some(var) = arg.get_env() {
                child.env(var, "1");
            }
        }
        let output = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn credentials_need_both_or_neither() {
        let neither = Config::default();
        assert_eq!(neither.credentials(), Ok(None));

        let only_appid = Config {
            appid: Some("wx123".into()),
            ..Config::default()
        };
        assert!(matches!(only_appid.credentials(), Err(Error::Config(_))));

        let only_secret = Config {
            secret: Some(Secret::new("s")),
            ..Config::default()
        };
        assert!(matches!(only_secret.validate(), Err(Error::Config(_))));

        let both = Config {
            appid: Some("wx123".into()),
            secret: Some(Secret::new("s")),
            ..Config::default()
        };
        assert!(both.credentials().unwrap().is_some());
    }

    #[test]
    fn flags_override_defaults() {
        let config = Config::try_parse_from([
            "wxbroker",
            "--session-idle-ttl",
            "60",
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(config.session_idle_ttl, 60);
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.session_policy().expires_in(), 60);
    }

    /// A config file holding `text`.
    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    /// Config's command with the environment variable of each `(id, var)` replaced by `var`. The
    /// tests decide what is "set in the environment" this way, without changing the process
    /// environment that other tests read at the same time; `var`s no one sets stand for "unset".
    fn command_with_env(vars: &[(&str, &'static str)]) -> Command {
        vars.iter().fold(Config::command(), |cmd, &(id, var)| {
            cmd.mut_arg(id, |arg| arg.env(var))
        })
    }

    /// What the binary does, on `cmd`: layer the file in, then parse.
    fn parse(cmd: &Command, args: &[&str]) -> Result<Config, Error> {
        let args = layer_file(cmd, args.iter().map(OsString::from).collect())?;
        let matches = cmd
            .clone()
            .try_get_matches_from(args)
            .map_err(|e| Error::Config(clap_message(&e)))?;
        Ok(Config::from_arg_matches(&matches).unwrap())
    }

    const UNSET: &str = "WXBROKER_TEST_NEVER_SET_7D1F";

    #[test]
    fn the_file_overrides_defaults_and_flags_override_the_file() {
        let file = config_file(
            "appid = \"wx-file\"\nsession_idle_ttl = 60\nmax-inflight = 9\n\
             listen = \"127.0.0.1:0\"\nlog_format = \"json\"\n",
        );
        let path = file.path().to_str().unwrap();
        let cmd = command_with_env(&[
            ("appid", UNSET),
            ("session_idle_ttl", UNSET),
            ("max_inflight", UNSET),
            ("listen", UNSET),
            ("log_format", UNSET),
            ("session_max_ttl", UNSET),
        ]);

        let config = parse(&cmd, &["wxbroker", "--config", path, "--max-inflight", "3"]).unwrap();
        assert_eq!(config.appid.as_deref(), Some("wx-file"));
        assert_eq!(config.session_idle_ttl, 60);
        assert_eq!(config.max_inflight, 3, "the flag wins over the file");
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(
            config.session_max_ttl, DEFAULT_SESSION_MAX_TTL,
            "not in the file"
        );
        assert_eq!(config.config_file.as_deref(), Some(file.path()));

        // The public entry point does the same with Config's own command.
        let loaded = Config::load_from(["wxbroker", "--config", path, "--max-inflight", "3"]);
        assert_eq!(loaded.unwrap().max_inflight, 3);
    }

    #[test]
    fn the_environment_overrides_the_file_and_a_flag_overrides_both() {
        // PATH is set in every test process: here it plays WECHAT_APPID.
        let from_env = std::env::var("PATH").expect("PATH is set");
        let file = config_file("appid = \"wx-file\"\n");
        let path = file.path().to_str().unwrap();
        let in_env = command_with_env(&[("appid", "PATH")]);
        let config = parse(&in_env, &["wxbroker", "--config", path]).unwrap();
        assert_eq!(config.appid.as_deref(), Some(from_env.as_str()));

        let config = parse(
            &in_env,
            &["wxbroker", "--config", path, "--appid", "wx-flag"],
        )
        .unwrap();
        assert_eq!(config.appid.as_deref(), Some("wx-flag"));

        let not_in_env = command_with_env(&[("appid", UNSET)]);
        let config = parse(&not_in_env, &["wxbroker", "--config", path]).unwrap();
        assert_eq!(config.appid.as_deref(), Some("wx-file"));
    }

    #[test]
    fn the_file_can_be_named_in_the_environment() {
        // The config flag's variable bound to PATH, which is set but names no file: the error
        // about that "file" shows that the variable was read.
        let cmd = command_with_env(&[("config_file", "PATH")]);
        let err = parse(&cmd, &["wxbroker"]).unwrap_err();
        let path = std::env::var("PATH").unwrap();
        assert!(
            matches!(&err, Error::Config(m) if m.contains(&path) && m.contains("cannot read")),
            "{err}"
        );
    }

    #[test]
    fn file_mistakes_name_the_file_and_the_key() {
        let cases = [
            (
                "sesion_idle_ttl = 5\n",
                "`sesion_idle_ttl`: unknown setting",
            ),
            (
                "session_idle_ttl = \"soon\"\n",
                "`session_idle_ttl`: invalid value 'soon'",
            ),
            (
                "listen = [\"127.0.0.1:0\"]\n",
                "`listen`: expected a string or a number",
            ),
            ("api_base = \"not a url\"\n", "`api_base`: invalid value"),
            (
                "log_format = \"xml\"\n",
                "`log_format`: invalid value 'xml'",
            ),
            (
                "config = \"other.toml\"\n",
                "`config`: a config file cannot name another",
            ),
            ("help = true\n", "`help`: unknown setting"),
            ("cache_mb = 8\ncache-mb = 9\n", "set twice"),
        ];
        for (text, expected) in cases {
            let file = config_file(text);
            let path = file.path().to_str().unwrap();
            let err = Config::load_from(["wxbroker", "--config", path]).unwrap_err();
            assert!(
                matches!(&err, Error::Config(m) if m.contains(path) && m.contains(expected)),
                "{text}: {err}"
            );
        }

        let missing = "/nonexistent/wxbroker.toml";
        let err = Config::load_from(["wxbroker", "--config", missing]).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains(missing) && m.contains("cannot read")),
            "{err}"
        );
    }

    #[test]
    fn a_toml_syntax_error_gives_the_line_but_never_the_text() {
        // An unquoted secret is the likeliest syntax error in such a file.
        let file = config_file("appid = \"wx1\"\nsecret = hunter2-secret\n");
        let path = file.path().to_str().unwrap();
        let err = Config::load_from(["wxbroker", "--config", path]).unwrap_err();
        let Error::Config(message) = &err else {
            panic!("{err}")
        };
        assert!(
            message.contains(path) && message.contains("line 2"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn the_secret_may_come_from_the_file_and_stays_redacted() {
        let file = config_file("appid = \"wx1\"\nsecret = \"from-the-file\"\n");
        let path = file.path().to_str().unwrap();
        let cmd = command_with_env(&[("appid", UNSET), ("secret", UNSET)]);
        let config = parse(&cmd, &["wxbroker", "--config", path]).unwrap();
        assert_eq!(
            config.secret.as_ref().map(Secret::expose),
            Some("from-the-file")
        );
        assert!(!format!("{config:?}").contains("from-the-file"));
    }

    #[test]
    fn a_config_file_with_a_secret_that_others_may_read_is_exposed() {
        use std::os::unix::fs::PermissionsExt;
        let exposed = |text: &str, mode: u32| {
            let file = config_file(text);
            std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let config = Config {
                config_file: Some(file.path().to_owned()),
                ..Config::default()
            };
            config.exposed_config_file() == Some(file.path())
        };
        let admin = "admin_token = \"an-admin-token-of-at-least-32-chars\"\n";
        for secret in [
            "secret = \"s\"\n",
            admin,
            "store = \"redis://:pw@127.0.0.1/\"\n",
        ] {
            assert!(exposed(secret, 0o644), "{secret}");
            assert!(exposed(secret, 0o640), "{secret}");
            assert!(exposed(secret, 0o604), "{secret}");
            assert!(!exposed(secret, 0o600), "{secret}");
        }
        assert!(!exposed("session_idle_ttl = 60\n", 0o644));
        assert_eq!(Config::default().exposed_config_file(), None);
    }

    #[test]
    fn a_bad_command_line_is_left_for_clap_to_report() {
        let args = Config::layered_args::<Config>(["wxbroker", "--no-such-flag"]).unwrap();
        assert_eq!(args, ["wxbroker", "--no-such-flag"]);
        let err = Config::load_from(["wxbroker", "--no-such-flag"]).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("--no-such-flag")),
            "{err}"
        );
    }

    #[test]
    fn the_sandbox_serves_on_loopback_or_when_asked() {
        let sandbox = Config::default();
        for listen in [
            "127.0.0.1:8080",
            "127.0.0.2:0",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert_eq!(
                sandbox.check_sandbox(listen.parse().unwrap()),
                Ok(()),
                "{listen}"
            );
        }
        for listen in ["0.0.0.0:8080", "[::]:8080", "192.0.2.1:8080"] {
            let err = sandbox.check_sandbox(listen.parse().unwrap()).unwrap_err();
            let Error::Config(message) = &err else {
                panic!("{err}")
            };
            for name in ["WECHAT_APPID", "WECHAT_SECRET", "WXBROKER_SANDBOX", listen] {
                assert!(message.contains(name), "{message}");
            }
        }
        let public = "0.0.0.0:8080".parse().unwrap();
        let asked = Config {
            sandbox: true,
            ..Config::default()
        };
        assert_eq!(asked.check_sandbox(public), Ok(()));
        let real = Config {
            appid: Some("wx123".into()),
            secret: Some(Secret::new("s")),
            ..Config::default()
        };
        assert_eq!(
            real.check_sandbox(public),
            Ok(()),
            "no sandbox with credentials"
        );
    }

    #[test]
    fn the_sandbox_flag_comes_from_the_flag_the_environment_or_the_file() {
        let cmd = command_with_env(&[("sandbox", UNSET)]);
        assert!(!parse(&cmd, &["wxbroker"]).unwrap().sandbox);
        assert!(parse(&cmd, &["wxbroker", "--sandbox"]).unwrap().sandbox);
        assert!(
            !parse(&cmd, &["wxbroker", "--sandbox=false"])
                .unwrap()
                .sandbox
        );
        // PATH is set in every test process: here it plays WXBROKER_SANDBOX, which is not a
        // yes or a no.
        let in_env = command_with_env(&[("sandbox", "PATH")]);
        assert!(parse(&in_env, &["wxbroker"]).is_err());
        // As WXBROKER_SANDBOX=1 would be, through the flag's own value parser.
        for (value, expected) in [("1", true), ("true", true), ("0", false), ("no", false)] {
            let config = parse(&cmd, &["wxbroker", &format!("--sandbox={value}")]).unwrap();
            assert_eq!(config.sandbox, expected, "{value}");
        }
        let file = config_file("sandbox = true\n");
        let path = file.path().to_str().unwrap();
        assert!(
            parse(&cmd, &["wxbroker", "--config", path])
                .unwrap()
                .sandbox
        );
        // Its value goes after `=` only: what follows it is never taken for its value.
        let args = ["wxbroker", "--sandbox", "--listen", "127.0.0.1:0"];
        assert!(parse(&cmd, &args).unwrap().sandbox);
    }

    #[test]
    fn an_admin_token_is_at_least_32_characters() {
        let with = |token: &str| Config {
            admin_token: Some(Secret::new(token)),
            ..Config::default()
        };
        let err = with("short-admin-token").validate().unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("WXBROKER_ADMIN_TOKEN") && m.contains("32")),
            "{err}"
        );
        assert!(!err.to_string().contains("short-admin-token"), "{err}");
        assert!(with(&"x".repeat(31)).validate().is_err());
        assert_eq!(with(&"x".repeat(32)).validate(), Ok(()));
        assert_eq!(
            with("").validate(),
            Ok(()),
            "empty: the admin routes are off"
        );
    }

    #[test]
    fn zero_ttl_is_rejected() {
        let config = Config {
            session_idle_ttl: 0,
            ..Config::default()
        };
        assert!(matches!(config.validate(), Err(Error::Config(m)) if m.contains("IDLE_TTL")));
    }

    #[test]
    fn signed_tokens_are_on_by_default_and_their_settings_are_checked() {
        assert_eq!(
            Config::default().access_policy(),
            Some(crate::AccessPolicy { ttl: 300 })
        );
        let off = Config {
            access_token_ttl: 0,
            ..Config::default()
        };
        assert_eq!(off.access_policy(), None);
        assert!(off.validate().is_ok());
        let bad = [
            Config {
                access_token_ttl: 86_401,
                ..Config::default()
            },
            Config {
                issuer: String::new(),
                ..Config::default()
            },
            Config {
                verifier_token: Some(Secret::new("short")),
                ..Config::default()
            },
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(Error::Config(_))),
                "{config:?}"
            );
        }
    }

    #[test]
    fn secrets_are_read_from_files_without_the_final_line_break() {
        let secret = config_file("secret-from-a-file\n");
        let token = config_file("admin-token-from-a-file-0123456789\r\n");
        let mut config = Config {
            appid: Some("wx1".into()),
            secret_file: Some(secret.path().into()),
            admin_token_file: Some(token.path().into()),
            ..Config::default()
        };
        config.read_secret_files().unwrap();
        assert_eq!(
            config.secret.as_ref().map(Secret::expose),
            Some("secret-from-a-file")
        );
        assert_eq!(
            config.admin_token.as_ref().map(Secret::expose),
            Some("admin-token-from-a-file-0123456789")
        );
        assert_eq!(
            (
                config.secret_file.as_ref(),
                config.admin_token_file.as_ref()
            ),
            (None, None)
        );
        assert!(config.validate().is_ok());
        assert!(!format!("{config:?}").contains("from-a-file"));
        // Read once: a second call (the binary's, then run's) changes nothing.
        config.read_secret_files().unwrap();
        assert_eq!(
            config.secret.as_ref().map(Secret::expose),
            Some("secret-from-a-file")
        );
    }

    #[test]
    fn a_secret_file_mistake_names_the_variable() {
        let file = config_file("s3cret\n");
        let both = Config {
            secret: Some(Secret::new("given")),
            secret_file: Some(file.path().into()),
            ..Config::default()
        };
        let empty = config_file("\n");
        let cases = [
            (
                both,
                "set WECHAT_SECRET or WECHAT_SECRET_FILE, not both".to_owned(),
            ),
            (
                Config {
                    admin_token_file: Some("/nonexistent/admin-token".into()),
                    ..Config::default()
                },
                "WXBROKER_ADMIN_TOKEN_FILE: cannot read /nonexistent/admin-token".to_owned(),
            ),
            (
                Config {
                    secret_file: Some(empty.path().into()),
                    ..Config::default()
                },
                format!("WECHAT_SECRET_FILE: {} is empty", empty.path().display()),
            ),
        ];
        for (mut config, expected) in cases {
            let err = config.read_secret_files().unwrap_err();
            assert!(
                matches!(&err, Error::Config(m) if m.contains(&expected)),
                "{err}"
            );
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn the_app_list_adds_apps_after_the_single_app_settings() {
        let file = config_file(
            "session_idle_ttl = 60\n\n[[apps]]\nappid = \"wx-lite\"\nsecret = \"lite-secret\"\n\
             name = \"Lite\"\n\n[[apps]]\nappid = \"wx-third\"\nsecret = \"third-secret\"\n",
        );
        let path = file.path().to_str().unwrap();
        let cmd = command_with_env(&[("appid", UNSET), ("secret", UNSET)]);
        let mut config = parse(&cmd, &["wxbroker", "--config", path]).unwrap();
        assert_eq!(
            config.session_idle_ttl, 60,
            "the other keys are read as before"
        );
        config.read_app_list().unwrap();
        let appids = |config: &Config| -> Vec<String> {
            let apps = config.served_apps().unwrap();
            apps.into_iter().map(|app| app.appid).collect()
        };
        // Without WECHAT_APPID, the list's first app is the default.
        assert_eq!(appids(&config), ["wx-lite", "wx-third"]);
        assert_eq!(config.apps[0].name.as_deref(), Some("Lite"));
        let (appid, secret) = config.credentials().unwrap().unwrap();
        assert_eq!(
            (appid.as_str(), secret.expose()),
            ("wx-lite", "lite-secret")
        );
        // With it, the single app is the default and the list follows.
        config.appid = Some("wx-main".into());
        config.secret = Some(Secret::new("main-secret"));
        assert_eq!(appids(&config), ["wx-main", "wx-lite", "wx-third"]);
        // The secrets stay out of Debug; reading twice does not add the apps twice.
        let shown = format!("{config:?}");
        for secret in ["lite-secret", "third-secret", "main-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        config.read_secret_files().unwrap();
        assert_eq!(config.apps.len(), 2);
        // The public entry point reads the list too.
        let loaded = Config::load_from(["wxbroker", "--config", path]).unwrap();
        assert_eq!(loaded.apps.len(), 2);
        // A file with a list is one holding secrets.
        let exposed = Config {
            config_file: Some(file.path().to_owned()),
            ..Config::default()
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(exposed.exposed_config_file(), Some(file.path()));
    }

    #[test]
    fn a_bad_app_list_is_an_error_naming_the_place_never_the_secret() {
        let cases = [
            ("apps = \"wx\"\n", "key `apps`"),
            (
                "[[apps]]\nsecret = \"hunter2-secret\"\n",
                "[[apps]] number 1: key `appid` is missing",
            ),
            (
                "[[apps]]\nappid = \"wx1\"\n",
                "[[apps]] number 1: key `secret` is missing",
            ),
            (
                "[[apps]]\nappid = \"wx1\"\nsecret = \"hunter2-secret\"\n[[apps]]\nappid = \"wx2\"\n\
                 secret = \"hunter2-secret\"\nsecrets = \"hunter2-secret\"\n",
                "[[apps]] number 2: key `secrets`: unknown",
            ),
            (
                "[[apps]]\nappid = \"wx1\"\nsecret = 12345\n",
                "key `secret`: expected a string",
            ),
        ];
        for (text, expected) in cases {
            let file = config_file(text);
            let mut config = Config {
                config_file: Some(file.path().to_owned()),
                ..Config::default()
            };
            let err = config.read_app_list().unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains("hunter2") && !err.contains("12345"), "{err}");
        }
        // Twice the same appid, once as WECHAT_APPID: named, and which setting is the first.
        let twice = Config {
            appid: Some("wx1".into()),
            secret: Some(Secret::new("hunter2-secret")),
            apps: vec![App {
                appid: "wx1".into(),
                secret: Secret::new("hunter2-secret"),
                name: None,
            }],
            ..Config::default()
        };
        let err = twice.validate().unwrap_err().to_string();
        assert!(err.contains("wx1 is listed twice"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
