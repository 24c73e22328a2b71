//! Offline export and import of users (library and `wxbroker export` / `import`), the export
//! over HTTP while the broker serves (`GET /admin/export`, on sled and Redis), and the binary's
//! config file (`--config`) layered under the environment and flags.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::CommandFactory;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use wxbroker::backup;
use wxbroker::storage::EXPORT_PAGE;
use wxbroker::storage::sled::DataDir;
use wxbroker::{Config, Sandbox};

use crate::support::{
    RedisServer, StoreKind, TestBroker, assert_error, client, eventually, logs, me, parts, post,
};

/// The fields of an exported line: those of `/v1/me`, nothing else.
const FIELDS: [&str; 7] = [
    "uid",
    "openid",
    "unionid",
    "profile",
    "phone",
    "createdAt",
    "updatedAt",
];

/// Opens `dir` offline, waiting for a stopped broker's last handles (tasks that end after its
/// shutdown) to let go of sled's lock.
async fn open_released(
    dir: &Path,
    open: fn(&Path, u64) -> Result<DataDir, wxbroker::Error>,
) -> DataDir {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open(dir, 8) {
            Ok(store) => return store,
            Err(e)
                if tokio::time::Instant::now() < deadline && e.to_string().contains("in use") =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot open {}: {e}", dir.display()),
        }
    }
}

/// Every user of the data dir in `dir`, as `export` writes them.
async fn export_dir(dir: &Path) -> String {
    let store = open_released(dir, backup::open_for_export).await;
    let mut out = Vec::new();
    backup::export(&store, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// Registers alice (with a unionid and a profile), bob (with a phone) and carol, then stops the
/// broker; returns it (for its data dir and sandbox) and the three uids in that order.
async fn three_users() -> (TestBroker, [u64; 3]) {
    let mut tb = TestBroker::start().await;
    let alice = tb.token("alice.union.1").await;
    let profile = tb.sandbox.encrypted_profile("alice").unwrap();
    assert_eq!(
        post(&tb, "userinfo", &alice, &profile).await.status(),
        StatusCode::OK
    );
    let bob = tb.token("bob.1").await;
    let phone = tb.sandbox.encrypted_phone("bob", "13912345678").unwrap();
    assert_eq!(
        post(&tb, "phone", &bob, &phone).await.status(),
        StatusCode::OK
    );
    let carol = tb.token("carol.1").await;
    let mut uids = [0; 3];
    for (uid, token) in uids.iter_mut().zip([&alice, &bob, &carol]) {
        *uid = me(&tb, token).await["uid"].as_u64().unwrap();
    }
    tb.stop().await;
    (tb, uids)
}

#[tokio::test]
async fn export_then_import_keeps_every_user_and_uid_and_nothing_secret() {
    let (tb, [alice_uid, bob_uid, carol_uid]) = three_users().await;
    let secrets: Vec<String> = ["alice", "bob", "carol"]
        .iter()
        .map(|name| tb.sandbox.session_key(&Sandbox::openid_of(name)).unwrap())
        .collect();
    let (sandbox, dir) = (tb.sandbox.clone(), tb.dir.clone());
    drop(tb);

    let exported = export_dir(dir.path()).await;
    let lines: Vec<Value> = exported
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{exported}");
    for line in &lines {
        let mut keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut expected = FIELDS.to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected, "{line}");
    }
    for secret in &secrets {
        assert!(
            !exported.contains(secret.as_str()),
            "a session_key was exported"
        );
    }
    let alice = lines.iter().find(|line| line["uid"] == alice_uid).unwrap();
    assert_eq!(alice["openid"], Sandbox::openid_of("alice"));
    assert_eq!(alice["unionid"], Sandbox::unionid_of("alice"));
    assert_eq!(alice["profile"]["nickName"], "alice");
    let bob = lines.iter().find(|line| line["uid"] == bob_uid).unwrap();
    assert_eq!(bob["phone"]["purePhoneNumber"], "13912345678");

    // Into a fresh data dir, and out again: the same lines.
    let restored = tempfile::tempdir().unwrap();
    {
        let store = backup::open_for_import(restored.path(), 8).unwrap();
        assert_eq!(backup::import(&store, exported.as_bytes()).unwrap(), 3);
        assert_eq!(store.users().count(), 3);
    }
    assert_eq!(export_dir(restored.path()).await, exported);

    // A broker on the restored dir: sessions were not exported, so everyone logs in again, and
    // keeps their uid; that login stores a fresh session_key, so encrypted data works again.
    let path = restored.path().to_owned();
    let tb = TestBroker::start_on(sandbox, |config| config.data_dir = path).await;
    let (status, body) = parts(tb.login("alice.union.2").await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["uid"].as_u64(), body["isNew"].as_bool()),
        (Some(alice_uid), Some(false))
    );
    let alice_token = body["thirdSession"].as_str().unwrap().to_owned();
    let stored = me(&tb, &alice_token).await;
    assert_eq!(stored["profile"]["nickName"], "alice");
    assert_eq!(stored["createdAt"], alice["createdAt"]);
    let profile = tb.sandbox.encrypted_profile("alice").unwrap();
    assert_eq!(
        post(&tb, "userinfo", &alice_token, &profile).await.status(),
        StatusCode::OK
    );
    let (_, body) = parts(tb.login("carol.2").await).await;
    assert_eq!(body["uid"].as_u64(), Some(carol_uid));

    // A new user gets a uid above every imported one: none is handed out twice.
    let (_, body) = parts(tb.login("dave.1").await).await;
    let largest = alice_uid.max(bob_uid).max(carol_uid);
    assert_eq!(
        (body["isNew"].as_bool(), body["uid"].as_u64()),
        (Some(true), Some(largest + 1))
    );
}

