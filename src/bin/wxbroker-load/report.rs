//! What a run measured: per scenario and endpoint, as a table or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::scenario::COMPACTIONS_METRIC;

/// Latencies and outcomes of one endpoint, as a worker collects them.
pub struct EndpointStats {
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    /// Answers with the expected status.
    pub ok: u64,
    /// Everything else, by status (or `io` for a broken connection).
    pub errors: BTreeMap<String, u64>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }
}

impl EndpointStats {
    /// Adds another worker's figures.
    pub fn merge(&mut self, other: &EndpointStats) {
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        for (status, count) in &other.errors {
            *self.errors.entry(status.clone()).or_default() += count;
        }
    }
}

/// One endpoint in the report.
#[derive(Serialize)]
pub struct EndpointReport {
    name: String,
    requests: u64,
    errors: BTreeMap<String, u64>,
    requests_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl EndpointReport {
    /// The figures of `stats` under `name`, its rate over `elapsed_secs`.
    fn new(name: &str, stats: &EndpointStats, elapsed_secs: f64) -> EndpointReport {
        let ms = |micros: u64| micros as f64 / 1000.0;
        let requests = stats.ok + stats.errors.values().sum::<u64>();
        EndpointReport {
            name: name.to_owned(),
            requests,
            errors: stats.errors.clone(),
            requests_per_sec: requests as f64 / elapsed_secs,
            p50_ms: ms(stats.latency.value_at_quantile(0.5)),
            p90_ms: ms(stats.latency.value_at_quantile(0.9)),
            p99_ms: ms(stats.latency.value_at_quantile(0.99)),
            p999_ms: ms(stats.latency.value_at_quantile(0.999)),
            max_ms: ms(stats.latency.max()),
        }
    }

    /// Its failed requests.
    fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One target's share of a scenario: whether the load was spread, and what it cost the broker.
#[derive(Serialize)]
pub struct TargetReport {
    /// Its place in `--targets` (or among the instances this tool started).
    pub index: usize,
    /// Its address.
    pub addr: String,
    /// Connections pinned to it.
    pub connections: usize,
    /// Requests it was sent, of every endpoint and phase.
    pub requests: u64,
    /// Those that failed.
    pub errors: u64,
    /// Its peak RSS at the end of the scenario, when its PID is known.
    pub rss_peak_bytes: Option<u64>,
}

impl TargetReport {
    /// An empty share for target number `index` at `addr`.
    pub fn new(index: usize, addr: SocketAddr) -> TargetReport {
        TargetReport {
            index,
            addr: addr.to_string(),
            connections: 0,
            requests: 0,
            errors: 0,
            rss_peak_bytes: None,
        }
    }

    /// Adds one connection's figures.
    pub fn add_connection(&mut self, stats: &BTreeMap<String, EndpointStats>) {
        self.connections += 1;
        self.add_requests(stats);
    }

    /// Adds the requests of a connection already counted, in a later phase.
    pub fn add_requests(&mut self, stats: &BTreeMap<String, EndpointStats>) {
        for s in stats.values() {
            let errors = s.errors.values().sum::<u64>();
            self.requests += s.ok + errors;
            self.errors += errors;
        }
    }
}

/// One scenario in the report.
#[derive(Serialize, Default)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub name: String,
    /// Connections used.
    pub connections: usize,
    /// Seconds from the first request to the last answer (of the first phase, in `sessions`).
    pub elapsed_secs: f64,
    /// Requests of every endpoint (of the first phase, in `sessions`).
    pub requests: u64,
    /// Failed requests of every endpoint (of the first phase, in `sessions`).
    pub errors: u64,
    /// `requests / elapsed_secs`.
    pub requests_per_sec: f64,
    /// Per endpoint, summed over the targets; in `sessions`, the compaction phase's last.
    pub endpoints: Vec<EndpointReport>,
    /// Per target that had a connection: as many as were used.
    pub targets: Vec<TargetReport>,
    /// `sessions` scenario: RSS growth divided by the sessions created.
    pub bytes_per_session: Option<f64>,
    /// `sessions --restart`: seconds from restart until `/healthz` answers 200.
    pub restart_secs: Option<f64>,
    /// `sessions`: its compaction phase, unless `--no-compaction`.
    pub compaction: Option<CompactionReport>,
}

/// The `sessions` scenario's compaction phase: logins that each write a session and an eviction
/// to the session log, for the latency logins see while the broker rewrites that log.
#[derive(Serialize)]
pub struct CompactionReport {
    /// Seconds from the phase's first request to its last answer.
    pub elapsed_secs: f64,
    /// Returning users logged in, each holding as many sessions as the broker allows.
    pub users: usize,
    /// Logins sent in the phase.
    pub requests: u64,
    /// Those that failed.
    pub errors: u64,
    /// Compactions the brokers finished during the phase: how much their counter grew.
    pub compactions: u64,
    /// Whether the brokers export the counter at all: without it, no compaction can be seen.
    pub counter_exported: bool,
}

impl ScenarioReport {
    /// Builds the report of a scenario from its merged per-endpoint figures.
    pub fn new(
        name: &str,
        connections: usize,
        elapsed_secs: f64,
        stats: &BTreeMap<String, EndpointStats>,
    ) -> ScenarioReport {
        let endpoints: Vec<EndpointReport> = stats
            .iter()
            .map(|(name, s)| EndpointReport::new(name, s, elapsed_secs))
            .collect();
        let requests = endpoints.iter().map(|e| e.requests).sum();
        ScenarioReport {
            name: name.to_owned(),
            connections,
            elapsed_secs,
            requests,
            errors: endpoints.iter().map(EndpointReport::failed).sum(),
            requests_per_sec: requests as f64 / elapsed_secs,
            endpoints,
            ..ScenarioReport::default()
        }
    }

