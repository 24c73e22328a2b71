//! Sessions on one machine: a table in memory (rebuilt from the session log at start), so a check
//! costs a hash lookup and no disk access. Sliding expiry is tracked in memory too and written back only
//! when the last use moved by a tenth of the idle TTL: a check does not write on every call, and a
//! crash can at worst make a session expire that tenth earlier.
//!
//! The table is shared ([`SessionTable`]): the SessionKeeper makes every change under its write
//! lock, and a check that needs no change (the session is live and its last use moves less than
//! the write-back step) reads it directly, without a trip through the keeper's mailbox.
//!
//! It is split into [`SHARDS`] maps by the first two bytes of the token's hash, so that nothing
//! the keeper does holds all of it at once: a map that doubles moves at most a 46th of the
//! sessions, and the sweep visits one shard per message, letting logins in between. The shards'
//! shares differ (see [`shard_ends`]), so that a growing table doubles them one at a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::DataDir;
use super::group_commit::GroupCommit;
use super::session_log::SessionLog;
use crate::crypto::{TokenHash, TokenMap, session_id, token_hash};
use crate::session::{
    Issued, MAX_SESSIONS_PER_USER, SessionInfo, SessionPolicy, SessionRecord, SessionSummary,
};
use crate::storage::Pending;
use crate::{Error, Metrics};

/// The live sessions and the handles needed to persist them.
pub struct SledSessions {
    data: DataDir,
    commit: GroupCommit,
    metrics: Arc<Metrics>,
    table: Arc<SessionTable>,
    /// uid -> the hashes of that user's sessions, oldest first, to update or end them all at once
    /// and to find the one the cap evicts without looking each up.
    by_uid: HashMap<u64, Vec<TokenHash>>,
    /// The shard the sweep visits next.
    sweep_at: usize,
}

/// Shards of the table; the sweep visits one per message (a quarter to half a millisecond with
/// a million sessions).
pub const SHARDS: usize = 64;

/// One shard: the sessions whose hash falls in its share (see [`shard_ends`]).
type Shard = TokenMap<Live>;

/// Where the share of each shard ends among the first two bytes of a hash, read as a number
/// below 2^16: shard `i`'s share is proportional to 2^(i/SHARDS). With equal shares every shard
/// would double at the same moment as the table grows, 64 maps moving at once (a stall of 180
/// ms at 460,000 sessions, measured); with shares spread over a factor of two, one shard
/// doubles per 1.1% of growth.
fn shard_ends() -> [u32; SHARDS] {
    let weight = |i: usize| (i as f64 / SHARDS as f64).exp2();
    let total: f64 = (0..SHARDS).map(weight).sum();
    let mut ends = [0; SHARDS];
    let mut sum = 0.0;
    for (i, end) in ends.iter_mut().enumerate() {
        sum += weight(i);
        *end = (sum / total * 65536.0).round() as u32;
    }
    ends[SHARDS - 1] = 65536;
    ends
}

/// The shard of `hash` among those ending at `ends`.
fn shard_of(ends: &[u32; SHARDS], hash: &TokenHash) -> usize {
    let at = u32::from(u16::from_be_bytes([hash[0], hash[1]]));
    ends.partition_point(|&end| end <= at)
}

/// The session table as checks read it.
pub struct SessionTable {
    policy: SessionPolicy,
    /// The appid of sessions whose record names none (the default app's).
    default_app: Arc<str>,
    shards: Vec<RwLock<Shard>>,
    /// Where each shard's share ends ([`shard_ends`]). Kept here rather than in a lazy static,
    /// whose readiness check every lookup would pay (a check took 327 ns against 321 in
    /// `cargo bench --bench session -- check`).
    ends: [u32; SHARDS],
    /// Sessions in all shards.
    len: AtomicUsize,
}

/// A session in memory: the stored record plus the last use not yet written back.
struct Live {
    record: SessionRecord,
    /// Moved forward by checks, also by those that only hold the read lock.
    last_seen: AtomicU64,
}