#[tokio::test]
async fn a_data_dir_in_use_is_refused_with_a_hint_to_stop_the_broker() {
    let tb = TestBroker::start().await;
    tb.token("alice.1").await;
    for open in [backup::open_for_export, backup::open_for_import] {
        let err = open(tb.dir.path(), 8).err().unwrap();
        assert!(err.to_string().contains("stop the broker first"), "{err}");
    }
    let output = wxbroker()
        .arg("export")
        .arg("--data-dir")
        .arg(tb.dir.path())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stop the broker first"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing is exported");
}

/// The binary with none of our variables inherited from the test's environment.
fn wxbroker() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wxbroker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("WECHAT_") || name.starts_with("WXBROKER_") {
            command.env_remove(name);
        }
    }
    command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs an offline command to its end, asserting success.
async fn run_ok(command: &mut Command) -> Output {
    let output = command.output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test]
async fn the_binary_exports_and_imports_through_files() {
    let (tb, _) = three_users().await;
    let dir = tb.dir.clone();
    drop(tb);
    drop(open_released(dir.path(), backup::open_for_export).await);

    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("users.jsonl");
    let output = run_ok(
        wxbroker()
            .arg("export")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--output")
            .arg(&file),
    )
    .await;
    assert!(output.stdout.is_empty(), "logs go to stderr");
    assert!(String::from_utf8_lossy(&output.stderr).contains("exported"));
    let exported = std::fs::read_to_string(&file).unwrap();
    assert_eq!(exported.lines().count(), 3);
    assert!(!work.path().join("users.jsonl.partial").exists());
    assert_eq!(
        mode(&file),
        0o600,
        "an export holds users' data: nobody else's to read"
    );

    let restored = work.path().join("restored");
    run_ok(
        wxbroker()
            .arg("import")
            .arg("--data-dir")
            .arg(&restored)
            .arg("--input")
            .arg(&file),
    )
    .await;
    assert_eq!(mode(&restored), 0o700, "the data dir import created");
    // Out again through stdout, with the data dir from the environment this time.
    let output = run_ok(wxbroker().arg("export").env("WXBROKER_DATA_DIR", &restored)).await;
    assert_eq!(String::from_utf8(output.stdout).unwrap(), exported);

    // A bad line: a non-zero exit naming the line, and the line before it imported.
    let bad = work.path().join("bad.jsonl");
    let first = exported.lines().next().unwrap();
    std::fs::write(&bad, format!("{first}\n{{\"uid\": 9, \"openid\"\n")).unwrap();
    let partial = work.path().join("partial");
    let output = wxbroker()
        .arg("import")
        .arg("--data-dir")
        .arg(&partial)
        .arg("--input")
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 2:") && stderr.contains("bad.jsonl"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let output = run_ok(wxbroker().arg("export").arg("--data-dir").arg(&partial)).await;
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("{first}\n")
    );

    // A mistyped data dir exports nothing rather than an empty backup.
    let output = wxbroker()
        .args(["export", "--data-dir"])
        .arg(work.path().join("typo"))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no wxbroker database"));
}

