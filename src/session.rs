//! The domain's words for sessions: what a session is, how long it lives, what a caller learns of
//! it. Both stores and the SessionKeeper speak them; they depend on nothing of ours.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Live sessions one user may hold; a login beyond it ends the user's oldest session. It bounds
/// the per-user index (and what one account logging in in a loop can cost).
pub const MAX_SESSIONS_PER_USER: usize = 64;

/// A freshly issued session token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The token for the client (the "3rd session"); only its hash is kept.
    pub token: String,
    /// Seconds the token stays valid if it is not used.
    pub expires_in: u64,
}

/// Who a valid session token belongs to. Its JSON form (camelCase) is the `/v1/session` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// The user's stable id.
    pub uid: u64,
    /// The mini program the session was opened through (shared, not copied, per check).
    pub appid: Arc<str>,
    /// The user's openid.
    pub openid: String,
    /// The user's unionid, if known.
    pub unionid: Option<String>,
    /// Unix seconds at which the session expires unless used again.
    pub expires_at: u64,
}

/// A session as the admin sees it: its id is the token's hash, never the token. Its JSON form
/// (camelCase) is an entry of the admin's session list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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

/// A live session as stored, keyed by the hash of its token (never the token).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// The user the session belongs to.
    pub uid: u64,
    /// The mini program the session was opened through; `None`: the default app (a record
    /// written before several apps has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appid: Option<Arc<str>>,
    /// Copied from the user so that a check needs no second lookup.
    pub openid: String,
    /// Copied from the user at login.
    pub unionid: Option<String>,
    /// Unix seconds of the login that issued the token.
    pub created_at: u64,
    /// Unix seconds of the last use that was persisted (uses in between slide it in memory only).
    pub last_seen: u64,
    /// Unix seconds after which the token is dead whatever its use (the absolute TTL).
    pub expires_at: u64,
}

#[cfg(test)]
impl SessionRecord {
    /// A session of user `uid` (openid `o{uid}`), for the storage tests.
    pub(crate) fn sample(uid: u64, unionid: Option<&str>) -> SessionRecord {
        SessionRecord {
            uid,
            appid: None,
            openid: format!("o{uid}"),
            unionid: unionid.map(str::to_owned),
            created_at: 10,
            last_seen: 20,
            expires_at: 30,
        }
    }
}

/// How long sessions live, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Without use.
    pub idle_ttl: u64,
    /// At most, whatever the use.
    pub max_ttl: u64,
}

impl SessionPolicy {
    /// The record of a session issued at `now`.
    pub fn fresh_record(
        &self,
        uid: u64,
        appid: Option<Arc<str>>,
        openid: String,
        unionid: Option<String>,
        now: u64,
    ) -> SessionRecord {
        SessionRecord {
            uid,
            appid,
            openid,
            unionid,
            created_at: now,
            last_seen: now,
            expires_at: now.saturating_add(self.max_ttl),
        }
    }

    /// What a login tells the client about its token's lifetime.
    pub fn expires_in(&self) -> u64 {
        self.idle_ttl.min(self.max_ttl)
    }

    /// When a session used last at `last_seen` and dead at `expires_at` whatever its use dies.
    pub fn deadline(&self, last_seen: u64, expires_at: u64) -> u64 {
        last_seen.saturating_add(self.idle_ttl).min(expires_at)
    }

    /// How far the last use must move before it is written (a tenth of the idle TTL): a check
    /// does not write on every call.
    pub fn write_back_step(&self) -> u64 {
        (self.idle_ttl / 10).max(1)
    }
}
