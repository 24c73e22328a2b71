//! What `deploy/` ships: the systemd unit (checked by `systemd-analyze`, and its environment and
//! credentials run for real), `wxbroker healthcheck`, and the container image, built and run with
//! podman.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::process::Command;

use wxbroker::{Config, SANDBOX_APPID, Sandbox, SandboxOptions};

use crate::binary::Process;
use crate::support::client;

/// The repository root, where `deploy/` is.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The unit as shipped.
fn unit_text() -> String {
    std::fs::read_to_string(root().join("deploy/wxbroker.service")).unwrap()
}

/// The values of `key=` in the unit's lines, in order (comments skipped).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    text.lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The one value of `key=` in the unit.
fn unit_value(text: &str, key: &str) -> String {
    let values = unit_values(text, key);
    assert_eq!(values.len(), 1, "the unit sets {key}= once: {values:?}");
    values[0].clone()
}

/// The program of the unit's `ExecStart=` and its arguments.
fn exec_start(text: &str) -> Vec<String> {
    unit_value(text, "ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `systemd-analyze`, or a panic saying how to install it: the test must fail, not pass silently.
fn systemd_analyze() -> std::process::Command {
    let path = Path::new("/usr/bin/systemd-analyze");
    if !path.is_file() {
        panic!(
            "systemd-analyze is not installed: the unit's check needs it (Debian/Ubuntu: \
             apt-get install systemd; .ci/run installs it)"
        );
    }
    std::process::Command::new(path)
}

/// The binary with no `WECHAT_*` or `WXBROKER_*` setting from the environment of the tests, and
/// no flag.
fn bare_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wxbroker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("WECHAT_") || name.starts_with("WXBROKER_") {
            command.env_remove(name);
        }
    }
    command.kill_on_drop(true);
    command
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_and_is_hardened() {
    // verify checks that ExecStart's program exists: a copy of the unit runs the one built here.
    let text = unit_text();
    let program = exec_start(&text).remove(0);
    assert_eq!(program, "/usr/local/bin/wxbroker");
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("wxbroker.service");
    let built = env!("CARGO_BIN_EXE_wxbroker");
    std::fs::write(&unit, text.replace(&program, built)).unwrap();

    let output = systemd_analyze().arg("verify").arg(&unit).output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Warnings about the unit name it; other lines are about the host's own units.
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|line| line.contains("wxbroker.service"))
        .collect();
    assert!(
        output.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {}\n{said}",
        output.status
    );

    // The sandboxing options, scored by systemd: 1.4 ("OK") when written; 2.0 at most.
    let output = systemd_analyze()
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    let overall = report
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or_default();
    assert!(
        output.status.success(),
        "systemd-analyze security: {overall} (at most 2.0 expected)\n{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for option in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "StateDirectory=wxbroker",
    ] {
        assert!(text.lines().any(|line| line == option), "{option}");
    }
}

#[test]
fn the_unit_waits_longer_than_the_drain_before_killing() {
    let text = unit_text();
    assert_eq!(unit_value(&text, "KillSignal"), "SIGTERM");
    let stop = unit_value(&text, "TimeoutStopSec");
    let stop_secs: u64 = stop
        .strip_suffix('s')
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("TimeoutStopSec={stop}: seconds expected, e.g. 30s"));
    // The drain, then the broker's shutdown and last flush: 10 s more is plenty.
    let drain_secs = Config::default().drain_timeout_ms.div_ceil(1000);
    assert!(
        stop_secs >= drain_secs + 10,
        "TimeoutStopSec={stop} leaves too little after the {drain_secs} s drain"
    );
}

/// An admin token of the tests (at least 32 characters).
const ADMIN_TOKEN: &str = "unit-test-admin-token-0123456789abcdef";

