//! `wxbroker-load`: a load generator for wxbroker, and the tool behind the README's figures.
//!
//! It targets running brokers by URL (`--url` for one, `--targets` for several), or starts its
//! own `wxbroker` processes (sandbox WeChat, temporary data dirs; `--instances` of them sharing
//! the `--store`), so that generator and brokers never share a runtime. Each scenario runs on its
//! own keep-alive connections, each pinned to one target round-robin, bounded by a duration and a
//! request count, and reports per endpoint summed over the targets (requests, errors by status,
//! throughput, latency percentiles) and per target (its share, its peak RSS when known).
//!
//! Several targets only make sense when they share users and sessions through one store: the
//! `check` scenario checks tokens made on another target, and `login`'s returning users may have
//! registered on any of them. The sandbox gives a user the same openid on every instance.
//!
//! # Layout
//! - `broker_metrics`: what the tool reads of a broker's `/metrics`.
//! - `fleet`: the targets of a run, and which of them a connection is pinned to.
//! - `target`: one broker, given by URL or started and stopped as a child process.
//! - `scenario`: what each worker sends, and what counts as success.
//! - `client`: one keep-alive HTTP/1.1 connection through hyper.
//! - `report`: the figures, as a table or as JSON.
//! - `edge`: the edge host of the `edge` scenarios (this tool again, as a child process).

mod broker_metrics;
mod client;
mod edge;
mod fleet;
mod report;
mod scenario;
mod target;

use std::time::Duration;

use anyhow::ensure;
use clap::Parser;

use fleet::Fleet;
use report::RunReport;
use scenario::Scenario;
use target::Launch;

// The generator's allocator as the broker's (see src/main.rs), so neither starves the other.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for wxbroker.
///
/// Loads running brokers given by --url or --targets, or starts its own (--instances, sharing
/// --store) for the run and stops them after it.
#[derive(Parser, Debug)]
#[command(name = "wxbroker-load", version)]
struct Args {
    /// Base URL of a running broker in sandbox mode (e.g. http://127.0.0.1:8080); the same as
    /// --targets with one URL. Without --url or --targets, brokers are started for the run.
    #[arg(long, conflicts_with = "targets")]
    url: Option<String>,

    /// Base URLs of several running brokers in sandbox mode, comma-separated. Each connection is
    /// pinned to one of them, round-robin. Every scenario but `baseline` needs them to share one
    /// store (users and sessions).
    #[arg(long, value_delimiter = ',', value_name = "URL,URL,...")]
    targets: Vec<String>,

    /// Allow targets that are not on loopback.
    #[arg(long)]
    allow_remote: bool,

    /// PIDs of the target brokers, comma-separated in the order of --url/--targets, to report
    /// their peak RSS (known already for brokers this tool starts).
    #[arg(long, value_delimiter = ',', value_name = "PID,PID,...")]
    pid: Vec<u32>,

    /// Scenarios to run in order, in one run: baseline, check, login, mixed, sessions, edge-bare,
    /// edge. The last two load an edge host (a child process) that verifies the first target's
    /// signed access tokens with `wxbroker::edge::Verifier`: `GET /edge/bare` without the
    /// verifier's filter, `GET /edge/verified` through it.
    #[arg(long, short, value_delimiter = ',', default_value = "baseline,check")]
    scenario: Vec<Scenario>,

    /// Keep-alive connections (one worker each), pinned to the targets round-robin.
    #[arg(long, short, default_value_t = 64)]
    connections: usize,

    /// Seconds each scenario runs at most.
    #[arg(long, short, default_value_t = 10.0)]
    duration: f64,

    /// Requests each scenario sends at most (counting every endpoint).
    #[arg(long, short = 'n', default_value_t = 10_000_000)]
    requests: u64,

    /// Requests per second in all (at least 1), spread evenly over the connections, each sent
    /// when it is due and timed from then if the one before it made it late: a stall of the
    /// broker counts in every request it held up (an open loop at a load of your choosing). A
    /// connection has one request in flight, so give it more connections than the rate times
    /// the latency you expect. Without it, each connection sends its next request as soon as
    /// the last is answered (the most the machine takes, and latency that is mostly queueing).
    #[arg(long, value_parser = positive_rate)]
    rate: Option<f64>,

    /// Share of logins by new users in the `login` scenario (0 to 1).
    #[arg(long, default_value_t = 0.5)]
    new_ratio: f64,

    /// Registered users the `login` scenario's returning users are drawn from.
    #[arg(long, default_value_t = 1000)]
    users: usize,

    /// Session checks per user life in the `mixed` scenario.
    #[arg(long, default_value_t = 10)]
    checks: usize,

    /// Sessions the `sessions` scenario creates (to measure memory per session).
    #[arg(long, default_value_t = 100_000)]
    sessions: u64,

    /// Skip the `sessions` scenario's compaction phase. Without this, once its sessions are
    /// created, up to 1,024 of its users are brought to the broker's 64-session cap and logged in
    /// over and over (each login a new session and the eviction of the oldest) until the broker's
    /// wxbroker_session_log_compactions_total on /metrics grows, then 2 s more, or until
    /// --duration and --requests; reported as `POST /v1/login (during compaction)`, and those
    /// sent and answered while polls of wxbroker_session_log_compacting read 1 also as
    /// `POST /v1/login (while compacting)`.
    #[arg(long)]
    no_compaction: bool,

    /// After the `sessions` scenario, restart the broker and time how long it takes to serve
    /// again with those sessions stored. Needs exactly one broker started by this tool.
    #[arg(long, conflicts_with_all = ["url", "targets"])]
    restart: bool,

    /// For brokers this tool starts: how many. More than one needs --store, since separate sled
    /// data dirs share neither users nor sessions.
    #[arg(long, default_value_t = 1, conflicts_with_all = ["url", "targets"])]
    instances: usize,

