//! What a run measured: per scenario and endpoint, as a table or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::broker_metrics::{COMPACTING_METRIC, COMPACTIONS_METRIC, GAUGE_POLL};

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
    /// Counts one request that took `micros`, failed with `error` (a status or `io`) unless
    /// `None`.
    pub fn record(&mut self, micros: u64, error: Option<&str>) {
        let _ = self.latency.record(micros);
        match error {
            None => self.ok += 1,
            Some(error) => *self.errors.entry(error.to_owned()).or_default() += 1,
        }
    }

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
    /// Requests per second the connections were paced to in all (`--rate`); absent when each
    /// sent its next request as soon as the last was answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
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
    /// Whether any poll's answer held the gauge `wxbroker_session_log_compacting` (older
    /// brokers lack it): without it, no window can be seen.
    pub gauge_exported: bool,
    /// The spans in which a target's polls saw its gauge at 1, in the order they began.
    pub windows: Vec<WindowReport>,
    /// Seconds in which the polls saw at least one target compacting.
    pub compacting_secs: f64,
    /// Logins sent and answered inside a window of their own target: the requests of
    /// `POST /v1/login (while compacting)`, which is left out when there is no window.
    pub requests_while_compacting: u64,
}

/// One span in which a target's polls saw its session log being rewritten: from the answer of
/// the first poll that read the gauge at 1 to the sending of the first that read 0 after it,
/// the part of the rewrite the polls are sure of.
#[derive(Serialize, Debug)]
pub struct WindowReport {
    /// The target's place in the fleet.
    pub target: usize,
    /// When it began, in seconds from the phase's start (negative when the rewrite had begun
    /// before the phase's first login).
    pub start_secs: f64,
    /// Its length in seconds.
    pub secs: f64,
    /// Whether a poll read 0 again; if not, the phase ended first, and the window ends at the
    /// last poll that read 1.
    pub closed: bool,
}

impl WindowReport {
    fn end_secs(&self) -> f64 {
        self.start_secs + self.secs
    }
}

/// Seconds covered by at least one of `windows`, counting only what lies between `from` and
/// `to`: windows of several targets may overlap.
fn covered(windows: &[WindowReport], from: f64, to: f64) -> f64 {
    let mut spans: Vec<(f64, f64)> = windows
        .iter()
        .map(|w| (w.start_secs.max(from), w.end_secs().min(to)))
        .filter(|(start, end)| start < end)
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut total, mut reached) = (0.0, f64::NEG_INFINITY);
    for (start, end) in spans {
        let start = start.max(reached);
        if end > start {
            total += end - start;
            reached = end;
        }
    }
    total
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
            gauge_exported: false,
            windows: Vec::new(),
            compacting_secs: 0.0,
            requests_while_compacting: 0,
        });
        self.endpoints.extend(endpoints);
    }

    /// Adds what the compaction phase's gauge polls saw: the `windows` and the logins that fell
    /// inside them (`stats`) as the row `name`, its rate over the time the windows cover within
    /// the phase. No row without a window. Call after [`ScenarioReport::add_compaction`].
    pub fn add_while_compacting(
        &mut self,
        name: &str,
        stats: &EndpointStats,
        gauge_exported: bool,
        mut windows: Vec<WindowReport>,
    ) {
        let Some(compaction) = &mut self.compaction else {
            return;
        };
        windows.sort_by(|a, b| a.start_secs.total_cmp(&b.start_secs));
        compaction.gauge_exported = gauge_exported;
        compaction.compacting_secs = covered(&windows, f64::NEG_INFINITY, f64::INFINITY);
        if !windows.is_empty() {
            // Never zero: a window wholly outside the phase holds no login, and 0 / tiny is 0.
            let within = covered(&windows, 0.0, compaction.elapsed_secs).max(f64::MIN_POSITIVE);
            let row = EndpointReport::new(name, stats, within);
            compaction.requests_while_compacting = row.requests;
            // Last, after the phase's own row.
            self.endpoints.push(row);
        }
        compaction.windows = windows;
    }
}

