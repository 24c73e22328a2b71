//! The real `wxbroker` binary: start-up failures, SIGTERM, and kill -9 in the middle of writes.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use wxbroker::storage::sled::session_log::SessionLog;
use wxbroker::{SANDBOX_APPID, Sandbox, SandboxOptions};

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

/// The binary's stderr and exit code when it starts with `args` (no `WECHAT_*` or `WXBROKER_*`
/// from the tests' environment, `RUST_LOG` off) and `env`.
async fn start_failure(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wxbroker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("WECHAT_") || name.starts_with("WXBROKER_") {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("it stops at once instead of serving")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

/// Without credentials, a listen address that is not loopback would serve the sandbox WeChat,
/// where anyone logs in as anyone: the binary refuses to start, naming what to set, before it
/// opens the address or the data dir.
#[tokio::test]
async fn without_credentials_a_public_address_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let args = ["--listen", "0.0.0.0:0", "--data-dir", data_dir];
    let (code, stderr) = start_failure(&args, &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    for name in [
        "WECHAT_APPID",
        "WECHAT_SECRET",
        "WXBROKER_SANDBOX",
        "0.0.0.0:0",
    ] {
        assert!(stderr.contains(name), "{stderr}");
    }
    assert!(!Path::new(data_dir).exists(), "nothing was started");
}

/// A bad value from an environment variable is named by the variable, which is where the operator
/// set it (a unit, a compose file), not by the flag; from the command line, by the flag.
#[tokio::test]
async fn a_bad_value_is_named_where_it_was_set() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let from_env = |name: &'static str, value: &'static str| (None, (name, value));
    // (a flag and its value on the command line, a variable set, what the error names, what not)
    let cases = [
        (from_env("WXBROKER_LISTEN", "localhost:eighty"), "--listen"),
        (
            from_env("WXBROKER_SESSION_IDLE_TTL", "two hours"),
            "--session-idle-ttl",
        ),
        (from_env("WXBROKER_LOG_FORMAT", "xml"), "--log-format"),
        (from_env("WXBROKER_SANDBOX", "maybe"), "--sandbox"),
        (
            (
                Some(["--listen", "localhost:eighty"]),
                ("WXBROKER_LISTEN", "127.0.0.1:0"),
            ),
            "WXBROKER_LISTEN",
        ),
    ];
    for ((flag, env), not_named) in cases {
        let named = flag.map_or(env.0, |flag| flag[0]);
        let args = [flag.as_slice().concat(), vec!["--data-dir", data_dir]].concat();
        let (code, stderr) = start_failure(&args, &[env]).await;
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(named), "{named}: {stderr}");
        assert!(!stderr.contains(not_named), "{not_named}: {stderr}");
    }
}

/// An admin token shorter than 32 characters could be guessed: the binary refuses to start,
/// saying so, without showing the token.
#[tokio::test]
async fn a_short_admin_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ];
    let env = [("WXBROKER_ADMIN_TOKEN", "admin-token-of-31-characters-xx")];
    let (code, stderr) = start_failure(&args, &env).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("WXBROKER_ADMIN_TOKEN") && stderr.contains("at least 32 characters"),
        "{stderr}"
    );
    assert!(!stderr.contains("admin-token-of-31"), "{stderr}");
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

/// Stops `process` with SIGTERM (a clean stop: everything written is flushed) and waits for it.
async fn terminate(process: Process) {
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
}

/// `POST /v1/login` with `code` on the broker at `url`: status and body.
async fn login(http: &reqwest::Client, url: &str, code: &str) -> (StatusCode, Value) {
    let response = http
        .post(format!("{url}/v1/login"))
        .form(&[("code", code)])
        .send()
        .await
        .unwrap();
    crate::support::parts(response).await
}