/// What a check straight from the table found.
pub enum FastCheck {
    /// Live; its last use is recorded in memory.
    Valid(SessionInfo),
    /// No such session.
    Unknown,
    /// Something must change (it expired, or its last use is due to be written back): ask the
    /// keeper.
    NeedsKeeper,
}

impl SessionTable {
    /// Checks `hash` at `now` without changing anything but the last use in memory.
    pub fn check(&self, hash: &TokenHash, now: u64) -> FastCheck {
        // Never wait for the keeper: while it holds the lock, the check goes through its
        // mailbox, where a call has a timeout.
        let Ok(sessions) = self.shard(hash).try_read() else {
            return FastCheck::NeedsKeeper;
        };
        let Some(live) = sessions.get(hash) else {
            return FastCheck::Unknown;
        };
        let policy = &self.policy;
        if live.expired(now, policy)
            || now.saturating_sub(live.record.last_seen) >= policy.write_back_step()
        {
            return FastCheck::NeedsKeeper;
        }
        live.last_seen.fetch_max(now, Ordering::Relaxed);
        FastCheck::Valid(live.info(policy, &self.default_app))
    }

    fn shard(&self, hash: &TokenHash) -> &RwLock<Shard> {
        &self.shards[shard_of(&self.ends, hash)]
    }

    /// The shard of `hash`, for a change.
    fn write(&self, hash: &TokenHash) -> RwLockWriteGuard<'_, Shard> {
        write(self.shard(hash))
    }

    /// The shard of `hash`, for a look.
    fn read(&self, hash: &TokenHash) -> RwLockReadGuard<'_, Shard> {
        read(self.shard(hash))
    }
}

