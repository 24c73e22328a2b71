//! The revocation feed on one machine: the sled tree `revocations` (cursor as 16 big-endian
//! bytes -> [`Revocation`] as JSON), and in the `meta` tree the feed's origin and horizon.
//! Events are written where the session is revoked (by the SessionKeeper, in the same group
//! commit as the revocation, so a restarted broker still serves them), handed at once to the
//! feed's subscribers, and dropped once past their `until`.
//!
//! Cursors count in the system clock's milliseconds (only their order matters; a clock that
//! steps back only bumps the sequence), event times in the broker's [`crate::Clock`].

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use super::{decode, encode};
use crate::Error;
use crate::revocation::{Cursor, FeedEvent, Page, Revocation};

/// `meta` key of the feed's origin: the cursor (16 bytes) and time (8 bytes, unix seconds) of
/// its first use.
const ORIGIN: &[u8] = b"revocations_origin";
/// `meta` key of the newest dropped event's cursor.
const HORIZON: &[u8] = b"revocations_horizon";
/// Events a subscriber may fall behind by before it must reread the tree.
const SUBSCRIBER_LAG: usize = 1024;

/// The feed's trees and its subscribers.
pub struct SledRevocations {
    tree: ::sled::Tree,
    meta: ::sled::Tree,
    state: Mutex<State>,
    subscribers: broadcast::Sender<FeedEvent>,
}

/// What the feed knows of itself.
struct State {
    /// Seconds an event is kept; 0 while the feed is off (then nothing is recorded).
    keep: u64,
    /// The newest cursor issued.
    last: Cursor,
    origin: (Cursor, u64),
    horizon: Cursor,
}

impl SledRevocations {
    /// Opens the trees in `db`. The feed records nothing until [`SledRevocations::enable`].
    pub fn open(db: &::sled::Db) -> Result<SledRevocations, Error> {
        let tree = db.open_tree("revocations")?;
        let meta = db.open_tree("meta")?;
        let origin = match meta.get(ORIGIN)? {
            Some(bytes) if bytes.len() == 24 => (
                Cursor::from_bytes(&bytes[..16]).unwrap_or_default(),
                u64::from_be_bytes(bytes[16..].try_into().expect("8 bytes")),
            ),
            _ => (Cursor::START, 0),
        };
        let horizon = match meta.get(HORIZON)? {
            Some(bytes) => Cursor::from_bytes(&bytes).unwrap_or_default(),
            None => origin.0,
        };
        let newest = match tree.last()? {
            Some((key, _)) => Cursor::from_bytes(&key).unwrap_or_default(),
            None => Cursor::START,
        };
        Ok(SledRevocations {
            tree,
            meta,
            state: Mutex::new(State {
                keep: 0,
                last: newest.max(horizon).max(origin.0),
                origin,
                horizon: horizon.max(origin.0),
            }),
            subscribers: broadcast::channel(SUBSCRIBER_LAG).0,
        })
    }

    /// Turns recording on, keeping events `keep` seconds; the first time on this data dir, marks
    /// the feed's origin at `now`. Written to disk with the next flush.
    pub fn enable(&self, keep: u64, now: u64) -> Result<(), Error> {
        let mut state = self.lock();
        state.keep = keep;
        if state.origin.1 == 0 {
            let origin = state.last.next(wall_ms());
            let mut bytes = origin.to_bytes().to_vec();
            bytes.extend_from_slice(&now.to_be_bytes());
            self.meta.insert(ORIGIN, bytes)?;
            state.origin = (origin, now);
            state.last = origin;
            state.horizon = state.horizon.max(origin);
        }
        Ok(())
    }

    /// Records that session `sid` of user `uid` ended at `now`.
    pub fn session_ended(&self, uid: u64, sid: String, now: u64) -> Result<(), Error> {
        self.record(now, |keep| Revocation::session(uid, sid, now, keep))
    }

    /// Records that every session of user `uid` ended at `now`; `sids` were live.
    pub fn user_ended(&self, uid: u64, sids: Vec<String>, now: u64) -> Result<(), Error> {
        self.record(now, |keep| Revocation::user(uid, sids, now, keep))
    }

    fn record(&self, now: u64, revocation: impl FnOnce(u64) -> Revocation) -> Result<(), Error> {
        let event = {
            let mut state = self.lock();
            if state.keep == 0 {
                return Ok(());
            }
            let revocation = revocation(state.keep);
            let cursor = state.last.next(wall_ms());
            self.tree.insert(cursor.to_bytes(), encode(&revocation))?;
            state.last = cursor;
            self.drop_expired(&mut state, now)?;
            FeedEvent { cursor, revocation }
        };
        // Nobody listening is no failure.
        let _ = self.subscribers.send(event);
        Ok(())
    }

