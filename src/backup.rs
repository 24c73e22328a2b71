//! Offline backup and restore of the users, as JSON lines (`wxbroker export`, `wxbroker import`).
//!
//! One line per user, in the shape of the `/v1/me` answer ([`User`]). Never written: the
//! session_key (WeChat's key to the user's encrypted data, which must not leave the process) and
//! the sessions (neither tokens nor their hashes). So a restored user logs in again, which also
//! stores a fresh session_key; until then, encrypted data of that user cannot be decrypted.
//!
//! Both work on the data dir of a stopped broker: sled locks the directory, so while a broker
//! serves on it the open fails, with a message that says to stop the broker first. A serving
//! broker, on sled or Redis, writes the same lines at `GET /admin/export`.
//!
//! [`migrate_to_redis`] (`wxbroker migrate`) moves a single-node deployment to a shared Redis:
//! there the session_keys and live sessions go along, since they stay inside the deployment.

use std::io::{BufRead, Write};
use std::path::Path;

use crate::session::SessionPolicy;
use crate::storage::redis::Redis;
use crate::storage::sled::DataDir;
use crate::user::{Identity, UserKey, UserRecord};
use crate::{Error, User};

/// Opens the data dir of a stopped broker to export from it.
///
/// The directory must already hold a database: a mistyped path must not give an empty backup.
pub fn open_for_export(dir: &Path, cache_mb: u64) -> Result<DataDir, Error> {
    // sled keeps its log in the file `db`; a directory without one never held a broker's data.
    if !dir.join("db").is_file() {
        return Err(Error::Storage(format!(
            "there is no wxbroker database in {}: point --data-dir (or WXBROKER_DATA_DIR) at the \
             data dir of a broker",
            dir.display()
        )));
    }
    open_offline(dir, cache_mb)
}

/// Opens (or creates) the data dir of a stopped broker to import into it.
pub fn open_for_import(dir: &Path, cache_mb: u64) -> Result<DataDir, Error> {
    open_offline(dir, cache_mb)
}

fn open_offline(dir: &Path, cache_mb: u64) -> Result<DataDir, Error> {
    DataDir::open(dir, cache_mb).map_err(|err| match err {
        Error::Storage(message) if message.contains(crate::storage::sled::LOCKED) => {
            Error::Storage(format!(
                "the data dir {} is in use, most likely by a running wxbroker: stop the broker \
                 first (export and import work offline, on a stopped broker's data dir)",
                dir.display()
            ))
        }
        other => other,
    })
}

/// What [`migrate_to_redis`] moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migrated {
    /// Users written, with their uids, session_keys, profiles and phones.
    pub users: u64,
    /// Users left as they were, because Redis had them already.
    pub users_kept: u64,
    /// Sessions written (those dead at `now`, or already in Redis, are left out).
    pub sessions: u64,
}

/// Copies every user of a stopped broker's sled data dir `data` into `redis`, keeping uids (the uid
/// counter moves past the largest) and session_keys, and every session live at `now`, keeping its
/// expiry under `policy`, so that clients stay logged in. What Redis holds already is kept.
///
/// Refused if a migration into `redis` finished before, unless `force`: once brokers serve on
/// Redis, copying the sled sessions again would bring back those revoked since.
pub async fn migrate_to_redis(
    data: &DataDir,
    redis: &Redis,
    policy: SessionPolicy,
    now: u64,
    force: bool,
) -> Result<Migrated, Error> {
    if let Some(at) = redis.migrated_at().await?
        && !force
    {
        return Err(Error::InvalidRequest(format!(
            "this Redis already holds a migration (finished at unix time {at}); running it again \
             would bring back sessions revoked since. Add --force to copy what is missing anyway"
        )));
    }
    if let Some(appid) = data.users().default_app()?
        && let held = redis.claim_default_app(&appid).await?
        && held != appid
    {
        return Err(Error::Config(format!(
            "Redis holds the users of the mini program {held} as its default app, and the data \
             dir those of {appid}: migrate into a Redis of their own"
        )));
    }
    let mut moved = Migrated {
        users: 0,
        users_kept: 0,
        sessions: 0,
    };
    for user in data.users().iter() {
        if redis.import_user(&user?).wait().await? {
            moved.users += 1;
        } else {
            moved.users_kept += 1;
        }
    }
    for (hash, record) in data.session_log().replay()? {
        if redis
            .import_session(policy, &hash, &record, now)
            .wait()
            .await?
        {
            moved.sessions += 1;
        }
    }
    redis.mark_migrated(now).await?;
    Ok(moved)
}

