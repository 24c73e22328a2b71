//! The domain's words for the revocation feed: what a revocation says ([`Revocation`]), where it
//! sits in the feed ([`Cursor`]), and what a verifier resuming from a cursor is sent first
//! ([`plan`]). Depends on nothing of ours.
//!
//! Every logout, admin revocation and revoke-all becomes an event, kept until `until`: its time,
//! plus the access tokens' lifetime, plus a slack. After that, every token it concerns has
//! expired, so forgetting it is safe. A verifier that resumes from a cursor the feed never issued
//! (a store that lost its history, a data dir restored from a backup), or from before the feed's
//! origin while tokens from before it may still be valid, is told to reset: to refuse every token
//! issued before a time, since the feed cannot vouch for what was revoked before it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A position in the feed: milliseconds and a sequence number, as in a Redis stream id
/// (`1790000000123-0`). Increasing in the order events were recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// Unix milliseconds (of the machine that recorded it; only the order matters).
    pub ms: u64,
    /// Order among events of the same millisecond.
    pub seq: u64,
}

impl Cursor {
    /// Before every event.
    pub const START: Cursor = Cursor { ms: 0, seq: 0 };

    /// The cursor that follows `self` for an event recorded at `ms`.
    pub fn next(self, ms: u64) -> Cursor {
        if ms > self.ms {
            Cursor { ms, seq: 0 }
        } else {
            Cursor {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }

    /// Big-endian bytes, which sort as cursors do (sled's keys).
    pub fn to_bytes(self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.ms.to_be_bytes());
        bytes[8..].copy_from_slice(&self.seq.to_be_bytes());
        bytes
    }

    /// The cursor of [`Cursor::to_bytes`]'s output.
    pub fn from_bytes(bytes: &[u8]) -> Option<Cursor> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(Cursor {
            ms: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            seq: u64::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for Cursor {
    type Err = String;

    /// `ms-seq`, or `ms` alone (sequence 0).
    fn from_str(text: &str) -> Result<Cursor, String> {
        let bad = || format!("{text:?} is not a feed cursor (`ms-seq`)");
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Ok(Cursor {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// What was revoked: one session (`sid`), or every session of a user (`notBefore`, with the ids
/// of the sessions that were live). Its JSON form (camelCase) is a feed event's data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// The user.
    pub uid: u64,
    /// The one session ended (a logout or an admin revocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// Every session of the user ended: tokens issued before this time (unix seconds) are
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    /// With `notBefore`: the sessions that were live, refused whatever their tokens' `iat` (a
    /// token issued in the same second as the revocation tells nothing by its time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sids: Vec<String>,
    /// Unix seconds of the revocation.
    pub at: u64,
    /// Unix seconds after which every token it concerns has expired: a verifier may forget it.
    pub until: u64,
}

impl Revocation {
    /// A session ended at `now`, remembered for `keep` seconds.
    pub fn session(uid: u64, sid: String, now: u64, keep: u64) -> Revocation {
        Revocation {
            uid,
            sid: Some(sid),
            not_before: None,
            sids: Vec::new(),
            at: now,
            until: now + keep,
        }
    }

    /// Every session of a user ended at `now` (`sids` were live), remembered for `keep` seconds.
    pub fn user(uid: u64, sids: Vec<String>, now: u64, keep: u64) -> Revocation {
        Revocation {
            uid,
            sid: None,
            not_before: Some(now),
            sids,
            at: now,
            until: now + keep,
        }
    }
}

/// A revocation at its place in the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEvent {
    /// Where it is.
    pub cursor: Cursor,
    /// What it says.
    pub revocation: Revocation,
}

/// One read of the stored feed: the events after a cursor, and what the feed knows of itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Events after the cursor asked for, oldest first, up to the limit asked for.
    pub events: Vec<FeedEvent>,
    /// The newest cursor the feed has issued (or its origin, or its horizon, whichever is newer).
    pub last: Cursor,
    /// Events at or before this cursor may have been dropped: the newest dropped one, or the
    /// feed's origin when none was.
    pub horizon: Cursor,
    /// Where the feed began (its first use on this store), and when (unix seconds).
    pub origin: (Cursor, u64),
}

/// Where a verifier resuming from a cursor starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Nothing after the cursor was lost: replay from it.
    From(Cursor),
    /// Events after the cursor may be lost: the verifier must refuse every token issued before
    /// `not_before`, then goes on from `from`.
    Reset {
        /// Unix seconds: tokens with an earlier `iat` are refused.
        not_before: u64,
        /// The cursor replay resumes from (sent as the reset's id).
        from: Cursor,
    },
}

/// Where a verifier resuming from `since` starts, given what the feed knows of itself (`page`)
/// at `now`, when access tokens live `ttl` seconds.
///
/// - A cursor past the newest issued: the feed lost its history (or is another one). Nothing can
///   be vouched for: tokens issued before now are refused.
/// - A cursor from before the feed's origin (a verifier's first connection, or one from before
///   the store lost its data): tokens issued before the origin are refused, as long as some may
///   still be valid (the origin is less than a lifetime ago).
/// - Otherwise, replay from the cursor. Events after it may have been dropped, but only once
///   their `until` had passed, which is a lifetime and a minute after the revocation: every
///   token they concerned has expired, and refusing it again would change nothing.
pub fn plan(since: Cursor, page: &Page, now: u64, ttl: u64) -> Start {
    if since > page.last {
        return Start::Reset {
            not_before: now,
            from: page.last,
        };
    }
    let (origin, origin_at) = page.origin;
    if since < origin && origin_at > now.saturating_sub(ttl) {
        return Start::Reset {
            not_before: origin_at,
            from: origin,
        };
    }
    Start::From(since)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ms: u64) -> Cursor {
        Cursor { ms, seq: 0 }
    }

    #[test]
    fn cursors_read_and_write_as_stream_ids_and_sort_as_bytes() {
        let cursor: Cursor = "1790000000123-4".parse().unwrap();
        assert_eq!(
            cursor,
            Cursor {
                ms: 1_790_000_000_123,
                seq: 4
            }
        );
        assert_eq!(cursor.to_string(), "1790000000123-4");
        assert_eq!("17".parse::<Cursor>(), Ok(c(17)));
        assert!("x-1".parse::<Cursor>().is_err() && "1-".parse::<Cursor>().is_err());
        let next = cursor.next(cursor.ms);
        assert_eq!(
            next,
            Cursor {
                ms: cursor.ms,
                seq: 5
            }
        );
        assert_eq!(
            cursor.next(cursor.ms - 5),
            next,
            "a clock that stepped back"
        );
        assert_eq!(cursor.next(cursor.ms + 1), c(cursor.ms + 1));
        assert!(next.to_bytes() > cursor.to_bytes() && c(256).to_bytes() > c(255).to_bytes());
        assert_eq!(Cursor::from_bytes(&next.to_bytes()), Some(next));
    }

    #[test]
    fn a_revocation_reads_as_camel_case_json() {
        let user = Revocation::user(7, vec!["ab".into()], 100, 360);
        let json = serde_json::to_value(&user).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"uid": 7, "notBefore": 100, "sids": ["ab"], "at": 100, "until": 460})
        );
        let session = Revocation::session(7, "cd".into(), 100, 360);
        let json = serde_json::to_string(&session).unwrap();
        assert_eq!(json, r#"{"uid":7,"sid":"cd","at":100,"until":460}"#);
        assert_eq!(serde_json::from_str::<Revocation>(&json).unwrap(), session);
    }

    #[test]
    fn a_verifier_resumes_or_is_told_to_reset() {
        let page = Page {
            events: Vec::new(),
            last: c(500),
            horizon: c(300),
            origin: (c(100), 10),
        };
        let (now, ttl) = (1000, 300);
        assert_eq!(plan(c(300), &page, now, ttl), Start::From(c(300)));
        assert_eq!(plan(c(500), &page, now, ttl), Start::From(c(500)));
        // Past the newest: history lost.
        assert_eq!(
            plan(c(501), &page, now, ttl),
            Start::Reset {
                not_before: 1000,
                from: c(500)
            }
        );
        // Behind the horizon: what was dropped concerned expired tokens only.
        assert_eq!(plan(c(200), &page, now, ttl), Start::From(c(200)));
        // From before an origin long ago: likewise.
        assert_eq!(
            plan(Cursor::START, &page, now, ttl),
            Start::From(Cursor::START)
        );
        // From before an origin less than a lifetime ago: tokens issued before it are refused.
        let young = Page {
            origin: (c(100), 900),
            horizon: c(100),
            ..page
        };
        assert_eq!(
            plan(Cursor::START, &young, now, ttl),
            Start::Reset {
                not_before: 900,
                from: c(100)
            }
        );
        assert_eq!(plan(c(100), &young, now, ttl), Start::From(c(100)));
    }
}
