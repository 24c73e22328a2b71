//! The scenarios: what each worker sends, in what order, and what answer counts as success.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::Method;
use tokio::sync::Barrier;

use crate::broker_metrics::{
    COMPACTIONS_METRIC, GAUGE_POLL, compacting, metric_value, metrics, metrics_on,
};
use crate::client::{Call, Conn};
use crate::fleet::Fleet;
use crate::report::{EndpointStats, ScenarioReport, TargetReport, WindowReport};

/// The name the compaction phase's logins are reported under.
const DURING_COMPACTION: &str = "POST /v1/login (during compaction)";

/// The name the compaction phase's logins sent and answered while their target's gauge polls
/// saw it compacting are reported under, besides [`DURING_COMPACTION`].
const WHILE_COMPACTING: &str = "POST /v1/login (while compacting)";

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
    /// `GET /edge/bare` on the edge host: its route without the verifier, for its ceiling.
    EdgeBare,
    /// `GET /edge/verified` on the edge host with access tokens made beforehand: through
    /// `wxbroker::edge::Verifier`'s filter.
    Edge,
}

/// How much load.
pub struct Limits {
    /// Workers, each on its own keep-alive connection.
    pub connections: usize,
    /// Time bound.
    pub duration: Duration,
    /// Request bound.
    pub requests: u64,
    /// Requests per second in all, each sent at its planned time (`--rate`); `None`: as fast as
    /// the answers come.
    pub rate: Option<f64>,
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
    /// The edge host of the edge scenarios, when they run.
    pub edge: Option<SocketAddr>,
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
    /// Per target, in the compaction phase (empty otherwise): whether its gauge watcher has a
    /// window open, so that workers keep the times of only the logins that may fall inside one.
    compacting: Vec<AtomicBool>,
}

impl Shared {
    fn new(limit: u64) -> Arc<Shared> {
        Shared::watching(limit, 0)
    }