impl CompactionReport {
    /// The summary line's words on the windows the gauge polls saw.
    fn while_compacting(&self) -> String {
        let poll = GAUGE_POLL.as_millis();
        let windows = match self.windows.as_slice() {
            [] if !self.gauge_exported => {
                return format!(
                    "no compacting seen: the broker does not export {COMPACTING_METRIC}"
                );
            }
            [] => {
                return format!(
                    "no compacting seen: {COMPACTING_METRIC} never read 1 in polls every \
                     {poll} ms (absent or shorter than a poll)"
                );
            }
            [one] => format!("from {:.2} s into the phase", one.start_secs),
            several => format!("{} windows", several.len()),
        };
        let unfinished = if self.windows.iter().any(|w| !w.closed) {
            ", still compacting when the phase ended"
        } else {
            ""
        };
        format!(
            "compacting for {:.2} s as polled every {poll} ms ({windows}{unfinished}), {} logins \
             sent and answered within it",
            self.compacting_secs, self.requests_while_compacting
        )
    }
}

/// The whole run.
#[derive(Serialize, Default)]
pub struct RunReport {
    /// In the order they ran.
    pub scenarios: Vec<ScenarioReport>,
    /// `<scenario>/baseline`: each scenario's req/s over the baseline's, when both ran; and
    /// `edge/edge-bare`: the edge host's through the verifier's filter over without it.
    pub ratios: BTreeMap<String, f64>,
}

impl RunReport {
    /// Computes the ratios to the baseline, and the edge host's with and without the verifier.
    pub fn finish(&mut self) {
        let rate = |name: &str| {
            self.scenarios
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.requests_per_sec)
        };
        if let (Some(edge), Some(bare)) = (rate("edge"), rate("edge-bare")) {
            self.ratios.insert("edge/edge-bare".into(), edge / bare);
        }
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
            let paced = match s.rate {
                Some(rate) => format!(" paced to {rate:.0} req/s"),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "\nscenario {}: {} connections{paced} over {targets}, {:.2} s, {} requests, \
                 {:.0} req/s, {} errors",
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
                     errors; {seen}; {}",
                    c.elapsed_secs,
                    c.users,
                    c.requests,
                    c.errors,
                    c.while_compacting()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn window(target: usize, start_secs: f64, secs: f64) -> WindowReport {
        WindowReport {
            target,
            start_secs,
            secs,
            closed: true,
        }
    }

    #[test]
    fn overlapping_windows_count_once_and_are_clipped_to_the_phase() {
        let windows = [
            window(0, 1.0, 2.0),
            window(1, 2.0, 2.0),
            window(0, 5.0, 1.0),
        ];
        assert!((covered(&windows, f64::NEG_INFINITY, f64::INFINITY) - 4.0).abs() < 1e-9);
        assert!((covered(&windows, 2.5, 5.5) - 2.0).abs() < 1e-9);
        assert_eq!(covered(&[], 0.0, 10.0), 0.0);
    }

    fn phase() -> ScenarioReport {
        let mut report = ScenarioReport::new("sessions", 1, 1.0, &BTreeMap::new());
        report.add_compaction(&BTreeMap::new(), 10.0, 1024, 1, true);
        report
    }

    #[test]
    fn the_while_compacting_row_and_its_figures_appear_with_a_window() {
        let mut report = phase();
        let mut inside = EndpointStats::default();
        inside.record(2000, None);
        inside.record(4000, Some("503"));
        report.add_while_compacting("w", &inside, true, vec![window(0, 9.0, 2.0)]);
        let row = report.endpoints.last().expect("a row");
        assert_eq!((row.name.as_str(), row.requests), ("w", 2));
        // Over the second of the window inside the phase.
        assert!((row.requests_per_sec - 2.0).abs() < 1e-9);
        let c = report.compaction.as_ref().expect("a compaction");
        assert_eq!((c.compacting_secs, c.requests_while_compacting), (2.0, 2));
        assert_eq!(
            c.requests, 0,
            "the phase's own figures are left as they were"
        );
        let line = report.compaction.as_ref().unwrap().while_compacting();
        assert!(line.contains("compacting for 2.00 s"), "{line}");
        assert!(line.contains("from 9.00 s into the phase"), "{line}");
        assert!(line.contains("2 logins"), "{line}");
    }

    #[test]
    fn without_a_window_there_is_no_row_and_the_line_says_why() {
        let mut report = phase();
        report.add_while_compacting("w", &EndpointStats::default(), true, Vec::new());
        assert!(report.endpoints.is_empty());
        let line = report.compaction.as_ref().unwrap().while_compacting();
        assert!(line.contains("never read 1"), "{line}");
        let mut older = phase();
        older.add_while_compacting("w", &EndpointStats::default(), false, Vec::new());
        let line = older.compaction.as_ref().unwrap().while_compacting();
        assert!(line.contains("does not export"), "{line}");
    }
}
