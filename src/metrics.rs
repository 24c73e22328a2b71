//! The broker's Prometheus metrics, in a registry of its own (two brokers in one process each
//! count their own).

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the broker exports at `/metrics`.
pub struct Metrics {
    registry: Registry,
    /// Logins by outcome: `new`, `returning`, or the error code (`invalid_code`, ...).
    pub logins: IntCounterVec,
    /// Session checks by outcome: `valid`, `invalid_session`, `unavailable`.
    pub session_checks: IntCounterVec,
    /// `session_checks{outcome="valid"}`, resolved once: it is counted on the hottest path.
    pub valid_checks: IntCounter,
    /// Time of each call to WeChat (one attempt).
    pub upstream_seconds: Histogram,
    /// Failed calls to WeChat by errcode, or `timeout`, or `other` (transport, HTTP status, body).
    pub upstream_errors: IntCounterVec,
    /// Code exchanges in flight now.
    pub upstream_inflight: IntGauge,
    /// Sessions held by the SessionKeeper (expired ones not yet swept included).
    pub live_sessions: IntGauge,
    /// Actor restarts by actor.
    pub actor_restarts: IntCounterVec,
    /// access_token fetches by outcome: `ok` or the error code.
    pub access_token_fetches: IntCounterVec,
    /// Time of each shared sled flush (group commit).
    pub flush_seconds: Histogram,
    /// Time of each rewrite of the session log, which runs beside the SessionKeeper; its count
    /// is `wxbroker_session_log_compaction_seconds_count`.
    pub compaction_seconds: Histogram,
    /// Rewrites of the session log finished (sled only).
    pub compactions: IntCounter,
    /// 1 while the session log is being rewritten, else 0: tells a load test which of its
    /// requests met a compaction.
    pub compacting: IntGauge,
    /// HTTP connections open now; at `WXBROKER_MAX_CONNECTIONS` new clients wait.
    pub connections_open: IntGauge,
    /// Times every connection slot was taken and the server waited for one before accepting
    /// again: a count that grows says clients are queueing at the cap.
    pub connection_cap_reached: IntCounter,
    /// Signed access tokens issued (by logins and `POST /v1/token`).
    pub access_tokens_signed: IntCounter,
    /// Revocation feeds being served now: the verifiers following this broker.
    pub revocation_feeds: IntGauge,
    /// Connections refused because their client address already held
    /// `WXBROKER_MAX_CONNECTIONS_PER_IP`.
    pub connections_refused: IntCounter,
    /// Logins by app and outcome (`appid`: one of the configured apps, never a request's word).
    pub app_logins: IntCounterVec,
    /// Calls to WeChat by app and outcome (`ok`, or the errcode or kind as in `upstream_errors`).
    pub app_upstream_calls: IntCounterVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, label: &str| {
            let metric = IntCounterVec::new(Opts::new(name, help), &[label]);
            registered(&registry, metric)
        };
        let plain_counter =
            |name: &str, help: &str| registered(&registry, IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| registered(&registry, IntGauge::new(name, help));
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            registered(&registry, Histogram::with_opts(opts))
        };
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let session_checks = counter(
            "wxbroker_session_checks_total",
            "Session checks by outcome",
            "outcome",
        );
        Metrics {
            logins: counter("wxbroker_logins_total", "Logins by outcome", "outcome"),
            valid_checks: session_checks.with_label_values(&["valid"]),
            session_checks,
            upstream_seconds: histogram(
                "wxbroker_upstream_call_seconds",
                "Time of each call to WeChat",
                latency.clone(),
            ),
            upstream_errors: counter(
                "wxbroker_upstream_errors_total",
                "Failed calls to WeChat by errcode or kind",
                "errcode",
            ),
            upstream_inflight: gauge("wxbroker_upstream_inflight", "Code exchanges in flight"),
            live_sessions: gauge("wxbroker_live_sessions", "Sessions held in memory"),
            actor_restarts: counter(
                "wxbroker_actor_restarts_total",
                "Actor restarts by actor",
                "actor",
            ),
            access_token_fetches: counter(
                "wxbroker_access_token_fetches_total",
                "access_token fetches by outcome",
                "outcome",
            ),
            flush_seconds: histogram(
                "wxbroker_store_flush_seconds",
                "Time of each shared sled flush",
                latency,
            ),
            compaction_seconds: histogram(
                "wxbroker_session_log_compaction_seconds",
                "Time of each rewrite of the session log",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            compactions: plain_counter(
                "wxbroker_session_log_compactions_total",
                "Rewrites of the session log finished",
            ),
            compacting: gauge(
                "wxbroker_session_log_compacting",
                "1 while the session log is being rewritten",
            ),
            connections_open: gauge("wxbroker_connections_open", "HTTP connections open"),
            connection_cap_reached: plain_counter(
                "wxbroker_connection_cap_reached_total",
                "Times every connection slot was taken and the server waited for one",
            ),
            access_tokens_signed: plain_counter(
                "wxbroker_access_tokens_signed_total",
                "Signed access tokens issued",
            ),
            revocation_feeds: gauge(
                "wxbroker_revocation_feeds_open",
                "Revocation feeds being served to verifiers",
            ),
            connections_refused: plain_counter(
                "wxbroker_connections_refused_total",
                "Connections refused because their client address held its share of connections",
            ),
            app_logins: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("wxbroker_app_logins_total", "Logins by app and outcome"),
                    &["appid", "outcome"],
                ),
            ),
            app_upstream_calls: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "wxbroker_app_upstream_calls_total",
                        "Calls to WeChat by app and outcome",
                    ),
                    &["appid", "outcome"],
                ),
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// `metric`, registered in `registry`: every metric is built from constant names, so a failure
/// is a bug.
fn registered<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