/// The status of `GET /v1/session` with `token`.
async fn session_status(http: &reqwest::Client, url: &str, token: &str) -> StatusCode {
    let response = http
        .get(format!("{url}/v1/session"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    response.status()
}

/// The frames of a whole session log: offset and body kind (1 put, 0 removal) of each.
fn frames(log: &[u8]) -> Vec<(usize, u8)> {
    let mut found = Vec::new();
    let mut at = 0;
    while at < log.len() {
        let len = u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
        found.push((at, log[at + 8]));
        at += 8 + len;
    }
    found
}

/// The paths of `dir` and everything under it, with their permission bits.
fn modes(path: &Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let mut found = vec![(path.to_owned(), mode)];
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            found.extend(modes(&entry.unwrap().path()));
        }
    }
    found
}

/// A byte flipped in an early frame of the session log (the logout of the first user) while the
/// broker is stopped: the binary starts on its own, sets the damaged file aside, never lets the
/// logged-out token in again, drops the sessions written before the damage (whose logout may have
/// been there too), keeps those written after it, and says so in one ERROR line. The data dir it
/// created is 0700 and every file in it 0600, the damaged copy too.
#[tokio::test]
async fn a_damaged_session_log_never_brings_a_logout_back_nor_drops_what_follows() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let http = client();
    let process = Process::start(&dir).await;
    let mut tokens = HashMap::new();
    for name in ["ann", "bob", "cid"] {
        let (status, body) = login(&http, &process.url, &format!("{name}.1")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        tokens.insert(name, body["thirdSession"].as_str().unwrap().to_owned());
    }
    let logout = http
        .post(format!("{}/v1/logout", process.url))
        .bearer_auth(&tokens["ann"])
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    for name in ["dee", "eve"] {
        let (status, body) = login(&http, &process.url, &format!("{name}.1")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        tokens.insert(name, body["thirdSession"].as_str().unwrap().to_owned());
    }
    terminate(process).await;

    let path = dir.join("sessions.log");
    let mut log = std::fs::read(&path).unwrap();
    let kinds: Vec<u8> = frames(&log).iter().map(|&(_, kind)| kind).collect();
    assert_eq!(
        kinds,
        [1, 1, 1, 0, 1, 1],
        "three puts, ann's logout, two puts"
    );
    let (logout_at, _) = frames(&log)[3];
    log[logout_at + 8 + 12] ^= 0x40;
    std::fs::write(&path, &log).unwrap();

    let process = Process::start(&dir).await;
    let ann = session_status(&http, &process.url, &tokens["ann"]).await;
    assert_eq!(ann, StatusCode::UNAUTHORIZED, "a logout came back");
    for name in ["bob", "cid"] {
        // Written before the damage: dropped, as a logout of theirs may have been in it.
        let status = session_status(&http, &process.url, &tokens[name]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}");
    }
    for name in ["dee", "eve"] {
        let status = session_status(&http, &process.url, &tokens[name]).await;
        assert_eq!(status, StatusCode::OK, "{name}: written after the damage");
    }
    let damaged: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let secs = name.strip_prefix("sessions.log.damaged.");
            secs.is_some_and(|secs| secs.parse::<u64>().is_ok())
        })
        .map(|entry| std::fs::read(entry.path()).unwrap())
        .collect();
    assert_eq!(damaged, [log], "the damaged file is kept beside the log");
    let errors: Vec<String> = {
        let output = process.log.lock().unwrap();
        let errors = output.lines().filter(|line| line.contains(" ERROR "));
        errors.map(str::to_owned).collect()
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    for count in [
        "kept_frames=2",
        "kept_sessions=2",
        "dropped_frames=3",
        "dropped_sessions=3",
    ] {
        assert!(errors[0].contains(count), "{count}: {}", errors[0]);
    }

    // The log goes on from there: a new session, a clean stop, no damage found at the next start.
    let (status, body) = login(&http, &process.url, "fay.1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokens.insert("fay", body["thirdSession"].as_str().unwrap().to_owned());
    terminate(process).await;
    let process = Process::start(&dir).await;
    for name in ["dee", "eve", "fay"] {
        let status = session_status(&http, &process.url, &tokens[name]).await;
        assert_eq!(status, StatusCode::OK, "{name}");
    }
    assert!(!process.log.lock().unwrap().contains(" ERROR "));
    terminate(process).await;
    for (path, mode) in modes(&dir) {
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, expected, "{}", path.display());
    }
}

