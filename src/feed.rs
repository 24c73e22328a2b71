//! The revocation feed as a broker serves it to one verifier: a reset if events it may not have
//! seen are gone, the stored events after its cursor, `Synced`, then every event as it is
//! recorded (on any broker of a shared store), until the verifier leaves or the broker drains.
//!
//! Each verifier gets a task of its own that writes into a bounded channel, which the HTTP
//! answer reads: a slow verifier holds up only itself, and its task ends when it goes away.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc, watch};

use crate::revocation::{Cursor, FeedEvent, Start, plan};
use crate::storage::Feed;
use crate::{Clock, Error};

/// Events read from the store at once.
const PAGE: usize = 500;
/// Items queued for a verifier that reads slowly.
const QUEUE: usize = 256;

/// What a verifier is sent, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedItem {
    /// The feed cannot vouch for what was revoked before `not_before` (unix seconds): refuse
    /// every token issued before it. Replay goes on after `cursor`.
    Reset {
        /// Tokens with an earlier `iat` are to be refused.
        not_before: u64,
        /// Where the feed goes on.
        cursor: Cursor,
    },
    /// A revocation.
    Revoked(FeedEvent),
    /// Every event stored when the verifier came has been sent; live events follow.
    Synced,
}

/// The items for one verifier, as a stream. Ends when the broker drains or the feed fails (the
/// verifier resumes from its last cursor).
pub struct FeedStream {
    items: mpsc::Receiver<FeedItem>,
}

impl Stream for FeedStream {
    type Item = FeedItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FeedItem>> {
        self.items.poll_recv(cx)
    }
}

/// What serving a feed needs of the broker.
pub(crate) struct Source {
    /// The stored feed.
    pub feed: Feed,
    /// Seconds an access token lives (for [`plan`]).
    pub ttl: u64,
    /// The broker's clock.
    pub clock: Clock,
    /// Turns `true` when the broker drains: every feed ends.
    pub draining: watch::Receiver<bool>,
    /// `wxbroker_revocation_feeds_open`, counting this feed while it is served.
    pub open: prometheus::IntGauge,
}

/// The feed for a verifier resuming after `since`.
pub(crate) fn serve(source: Source, since: Cursor) -> FeedStream {
    let (tx, items) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        source.open.inc();
        let mut draining = source.draining.clone();
        tokio::select! {
            outcome = run(&source, since, &tx) => {
                if let Err(Failed::Store(e)) = outcome {
                    tracing::warn!(error = %e, "a revocation feed ended: the store failed");
                }
            }
            _ = draining.wait_for(|draining| *draining) => {}
        }
        source.open.dec();
    });
    FeedStream { items }
}

/// Why a feed ended.
enum Failed {
    /// The verifier went away.
    Gone,
    /// The store failed; the verifier will resume.
    Store(Error),
}

impl From<Error> for Failed {
    fn from(e: Error) -> Failed {
        Failed::Store(e)
    }
}

async fn run(source: &Source, since: Cursor, tx: &mpsc::Sender<FeedItem>) -> Result<(), Failed> {
    let send = |item| async move { tx.send(item).await.map_err(|_| Failed::Gone) };
    let feed = &source.feed;
    // Subscribed before the first read: every event recorded from here on reaches `live`.
    let mut live = feed.subscribe().await?;
    let page = feed.read(since, PAGE, source.clock.now()).wait().await?;
    let mut sent = match plan(since, &page, source.clock.now(), source.ttl) {
        Start::From(cursor) => {
            let full = page.events.len() == PAGE;
            let mut sent = cursor;
            for event in page.events {
                sent = event.cursor;
                send(FeedItem::Revoked(event)).await?;
            }
            if full {
                sent = catch_up(source, sent, tx).await?;
            }
            sent
        }
        Start::Reset { not_before, from } => {
            tracing::info!(%since, %from, not_before, "a verifier resumes past the feed's history: reset");
            send(FeedItem::Reset {
                not_before,
                cursor: from,
            })
            .await?;
            catch_up(source, from, tx).await?
        }
    };
    send(FeedItem::Synced).await?;
    loop {
        let received = tokio::select! {
            received = live.recv() => received,
            () = tx.closed() => return Err(Failed::Gone),
        };
        match received {
            Ok(event) if event.cursor > sent => {
                sent = event.cursor;
                send(FeedItem::Revoked(event)).await?;
            }
            Ok(_) => {}
            // Fell behind the live events: the store has them all.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                sent = catch_up(source, sent, tx).await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// Sends every stored event after `after`; returns the last one sent (or `after`).
async fn catch_up(
    source: &Source,
    mut after: Cursor,
    tx: &mpsc::Sender<FeedItem>,
) -> Result<Cursor, Failed> {
    loop {
        let page = source
            .feed
            .read(after, PAGE, source.clock.now())
            .wait()
            .await?;
        let full = page.events.len() == PAGE;
        for event in page.events {
            after = event.cursor;
            tx.send(FeedItem::Revoked(event))
                .await
                .map_err(|_| Failed::Gone)?;
        }
        if !full {
            return Ok(after);
        }
    }
}