    /// Adds the compaction phase: its endpoints, at their rate over the phase's own
    /// `elapsed_secs`, and what it saw of the brokers' compactions.
    pub fn add_compaction(
        &mut self,
        stats: &BTreeMap<String, EndpointStats>,
        elapsed_secs: f64,
        users: usize,
        compactions: u64,
        counter_exported: bool,
    ) {
        let endpoints: Vec<EndpointReport> = stats
            .iter()
            .map(|(name, s)| EndpointReport::new(name, s, elapsed_secs))
            .collect();
        self.compaction = Some(CompactionReport {
            elapsed_secs,
            users,
            requests: endpoints.iter().map(|e| e.requests).sum(),
            errors: endpoints.iter().map(EndpointReport::failed).sum(),
            compactions,
            counter_exported,
        });
        self.endpoints.extend(endpoints);
    }
}

/// The whole run.
#[derive(Serialize, Default)]
pub struct RunReport {
    /// In the order they ran.
    pub scenarios: Vec<ScenarioReport>,
    /// `<scenario>/baseline`: each scenario's req/s over the baseline's, when both ran.
    pub ratios: BTreeMap<String, f64>,
}

impl RunReport {
    /// Computes the ratios to the baseline.
    pub fn finish(&mut self) {
        let Some(baseline) = self.scenarios.iter().find(|s| s.name == "baseline") else {
            return;
        };
        let base = baseline.requests_per_sec;
        for s in self.scenarios.iter().filter(|s| s.name != "baseline") {
            self.ratios
                .insert(format!("{}/baseline", s.name), s.requests_per_sec / base);
        }
    }

    /// Failed requests of the whole run, every phase.
    pub fn errors(&self) -> u64 {
        self.scenarios
            .iter()
            .map(|s| s.errors + s.compaction.as_ref().map_or(0, |c| c.errors))
            .sum()
    }

    /// The report as a text table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for s in &self.scenarios {
            let targets = match s.targets.len() {
                1 => "1 target".to_owned(),
                n => format!("{n} targets"),
            };
            let _ = writeln!(
                out,
                "\nscenario {}: {} connections over {targets}, {:.2} s, {} requests, {:.0} req/s, \
                 {} errors",
                s.name, s.connections, s.elapsed_secs, s.requests, s.requests_per_sec, s.errors
            );
            let width = s
                .endpoints
                .iter()
                .map(|e| e.name.len())
                .fold(22, usize::max);
            let _ = writeln!(
                out,
                "  {:<width$} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}  errors",
                "endpoint", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
            );
            for e in &s.endpoints {
                let _ = writeln!(
                    out,
                    "  {:<width$} {:>9} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}  {:?}",
                    e.name,
                    e.requests,
                    e.requests_per_sec,
                    e.p50_ms,
                    e.p90_ms,
                    e.p99_ms,
                    e.p999_ms,
                    e.max_ms,
                    e.errors
                );
            }
            let mib = |bytes: u64| bytes as f64 / 1048576.0;
            match s.targets.as_slice() {
                [one] => {
                    if let Some(rss) = one.rss_peak_bytes {
                        let _ = writeln!(out, "  broker peak RSS: {:.1} MiB", mib(rss));
                    }
                }
                several => {
                    for t in several {
                        let _ = write!(
                            out,
                            "  target {} {}: {} connections, {} requests, {} errors",
                            t.index, t.addr, t.connections, t.requests, t.errors
                        );
                        if let Some(rss) = t.rss_peak_bytes {
                            let _ = write!(out, ", peak RSS {:.1} MiB", mib(rss));
                        }
                        out.push('\n');
                    }
                }
            }
            if let Some(bytes) = s.bytes_per_session {
                let _ = writeln!(out, "  RSS per live session: {bytes:.0} bytes");
            }
            if let Some(c) = &s.compaction {
                let seen = match (c.compactions, c.counter_exported) {
                    (0, false) => format!(
                        "no compaction observed: the broker does not export {COMPACTIONS_METRIC}"
                    ),
                    (0, true) => {
                        format!("no compaction observed: {COMPACTIONS_METRIC} did not grow")
                    }
                    (1, _) => "1 compaction observed".to_owned(),
                    (n, _) => format!("{n} compactions observed"),
                };
                let _ = writeln!(
                    out,
                    "  compaction phase: {:.2} s, {} users at the session cap, {} requests, {} \
                     errors; {seen}",
                    c.elapsed_secs, c.users, c.requests, c.errors
                );
            }
            if let Some(secs) = s.restart_secs {
                let _ = writeln!(out, "  restart until serving: {secs:.2} s");
            }
        }
        for (name, ratio) in &self.ratios {
            let _ = writeln!(out, "{name}: {ratio:.2}");
        }
        out
    }
}