/// Writes every user of `data` to `out`, one [`User`] JSON object per line, in openid
/// order, then flushes `out`. Returns how many users were written.
pub fn export(data: &DataDir, out: &mut impl Write) -> Result<u64, Error> {
    let write_failed = |e: std::io::Error| Error::Storage(format!("cannot write the export: {e}"));
    let mut count = 0;
    for record in data.users().iter() {
        let line = serde_json::to_string(&User::from(record?))
            .map_err(|e| Error::Storage(format!("cannot encode a user: {e}")))?;
        writeln!(out, "{line}").map_err(write_failed)?;
        count += 1;
    }
    out.flush().map_err(write_failed)?;
    Ok(count)
}

/// Reads lines written by [`export`] into `data`, keeping each user's uid (the uid counter moves
/// past the largest, so no uid is handed out twice), then flushes the data dir. Returns how many
/// users were imported.
///
/// A user whose openid is already in the data dir is replaced, keeping the stored session_key (the
/// one WeChat last gave); a new one gets an empty session_key until its next login. Blank lines
/// are skipped. A bad line is an error naming its number; the lines before it stay imported
/// and are flushed, and importing the same file again after fixing it is harmless. A last line
/// without its newline is a bad line: the file was cut short (an export ends every line).
pub fn import(data: &DataDir, input: impl BufRead) -> Result<u64, Error> {
    let mut count = 0;
    let result = import_lines(data, input, &mut count);
    // Even after a bad line: what was imported before it is acknowledged by the error message.
    data.flush()?;
    result.map(|()| count)
}

fn import_lines(data: &DataDir, mut input: impl BufRead, count: &mut u64) -> Result<(), Error> {
    // The default app's identities are filed without an appid: a line that names it (written by
    // hand; exports leave it out) is one of them.
    let default_app = data.users().default_app()?;
    let mut bytes = Vec::new();
    for number in 1u64.. {
        let at_line = |what: String| {
            Error::InvalidRequest(format!(
                "line {number}: {what}; users imported before it: {count}"
            ))
        };
        bytes.clear();
        match input.read_until(b'\n', &mut bytes) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(at_line(format!("cannot be read: {e}"))),
        }
        let line = std::str::from_utf8(&bytes)
            .map_err(|e| at_line(format!("cannot be read: not UTF-8 ({e})")))?;
        if line.trim().is_empty() {
            continue;
        }
        // An export ends every line with a newline: a last line without one was cut short (an
        // export over HTTP that failed midway, a copy that stopped), even if it parses.
        let Some(line) = line.strip_suffix('\n') else {
            return Err(at_line(
                "has no newline at its end: the file was cut short, it is not a whole export"
                    .into(),
            ));
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut user: User = serde_json::from_str(line).map_err(|e| at_line(json_error(&e)))?;
        if user.appid.is_some() && user.appid == default_app {
            user.appid = None;
        }
        if user.uid == 0 || user.openid.is_empty() {
            return Err(at_line(
                "uid must be at least 1 and openid must not be empty".into(),
            ));
        }
        let session_key = data
            .users()
            .find(&UserKey::Identity(Identity {
                appid: user.appid.clone(),
                openid: user.openid.clone(),
            }))?
            .map(|stored| stored.session_key)
            .unwrap_or_default();
        let record = UserRecord {
            uid: user.uid,
            appid: user.appid,
            openid: user.openid,
            unionid: user.unionid,
            session_key,
            created_at: user.created_at,
            updated_at: user.updated_at,
            profile: user.profile,
            phone: user.phone,
        };
        data.users().import(&record).map_err(|err| match err {
            Error::InvalidRequest(what) | Error::Storage(what) => at_line(what),
            other => other,
        })?;
        *count += 1;
    }
    Ok(())
}