/// A flush that fails keeps a new user's registration unacknowledged until one succeeds: no login
/// of that user is answered before its registration is on disk. The `fault-injection` build's
/// `WXBROKER_FAULT=flush:2` fails the first two flushes.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn no_login_is_answered_before_its_registration_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let http = client();
    let mut command = command(dir.path());
    command.env("WXBROKER_FAULT", "flush:2");
    let process = Process::spawn(command).await;
    // The registration's flush fails: not acknowledged.
    let (status, body) = login(&http, &process.url, "gus.1").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    // The user is in memory, not on disk: the next login waits for a flush, which fails too.
    let (status, body) = login(&http, &process.url, "gus.2").await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "answered before the registration was on disk: {body}"
    );
    let (status, body) = login(&http, &process.url, "gus.3").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let uid = body["uid"].as_u64().unwrap();
    process.kill9().await;

    let process = Process::start(dir.path()).await;
    let (status, body) = login(&http, &process.url, "gus.4").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["uid"].as_u64(), body["isNew"].as_bool()),
        (Some(uid), Some(false)),
        "{body}"
    );
}

/// The admin secret of the brokers of the crash tests (their clients reset session_keys and look
/// users up through the admin routes).
const ADMIN_TOKEN: &str = "crash-test-admin-secret-at-least-32-chars";

/// [`command`] for a broker that takes `sandbox`, in this test process, for WeChat, with the admin
/// routes on. The sandbox outlives every kill, so it still holds each user's session_key when the
/// broker restarts: a session_key reset the broker acknowledged is checked against it.
fn command_on(data_dir: &Path, sandbox: &Sandbox) -> Command {
    let mut command = command(data_dir);
    command
        .env("WECHAT_APPID", SANDBOX_APPID)
        .env("WECHAT_SECRET", sandbox.secret().expose())
        .env("WECHAT_API_BASE", sandbox.url().as_str())
        .env("WXBROKER_ADMIN_TOKEN", ADMIN_TOKEN);
    command
}

/// What a client of the crash tests writes, after registering a new user (which is a write too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    /// The registration alone.
    Registration,
    /// A logout (204).
    Logout,
    /// An encrypted profile carrying a unionid that no login gave (200).
    Profile,
    /// An encrypted phone number (200).
    Phone,
    /// A phone number by the code of the phone-number button (200).
    PhoneCode,
    /// `POST /admin/users/{uid}/session-key/reset` (204).
    SessionKeyReset,
}

impl Write {
    const ALL: [Write; 6] = [
        Write::Registration,
        Write::Logout,
        Write::Profile,
        Write::Phone,
        Write::PhoneCode,
        Write::SessionKeyReset,
    ];
}

/// What the clients were told before the kill.
#[derive(Default)]
struct Acknowledged {
    /// name -> uid of every registration answered 200 with isNew.
    registrations: HashMap<String, u64>,
    /// Round and token of every logout answered 204.
    logouts: Vec<(usize, String)>,
    /// Every profile answered 200.
    profiles: Vec<ProfileAck>,
    /// Every phone number answered 200, encrypted or by code.
    phones: Vec<PhoneAck>,
    /// Round and uid of every session_key reset answered 204.
    resets: Vec<(usize, u64)>,
}

/// A profile the broker acknowledged; its unionid is [`Sandbox::unionid_of`] the name.
struct ProfileAck {
    round: usize,
    uid: u64,
    name: String,
    /// The session it was sent with, which must show the unionid too.
    token: String,
}

/// A phone number the broker acknowledged.
struct PhoneAck {
    round: usize,
    uid: u64,
    number: String,
    by_code: bool,
}

