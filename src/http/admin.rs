//! The admin surface (`/admin/...`), guarded by its own bearer secret, `WXBROKER_ADMIN_TOKEN`.
//! Without that secret configured, every admin route answers 404 as if it did not exist. A client
//! address that presents wrong tokens gets 429 for the rest of the minute after a handful.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::filters::{bearer, with_broker};
use super::handlers::bearer_token;
use super::problem::{Problem, json};
use super::rate_limit::{AdminFailures, client_ip};
use crate::crypto::token_hash;
use crate::{Broker, Error, UserKey};

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
            .or(stats(broker)),
    )
}

/// GET /admin/users/{uid}
fn user_by_uid(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("users" / u64)
        .and(warp::get())
        .and(with_broker(broker))
        .and_then(|uid, broker: Broker| find(broker, UserKey::Uid(uid)))
}

/// GET /admin/users?openid=X or ?unionid=Y
fn user_by_query(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("users")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(with_broker(broker))
        .and_then(
            |query: HashMap<String, String>, broker: Broker| async move {
                let key = match (query.get("openid"), query.get("unionid")) {
                    (Some(openid), None) => UserKey::Openid(openid.clone()),
                    (None, Some(unionid)) => UserKey::Unionid(unionid.clone()),
                    _ => {
                        return Err(Problem::reject(Error::InvalidRequest(
                            "give exactly one of openid or unionid".into(),
                        )));
                    }
                };
                find(broker, key).await
            },
        )
}

/// GET /admin/users/{uid}/sessions
fn user_sessions(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("users" / u64 / "sessions")
        .and(warp::get())
        .and(with_broker(broker))
        .and_then(|uid, broker: Broker| async move {
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
    warp::path!("users" / u64 / "sessions")
        .and(warp::delete())
        .and(with_broker(broker))
        .and_then(|uid, broker: Broker| async move {
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
    warp::path!("users" / u64 / "session-key" / "reset")
        .and(warp::post())
        .and(with_broker(broker))
        .and_then(|uid, broker: Broker| async move {
            match broker.reset_session_key(uid).await {
                Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
                Ok(false) => Err(not_found("user_not_found", "no such user")),
                Err(e) => Err(Problem::reject_reset(e)),
            }
        })
}

/// GET /admin/stats
fn stats(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("stats")
        .and(warp::get())
        .and(with_broker(broker))
        .and_then(|broker: Broker| async move {
            let stats = broker.stats().await.map_err(Problem::reject)?;
            let body =
                serde_json::json!({ "users": stats.users, "liveSessions": stats.live_sessions });
            Ok::<_, Rejection>(json(StatusCode::OK, &body))
        })
}

async fn find(broker: Broker, key: UserKey) -> Result<Response, Rejection> {
    match broker.find_user(key).await.map_err(Problem::reject)? {
        Some(user) => Ok(json(StatusCode::OK, &user)),
        None => Err(not_found("user_not_found", "no such user")),
    }
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
