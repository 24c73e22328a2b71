//! Group commit: many writers that need their writes on disk share one flush of the store.
//!
//! A flush costs a disk sync whether it covers one write or a thousand. Writers enqueue a waiter
//! after writing; a background task takes every waiter queued so far, flushes once and answers all
//! of them. A waiter queued during a flush waits for the next one, so every answer covers the
//! write made before it was queued.
//!
//! The same task writes the session log every [`SESSION_LOG_EVERY`] when nobody asked, as sled
//! does its own log: a session issued with no durable write after it is at most that old when a
//! crash comes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::store::Store;
use crate::{Error, Metrics};

/// How often the session log is written when no flush was asked for (sled's own interval).
pub const SESSION_LOG_EVERY: Duration = Duration::from_millis(500);

/// A handle for waiting until earlier writes are on disk. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    waiters: mpsc::UnboundedSender<oneshot::Sender<Result<(), Error>>>,
    /// Turns `true` when the flushing task has ended (and let go of the database).
    ended: watch::Receiver<bool>,
}

impl GroupCommit {
    /// Starts the flushing task for `store`. It ends when the last handle is dropped.
    pub fn start(store: Store, metrics: Arc<Metrics>) -> GroupCommit {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), Error>>>();
        let (ended_tx, ended) = watch::channel(false);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut tick = tokio::time::interval(SESSION_LOG_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let received = tokio::select! {
                    received = rx.recv_many(&mut batch, usize::MAX) => received,
                    _ = tick.tick() => {
                        if let Err(e) = store.flush_sessions().await {
                            tracing::error!(error = %e, "writing the session log failed");
                        }
                        continue;
                    }
                };
                if received == 0 {
                    break;
                }
                let timer = metrics.flush_seconds.start_timer();
                let result = store.flush_async().await;
                timer.observe_duration();
                if let Err(e) = &result {
                    tracing::error!(error = %e, "flushing the database failed");
                }
                for waiter in batch.drain(..) {
                    let _ = waiter.send(result.clone());
                }
            }
            drop(store);
            let _ = ended_tx.send(true);
        });
        GroupCommit { waiters: tx, ended }
    }

    /// Turns `true` once the flushing task has ended, which it does when every handle is gone:
    /// from then on it no longer holds the database open.
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.ended.clone()
    }

    /// Calls `then` with the outcome once every write made before this call is on disk, without
    /// making the caller wait: an actor hands over its reply and goes on with its next message.
    pub fn then(&self, then: impl FnOnce(Result<(), Error>) + Send + 'static) {
        let commit = self.clone();
        tokio::spawn(async move { then(commit.durable().await) });
    }

    /// Returns once every write made before this call is on disk.
    pub async fn durable(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .send(tx)
            .map_err(|_| Error::Unavailable("the flusher has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the flusher has stopped".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_waiters_all_complete_and_see_their_writes_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let commit = GroupCommit::start(store.clone(), Arc::default());
        let mut tasks = Vec::new();
        for i in 0u8..200 {
            let (store, commit) = (store.clone(), commit.clone());
            tasks.push(tokio::spawn(async move {
                store.upsert_user(&format!("o{i}"), "k", None, 1).unwrap();
                store
                    .put_session(
                        &[i; 32],
                        &crate::store::SessionRecord::sample(i.into(), None),
                    )
                    .unwrap();
                commit.durable().await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // Nothing is left dirty: a flush now has nothing to write.
        assert_eq!(store.db().flush().unwrap(), 0);
        let log = std::fs::metadata(dir.path().join(crate::session_log::FILE_NAME)).unwrap();
        store.flush().unwrap();
        let after = std::fs::metadata(dir.path().join(crate::session_log::FILE_NAME)).unwrap();
        assert_eq!(log.len(), after.len());
        assert_eq!(store.sessions().unwrap().count(), 200);
    }

    #[tokio::test]
    async fn the_session_log_is_written_without_anyone_asking() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let _commit = GroupCommit::start(store.clone(), Arc::default());
        let log = dir.path().join(crate::session_log::FILE_NAME);
        store
            .put_session(&[1; 32], &crate::store::SessionRecord::sample(1, None))
            .unwrap();
        let deadline = std::time::Instant::now() + SESSION_LOG_EVERY * 20;
        while std::fs::metadata(&log).unwrap().len() == 0 {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(SESSION_LOG_EVERY / 5).await;
        }
    }
}