fn write(shard: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    // A keeper that panicked holding the lock is replaced by one with a fresh table.
    shard
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read(shard: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    shard
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SledSessions {
    /// The table, loaded from the session log of `data`. Blocks for as long as reading the log
    /// takes (seconds for a million sessions).
    pub fn load(
        data: DataDir,
        commit: GroupCommit,
        policy: SessionPolicy,
        default_app: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> SledSessions {
        let mut table = SledSessions {
            data,
            commit,
            metrics,
            table: Arc::new(SessionTable {
                policy,
                default_app,
                shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
                ends: shard_ends(),
                len: AtomicUsize::new(0),
            }),
            by_uid: HashMap::new(),
            sweep_at: 0,
        };
        match table.log().replay() {
            Ok(sessions) => {
                for (hash, record) in sessions {
                    table.remember(hash, record);
                }
            }
            // Sessions can always be given up (their users log in again); the broker cannot.
            Err(e) => {
                tracing::error!(error = %e, "cannot read the stored sessions; starting without")
            }
        }
        // The log hands sessions over in no particular order; the index keeps them by age.
        let sessions = &table.table;
        for hashes in table.by_uid.values_mut() {
            hashes.sort_by_key(|hash| sessions.read(hash).get(hash).map(|l| l.record.created_at));
        }
        tracing::info!(sessions = table.len(), "session table loaded");
        table
    }

    /// The table, for checks that read it directly.
    pub fn table(&self) -> Arc<SessionTable> {
        self.table.clone()
    }

    /// Sessions held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.table.len.load(Ordering::Relaxed)
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn log(&self) -> &SessionLog {
        self.data.session_log()
    }

    fn policy(&self) -> SessionPolicy {
        self.table.policy
    }

    pub(crate) fn issue(
        &mut self,
        token: String,
        uid: u64,
        appid: Option<Arc<str>>,
        openid: String,
        unionid: Option<String>,
        now: u64,
    ) -> Result<Issued, Error> {
        let hash = token_hash(&token);
        let record = self.policy().fresh_record(uid, appid, openid, unionid, now);
        let oldest = self
            .by_uid
            .get(&uid)
            .filter(|hashes| hashes.len() >= MAX_SESSIONS_PER_USER)
            .map(|hashes| hashes[0]);
        let unionid = record.unionid.clone();
        self.log().put(&hash, &record)?;
        if let Some(oldest) = oldest {
            self.forget(&oldest);
            self.log().remove([&oldest]);
        }
        self.remember(hash, record);
        // A unionid WeChat reports now also belongs on the user's older sessions.
        if let Some(unionid) = unionid {
            self.set_unionid(uid, &unionid)?;
        }
        Ok(Issued {
            token,
            expires_in: self.policy().expires_in(),
        })
    }

    pub(crate) fn check(&mut self, hash: &TokenHash, now: u64) -> Result<SessionInfo, Error> {
        let policy = self.policy();
        let table = self.table.clone();
        let mut sessions = table.write(hash);
        let live = sessions.get_mut(hash).ok_or(Error::InvalidSession)?;
        if live.expired(now, &policy) {
            drop(sessions);
            self.forget(hash);
            self.log().remove([hash]);
            return Err(Error::InvalidSession);
        }
        let last_seen = live.last_seen.get_mut();
        *last_seen = (*last_seen).max(now);
        let due = *last_seen - live.record.last_seen >= policy.write_back_step();
        if due {
            live.record.last_seen = *last_seen;
        }
        let info = live.info(&policy, &table.default_app);
        let record = live.record.clone();
        // The disk write happens outside the lock: checks must never wait for the disk.
        drop(sessions);
        if due {
            self.log().put(hash, &record)?;
        }
        Ok(info)
    }

    pub(crate) fn revoke(&mut self, hash: &TokenHash, now: u64) -> Pending<()> {
        let policy = self.policy();
        let revoked = (|| {
            let live = self.forget(hash).ok_or(Error::InvalidSession)?;
            self.log().remove([hash]);
            if live.expired(now, &policy) {
                return Err(Error::InvalidSession);
            }
            // In the same flush as the removal: a verifier learns of every logout that holds.
            let sid = session_id(hash);
            self.data
                .revocations()
                .session_ended(live.record.uid, sid, now)
        })();
        self.commit.after(revoked)
    }

    pub(crate) fn revoke_user(&mut self, uid: u64, now: u64) -> Pending<usize> {
        let policy = self.policy();
        let hashes = self.by_uid.get(&uid).cloned().unwrap_or_default();
        let mut live = Vec::new();
        for hash in &hashes {
            if self.forget(hash).is_some_and(|s| !s.expired(now, &policy)) {
                live.push(session_id(hash));
            }
        }
        self.log().remove(&hashes);
        let count = live.len();
        let recorded = self.data.revocations().user_ended(uid, live, now);
        self.commit.after(recorded.map(|()| count))
    }

    /// Forgets the expired sessions of the next shard; at the end of a pass over all of them,
    /// has the log rewritten when it is worth it. Returns whether the pass goes on: the caller
    /// sweeps again after its other work.
    pub fn sweep(&mut self, now: u64) -> bool {
        let policy = self.policy();
        let expired: Vec<TokenHash> = read(&self.table.shards[self.sweep_at])
            .iter()
            .filter(|(_, live)| live.expired(now, &policy))
            .map(|(hash, _)| *hash)
            .collect();
        if !expired.is_empty() {
            for hash in &expired {
                self.forget(hash);
            }
            self.log().remove(&expired);
            tracing::debug!(removed = expired.len(), "swept expired sessions");
        }
        self.sweep_at = (self.sweep_at + 1) % SHARDS;
        if self.sweep_at != 0 {
            return true;
        }
        self.compact_if_worth_it();
        false
    }

    /// Has the session log rewritten on a thread of its own once superseded records make up most
    /// of it. Nobody waits for it: the keeper goes on with its next message at once.
    fn compact_if_worth_it(&self) {
        if !self.log().needs_compacting(self.len()) {
            return;
        }
        // The thread holds the data dir, whose database stays locked until it ends: no broker can
        // open the directory while its log may still be replaced.
        let (data, metrics) = (self.data.clone(), self.metrics.clone());
        let spawned = std::thread::Builder::new()
            .name("wxbroker-compaction".into())
            .spawn(move || {
                let timer = metrics.compaction_seconds.start_timer();
                metrics.compacting.set(1);
                let outcome = data.session_log().compact();
                metrics.compacting.set(0);
                match outcome {
                    Ok(Some(done)) => {
                        let took_ms = (timer.stop_and_record() * 1000.0) as u64;
                        metrics.compactions.inc();
                        tracing::info!(
                            read = done.read,
                            kept = done.kept,
                            tail_bytes = done.tail_bytes,
                            took_ms,
                            rested_ms = done.rested.as_millis() as u64,
                            "rewrote the session log with the live sessions"
                        );
                    }
                    Ok(None) => drop(timer.stop_and_discard()),
                    Err(e) => {
                        let _ = timer.stop_and_discard();
                        tracing::error!(error = %e, "rewriting the session log failed; retrying at a later sweep");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a thread to rewrite the session log");
        }
    }

    pub(crate) fn list(&self, uid: u64, now: u64) -> Vec<SessionSummary> {
        let policy = self.policy();
        let table = &self.table;
        self.by_uid
            .get(&uid)
            .into_iter()
            .flatten()
            .filter_map(|hash| {
                let shard = table.read(hash);
                let live = shard.get(hash)?;
                (!live.expired(now, &policy)).then(|| SessionSummary {
                    id: session_id(hash),
                    created_at: live.record.created_at,
                    last_seen: live.last_seen.load(Ordering::Relaxed),
                    expires_at: live.expires_at(&policy),
                })
            })
            .collect()
    }

    /// As [`SledSessions::set_unionid`], answered once on disk if any session changed.
    pub(crate) fn set_unionid_durably(&mut self, uid: u64, unionid: &str) -> Pending<()> {
        match self.set_unionid(uid, unionid) {
            Ok(true) => self.commit.after(Ok(())),
            other => Pending::Ready(other.map(drop)),
        }
    }

    /// Puts `unionid` on every session of the user; whether any changed.
    pub(crate) fn set_unionid(&mut self, uid: u64, unionid: &str) -> Result<bool, Error> {
        let mut changed = Vec::new();
        for hash in self.by_uid.get(&uid).into_iter().flatten() {
            if let Some(live) = self.table.write(hash).get_mut(hash)
                && live.record.unionid.as_deref() != Some(unionid)
            {
                live.record.unionid = Some(unionid.to_owned());
                changed.push((*hash, live.record.clone()));
            }
        }
        // Outside the lock: checks must never wait for the disk.
        for (hash, record) in &changed {
            self.log().put(hash, record)?;
        }
        Ok(!changed.is_empty())
    }

    /// Persists every last use that was only held in memory (at a clean stop).
    pub fn write_back_last_seen(&mut self) -> Result<(), Error> {
        for shard in &self.table.shards {
            for (hash, live) in write(shard).iter_mut() {
                let last_seen = *live.last_seen.get_mut();
                if last_seen > live.record.last_seen {
                    live.record.last_seen = last_seen;
                    self.data.session_log().put(hash, &live.record)?;
                }
            }
        }
        Ok(())
    }

    /// Adds a session to the table and its user's index.
    fn remember(&mut self, hash: TokenHash, record: SessionRecord) {
        self.by_uid.entry(record.uid).or_default().push(hash);
        let last_seen = AtomicU64::new(record.last_seen);
        let replaced = self
            .table
            .write(&hash)
            .insert(hash, Live { record, last_seen });
        if replaced.is_none() {
            let len = self.table.len.fetch_add(1, Ordering::Relaxed) + 1;
            self.metrics.live_sessions.set(len as i64);
        }
    }

    /// Removes a session from the table and its user's index (not from the log).
    fn forget(&mut self, hash: &TokenHash) -> Option<Live> {
        let live = self.table.write(hash).remove(hash)?;
        let len = self.table.len.fetch_sub(1, Ordering::Relaxed) - 1;
        self.metrics.live_sessions.set(len as i64);
        if let Some(hashes) = self.by_uid.get_mut(&live.record.uid) {
            hashes.retain(|h| h != hash);
            if hashes.is_empty() {
                self.by_uid.remove(&live.record.uid);
            }
        }
        Some(live)
    }
}

impl Live {
    fn expires_at(&self, policy: &SessionPolicy) -> u64 {
        policy.deadline(
            self.last_seen.load(Ordering::Relaxed),
            self.record.expires_at,
        )
    }

    fn expired(&self, now: u64, policy: &SessionPolicy) -> bool {
        now >= self.expires_at(policy)
    }

    fn info(&self, policy: &SessionPolicy, default_app: &Arc<str>) -> SessionInfo {
        SessionInfo {
            uid: self.record.uid,
            appid: self.record.appid.as_ref().unwrap_or(default_app).clone(),
            openid: self.record.openid.clone(),
            unionid: self.record.unionid.clone(),
            expires_at: self.expires_at(policy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::new_token;
    use crate::storage::sled::DataDir;

    fn table(dir: &tempfile::TempDir) -> SledSessions {
        let data = DataDir::open(dir.path(), 8).unwrap();
        let commit = GroupCommit::start(data.clone(), Default::default());
        let policy = SessionPolicy {
            idle_ttl: 1000,
            max_ttl: 5000,
        };
        SledSessions::load(
            data,
            commit,
            policy,
            "wx-default".into(),
            Default::default(),
        )
    }

    fn issue(table: &mut SledSessions, uid: u64, openid: &str, now: u64) -> TokenHash {
        let token = new_token().unwrap();
        let issued = table
            .issue(token, uid, None, openid.into(), None, now)
            .unwrap();
        token_hash(&issued.token)
    }

    fn stored_last_seen(table: &SledSessions, hash: &TokenHash) -> u64 {
        table.log().replay().unwrap()[hash].last_seen
    }

    #[tokio::test]
    async fn checks_write_the_last_use_only_when_it_moved_a_tenth_of_the_idle_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = table(&dir);
        let hash = issue(&mut table, 1, "o", 10_000);

        assert_eq!(
            table.check(&hash, 10_099).unwrap().expires_at,
            10_099 + 1000
        );
        assert_eq!(
            stored_last_seen(&table, &hash),
            10_000,
            "under a tenth: memory only"
        );

        table.check(&hash, 10_100).unwrap();
        assert_eq!(
            stored_last_seen(&table, &hash),
            10_100,
            "a tenth: written back"
        );
    }

    #[tokio::test]
    async fn the_table_answers_checks_that_change_nothing_and_sends_the_rest_to_the_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = table(&dir);
        let hash = issue(&mut table, 1, "o", 10_000);
        let shared = table.table();
        let valid = |check| match check {
            FastCheck::Valid(info) => info.expires_at,
            _ => panic!("not answered from the table"),
        };
        assert_eq!(valid(shared.check(&hash, 10_050)), 10_050 + 1000);
        assert_eq!(stored_last_seen(&table, &hash), 10_000, "memory only");
        assert!(matches!(shared.check(&[7; 32], 10_050), FastCheck::Unknown));
        // A write-back is due: the keeper must do it.
        assert!(matches!(
            shared.check(&hash, 10_100),
            FastCheck::NeedsKeeper
        ));
        table.check(&hash, 10_100).unwrap();
        assert_eq!(stored_last_seen(&table, &hash), 10_100);
        // Expired: the keeper must forget it.
        assert!(matches!(
            shared.check(&hash, 11_100),
            FastCheck::NeedsKeeper
        ));
        // Revoked: gone from the table at once.
        let other = issue(&mut table, 1, "o", 10_200);
        table.revoke(&other, 10_200).wait().await.unwrap();
        assert!(matches!(shared.check(&other, 10_200), FastCheck::Unknown));
    }

    #[tokio::test]
    async fn an_expired_session_is_refused_and_forgotten_before_any_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = table(&dir);
        let hash = issue(&mut table, 1, "o", 10_000);
        assert_eq!(table.check(&hash, 11_000), Err(Error::InvalidSession));
        assert_eq!(table.log().replay().unwrap().len(), 0);
        assert!(table.is_empty() && table.by_uid.is_empty());
    }

    #[tokio::test]
    async fn a_sweep_pass_visits_every_shard_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = table(&dir);
        let hashes: Vec<_> = (0..500)
            .map(|uid| issue(&mut table, uid, "o", 10_000))
            .collect();
        let kept = issue(&mut table, 1, "o", 10_900);
        let mut steps = 1;
        while table.sweep(11_000) {
            steps += 1;
        }
        assert_eq!(steps, SHARDS);
        assert_eq!(table.len(), 1);
        assert!(hashes.iter().all(|h| table.check(h, 11_000).is_err()));
        assert!(table.check(&kept, 11_000).is_ok());
        assert_eq!(table.log().replay().unwrap().len(), 1);
    }

    #[test]
    fn a_growing_table_doubles_its_shards_one_at_a_time() {
        let ends = shard_ends();
        let mut shards: Vec<TokenMap<()>> = (0..SHARDS).map(|_| TokenMap::default()).collect();
        // The number of sessions at each moment a shard grew, past 100,000 (below, a shard's
        // share of random hashes strays too far from its share of the range to tell).
        let mut grew_at = Vec::new();
        for n in 1..=500_000u64 {
            let hash = token_hash(&format!("token {n}"));
            let shard = &mut shards[shard_of(&ends, &hash)];
            let capacity = shard.capacity();
            shard.insert(hash, ());
            if shard.capacity() != capacity && n > 100_000 {
                grew_at.push(n);
            }
        }
        // Each shard doubles about twice from 100,000 to 500,000 sessions.
        assert!(grew_at.len() > SHARDS * 2, "{} doublings", grew_at.len());
        // A few at most within 1% of growth (with equal shares, all 64 come within a few %).
        for (i, &n) in grew_at.iter().enumerate() {
            let together = grew_at[i..]
                .iter()
                .take_while(|&&m| m <= n + n / 100)
                .count();
            assert!(
                together <= 8,
                "{together} shards doubled between {n} and {}",
                n + n / 100
            );
        }
    }

    #[test]
    fn the_shards_shares_cover_every_hash() {
        let ends = shard_ends();
        assert!(ends.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(shard_of(&ends, &[0; 32]), 0);
        assert_eq!(shard_of(&ends, &[0xff; 32]), SHARDS - 1);
        // The largest share is about twice the smallest.
        let share = |i: usize| ends[i] - if i == 0 { 0 } else { ends[i - 1] };
        let ratio = f64::from(share(SHARDS - 1)) / f64::from(share(0));
        assert!((1.9..2.0).contains(&ratio), "{ratio}");
    }

    #[tokio::test]
    async fn the_cap_evicts_the_oldest_session_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = table(&dir);
        let mut hashes = Vec::new();
        for i in 0..MAX_SESSIONS_PER_USER as u64 {
            hashes.push(issue(&mut table, 1, "o1", 10_000 + i));
        }
        // A restart reads the sessions back in no particular order, not by age.
        let (data, commit, policy) = (table.data.clone(), table.commit.clone(), table.policy());
        let mut table = SledSessions::load(
            data,
            commit,
            policy,
            "wx-default".into(),
            Default::default(),
        );
        for (i, oldest) in hashes.iter().enumerate() {
            let now = 10_100 + i as u64;
            issue(&mut table, 1, "o1", now);
            assert_eq!(table.check(oldest, now), Err(Error::InvalidSession));
            if let Some(next) = hashes.get(i + 1) {
                assert!(
                    table.check(next, now).is_ok(),
                    "session {} evicted early",
                    i + 1
                );
            }
        }
        assert_eq!(table.log().replay().unwrap().len(), MAX_SESSIONS_PER_USER);
    }
}
