//! The revocation feed in Redis, shared by every broker: the stream `revocations`, appended by
//! the revocation scripts themselves (so an event is written with its revocation, atomically),
//! with `revocations:origin` and `revocations:horizon` beside it (see `revocation_feed.lua`).
//!
//! Each broker follows the stream with one blocking `XREAD` on a connection of its own (a
//! blocking command would hold up every other command on the shared multiplexed one), started
//! when its first subscriber arrives, and hands each event to its subscribers: an event recorded
//! on any broker reaches the feed of every broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{PREFIX, Redis, storage};
use crate::revocation::{Cursor, FeedEvent, Page, Revocation};
use crate::storage::Pending;
use crate::{Clock, Error};

/// ARGV: after, limit, now. Returns {origin, horizon or '', newest id or '', events}.
static FEED_PAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("revocation_feed.lua"),
        include_str!("feed_page.lua")
    ))
});

/// How long one `XREAD` blocks; the follower's connection waits a little longer for its answer.
const BLOCK: Duration = Duration::from_secs(5);
/// Events a subscriber may fall behind by before it must reread the stream.
const SUBSCRIBER_LAG: usize = 1024;
/// The longest wait between two tries of a follower that cannot reach Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// An event as a script or `XREAD` returns it: its id and its fields.
type Entry = (String, HashMap<String, String>);

/// What `XREAD` returns: per stream (one here), its name and its new entries; nil on a timeout.
type Streams = Option<Vec<(String, Vec<Entry>)>>;

/// A broker's view of the feed: reads, and its one follower of the stream. Cheap to clone.
#[derive(Clone)]
pub struct RedisFeed {
    redis: Redis,
    /// For the time of the feed's origin.
    clock: Clock,
    follower: Arc<Follower>,
}

/// The follower task (when some subscriber is there) and the subscribers.
struct Follower {
    subscribers: broadcast::Sender<FeedEvent>,
    /// Held while a subscriber starts the task, so that two never start one each.
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Set when the broker stops: no follower starts again.
    closed: AtomicBool,
}

impl RedisFeed {
    /// The feed of `redis`; the time of its origin (should this be its first use) from `clock`.
    pub fn new(redis: Redis, clock: Clock) -> RedisFeed {
        RedisFeed {
            redis,
            clock,
            follower: Arc::new(Follower {
                subscribers: broadcast::channel(SUBSCRIBER_LAG).0,
                task: tokio::sync::Mutex::new(None),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Up to `limit` events after `after`, and what the feed knows of itself; marks the feed's
    /// origin at `now` if it has none yet.
    pub fn read(&self, after: Cursor, limit: usize, now: u64) -> Pending<Page> {
        let args = vec![after.to_string(), limit.to_string(), now.to_string()];
        self.redis.run(
            &FEED_PAGE,
            args,
            |(origin, horizon, last, entries): (String, String, String, Vec<Entry>)| {
                page(&origin, &horizon, &last, entries)
            },
        )
    }

    /// Every event recorded from now on, by any broker. Starts the follower if none runs, from
    /// the newest event as of this call: whatever the caller reads afterwards, the events
    /// recorded since reach it.
    pub async fn subscribe(&self) -> Result<broadcast::Receiver<FeedEvent>, Error> {
        let receiver = self.follower.subscribers.subscribe();
        let mut task = self.follower.task.lock().await;
        let running = task.as_ref().is_some_and(|task| !task.is_finished());
        if !running {
            if self.follower.closed.load(Ordering::Relaxed) {
                return Err(Error::Unavailable("the broker is shutting down".into()));
            }
            let from = self
                .read(Cursor::START, 0, self.clock.now())
                .wait()
                .await?
                .last;
            let follower = follow(self.clone(), self.follower.subscribers.clone(), from);
            *task = Some(tokio::spawn(follower));
        }
        Ok(receiver)
    }

    /// Stops the follower for good (at broker shutdown).
    pub fn close(&self) {
        self.follower.closed.store(true, Ordering::Relaxed);
        if let Ok(task) = self.follower.task.try_lock()
            && let Some(task) = task.as_ref()
        {
            task.abort();
        }
    }
}

/// Reads the stream from after `last` on and hands every event to `subscribers`, until nobody
/// subscribes any more; retries (with backoff) while Redis is unreachable.
async fn follow(feed: RedisFeed, subscribers: broadcast::Sender<FeedEvent>, mut last: Cursor) {
    let mut backoff = Backoff::default();
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(3)))
        .set_number_of_retries(2);
    let client = feed.redis.client.clone();
    let mut con = loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(con) => break con,
            Err(e) => backoff.wait(&storage(e)).await,
        }
    };
    while subscribers.receiver_count() > 0 {
        let read: Result<Streams, _> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("COUNT")
            .arg(256)
            .arg("STREAMS")
            .arg(format!("{PREFIX}revocations"))
            .arg(last.to_string())
            .query_async(&mut con)
            .await;
        match read {
            Ok(streams) => {
                backoff = Backoff::default();
                for (id, fields) in streams.into_iter().flatten().flat_map(|(_, e)| e) {
                    match event(&id, fields) {
                        Ok(event) => {
                            last = last.max(event.cursor);
                            let _ = subscribers.send(event);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, id, "skipping an unreadable revocation")
                        }
                    }
                }
            }
            Err(e) => backoff.wait(&storage(e)).await,
        }
    }
}

