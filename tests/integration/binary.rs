//! The real `wxbroker` binary: start-up failures, SIGTERM, and kill -9 in the middle of writes.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use wxbroker::storage::sled::session_log::SessionLog;

use crate::support::client;

/// A `wxbroker` process (in sandbox mode unless told otherwise) on a free loopback port.
pub struct Process {
    pub child: Child,
    pub url: String,
    pub log: Arc<Mutex<String>>,
}

/// The binary, with no `WECHAT_*` or `WXBROKER_*` setting from the environment of the tests.
pub fn command(data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wxbroker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("WECHAT_") || name.starts_with("WXBROKER_") {
            command.env_remove(name);
        }
    }
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--login-rate-per-min",
            "0",
            "--cache-mb",
            "16",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

impl Process {
    pub async fn start(data_dir: &Path) -> Process {
        Process::spawn(command(data_dir)).await
    }

    /// Starts `command` (see [`command`]) and waits until it serves.
    pub async fn spawn(mut command: Command) -> Process {
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let url = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
                if let Some(addr) = line.split("addr=").nth(1) {
                    return format!("http://{}", addr.split_whitespace().next().unwrap());
                }
            }
            panic!("wxbroker exited before serving: {}", log.lock().unwrap());
        })
        .await
        .expect("wxbroker serves within 20 s");
        // Keep draining its output so that it never blocks on a full pipe.
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Process { child, url, log }
    }

    pub async fn kill9(mut self) {
        self.child.kill().await.unwrap();
    }
}

#[tokio::test]
async fn an_unusable_data_dir_is_a_clear_message_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let output = command(&file).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not-a-directory") && stderr.contains("WXBROKER_DATA_DIR"),
        "{stderr}"
    );
    let all = format!("{stderr}{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        !all.contains("panicked") && !all.contains("backtrace"),
        "{all}"
    );
}

#[tokio::test]
async fn sigterm_drains_flushes_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::start(dir.path()).await;
    let http = client();
    let login = http
        .post(format!("{}/v1/login", process.url))
        .form(&[("code", "term.1")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let pid = process.child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut child = process.child;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(process.log.lock().unwrap().contains("stopped cleanly"));
}

/// What the clients were told before the kill.
#[derive(Default)]
struct Acknowledged {
    /// name -> uid of every registration answered 200 with isNew.
    registrations: HashMap<String, u64>,
    /// Round and token of every logout answered 204.
    logouts: Vec<(usize, String)>,
}

const ROUNDS: usize = 24;
const WORKERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let mut checked_registrations = 0;
    let mut checked_logouts = 0;
    for round in 0..=ROUNDS {
        // The database opens every time, and what was acknowledged before is all there.
        let process = Process::start(dir.path()).await;
        let (registrations, logouts) = check_acknowledged(&process, &acked, round, ROUNDS).await;
        checked_registrations += registrations;
        checked_logouts += logouts;
        if round == ROUNDS {
            break;
        }

        let workers: Vec<_> = (0..WORKERS)
            .map(|worker| tokio::spawn(drive(process.url.clone(), round, worker, acked.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(rand::random_range(50..400))).await;
        process.kill9().await;
        for worker in workers {
            worker.await.unwrap();
        }
    }
    let acked = acked.lock().unwrap();
    let mut uids: Vec<u64> = acked.registrations.values().copied().collect();
    let registered = uids.len();
    uids.sort_unstable();
    uids.dedup();
    assert_eq!(uids.len(), registered, "a uid was handed out twice");
    eprintln!(
        "crash test: {ROUNDS} kill -9 rounds, {} acknowledged registrations and {} acknowledged \
         logouts; {checked_registrations} registration checks and {checked_logouts} logout checks \
         after restarts; lost: 0",
        acked.registrations.len(),
        acked.logouts.len()
    );
    assert!(
        acked.registrations.len() >= ROUNDS,
        "the load did register users"
    );
    assert!(!acked.logouts.is_empty(), "the load did log out");
}

/// Checks, on a broker restarted after round `round - 1` was killed, what was acknowledged in that
/// round (everything at the `last` round): registrations keep their uids, logouts stay out.
/// Returns how many registrations and logouts it checked.
async fn check_acknowledged(
    process: &Process,
    acked: &Mutex<Acknowledged>,
    round: usize,
    last: usize,
) -> (usize, usize) {
    let http = client();
    let (registrations, logouts) = {
        let acked = acked.lock().unwrap();
        let checked = |r: usize| round == last || r + 1 == round;
        let names: Vec<(String, u64)> = acked
            .registrations
            .iter()
            .filter(|(name, _)| checked(round_of(name)))
            .map(|(n, u)| (n.clone(), *u))
            .collect();
        let tokens: Vec<String> = acked
            .logouts
            .iter()
            .filter(|(r, _)| checked(*r))
            .map(|(_, t)| t.clone())
            .collect();
        (names, tokens)
    };
    for (name, uid) in &registrations {
        let response = http
            .post(format!("{}/v1/login", process.url))
            .form(&[("code", format!("{name}.check{round}"))])
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            (body["uid"].as_u64(), body["isNew"].as_bool()),
            (Some(*uid), Some(false)),
            "{name}: {body}"
        );
    }
    for token in &logouts {
        let response = http
            .get(format!("{}/v1/session", process.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "a logout came back"
        );
    }
    (registrations.len(), logouts.len())
}

const COMPACTION_ROUNDS: usize = 6;
/// Sessions that came and went, appended to the log while no broker runs (two frames each): far
/// more superseded frames than live ones, so the first sweep has the log rewritten.
const ENDED_SESSIONS: u64 = 100_000;

/// kill -9 at a random moment of a rewrite of the session log, with logins and logouts going on:
/// what was acknowledged before the kill is all there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_during_compactions() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let (mut checked_registrations, mut checked_logouts) = (0, 0);
    let (mut cut_short, mut finished) = (0, 0);
    for round in 0..=COMPACTION_ROUNDS {
        if round < COMPACTION_ROUNDS {
            append_ended_sessions(dir.path(), round as u64);
        }
        let mut command = command(dir.path());
        command.args(["--sweep-interval-secs", "1"]);
        let process = Process::spawn(command).await;
        let (registrations, logouts) =
            check_acknowledged(&process, &acked, round, COMPACTION_ROUNDS).await;
        checked_registrations += registrations;
        checked_logouts += logouts;
        if round == COMPACTION_ROUNDS {
            break;
        }

        let workers: Vec<_> = (0..WORKERS)
            .map(|worker| tokio::spawn(drive(process.url.clone(), round, worker, acked.clone())))
            .collect();
        // The first sweep starts the rewrite; its file shows that it is writing.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while compaction_file(dir.path()).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "no compaction started: {}",
                process.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..600))).await;
        let log = process.log.clone();
        process.kill9().await;
        if compaction_file(dir.path()).is_some() {
            cut_short += 1;
        } else if log.lock().unwrap().contains("rewrote the session log") {
            finished += 1;
        }
        for worker in workers {
            worker.await.unwrap();
        }
    }
    let acked = acked.lock().unwrap();
    eprintln!(
        "crash test during compactions: {COMPACTION_ROUNDS} kill -9 rounds ({cut_short} while \
         the new log was being written, {finished} after it replaced the old one), {} \
         acknowledged registrations and {} acknowledged logouts; {checked_registrations} \
         registration checks and {checked_logouts} logout checks after restarts; lost: 0",
        acked.registrations.len(),
        acked.logouts.len()
    );
    assert!(cut_short > 0, "no kill landed during a compaction");
    assert!(!acked.logouts.is_empty(), "the load did log out");
}

