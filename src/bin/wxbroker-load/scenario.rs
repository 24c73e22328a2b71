//! The scenarios: what each worker sends, in what order, and what answer counts as success.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::Method;
use tokio::sync::Barrier;

use crate::client::{Call, Conn};
use crate::fleet::Fleet;
use crate::report::{EndpointStats, ScenarioReport, TargetReport};

/// What to load.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// `GET /healthz`: a route that does no work, for the HTTP ceiling of this machine.
    Baseline,
    /// `GET /v1/session` with tokens made beforehand, each on another target than the one that
    /// checks it when there are several.
    Check,
    /// `POST /v1/login` with fresh codes, returning and new users mixed by `--new-ratio`.
    Login,
    /// A user's life: login, `--checks` session checks, userinfo, logout.
    Mixed,
    /// `--sessions` logins of returning users, to measure memory per live session.
    Sessions,
}

/// How much load.
pub struct Limits {
    /// Workers, each on its own keep-alive connection.
    pub connections: usize,
    /// Time bound.
    pub duration: Duration,
    /// Request bound.
    pub requests: u64,
}

/// Scenario parameters.
pub struct Options {
    /// Share of new users in `login`.
    pub new_ratio: f64,
    /// Pool of returning users in `login`.
    pub users: usize,
    /// Checks per life in `mixed`.
    pub checks: usize,
    /// Sessions to create in `sessions`.
    pub sessions: u64,
}

/// Live sessions one user may hold in the broker (its `MAX_SESSIONS_PER_USER` is 64).
const SESSIONS_PER_USER: u64 = 60;

/// State shared by a scenario's workers.
struct Shared {
    sent: AtomicU64,
    limit: u64,
    /// Set once every worker is connected and prepared: connecting is not what is measured.
    deadline: OnceLock<Instant>,
}

impl Shared {
    /// Takes the right to send one more request, unless a bound is reached.
    fn take(&self) -> bool {
        self.running() && self.sent.fetch_add(1, Ordering::Relaxed) < self.limit
    }

    fn running(&self) -> bool {
        let deadline = *self.deadline.get().expect("set before the workers start");
        Instant::now() < deadline && self.sent.load(Ordering::Relaxed) < self.limit
    }
}

/// One worker's connection, figures and place in its scenario.
struct Worker {
    conn: Conn,
    /// The fleet index of the target its connection is pinned to.
    target: usize,
    stats: BTreeMap<String, EndpointStats>,
    shared: Arc<Shared>,
    id: usize,
    nonce: String,
}

impl Worker {
    /// Sends `call` if the bounds allow, records it under `endpoint`; returns the body of an
    /// answer with the `expected` status.
    async fn call(
        &mut self,
        endpoint: &str,
        call: Call<'_>,
        expected: u16,
    ) -> Option<bytes::Bytes> {
        if !self.shared.take() {
            return None;
        }
        let started = Instant::now();
        let outcome = self.conn.send(&call).await;
        let micros = started.elapsed().as_micros().max(1) as u64;
        let stats = self.stats.entry(endpoint.to_owned()).or_default();
        let _ = stats.latency.record(micros);
        match outcome {
            Ok((status, body)) if status == expected => {
                stats.ok += 1;
                return Some(body);
            }
            Ok((status, _)) => *stats.errors.entry(status.to_string()).or_default() += 1,
            Err(_) => *stats.errors.entry("io".into()).or_default() += 1,
        }
        // Something is wrong: another attempt would only repeat it at full speed.
        tokio::time::sleep(Duration::from_millis(10)).await;
        None
    }
}

fn login_call(code: &str) -> Call<'static> {
    Call {
        method: Method::POST,
        path: "/v1/login",
        token: None,
        json: Some(serde_json::json!({ "code": code }).to_string()),
    }
}

