//! The sessions on disk: an append-only log beside the sled database.
//!
//! The SessionKeeper holds every live session in memory; the disk only has to let it rebuild that
//! table after a restart. A B-tree does more than that needs, and under load each sled insert of a
//! session (a random key into a large tree) cost more CPU than all the other storage work of a
//! login. Here a write encodes a frame into a buffer; a flush (the group commit's) appends the
//! buffer to the file and syncs it; reading replays the file; once most of the file is superseded,
//! it is rewritten with only what is live, on a thread of its own while writers go on
//! ([`SessionLog::compact`]).
//!
//! The file is a run of frames `[body length: u32 LE][CRC-32 of the body: u32 LE][body]`, a body
//! being `1, hash, record` (a put) or `0, hash` (a removal). A crash can leave the last frame torn:
//! opening stops at the first frame that is short or fails its CRC and, when no whole frame follows
//! it, cuts the file there, so that later frames follow whole ones.
//!
//! A frame that fails its check with whole frames after it is damage (a bad sector, a stray
//! write), not a torn tail. The damaged bytes may have held the removal of any session put before
//! them, so none of those is trusted any more: opening keeps the frames after the last damage
//! (found again by looking, byte by byte, for the next frame that passes its check), drops
//! every session put before it (its user logs in again), sets the damaged file aside beside the
//! log (`sessions.log.damaged.<unix seconds>`) and logs one ERROR saying what it kept and dropped.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Error;
use crate::crypto::{TokenHash, TokenMap};
use crate::session::SessionRecord;

/// The log's file name inside the data directory.
pub const FILE_NAME: &str = "sessions.log";

const HEADER: usize = 8;
/// The smallest body, a removal: an empty or shorter one is damage (zeros after a power loss
/// would otherwise pass, as the CRC of nothing is 0).
const MIN_BODY: usize = 33;
/// No body comes near this (the strings in a record are WeChat ids); a larger length is damage.
const MAX_BODY: usize = 16 * 1024;
const PUT: u8 = 1;
const REMOVE: u8 = 0;
const NO_STRING: u16 = u16::MAX;
/// A compaction's file is the log's name, then this, then a name of its own.
const COMPACTION_EXT: &str = "compact";
/// A damaged log is set aside under its name, then this, then the unix time.
pub const DAMAGED_EXT: &str = "damaged";
/// The mode of every file the log writes: the sessions are nobody else's business.
const FILE_MODE: u32 = 0o600;

/// The session log of one data directory.
pub struct SessionLog {
    path: PathBuf,
    /// Taken before `buffer` by whoever writes the file, so flushes and a compaction's switch
    /// never interleave; appends take only `buffer`, and never wait for the disk.
    file: Mutex<LogFile>,
    /// Frames not yet written to the file.
    buffer: Mutex<Vec<u8>>,
    /// Frames in the file and the buffer together: the log's length, for deciding to compact.
    frames: AtomicU64,
    /// Set while a compaction runs, so that only one does.
    compacting: AtomicBool,
    /// Set at shutdown: a compaction still running must not replace the file any more (a broker
    /// started next in the same process may have opened it).
    closed: AtomicBool,
}

struct LogFile {
    /// Written at explicit offsets, so that a retry after a failed write overwrites what that
    /// write may have left instead of following it.
    file: File,
    /// Bytes of whole frames in the file: where the next write goes.
    len: u64,
    /// A compaction renamed a new file in, and the directory is not yet synced: until it is, the
    /// rename (and so everything written since) may not survive a crash, so no flush succeeds.
    dir_unsynced: bool,
}

/// What a compaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compacted {
    /// Frames read from the file as it was when the compaction started.
    pub read: u64,
    /// Of those, the frames kept: one per session live at that point.
    pub kept: u64,
    /// Bytes flushed meanwhile and copied over behind them by the switch, under the file's lock
    /// (what was flushed earlier was copied before it, without the lock).
    pub tail_bytes: u64,
    /// Time the rewrite rested between its stretches of work (see [`Pace`]).
    pub rested: Duration,
}

