//! The admin surface (`/admin/...`), guarded by its own bearer secret, `WXBROKER_ADMIN_TOKEN`.
//! Without that secret configured, every admin route answers 404 as if it did not exist. A client
//! address that presents wrong tokens gets 429 for the rest of the minute after a handful.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tracing::Instrument;
use warp::http::StatusCode;
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::filters::{bearer, get, with_broker};
use super::handlers::bearer_token;
use super::problem::{Problem, json};
use super::rate_limit::{AdminFailures, client_ip};
use crate::crypto::token_hash;
use crate::storage::UserExport;
use crate::{Broker, Error, User, UserKey};

/// Every admin route.
pub fn routes(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let guarded = warp::path("admin").and(admin_auth(broker.clone()));
    guarded.and(
        user_by_uid(broker.clone())
            .or(user_by_query(broker.clone()))
            .or(user_sessions(broker.clone()))
            .or(revoke_session(broker.clone()))
            .or(revoke_user_sessions(broker.clone()))
            .or(reset_session_key(broker.clone()))
            .or(export(broker.clone()))
            .or(stats(broker.clone()))
            .or(rotate_keys(broker)),
    )
}

/// GET /admin/users/{uid}
fn user_by_uid(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("users" / String)
        .and(get())
        .and(with_broker(broker))
        .and_then(|uid: String, broker: Broker| async move {
            find(broker, UserKey::Uid(parse_uid(&uid)?)).await
        })
}

/// GET /admin/users?openid=X[&appid=A] or ?unionid=Y
fn user_by_query(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::path!("users")
        .and(get())
        .and(query)
        .and(with_broker(broker))
        .and_then(
            |query: String, broker: Broker| async move { find(broker, user_key(&query)?).await },
        )
}

/// The user a `/admin/users` query names: exactly one of `openid` and `unionid`, given once and
/// not empty; an openid is the default app's unless `appid` names another (other parameters are
/// ignored).
fn user_key(query: &str) -> Result<UserKey, Rejection> {
    let invalid = |message: &str| Problem::reject(Error::InvalidRequest(message.into()));
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|_| invalid("the query string is malformed"))?;
    let appid = pairs
        .iter()
        .find(|(name, value)| name == "appid" && !value.is_empty())
        .map(|(_, value)| value.clone());
    let mut keys = pairs
        .into_iter()
        .filter(|(name, _)| name == "openid" || name == "unionid");
    let key = match (keys.next(), keys.next()) {
        (Some((name, value)), None) if !value.is_empty() => match name.as_str() {
            "openid" => match appid {
                Some(appid) => UserKey::Identity(crate::Identity {
                    appid: Some(appid),
                    openid: value,
                }),
                None => UserKey::Openid(value),
            },
            _ => UserKey::Unionid(value),
        },
        (Some(_), None) => return Err(invalid("openid or unionid is empty")),
        _ => return Err(invalid("give exactly one of openid or unionid, once")),
    };
    Ok(key)
}

/// GET /admin/users/{uid}/sessions
fn user_sessions(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("users" / String / "sessions")
        .and(get())
        .and(with_broker(broker))
        .and_then(|uid: String, broker: Broker| async move {
            let uid = parse_uid(&uid)?;
            let sessions = broker.user_sessions(uid).await.map_err(Problem::reject)?;
            Ok::<_, Rejection>(json(
                StatusCode::OK,
                &serde_json::json!({ "sessions": sessions }),
            ))
        })
}

/// DELETE /admin/sessions/{id}: ends one session, durably
fn revoke_session(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("sessions" / String)
        .and(warp::delete())
        .and(with_broker(broker))
        .and_then(|id: String, broker: Broker| async move {
            if !is_session_id(&id) {
                return Err(Problem::reject(Error::InvalidRequest(
                    "a session id is 64 lowercase hex digits, as the session list gives it".into(),
                )));
            }
            match broker.revoke_session(&id).await {
                Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
                Err(Error::InvalidSession) => Err(not_found(
                    "session_not_found",
                    "no live session has this id",
                )),
                Err(e) => Err(Problem::reject(e)),
            }
        })
}

/// DELETE /admin/users/{uid}/sessions: ends every session of a user, durably
fn revoke_user_sessions(
    broker: Broker,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("users" / String / "sessions")
        .and(warp::delete())
        .and(with_broker(broker))
        .and_then(|uid: String, broker: Broker| async move {
            let uid = parse_uid(&uid)?;
            let revoked = broker
                .revoke_user_sessions(uid)
                .await
                .map_err(Problem::reject)?;
            Ok::<_, Rejection>(json(
                StatusCode::OK,
                &serde_json::json!({ "revoked": revoked }),
            ))
        })
}

/// POST /admin/users/{uid}/session-key/reset: WeChat replaces the user's session_key
fn reset_session_key(
    broker: Broker,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("users" / String / "session-key" / "reset")
        .and(warp::post())
        .and(with_broker(broker))
        .and_then(|uid: String, broker: Broker| async move {
            match broker.reset_session_key(parse_uid(&uid)?).await {
                Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
                Ok(false) => Err(not_found("user_not_found", "no such user")),
                Err(e) => Err(Problem::reject_reset(e)),
            }
        })
}