/// What systemd would start for the unit, on this machine and without systemd: `%S` (the state
/// directories' root) and `%d` (the credentials directory) point into `dir`, each
/// `LoadCredential=` gets a file there, and the config file names the sandbox in this process.
#[tokio::test]
async fn the_unit_runs_the_broker_with_its_credentials_and_state_directory() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = unit_text();
    let state = dir.path().join("state");
    let credentials = dir.path().join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    let state_dir = state.join(unit_value(&text, "StateDirectory"));
    std::fs::create_dir_all(&state_dir).unwrap();
    for credential in unit_values(&text, "LoadCredential") {
        let (id, _source) = credential.split_once(':').unwrap();
        let content = match id {
            "wechat-secret" => sandbox.secret().expose().to_owned(),
            "admin-token" => ADMIN_TOKEN.to_owned(),
            other => panic!("the unit loads a credential this test does not know: {other}"),
        };
        // As an operator's `echo` writes it: with a line break.
        std::fs::write(credentials.join(id), format!("{content}\n")).unwrap();
    }
    let expand = |value: &str| {
        value
            .replace("%S", state.to_str().unwrap())
            .replace("%d", credentials.to_str().unwrap())
    };
    let environment: BTreeMap<String, String> = unit_values(&text, "Environment")
        .iter()
        .map(|assignment| {
            let (name, value) = assignment.split_once('=').unwrap();
            let expanded = expand(value);
            assert!(
                !expanded.contains('%'),
                "a specifier this test leaves: {value}"
            );
            (name.to_owned(), expanded)
        })
        .collect();
    assert!(
        !environment.keys().any(|name| name == "WECHAT_SECRET"),
        "the secret must come from a credential, not the unit"
    );

    // The unit's config file, as the operator writes it (no secret in it).
    let config = dir.path().join("wxbroker.toml");
    std::fs::write(
        &config,
        format!(
            "appid = \"{SANDBOX_APPID}\"\napi_base = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
             login_rate_per_min = 0\ncache_mb = 16\n",
            sandbox.url()
        ),
    )
    .unwrap();
    let mut args = exec_start(&text);
    args.remove(0);
    let at = args.iter().position(|arg| arg == "--config").unwrap();
    args[at + 1] = config.to_str().unwrap().to_owned();

    let mut command = bare_command();
    command
        .args(&args)
        .envs(&environment)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let process = Process::spawn(command).await;
    assert!(
        process
            .log
            .lock()
            .unwrap()
            .contains(&format!("data_dir=\"{}\"", state_dir.display())),
        "{}",
        process.log.lock().unwrap()
    );

    // The secret reached WeChat (the sandbox checks it), the admin token the admin routes.
    let http = client();
    let login: Value = http
        .post(format!("{}/v1/login", process.url))
        .json(&serde_json::json!({"code": "unit.1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uid = login["uid"].as_u64().unwrap_or_else(|| panic!("{login}"));
    let admin = |token: &'static str| {
        http.get(format!("{}/admin/users/{uid}", process.url))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(admin(ADMIN_TOKEN).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        admin("not-the-admin-token-0123456789abcdef")
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(
        std::fs::read_dir(&state_dir).unwrap().next().is_some(),
        "nothing written in the state directory"
    );

    // systemd stops it with the unit's KillSignal.
    let mut child = process.child;
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-s", &unit_value(&text, "KillSignal"), &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `wxbroker healthcheck` with `listen` as the listen address.
async fn healthcheck(listen: &str) -> Output {
    bare_command()
        .env("WXBROKER_LISTEN", listen)
        .arg("healthcheck")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn healthcheck_exits_0_when_healthz_answers_200_and_1_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::start(dir.path()).await;
    let port = process.url.rsplit(':').next().unwrap().to_owned();

    // 0.0.0.0, as in the container image, is asked on loopback.
    for listen in [format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}")] {
        let output = healthcheck(&listen).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{listen}: {output:?}");
        assert!(
            stdout.contains(&format!("http://127.0.0.1:{port}/healthz answered 200")),
            "{stdout}"
        );
    }

    // An answer other than 200 (a broker whose actors restart answers 503).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unhealthy = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        while !request.ends_with(b"\r\n\r\n") {
            let mut buf = [0; 1024];
            let read = stream.read(&mut buf).await.unwrap();
            assert!(read > 0, "{}", String::from_utf8_lossy(&request));
            request.extend_from_slice(&buf[..read]);
        }
        stream
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
    });
    let output = healthcheck(&unhealthy.to_string()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "unhealthy: http://{unhealthy}/healthz answered 503"
        )),
        "{stderr}"
    );
    server.await.unwrap();

    // Nobody listening.
    drop(process);
    let closed = format!("127.0.0.1:{port}");
    let output = healthcheck(&closed).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "unhealthy: no answer from http://{closed}/healthz"
        )),
        "{stderr}"
    );
}

/// podman as root on this machine's kind of host (docs: /work/shared/CONTAINERS.md): runc, since
/// crun does not run on hybrid cgroups, and cgroupfs, since there may be no systemd.
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    command.kill_on_drop(true);
    command
}