impl SessionLog {
    /// Opens (or creates) the log in `dir`, cutting off a torn tail and setting damage aside
    /// (see the module docs).
    pub fn open(dir: &Path) -> Result<SessionLog, Error> {
        let path = dir.join(FILE_NAME);
        remove_compaction_leftovers(dir);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(|e| storage(&path, "open", e))?;
        if created {
            sync_dir(&path).map_err(|e| storage(&path, "create", e))?;
        } else {
            // Written by a version that left it to the umask.
            restrict(&file).map_err(|e| storage(&path, "restrict", e))?;
        }
        let read = |e| storage(&path, "read", e);
        let (mut frames, mut whole) =
            scan(&mut file, |_, _| ControlFlow::Continue(())).map_err(read)?;
        let len = file.metadata().map_err(read)?.len();
        if whole < len && next_frame(&file, whole + 1, len).map_err(read)?.is_some() {
            let salvaged = salvage(&path, &file, len)?;
            (file, frames, whole) = (salvaged.file, salvaged.frames, salvaged.len);
        } else if whole < len {
            tracing::warn!(
                file = %path.display(),
                kept_bytes = whole,
                dropped_bytes = len - whole,
                "the session log ends in a torn frame (a crash while writing?); cutting it there: \
                 the sessions written last log in again"
            );
            file.set_len(whole)
                .and_then(|()| file.sync_all())
                .map_err(|e| storage(&path, "truncate", e))?;
        }
        Ok(SessionLog {
            path,
            file: Mutex::new(LogFile {
                file,
                len: whole,
                dir_unsynced: false,
            }),
            buffer: Mutex::new(Vec::new()),
            frames: AtomicU64::new(frames),
            compacting: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// Records `record` as the session of `hash`, replacing any earlier one.
    pub fn put(&self, hash: &TokenHash, record: &SessionRecord) -> Result<(), Error> {
        let body = encode_put(hash, record)?;
        push_frame(&mut self.buffer(), &body);
        self.frames.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records that the sessions of `hashes` have ended.
    pub fn remove<'a>(&self, hashes: impl IntoIterator<Item = &'a TokenHash>) {
        let mut buffer = self.buffer();
        for hash in hashes {
            let mut body = [0u8; MIN_BODY];
            body[0] = REMOVE;
            body[1..].copy_from_slice(hash);
            push_frame(&mut buffer, &body);
            self.frames.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes what was recorded so far to the file and syncs it. After a failure the frames stay
    /// buffered, ahead of later ones, and the next flush writes them again at the same place.
    pub fn flush(&self) -> Result<(), Error> {
        let mut log = self.file();
        let bytes = std::mem::take(&mut *self.buffer());
        if bytes.is_empty() && !log.dir_unsynced {
            return Ok(());
        }
        let written = log
            .file
            .write_all_at(&bytes, log.len)
            .and_then(|()| log.file.sync_data())
            .and_then(|()| match log.dir_unsynced {
                true => sync_dir(&self.path),
                false => Ok(()),
            });
        match written {
            Ok(()) => {
                log.len += bytes.len() as u64;
                log.dir_unsynced = false;
                Ok(())
            }
            Err(e) => {
                let mut buffer = self.buffer();
                let later = std::mem::replace(&mut *buffer, bytes);
                buffer.extend_from_slice(&later);
                Err(storage(&self.path, "write", e))
            }
        }
    }

    /// Frames in the log, superseded ones included.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Whether the log holds so many superseded records beside the `live` sessions that it is
    /// worth compacting: at most a quarter of it is live. `false` while a compaction runs.
    pub fn needs_compacting(&self, live: usize) -> bool {
        !self.compacting.load(Ordering::Relaxed) && self.frames() > 4 * live as u64 + COMPACT_SLACK
    }

    /// The sessions recorded and not removed, written or not: what a restart finds, but for what
    /// is still buffered. Reads the file without holding it: flushes go on meanwhile.
    pub fn replay(&self) -> Result<HashMap<TokenHash, SessionRecord>, Error> {
        let read = |e| storage(&self.path, "read", e);
        // Taken together under the file's lock, so no flush or compaction comes between them.
        let (file, len, buffered) = {
            let log = self.file();
            let file = File::open(&self.path).map_err(read)?;
            (file, log.len, self.buffer().clone())
        };
        let mut sessions = HashMap::new();
        let mut undecodable = 0;
        let total = len + buffered.len() as u64;
        let input = file.take(len).chain(buffered.as_slice());
        let (_, whole) = scan(input, |_, body| {
            match decode(body) {
                Some(Frame::Put(hash, record)) => drop(sessions.insert(hash, record)),
                Some(Frame::Remove(hash)) => drop(sessions.remove(&hash)),
                None => undecodable += 1,
            }
            ControlFlow::Continue(())
        })
        .map_err(read)?;
        if whole < total {
            // Damaged since it was opened: what follows the damage may remove sessions put
            // before it, so none is trusted. The next opening sets the damage aside.
            return Err(damaged(&self.path, whole));
        }
        if undecodable > 0 {
            // Whole frames (their CRC holds) of a kind this version does not know: skipped, as a
            // session can always be given up (its user logs in again).
            tracing::warn!(
                frames = undecodable,
                "skipping session log frames that do not decode"
            );
        }
        Ok(sessions)
    }

    /// Rewrites the log with only its live records, beside the writers: nobody waits for it but
    /// for the switch at its end. Blocks for as long as it takes (run it on a thread of its own);
    /// `None` if another compaction is running or the log is closed.
    ///
    /// It reads the file as it was when it started, up to that length, and writes a new file
    /// beside it with the last put of every session not removed since. Frames flushed meanwhile
    /// follow that length in the old file: they are copied behind the others, the bulk without
    /// any lock, the last of them under the file's lock, after which the new file is synced and
    /// renamed over the log. Replaying the new file so gives what replaying the old one gives,
    /// and a crash at any moment leaves one or the other whole.
    pub fn compact(&self) -> Result<Option<Compacted>, Error> {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        let tmp = compaction_path(&self.path);
        let outcome = self.opened().and_then(|(old, start)| {
            let mut prepared = in_idle_time(|| self.prepare_compaction(&tmp, old, start))?;
            self.catch_up(&mut prepared)?;
            self.switch(prepared)
        });
        if outcome.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        self.compacting.store(false, Ordering::Release);
        match outcome {
            Ok(compacted) => Ok(Some(compacted)),
            Err(Stop::Closed) => Ok(None),
            Err(Stop::Failed(e)) => Err(e),
        }
    }

    /// The log's file opened anew for reading, and its length: where a compaction reads up to.
    fn opened(&self) -> Result<(File, u64), Stop> {
        let log = self.file();
        let file = File::open(&self.path).map_err(|e| storage(&self.path, "read", e))?;
        Ok((file, log.len))
    }

    /// The long part of a compaction, which takes no lock (it runs at the lowest priority): the
    /// live records of `old` up to `start`, written to `tmp`.
    fn prepare_compaction(&self, tmp: &Path, mut old: File, start: u64) -> Result<Prepared, Stop> {
        let read = |e| storage(&self.path, "read", e);
        let write = |e| storage(tmp, "write", e);
        // Where the last put of each session not removed since starts. Sized once for the live
        // sessions (at most a quarter of the frames when a compaction starts): a map that grows
        // moves every entry each time it doubles, and allocates anew.
        let live = (self.frames() / 4) as usize;
        let mut latest = TokenMap::with_capacity_and_hasher(live + live / 8, Default::default());
        let mut pace = Pace::new();
        let (read_frames, whole) = scan((&old).take(start), |offset, body| {
            if let Ok(hash) = <TokenHash>::try_from(&body[1..MIN_BODY]) {
                match body[0] {
                    PUT => drop(latest.insert(hash, offset)),
                    REMOVE => drop(latest.remove(&hash)),
                    // Unknown kinds are dropped, as replaying skips them.
                    _ => {}
                }
            }
            self.go_on(&mut pace)
        })
        .map_err(read)?;
        self.check_open()?;
        if whole < start {
            // Damaged since it was opened: rewritten, the frames after the damage would be lost,
            // and with them the removal of sessions put before it. Left for the next opening.
            return Err(damaged(&self.path, whole).into());
        }
        let mut keep: Vec<u64> = latest.into_values().collect();
        keep.sort_unstable();

        let mut out = BufWriter::with_capacity(1 << 16, create_new(tmp).map_err(write)?);
        let (mut next, mut written, mut failed) = (keep.iter().peekable(), 0u64, None);
        old.seek(SeekFrom::Start(0)).map_err(read)?;
        let mut frame = Vec::new();
        scan((&old).take(start), |offset, body| {
            if next.peek() == Some(&&offset) {
                next.next();
                frame.clear();
                push_frame(&mut frame, body);
                // Synced as it goes: a single sync of the whole file at the end would flood the
                // disk with its writeback, and every other sync of the broker would wait behind it.
                let synced =
                    match written / SYNC_EVERY != (written + frame.len() as u64) / SYNC_EVERY {
                        true => out.flush().and_then(|()| out.get_ref().sync_data()),
                        false => Ok(()),
                    };
                match synced.and_then(|()| out.write_all(&frame)) {
                    Ok(()) => written += frame.len() as u64,
                    Err(e) => {
                        failed = Some(e);
                        return ControlFlow::Break(());
                    }
                }
            }
            self.go_on(&mut pace)
        })
        .map_err(read)?;
        if let Some(e) = failed {
            return Err(write(e).into());
        }
        self.check_open()?;
        let file = out.into_inner().map_err(|e| write(e.into_error()))?;
        Ok(Prepared {
            file,
            old,
            tmp: tmp.to_owned(),
            start,
            read: read_frames,
            kept: keep.len() as u64,
            written,
            rested: pace.rested,
        })
    }

    /// Copies what was flushed since `prepared` last looked, until little is left for the switch
    /// to copy under the lock (the old file only grows while this compaction is the only one),
    /// then syncs the new file: the switch syncs only the rest.
    fn catch_up(&self, prepared: &mut Prepared) -> Result<(), Stop> {
        let write = |e| storage(&prepared.tmp, "write", e);
        loop {
            self.check_open()?;
            let len = self.file().len;
            if len - prepared.start <= SWITCH_TAIL {
                break;
            }
            let mut tail = vec![0; (len - prepared.start) as usize];
            prepared
                .old
                .read_exact_at(&mut tail, prepared.start)
                .map_err(|e| storage(&self.path, "read", e))?;
            prepared
                .file
                .write_all_at(&tail, prepared.written)
                .map_err(write)?;
            prepared.written += tail.len() as u64;
            prepared.start = len;
        }
        Ok(prepared.file.sync_data().map_err(write)?)
    }

    /// The short part, under the file's lock: the frames flushed since `prepared` read the file
    /// copied behind its own, synced, and the new file renamed over the log. `None` if the log
    /// was closed meanwhile.
    fn switch(&self, prepared: Prepared) -> Result<Compacted, Stop> {
        let Prepared {
            file,
            tmp,
            start,
            read,
            kept,
            written,
            rested,
            ..
        } = prepared;
        let mut log = self.file();
        self.check_open()?;
        let mut tail = vec![0; (log.len - start) as usize];
        log.file
            .read_exact_at(&mut tail, start)
            .map_err(|e| storage(&self.path, "read", e))?;
        file.write_all_at(&tail, written)
            .and_then(|()| file.sync_data())
            .map_err(|e| storage(&tmp, "write", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| storage(&self.path, "replace", e))?;
        // From here on the new file is the log, whatever else fails.
        *log = LogFile {
            file,
            len: written + tail.len() as u64,
            dir_unsynced: true,
        };
        self.frames.fetch_sub(read - kept, Ordering::Relaxed);
        match sync_dir(&self.path) {
            Ok(()) => log.dir_unsynced = false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sync the data dir; the next flush retries")
            }
        }
        Ok(Compacted {
            read,
            kept,
            tail_bytes: tail.len() as u64,
            rested,
        })
    }

    /// Stops any compaction from replacing the file from now on (at shutdown, after the last
    /// flush): the data dir may be opened again at once, by a broker that must find its log. A
    /// compaction that is running gives up at its next step.
    pub fn close(&self) {
        let _log = self.file();
        self.closed.store(true, Ordering::Release);
    }

    /// Waits, up to `timeout`, until no compaction runs (at shutdown, after [`SessionLog::close`]).
    pub fn wait_idle(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.compacting.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Whether a compaction should go on reading, after a rest if one is due (see [`Pace`]).
    fn go_on(&self, pace: &mut Pace) -> ControlFlow<()> {
        pace.step();
        match self.closed.load(Ordering::Relaxed) {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    }

    /// A compaction's check between its steps.
    fn check_open(&self) -> Result<(), Stop> {
        match self.closed.load(Ordering::Acquire) {
            true => Err(Stop::Closed),
            false => Ok(()),
        }
    }

    fn file(&self) -> MutexGuard<'_, LogFile> {
        self.file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn buffer(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why a compaction stopped short.
enum Stop {
    /// The log was closed: the compaction gives up, which is no failure.
    Closed,
    /// It failed.
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Failed(e)
    }
}

/// A compaction's new file, written and synced, waiting for its switch.
struct Prepared {
    file: File,
    /// The log's file as it was when the compaction started.
    old: File,
    tmp: PathBuf,
    /// The length of the old file copied over: what follows is left for the switch.
    start: u64,
    /// Frames read.
    read: u64,
    /// Frames kept.
    kept: u64,
    /// Bytes written.
    written: u64,
    /// Time rested between stretches of work.
    rested: Duration,
}

/// A compaction syncs its new file every this many bytes.
const SYNC_EVERY: u64 = 4 * 1024 * 1024;

/// At most this much of what was flushed during a compaction is left for its switch to copy
/// while flushes wait.
const SWITCH_TAIL: u64 = 256 * 1024;

/// Superseded records tolerated whatever the number of live sessions, so that a small log is
/// not rewritten over and over.
const COMPACT_SLACK: u64 = 100_000;

/// Where a compaction writes: a name of its own, so that one abandoned by a broker that stopped
/// never touches the file of the next.
fn compaction_path(log: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    log.with_extension(format!("log.{COMPACTION_EXT}{}-{n}", std::process::id()))
}

/// A compaction cut short (by a crash) leaves its file behind; the log itself is whole.
fn remove_compaction_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{FILE_NAME}.{COMPACTION_EXT}");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // `.tmp`: where versions before background compaction wrote.
        if name.starts_with(&prefix) || name == format!("{FILE_NAME}.tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Takes away what the group and others may do with `file`.
fn restrict(file: &File) -> std::io::Result<()> {
    let mode = file.metadata()?.permissions().mode();
    match mode & 0o077 {
        0 => Ok(()),
        _ => file.set_permissions(std::fs::Permissions::from_mode(mode & FILE_MODE)),
    }
}

/// Syncs the directory holding `path`, which makes a file created or renamed there durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A damaged log, salvaged: the file now at the log's path, its frames and length.
struct Salvaged {
    file: File,
    frames: u64,
    len: u64,
}

/// Sets the damaged log at `path` (`file`, `len` bytes long, with whole frames after a bad one)
/// aside and puts a log with the frames after its last damage in its place.
///
/// The file is read as runs of whole frames, each run ended by damage (bytes up to the next
/// frame that passes its check) but the last, which the file's end or a torn tail ends. The
/// sessions put in every run but the last are dropped, and the frames of the last kept. The new
/// log is written and synced beside the old one, the old one linked (or copied) to its damaged
/// name, and the new one renamed in: a crash at any moment leaves the damaged log in place, to be
/// salvaged again.
fn salvage(path: &Path, file: &File, len: u64) -> Result<Salvaged, Error> {
    let read = |e| storage(path, "read", e);
    // Live at the start of the current run (every frame before it replayed in order, whatever
    // damage lies between), then live and touched within the run.
    let (mut before, mut live, mut touched) = (HashSet::new(), HashSet::new(), HashSet::new());
    let (mut at, mut dropped_frames, mut regions, mut damaged_bytes) = (0, 0, 0, 0);
    let (kept_frames, end) = loop {
        let mut run = file;
        run.seek(SeekFrom::Start(at)).map_err(read)?;
        let (frames, whole) = scan(run.take(len - at), |_, body| {
            if let Ok(hash) = <TokenHash>::try_from(&body[1..MIN_BODY]) {
                match body[0] {
                    PUT => drop(live.insert(hash)),
                    REMOVE => drop(live.remove(&hash)),
                    // Unknown kinds are skipped, as replaying skips them.
                    _ => return ControlFlow::Continue(()),
                }
                touched.insert(hash);
            }
            ControlFlow::Continue(())
        })
        .map_err(read)?;
        let end = at + whole;
        let Some(next) = next_frame(file, end + 1, len).map_err(read)? else {
            break (frames, end);
        };
        before.retain(|hash| !touched.contains(hash));
        before.extend(live.drain());
        touched.clear();
        (dropped_frames, regions, damaged_bytes) = (
            dropped_frames + frames,
            regions + 1,
            damaged_bytes + next - end,
        );
        at = next;
    };
    let kept_sessions = live.len();
    let dropped_sessions = before.difference(&touched).count();

    let tmp = compaction_path(path);
    let write = |e| storage(&tmp, "write", e);
    let written = (|| -> Result<(File, PathBuf), Error> {
        let mut out = create_new(&tmp).map_err(write)?;
        let mut kept = file;
        kept.seek(SeekFrom::Start(at)).map_err(read)?;
        std::io::copy(&mut kept.take(end - at), &mut out).map_err(write)?;
        out.sync_all().map_err(write)?;
        let aside = set_aside(path).map_err(|e| storage(path, "set aside", e))?;
        std::fs::rename(&tmp, path).map_err(|e| storage(path, "replace", e))?;
        sync_dir(path).map_err(|e| storage(path, "replace", e))?;
        Ok((out, aside))
    })();
    let (out, aside) = written.inspect_err(|_| drop(std::fs::remove_file(&tmp)))?;
    tracing::error!(
        file = %path.display(),
        damaged_copy = %aside.display(),
        damaged_regions = regions,
        damaged_bytes,
        torn_tail_bytes = len - end,
        kept_frames,
        kept_sessions,
        dropped_frames,
        dropped_sessions,
        "the session log is damaged: frames that fail their check with whole frames after them. \
         Kept the frames after the damage; dropped the sessions written before it, whose logout \
         may have been in the damaged bytes (their users log in again). The damaged file is kept \
         beside the log"
    );
    Ok(Salvaged {
        file: out,
        frames: kept_frames,
        len: end - at,
    })
}

/// Keeps the log at `path` under its damaged name (a link, or else a copy), synced; returns
/// that name.
fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let name = format!("{FILE_NAME}.{DAMAGED_EXT}.{secs}");
    // A second salvage within the same second (a crash before the first one's rename).
    let aside = (0..100)
        .map(|n| match n {
            0 => path.with_file_name(&name),
            n => path.with_file_name(format!("{name}-{n}")),
        })
        .find(|aside| !aside.exists())
        .ok_or_else(|| std::io::Error::other(format!("{name} is taken")))?;
    if std::fs::hard_link(path, &aside).is_err() {
        let mut copy = create_new(&aside)?;
        std::io::copy(&mut File::open(path)?, &mut copy)?;
        copy.sync_all()?;
    }
    sync_dir(&aside)?;
    Ok(aside)
}

/// Where the first frame that passes its check starts, at or after `from` and before `len` in
/// `file`: after damage, frames start anew there. Looks at every byte, through a window.
fn next_frame(file: &File, from: u64, len: u64) -> std::io::Result<Option<u64>> {
    const WINDOW: usize = 1 << 20;
    let mut window = Vec::new();
    let mut at = from;
    while at + ((HEADER + MIN_BODY) as u64) <= len {
        // A frame starting in the first WINDOW bytes fits in the window, or is cut by the end.
        let read = ((len - at) as usize).min(WINDOW + HEADER + MAX_BODY);
        window.resize(read, 0);
        file.read_exact_at(&mut window, at)?;
        let starts = match at + read as u64 == len {
            true => read,
            false => WINDOW,
        };
        if let Some(i) = (0..starts).find(|&i| whole_frame(&window[i..]).is_some()) {
            return Ok(Some(at + i as u64));
        }
        at += starts as u64;
    }
    Ok(None)
}

/// The body of the frame at the start of `bytes`, if it is whole and passes its check.
fn whole_frame(bytes: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..HEADER)?.try_into().ok()?);
    if !(MIN_BODY..=MAX_BODY).contains(&len) {
        return None;
    }
    let body = bytes.get(HEADER..HEADER + len)?;
    (crc32fast::hash(body) == crc).then_some(body)
}

enum Frame {
    Put(TokenHash, SessionRecord),
    Remove(TokenHash),
}

/// Reads `input` frame by frame, calling `each` with the offset and body of every whole one until
/// it breaks; returns how many there were and where they end (a short or damaged frame ends the
/// reading).
fn scan(
    input: impl Read,
    mut each: impl FnMut(u64, &[u8]) -> ControlFlow<()>,
) -> std::io::Result<(u64, u64)> {
    let mut input = BufReader::with_capacity(1 << 16, input);
    let (mut frames, mut end) = (0, 0);
    let (mut header, mut body) = ([0u8; HEADER], Vec::new());
    loop {
        if !read_whole(&mut input, &mut header)? {
            break;
        }
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
        if !(MIN_BODY..=MAX_BODY).contains(&len) {
            break;
        }
        body.resize(len, 0);
        if !read_whole(&mut input, &mut body)? || crc32fast::hash(&body) != crc {
            break;
        }
        if each(end, &body).is_break() {
            break;
        }
        frames += 1;
        end += (HEADER + len) as u64;
    }
    Ok((frames, end))
}

/// Fills `buf`; `false` when the input ends first.
fn read_whole(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    match input.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn push_frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
}

fn encode_put(hash: &TokenHash, record: &SessionRecord) -> Result<Vec<u8>, Error> {
    let mut body = Vec::with_capacity(1 + 32 + 32 + 4 + record.openid.len() + 32);
    body.push(PUT);
    body.extend_from_slice(hash);
    for n in [
        record.uid,
        record.created_at,
        record.last_seen,
        record.expires_at,
    ] {
        body.extend_from_slice(&n.to_le_bytes());
    }
    push_str(&mut body, Some(&record.openid))?;
    push_str(&mut body, record.unionid.as_deref())?;
    // Only a session of another app than the default names its app: a record without one (all
    // of them before several apps) is the default app's.
    if let Some(appid) = &record.appid {
        push_str(&mut body, Some(appid))?;
    }
    Ok(body)
}

fn push_str(body: &mut Vec<u8>, s: Option<&str>) -> Result<(), Error> {
    let Some(s) = s else {
        body.extend_from_slice(&NO_STRING.to_le_bytes());
        return Ok(());
    };
    let len = u16::try_from(s.len())
        .ok()
        .filter(|&len| (len as usize) < MAX_BODY / 4)
        .ok_or_else(|| Error::Storage(format!("an id of {} bytes is too long", s.len())))?;
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(s.as_bytes());
    Ok(())
}

fn decode(body: &[u8]) -> Option<Frame> {
    let mut r = Reader(body);
    let kind = r.take(1)?[0];
    let hash: TokenHash = r.take(32)?.try_into().ok()?;
    match kind {
        REMOVE => Some(Frame::Remove(hash)),
        PUT => Some(Frame::Put(
            hash,
            SessionRecord {
                uid: r.u64()?,
                created_at: r.u64()?,
                last_seen: r.u64()?,
                expires_at: r.u64()?,
                openid: r.string()??,
                unionid: r.string()?,
                appid: match r.0.is_empty() {
                    true => None,
                    false => r.string()?.map(Arc::from),
                },
            },
        )),
        _ => None,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let head = self.0.get(..n)?;
        self.0 = &self.0[n..];
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// `Some(None)` for an absent string, `None` for a body that ends too soon.
    fn string(&mut self) -> Option<Option<String>> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        if len == NO_STRING {
            return Some(None);
        }
        let bytes = self.take(len as usize)?;
        Some(Some(String::from_utf8(bytes.to_vec()).ok()?))
    }
}

/// Runs `work` on a thread of its own in Linux's `SCHED_IDLE` class and waits for it.
///
/// There it runs on CPU time nothing else wants, and a thread that wakes (a login's worker, a
/// client on the same machine) takes the core from it at once: at nice 19 a rewrite still held
/// cores that woken threads then waited for, and at a third of the broker's capacity logins' p99
/// went from 5 to 13 ms while it ran. `work` must take no lock the broker waits for: a starved
/// thread would hold it (the caller takes them, at its own priority, which an unprivileged thread
/// cannot get back once it has left it). `work` paces itself with [`Pace`].
fn in_idle_time<T: Send>(work: impl FnOnce() -> Result<T, Stop> + Send) -> Result<T, Stop> {
    std::thread::scope(|scope| {
        let idle = std::thread::Builder::new()
            .name("wxbroker-rewrite".into())
            .spawn_scoped(scope, || {
                idle_priority();
                work()
            })
            .map_err(|e| Error::Storage(format!("cannot start a thread to rewrite: {e}")))?;
        idle.join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Rests of a rewrite between its stretches of work: after each in which it had its core at least
/// half the time, as long as the CPU time it got.
///
/// In `SCHED_IDLE` it gives way at once to a thread that wakes on its core, but a core it keeps
/// busy still costs the broker: on a 2-core virtual machine at 6,000 logins/s, a process of that
/// class reading the page cache without rest took logins' p99.9 from 3-6 to 8-27 ms, and one that
/// rested as long as it read left them at 5-7 ms (a core that falls idle also takes over a thread
/// queued on the other one). So it takes half a core at most. After a stretch in which others had
/// its core most of the time it does not rest: the cores were busy anyway, so a rest would spare
/// nothing, and a thread of its class waits long to run again after a sleep. The measurements
/// are in `benches/HISTORY.md`.
struct Pace {
    since: Instant,
    ran: Duration,
    steps: u32,
    /// Time slept so far.
    rested: Duration,
}

/// Work between two rests of a rewrite.
const STRETCH: Duration = Duration::from_millis(1);

impl Pace {
    fn new() -> Pace {
        Pace {
            since: Instant::now(),
            ran: thread_cpu_time(),
            steps: 0,
            rested: Duration::ZERO,
        }
    }

    /// Called for each frame; at the end of a stretch, rests if it is due (the clocks are read
    /// every 256 frames, some microseconds of work).
    fn step(&mut self) {
        self.steps = self.steps.wrapping_add(1);
        if !self.steps.is_multiple_of(256) {
            return;
        }
        let worked = self.since.elapsed();
        if worked < STRETCH {
            return;
        }
        let ran = thread_cpu_time();
        let rest = rest_after(worked, ran.saturating_sub(self.ran));
        let slept = Instant::now();
        std::thread::sleep(rest);
        // Sleeping costs no CPU time worth reading the clock again for.
        self.since = Instant::now();
        self.rested += self.since - slept;
        self.ran = ran;
    }
}

/// The rest after a stretch of work that took `worked` and got `ran` of CPU time: as long as that,
/// if it got at least half of the stretch.
fn rest_after(worked: Duration, ran: Duration) -> Duration {
    match ran * 2 >= worked {
        true => ran,
        false => Duration::ZERO,
    }
}

/// The calling thread's CPU time; zero if it cannot be read (a rewrite then never rests).
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` outlives the call, which writes only to it.
    match unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } {
        0 => Duration::new(now.tv_sec as u64, now.tv_nsec as u32),
        _ => Duration::ZERO,
    }
}

/// Puts the calling thread in `SCHED_IDLE` (Linux; elsewhere it keeps its priority).
fn idle_priority() {
    #[cfg(target_os = "linux")]
    {
        let idle = libc::sched_param { sched_priority: 0 };
        // SAFETY: the parameter lives across the call, which keeps no pointer to it; `pid` 0 is
        // the calling thread.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(error = %e, "cannot lower the rewrite's priority; it runs at the broker's");
        }
    }
}

fn storage(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Storage(format!("cannot {what} {}: {e}", path.display()))
}

/// The log at `path` fails a check at byte `at`, after it was opened.
fn damaged(path: &Path, at: u64) -> Error {
    Error::Storage(format!(
        "{} is damaged at byte {at} (a frame fails its check); the broker's next start sets the \
         damage aside",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_and_removals_survive_a_reopen_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        log.put(&[1; 32], &SessionRecord::sample(1, None)).unwrap();
        log.put(&[2; 32], &SessionRecord::sample(2, Some("u2")))
            .unwrap();
        log.put(&[1; 32], &SessionRecord::sample(3, None)).unwrap();
        log.remove(&[[2; 32]]);
        log.put(&[4; 32], &SessionRecord::sample(4, Some("u4")))
            .unwrap();
        log.flush().unwrap();
        log.put(&[5; 32], &SessionRecord::sample(5, None)).unwrap();
        let before = log.replay().unwrap();
        assert_eq!(before.len(), 3, "unflushed puts are read too");
        drop(log);

        let log = SessionLog::open(dir.path()).unwrap();
        let after = log.replay().unwrap();
        assert_eq!(after.len(), 2, "the unflushed put is gone");
        assert_eq!(after[&[1; 32]], SessionRecord::sample(3, None));
        assert_eq!(after[&[4; 32]], SessionRecord::sample(4, Some("u4")));
        assert_eq!(log.frames(), 5);
    }

    #[test]
    fn a_torn_or_damaged_tail_is_cut_and_the_log_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        log.put(&[1; 32], &SessionRecord::sample(1, None)).unwrap();
        log.put(&[2; 32], &SessionRecord::sample(2, None)).unwrap();
        log.flush().unwrap();
        drop(log);
        let path = dir.path().join(FILE_NAME);
        let whole = std::fs::read(&path).unwrap();

        // The last frame torn halfway, as a crash during a write leaves it.
        std::fs::write(&path, &whole[..whole.len() - 10]).unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        assert_eq!(log.replay().unwrap().len(), 1);
        log.put(&[3; 32], &SessionRecord::sample(3, None)).unwrap();
        log.flush().unwrap();
        drop(log);
        let log = SessionLog::open(dir.path()).unwrap();
        let sessions = log.replay().unwrap();
        assert!(sessions.contains_key(&[1; 32]) && sessions.contains_key(&[3; 32]));
        drop(log);

        // Zeros where frames were being written, as a power loss can leave them.
        let mut zeroed = whole.clone();
        zeroed.extend_from_slice(&[0; 4096]);
        std::fs::write(&path, &zeroed).unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        assert_eq!(log.frames(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole.len() as u64);
        drop(log);

        // A flipped bit in the first frame, a whole one after it: damage, not a torn tail.
        let mut damaged = whole.clone();
        damaged[HEADER + 5] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        assert_eq!(log.replay().unwrap().keys().collect::<Vec<_>>(), [&[2; 32]]);
        assert_eq!(set_aside(dir.path()), [damaged]);
    }

    /// The offsets of the frames of a whole log, and its length last.
    fn boundaries(log: &[u8]) -> Vec<usize> {
        let mut at = vec![0];
        while *at.last().unwrap() < log.len() {
            let start = *at.last().unwrap();
            let len = u32::from_le_bytes(log[start..start + 4].try_into().unwrap()) as usize;
            at.push(start + HEADER + len);
        }
        at
    }

    /// The contents of the damaged logs set aside in `dir`.
    fn set_aside(dir: &Path) -> Vec<Vec<u8>> {
        let mut found: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let secs = name.strip_prefix(&format!("{FILE_NAME}.{DAMAGED_EXT}."));
                secs.is_some_and(|secs| secs.split('-').next().unwrap().parse::<u64>().is_ok())
            })
            .map(|entry| {
                let mode = entry.metadata().unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{:?}", entry.file_name());
                std::fs::read(entry.path()).unwrap()
            })
            .collect();
        found.sort();
        found
    }

    #[test]
    fn damage_before_whole_frames_drops_the_sessions_before_it_and_keeps_the_frames_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let log = SessionLog::open(dir.path()).unwrap();
        for uid in 1..=4u8 {
            log.put(&[uid; 32], &SessionRecord::sample(uid.into(), None))
                .unwrap();
        }
        // Frame 4: session 1 logs out (the frame about to be damaged).
        log.remove(&[[1; 32]]);
        // Then: a new session, session 2 slid (a put of it again), session 3 logs out.
        log.put(&[5; 32], &SessionRecord::sample(5, None)).unwrap();
        log.put(&[2; 32], &SessionRecord::sample(20, None)).unwrap();
        log.remove(&[[3; 32]]);
        log.flush().unwrap();
        drop(log);
        let whole = std::fs::read(&path).unwrap();
        let at = boundaries(&whole);
        assert_eq!(at.len(), 9);

        let mut damaged = whole.clone();
        damaged[at[4] + HEADER + 7] ^= 0x10;
        std::fs::write(&path, &damaged).unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        let sessions = log.replay().unwrap();
        // Session 1's logout is what was damaged: it must not come back, nor can session 4,
        // whose logout could have been there as well. Sessions 2 and 5 were written after it.
        let mut kept: Vec<_> = sessions.iter().map(|(hash, r)| (hash[0], r.uid)).collect();
        kept.sort();
        assert_eq!(kept, [(2, 20), (5, 5)]);
        assert_eq!(log.frames(), 3);
        // The log holds the frames after the damage, the damaged file is kept whole beside it.
        assert_eq!(std::fs::read(&path).unwrap(), &whole[at[5]..]);
        assert_eq!(set_aside(dir.path()), [damaged.clone()]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // It goes on as a log: written, compacted, opened again without more damage found.
        log.put(&[6; 32], &SessionRecord::sample(6, None)).unwrap();
        log.flush().unwrap();
        assert!(log.compact().unwrap().is_some());
        drop(log);
        let log = SessionLog::open(dir.path()).unwrap();
        let mut uids: Vec<_> = log.replay().unwrap().values().map(|r| r.uid).collect();
        uids.sort();
        assert_eq!(uids, [5, 6, 20]);
        assert_eq!(set_aside(dir.path()), [damaged]);
    }

    #[test]
    fn frames_are_found_again_after_any_damage_and_only_what_follows_the_last_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let log = SessionLog::open(dir.path()).unwrap();
        for uid in 0..12u8 {
            log.put(&[uid; 32], &SessionRecord::sample(uid.into(), None))
                .unwrap();
        }
        log.flush().unwrap();
        drop(log);
        let whole = std::fs::read(&path).unwrap();
        let at = boundaries(&whole);
        let kept_after = |first: usize| -> Vec<u8> { (first as u8..12).collect() };
        /// What a case does to the log.
        type Damage<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
        let cases: [(&str, Damage, Vec<u8>); 6] = [
            (
                "a length that reaches past the next frames",
                Box::new(|log| log[at[3]..at[3] + 4].copy_from_slice(&4000u32.to_le_bytes())),
                kept_after(4),
            ),
            (
                "a length too short for any frame",
                Box::new(|log| log[at[3]..at[3] + 4].copy_from_slice(&3u32.to_le_bytes())),
                kept_after(4),
            ),
            (
                "a wrong CRC",
                Box::new(|log| log[at[3] + 4] ^= 1),
                kept_after(4),
            ),
            (
                "zeros over three frames and into a fourth",
                Box::new(|log| log[at[2]..at[5] + 9].fill(0)),
                kept_after(6),
            ),
            (
                "two damaged places",
                Box::new(|log| {
                    log[at[1] + 20] ^= 0xff;
                    log[at[7] + 40] ^= 0xff;
                }),
                kept_after(8),
            ),
            (
                "damage, whole frames, then a torn tail",
                Box::new(|log| {
                    log[at[2] + 20] ^= 0xff;
                    log.truncate(at[11] + 30);
                }),
                (3..11).collect(),
            ),
        ];
        for (case, damage, kept) in cases {
            let _ = std::fs::remove_dir_all(dir.path());
            std::fs::create_dir(dir.path()).unwrap();
            let mut damaged = whole.clone();
            damage(&mut damaged);
            std::fs::write(&path, &damaged).unwrap();
            let log = SessionLog::open(dir.path()).unwrap();
            let mut found: Vec<u8> = log.replay().unwrap().keys().map(|h| h[0]).collect();
            found.sort();
            assert_eq!(found, kept, "{case}");
            assert_eq!(log.frames(), kept.len() as u64, "{case}");
            assert_eq!(set_aside(dir.path()), [damaged], "{case}");
        }
    }

    #[test]
    fn a_log_damaged_while_open_is_neither_replayed_nor_rewritten_past_the_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let log = SessionLog::open(dir.path()).unwrap();
        log.put(&[1; 32], &SessionRecord::sample(1, None)).unwrap();
        log.remove(&[[1; 32]]);
        log.put(&[2; 32], &SessionRecord::sample(2, None)).unwrap();
        log.put(&[2; 32], &SessionRecord::sample(3, None)).unwrap();
        log.flush().unwrap();
        let whole = std::fs::read(&path).unwrap();
        let at = boundaries(&whole);
        // The removal goes bad on the disk.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff], (at[1] + HEADER + 3) as u64)
            .unwrap();
        assert!(matches!(log.replay(), Err(Error::Storage(m)) if m.contains("damaged")));
        assert!(matches!(log.compact(), Err(Error::Storage(m)) if m.contains("damaged")));
        assert_eq!(std::fs::read(&path).unwrap().len(), whole.len());
        drop(log);
        let log = SessionLog::open(dir.path()).unwrap();
        let sessions = log.replay().unwrap();
        assert_eq!(sessions.keys().collect::<Vec<_>>(), [&[2; 32]]);
    }

    #[test]
    fn removals_before_and_after_a_compaction_stay_removed() {
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        for uid in 1..=3u8 {
            log.put(&[uid; 32], &SessionRecord::sample(uid.into(), None))
                .unwrap();
        }
        log.flush().unwrap();
        // Removed and not yet flushed when the compaction reads the file.
        log.remove(&[[1; 32]]);
        assert!(log.compact().unwrap().is_some());
        // Removed after the compaction, into the new file.
        log.remove(&[[2; 32]]);
        log.flush().unwrap();
        drop(log);

        let log = SessionLog::open(dir.path()).unwrap();
        let live = log.replay().unwrap();
        assert_eq!(live.keys().collect::<Vec<_>>(), [&[3; 32]]);
    }

    #[test]
    fn what_is_flushed_during_a_compaction_is_copied_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        for round in 0..10 {
            for uid in 1..=4u8 {
                log.put(&[uid; 32], &SessionRecord::sample(round, None))
                    .unwrap();
            }
        }
        log.flush().unwrap();
        let tmp = compaction_path(&log.path);
        let Ok(opened) = log.opened() else {
            panic!("the log does not open");
        };
        let Ok(mut prepared) = log.prepare_compaction(&tmp, opened.0, opened.1) else {
            panic!("the compaction failed");
        };
        // Meanwhile, more than the switch copies: sessions that come and go, copied by the
        // catch-up without the lock.
        let churn = 4_000u64;
        for n in 0..churn {
            let hash = [[7; 8], n.to_le_bytes(), [7; 8], [7; 8]].concat();
            let hash: TokenHash = hash.try_into().unwrap();
            log.put(&hash, &SessionRecord::sample(n, None)).unwrap();
            log.remove([&hash]);
        }
        log.flush().unwrap();
        assert!(log.catch_up(&mut prepared).is_ok());
        // Then a logout, a new session and a slid one, flushed into the old file after the
        // catch-up: the switch copies them.
        log.remove(&[[1; 32]]);
        log.put(&[5; 32], &SessionRecord::sample(50, None)).unwrap();
        log.put(&[2; 32], &SessionRecord::sample(20, None)).unwrap();
        log.flush().unwrap();
        // And one still buffered at the switch.
        log.remove(&[[3; 32]]);
        let before = log.replay().unwrap();

        let Ok(compacted) = log.switch(prepared) else {
            panic!("the switch failed");
        };
        assert_eq!((compacted.read, compacted.kept), (40, 4));
        assert!(compacted.tail_bytes > 0 && compacted.tail_bytes < SWITCH_TAIL);
        assert_eq!(log.frames(), 4 + 2 * churn + 3 + 1);
        assert_eq!(log.replay().unwrap(), before);
        log.flush().unwrap();
        drop(log);
        let log = SessionLog::open(dir.path()).unwrap();
        let after = log.replay().unwrap();
        assert_eq!(after, before);
        let mut uids: Vec<_> = after.values().map(|r| r.uid).collect();
        uids.sort();
        assert_eq!(uids, [9, 20, 50]);
        assert!(!tmp.exists());
    }

    #[test]
    fn a_closed_log_is_never_replaced_by_a_compaction_still_running() {
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        log.put(&[1; 32], &SessionRecord::sample(1, None)).unwrap();
        log.put(&[1; 32], &SessionRecord::sample(2, None)).unwrap();
        log.flush().unwrap();
        let tmp = compaction_path(&log.path);
        let Ok(opened) = log.opened() else {
            panic!("the log does not open");
        };
        let Ok(prepared) = log.prepare_compaction(&tmp, opened.0, opened.1) else {
            panic!("the compaction failed");
        };
        log.close();
        assert!(matches!(log.switch(prepared), Err(Stop::Closed)));
        assert_eq!(log.compact().unwrap(), None);
        assert_eq!(log.frames(), 2);
    }

    #[test]
    fn a_compaction_cut_short_leaves_the_log_whole_and_its_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        log.put(&[1; 32], &SessionRecord::sample(1, None)).unwrap();
        log.flush().unwrap();
        let leftovers = [
            compaction_path(&log.path),
            dir.path().join(format!("{FILE_NAME}.tmp")),
        ];
        drop(log);
        for leftover in &leftovers {
            std::fs::write(leftover, b"half a compaction").unwrap();
        }

        let log = SessionLog::open(dir.path()).unwrap();
        assert_eq!(log.replay().unwrap().len(), 1);
        for leftover in &leftovers {
            assert!(!leftover.exists(), "{}", leftover.display());
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_rewrite_reads_in_idle_time_and_its_caller_keeps_its_priority() {
        // SAFETY: sched_getscheduler reads no memory of ours.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        assert_eq!(in_idle_time(|| Ok(policy())).ok(), Some(libc::SCHED_IDLE));
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        log.put(&[1; 32], &SessionRecord::sample(1, None)).unwrap();
        log.flush().unwrap();
        assert!(log.compact().unwrap().is_some());
        // The switch, under the file's lock, ran here.
        assert_eq!(policy(), libc::SCHED_OTHER);
    }

    #[test]
    fn a_rewrite_rests_as_long_as_it_ran_unless_others_had_its_core() {
        let ms = Duration::from_millis;
        assert_eq!(rest_after(ms(1), ms(1)), ms(1));
        assert_eq!(rest_after(ms(10), ms(5)), ms(5));
        // It ran in others' gaps: a rest would only slow it.
        assert_eq!(rest_after(ms(10), ms(4)), Duration::ZERO);
    }

    #[test]
    fn a_rewrite_takes_half_a_core_at_most() {
        let (mut pace, start, cpu) = (Pace::new(), Instant::now(), thread_cpu_time());
        let mut work = 0u64;
        while start.elapsed() < 20 * STRETCH {
            pace.step();
            work = std::hint::black_box(work.wrapping_add(1));
        }
        let (wall, ran) = (start.elapsed(), thread_cpu_time() - cpu);
        // A stretch either got less than half its time or was followed by a rest as long as
        // what it got; the last one may end with the loop, before its rest.
        assert!(ran <= wall / 2 + STRETCH * 2, "ran {ran:?} of {wall:?}");
    }

    #[test]
    fn compaction_keeps_exactly_the_live_sessions_and_shrinks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::open(dir.path()).unwrap();
        for round in 0..50 {
            for uid in 0..20u8 {
                log.put(
                    &[uid; 32],
                    &SessionRecord::sample(u64::from(uid) + round, None),
                )
                .unwrap();
            }
        }
        log.remove(&[[0; 32]]);
        let live = log.replay().unwrap();
        assert_eq!(live.len(), 19);
        log.flush().unwrap();
        let path = dir.path().join(FILE_NAME);
        let before = std::fs::metadata(&path).unwrap().len();
        assert!(!log.needs_compacting(19), "under the slack");

        log.compact().unwrap();
        log.put(&[30; 32], &SessionRecord::sample(30, None))
            .unwrap();
        log.flush().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < before / 40);
        assert_eq!(log.frames(), 20);
        drop(log);
        let mut expected = live;
        expected.insert([30; 32], SessionRecord::sample(30, None));
        assert_eq!(
            SessionLog::open(dir.path()).unwrap().replay().unwrap(),
            expected
        );
    }
}
