//! The test harness: a broker served on loopback, with its sandbox, clock and data directory.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warp::Filter;
use wxbroker::{Broker, Clock, Config, Sandbox, SandboxOptions, Secret};

/// Where the manual clock starts (some day in 2026).
pub const T0: u64 = 1_790_000_000;

/// Every log line of every broker in this test binary, at debug level (trace for wxbroker).
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

fn capture_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug,wxbroker=trace"))
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .init();
        buffer
    })
}

/// What the brokers of this test binary have logged so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&capture_logs().lock().unwrap()).into_owned()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A broker served over HTTP on a free loopback port.
pub struct TestBroker {
    pub url: String,
    pub http: reqwest::Client,
    pub broker: Broker,
    pub sandbox: Arc<Sandbox>,
    pub clock: Clock,
    pub config: Config,
    pub dir: Arc<TempDir>,
    /// The Redis server of a broker on the Redis backend.
    pub redis: Option<Arc<RedisServer>>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), wxbroker::Error>>>,
}

impl TestBroker {
    /// A broker on a fresh data directory, a fresh sandbox and a manual clock at [`T0`].
    pub async fn start() -> TestBroker {
        TestBroker::start_with(|_| {}).await
    }

    /// As [`TestBroker::start`], with the configuration adjusted by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let sandbox = Arc::new(Sandbox::start(SandboxOptions::default()).await.unwrap());
        TestBroker::start_on(sandbox, tweak).await
    }

    /// As [`TestBroker::start_with`], on the given backend (a fresh Redis server for Redis).
    pub async fn start_backend(kind: StoreKind, tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let redis = match kind {
            StoreKind::Sled => None,
            StoreKind::Redis => Some(Arc::new(RedisServer::start().await)),
        };
        TestBroker::start_shared(redis, None, tweak).await
    }

    /// A broker on the Redis of `redis` (if any) and the WeChat of `sandbox` (a fresh one if
    /// none): several such brokers share users and sessions, like instances behind a balancer.
    pub async fn start_shared(
        redis: Option<Arc<RedisServer>>,
        sandbox: Option<Arc<Sandbox>>,
        tweak: impl FnOnce(&mut Config),
    ) -> TestBroker {
        let sandbox = match sandbox {
            Some(sandbox) => sandbox,
            None => Arc::new(Sandbox::start(SandboxOptions::default()).await.unwrap()),
        };
        let url = redis.as_ref().map(|r| Secret::new(r.url.clone()));
        let mut tb = TestBroker::start_on(sandbox, |config| {
            config.store = url;
            tweak(config);
        })
        .await;
        tb.redis = redis;
        tb
    }

    /// A broker using `sandbox` as WeChat.
    pub async fn start_on(sandbox: Arc<Sandbox>, tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            clock: Clock::manual(T0),
            cache_mb: 8,
            sweep_interval_secs: 3600,
            upstream_timeout_ms: 2000,
            // Every test client comes from 127.0.0.1; the limit has a test of its own.
            login_rate_per_min: 0,
            // Tests call WeChat for one user more often than a user would; the budget has tests
            // of its own.
            wechat_calls_per_min: 0,
            ..Config::default()
        };
        sandbox.configure(&mut config);
        tweak(&mut config);
        TestBroker::serve(config, sandbox, dir).await
    }

    async fn serve(config: Config, sandbox: Arc<Sandbox>, dir: Arc<TempDir>) -> TestBroker {
        capture_logs();
        let broker = Broker::start(&config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(wxbroker::serve(listener, broker.clone(), async {
            let _ = stopped.await;
        }));
        TestBroker {
            url: format!("http://{addr}"),
            http: client(),
            broker,
            sandbox,
            clock: config.clock.clone(),
            config,
            dir,
            redis: None,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops serving and shuts the broker down cleanly.
    pub async fn stop(&mut self) {
        self.stop_with().await.unwrap();
    }

    /// Stops serving; returns what `wxbroker::serve` returned.
    pub async fn stop_with(&mut self) -> Result<(), wxbroker::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Idle keep-alive connections would hold the server open.
        self.http = client();
        let server = self.server.take().expect("served");
        tokio::time::timeout(Duration::from_secs(15), server)
            .await
            .expect("server drained")
            .unwrap()
    }

    /// Shuts down and starts again on the same data directory, sandbox and clock.
    pub async fn restart(mut self) -> TestBroker {
        self.stop().await;
        let (config, sandbox, dir) = (self.config.clone(), self.sandbox.clone(), self.dir.clone());
        let redis = self.redis.clone();
        drop(self);
        let mut tb = TestBroker::serve(config, sandbox, dir).await;
        tb.redis = redis;
        tb
    }

    /// POST /v1/login with a JSON body.
    pub async fn login(&self, code: &str) -> Response {
        self.http
            .post(format!("{}/v1/login", self.url))
            .json(&serde_json::json!({ "code": code }))
            .send()
            .await
            .unwrap()
    }

    /// Logs in and returns the token, asserting success.
    pub async fn token(&self, code: &str) -> String {
        let (status, body) = parts(self.login(code).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["thirdSession"].as_str().unwrap().to_owned()
    }

    /// GET /v1/session with the token.
    pub async fn session(&self, token: &str) -> Response {
        self.http
            .get(format!("{}/v1/session", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// POST /v1/logout with the token.
    pub async fn logout(&self, token: &str) -> Response {
        self.http
            .post(format!("{}/v1/logout", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A client that never waits long: a hang shows up as a test failure, not a stuck run.
pub fn client() -> reqwest::Client {
    wxbroker::tls::install_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POSTs `data` as JSON to `/v1/{route}` with the session `token`.
pub async fn post(
    tb: &TestBroker,
    route: &str,
    token: &str,
    data: &impl serde::Serialize,
) -> Response {
    tb.http
        .post(format!("{}/v1/{route}", tb.url))
        .bearer_auth(token)
        .json(data)
        .send()
        .await
        .unwrap()
}

/// `GET /v1/me` with `token`, asserting 200.
pub async fn me(tb: &TestBroker, token: &str) -> Value {
    let response = tb
        .http
        .get(format!("{}/v1/me", tb.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let (status, body) = parts(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Status and JSON body of a response (asserting the body is JSON).
pub async fn parts(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, body)
}

/// Asserts a JSON error answer with this status and error code.
pub async fn assert_error(response: Response, status: StatusCode, code: &str) -> Value {
    let (got, body) = parts(response).await;
    assert_eq!(
        (got, body["error"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// The value of `series` (a metric's name and labels, as `/metrics` writes them) in the
/// Prometheus text `text`: that series exactly, so `..._total 1` is not found in `..._total 10`
/// nor `..._total` in `..._total_x`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// Polls `condition` every 20 ms for up to 10 s.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A misbehaving WeChat on loopback. The code picks the fault:
/// `http500`, `garbage` (HTML), `truncated` (cut-off JSON), `hang` (never answers),
/// `busy_once.N` (-1, then success), `busy_then_used.N` (-1, then 40163), `busy.N` (-1 always),
/// `redirect` (302 to an answer that would succeed);
/// anything else succeeds. The access_token endpoints (`/cgi-bin/...`) never answer.
/// Returns the base URL and a count of requests served.
pub async fn fault_upstream() -> (String, Arc<AtomicU64>) {
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let route = warp::path!("sns" / "jscode2session")
        .and(warp::query::<HashMap<String, String>>())
        .then(move |query: HashMap<String, String>| {
            counter.fetch_add(1, Ordering::Relaxed);
            let code = query.get("js_code").cloned().unwrap_or_default();
            let first = seen.lock().unwrap().insert(code.clone());
            async move {
                let kind = code.split('.').next().unwrap_or("");
                let ok = r#"{"openid":"o-fault","session_key":"a2V5a2V5a2V5a2V5a2V5aw=="}"#;
                let (status, body) = match (kind, first) {
                    ("http500", _) => (500, "internal error"),
                    ("redirect", _) => (302, ""),
                    ("garbage", _) => (200, "<html>WeChat</html>"),
                    ("truncated", _) => (200, r#"{"openid":"o1","session_k"#),
                    ("hang", _) => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        (200, "{}")
                    }
                    ("busy", _) | ("busy_once" | "busy_then_used", true) => {
                        (200, r#"{"errcode":-1,"errmsg":"system error"}"#)
                    }
                    ("busy_then_used", false) => {
                        (200, r#"{"errcode":40163,"errmsg":"code been used"}"#)
                    }
                    _ => (200, ok),
                };
                let reply = warp::reply::with_status(
                    body,
                    warp::http::StatusCode::from_u16(status).unwrap(),
                );
                // Only a 3xx makes a client look at it.
                warp::reply::with_header(reply, "location", "/sns/jscode2session?js_code=fine")
            }
        });
    // The token endpoints never answer.
    let counter = calls.clone();
    let tokens = warp::path("cgi-bin").then(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "{}"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(route.or(tokens)).incoming(listener).run());
    (url, calls)
}

/// Which store a broker under test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded default.
    Sled,
    /// A real `redis-server`, started for the test.
    Redis,
}

/// A real `redis-server` on a free loopback port, with nothing persisted; killed when dropped.
pub struct RedisServer {
    child: Mutex<std::process::Child>,
    /// `redis://127.0.0.1:PORT/0`.
    pub url: String,
    /// The command that started it, run again by [`RedisServer::restart`].
    command: Vec<std::ffi::OsString>,
    port: u16,
    /// Its working directory (and a cluster node's config file), removed when dropped.
    _dir: TempDir,
}

impl RedisServer {
    /// Starts one. Panics with what to do when `redis-server` is not installed: the Redis tests
    /// must fail, not pass silently.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    /// As [`RedisServer::start`], with more arguments for `redis-server` (`--cluster-enabled`,
    /// ...); a relative file name in them is in the server's temporary directory.
    pub async fn start_with(args: &[&str]) -> RedisServer {
        let exe = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .map(|dir| dir.join("redis-server"))
            .find(|exe| exe.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "redis-server is not installed: the Redis backend tests need a real server \
                     (Debian/Ubuntu: apt-get install redis-server; .ci/run installs it)"
                )
            });
        for _ in 0..5 {
            // A port the OS just handed out is almost surely still free.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let mut command: Vec<std::ffi::OsString> = vec![exe.clone().into()];
            command.extend(
                ["--bind", "127.0.0.1", "--port", &port.to_string()]
                    .iter()
                    .chain(&["--save", "", "--appendonly", "no", "--loglevel", "warning"])
                    .chain(&["--dir"])
                    .map(Into::into),
            );
            command.push(dir.path().into());
            command.extend(args.iter().map(Into::into));
            if let Some(child) = RedisServer::spawn(&command, port).await {
                return RedisServer {
                    child: Mutex::new(child),
                    url: format!("redis://127.0.0.1:{port}/0"),
                    command,
                    port,
                    _dir: dir,
                };
            }
        }
        panic!("redis-server did not start on a free loopback port in 5 tries");
    }

    /// Runs `command` and waits until it listens on `port`; `None` if it exits or is not
    /// listening within 10 s.
    async fn spawn(command: &[std::ffi::OsString], port: u16) -> Option<std::process::Child> {
        let mut child = std::process::Command::new(&command[0])
            .args(&command[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(child);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again, as before and on the same port, after [`RedisServer::kill`]:
    /// a Redis back after an outage, empty (nothing was persisted).
    pub async fn restart(&self) {
        let child = RedisServer::spawn(&self.command, self.port)
            .await
            .unwrap_or_else(|| panic!("redis-server did not start again on port {}", self.port));
        *self.child.lock().unwrap() = child;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