/// The permission bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Serves with `command`, logs in once, and returns the login's `expiresIn` and the log lines
/// read up to the serving line. The process is killed at the end.
async fn expires_in(command: &mut Command) -> (u64, Vec<String>) {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            if let Some(addr) = serving_addr(&line) {
                return addr;
            }
        }
        panic!("wxbroker exited before serving: {seen:?}");
    })
    .await
    .expect("wxbroker serves within 20 s");
    let response = client()
        .post(format!("http://{addr}/v1/login"))
        .form(&[("code", "alice.1")])
        .send()
        .await
        .unwrap();
    let (status, body) = parts(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    child.kill().await.unwrap();
    (body["expiresIn"].as_u64().unwrap(), seen)
}

/// The address in the "serving" log line, human (`addr=...`) or JSON (`fields.addr`).
fn serving_addr(line: &str) -> Option<String> {
    if let Ok(json) = serde_json::from_str::<Value>(line) {
        return json["fields"]["addr"].as_str().map(str::to_owned);
    }
    let addr = line.split("addr=").nth(1)?;
    addr.split_whitespace().next().map(str::to_owned)
}

#[tokio::test]
async fn a_config_file_is_layered_under_the_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wxbroker.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\nsession_idle_ttl = 60\nlogin-rate-per-min = 0\n\
             cache_mb = 16\nlog_format = \"json\"\ndata_dir = {:?}\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();

    // The file alone: its TTL, its data dir, and JSON log lines.
    let (ttl, lines) = expires_in(wxbroker().arg("--config").arg(&file)).await;
    assert_eq!(ttl, 60);
    assert!(data.join("db").is_file(), "the file's data dir is used");
    for line in &lines {
        let json: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            json["level"].is_string() && json["fields"].is_object(),
            "{line}"
        );
    }

    // The file named in the environment; other variables override it.
    let (ttl, lines) = expires_in(
        wxbroker()
            .env("WXBROKER_CONFIG", &file)
            .env("WXBROKER_SESSION_IDLE_TTL", "90")
            .env("WXBROKER_LOG_FORMAT", "human"),
    )
    .await;
    assert_eq!(ttl, 90);
    assert!(lines.iter().all(|line| !line.starts_with('{')), "{lines:?}");

    // A flag overrides both.
    let (ttl, _) = expires_in(
        wxbroker()
            .env("WXBROKER_CONFIG", &file)
            .env("WXBROKER_SESSION_IDLE_TTL", "90")
            .args(["--session-idle-ttl", "30"]),
    )
    .await;
    assert_eq!(ttl, 30);
}

