//! How a verifier keeps up with the broker: the JWKS, fetched at start, every few minutes and
//! at once for an unknown `kid` (at most once per interval), and the revocation feed, read as
//! Server-Sent Events and resumed from the last cursor after every disconnect, with backoff.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CACHE_CONTROL};
use serde::Deserialize;

use super::Shared;
use crate::jwt::JwkSet;
use crate::revocation::Revocation;

/// Time to connect to the broker.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a JWKS fetch may take.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence on the feed before it counts as lost: the broker sends a comment every 15 s.
const FEED_IDLE: Duration = Duration::from_secs(45);
/// The first wait before a reconnection (then doubled, up to the verifier's maximum).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Why a fetch or the feed failed (for the log).
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    /// The broker could not be reached or the connection broke.
    #[error("the broker is unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    /// The broker answered with an error status.
    #[error("the broker answered {0}")]
    Status(StatusCode),
    /// Nothing arrived for too long.
    #[error("the feed was silent for {0:?}")]
    Silent(Duration),
    /// The broker sent something that is not what it should send.
    #[error("the broker sent something unreadable: {0}")]
    Unreadable(String),
}

/// Fetches the JWKS and installs its keys.
pub(super) async fn fetch_keys(shared: &Shared) -> Result<usize, Failure> {
    let response = shared
        .http
        .get(shared.url("/.well-known/jwks.json"))
        // A cache in between may hold the set from before a rotation.
        .header(CACHE_CONTROL, "no-cache")
        .timeout(JWKS_TIMEOUT)
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(Failure::Status(response.status()));
    }
    let set: JwkSet = response
        .json()
        .await
        .map_err(|e| Failure::Unreadable(e.to_string()))?;
    Ok(shared.install_keys(&set))
}

/// Fetches the keys every `every` (the first fetch is [`follow_feed`]'s).
pub(super) async fn keep_keys(shared: std::sync::Arc<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match fetch_keys(&shared).await {
            Ok(count) => tracing::debug!(keys = count, "fetched the broker's JWKS"),
            Err(e) => tracing::warn!(error = %e, "cannot fetch the broker's JWKS"),
        }
    }
}

/// Follows the revocation feed for as long as the verifier lives, reconnecting with backoff;
/// fetches the keys first while it has none, so that a verifier that has read the feed can
/// verify.
pub(super) async fn follow_feed(shared: std::sync::Arc<Shared>) {
    let mut backoff = Backoff::new(shared.max_backoff);
    loop {
        if !shared.has_keys()
            && let Err(e) = fetch_keys(&shared).await
        {
            tracing::warn!(error = %e, "cannot fetch the broker's JWKS; retrying");
            backoff.wait().await;
            continue;
        }
        let outcome = read_feed(&shared, &mut backoff).await;
        shared.set_connected(false);
        match outcome {
            Ok(()) => tracing::info!("the revocation feed ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "the revocation feed is lost; reconnecting"),
        }
        backoff.wait().await;
    }
}

/// One connection to the feed, read until it ends.
async fn read_feed(shared: &Shared, backoff: &mut Backoff) -> Result<(), Failure> {
    let mut request = shared
        .http
        .get(shared.url("/v1/revocations"))
        .bearer_auth(shared.verifier_token.expose())
        .header(ACCEPT, "text/event-stream");
    if let Some(cursor) = shared.cursor() {
        request = request.header("last-event-id", cursor);
    }
    let mut response = request.send().await?;
    if !response.status().is_success() {
        return Err(Failure::Status(response.status()));
    }
    shared.set_connected(true);
    backoff.reset();
    let mut parser = Parser::default();
    loop {
        let chunk = tokio::time::timeout(FEED_IDLE, response.chunk())
            .await
            .map_err(|_| Failure::Silent(FEED_IDLE))??;
        let Some(chunk) = chunk else {
            return Ok(());
        };
        for event in parser.push(&chunk) {
            apply(shared, event)?;
        }
    }
}

/// The data of a `reset` event.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reset {
    not_before: u64,
}

fn apply(shared: &Shared, event: Event) -> Result<(), Failure> {
    let unreadable = |e: serde_json::Error| Failure::Unreadable(format!("{}: {e}", event.name));
    match event.name.as_str() {
        "revoke" => {
            let revocation: Revocation = serde_json::from_str(&event.data).map_err(unreadable)?;
            shared.revoke(&revocation);
        }
        "reset" => {
            let reset: Reset = serde_json::from_str(&event.data).map_err(unreadable)?;
            let not_before = reset.not_before;
            let what = "the broker cannot vouch for revocations before a time: tokens issued \
                        before it are refused";
            match shared.cursor() {
                // A first connection to a young feed: no token from before it is likely.
                None => tracing::info!(not_before, "{what}"),
                Some(cursor) => tracing::warn!(not_before, cursor, "{what}"),
            }
            shared.reset(reset.not_before);
        }
        "synced" => shared.set_synced(),
        // Events of a later version are not ours to read.
        _ => {}
    }
    if let Some(id) = event.id {
        shared.set_cursor(id);
    }
    Ok(())
}

/// A Server-Sent Event, as far as the feed uses them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Event {
    name: String,
    data: String,
    id: Option<String>,
}

/// Turns the bytes of an event stream into events (the subset of the SSE format the broker
/// writes, and comments).
#[derive(Default)]
struct Parser {
    /// Bytes of an unfinished line.
    line: Vec<u8>,
    /// The event being read.
    event: Event,
    /// Whether it has any field yet.
    started: bool,
}

impl Parser {
    /// The events completed by `bytes`.
    fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut done = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                if std::mem::take(&mut self.started) {
                    done.push(std::mem::take(&mut self.event));
                }
                continue;
            }
            let line = String::from_utf8_lossy(&line);
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            self.started = true;
            match field {
                "event" => self.event.name = value.to_owned(),
                "data" => {
                    if !self.event.data.is_empty() {
                        self.event.data.push('\n');
                    }
                    self.event.data.push_str(value);
                }
                "id" => self.event.id = Some(value.to_owned()),
                _ => {}
            }
        }
        done
    }
}

/// Waits between reconnections: doubling from [`FIRST_BACKOFF`] to a maximum, each wait drawn
/// between half and all of it, so that many verifiers do not reconnect in step.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: FIRST_BACKOFF.min(max),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = FIRST_BACKOFF.min(self.max);
    }

    async fn wait(&mut self) {
        let wait = self.next.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::time::sleep(wait).await;
        self.next = (self.next * 2).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_whatever_the_chunks() {
        let stream = b": hello\n\nevent: revoke\nid: 5-0\ndata: {\"uid\":1}\n\nevent:synced\r\ndata:{}\r\n\r\n";
        for split in 0..stream.len() {
            let mut parser = Parser::default();
            let mut events = parser.push(&stream[..split]);
            events.extend(parser.push(&stream[split..]));
            assert_eq!(
                events,
                [
                    Event {
                        name: "revoke".into(),
                        data: r#"{"uid":1}"#.into(),
                        id: Some("5-0".into()),
                    },
                    Event {
                        name: "synced".into(),
                        data: "{}".into(),
                        id: None,
                    },
                ],
                "split at {split}"
            );
        }
    }
}