/// Appends sessions that were issued and ended to the data dir's log (no broker may run on it).
fn append_ended_sessions(dir: &Path, round: u64) {
    let log = SessionLog::open(dir).unwrap();
    for n in 0..ENDED_SESSIONS {
        let mut hash = [0xee; 32];
        hash[..8].copy_from_slice(&(round * ENDED_SESSIONS + n).to_le_bytes());
        let record = wxbroker::SessionRecord {
            uid: u64::MAX - n,
            openid: "o-ended".into(),
            unionid: None,
            created_at: 1,
            last_seen: 1,
            expires_at: 2,
        };
        log.put(&hash, &record).unwrap();
        log.remove([&hash]);
    }
    log.flush().unwrap();
}

/// The file of a compaction in progress, if there is one.
fn compaction_file(dir: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("sessions.log.compact")
        })
}

/// The round a user name was registered in (`r{round}w{worker}u{i}`).
fn round_of(name: &str) -> usize {
    name[1..name.find('w').unwrap()].parse().unwrap()
}

/// One client: registers new users and logs out every other session, until the broker dies.
async fn drive(url: String, round: usize, worker: usize, acked: Arc<Mutex<Acknowledged>>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for i in 0..10_000 {
        let name = format!("r{round}w{worker}u{i}");
        // Two logins of the new user at once (a mini program double-firing at launch): whichever
        // answer arrives, returning or not, acknowledges the registration.
        let login = |n: u32| {
            let request = http
                .post(format!("{url}/v1/login"))
                .form(&[("code", format!("{name}.{n}"))]);
            async move {
                let body: serde_json::Value = request.send().await.ok()?.json().await.ok()?;
                Some((
                    body["uid"].as_u64()?,
                    body["thirdSession"].as_str()?.to_owned(),
                ))
            }
        };
        let (first, second) = tokio::join!(login(1), login(2));
        if let (Some((a, _)), Some((b, _))) = (&first, &second) {
            assert_eq!(a, b, "one user, one uid");
        }
        let Some((uid, token)) = first.or(second) else {
            return;
        };
        acked.lock().unwrap().registrations.insert(name, uid);
        if i % 2 == 0 {
            let Ok(response) = http
                .post(format!("{url}/v1/logout"))
                .bearer_auth(&token)
                .send()
                .await
            else {
                return;
            };
            if response.status() == StatusCode::NO_CONTENT {
                acked
                    .lock()
                    .unwrap()
                    .logouts
                    .push((round, token.to_owned()));
            }
        }
    }
}
