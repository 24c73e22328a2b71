//! Configuration: defaults, overridden by environment variables, overridden by flags (clap).
//!
//! The library takes a [`Config`] value; only the binary parses it from the command line.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
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
/// Time in-flight requests get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Logins per minute from one client address, sustained (0 turns the limit off).
pub const DEFAULT_LOGIN_RATE_PER_MIN: u32 = 120;
/// Logins from one client address allowed at once before the rate applies.
pub const DEFAULT_LOGIN_BURST: u32 = 30;
/// sled's page cache in MiB (sled's own default of 1 GiB is far more than a broker needs).
pub const DEFAULT_CACHE_MB: u64 = 64;

/// Everything a broker needs to run. Secrets are redacted in `Debug`.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "wxbroker",
    version,
    about = "Session broker for WeChat Mini Program login"
)]
pub struct Config {
    /// The mini program's appid. With neither appid nor secret set, a built-in sandbox WeChat is used.
    #[arg(long, env = "WECHAT_APPID")]
    pub appid: Option<String>,

    /// The mini program's app secret. Never logged, never sent anywhere but WeChat.
    #[arg(long, env = "WECHAT_SECRET", hide_env_values = true)]
    pub secret: Option<Secret>,

    /// Base URL of WeChat's API (tests and the sandbox point it at loopback).
    #[arg(long, env = "WECHAT_API_BASE", default_value = DEFAULT_API_BASE)]
    pub api_base: Url,

    /// Address the HTTP front end listens on.
    #[arg(long, env = "WXBROKER_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Directory of the embedded database (created if missing).
    #[arg(long, env = "WXBROKER_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

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

    /// Milliseconds in-flight requests get to finish at shutdown.
    #[arg(long, env = "WXBROKER_DRAIN_TIMEOUT_MS", default_value_t = DEFAULT_DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: u64,

    /// Logins per minute from one client IP, sustained; 0 turns the limit off.
    #[arg(long, env = "WXBROKER_LOGIN_RATE_PER_MIN", default_value_t = DEFAULT_LOGIN_RATE_PER_MIN)]
    pub login_rate_per_min: u32,

    /// Logins from one client IP allowed in a burst before the per-minute rate applies.
    #[arg(long, env = "WXBROKER_LOGIN_BURST", default_value_t = DEFAULT_LOGIN_BURST)]
    pub login_burst: u32,

    /// Milliseconds the built-in sandbox WeChat waits before each answer (sandbox mode only; for
    /// load tests that imitate WeChat's latency).
    #[arg(long, env = "WXBROKER_SANDBOX_LATENCY_MS", default_value_t = 0)]
    pub sandbox_latency_ms: u64,

    /// MiB of page cache for the embedded database.
    #[arg(long, env = "WXBROKER_CACHE_MB", default_value_t = DEFAULT_CACHE_MB)]
    pub cache_mb: u64,

    /// Source of wall-clock time; tests replace it with a manual clock.
    #[arg(skip)]
    pub clock: Clock,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            appid: None,
            secret: None,
            api_base: Url::parse(DEFAULT_API_BASE).expect("default API base is a URL"),
            listen: DEFAULT_LISTEN
                .parse()
                .expect("default listen is an address"),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            session_idle_ttl: DEFAULT_SESSION_IDLE_TTL,
            session_max_ttl: DEFAULT_SESSION_MAX_TTL,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            upstream_timeout_ms: DEFAULT_UPSTREAM_TIMEOUT_MS,
            upstream_connect_timeout_ms: DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS,
            upstream_retries: DEFAULT_UPSTREAM_RETRIES,
            call_timeout_ms: DEFAULT_CALL_TIMEOUT_MS,
            sweep_interval_secs: DEFAULT_SWEEP_INTERVAL,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
            login_rate_per_min: DEFAULT_LOGIN_RATE_PER_MIN,
            login_burst: DEFAULT_LOGIN_BURST,
            sandbox_latency_ms: 0,
            cache_mb: DEFAULT_CACHE_MB,
            clock: Clock::system(),
        }
    }
}

impl Config {
    /// The appid and secret, or `None` when neither is set (sandbox mode).
    ///
    /// Only one of them set is an error: it is almost always a typo in a deployment.
    pub fn credentials(&self) -> Result<Option<(String, Secret)>, Error> {
        match (&self.appid, &self.secret) {
            (Some(appid), Some(secret)) if !appid.is_empty() && !secret.0.is_empty() => {
                Ok(Some((appid.clone(), secret.clone())))
            }
            (None, None) => Ok(None),
            _ => Err(Error::Config(
                "set both WECHAT_APPID and WECHAT_SECRET (or neither, for the sandbox WeChat)"
                    .into(),
            )),
        }
    }

    /// Checks the values that would make the broker misbehave rather than fail loudly.
    pub fn validate(&self) -> Result<(), Error> {
        self.credentials()?;
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
        Ok(())
    }

    /// Seconds a new session is valid if it is never used: the smaller of the two TTLs.
    pub fn session_lifetime(&self) -> u64 {
        self.session_idle_ttl.min(self.session_max_ttl)
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub(crate) fn server_limits(&self) -> crate::server::ServerLimits {
        crate::server::ServerLimits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            max_connections: self.max_connections,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
        }
    }
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
        assert_eq!(config.session_lifetime(), 60);
    }

    #[test]
    fn zero_ttl_is_rejected() {
        let config = Config {
            session_idle_ttl: 0,
            ..Config::default()
        };
        assert!(matches!(config.validate(), Err(Error::Config(m)) if m.contains("IDLE_TTL")));
    }
}