/// The follower's wait between failed tries: doubling from 50 ms up to [`MAX_BACKOFF`].
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(Duration::from_millis(50))
    }
}

impl Backoff {
    async fn wait(&mut self, error: &Error) {
        tracing::warn!(%error, "the revocation feed cannot read Redis; retrying");
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }
}

/// A page from what `feed_page.lua` returned.
fn page(origin: &str, horizon: &str, last: &str, entries: Vec<Entry>) -> Result<Page, Error> {
    let bad =
        |what: &str| Error::Storage(format!("Redis: the revocation feed's {what} is corrupt"));
    let (origin_id, origin_at) = origin.split_once(' ').ok_or_else(|| bad("origin"))?;
    let origin = (
        origin_id.parse::<Cursor>().map_err(|_| bad("origin"))?,
        origin_at.parse::<u64>().map_err(|_| bad("origin"))?,
    );
    let cursor = |id: &str| -> Result<Cursor, Error> {
        if id.is_empty() {
            Ok(Cursor::START)
        } else {
            id.parse().map_err(|_| bad("id"))
        }
    };
    let horizon = cursor(horizon)?.max(origin.0);
    let events = entries
        .into_iter()
        .filter_map(|(id, fields)| match event(&id, fields) {
            Ok(event) => Some(event),
            Err(e) => {
                tracing::warn!(error = %e, id, "skipping an unreadable revocation");
                None
            }
        })
        .collect();
    Ok(Page {
        events,
        last: cursor(last)?.max(horizon),
        horizon,
        origin,
    })
}

/// An event from a stream entry's fields: `uid`, `at`, `until`, and `sid` or `nbf` with `sids`.
fn event(id: &str, mut fields: HashMap<String, String>) -> Result<FeedEvent, Error> {
    let bad = || Error::Storage(format!("Redis: the revocation {id} is corrupt"));
    let number = |name: &str| -> Result<u64, Error> {
        fields
            .get(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)
    };
    let (uid, at, until) = (number("uid")?, number("at")?, number("until")?);
    let not_before = number("nbf").ok();
    let sids = fields
        .remove("sids")
        .map(|sids| {
            sids.split(',')
                .filter(|sid| !sid.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(FeedEvent {
        cursor: id.parse().map_err(|_| bad())?,
        revocation: Revocation {
            uid,
            sid: fields.remove("sid"),
            not_before,
            sids,
            at,
            until,
        },
    })
}
