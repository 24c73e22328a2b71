//! Signed access tokens over HTTP: `POST /v1/token` mints one for a session, and
//! `GET /.well-known/jwks.json` publishes the keys that verify them. While signed tokens are off
//! (`WXBROKER_ACCESS_TOKEN_TTL=0`) both answer 404, as routes that do not exist.

use warp::http::StatusCode;
use warp::http::header::{CACHE_CONTROL, HeaderValue};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::filters::{bearer, get, with_broker};
use super::handlers::bearer_token;
use super::problem::{Problem, json};
use crate::Broker;

/// How long a cache may keep the JWKS. Our verifiers fetch it themselves (and again at once for
/// an unknown `kid`); a cache in between delays a new key by at most this much.
const JWKS_MAX_AGE_SECS: u64 = 60;

/// The access-token routes.
pub(super) fn routes(
    broker: Broker,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    token(broker.clone()).or(jwks(broker)).unify()
}

/// POST /v1/token with `Authorization: Bearer TOKEN`: a fresh access token
fn token(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("v1" / "token")
        .and(signing(broker.clone()))
        .and(warp::post())
        .and(bearer())
        .and(with_broker(broker))
        .and_then(|authorization: Option<String>, broker: Broker| async move {
            let token = bearer_token(authorization.as_deref())?;
            let access = broker.access_token(token).await.map_err(Problem::reject)?;
            Ok::<_, Rejection>(json(
                StatusCode::OK,
                &serde_json::json!({
                    "accessToken": access.token,
                    "accessTokenExpiresIn": access.expires_in,
                }),
            ))
        })
}

/// GET /.well-known/jwks.json: the public keys of access tokens
fn jwks(broker: Broker) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!(".well-known" / "jwks.json")
        .and(signing(broker.clone()))
        .and(get())
        .and(with_broker(broker))
        .and_then(|broker: Broker| async move {
            let keys = broker.jwks().await.map_err(Problem::reject)?;
            let mut response = warp::reply::json(&keys).into_response();
            let cache = format!("public, max-age={JWKS_MAX_AGE_SECS}");
            response.headers_mut().insert(
                CACHE_CONTROL,
                HeaderValue::from_str(&cache).expect("a header value"),
            );
            Ok::<_, Rejection>(response)
        })
}

/// Passes while the broker signs access tokens; otherwise the route does not exist.
pub(super) fn signing(broker: Broker) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::any()
        .and_then(move || {
            let on = broker.signs_access_tokens();
            async move {
                if on {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            }
        })
        .untuple_one()
}