/// How many acknowledged writes of each kind were found after restarts.
#[derive(Default)]
struct Checked {
    registrations: usize,
    logouts: usize,
    profiles: usize,
    phones: usize,
    phone_codes: usize,
    resets: usize,
}

impl std::ops::AddAssign for Checked {
    fn add_assign(&mut self, other: Checked) {
        self.registrations += other.registrations;
        self.logouts += other.logouts;
        self.profiles += other.profiles;
        self.phones += other.phones;
        self.phone_codes += other.phone_codes;
        self.resets += other.resets;
    }
}

impl std::fmt::Display for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} registrations, {} logouts, {} profiles (with their unionids), {} encrypted phone \
             numbers, {} phone numbers by code, {} session_key resets",
            self.registrations,
            self.logouts,
            self.profiles,
            self.phones,
            self.phone_codes,
            self.resets
        )
    }
}

impl Acknowledged {
    /// How many writes of each kind were acknowledged.
    fn counts(&self) -> Checked {
        let by_code = self.phones.iter().filter(|p| p.by_code).count();
        Checked {
            registrations: self.registrations.len(),
            logouts: self.logouts.len(),
            profiles: self.profiles.len(),
            phones: self.phones.len() - by_code,
            phone_codes: by_code,
            resets: self.resets.len(),
        }
    }
}

const ROUNDS: usize = 24;
const WORKERS: usize = 8;

/// kill -9 of the real binary under load, round after round on one data dir: every write
/// acknowledged before a kill is found after the restart. Every other round is killed at a random
/// moment of the load; the others right after a write acknowledged while nothing else was in
/// flight (each kind of write in turn), where no later write's flush can cover for a missing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(Sandbox::start(SandboxOptions::default()).await.unwrap());
    let clients = Client::new(&sandbox);
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let mut checked = Checked::default();
    let mut last_writes = 0;
    for round in 0..=ROUNDS {
        // The database opens every time, and what was acknowledged before is all there.
        let process = Process::spawn(command_on(dir.path(), &sandbox)).await;
        let client = clients.at(&process.url);
        checked += check_acknowledged(&client, &acked, round, ROUNDS).await;
        if round == ROUNDS {
            break;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut workers: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let client = client.clone();
                tokio::spawn(drive(client, round, worker, acked.clone(), stop.clone()))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rand::random_range(50..400))).await;
        if round % 2 == 1 {
            // The clients finish what they are at; then one write, and the kill as soon as it is
            // acknowledged: were it not on disk, no flush of anything else could have saved it.
            stop.store(true, Ordering::Relaxed);
            for worker in workers.drain(..) {
                tokio::time::timeout(Duration::from_secs(30), worker)
                    .await
                    .expect("the clients stop within 30 s")
                    .unwrap();
            }
            let write = Write::ALL[round / 2 % Write::ALL.len()];
            client
                .write(round, WORKERS, 0, write, &acked)
                .await
                .unwrap_or_else(|| panic!("{write:?} was not acknowledged by a broker at rest"));
            last_writes += 1;
        }
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
    let counts = acked.counts();
    eprintln!(
        "crash test: {ROUNDS} kill -9 rounds ({} at a random moment, {} right after a write \
         acknowledged alone, each kind in turn); acknowledged: {counts}; found after restarts: \
         {checked}; lost: 0; no uid acknowledged twice",
        ROUNDS - last_writes,
        last_writes,
    );
    assert!(
        counts.registrations >= ROUNDS,
        "the load did register users"
    );
    for (what, count) in [
        ("log out", counts.logouts),
        ("send profiles", counts.profiles),
        ("send encrypted phone numbers", counts.phones),
        ("send phone numbers by code", counts.phone_codes),
        ("reset session_keys", counts.resets),
    ] {
        assert!(count > 0, "the load did {what}");
    }
}