/// serde_json's message without its "at line 1 column N": within one line only the column means
/// anything, and a second line number would confuse the one that counts.
fn json_error(err: &serde_json::Error) -> String {
    let message = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    let message = message.strip_suffix(&position).unwrap_or(&message);
    format!("not an exported user: {message} (column {})", err.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(uid: u64, openid: &str) -> String {
        format!(
            r#"{{"uid":{uid},"openid":"{openid}","unionid":null,"profile":null,"phone":null,"createdAt":1,"updatedAt":2}}"#
        )
    }

    #[test]
    fn a_line_naming_the_default_app_is_the_default_apps_identity() {
        let dir = tempfile::tempdir().unwrap();
        let data = open_for_import(dir.path(), 8).unwrap();
        data.users().claim_default_app("wxdefault").unwrap();
        let named = line(4, "o-d").replacen(r#""openid""#, r#""appid":"wxdefault","openid""#, 1);
        let other = line(5, "o-e").replacen(r#""openid""#, r#""appid":"wxother","openid""#, 1);
        import(&data, format!("{named}\n{other}\n").as_bytes()).unwrap();
        let found = |key| data.users().find(&key).unwrap().map(|user| user.uid);
        assert_eq!(found(UserKey::Openid("o-d".into())), Some(4));
        assert_eq!(found(UserKey::Openid("o-e".into())), None);
        let other = Identity {
            appid: Some("wxother".into()),
            openid: "o-e".into(),
        };
        assert_eq!(found(UserKey::Identity(other)), Some(5));
    }

    #[test]
    fn an_imported_identity_that_leaves_a_uid_leaves_its_first_identity_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let data = open_for_import(dir.path(), 8).unwrap();
        let (ann, _) = data
            .users()
            .upsert(None, "o-ann", "k1", Some("u-ann"), 1)
            .unwrap();
        let (lite, is_new) = data
            .users()
            .upsert(Some("wxlite"), "l-ann", "k2", Some("u-ann"), 2)
            .unwrap();
        assert_eq!((lite.uid, is_new), (ann.uid, false));
        // The lite identity moves to uid 7: uid 1 keeps its first identity, without the link.
        let moved = line(7, "l-ann").replacen(r#""openid""#, r#""appid":"wxlite","openid""#, 1);
        import(&data, format!("{moved}\n").as_bytes()).unwrap();
        let first = data.users().find(&UserKey::Uid(ann.uid)).unwrap().unwrap();
        assert_eq!(first.openid, "o-ann");
        let identities = data.users().identities(ann.uid).unwrap();
        assert!(
            !identities.iter().any(|id| id.openid == "l-ann"),
            "{identities:?}"
        );
    }

    #[test]
    fn import_keeps_uids_and_moves_the_counter_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let data = open_for_import(dir.path(), 8).unwrap();
        let input = format!("{}\n\n{}\n", line(7, "o-a"), line(3, "o-b"));
        assert_eq!(import(&data, input.as_bytes()).unwrap(), 2);
        let b = data.users().find(&UserKey::Uid(3)).unwrap().unwrap();
        assert_eq!((b.openid.as_str(), b.session_key.as_str()), ("o-b", ""));
        let (new, is_new) = data.users().upsert(None, "o-new", "k", None, 5).unwrap();
        assert_eq!((new.uid, is_new), (8, true));
    }

    #[test]
    fn a_user_already_stored_keeps_its_session_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = open_for_import(dir.path(), 8).unwrap();
        let (user, _) = data.users().upsert(None, "o-a", "key-a", None, 1).unwrap();
        import(&data, format!("{}\n", line(user.uid, "o-a")).as_bytes()).unwrap();
        let stored = data.users().find(&UserKey::Openid("o-a".into())).unwrap();
        assert_eq!(stored.unwrap().session_key, "key-a");
    }

    #[test]
    fn a_bad_line_names_its_number_and_keeps_the_lines_before() {
        let dir = tempfile::tempdir().unwrap();
        let data = open_for_import(dir.path(), 8).unwrap();
        let bad = [
            (r#"{"uid":1}"#, "missing field `openid`"),
            (
                r#"{"uid":1,"openid":"o","sessionKey":"k"}"#,
                "unknown field `sessionKey`",
            ),
            ("not json", "not an exported user"),
            (&line(0, "o-zero"), "uid must be at least 1"),
            // uid 1 is o-a's already.
            (
                &line(1, "o-other"),
                "uid 1 already belongs to another openid",
            ),
        ];
        for (bad, expected) in bad {
            let input = format!(
                "{}\n{}\n{bad}\n{}\n",
                line(1, "o-a"),
                line(2, "o-b"),
                line(3, "o-c")
            );
            let err = import(&data, input.as_bytes()).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidRequest(m) if m.contains("line 3: ") && m.contains(expected)),
                "{bad}: {err}"
            );
            assert_eq!(data.users().count(), 2, "{bad}");
        }
    }

    #[test]
    fn a_last_line_without_its_newline_is_refused_as_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let data = open_for_import(dir.path(), 8).unwrap();
        let whole = format!("{}\n{}\n", line(1, "o-a"), line(2, "o-b"));
        // Cut inside the last line, and just before its newline (it parses, but what came after
        // it is missing).
        for cut in [whole.len() - 20, whole.len() - 1] {
            let err = import(&data, &whole.as_bytes()[..cut]).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidRequest(m) if m.contains("line 2: ") && m.contains("cut short")),
                "{cut}: {err}"
            );
        }
        assert_eq!(data.users().count(), 1);
        // Windows line ends and blank lines (also a last one without a newline) are fine.
        let crlf = format!("{}\r\n\n{}\r\n  ", line(1, "o-a"), line(2, "o-b"));
        assert_eq!(import(&data, crlf.as_bytes()).unwrap(), 2);
    }

    #[test]
    fn export_needs_an_existing_database() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_for_export(&dir.path().join("typo"), 8).err().unwrap();
        assert!(
            matches!(&err, Error::Storage(m) if m.contains("typo") && m.contains("no wxbroker database")),
            "{err}"
        );
    }
}
