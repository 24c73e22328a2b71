//! The scenarios: what each worker sends, in what order, and what answer counts as success.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::Method;
use tokio::sync::Barrier;

use crate::client::{Call, Conn};
use crate::fleet::Fleet;
use crate::report::{EndpointStats, ScenarioReport, TargetReport};

/// The name the compaction phase's logins are reported under.
const DURING_COMPACTION: &str = "POST /v1/login (during compaction)";

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
    /// `--sessions` logins of returning users, to measure memory per live session; then logins of
    /// users at the session cap until the broker has compacted its session log.
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
    /// Whether `sessions` ends with its compaction phase.
    pub compaction: bool,
}

/// Logins per returning user in `sessions`, on average: each picks one of `--sessions / 60` users
/// at random, so a user holds 61 sessions with its registration's, and about a third of the users
/// pass the broker's cap and lose their oldest.
const SESSIONS_PER_USER: u64 = 60;

/// Live sessions one user may hold in the broker (its `MAX_SESSIONS_PER_USER`): one more login
/// evicts the oldest, so it writes two frames to the session log instead of one.
const SESSION_CAP: u64 = 64;

/// Users the compaction phase logs in at most: enough that concurrent logins seldom share a user,
/// few enough that bringing each to the cap beforehand takes seconds.
const CHURN_USERS: usize = 1024;

/// The broker's counter of finished session log rewrites, read from its `/metrics`.
pub const COMPACTIONS_METRIC: &str = "wxbroker_session_log_compactions_total";

/// How often the compaction phase reads `/metrics`.
const METRICS_POLL: Duration = Duration::from_millis(250);

/// How long the compaction phase goes on once a compaction has finished, for the logins the
/// rewrite held back to be answered and measured.
const AFTER_COMPACTION: Duration = Duration::from_secs(2);

/// State shared by a phase's workers.
struct Shared {
    sent: AtomicU64,
    limit: u64,
    /// Set once every worker is connected and prepared: connecting is not what is measured.
    deadline: OnceLock<Instant>,
    /// Ends the phase before its bounds: the compaction phase, once it has seen a compaction.
    stopped: AtomicBool,
}

impl Shared {
    fn new(limit: u64) -> Arc<Shared> {
        Arc::new(Shared {
            sent: AtomicU64::new(0),
            limit,
            deadline: OnceLock::new(),
            stopped: AtomicBool::new(false),
        })
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Takes the right to send one more request, unless a bound is reached.
    fn take(&self) -> bool {
        self.running() && self.sent.fetch_add(1, Ordering::Relaxed) < self.limit
    }

    fn running(&self) -> bool {
        let deadline = *self.deadline.get().expect("set before the workers start");
        !self.stopped()
            && Instant::now() < deadline
            && self.sent.load(Ordering::Relaxed) < self.limit
    }
}

/// What a phase's workers send.
#[derive(Clone, Copy)]
enum Work {
    /// The scenario's own loop.
    Scenario(Scenario, Plan),
    /// Logins of the first `users` returning users, each holding [`SESSION_CAP`] sessions.
    Churn { users: usize },
}

/// The scenario parameters a worker needs.
#[derive(Clone, Copy)]
struct Plan {
    new_ratio: f64,
    checks: usize,
    /// Returning users registered beforehand.
    pool: usize,
}

/// What one phase's workers measured.
struct Measured {
    /// Per connection: its target and its figures per endpoint.
    connections: Vec<(usize, BTreeMap<String, EndpointStats>)>,
    /// Seconds from the common start to the last answer.
    elapsed: f64,
}

impl Measured {
    /// The figures per endpoint, summed over the connections.
    fn endpoints(&self) -> BTreeMap<String, EndpointStats> {
        let mut merged: BTreeMap<String, EndpointStats> = BTreeMap::new();
        for (_, stats) in &self.connections {
            for (endpoint, stats) in stats {
                merged.entry(endpoint.clone()).or_default().merge(stats);
            }
        }
        merged
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

        let plan = Plan {
            new_ratio: options.new_ratio,
            checks: options.checks,
            pool,
        };
        let work = Work::Scenario(self, plan);
        let measured = measure(
            work,
            fleet,
            connections,
            limits.duration,
            Shared::new(limit),
            &nonce,
        )
        .await?;
        let mut report = ScenarioReport::new(
            self.name(),
            connections,
            measured.elapsed,
            &measured.endpoints(),
        );
        let mut per_target: BTreeMap<usize, TargetReport> = BTreeMap::new();
        for (target, stats) in &measured.connections {
            share(&mut per_target, fleet, *target).add_connection(stats);
        }
        if self == Scenario::Sessions
            && let (Some(before), Some(after)) = (rss_before, fleet.rss())
        {
            report.bytes_per_session =
                Some(after.saturating_sub(before) as f64 / report.requests.max(1) as f64);
        }
        if self == Scenario::Sessions && options.compaction && pool > 0 {
            let users = pool.min(CHURN_USERS);
            let (churn, watch) =
                compaction_phase(fleet, limits, connections, &nonce, users).await?;
            for (target, stats) in &churn.connections {
                share(&mut per_target, fleet, *target).add_requests(stats);
            }
            report.add_compaction(
                &churn.endpoints(),
                churn.elapsed,
                users,
                watch.compactions(),
                watch.exported,
            );
        }
        report.targets = per_target.into_values().collect();
        Ok(report)
    }