    /// For brokers this tool starts: the store they share, passed as WXBROKER_STORE (e.g.
    /// redis://127.0.0.1:6379/). Without it each keeps its own sled data dir.
    #[arg(long, value_name = "URL", conflicts_with_all = ["url", "targets"])]
    store: Option<String>,

    /// For brokers this tool starts: the sandbox WeChat's latency in milliseconds.
    #[arg(long, default_value_t = 0)]
    upstream_latency_ms: u64,

    /// For brokers this tool starts: its in-flight exchange limit.
    #[arg(long, default_value_t = 1024)]
    max_inflight: usize,

    /// For brokers this tool starts: the `wxbroker` executable (default: beside this one).
    #[arg(long)]
    broker_bin: Option<std::path::PathBuf>,

    /// For brokers this tool starts: seconds their signed access tokens live, passed as
    /// WXBROKER_ACCESS_TOKEN_TTL (0 turns them off; default: the broker's own default).
    #[arg(long, conflicts_with_all = ["url", "targets"])]
    access_token_ttl: Option<u64>,

    /// The running target's WXBROKER_VERIFIER_TOKEN, for the edge scenarios (brokers this tool
    /// starts get one of their own).
    #[arg(long, env = "WXBROKER_VERIFIER_TOKEN", hide_env_values = true)]
    verifier_token: Option<String>,

    /// Serve as the edge host of the edge scenarios, verifying the tokens of the broker at this
    /// URL (how this tool starts its edge host).
    #[arg(long, hide = true)]
    serve_edge: Option<String>,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(broker) = &args.serve_edge {
        return match edge::serve(broker).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wxbroker-load edge host: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match run(args).await {
        Ok(clean) if clean => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("wxbroker-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Starts or finds the targets, runs every scenario, stops what it started; returns whether all
/// requests succeeded.
async fn run(mut args: Args) -> anyhow::Result<bool> {
    let urls: Vec<String> = args.url.iter().chain(&args.targets).cloned().collect();
    let edge = args.scenario.iter().any(|s| s.is_edge());
    if edge && urls.is_empty() {
        // The brokers this tool starts get a feed secret of their own.
        args.verifier_token = Some(format!("{:032x}", rand::random::<u128>()));
    }
    ensure!(
        !edge || args.verifier_token.is_some(),
        "the edge scenarios need the target's --verifier-token (WXBROKER_VERIFIER_TOKEN)"
    );
    ensure!(
        !edge || args.access_token_ttl != Some(0),
        "the edge scenarios need signed access tokens: not --access-token-ttl 0"
    );
    let mut fleet = if urls.is_empty() {
        ensure!(args.instances >= 1, "--instances must be at least 1");
        ensure!(
            args.instances == 1 || args.store.is_some(),
            "--instances {} needs --store: brokers on separate sled data dirs share neither users \
             nor sessions",
            args.instances
        );
        ensure!(
            !args.restart || args.instances == 1,
            "--restart needs exactly one broker started by this tool, not --instances {}",
            args.instances
        );
        let launch = Launch {
            bin: args.broker_bin.clone(),
            upstream_latency_ms: args.upstream_latency_ms,
            max_inflight: args.max_inflight,
            store: args.store.clone(),
            access_token_ttl: args.access_token_ttl,
            verifier_token: args.verifier_token.clone(),
        };
        Fleet::spawn(args.instances, &launch).await?
    } else {
        Fleet::remote(&urls, &args.pid, args.allow_remote)?
    };
    // Stop what was started even when a scenario fails.
    let report = run_scenarios(&args, &mut fleet).await;
    fleet.stop().await;
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(report.errors() == 0)
}

/// Runs the scenarios in order against `fleet`.
async fn run_scenarios(args: &Args, fleet: &mut Fleet) -> anyhow::Result<RunReport> {
    let limits = scenario::Limits {
        connections: args.connections,
        duration: Duration::from_secs_f64(args.duration),
        requests: args.requests,
        rate: args.rate,
    };
    // The edge host, for the edge scenarios: in front of the first target.
    let edge_host = match (
        &args.verifier_token,
        args.scenario.iter().any(|s| s.is_edge()),
    ) {
        (Some(token), true) => Some(edge::EdgeHost::spawn(fleet.addr(0), token).await?),
        _ => None,
    };
    let options = scenario::Options {
        new_ratio: args.new_ratio.clamp(0.0, 1.0),
        users: args.users.max(1),
        checks: args.checks,
        sessions: args.sessions,
        compaction: !args.no_compaction,
        edge: edge_host.as_ref().map(|host| host.addr),
    };
    let report = scenarios(args, fleet, &limits, &options).await;
    if let Some(host) = edge_host {
        host.stop().await;
    }
    report
}

/// Runs the scenarios in order against `fleet`, with `options`.
async fn scenarios(
    args: &Args,
    fleet: &mut Fleet,
    limits: &scenario::Limits,
    options: &scenario::Options,
) -> anyhow::Result<RunReport> {
    let mut report = RunReport::default();
    for scenario in &args.scenario {
        let mut outcome = scenario.run(fleet, limits, options).await?;
        if *scenario == Scenario::Sessions && args.restart {
            outcome.restart_secs = Some(fleet.restart().await?.as_secs_f64());
        }
        for share in &mut outcome.targets {
            share.rss_peak_bytes = fleet.peak_rss(share.index);
        }
        report.scenarios.push(outcome);
    }
    report.finish();
    Ok(report)
}

/// A `--rate`: a finite number of requests per second, at least 1.
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 1.0 => Ok(rate),
        _ => Err("expected requests per second, a number of at least 1".into()),
    }
}