/// Checks, on a broker restarted after round `round - 1` was killed, what was acknowledged in that
/// round (everything at the `last` round, but session_key resets: a later login replaced the key):
/// registrations keep their uids, logouts stay out, profiles and phone numbers are stored, the
/// unionid of a profile is the user's (found by it, shown on the session it came with), and WeChat
/// accepts the session_key the broker holds after a reset.
async fn check_acknowledged(
    client: &Client,
    acked: &Mutex<Acknowledged>,
    round: usize,
    last: usize,
) -> Checked {
    let checked = |r: usize| round == last || r + 1 == round;
    let (resets, others, counts) = {
        let acked = acked.lock().unwrap();
        let resets: Vec<Check> = acked
            .resets
            .iter()
            .filter(|(r, _)| r + 1 == round)
            .map(|(_, uid)| Check::Reset(*uid))
            .collect();
        let registrations = acked
            .registrations
            .iter()
            .filter(|(name, _)| checked(round_of(name)))
            .map(|(name, uid)| Check::Registration(name.clone(), *uid));
        let logouts = acked
            .logouts
            .iter()
            .filter(|(r, _)| checked(*r))
            .map(|(_, token)| Check::Logout(token.clone()));
        let profiles = acked
            .profiles
            .iter()
            .filter(|p| checked(p.round))
            .map(|p| Check::Profile {
                uid: p.uid,
                name: p.name.clone(),
                token: p.token.clone(),
            });
        let phones = acked.phones.iter().filter(|p| checked(p.round));
        let counts = Checked {
            registrations: registrations.clone().count(),
            logouts: logouts.clone().count(),
            profiles: profiles.clone().count(),
            phones: phones.clone().filter(|p| !p.by_code).count(),
            phone_codes: phones.clone().filter(|p| p.by_code).count(),
            resets: resets.len(),
        };
        let phones = phones.map(|p| Check::Phone(p.uid, p.number.clone()));
        let others: Vec<Check> = registrations
            .chain(logouts)
            .chain(profiles)
            .chain(phones)
            .collect();
        (resets, others, counts)
    };
    // Before the registrations: their check logs the users in again, which replaces the key.
    client.check_all(resets, round).await;
    client.check_all(others, round).await;
    counts
}

/// One acknowledged write to look for after a restart.
enum Check {
    /// WeChat accepts the session_key the broker holds for the user of this uid.
    Reset(u64),
    /// The user of this name logs in as a returning user with this uid.
    Registration(String, u64),
    /// The token is refused.
    Logout(String),
    /// The user has its profile and the unionid it carried, is found by the unionid, and the
    /// session the profile came with shows the unionid.
    Profile {
        uid: u64,
        name: String,
        token: String,
    },
    /// The user has this phone number.
    Phone(u64, String),
}

const COMPACTION_ROUNDS: usize = 6;
/// Sessions that came and went, appended to the log while no broker runs (two frames each),
/// besides two for each live session: far more superseded frames than live ones, however many
/// sessions earlier rounds left, so the first sweep has the log rewritten.
const ENDED_SESSIONS: u64 = 100_000;

