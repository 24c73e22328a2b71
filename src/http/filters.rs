//! The routes, one function each, in the order they are matched.

use std::convert::Infallible;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use std::sync::Arc;

use super::handlers;
use super::problem::Problem;
use super::rate_limit::{LoginLimiter, login_limit};
use crate::{Broker, Error};

/// Largest request body accepted; a login body is a few dozen bytes.
pub const BODY_LIMIT: u64 = 64 * 1024;
/// Time a client has to send the whole body once its headers are in.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The broker's public routes (every one but the admin's).
pub(super) fn public(
    broker: Broker,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let config = broker.config();
    let limiter = Arc::new(LoginLimiter::new(
        config.login_rate_per_min,
        config.login_burst,
    ));
    login(broker.clone(), limiter)
        .or(session(broker.clone()))
        .or(auth(broker.clone()))
        .or(logout(broker.clone()))
        .or(userinfo(broker.clone()))
        .or(phone(broker.clone()))
        .or(me(broker.clone()))
        .or(healthz(broker.clone()))
        .or(readyz(broker.clone()))
        .or(metrics(broker))
        .or(openapi())
}

// Defined here rather than in `broker.rs`: the broker knows nothing of HTTP.
impl Broker {
    /// A warp filter that extracts the caller's session from its Bearer token, or rejects with
    /// the same 401 JSON as `/v1/session` (finish the route with `.recover(wxbroker::recover)`).
    pub fn require_session(
        &self,
    ) -> impl Filter<Extract = (crate::SessionInfo,), Error = Rejection> + Clone + use<> {
        require_session(self.clone())
    }
}

/// The caller's session, from its Bearer token; rejects like `/v1/session` (401 JSON, once the
/// rejection passes through [`crate::recover`]). For guarding an embedder's own routes.
pub fn require_session(
    broker: Broker,
) -> impl Filter<Extract = (crate::SessionInfo,), Error = Rejection> + Clone {
    bearer().and(with_broker(broker)).and_then(
        |authorization: Option<String>, broker: Broker| async move {
            let token = handlers::bearer_token(authorization.as_deref())?;
            broker.check_session(token).await.map_err(Problem::reject)
        },
    )
}

/// POST /v1/login with `{"code": "..."}` or the form `code=...`
fn login(
    broker: Broker,
    limiter: Arc<LoginLimiter>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("v1" / "login")
        .and(warp::post())
        .and(login_limit(limiter))
        .and(warp::header::optional::<String>("content-type"))
        .and(body())
        .and(with_broker(broker))
        .and_then(handlers::login)
}

/// GET /v1/session[?verify=wechat] with `Authorization: Bearer TOKEN`
fn session(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let query = warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    warp::path!("v1" / "session")
        .and(get())
        .and(query)
        .and(bearer())
        .and(with_broker(broker))
        .and_then(handlers::session)
}

/// ANY /v1/auth[/...] with `Authorization: Bearer TOKEN`: forward auth for a proxy (nginx
/// `auth_request`, Traefik `forwardAuth`, Envoy `ext_authz`, APISIX `forward-auth`). Any method and
/// any path below it, because some proxies send the original request's method and append its path.
fn auth(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let apps = Arc::new(handlers::AppHeaders::of(&broker));
    warp::path!("v1" / "auth" / ..)
        .and(bearer())
        .and(with_broker(broker))
        .and(warp::any().map(move || apps.clone()))
        .and_then(handlers::auth)
}

/// POST /v1/logout with `Authorization: Bearer TOKEN`
fn logout(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("v1" / "logout")
        .and(warp::post())
        .and(bearer())
        .and(with_broker(broker))
        .and_then(handlers::logout)
}

/// POST /v1/userinfo with `{"encryptedData", "iv", "rawData"?, "signature"?}` and a Bearer token
fn userinfo(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("v1" / "userinfo")
        .and(warp::post())
        .and(bearer())
        .and(warp::header::optional::<String>("content-type"))
        .and(body())
        .and(with_broker(broker))
        .and_then(handlers::userinfo)
}

/// POST /v1/phone with `{"code"}` or `{"encryptedData", "iv"}` and a Bearer token
fn phone(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("v1" / "phone")
        .and(warp::post())
        .and(bearer())
        .and(warp::header::optional::<String>("content-type"))
        .and(body())
        .and(with_broker(broker))
        .and_then(handlers::phone)
}

/// GET /v1/me with a Bearer token: the stored user
fn me(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("v1" / "me")
        .and(get())
        .and(bearer())
        .and(with_broker(broker))
        .and_then(handlers::me)
}

/// GET /healthz: 200 while every actor runs, 503 otherwise
fn healthz(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("healthz")
        .and(get())
        .and(with_broker(broker))
        .map(handlers::healthz)
}

/// GET /readyz: 200 while every actor runs and the store answers, 503 otherwise
fn readyz(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("readyz")
        .and(get())
        .and(with_broker(broker))
        .and_then(handlers::readyz)
}

/// GET /metrics: Prometheus text format
fn metrics(broker: Broker) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(get())
        .and(with_broker(broker))
        .map(|broker: Broker| {
            warp::reply::with_header(
                broker.metrics().render(),
                "content-type",
                "text/plain; version=0.0.4; charset=utf-8",
            )
        })
}

/// GET /openapi.json: the OpenAPI 3 document of every route
fn openapi() -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("openapi.json").and(get()).map(|| {
        let reply = warp::reply::with_header(
            include_str!("../openapi.json"),
            "content-type",
            "application/json",
        );
        warp::reply::with_header(reply, "cache-control", "no-store")
    })
}

/// GET, and HEAD with it: RFC 9110 asks HEAD wherever GET is served (load balancers probe
/// `/healthz` with it); the server sends a HEAD answer's headers without its body.
pub(super) fn get() -> impl Filter<Extract = (), Error = Rejection> + Copy {
    warp::get().or(warp::head()).unify()
}

pub(super) fn with_broker(
    broker: Broker,
) -> impl Filter<Extract = (Broker,), Error = Infallible> + Clone {
    warp::any().map(move || broker.clone())
}

/// The request body, up to [`BODY_LIMIT`] bytes, with or without a Content-Length.
fn body() -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(read_limited)
}

async fn read_limited(
    length: Option<u64>,
    stream: impl Stream<Item = Result<impl Buf, warp::Error>>,
) -> Result<Bytes, Rejection> {
    let too_large = || {
        warp::reject::custom(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {BODY_LIMIT} bytes"),
        ))
    };
    if length.is_some_and(|length| length > BODY_LIMIT) {
        return Err(too_large());
    }
    let read = async {
        let mut stream = std::pin::pin!(stream);
        let mut body = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| {
                Problem::reject(Error::InvalidRequest("the request body was cut off".into()))
            })?;
            if (body.len() + chunk.remaining()) as u64 > BODY_LIMIT {
                return Err(too_large());
            }
            body.put(chunk);
        }
        Ok(body.freeze())
    };
    // A client trickling its body must not hold a connection slot for long.
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(warp::reject::custom(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body did not arrive within {BODY_READ_TIMEOUT:?}"),
            )))
        })
}

/// The raw `Authorization` header; the handler decides what a valid one is. A header that is not
/// even text counts as absent, so that it ends in the same 401 as a missing one.
pub(super) fn bearer() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .or_else(|_| async { Ok::<_, Rejection>((None,)) })
}
