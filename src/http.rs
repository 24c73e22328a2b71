//! The warp front end: turns HTTP requests into broker calls and broker results into JSON.
//!
//! - `filters`: one function per public route; [`routes`] joins them and the admin's.
//! - `handlers`: the async handlers and the JSON bodies they answer.
//! - `problem`: the one mapping from errors and rejections to a status and a JSON error body.
//! - `rate_limit`: the per-client-IP login limit.
//! - `admin`: the admin routes behind their own bearer secret.
//! - `tokens`: signed access tokens (`POST /v1/token`) and their keys (the JWKS).
//! - `revocations`: the revocation feed for edge verifiers, behind its own bearer secret.

mod admin;
mod filters;
mod handlers;
mod problem;
mod rate_limit;
mod revocations;
mod tokens;

use std::convert::Infallible;

use warp::reply::Response;
use warp::{Filter, Reply};

use crate::Broker;

pub use filters::require_session;
pub(crate) use handlers::bearer_token;
pub(crate) use problem::Problem;
pub use problem::recover;
pub(crate) use problem::too_many_connections;

/// Every route of the broker, with errors turned into JSON (and `Allow` on a 405).
pub fn routes(broker: Broker) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let routes = filters::public(broker.clone())
        .or(tokens::routes(broker.clone()))
        .or(revocations::route(broker.clone()))
        .or(admin::routes(broker))
        .recover(problem::recover)
        .map(Reply::into_response);
    problem::with_allow(routes)
}