/// GET /admin/stats
fn stats(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("stats")
        .and(get())
        .and(with_broker(broker))
        .and_then(|broker: Broker| async move {
            let stats = broker.stats().await.map_err(Problem::reject)?;
            let body =
                serde_json::json!({ "users": stats.users, "liveSessions": stats.live_sessions });
            Ok::<_, Rejection>(json(StatusCode::OK, &body))
        })
}

/// POST /admin/keys/rotate: a new access-token signing key signs from now on
fn rotate_keys(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("keys" / "rotate")
        .and(warp::post())
        .and(with_broker(broker))
        .and_then(|broker: Broker| async move {
            if !broker.signs_access_tokens() {
                return Err(warp::reject::not_found());
            }
            let rotation = broker.rotate_signing_key().await.map_err(Problem::reject)?;
            Ok(json(StatusCode::OK, &rotation))
        })
}

/// GET /admin/export: every user as JSON lines, the format of `wxbroker export`, streamed while
/// the broker serves
///
/// A chunked `application/x-ndjson` body, a page of users per chunk, produced by a task of its
/// own through a channel of a few pages, so that a slow client holds back the reading instead of
/// the broker holding the users. The first page is read before the answer, so a store that
/// fails at once is an error status; a failure after it ends the body without its last chunk
/// (the client sees a broken transfer, `curl` exits non-zero), never as a complete export.
fn export(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("export")
        .and(get())
        .and(with_broker(broker))
        .and_then(|broker: Broker| async move {
            let mut users = broker.export_users();
            let first = users.next_page().await.map_err(Problem::reject)?;
            Ok::<_, Rejection>(json_lines(first, users))
        })
}

/// Pages of users in flight between the reading task and the client.
const EXPORT_PAGES_IN_FLIGHT: usize = 2;

/// The streamed answer of [`export`]: `first`, then the rest of `users`.
fn json_lines(first: Option<Vec<User>>, mut users: UserExport) -> Response {
    let (pages, mut received) = mpsc::channel::<Result<Bytes, Error>>(EXPORT_PAGES_IN_FLIGHT);
    let task = async move {
        let mut next = first;
        let mut count = 0usize;
        loop {
            let Some(page) = next else {
                tracing::info!(users = count, "export finished");
                return;
            };
            count += page.len();
            let mut lines = Vec::with_capacity(page.len() * 256);
            for user in &page {
                serde_json::to_writer(&mut lines, user).expect("a user serializes");
                lines.push(b'\n');
            }
            if pages.send(Ok(Bytes::from(lines))).await.is_err() {
                tracing::info!(users = count, "the client left before the export ended");
                return;
            }
            next = match users.next_page().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, users = count, "the export failed: its answer is cut short");
                    let _ = pages.send(Err(e)).await;
                    return;
                }
            };
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    let body = futures_util::stream::poll_fn(move |cx| received.poll_recv(cx));
    let mut response = warp::reply::stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn find(broker: Broker, key: UserKey) -> Result<Response, Rejection> {
    match broker.find_user(key).await.map_err(Problem::reject)? {
        Some(user) => Ok(json(StatusCode::OK, &user)),
        None => Err(not_found("user_not_found", "no such user")),
    }
}

/// A uid from a path, as the document bounds it: a whole number from 1 (uids start at 1) to
/// `u64::MAX`, in decimal digits. Anything else is 400, so that no route answers for a uid that
/// cannot exist as if it could (a session list of uid 0 would be an empty 200).
fn parse_uid(segment: &str) -> Result<u64, Rejection> {
    segment
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| segment.parse::<u64>().ok())
        .flatten()
        .filter(|uid| *uid >= 1)
        .ok_or_else(|| {
            Problem::reject(Error::InvalidRequest(format!(
                "uid is a whole number from 1 to {}",
                u64::MAX
            )))
        })
}

/// Whether `id` is a session id as the session list gives it: 64 lowercase hex digits.
fn is_session_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn not_found(code: &'static str, message: &str) -> Rejection {
    warp::reject::custom(Problem::new(StatusCode::NOT_FOUND, code, message))
}

/// Passes requests that carry the admin secret; without a configured secret, nothing is here.
/// Wrong bearer tokens are counted per client address: past a handful a minute, 429.
fn admin_auth(broker: Broker) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    let failures = Arc::new(AdminFailures::default());
    bearer()
        .and(client_ip())
        .and_then(move |header: Option<String>, ip: Option<IpAddr>| {
            let expected = broker.config().admin_token.clone();
            let failures = failures.clone();
            async move {
                // An empty secret would let in a request without any header: treat it as none.
                let Some(expected) = expected.filter(|e| !e.expose().is_empty()) else {
                    return Err(warp::reject::not_found());
                };
                failures.allow(ip)?;
                let given = bearer_token(header.as_deref()).ok();
                // Digests of equal length: the comparison tells nothing, not even the length.
                let digests = (
                    token_hash(given.unwrap_or("")),
                    token_hash(expected.expose()),
                );
                if bool::from(digests.0.ct_eq(&digests.1)) {
                    Ok(())
                } else {
                    // Only a token presented is a guess; a request without one guesses nothing.
                    if given.is_some() {
                        failures.record_failure(ip);
                    }
                    Err(warp::reject::custom(Problem::new(
                        StatusCode::UNAUTHORIZED,
                        "admin_unauthorized",
                        "send Authorization: Bearer <WXBROKER_ADMIN_TOKEN>",
                    )))
                }
            }
        })
        .untuple_one()
}
