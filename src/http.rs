//! The warp front end: turns HTTP requests into broker calls and broker results into JSON.
//!
//! - `filters`: one function per route, and [`routes`] that joins them.
//! - `handlers`: the async handlers and the JSON bodies they answer.
//! - `problem`: the one mapping from errors and rejections to a status and a JSON error body.
//! - `rate_limit`: the per-client-IP login limit.
//! - `admin`: the admin routes behind their own bearer secret.

mod admin;
mod filters;
mod handlers;
mod problem;
mod rate_limit;

pub use filters::{require_session, routes};
pub use problem::recover;
