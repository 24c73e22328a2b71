//! The one error type of the library: every failure a caller can see, by its meaning.
//!
//! The HTTP layer maps each variant to a status and a JSON error code in one place
//! (`http::problem`); embedders match on the variants directly.

/// What went wrong with a broker operation.
///
/// Variants carry no secrets: a session_key, the app secret or a token never goes into one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed (missing or oversized field); the sentence says which.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The login names an appid the broker does not serve (not in its configured apps).
    #[error("the broker does not serve this appid")]
    UnknownApp,
    /// WeChat does not know the code (errcode 40029): the client must call `wx.login` again.
    #[error("the login code is invalid")]
    InvalidCode,
    /// The code was already exchanged (errcode 40163, or seen by this broker before).
    #[error("the login code was already used")]
    CodeUsed,
    /// WeChat's per-user minute quota is spent (errcode 45011), or the broker's own budget of
    /// calls to WeChat per user (`WXBROKER_WECHAT_CALLS_PER_MIN`).
    #[error("the user's quota of calls to WeChat is spent; retry after {retry_after_secs} s")]
    RateLimited {
        /// Seconds the client should wait, sent as `Retry-After`.
        retry_after_secs: u64,
    },
    /// WeChat blocked the login of a high-risk user (errcode 40226).
    #[error("WeChat refused the login of this user as high-risk")]
    RiskyUser,
    /// WeChat stayed busy (errcode -1) after our retries, or our own in-flight limit is reached.
    #[error("WeChat is busy; retry shortly")]
    UpstreamBusy,
    /// WeChat did not answer within the configured timeout.
    #[error("WeChat did not answer in time")]
    UpstreamTimeout,
    /// WeChat answered something we cannot use (bad appid/secret, 5xx, non-JSON); detail is for logs.
    #[error("WeChat answered unusably: {0}")]
    Upstream(String),
    /// WeChat does not know the phone-number code (or it was used): the client must ask the user
    /// to tap the phone-number button again.
    #[error("the phone-number code is invalid or was already used")]
    InvalidPhoneCode,
    /// WeChat says the session_key we hold for the user is no longer current (errcode 87009):
    /// the client called `wx.login` without logging in here, so it must log in again.
    #[error("WeChat no longer accepts the stored session_key")]
    SessionKeyExpired,
    /// WeChat refused the app's credentials or this server: a wrong appid (40013) or secret
    /// (40125, or 40001 from the token endpoints), or a server IP missing from the mini program's
    /// IP whitelist (40164, 61004). Only the operator can fix it; [`Error::credentials_fix`]
    /// says how.
    #[error(
        "WeChat refused the app's credentials or this server's IP (errcode {errcode}: {errmsg})"
    )]
    CredentialsRejected {
        /// WeChat's errcode.
        errcode: i64,
        /// WeChat's errmsg (for 40164 it names the refused IP).
        errmsg: String,
    },
    /// WeChat rejected our access_token as invalid or expired (errcode 40001/42001), even after
    /// a fresh one was fetched.
    #[error("WeChat rejected the access_token (errcode {0})")]
    AccessTokenStale(i64),
    /// The session token is unknown, expired, revoked or missing.
    #[error("the session is invalid or expired")]
    InvalidSession,
    /// `encryptedData` did not decrypt to JSON under the stored session_key: most likely the
    /// client called `wx.login` again since, so it must log in again and resend.
    #[error("the data could not be decrypted with the current session_key")]
    DecryptFailed,
    /// The decrypted data was made for another mini program.
    #[error("the data's watermark names another appid")]
    WatermarkMismatch,
    /// The decrypted profile belongs to another user than the session's.
    #[error("the data belongs to another openid than the session's")]
    OpenidMismatch,
    /// `rawData` and `signature` do not match under the stored session_key.
    #[error("the rawData signature does not match")]
    SignatureMismatch,
    /// Decrypted data names a unionid that another user holds, or that differs from the one this
    /// user already has: encrypted data may confirm a user's unionid, never move or change one.
    #[error("the data's unionid belongs to another user or differs from this user's")]
    UnionidConflict,
    /// An actor is dead, restarting or too slow to answer within its call timeout.
    #[error("the broker is temporarily unavailable: {0}")]
    Unavailable(String),
    /// The configuration cannot work (one of appid/secret missing, a zero TTL...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The embedded store failed (I/O, corruption); detail is for logs.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl Error {
    /// The stable code of this error, as the JSON `error` field and metric labels carry it.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::UnknownApp => "unknown_app",
            Error::InvalidCode => "invalid_code",
            Error::CodeUsed => "code_used",
            Error::RateLimited { .. } => "rate_limited",
            Error::RiskyUser => "risky_user",
            Error::UpstreamBusy => "upstream_busy",
            Error::UpstreamTimeout => "upstream_timeout",
            Error::Upstream(_) => "upstream_error",
            Error::InvalidPhoneCode => "invalid_phone_code",
            Error::SessionKeyExpired => "session_key_expired",
            Error::AccessTokenStale(_) | Error::CredentialsRejected { .. } => "upstream_error",
            Error::InvalidSession => "invalid_session",
            Error::DecryptFailed => "decrypt_failed",
            Error::WatermarkMismatch => "watermark_mismatch",
            Error::OpenidMismatch => "openid_mismatch",
            Error::SignatureMismatch => "signature_mismatch",
            Error::UnionidConflict => "unionid_conflict",
            Error::Unavailable(_) => "unavailable",
            Error::Config(_) | Error::Storage(_) => "internal",
        }
    }
}

impl Error {
    /// For [`Error::CredentialsRejected`], a sentence naming what to fix in the WeChat console.
    pub fn credentials_fix(&self, appid: &str) -> Option<String> {
        let Error::CredentialsRejected { errcode, errmsg } = self else {
            return None;
        };
        Some(match errcode {
            40013 => format!(
                "WeChat does not know the appid {appid:?} (errcode 40013: {errmsg}): set \
                 WECHAT_APPID to the AppID shown in the mini program console under \
                 Development > Development settings"
            ),
            40164 | 61004 => format!(
                "WeChat refused this server's IP address (errcode {errcode}: {errmsg}): add the \
                 server's public egress IP to the IP whitelist in the mini program console \
                 (Development > Development settings > IP whitelist)"
            ),
            _ => format!(
                "WeChat rejected the AppSecret of appid {appid:?} (errcode {errcode}: {errmsg}): \
                 set WECHAT_SECRET to the current AppSecret from the mini program console \
                 (Development > Development settings; it changes when someone resets it)"
            ),
        })
    }
}

impl From<sled::Error> for Error {
    fn from(err: sled::Error) -> Self {
        Error::Storage(err.to_string())
    }
}