    /// Drops the oldest events whose `until` has passed, moving the horizon past them.
    fn drop_expired(&self, state: &mut State, now: u64) -> Result<(), Error> {
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            let expired = decode::<Revocation>(&value).map_or(true, |r| r.until < now);
            if !expired {
                break;
            }
            self.tree.remove(&key)?;
            if let Some(cursor) = Cursor::from_bytes(&key) {
                state.horizon = state.horizon.max(cursor);
            }
            self.meta.insert(HORIZON, &state.horizon.to_bytes())?;
        }
        Ok(())
    }

    /// Up to `limit` events after `after`, and what the feed knows of itself.
    pub fn read(&self, after: Cursor, limit: usize) -> Result<Page, Error> {
        let (last, horizon, origin) = {
            let state = self.lock();
            (state.last, state.horizon, state.origin)
        };
        let mut start = after.to_bytes().to_vec();
        // Just past `after`: its bytes with a zero byte appended sort right behind it.
        start.push(0);
        let mut events = Vec::new();
        for entry in self.tree.range(start..).take(limit) {
            let (key, value) = entry?;
            let Some(cursor) = Cursor::from_bytes(&key) else {
                continue;
            };
            match decode(&value) {
                Ok(revocation) => events.push(FeedEvent { cursor, revocation }),
                Err(e) => tracing::warn!(error = %e, %cursor, "skipping an unreadable revocation"),
            }
        }
        Ok(Page {
            events,
            last,
            horizon,
            origin,
        })
    }

    /// Every event recorded from now on (a receiver that falls too far behind is told so).
    pub fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.subscribers.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The system clock in unix milliseconds.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> (::sled::Db, SledRevocations) {
        let db = crate::storage::sled::open_in(dir.path());
        let feed = SledRevocations::open(&db).unwrap();
        (db, feed)
    }

    #[test]
    fn nothing_is_recorded_while_the_feed_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, feed) = open(&dir);
        feed.session_ended(1, "a".into(), 100).unwrap();
        let page = feed.read(Cursor::START, 10).unwrap();
        assert!(page.events.is_empty());
        assert_eq!(page.origin.1, 0);
    }

    #[test]
    fn events_are_kept_in_order_across_a_reopen_and_read_after_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (origin, cursors) = {
            let (db, feed) = open(&dir);
            feed.enable(360, 100).unwrap();
            let mut live = feed.subscribe();
            feed.session_ended(1, "a".into(), 100).unwrap();
            feed.user_ended(2, vec!["b".into()], 101).unwrap();
            feed.session_ended(3, "c".into(), 102).unwrap();
            let first = live.try_recv().unwrap();
            assert_eq!(
                first.revocation,
                Revocation::session(1, "a".into(), 100, 360)
            );
            let page = feed.read(Cursor::START, 10).unwrap();
            assert_eq!(page.events.len(), 3);
            assert_eq!(page.events[0], first);
            db.flush().unwrap();
            let cursors: Vec<_> = page.events.iter().map(|e| e.cursor).collect();
            assert!(cursors.windows(2).all(|w| w[0] < w[1]));
            assert!(page.origin.0 < cursors[0] && page.horizon == page.origin.0);
            assert_eq!(page.last, cursors[2]);
            (page.origin, cursors)
        };
        let (_db, feed) = open(&dir);
        feed.enable(360, 500).unwrap();
        let page = feed.read(cursors[0], 10).unwrap();
        assert_eq!(page.origin, origin, "the origin is kept");
        let after: Vec<_> = page.events.iter().map(|e| e.cursor).collect();
        assert_eq!(after, cursors[1..]);
        assert_eq!(page.events[0].revocation.not_before, Some(101));
        assert_eq!(feed.read(cursors[0], 1).unwrap().events.len(), 1);
        // A new event comes after those of before the restart.
        feed.session_ended(4, "d".into(), 501).unwrap();
        assert!(feed.read(Cursor::START, 10).unwrap().last > cursors[2]);
    }

    #[test]
    fn events_past_their_until_are_dropped_and_move_the_horizon() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, feed) = open(&dir);
        feed.enable(360, 100).unwrap();
        feed.session_ended(1, "a".into(), 100).unwrap();
        feed.session_ended(2, "b".into(), 200).unwrap();
        let before = feed.read(Cursor::START, 10).unwrap();
        // The first is kept until 460: an event at 461 drops it, not the second (until 560).
        feed.session_ended(3, "c".into(), 461).unwrap();
        let page = feed.read(Cursor::START, 10).unwrap();
        let sids: Vec<_> = page
            .events
            .iter()
            .map(|e| e.revocation.sid.clone().unwrap())
            .collect();
        assert_eq!(sids, ["b", "c"]);
        assert_eq!(page.horizon, before.events[0].cursor);
    }
}