/// kill -9 early in a rewrite of the session log, or just after its switch, with
/// logins and logouts going on: what was acknowledged before the kill is all there after the
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_during_compactions() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(Sandbox::start(SandboxOptions::default()).await.unwrap());
    let clients = Client::new(&sandbox);
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let mut checked = Checked::default();
    let (mut cut_short, mut finished) = (0, 0);
    for round in 0..=COMPACTION_ROUNDS {
        // The check runs on a broker of its own, whose first sweep comes long after it: a check
        // that outlasted the rewrite would leave no compaction for this round's kill.
        let process = Process::spawn(command_on(dir.path(), &sandbox)).await;
        checked +=
            check_acknowledged(&clients.at(&process.url), &acked, round, COMPACTION_ROUNDS).await;
        terminate(process).await;
        if round == COMPACTION_ROUNDS {
            break;
        }

        append_ended_sessions(dir.path(), round as u64);
        let mut command = command_on(dir.path(), &sandbox);
        command.args(["--sweep-interval-secs", "1"]);
        let process = Process::spawn(command).await;
        let client = clients.at(&process.url);

        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let client = client.clone();
                tokio::spawn(drive(client, round, worker, acked.clone(), stop.clone()))
            })
            .collect();
        // The first sweep starts the rewrite; its file shows that it is writing. It reads the log
        // first, at idle priority: on a machine the other tests kept busy, it had not created its
        // file 30 s after the broker started (CI, once).
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while compaction_file(dir.path()).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "no compaction started: {}",
                process.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if round % 2 == 0 {
            // Within its first 50 ms: a rewrite of this log takes longer than that.
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..50))).await;
        } else {
            // Every other round the kill comes just after the new log replaced the old one.
            while !process
                .log
                .lock()
                .unwrap()
                .contains("rewrote the session log")
            {
                assert!(
                    std::time::Instant::now() < deadline + Duration::from_secs(60),
                    "the rewrite did not finish: {}",
                    process.log.lock().unwrap()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..50))).await;
        }
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
         the new log was being written, {finished} after it replaced the old one); \
         acknowledged: {}; found after restarts: {checked}; lost: 0",
        acked.counts(),
    );
    assert!(cut_short > 0, "no kill landed during a compaction");
    assert!(finished > 0, "no kill landed after a compaction");
    assert!(!acked.logouts.is_empty(), "the load did log out");
}