    /// One worker's loop; returns its target and figures.
    async fn drive(
        self,
        mut w: Worker,
        token: Option<String>,
        plan: Plan,
    ) -> (usize, BTreeMap<String, EndpointStats>) {
        let Plan {
            new_ratio,
            checks,
            pool,
        } = plan;
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

/// Runs one worker per connection doing `work`, from a common start until a bound of `shared`
/// stops them, with a progress line; returns what they measured.
async fn measure(
    work: Work,
    fleet: &Fleet,
    connections: usize,
    duration: Duration,
    shared: Arc<Shared>,
    nonce: &str,
) -> anyhow::Result<Measured> {
    let start = Arc::new(Barrier::new(connections + 1));
    let mut workers = Vec::new();
    for id in 0..connections {
        let target = fleet.pick(id);
        let conn = Conn::open(fleet.addr(target)).await?;
        let token = match work {
            // Made on the next target, so that with several every check reads a session
            // another instance created: what a shared store must get right.
            Work::Scenario(Scenario::Check, _) => {
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
            nonce: nonce.to_owned(),
        };
        let start = start.clone();
        workers.push(tokio::spawn(async move {
            start.wait().await;
            match work {
                Work::Scenario(scenario, plan) => scenario.drive(worker, token, plan).await,
                Work::Churn { users } => churn(worker, users).await,
            }
        }));
    }
    let started = Instant::now();
    shared.deadline.set(started + duration).expect("set once");
    start.wait().await;
    let name = match work {
        Work::Scenario(scenario, _) => scenario.name(),
        Work::Churn { .. } => "sessions: compaction",
    };
    let progress = tokio::spawn(progress(name, started, shared.clone()));
    let mut measured = Measured {
        connections: Vec::with_capacity(workers.len()),
        elapsed: 0.0,
    };
    for worker in workers {
        measured.connections.push(worker.await?);
    }
    measured.elapsed = started.elapsed().as_secs_f64();
    progress.abort();
    eprintln!();
    Ok(measured)
}

/// Target number `index`'s share of the scenario, made on first use.
fn share<'a>(
    shares: &'a mut BTreeMap<usize, TargetReport>,
    fleet: &Fleet,
    index: usize,
) -> &'a mut TargetReport {
    shares
        .entry(index)
        .or_insert_with(|| TargetReport::new(index, fleet.addr(index)))
}

/// The compaction phase of `sessions`: the first `users` returning users are brought to the
/// session cap, then logged in over and over, each login writing a new session and the removal
/// of the oldest to the broker's session log, so that the log outgrows the live sessions and is
/// rewritten. Ends [`AFTER_COMPACTION`] after `/metrics` shows a compaction finished, or at the
/// scenario's bounds.
async fn compaction_phase(
    fleet: &Fleet,
    limits: &Limits,
    connections: usize,
    nonce: &str,
    users: usize,
) -> anyhow::Result<(Measured, Watch)> {
    // A cap's worth of logins leaves a user at the cap whatever it held; round-robin over the
    // users, so that concurrent logins seldom share one.
    let prefix = format!("p{nonce}u");
    let topped = users as u64 * SESSION_CAP;
    prepare_logins(fleet, connections, topped, move |i| {
        format!("{prefix}{}.t{}", i % users as u64, i / users as u64)
    })
    .await?;
    let addrs = fleet.addrs();
    let mut watch = Watch::new(addrs.len());
    watch.poll(&addrs).await;
    eprintln!(
        "[sessions] compaction phase: {users} users at the {SESSION_CAP}-session cap log in \
         until the broker's {COMPACTIONS_METRIC} grows (at most {:.0} s, {} requests)",
        limits.duration.as_secs_f64(),
        limits.requests
    );
    let shared = Shared::new(limits.requests);
    let watcher = tokio::spawn(watch_compactions(addrs, watch, shared.clone()));
    let work = Work::Churn { users };
    let measured = measure(
        work,
        fleet,
        connections,
        limits.duration,
        shared.clone(),
        nonce,
    )
    .await;
    shared.stop();
    let watch = watcher.await?;
    Ok((measured?, watch))
}

/// A compaction phase worker's loop: logins of users at the cap; returns its target and figures.
async fn churn(mut w: Worker, users: usize) -> (usize, BTreeMap<String, EndpointStats>) {
    let mut seq = 0u64;
    while w.shared.running() {
        seq += 1;
        // `c` keeps these codes apart from the first phase's, which the sandbox saw already.
        let code = format!(
            "p{}u{}.{}c{seq}",
            w.nonce,
            rand::random_range(0..users.max(1)),
            w.id
        );
        w.call(DURING_COMPACTION, login_call(&code), 200).await;
    }
    (w.target, w.stats)
}

/// Reads the compaction counter every [`METRICS_POLL`] until the phase stops, and stops it
/// [`AFTER_COMPACTION`] after the counter has grown; returns what it saw, read once more last.
async fn watch_compactions(addrs: Vec<SocketAddr>, mut watch: Watch, shared: Arc<Shared>) -> Watch {
    let mut tick = tokio::time::interval(METRICS_POLL);
    // A reading that waited for a busy broker is not followed by a burst of others.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut end = None;
    while !shared.stopped() {
        tick.tick().await;
        watch.poll(&addrs).await;
        if end.is_none() && watch.compactions() > 0 {
            end = Some(Instant::now() + AFTER_COMPACTION);
        }
        if end.is_some_and(|end| Instant::now() >= end) {
            shared.stop();
        }
    }
    watch.poll(&addrs).await;
    watch
}

/// What the compaction phase saw of the brokers' compaction counters.
struct Watch {
    /// Per target: the counter at its first answer, 0 while not exported.
    first: Vec<Option<u64>>,
    /// Per target: the counter at its latest answer.
    last: Vec<Option<u64>>,
    /// Whether any answer held the counter: a broker without it shows no compaction.
    exported: bool,
}

impl Watch {
    fn new(targets: usize) -> Watch {
        Watch {
            first: vec![None; targets],
            last: vec![None; targets],
            exported: false,
        }
    }

