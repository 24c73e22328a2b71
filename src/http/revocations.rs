//! The revocation feed over HTTP (`GET /v1/revocations`): Server-Sent Events for edge verifiers,
//! behind a bearer secret of its own, `WXBROKER_VERIFIER_TOKEN`. Without that secret (or while
//! signed tokens are off) the route answers 404 as if it did not exist; with a wrong one, 401.
//!
//! Events: `revoke` (data: a [`crate::revocation::Revocation`]; id: its cursor), `reset` (data:
//! `{"notBefore": unix seconds}`; id: where the feed goes on) and `synced` (every stored event
//! has been sent; live ones follow). A comment every [`KEEP_ALIVE`] keeps idle connections open.
//! A verifier resumes with `Last-Event-ID` (as an `EventSource` does) or `?since=CURSOR`.

use std::convert::Infallible;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use warp::http::StatusCode;
use warp::http::header::HeaderValue;
use warp::reply::Response;
use warp::sse::Event;
use warp::{Filter, Rejection, Reply};

use super::filters::{bearer, get, with_broker};
use super::handlers::bearer_token;
use super::problem::Problem;
use super::tokens::signing;
use crate::crypto::token_hash;
use crate::revocation::Cursor;
use crate::{Broker, Error, FeedItem};

/// Longest silence on a feed: a comment is sent then, so that proxies keep the connection and
/// the verifier knows it is alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The query of `/v1/revocations`.
#[derive(Deserialize)]
struct FeedQuery {
    since: Option<String>,
}

/// GET /v1/revocations with `Authorization: Bearer <WXBROKER_VERIFIER_TOKEN>`, resumable with
/// `Last-Event-ID` or `?since=`
pub(super) fn route(
    broker: Broker,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let query = warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    warp::path!("v1" / "revocations")
        .and(signing(broker.clone()))
        .and(get())
        .and(verifier_auth(broker.clone()))
        .and(warp::header::optional::<String>("last-event-id"))
        .and(query)
        .and(with_broker(broker))
        .and_then(feed)
}

async fn feed(
    last_event_id: Option<String>,
    query: Option<String>,
    broker: Broker,
) -> Result<Response, Rejection> {
    let since = match query {
        Some(query) => {
            serde_urlencoded::from_str::<FeedQuery>(&query)
                .map_err(|e| {
                    Problem::reject(Error::InvalidRequest(format!("bad query string: {e}")))
                })?
                .since
        }
        None => None,
    };
    // An EventSource opened with ?since= reconnects to the same URL with Last-Event-ID: the
    // header is the newer of the two.
    let since = match last_event_id.or(since).filter(|s| !s.is_empty()) {
        Some(text) => Some(
            text.parse::<Cursor>()
                .map_err(|e| Problem::reject(Error::InvalidRequest(e)))?,
        ),
        None => None,
    };
    let items = broker.revocation_feed(since).map_err(Problem::reject)?;
    let events = items.map(|item| Ok::<_, Infallible>(event(item)));
    let stream = warp::sse::keep_alive().interval(KEEP_ALIVE).stream(events);
    let mut response = warp::sse::reply(stream).into_response();
    // Proxies that buffer answers (nginx) would hold events back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The SSE event of a feed item.
fn event(item: FeedItem) -> Event {
    match item {
        FeedItem::Revoked(event) => Event::default()
            .event("revoke")
            .id(event.cursor.to_string())
            .json_data(&event.revocation)
            .expect("a revocation serializes"),
        FeedItem::Reset { not_before, cursor } => Event::default()
            .event("reset")
            .id(cursor.to_string())
            .json_data(serde_json::json!({ "notBefore": not_before }))
            .expect("a reset serializes"),
        FeedItem::Synced => Event::default().event("synced").data("{}"),
    }
}

/// Passes requests that carry the verifier secret; without a configured secret, nothing is here.
fn verifier_auth(broker: Broker) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    bearer()
        .and_then(move |header: Option<String>| {
            let expected = broker.config().verifier_token.clone();
            async move {
                let Some(expected) = expected.filter(|e| !e.expose().is_empty()) else {
                    return Err(warp::reject::not_found());
                };
                let given = bearer_token(header.as_deref()).unwrap_or("");
                // Digests of equal length: the comparison tells nothing, not even the length.
                let (given, expected) = (token_hash(given), token_hash(expected.expose()));
                if bool::from(given.ct_eq(&expected)) {
                    Ok(())
                } else {
                    Err(warp::reject::custom(Problem::new(
                        StatusCode::UNAUTHORIZED,
                        "verifier_unauthorized",
                        "send Authorization: Bearer <WXBROKER_VERIFIER_TOKEN>",
                    )))
                }
            }
        })
        .untuple_one()
}
