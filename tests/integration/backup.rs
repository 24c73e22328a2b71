//! Offline export and import of users (library and `wxbroker export` / `import`), and the
//! binary's config file (`--config`) layered under the environment and flags.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use clap::CommandFactory;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use wxbroker::backup;
use wxbroker::storage::sled::DataDir;
use wxbroker::{Config, Sandbox};

use crate::support::{TestBroker, client, me, parts, post};

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
