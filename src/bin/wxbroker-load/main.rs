//! `wxbroker-load`: a load generator for wxbroker, and the tool behind the README's figures.
//!
//! It targets a running broker by URL, or starts its own `wxbroker` (sandbox WeChat, temporary
//! data dir) as a separate process, so that generator and broker never share a runtime. Each
//! scenario runs on its own keep-alive connections, bounded by a duration and a request count,
//! and reports per endpoint: requests, errors by status, throughput and latency percentiles.

mod client;
mod report;
mod scenario;
mod target;

use std::time::Duration;

use clap::Parser;

use report::RunReport;
use scenario::Scenario;
use target::Target;

/// Load generator for wxbroker.
#[derive(Parser, Debug)]
#[command(name = "wxbroker-load", version)]
struct Args {
    /// Base URL of a running broker in sandbox mode (e.g. http://127.0.0.1:8080). Without it, a
    /// broker is started for the run.
    #[arg(long)]
    url: Option<String>,

    /// Allow a target that is not on loopback.
    #[arg(long)]
    allow_remote: bool,

    /// PID of the target broker, to report its peak RSS (known already when the tool starts it).
    #[arg(long)]
    pid: Option<u32>,

    /// Scenarios to run in order, in one run: baseline, check, login, mixed, sessions.
    #[arg(long, short, value_delimiter = ',', default_value = "baseline,check")]
    scenario: Vec<Scenario>,

    /// Keep-alive connections (one worker each).
    #[arg(long, short, default_value_t = 64)]
    connections: usize,

    /// Seconds each scenario runs at most.
    #[arg(long, short, default_value_t = 10.0)]
    duration: f64,

    /// Requests each scenario sends at most (counting every endpoint).
    #[arg(long, short = 'n', default_value_t = 10_000_000)]
    requests: u64,

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

    /// After the `sessions` scenario, restart the broker (one this tool started) and time how
    /// long it takes to serve again with those sessions on disk.
    #[arg(long)]
    restart: bool,

    /// For a broker this tool starts: the sandbox WeChat's latency in milliseconds.
    #[arg(long, default_value_t = 0)]
    upstream_latency_ms: u64,

    /// For a broker this tool starts: its in-flight exchange limit.
    #[arg(long, default_value_t = 1024)]
    max_inflight: usize,

    /// For a broker this tool starts: the `wxbroker` executable (default: beside this one).
    #[arg(long)]
    broker_bin: Option<std::path::PathBuf>,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(clean) if clean => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("wxbroker-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs every scenario; returns whether all requests succeeded.
async fn run(args: Args) -> anyhow::Result<bool> {
    let mut target = match &args.url {
        Some(url) => Target::remote(url, args.pid, args.allow_remote)?,
        None => {
            Target::spawn(
                args.broker_bin.clone(),
                args.upstream_latency_ms,
                args.max_inflight,
            )
            .await?
        }
    };
    let limits = scenario::Limits {
        connections: args.connections,
        duration: Duration::from_secs_f64(args.duration),
        requests: args.requests,
    };
    let options = scenario::Options {
        new_ratio: args.new_ratio.clamp(0.0, 1.0),
        users: args.users.max(1),
        checks: args.checks,
        sessions: args.sessions,
    };
    let mut report = RunReport::default();
    for scenario in &args.scenario {
        let mut outcome = scenario.run(&target, &limits, &options).await?;
        if *scenario == Scenario::Sessions && args.restart {
            outcome.restart_secs = Some(target.restart().await?.as_secs_f64());
        }
        outcome.rss_peak_bytes = target.peak_rss();
        report.scenarios.push(outcome);
    }
    report.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    let clean = report.errors() == 0;
    target.stop().await;
    Ok(clean)
}