/// Runs podman with `args` within `limit`; panics with its output unless it succeeds.
async fn podman_ok(args: &[&str], limit: Duration) -> String {
    let output = tokio::time::timeout(limit, podman().args(args).output())
        .await
        .unwrap_or_else(|_| panic!("podman {args:?} took more than {limit:?}"))
        .unwrap_or_else(|e| {
            panic!(
                "cannot run podman ({e}): the container test needs it (Debian/Ubuntu, as root: \
                 apt-get install podman runc; .ci/run installs them)"
            )
        });
    assert!(
        output.status.success(),
        "podman {args:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Removes the test's container (with its anonymous volume) and image, however the test ends.
struct Cleanup {
    name: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let remove = |args: &[&str]| {
            let _ = std::process::Command::new("podman")
                .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        remove(&["rm", "--force", "--volumes", &self.name]);
        remove(&["rmi", "--force", &self.image]);
    }
}

/// Waits until `podman healthcheck run` (the image's HEALTHCHECK, run now) says healthy.
async fn wait_healthy(name: &str) {
    for _ in 0..60 {
        let output = podman()
            .args(["healthcheck", "run", name])
            .output()
            .await
            .unwrap();
        if output.status.success() {
            let status = podman_ok(
                &["inspect", "--format", "{{.State.Health.Status}}", name],
                Duration::from_secs(30),
            )
            .await;
            assert_eq!(status, "healthy");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let logs = podman_ok(&["logs", name], Duration::from_secs(30)).await;
    panic!("the container did not turn healthy within 60 checks: {logs}");
}

/// `podman stop` (the image's STOPSIGNAL, SIGTERM, with 30 s before a SIGKILL): the broker
/// drains and exits 0, not 137.
async fn stop_cleanly(name: &str) {
    podman_ok(&["stop", "--time", "30", name], Duration::from_secs(60)).await;
    let code = podman_ok(
        &["inspect", "--format", "{{.State.ExitCode}}", name],
        Duration::from_secs(30),
    )
    .await;
    let logs = podman_ok(&["logs", name], Duration::from_secs(30)).await;
    assert_eq!(code, "0", "{logs}");
}

/// Logs in as `code` through the container's sandbox: (uid, isNew).
async fn container_login(url: &str, code: &str) -> (u64, bool) {
    let http = client();
    let login: Value = http
        .post(format!("{url}/v1/login"))
        .json(&serde_json::json!({ "code": code }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["thirdSession"]
        .as_str()
        .unwrap_or_else(|| panic!("{login}"));
    let session = http
        .get(format!("{url}/v1/session"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), StatusCode::OK);
    (login["uid"].as_u64().unwrap(), login["isNew"] == true)
}

/// deploy/Dockerfile, built with podman: its build stage is replaced by a directory holding what
/// that stage leaves (`deploy/rootfs.sh` run here on the binary the tests built), since no
/// registry need be reachable for the test; the runtime stage is built as shipped.
#[tokio::test]
async fn the_container_image_serves_turns_healthy_keeps_its_data_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("build");
    let rootfs = stage.join("rootfs");
    let laid_out = std::process::Command::new(root().join("deploy/rootfs.sh"))
        .arg(env!("CARGO_BIN_EXE_wxbroker"))
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(laid_out.status.success(), "deploy/rootfs.sh: {laid_out:?}");

    let name = format!(
        "wxbroker-test-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let image = format!("localhost/{name}:latest");
    let _cleanup = Cleanup {
        name: name.clone(),
        image: image.clone(),
    };
    let dockerfile = root().join("deploy/Dockerfile");
    let context = format!("build={}", stage.display());
    podman_ok(
        &[
            "build",
            "--quiet",
            "--layers=false",
            "--format",
            "docker",
            "--file",
            dockerfile.to_str().unwrap(),
            "--build-context",
            &context,
            "--tag",
            &image,
            root().to_str().unwrap(),
        ],
        Duration::from_secs(300),
    )
    .await;
    let config = podman_ok(
        &[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}|{{json .Config.Healthcheck.Test}}|{{json .Config.Volumes}}|{{.Config.StopSignal}}",
            &image,
        ],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        config,
        "10001:10001|[\"CMD\",\"/usr/local/bin/wxbroker\",\"healthcheck\"]|\
         {\"/var/lib/wxbroker\":{}}|SIGTERM"
    );

    // The image's own listen address (0.0.0.0:8080), published on loopback only. In sandbox
    // mode, which WXBROKER_SANDBOX=1 allows off loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let publish = format!("127.0.0.1:{port}:8080");
    podman_ok(
        &[
            "run",
            "--detach",
            "--name",
            &name,
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
            "--publish",
            &publish,
            "--env",
            "WXBROKER_SANDBOX=1",
            &image,
        ],
        Duration::from_secs(60),
    )
    .await;
    wait_healthy(&name).await;
    let user = podman_ok(&["top", &name, "huser"], Duration::from_secs(30)).await;
    assert_eq!(user.lines().nth(1).map(str::trim), Some("10001"), "{user}");
    let url = format!("http://127.0.0.1:{port}");
    let (uid, new) = container_login(&url, "docker.1").await;
    assert!(new);
    stop_cleanly(&name).await;

    // Started again on the same volume: the user is known.
    podman_ok(&["start", &name], Duration::from_secs(60)).await;
    wait_healthy(&name).await;
    assert_eq!(container_login(&url, "docker.2").await, (uid, false));
    stop_cleanly(&name).await;
    let logs = podman_ok(&["logs", &name], Duration::from_secs(30)).await;
    assert_eq!(logs.matches("stopped cleanly").count(), 2, "{logs}");
}