#[tokio::test]
async fn a_config_file_holding_a_secret_that_others_may_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wxbroker.toml");
    let settings = format!(
        "listen = \"127.0.0.1:0\"\nlogin_rate_per_min = 0\ncache_mb = 16\ndata_dir = {:?}\n",
        dir.path().join("data").to_str().unwrap()
    );
    let secret = "admin_token = \"a-config-file-admin-token-of-40-chars\"\n";
    let warned = |lines: &[String]| {
        lines.iter().any(|line| {
            line.contains(" WARN ")
                && line.contains(file.to_str().unwrap())
                && line.contains("holds a secret")
        })
    };
    for (text, mode, warns) in [
        (format!("{settings}{secret}"), 0o644, true),
        (format!("{settings}{secret}"), 0o640, true),
        (format!("{settings}{secret}"), 0o600, false),
        (settings.clone(), 0o644, false),
    ] {
        std::fs::write(&file, &text).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let (_, lines) = expires_in(wxbroker().arg("--config").arg(&file)).await;
        assert_eq!(warned(&lines), warns, "{mode:o} {text}: {lines:?}");
        assert!(
            lines
                .iter()
                .all(|line| !line.contains("a-config-file-admin-token")),
            "{lines:?}"
        );
    }
}

#[tokio::test]
async fn a_bad_config_file_stops_the_start_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "sesion_idle_ttl = 60\n",
            "`sesion_idle_ttl`: unknown setting",
        ),
        (
            "session_idle_ttl = \"an hour\"\n",
            "`session_idle_ttl`: invalid value",
        ),
        ("listen = 8080\n", "`listen`: invalid value"),
    ];
    for (text, expected) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let output = wxbroker()
            .arg("--config")
            .arg(&file)
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(file.to_str().unwrap()) && stderr.contains(expected),
            "{text}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let missing = dir.path().join("missing.toml");
    let output = wxbroker()
        .arg("--config")
        .arg(&missing)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.toml"));
}

#[tokio::test]
async fn help_lists_every_setting_with_its_env_and_default_and_the_commands() {
    let output = run_ok(wxbroker().arg("--help")).await;
    let help = String::from_utf8(output.stdout).unwrap();
    let config = Config::command();
    for arg in config.get_arguments() {
        let long = arg.get_long().unwrap();
        // `--sandbox[=<SANDBOX>]`: a switch that also takes `=true` or `=false` (config file).
        let listed = [" ", "["].map(|after| format!("--{long}{after}"));
        assert!(listed.iter().any(|l| help.contains(l)), "--{long}: {help}");
        if let Some(env) = arg.get_env() {
            let env = env.to_str().unwrap();
            assert!(help.contains(&format!("[env: {env}")), "{env}: {help}");
        }
        for default in arg.get_default_values() {
            let default = default.to_str().unwrap();
            assert!(
                help.contains(&format!("[default: {default}]")),
                "{long}: {help}"
            );
        }
    }
    for shown in ["WXBROKER_CONFIG", "WXBROKER_LOG_FORMAT", "export", "import"] {
        assert!(help.contains(shown), "{shown}: {help}");
    }
}

/// The admin secret of the brokers that export over HTTP.
const ADMIN: &str = "backup-test-admin-token-of-40-characters";

/// Users stored before their broker starts: `pre0` ... as the sandbox names them (so that a login
/// finds them), uids spread out as imports leave them, every third with a unionid, a profile and
/// a phone number.
fn stored_users(n: u64) -> Vec<wxbroker::User> {
    (0..n)
        .map(|i| {
            let name = format!("pre{i}");
            let full = i % 3 == 0;
            wxbroker::User {
                uid: 10 + 7 * i,
                appid: None,
                openid: Sandbox::openid_of(&name),
                unionid: full.then(|| Sandbox::unionid_of(&name)),
                profile: full.then(|| wxbroker::Profile {
                    nick_name: Some(name.clone()),
                    city: Some("Shenzhen".into()),
                    ..wxbroker::Profile::default()
                }),
                phone: full.then(|| wxbroker::Phone {
                    phone_number: format!("139{i:08}"),
                    pure_phone_number: format!("139{i:08}"),
                    country_code: "86".into(),
                }),
                created_at: 1_700_000_000 + i,
                updated_at: 1_700_000_000 + i,
                identities: Vec::new(),
            }
        })
        .collect()
}

