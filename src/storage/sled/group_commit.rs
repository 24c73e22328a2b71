//! Group commit: many writers that need their writes on disk share one flush of the data dir.
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

use super::DataDir;
use crate::storage::Pending;
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
    /// Starts the flushing task for `data`. It ends when the last handle is dropped.
    pub fn start(data: DataDir, metrics: Arc<Metrics>) -> GroupCommit {
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
                        if let Err(e) = flush_sessions(&data).await {
                            tracing::error!(error = %e, "writing the session log failed");
                        }
                        continue;
                    }
                };
                if received == 0 {
                    break;
                }
                let timer = metrics.flush_seconds.start_timer();
                let result = flush(&data).await;
                timer.observe_duration();
                if let Err(e) = &result {
                    tracing::error!(error = %e, "flushing the database failed");
                }
                for waiter in batch.drain(..) {
                    let _ = waiter.send(result.clone());
                }
            }
            drop(data);
            let _ = ended_tx.send(true);
        });
        GroupCommit { waiters: tx, ended }
    }

    /// Turns `true` once the flushing task has ended, which it does when every handle is gone:
    /// from then on it no longer holds the database open.
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.ended.clone()
    }

    /// `outcome` once every write made before this call is on disk, or its error at once: an
    /// actor hands the wait to a task of its own and goes on with its next message.
    pub fn after<T: Send + 'static>(&self, outcome: Result<T, Error>) -> Pending<T> {
        match outcome {
            Ok(value) => {
                let commit = self.clone();
                Pending::Later(Box::pin(
                    async move { commit.durable().await.map(|()| value) },
                ))
            }
            Err(e) => Pending::Ready(Err(e)),
        }
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

/// The users and the session log flushed side by side: one disk wait for both.
async fn flush(data: &DataDir) -> Result<(), Error> {
    #[cfg(feature = "fault-injection")]
    if data.injected_flush_failure() {
        return Err(Error::Storage("injected flush failure".into()));
    }
    let (sessions, users) = tokio::join!(flush_sessions(data), data.flush_users());
    sessions?;
    users
}

/// The session log flushed on tokio's blocking pool (its sync blocks).
async fn flush_sessions(data: &DataDir) -> Result<(), Error> {
    let log = data.session_log().clone();
    tokio::task::spawn_blocking(move || log.flush())
        .await
        .map_err(|e| Error::Storage(format!("writing the session log failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionRecord;
    use crate::storage::sled::session_log::FILE_NAME;

    #[tokio::test]
    async fn concurrent_waiters_share_flushes_and_see_their_writes_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path(), 8).unwrap();
        let metrics = Arc::new(Metrics::default());
        let commit = GroupCommit::start(data.clone(), metrics.clone());
        let mut tasks = Vec::new();
        const WRITERS: u8 = 200;
        for i in 0..WRITERS {
            let (data, commit) = (data.clone(), commit.clone());
            tasks.push(tokio::spawn(async move {
                data.users()
                    .upsert(None, &format!("o{i}"), "k", None, 1)
                    .unwrap();
                data.session_log()
                    .put(&[i; 32], &SessionRecord::sample(i.into(), None))
                    .unwrap();
                commit.durable().await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // The point of it: one flush answers many writers.
        let flushes = metrics.flush_seconds.get_sample_count();
        assert!(
            (1..u64::from(WRITERS) / 4).contains(&flushes),
            "{WRITERS} writers took {flushes} flushes"
        );
        // Nothing is left dirty: a flush now has nothing to write.
        assert_eq!(data.db.flush().unwrap(), 0);
        let log = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap();
        data.flush().unwrap();
        let after = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(log.len(), after.len());
        assert_eq!(data.session_log().replay().unwrap().len(), 200);
    }

    #[tokio::test]
    async fn the_session_log_is_written_without_anyone_asking() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path(), 8).unwrap();
        let _commit = GroupCommit::start(data.clone(), Arc::default());
        let log = dir.path().join(FILE_NAME);
        data.session_log()
            .put(&[1; 32], &SessionRecord::sample(1, None))
            .unwrap();
        let deadline = std::time::Instant::now() + SESSION_LOG_EVERY * 20;
        while std::fs::metadata(&log).unwrap().len() == 0 {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(SESSION_LOG_EVERY / 5).await;
        }
    }
}