/// Logs in as `code` outside any measurement; returns the token.
async fn token(conn: &mut Conn, code: &str) -> anyhow::Result<String> {
    let (status, body) = conn.send(&login_call(code)).await?;
    anyhow::ensure!(
        status == 200,
        "preparing: login {code} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let body: serde_json::Value = serde_json::from_slice(&body)?;
    body["thirdSession"]
        .as_str()
        .map(str::to_owned)
        .context("no thirdSession")
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::Check => "check",
            Scenario::Login => "login",
            Scenario::Mixed => "mixed",
            Scenario::Sessions => "sessions",
        }
    }

    /// Prepares, runs the workers within the limits, and reports.
    pub async fn run(
        self,
        fleet: &Fleet,
        limits: &Limits,
        options: &Options,
    ) -> anyhow::Result<ScenarioReport> {
        let nonce = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let connections = limits.connections.max(1);
        let mut limit = limits.requests;
        let pool = match self {
            Scenario::Login if options.new_ratio < 1.0 => options.users,
            Scenario::Sessions => options.sessions.div_ceil(SESSIONS_PER_USER) as usize,
            _ => 0,
        };
        if self == Scenario::Sessions {
            limit = limit.min(options.sessions);
        }
        register_pool(fleet, &nonce, pool, connections).await?;
        let rss_before = fleet.rss();

        let shared = Arc::new(Shared {
            sent: AtomicU64::new(0),
            limit,
            deadline: OnceLock::new(),
        });
        let start = Arc::new(Barrier::new(connections + 1));
        let mut workers = Vec::new();
        for id in 0..connections {
            let target = fleet.pick(id);
            let conn = Conn::open(fleet.addr(target)).await?;
            let token = match self {
                // Made on the next target, so that with several every check reads a session
                // another instance created: what a shared store must get right.
                Scenario::Check => {
                    let mut maker = Conn::open(fleet.addr(fleet.pick(id + 1))).await?;
                    Some(token(&mut maker, &format!("c{nonce}w{id}.1")).await?)
                }
                _ => None,
            };
            let worker = Worker {
                conn,
                target,
                stats: BTreeMap::new(),
                shared: shared.clone(),
                id,
                nonce: nonce.clone(),
            };
            let start = start.clone();
            let options = (options.new_ratio, options.checks, pool);
            workers.push(tokio::spawn(async move {
                start.wait().await;
                self.drive(worker, token, options).await
            }));
        }
        let started = Instant::now();
        shared
            .deadline
            .set(started + limits.duration)
            .expect("set once");
        start.wait().await;
        let progress = tokio::spawn(progress(self.name(), started, shared.clone()));
        let mut merged: BTreeMap<String, EndpointStats> = BTreeMap::new();
        let mut per_target: BTreeMap<usize, TargetReport> = BTreeMap::new();
        for worker in workers {
            let (target, stats) = worker.await?;
            let share = per_target
                .entry(target)
                .or_insert_with(|| TargetReport::new(target, fleet.addr(target)));
            share.add_connection(&stats);
            for (endpoint, stats) in stats {
                merged.entry(endpoint).or_default().merge(&stats);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        progress.abort();
        eprintln!();
        let mut report = ScenarioReport::new(self.name(), connections, elapsed, &merged);
        report.targets = per_target.into_values().collect();
        if self == Scenario::Sessions
            && let (Some(before), Some(after)) = (rss_before, fleet.rss())
        {
            report.bytes_per_session =
                Some(after.saturating_sub(before) as f64 / report.requests.max(1) as f64);
        }
        Ok(report)
    }

    /// One worker's loop; returns its target and figures.
    async fn drive(
        self,
        mut w: Worker,
        token: Option<String>,
        (new_ratio, checks, pool): (f64, usize, usize),
    ) -> (usize, BTreeMap<String, EndpointStats>) {
        let mut seq = 0u64;
        while w.shared.running() {
            seq += 1;
            match self {
                Scenario::Baseline => {
                    let call = Call {
                        method: Method::GET,
                        path: "/healthz",
                        token: None,
                        json: None,
                    };
                    w.call("GET /healthz", call, 200).await;
                }
                Scenario::Check => {
                    let call = Call {
                        method: Method::GET,
                        path: "/v1/session",
                        token: token.as_deref(),
                        json: None,
                    };
                    w.call("GET /v1/session", call, 200).await;
                }
                Scenario::Login | Scenario::Sessions => {
                    let new = self == Scenario::Login && rand::random::<f64>() < new_ratio;
                    let code = if new {
                        format!("n{}w{}i{seq}.1", w.nonce, w.id)
                    } else {
                        format!(
                            "p{}u{}.{}x{seq}",
                            w.nonce,
                            rand::random_range(0..pool.max(1)),
                            w.id
                        )
                    };
                    w.call("POST /v1/login", login_call(&code), 200).await;
                }
                Scenario::Mixed => mixed_life(&mut w, seq, checks).await,
            }
        }
        (w.target, w.stats)
    }
}

/// A user's life: login, checks, the client's encrypted profile, userinfo, logout. All on the
/// worker's one target: the sandbox that encrypts the profile must be the one that gave the
/// session_key at login.
async fn mixed_life(w: &mut Worker, seq: u64, checks: usize) {
    let name = format!("m{}w{}i{seq}", w.nonce, w.id);
    let Some(body) = w
        .call("POST /v1/login", login_call(&format!("{name}.1")), 200)
        .await
    else {
        return;
    };
    let Some(token) = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|b| b["thirdSession"].as_str().map(str::to_owned))
    else {
        return;
    };
    for _ in 0..checks {
        let call = Call {
            method: Method::GET,
            path: "/v1/session",
            token: Some(&token),
            json: None,
        };
        w.call("GET /v1/session", call, 200).await;
    }
    let path = format!("/sandbox/userinfo?user={name}");
    let call = Call {
        method: Method::GET,
        path: &path,
        token: None,
        json: None,
    };
    if let Some(data) = w.call("GET /sandbox/userinfo", call, 200).await {
        let call = Call {
            method: Method::POST,
            path: "/v1/userinfo",
            token: Some(&token),
            json: Some(String::from_utf8_lossy(&data).into_owned()),
        };
        w.call("POST /v1/userinfo", call, 200).await;
    }
    let call = Call {
        method: Method::POST,
        path: "/v1/logout",
        token: Some(&token),
        json: None,
    };
    w.call("POST /v1/logout", call, 204).await;
}

/// Registers the pool of returning users before the measurement, spread over the targets.
async fn register_pool(
    fleet: &Fleet,
    nonce: &str,
    pool: usize,
    connections: usize,
) -> anyhow::Result<()> {
    if pool == 0 {
        return Ok(());
    }
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..connections.min(pool).min(64) {
        let (next, nonce, addr) = (next.clone(), nonce.to_owned(), fleet.addr(fleet.pick(task)));
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            loop {
                let user = next.fetch_add(1, Ordering::Relaxed) as usize;
                if user >= pool {
                    return Ok::<_, anyhow::Error>(());
                }
                token(&mut conn, &format!("p{nonce}u{user}.0")).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// A live progress line on stderr, once a second.
async fn progress(name: &'static str, started: Instant, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let sent = shared.sent.load(Ordering::Relaxed).min(shared.limit);
        eprint!(
            "\r[{name}] {:>4.0} s {sent:>10} requests {:>8} req/s",
            started.elapsed().as_secs_f64(),
            sent - last
        );
        last = sent;
    }
}