    /// Reads every target's counter. A target that does not answer keeps its last value: the
    /// watch must not end a run the brokers would have finished.
    async fn poll(&mut self, addrs: &[SocketAddr]) {
        for (i, addr) in addrs.iter().enumerate() {
            let Some(text) = metrics(*addr).await else {
                continue;
            };
            let value = counter(&text, COMPACTIONS_METRIC);
            self.exported |= value.is_some();
            let value = value.unwrap_or(0);
            self.first[i].get_or_insert(value);
            self.last[i] = Some(value);
        }
    }

    /// Compactions finished since the first reading, over every target.
    fn compactions(&self) -> u64 {
        self.first
            .iter()
            .zip(&self.last)
            .filter_map(|(first, last)| Some(last.as_ref()?.saturating_sub(*first.as_ref()?)))
            .sum()
    }
}

/// The broker's `/metrics` text, on a connection of its own so that a slow answer cannot hold
/// up the next reading; `None` if it does not answer 200 within a second.
async fn metrics(addr: SocketAddr) -> Option<String> {
    let call = Call {
        method: Method::GET,
        path: "/metrics",
        token: None,
        json: None,
    };
    let read = async { Conn::open(addr).await.ok()?.send(&call).await.ok() };
    match tokio::time::timeout(Duration::from_secs(1), read).await {
        Ok(Some((200, body))) => Some(String::from_utf8_lossy(&body).into_owned()),
        _ => None,
    }
}

/// The value of counter `name` in a Prometheus text exposition, summed over its label sets;
/// `None` when it is not there.
fn counter(text: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once('}').map_or("", |(_, value)| value),
            None => rest,
        };
        // Another metric whose name starts with this one's has no space here.
        if !rest.starts_with([' ', '\t']) {
            continue;
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            *found.get_or_insert(0) += value as u64;
        }
    }
    found
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
    let prefix = format!("p{nonce}u");
    prepare_logins(fleet, connections, pool as u64, move |user| {
        format!("{prefix}{user}.0")
    })
    .await
}