/// `users` as export lines.
fn as_lines(users: &[wxbroker::User]) -> String {
    users
        .iter()
        .map(|user| format!("{}\n", serde_json::to_string(user).unwrap()))
        .collect()
}

/// A broker on `kind` serving `users` (written into its store before it starts), with the
/// admin routes on. Returns the broker and, for sled, its data dir (the broker's own is unused).
async fn serving(kind: StoreKind, users: &[wxbroker::User]) -> (TestBroker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let admin = |c: &mut Config| c.admin_token = Some(wxbroker::Secret::new(ADMIN));
    let tb = match kind {
        StoreKind::Sled => {
            let data = backup::open_for_import(dir.path(), 8).unwrap();
            backup::import(&data, as_lines(users).as_bytes()).unwrap();
            drop(data);
            let path = dir.path().to_owned();
            TestBroker::start_with(|c| {
                c.data_dir = path;
                admin(c);
            })
            .await
        }
        StoreKind::Redis => {
            let redis = Arc::new(RedisServer::start().await);
            let store = wxbroker::storage::redis::Redis::connect(&redis.url)
                .await
                .unwrap();
            for user in users {
                let record = wxbroker::UserRecord {
                    uid: user.uid,
                    appid: None,
                    openid: user.openid.clone(),
                    unionid: user.unionid.clone(),
                    session_key: String::new(),
                    created_at: user.created_at,
                    updated_at: user.updated_at,
                    profile: user.profile.clone(),
                    phone: user.phone.clone(),
                };
                assert!(store.import_user(&record).wait().await.unwrap());
            }
            TestBroker::start_shared(Some(redis), None, admin).await
        }
    };
    (tb, dir)
}

