//! Group commit: many writers that need their writes on disk share one sled flush.
//!
//! A flush costs a disk sync whether it covers one write or a thousand. Writers enqueue a waiter
//! after writing; a background task takes every waiter queued so far, flushes once and answers all
//! of them. A waiter queued during a flush waits for the next one, so every answer covers the
//! write made before it was queued.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::{Error, Metrics};

/// A handle for waiting until earlier writes are on disk. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    waiters: mpsc::UnboundedSender<oneshot::Sender<Result<(), Error>>>,
    /// Turns `true` when the flushing task has ended (and let go of the database).
    ended: watch::Receiver<bool>,
}

impl GroupCommit {
    /// Starts the flushing task for `db`. It ends when the last handle is dropped.
    pub fn start(db: sled::Db, metrics: Arc<Metrics>) -> GroupCommit {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), Error>>>();
        let (ended_tx, ended) = watch::channel(false);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, usize::MAX).await > 0 {
                let timer = metrics.flush_seconds.start_timer();
                let result = db.flush_async().await.map(drop).map_err(Error::from);
                timer.observe_duration();
                if let Err(e) = &result {
                    tracing::error!(error = %e, "flushing the database failed");
                }
                for waiter in batch.drain(..) {
                    let _ = waiter.send(result.clone());
                }
            }
            drop(db);
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
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let commit = GroupCommit::start(db.clone(), Arc::default());
        let mut tasks = Vec::new();
        for i in 0u32..200 {
            let (db, commit) = (db.clone(), commit.clone());
            tasks.push(tokio::spawn(async move {
                db.insert(i.to_be_bytes(), b"v").unwrap();
                commit.durable().await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // Nothing is left dirty: a flush now has nothing to write.
        assert_eq!(db.flush().unwrap(), 0);
    }
}