/// Appends sessions that were issued and ended to the data dir's log (no broker may run on it).
fn append_ended_sessions(dir: &Path, round: u64) {
    let log = SessionLog::open(dir).unwrap();
    let live = log.replay().unwrap().len() as u64;
    for n in 0..ENDED_SESSIONS + 2 * live {
        let hash = wxbroker::crypto::token_hash(&format!("ended-{round}-{n}"));
        let record = wxbroker::SessionRecord {
            uid: u64::MAX - n,
            appid: None,
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

/// One client: registers new users and has each write one more thing (each kind of [`Write`] in
/// turn), until the broker dies or `stop` is set.
async fn drive(
    client: Client,
    round: usize,
    worker: usize,
    acked: Arc<Mutex<Acknowledged>>,
    stop: Arc<AtomicBool>,
) {
    for i in 0..10_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let write = Write::ALL[i % Write::ALL.len()];
        if client
            .write(round, worker, i, write, &acked)
            .await
            .is_none()
        {
            return;
        }
    }
}

/// A mini program's users and their operator, against one broker, as the crash tests play them.
#[derive(Clone)]
struct Client {
    url: String,
    sandbox: Arc<Sandbox>,
    http: reqwest::Client,
}

impl Client {
    /// A client of no broker yet (see [`Client::at`]), playing the WeChat client with `sandbox`.
    fn new(sandbox: &Arc<Sandbox>) -> Client {
        wxbroker::tls::install_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        Client {
            url: String::new(),
            sandbox: sandbox.clone(),
            http,
        }
    }

    /// The same client, for the broker at `url` (building a client anew takes a debug build
    /// tens of milliseconds).
    fn at(&self, url: &str) -> Client {
        Client {
            url: url.to_owned(),
            ..self.clone()
        }
    }

    /// Registers the user `r{round}w{worker}u{i}` and has it make `write`, noting every
    /// acknowledgement in `acked`. `None` when an answer did not come (the broker was killed).
    async fn write(
        &self,
        round: usize,
        worker: usize,
        i: usize,
        write: Write,
        acked: &Mutex<Acknowledged>,
    ) -> Option<()> {
        let name = format!("r{round}w{worker}u{i}");
        // Two logins of the new user at once (a mini program double-firing at launch): whichever
        // answer arrives, returning or not, acknowledges the registration.
        let codes = [format!("{name}.1"), format!("{name}.2")];
        let (first, second) = tokio::join!(self.login(&codes[0]), self.login(&codes[1]));
        if let (Some((a, _)), Some((b, _))) = (&first, &second) {
            assert_eq!(a, b, "one user, one uid");
        }
        let (uid, token) = first.or(second)?;
        acked
            .lock()
            .unwrap()
            .registrations
            .insert(name.clone(), uid);
        let number = format!("1{round:03}{worker:02}{i:05}");
        match write {
            Write::Registration => {}
            Write::Logout => {
                self.expect(self.post("logout", &token), StatusCode::NO_CONTENT)
                    .await?;
                acked.lock().unwrap().logouts.push((round, token));
            }
            Write::Profile => {
                // One more login: the key the broker holds is then the one the client's data is
                // encrypted with (of the two logins above, either may have been stored last).
                let (_, token) = self.login(&format!("{name}.3")).await?;
                let data = self.sandbox.encrypt_for(&name, &profile_text(&name));
                let request = self.post("userinfo", &token).json(&data.unwrap());
                self.expect(request, StatusCode::OK).await?;
                let profile = ProfileAck {
                    round,
                    uid,
                    name,
                    token,
                };
                acked.lock().unwrap().profiles.push(profile);
            }
            Write::Phone | Write::PhoneCode => {
                let by_code = write == Write::PhoneCode;
                let request = if by_code {
                    let code = format!("{number}.{name}");
                    self.post("phone", &token).json(&json!({ "code": code }))
                } else {
                    let (_, token) = self.login(&format!("{name}.3")).await?;
                    let data = self.sandbox.encrypted_phone(&name, &number);
                    self.post("phone", &token).json(&data.unwrap())
                };
                let body = self.expect(request, StatusCode::OK).await?;
                assert_eq!(body["phoneNumber"].as_str(), Some(number.as_str()));
                let phone = PhoneAck {
                    round,
                    uid,
                    number,
                    by_code,
                };
                acked.lock().unwrap().phones.push(phone);
            }
            Write::SessionKeyReset => {
                // WeChat resets the key it holds for the user (the one of its latest login) only
                // when the broker signs the request with that key.
                self.login(&format!("{name}.3")).await?;
                self.expect(self.reset_session_key(uid), StatusCode::NO_CONTENT)
                    .await?;
                acked.lock().unwrap().resets.push((round, uid));
            }
        }
        Some(())
    }

    /// Looks for every write of `checks` on the broker, a few at a time.
    async fn check_all(&self, checks: Vec<Check>, round: usize) {
        let checks = Arc::new(Mutex::new(checks));
        let tasks: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (client, checks) = (self.clone(), checks.clone());
                tokio::spawn(async move {
                    loop {
                        let next = checks.lock().unwrap().pop();
                        let Some(check) = next else { break };
                        client.check(check, round).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }

    /// Fails the test unless the write of `check` is found.
    async fn check(&self, check: Check, round: usize) {
        match check {
            Check::Reset(uid) => {
                // Signed with the key the broker holds, which WeChat takes only if it is the one
                // it answered to the reset (else 409 session_key_expired).
                let (status, body) = self.send(self.reset_session_key(uid)).await;
                assert_eq!(
                    status,
                    StatusCode::NO_CONTENT,
                    "a session_key reset was lost: {body}"
                );
            }
            Check::Registration(name, uid) => {
                let code = format!("{name}.check{round}");
                let url = format!("{}/v1/login", self.url);
                let (_, body) = self.send(self.http.post(url).form(&[("code", code)])).await;
                assert_eq!(
                    (body["uid"].as_u64(), body["isNew"].as_bool()),
                    (Some(uid), Some(false)),
                    "{name}: {body}"
                );
            }
            Check::Logout(token) => {
                let (status, _) = self.session(&token).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "a logout came back");
            }
            Check::Profile { uid, name, token } => {
                let unionid = Sandbox::unionid_of(&name);
                let user = self.admin_user(&format!("users/{uid}")).await;
                assert_eq!(
                    (&user["profile"]["nickName"], &user["unionid"]),
                    (&json!(name), &json!(unionid)),
                    "a profile was lost: {user}"
                );
                let found = self.admin_user(&format!("users?unionid={unionid}")).await;
                assert_eq!(found["uid"].as_u64(), Some(uid), "{found}");
                let (status, session) = self.session(&token).await;
                assert_eq!(
                    (status, &session["unionid"]),
                    (StatusCode::OK, &json!(unionid)),
                    "the unionid of a profile is missing from its session: {session}"
                );
            }
            Check::Phone(uid, number) => {
                let user = self.admin_user(&format!("users/{uid}")).await;
                assert_eq!(
                    user["phone"]["phoneNumber"].as_str(),
                    Some(number.as_str()),
                    "a phone number was lost: {user}"
                );
            }
        }
    }

    /// Logs in with `code`: the uid and the token.
    async fn login(&self, code: &str) -> Option<(u64, String)> {
        let request = self
            .http
            .post(format!("{}/v1/login", self.url))
            .form(&[("code", code)]);
        let body = self.expect(request, StatusCode::OK).await?;
        Some((
            body["uid"].as_u64().unwrap(),
            body["thirdSession"].as_str().unwrap().to_owned(),
        ))
    }

    /// `POST /admin/users/{uid}/session-key/reset`.
    fn reset_session_key(&self, uid: u64) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/admin/users/{uid}/session-key/reset", self.url))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// `POST /v1/{route}` with the session `token`.
    fn post(&self, route: &str, token: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/{route}", self.url))
            .bearer_auth(token)
    }

    /// The body of the answer to `request` if it is `expected`. `None` if no answer came (the
    /// broker was killed), or a 503 (a call that timed out on a busy machine: nothing was
    /// acknowledged); any other answer fails the test.
    async fn expect(
        &self,
        request: reqwest::RequestBuilder,
        expected: StatusCode,
    ) -> Option<Value> {
        let response = request.send().await.ok()?;
        let status = response.status();
        let bytes = response.bytes().await.ok()?;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert_eq!(status, expected, "{body}");
        Some(body)
    }

    /// Status and JSON body (`Null` if none) of the answer to `request`, which must come.
    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `GET /v1/session` with `token`.
    async fn session(&self, token: &str) -> (StatusCode, Value) {
        let url = format!("{}/v1/session", self.url);
        self.send(self.http.get(url).bearer_auth(token)).await
    }

    /// `GET /admin/{path}`, which must find a user.
    async fn admin_user(&self, path: &str) -> Value {
        let url = format!("{}/admin/{path}", self.url);
        let (status, user) = self.send(self.http.get(url).bearer_auth(ADMIN_TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {user}");
        user
    }
}

/// The plaintext of a profile for `name` carrying a unionid, as `wx.getUserProfile` gives one in
/// a mini program bound to an Open Platform account (the logins of these users carry none).
fn profile_text(name: &str) -> Vec<u8> {
    let profile = json!({
        "openId": Sandbox::openid_of(name),
        "unionId": Sandbox::unionid_of(name),
        "nickName": name,
        "gender": 0,
        "watermark": { "appid": SANDBOX_APPID, "timestamp": 1_790_000_000 },
    });
    profile.to_string().into_bytes()
}

/// Past the restart cap the real binary stops serving and exits 1. Nothing from outside makes its
/// actors fail, so the `fault-injection` build's WXBROKER_FAULT makes the SessionKeeper panic each
/// time it runs.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn past_the_restart_cap_the_binary_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = command(dir.path());
    // Each panic prints to stderr, which nobody reads here: a full pipe would block the broker.
    command
        .env("WXBROKER_FAULT", "session_keeper")
        .stderr(Stdio::null());
    let mut process = Process::spawn(command).await;
    // Eleven restarts, the backoff doubling from 20 ms to 2 s: about 10 s.
    let status = tokio::time::timeout(Duration::from_secs(60), process.child.wait())
        .await
        .expect("the binary gives up within 60 s")
        .unwrap();
    let log = process.log.lock().unwrap().clone();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("too many actor restarts"), "{log}");
}