/// Sends `count` logins outside any measurement, the `i`th with the code `code(i)`, on up to 64
/// connections spread over the targets; fails at the first refused.
async fn prepare_logins(
    fleet: &Fleet,
    connections: usize,
    count: u64,
    code: impl Fn(u64) -> String + Send + Sync + 'static,
) -> anyhow::Result<()> {
    if count == 0 {
        return Ok(());
    }
    let (next, code) = (Arc::new(AtomicU64::new(0)), Arc::new(code));
    let mut tasks = Vec::new();
    for task in 0..(connections as u64).min(count).min(64) {
        let (next, code) = (next.clone(), code.clone());
        let addr = fleet.addr(fleet.pick(task as usize));
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                token(&mut conn, &code(i)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_is_read_whatever_surrounds_it_and_missing_is_none() {
        let text = "# HELP wxbroker_session_log_compactions_total Rewrites.\n\
                    # TYPE wxbroker_session_log_compactions_total counter\n\
                    wxbroker_session_log_compactions_total_created 1.7e9\n\
                    wxbroker_session_log_compactions_total 3\n";
        assert_eq!(counter(text, COMPACTIONS_METRIC), Some(3));
        let labelled = "wxbroker_session_log_compactions_total{store=\"a\"} 2\n\
                        wxbroker_session_log_compactions_total{store=\"b\"} 1 1700000000\n";
        assert_eq!(counter(labelled, COMPACTIONS_METRIC), Some(3));
        assert_eq!(
            counter("wxbroker_logins_total 5\n", COMPACTIONS_METRIC),
            None
        );
        assert_eq!(counter("", COMPACTIONS_METRIC), None);
    }

    #[test]
    fn compactions_count_growth_per_target_from_its_first_answer() {
        let mut watch = Watch::new(2);
        // The second target never answered: it counts for nothing.
        (watch.first, watch.last) = (vec![Some(2), None], vec![Some(3), None]);
        assert_eq!(watch.compactions(), 1);
    }
}