    /// For the compaction phase: with a gauge flag for each of `targets`.
    fn watching(limit: u64, targets: usize) -> Arc<Shared> {
        Arc::new(Shared {
            sent: AtomicU64::new(0),
            limit,
            deadline: OnceLock::new(),
            stopped: AtomicBool::new(false),
            compacting: (0..targets).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Whether `target`'s gauge watcher has a compacting window open.
    fn compacting(&self, target: usize) -> bool {
        self.compacting
            .get(target)
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
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
        !self.stopped()
            && Instant::now() < self.deadline()
            && self.sent.load(Ordering::Relaxed) < self.limit
    }

    fn deadline(&self) -> Instant {
        *self.deadline.get().expect("set before the workers start")
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
    /// Where the edge scenarios' connections go.
    edge: Option<SocketAddr>,
}

/// What one phase's workers measured.
struct Measured {
    /// Per connection, what its worker measured.
    connections: Vec<Done>,
    /// The common start, which the compaction windows are placed against.
    started: Instant,
    /// Seconds from the common start to the last answer.
    elapsed: f64,
}

impl Measured {
    /// The figures per endpoint, summed over the connections.
    fn endpoints(&self) -> BTreeMap<String, EndpointStats> {
        let mut merged: BTreeMap<String, EndpointStats> = BTreeMap::new();
        for done in &self.connections {
            for (endpoint, stats) in &done.stats {
                merged.entry(endpoint.clone()).or_default().merge(stats);
            }
        }
        merged
    }
}

/// What one worker measured.
struct Done {
    /// The fleet index of the target its connection was pinned to.
    target: usize,
    /// Its figures per endpoint.
    stats: BTreeMap<String, EndpointStats>,
    /// In the compaction phase, the logins it sent while its target's gauge watcher had a window
    /// open, to be placed against the windows once they are known.
    kept: Vec<Timed>,
}

/// When one request was sent and answered, and how it ended.
struct Timed {
    /// Taken just before the request is written; under `--rate`, when it was due if the answer
    /// before it came after that, so that a request held up by a slow one counts that wait too.
    sent: Instant,
    /// Taken once its whole answer is read.
    answered: Instant,
    /// The status that was not the expected one, or `io`; `None` for success.
    error: Option<String>,
}

impl Timed {
    /// Counts it in `stats`.
    fn record(&self, stats: &mut EndpointStats) {
        let micros = self.answered.duration_since(self.sent).as_micros().max(1) as u64;
        stats.record(micros, self.error.as_deref());
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
    /// See [`Done::kept`].
    kept: Vec<Timed>,
    /// Its schedule under `--rate`.
    pace: Option<Pace>,
}

/// A connection's schedule under `--rate`: it sends a request every `every`, at `next` next.
///
/// Latency counts from when a request was due, not from when it went out: a stall of the
/// broker then shows in every request it held up, where a connection that waits for each answer
/// before sending the next would have sent (and counted) only one of them.
struct Pace {
    every: Duration,
    next: Instant,
}

impl Pace {
    /// The schedule of connection `id` of `connections`, which share `rate` requests per second,
    /// starting now: each sends every `connections / rate` seconds, staggered so that the
    /// connections' requests spread evenly.
    fn new(rate: f64, connections: usize, id: usize) -> Pace {
        let every = Duration::from_secs_f64(connections as f64 / rate);
        Pace {
            every,
            next: Instant::now() + every.mul_f64(id as f64 / connections as f64),
        }
    }

    /// Waits for the next request's time; returns when its latency counts from, or `None` (at
    /// `deadline`) if it falls after `deadline`. A request due already (the answer before it came
    /// late) counts from when it was due; one that waited for its time counts from when it goes
    /// out, as the timer's lateness (up to a millisecond of tokio's) is this tool's, not the
    /// broker's.
    async fn due(&mut self, deadline: Instant) -> Option<Instant> {
        let due = self.next;
        self.next += self.every;
        if Instant::now() >= due {
            return Some(due);
        }
        tokio::time::sleep_until(due.min(deadline).into()).await;
        (due <= deadline).then(Instant::now)
    }
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
        self.send(endpoint, call, expected).await?.1
    }

    /// [`Worker::call`], also returning when the request was sent and answered; `None` if the
    /// bounds allowed no request.
    async fn send(
        &mut self,
        endpoint: &str,
        call: Call<'_>,
        expected: u16,
    ) -> Option<(Timed, Option<bytes::Bytes>)> {
        let sent = match &mut self.pace {
            Some(pace) => pace.due(self.shared.deadline()).await?,
            None => Instant::now(),
        };
        if !self.shared.take() {
            return None;
        }
        let outcome = self.conn.send(&call).await;
        let answered = Instant::now();
        let (body, error) = match outcome {
            Ok((status, body)) if status == expected => (Some(body), None),
            Ok((status, _)) => (None, Some(status.to_string())),
            Err(_) => (None, Some("io".to_owned())),
        };
        let timed = Timed {
            sent,
            answered,
            error,
        };
        timed.record(self.stats.entry(endpoint.to_owned()).or_default());
        if timed.error.is_some() && self.pace.is_none() {
            // Something is wrong: another attempt would only repeat it at full speed (a paced
            // one waits for its time anyway, and a pause here would count as the broker's).
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some((timed, body))
    }

    fn done(self) -> Done {
        Done {
            target: self.target,
            stats: self.stats,
            kept: self.kept,
        }
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
    login_field(conn, code, "thirdSession").await
}

/// Logs in as `code` outside any measurement; returns the field `field` of the answer.
async fn login_field(conn: &mut Conn, code: &str, field: &str) -> anyhow::Result<String> {
    let (status, body) = conn.send(&login_call(code)).await?;
    anyhow::ensure!(
        status == 200,
        "preparing: login {code} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let body: serde_json::Value = serde_json::from_slice(&body)?;
    body[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no {field} in the login's answer (signed access tokens off?)"))
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::Check => "check",
            Scenario::Login => "login",
            Scenario::Mixed => "mixed",
            Scenario::Sessions => "sessions",
            Scenario::EdgeBare => "edge-bare",
            Scenario::Edge => "edge",
        }
    }

    /// Whether it loads the edge host rather than the brokers.
    pub fn is_edge(self) -> bool {
        matches!(self, Scenario::Edge | Scenario::EdgeBare)
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
            edge: options.edge,
        };
        let work = Work::Scenario(self, plan);
        let measured = measure(work, fleet, limits, Shared::new(limit), &nonce).await?;
        let mut report = ScenarioReport::new(
            self.name(),
            connections,
            measured.elapsed,
            &measured.endpoints(),
        );
        report.rate = limits.rate;
        let mut per_target: BTreeMap<usize, TargetReport> = BTreeMap::new();
        for done in &measured.connections {
            share(&mut per_target, fleet, done.target).add_connection(&done.stats);
        }
        if self == Scenario::Sessions
            && let (Some(before), Some(after)) = (rss_before, fleet.rss())
        {
            report.bytes_per_session =
                Some(after.saturating_sub(before) as f64 / report.requests.max(1) as f64);
        }
        if self == Scenario::Sessions && options.compaction && pool > 0 {
            let users = pool.min(CHURN_USERS);
            let (churn, watch, gauges) =
                compaction_phase(fleet, limits, connections, &nonce, users).await?;
            for done in &churn.connections {
                share(&mut per_target, fleet, done.target).add_requests(&done.stats);
            }
            report.add_compaction(
                &churn.endpoints(),
                churn.elapsed,
                users,
                watch.compactions(),
                watch.exported,
            );
            let (inside, windows) = while_compacting(&churn, &gauges);
            let exported = gauges.iter().any(|gauge| gauge.exported);
            report.add_while_compacting(WHILE_COMPACTING, &inside, exported, windows);
        }
        report.targets = per_target.into_values().collect();
        Ok(report)
    }

    /// One worker's loop; returns what it measured.
    async fn drive(self, mut w: Worker, token: Option<String>, plan: Plan) -> Done {
        let Plan {
            new_ratio,
            checks,
            pool,
            edge: _,
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
                Scenario::EdgeBare => {
                    let call = Call {
                        method: Method::GET,
                        path: "/edge/bare",
                        token: None,
                        json: None,
                    };
                    w.call("GET /edge/bare", call, 200).await;
                }
                Scenario::Edge => {
                    let call = Call {
                        method: Method::GET,
                        path: "/edge/verified",
                        token: token.as_deref(),
                        json: None,
                    };
                    w.call("GET /edge/verified", call, 200).await;
                }
            }
        }
        w.done()
    }
}

/// Runs one worker per connection doing `work`, from a common start until a bound of `shared`
/// stops them, with a progress line; returns what they measured.
async fn measure(
    work: Work,
    fleet: &Fleet,
    limits: &Limits,
    shared: Arc<Shared>,
    nonce: &str,
) -> anyhow::Result<Measured> {
    let connections = limits.connections.max(1);
    let start = Arc::new(Barrier::new(connections + 1));
    let mut workers = Vec::new();
    for id in 0..connections {
        let target = fleet.pick(id);
        let addr = match work {
            Work::Scenario(scenario, plan) if scenario.is_edge() => {
                plan.edge.context("the edge scenarios need the edge host")?
            }
            _ => fleet.addr(target),
        };
        let conn = Conn::open(addr).await?;
        let token = match work {
            // Made on the next target, so that with several every check reads a session
            // another instance created: what a shared store must get right.
            Work::Scenario(Scenario::Check, _) => {
                let mut maker = Conn::open(fleet.addr(fleet.pick(id + 1))).await?;
                Some(token(&mut maker, &format!("c{nonce}w{id}.1")).await?)
            }
            // Signed by the broker the edge host verifies for.
            Work::Scenario(Scenario::Edge, _) => {
                let mut maker = Conn::open(fleet.addr(0)).await?;
                let code = format!("e{nonce}w{id}.1");
                Some(login_field(&mut maker, &code, "accessToken").await?)
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
            kept: Vec::new(),
            pace: None,
        };
        let (start, rate) = (start.clone(), limits.rate);
        workers.push(tokio::spawn(async move {
            start.wait().await;
            let mut worker = worker;
            worker.pace = rate.map(|rate| Pace::new(rate, connections, id));
            match work {
                Work::Scenario(scenario, plan) => scenario.drive(worker, token, plan).await,
                Work::Churn { users } => churn(worker, users).await,
            }
        }));
    }
    let started = Instant::now();
    shared
        .deadline
        .set(started + limits.duration)
        .expect("set once");
    start.wait().await;
    let name = match work {
        Work::Scenario(scenario, _) => scenario.name(),
        Work::Churn { .. } => "sessions: compaction",
    };
    let progress = tokio::spawn(progress(name, started, shared.clone()));
    let mut measured = Measured {
        connections: Vec::with_capacity(workers.len()),
        started,
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
/// scenario's bounds. Returns, besides the workers' figures and the compaction counters, each
/// target's compacting windows as its gauge polls saw them.
async fn compaction_phase(
    fleet: &Fleet,
    limits: &Limits,
    connections: usize,
    nonce: &str,
    users: usize,
) -> anyhow::Result<(Measured, Watch, Vec<Windows>)> {
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
    let shared = Shared::watching(limits.requests, addrs.len());
    // One task per target: a target slow to answer does not delay another's readings.
    let gauges: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(target, addr)| tokio::spawn(watch_gauge(target, *addr, shared.clone())))
        .collect();
    let watcher = tokio::spawn(watch_compactions(addrs, watch, shared.clone()));
    let work = Work::Churn { users };
    let measured = measure(work, fleet, limits, shared.clone(), nonce).await;
    shared.stop();
    let watch = watcher.await?;
    let mut windows = Vec::with_capacity(gauges.len());
    for gauge in gauges {
        windows.push(gauge.await?);
    }
    Ok((measured?, watch, windows))
}

/// A compaction phase worker's loop: logins of users at the cap; returns what it measured.
async fn churn(mut w: Worker, users: usize) -> Done {
    let mut seq = 0u64;
    while w.shared.running() {
        seq += 1;
        // Read before the login is sent: the flag is raised only once its window's start is
        // set, so a login sent after seeing it starts inside the window. Read again once it is
        // answered, as a paced login waits for its time in between: keeping a few more is
        // harmless, each is placed against the windows' times later.
        let watched = w.shared.compacting(w.target);
        // `c` keeps these codes apart from the first phase's, which the sandbox saw already.
        let code = format!(
            "p{}u{}.{}c{seq}",
            w.nonce,
            rand::random_range(0..users.max(1)),
            w.id
        );
        if let Some((timed, _)) = w.send(DURING_COMPACTION, login_call(&code), 200).await
            && (watched || w.shared.compacting(w.target))
        {
            w.kept.push(timed);
        }
    }
    w.done()
}

/// The logins of `churn` that fell inside a compacting window of their own target (`gauges`
/// in fleet order), and the windows placed against the phase's start.
fn while_compacting(churn: &Measured, gauges: &[Windows]) -> (EndpointStats, Vec<WindowReport>) {
    let mut inside = EndpointStats::default();
    for done in &churn.connections {
        let windows = gauges.get(done.target).map_or(&[][..], |g| &g.done);
        for timed in &done.kept {
            if windows.iter().any(|w| w.holds(timed)) {
                timed.record(&mut inside);
            }
        }
    }
    let secs_from_start = |at: Instant| match at.checked_duration_since(churn.started) {
        Some(after) => after.as_secs_f64(),
        None => -churn.started.duration_since(at).as_secs_f64(),
    };
    let reports = gauges
        .iter()
        .enumerate()
        .flat_map(|(target, gauge)| gauge.done.iter().map(move |w| (target, w)))
        .map(|(target, w)| WindowReport {
            target,
            start_secs: secs_from_start(w.start),
            secs: w.end.duration_since(w.start).as_secs_f64(),
            closed: w.closed,
        })
        .collect();
    (inside, reports)
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
            let value = metric_value(&text, COMPACTIONS_METRIC);
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

/// A span in which one target's gauge polls saw its session log being rewritten.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// When the first poll that read 1 was answered: the gauge may have turned 1 only then.
    start: Instant,
    /// When the first poll that read 0 after it was sent: the gauge may have turned 0 just
    /// before. While no such poll has come, when the latest poll that read 1 was answered.
    end: Instant,
    /// Whether a poll read 0 again: if not, the phase ended first.
    closed: bool,
}

impl Window {
    /// Whether `timed` was sent and answered inside the window. A login that began before it or
    /// ended after it does not count, even though it spent most of its time inside: the row
    /// holds only logins that ran wholly while the polls saw a rewrite.
    fn holds(&self, timed: &Timed) -> bool {
        self.start <= timed.sent && timed.answered <= self.end
    }
}

/// One target's compacting windows, built from its gauge readings in order.
#[derive(Default)]
struct Windows {
    /// The windows a poll has closed, and after [`Windows::finish`] the open one.
    done: Vec<Window>,
    open: Option<Window>,
    /// Whether any answer held the gauge.
    exported: bool,
}

impl Windows {
    /// Takes the gauge's value `compacting` (`None`: absent, read as 0) from a poll sent at
    /// `sent` and answered at `answered`; returns whether a window is open.
    fn read(&mut self, compacting: Option<bool>, sent: Instant, answered: Instant) -> bool {
        self.exported |= compacting.is_some();
        if compacting.unwrap_or(false) {
            let open = self.open.get_or_insert(Window {
                start: answered,
                end: answered,
                closed: false,
            });
            open.end = answered;
        } else if let Some(mut window) = self.open.take() {
            window.end = sent;
            window.closed = true;
            self.done.push(window);
        }
        self.open.is_some()
    }

    /// Ends the readings: a window still open counts up to the last poll that read 1.
    fn finish(&mut self) {
        self.done.extend(self.open.take());
    }
}

/// Reads target number `target`'s [`COMPACTING_METRIC`] every [`GAUGE_POLL`], one reading at a
/// time, until the phase stops and once more after; keeps its flag in `shared` raised while a
/// window is open and returns the windows.
async fn watch_gauge(target: usize, addr: SocketAddr, shared: Arc<Shared>) -> Windows {
    let mut tick = tokio::time::interval(GAUGE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn = None;
    let mut windows = Windows::default();
    loop {
        let last = shared.stopped();
        tick.tick().await;
        let sent = Instant::now();
        let text = metrics_on(&mut conn, addr).await;
        let answered = Instant::now();
        if let Some(text) = text {
            let open = windows.read(compacting(&text), sent, answered);
            // Raised after the window's start is set: see `churn`.
            shared.compacting[target].store(open, Ordering::Relaxed);
        }
        if last {
            break;
        }
    }
    windows.finish();
    windows
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

    #[tokio::test]
    async fn a_paced_connection_keeps_its_schedule_and_a_late_request_counts_from_its_time() {
        // Two connections sharing 100 requests per second: each every 20 ms, the second 10 ms
        // after the first.
        let before = Instant::now();
        let mut pace = Pace::new(100.0, 2, 1);
        assert_eq!(pace.every, Duration::from_millis(20));
        let first = pace.next;
        assert!(first >= before + Duration::from_millis(10));
        assert!(first <= Instant::now() + Duration::from_millis(10));

        // On time: it waits for its time and counts from when it goes out.
        let far = Instant::now() + Duration::from_secs(60);
        let sent = pace.due(far).await.unwrap();
        assert!(sent >= first);
        assert_eq!(pace.next, first + pace.every);

        // Held up past two of its times (a slow answer): both count from when they were due,
        // and the schedule does not slip.
        std::thread::sleep(pace.every * 3);
        assert_eq!(pace.due(far).await, Some(first + pace.every));
        assert_eq!(pace.due(far).await, Some(first + pace.every * 2));
        assert_eq!(pace.next, first + pace.every * 3);

        // A time after the run's end is not waited for beyond it, and sends nothing.
        let end = Instant::now() + Duration::from_millis(5);
        let mut slow = Pace::new(0.5, 1, 0);
        slow.due(far).await.unwrap();
        assert_eq!(slow.due(end).await, None);
        assert!(Instant::now() >= end && Instant::now() < end + Duration::from_secs(1));
    }

    #[test]
    fn a_counter_is_read_whatever_surrounds_it_and_missing_is_none() {
        let text = "# HELP wxbroker_session_log_compactions_total Rewrites.\n\
                    # TYPE wxbroker_session_log_compactions_total counter\n\
                    wxbroker_session_log_compactions_total_created 1.7e9\n\
                    wxbroker_session_log_compactions_total 3\n";
        assert_eq!(metric_value(text, COMPACTIONS_METRIC), Some(3));
        let labelled = "wxbroker_session_log_compactions_total{store=\"a\"} 2\n\
                        wxbroker_session_log_compactions_total{store=\"b\"} 1 1700000000\n";
        assert_eq!(metric_value(labelled, COMPACTIONS_METRIC), Some(3));
        assert_eq!(
            metric_value("wxbroker_logins_total 5\n", COMPACTIONS_METRIC),
            None
        );
        assert_eq!(metric_value("", COMPACTIONS_METRIC), None);
    }

    #[test]
    fn the_compacting_gauge_is_read_beside_its_neighbours_and_missing_is_none() {
        let exposition = |value: &str| {
            format!(
                "# HELP wxbroker_session_log_compacting 1 while the session log is being \
                 rewritten\n\
                 # TYPE wxbroker_session_log_compacting gauge\n\
                 wxbroker_session_log_compacting {value}\n\
                 # TYPE wxbroker_session_log_compaction_seconds histogram\n\
                 wxbroker_session_log_compaction_seconds_bucket{{le=\"0.01\"}} 4\n\
                 wxbroker_session_log_compaction_seconds_count 4\n\
                 wxbroker_session_log_compactions_total 4\n"
            )
        };
        assert_eq!(compacting(&exposition("1")), Some(true));
        assert_eq!(compacting(&exposition("0")), Some(false));
        // A broker from before the gauge: absent, which the watcher reads as 0.
        let older = "wxbroker_session_log_compactions_total 4\n";
        assert_eq!(compacting(older), None);
        assert_eq!(compacting(""), None);
    }

    /// `base` plus `ms` milliseconds.
    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn timed(base: Instant, sent_ms: u64, answered_ms: u64) -> Timed {
        Timed {
            sent: at(base, sent_ms),
            answered: at(base, answered_ms),
            error: None,
        }
    }

    #[test]
    fn a_window_runs_from_the_first_poll_reading_1_to_the_first_reading_0() {
        let base = Instant::now();
        let mut windows = Windows::default();
        // Polls of 5 ms every 25 ms: 0, 1, (no answer), 1, 0, absent.
        assert!(!windows.read(Some(false), at(base, 0), at(base, 5)));
        assert!(windows.read(Some(true), at(base, 25), at(base, 30)));
        assert!(windows.read(Some(true), at(base, 75), at(base, 80)));
        assert!(!windows.read(Some(false), at(base, 100), at(base, 105)));
        assert!(!windows.read(None, at(base, 125), at(base, 130)));
        windows.finish();
        assert!(windows.exported);
        let [window] = windows.done[..] else {
            panic!("one window: {:?}", windows.done)
        };
        assert_eq!((window.start, window.end), (at(base, 30), at(base, 100)));
        assert!(window.closed);
    }

    #[test]
    fn a_window_the_phase_ends_in_counts_up_to_the_last_poll_reading_1() {
        let base = Instant::now();
        let mut windows = Windows::default();
        windows.read(Some(true), at(base, 0), at(base, 5));
        windows.read(Some(true), at(base, 25), at(base, 30));
        windows.finish();
        let [window] = windows.done[..] else {
            panic!("one window: {:?}", windows.done)
        };
        assert_eq!((window.start, window.end), (at(base, 5), at(base, 30)));
        assert!(!window.closed);
    }

    #[test]
    fn an_absent_gauge_gives_no_window() {
        let base = Instant::now();
        let mut windows = Windows::default();
        windows.read(None, at(base, 0), at(base, 5));
        windows.read(None, at(base, 25), at(base, 30));
        windows.finish();
        assert!(!windows.exported && windows.done.is_empty());
    }

    #[test]
    fn a_login_counts_only_when_sent_and_answered_inside_the_window() {
        let base = Instant::now();
        let window = Window {
            start: at(base, 100),
            end: at(base, 200),
            closed: true,
        };
        assert!(window.holds(&timed(base, 120, 180)));
        assert!(window.holds(&timed(base, 100, 200)), "the edges are inside");
        assert!(!window.holds(&timed(base, 90, 150)), "sent before it");
        assert!(!window.holds(&timed(base, 150, 210)), "answered after it");
        assert!(!window.holds(&timed(base, 50, 250)), "around it");
        assert!(!window.holds(&timed(base, 210, 220)), "after it");
    }

    #[test]
    fn a_login_counts_against_its_own_targets_windows_only() {
        let base = Instant::now();
        let done = |target, kept| Done {
            target,
            stats: BTreeMap::new(),
            kept,
        };
        let churn = Measured {
            connections: vec![
                done(0, vec![timed(base, 110, 120), timed(base, 310, 320)]),
                done(1, vec![timed(base, 110, 120), timed(base, 310, 320)]),
            ],
            started: at(base, 50),
            elapsed: 1.0,
        };
        let window = |start, end| Window {
            start: at(base, start),
            end: at(base, end),
            closed: true,
        };
        let gauges = [
            Windows {
                done: vec![window(100, 200)],
                ..Windows::default()
            },
            Windows {
                done: vec![window(300, 400)],
                ..Windows::default()
            },
        ];
        let (inside, reports) = while_compacting(&churn, &gauges);
        assert_eq!((inside.ok, inside.latency.len()), (2, 2));
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].target, 0);
        assert!((reports[0].start_secs - 0.05).abs() < 1e-9);
        assert!((reports[1].secs - 0.1).abs() < 1e-9);
        // A window that began before the phase's start is placed before it.
        let early = [Windows {
            done: vec![window(20, 200)],
            ..Windows::default()
        }];
        assert!((while_compacting(&churn, &early).1[0].start_secs + 0.03).abs() < 1e-9);
    }

    #[test]
    fn compactions_count_growth_per_target_from_its_first_answer() {
        let mut watch = Watch::new(2);
        // The second target never answered: it counts for nothing.
        (watch.first, watch.last) = (vec![Some(2), None], vec![Some(3), None]);
        assert_eq!(watch.compactions(), 1);
    }
}