/// `GET /admin/export` with the admin secret.
async fn export_over_http(tb: &TestBroker) -> reqwest::Response {
    tb.http
        .get(format!("{}/admin/export", tb.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

/// Logs in until `stop` (at most `LOGINS` times): new users `w{worker}n{i}` and returning
/// `pre` users in turn, asserting each login succeeds (and a returning user keeps its uid).
/// Returns the new users' (openid, uid).
async fn login_load(
    url: String,
    http: reqwest::Client,
    worker: u64,
    pre: Arc<Vec<wxbroker::User>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<(String, u64)> {
    const LOGINS: u64 = 2_000;
    let mut registered = Vec::new();
    for i in 0..LOGINS {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (name, returning) = match i % 2 {
            0 => (format!("w{worker}n{i}"), None),
            _ => {
                let user = &pre[((worker * 997 + i * 31) % pre.len() as u64) as usize];
                let name = format!("pre{}", (user.uid - 10) / 7);
                (name, Some(user.uid))
            }
        };
        let response = http
            .post(format!("{url}/v1/login"))
            .json(&serde_json::json!({ "code": format!("{name}.w{worker}i{i}") }))
            .send()
            .await
            .unwrap();
        let (status, body) = parts(response).await;
        assert_eq!(status, StatusCode::OK, "a login during the export: {body}");
        let uid = body["uid"].as_u64().unwrap();
        match returning {
            Some(expected) => assert_eq!(uid, expected, "{name} kept its uid"),
            None => registered.push((Sandbox::openid_of(&name), uid)),
        }
        done.fetch_add(1, Ordering::SeqCst);
    }
    registered
}

/// `GET /admin/export` while logins go on: every user stored before the export began comes
/// exactly once, as stored; every login succeeds; `wxbroker import` restores the lines into a
/// fresh data dir, where the users log in with their uids.
async fn the_admin_export_is_a_whole_backup_while_logins_go_on(kind: StoreKind) {
    // 12 pages of the export, and one more user in the last.
    let pre = Arc::new(stored_users(12 * EXPORT_PAGE as u64 + 1));
    let (tb, _data) = serving(kind, &pre).await;
    // A user registered over HTTP before the export, with a unionid, a profile and a phone.
    let alice = tb.token("alice.union.1").await;
    let profile = tb.sandbox.encrypted_profile("alice").unwrap();
    let status = post(&tb, "userinfo", &alice, &profile).await.status();
    assert_eq!(status, StatusCode::OK);
    let phone = tb.sandbox.encrypted_phone("alice", "13912345678").unwrap();
    let status = post(&tb, "phone", &alice, &phone).await.status();
    assert_eq!(status, StatusCode::OK);
    let mut alice: wxbroker::User = serde_json::from_value(me(&tb, &alice).await).unwrap();
    // An export line is one identity: the default app's names no appid, and lists none.
    (alice.appid, alice.identities) = (None, Vec::new());
    let mut before: Vec<wxbroker::User> = pre.to_vec();
    before.push(alice);

    // The admin secret guards it like every admin route.
    let url = format!("{}/admin/export", tb.url);
    let anonymous = tb.http.get(&url).send().await.unwrap();
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "admin_unauthorized").await;
    let wrong = tb.http.get(&url).bearer_auth("x".repeat(40)).send().await;
    assert_error(
        wrong.unwrap(),
        StatusCode::UNAUTHORIZED,
        "admin_unauthorized",
    )
    .await;

    // Four clients log in, new and returning users, from before the export to after it.
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let load = login_load(
                tb.url.clone(),
                tb.http.clone(),
                worker,
                pre.clone(),
                stop.clone(),
                done.clone(),
            );
            tokio::spawn(load)
        })
        .collect();
    eventually("logins before the export", || async {
        done.load(Ordering::SeqCst) >= 8
    })
    .await;
    let logins_before = done.load(Ordering::SeqCst);
    let response = export_over_http(&tb).await;
    assert_eq!(response.status(), StatusCode::OK);
    let media = response.headers()["content-type"].to_str().unwrap();
    assert_eq!(media, "application/x-ndjson");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body = response.text().await.expect("the whole body arrives");
    let logins_during = done.load(Ordering::SeqCst) - logins_before;
    stop.store(true, Ordering::SeqCst);
    let mut registered = HashMap::new();
    for worker in workers {
        registered.extend(worker.await.unwrap());
    }
    println!(
        "{kind:?}: exported {} lines; logins while it ran: {logins_during}",
        body.lines().count()
    );

    // Whole lines only, each a user once, every user stored before the export as stored (a
    // returning login may have moved `updatedAt`), a user registered meanwhile with its uid.
    assert!(body.ends_with('\n'), "the last line is whole");
    let exported: Vec<wxbroker::User> = body
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let by_openid: HashMap<&str, &wxbroker::User> =
        exported.iter().map(|u| (u.openid.as_str(), u)).collect();
    let uids: HashSet<u64> = exported.iter().map(|u| u.uid).collect();
    assert_eq!(by_openid.len(), exported.len(), "an openid twice");
    assert_eq!(uids.len(), exported.len(), "a uid twice");
    for user in &before {
        let found = by_openid
            .get(user.openid.as_str())
            .unwrap_or_else(|| panic!("uid {} is missing from the export", user.uid));
        let found = wxbroker::User {
            updated_at: user.updated_at,
            ..(*found).clone()
        };
        assert_eq!(&found, user);
    }
    for user in &exported {
        if let Some(uid) = registered.get(&user.openid) {
            assert_eq!(user.uid, *uid, "{}", user.openid);
        } else {
            assert!(before.iter().any(|b| b.openid == user.openid), "{user:?}");
        }
    }

    // `wxbroker import` restores it into a fresh data dir: the same lines come out again.
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("users.jsonl");
    std::fs::write(&file, &body).unwrap();
    let restored = work.path().join("restored");
    run_ok(
        wxbroker()
            .arg("import")
            .arg("--data-dir")
            .arg(&restored)
            .arg("--input")
            .arg(&file),
    )
    .await;
    let mut lines: Vec<&str> = body.lines().collect();
    lines.sort_unstable();
    let again = export_dir(&restored).await;
    let mut restored_lines: Vec<&str> = again.lines().collect();
    restored_lines.sort_unstable();
    assert_eq!(restored_lines, lines);

    // A broker on the restored data dir: users stored before the export log in with their uids.
    let sandbox = tb.sandbox.clone();
    drop(tb);
    let restored_broker = TestBroker::start_on(sandbox, |c| c.data_dir = restored).await;
    for i in [0, 1, pre.len() as u64 - 1] {
        let (status, body) = parts(restored_broker.login(&format!("pre{i}.restored")).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            (body["uid"].as_u64(), body["isNew"].as_bool()),
            (Some(10 + 7 * i), Some(false))
        );
    }
    let (_, body) = parts(restored_broker.login("alice.restored").await).await;
    assert_eq!(body["isNew"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_export_on_sled_is_a_whole_backup_while_logins_go_on() {
    the_admin_export_is_a_whole_backup_while_logins_go_on(StoreKind::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_export_on_redis_is_a_whole_backup_while_logins_go_on() {
    the_admin_export_is_a_whole_backup_while_logins_go_on(StoreKind::Redis).await;
}

/// A store failing after the first page: the answer was 200, so the body ends without its last
/// chunk, and the client sees a broken transfer rather than a short export; the cut-short file an
/// interrupted copy leaves is refused by `wxbroker import`.
#[tokio::test]
async fn an_export_that_fails_midway_is_cut_short_never_complete() {
    let pre = stored_users(3 * EXPORT_PAGE as u64);
    let data = tempfile::tempdir().unwrap();
    // A record that cannot be read, in the middle of the openid order: in the second page.
    let mut openids: Vec<&str> = pre.iter().map(|user| user.openid.as_str()).collect();
    openids.sort_unstable();
    let unreadable = format!("{}~", openids[400]);
    {
        let store = backup::open_for_import(data.path(), 8).unwrap();
        backup::import(&store, as_lines(&pre).as_bytes()).unwrap();
        drop(store);
        // The data dir's last handles may outlive the drop by a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let db = loop {
            match sled::open(data.path()) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot open {}: {e}", data.path().display()),
            }
        };
        db.open_tree("users")
            .unwrap()
            .insert(unreadable.as_bytes(), "not a user")
            .unwrap();
        db.flush().unwrap();
    }
    let path = data.path().to_owned();
    let tb = TestBroker::start_with(|c| {
        c.data_dir = path;
        c.admin_token = Some(wxbroker::Secret::new(ADMIN));
    })
    .await;
    let mut response = export_over_http(&tb).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut received = Vec::new();
    let failed = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(failed, "the body ended as if complete");
    // What arrived is at most the first page (hyper may drop what it had not sent yet, or cut
    // its last write): users, line by line.
    let received = String::from_utf8_lossy(&received);
    let lines: Vec<&str> = received.split_inclusive('\n').collect();
    assert!(lines.len() <= EXPORT_PAGE, "{received}");
    for line in lines.iter().filter(|line| line.ends_with('\n')) {
        serde_json::from_str::<wxbroker::User>(line).unwrap();
    }
    assert!(
        logs().contains("the export failed"),
        "the failure is logged"
    );

    // A copy cut inside a line, or before its newline, is refused naming the line.
    let whole = as_lines(&pre[..3]);
    let work = tempfile::tempdir().unwrap();
    for (name, cut) in [("inside", whole.len() - 30), ("newline", whole.len() - 1)] {
        let file = work.path().join(format!("{name}.jsonl"));
        std::fs::write(&file, &whole[..cut]).unwrap();
        let output = wxbroker()
            .arg("import")
            .arg("--data-dir")
            .arg(work.path().join(name))
            .arg("--input")
            .arg(&file)
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{name}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("line 3:") && stderr.contains("cut short"),
            "{name}: {stderr}"
        );
    }
}
