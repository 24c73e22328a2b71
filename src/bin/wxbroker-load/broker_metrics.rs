//! What the tool reads of a broker's `/metrics`: the names it looks for, one reading, and the
//! value of a metric in the text.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::Method;

use crate::client::{Call, Conn};

/// The broker's counter of finished session log rewrites, read from its `/metrics`.
pub const COMPACTIONS_METRIC: &str = "wxbroker_session_log_compactions_total";

/// The broker's gauge that reads 1 while its session log is being rewritten, else 0; older
/// brokers lack it, which counts as 0.
pub const COMPACTING_METRIC: &str = "wxbroker_session_log_compacting";

/// How often the compaction phase reads each target's [`COMPACTING_METRIC`]: a rewrite lasts
/// seconds, so a poll at each end places it within a few hundredths of one.
pub const GAUGE_POLL: Duration = Duration::from_millis(25);

/// How long a gauge reading may take: one later than this no longer says when the gauge
/// changed, and the next poll is due.
const GAUGE_TIMEOUT: Duration = Duration::from_millis(200);

fn metrics_call() -> Call<'static> {
    Call {
        method: Method::GET,
        path: "/metrics",
        token: None,
        json: None,
    }
}

/// The broker's `/metrics` text, on a connection of its own so that a slow answer cannot hold
/// up the next reading; `None` if it does not answer 200 within a second.
pub async fn metrics(addr: SocketAddr) -> Option<String> {
    let read = async {
        Conn::open(addr)
            .await
            .ok()?
            .send(&metrics_call())
            .await
            .ok()
    };
    match tokio::time::timeout(Duration::from_secs(1), read).await {
        Ok(Some((200, body))) => Some(String::from_utf8_lossy(&body).into_owned()),
        _ => None,
    }
}

/// The broker's `/metrics` text on `conn`, kept open between readings (40 a second would
/// otherwise each cost a connection); `None` if it does not answer 200 within
/// [`GAUGE_TIMEOUT`].
pub async fn metrics_on(conn: &mut Option<Conn>, addr: SocketAddr) -> Option<String> {
    let read = async {
        if conn.is_none() {
            *conn = Some(Conn::open(addr).await.ok()?);
        }
        conn.as_mut()?.send(&metrics_call()).await.ok()
    };
    match tokio::time::timeout(GAUGE_TIMEOUT, read).await {
        Ok(Some((200, body))) => Some(String::from_utf8_lossy(&body).into_owned()),
        Ok(_) => None,
        Err(_) => {
            // The late answer would still arrive on it, ahead of the next reading's.
            *conn = None;
            None
        }
    }
}

/// Whether the `/metrics` text shows the session log being rewritten; `None` when it lacks
/// the gauge.
pub fn compacting(text: &str) -> Option<bool> {
    metric_value(text, COMPACTING_METRIC).map(|value| value > 0)
}

/// The value of metric `name` (a counter or a gauge) in a Prometheus text exposition, summed
/// over its label sets; `None` when it is not there.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
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
