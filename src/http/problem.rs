//! Errors as HTTP answers: every failure becomes a status and `{"error", "message"}`.
//!
//! [`Problem::from_error`] is the one place that decides the status and code of each [`Error`]
//! (with its one exception beside it, [`Problem::reject_reset`]); [`recover`] does the same for
//! warp's own rejections (unknown route, wrong method, ...). A 5xx answer never carries internal
//! detail: the cause is logged here instead. [`with_allow`] finishes what RFC 9110 asks of the
//! methods a route does not serve: `Allow` on every 405, and `OPTIONS` answered.

use std::convert::Infallible;
use std::sync::LazyLock;

use serde::Serialize;
use warp::filters::path::FullPath;
use warp::http::header::{
    ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE,
};
use warp::http::{Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::Error;

/// An error answer in the making.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    /// Tells the client to call `wx.login` again and resend (the session_key rotated).
    relogin: bool,
}

impl warp::reject::Reject for Problem {}

/// The JSON body of every error.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    relogin: bool,
}

impl Problem {
    /// A problem with a fixed status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Problem {
        Problem {
            status,
            code,
            message: message.into(),
            retry_after: None,
            relogin: false,
        }
    }

    /// Adds a `Retry-After` header of `secs`.
    pub fn with_retry_after(mut self, secs: u64) -> Problem {
        self.retry_after = Some(secs);
        self
    }

    /// Rejects the request with the answer for `err`.
    pub fn reject(err: Error) -> Rejection {
        warp::reject::custom(Problem::from_error(&err))
    }

    /// Rejects a failed admin reset of a session_key. A key WeChat no longer accepts is a 409
    /// here, not the 401 it is for a user: a 401 would read as a wrong admin token.
    pub fn reject_reset(err: Error) -> Rejection {
        match err {
            Error::SessionKeyExpired => warp::reject::custom(Problem::new(
                StatusCode::CONFLICT,
                err.code(),
                "WeChat no longer accepts the stored session_key, so it cannot be reset; the \
                 user's next login stores a current one",
            )),
            other => Problem::reject(other),
        }
    }

    /// The status, error code and client-facing message for each error.
    pub fn from_error(err: &Error) -> Problem {
        use StatusCode as S;
        let (status, message) = match err {
            Error::InvalidRequest(detail) => (S::BAD_REQUEST, detail.clone()),
            Error::UnknownApp => (
                S::BAD_REQUEST,
                "this broker does not serve the appid given; send one of its mini programs' \
                 appids, or none for the default app"
                    .into(),
            ),
            Error::InvalidCode => (
                S::UNAUTHORIZED,
                "the login code is invalid; call wx.login again".into(),
            ),
            Error::CodeUsed => (
                S::UNAUTHORIZED,
                "the login code was already used; call wx.login again".into(),
            ),
            Error::RateLimited { retry_after_secs } => (
                S::TOO_MANY_REQUESTS,
                format!(
                    "this user's quota of calls to WeChat is spent; retry in \
                     {retry_after_secs} seconds"
                ),
            ),
            Error::RiskyUser => (
                S::FORBIDDEN,
                "WeChat blocked this login as high-risk".into(),
            ),
            Error::UpstreamBusy => (
                S::SERVICE_UNAVAILABLE,
                "WeChat is busy; retry in a moment".into(),
            ),
            Error::UpstreamTimeout => (
                S::GATEWAY_TIMEOUT,
                "WeChat did not answer in time; retry in a moment".into(),
            ),
            Error::Upstream(_) | Error::AccessTokenStale(_) | Error::CredentialsRejected { .. } => {
                (
                    S::BAD_GATEWAY,
                    "WeChat answered in a way the broker cannot use".into(),
                )
            }
            Error::InvalidPhoneCode => (
                S::BAD_REQUEST,
                "the phone-number code is invalid or was already used; ask the user to tap the \
                 phone-number button again"
                    .into(),
            ),
            Error::SessionKeyExpired => (
                S::UNAUTHORIZED,
                "WeChat no longer accepts this user's session_key (wx.login was called again \
                 without logging in here); log in again"
                    .into(),
            ),
            Error::InvalidSession => (
                S::UNAUTHORIZED,
                "the session is missing, invalid or expired; log in again".into(),
            ),
            Error::DecryptFailed => (
                S::UNPROCESSABLE_ENTITY,
                "the data could not be decrypted: most likely the session_key rotated because \
                 wx.login was called again after the data was obtained; log in again, then get \
                 and send the data again"
                    .into(),
            ),
            Error::WatermarkMismatch => (
                S::FORBIDDEN,
                "the data was made for another mini program (watermark.appid differs)".into(),
            ),
            Error::OpenidMismatch => (
                S::FORBIDDEN,
                "the data belongs to another user than this session's".into(),
            ),
            Error::SignatureMismatch => (
                S::FORBIDDEN,
                "signature does not match rawData under the current session_key".into(),
            ),
            Error::UnionidConflict => (
                S::CONFLICT,
                "the data's unionId belongs to another user, or differs from the unionid this \
                 user already has; nothing was stored"
                    .into(),
            ),
            Error::Unavailable(_) => (
                S::SERVICE_UNAVAILABLE,
                "the broker is temporarily unavailable; retry in a moment".into(),
            ),
            Error::Config(_) | Error::Storage(_) => (
                S::INTERNAL_SERVER_ERROR,
                "the broker failed; the cause is in its log".into(),
            ),
        };
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), cause = %err, "request failed");
        }
        let retry_after = match err {
            Error::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            Error::UpstreamBusy => Some(1),
            _ => None,
        };
        Problem {
            retry_after,
            relogin: matches!(err, Error::DecryptFailed | Error::SessionKeyExpired),
            ..Problem::new(status, err.code(), message)
        }
    }
}

impl Reply for Problem {
    fn into_response(self) -> Response {
        let mut response = json(
            self.status,
            &ErrorBody {
                error: self.code,
                message: &self.message,
                relogin: self.relogin,
            },
        );
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The answer to a connection refused because its client address already holds
/// `WXBROKER_MAX_CONNECTIONS_PER_IP` connections; the server closes the connection after it.
pub fn too_many_connections() -> Response {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections",
        "this address holds as many connections as the broker allows one client; reuse one of \
         them, or retry once one is closed",
    )
    .with_retry_after(1)
    .into_response()
}

/// A JSON answer that no cache keeps (it may carry a token). It ends with a newline, as a text
/// document does: `curl` leaves the prompt on its own line, and line tools read the last line.
pub fn json(status: StatusCode, body: &impl Serialize) -> Response {
    let mut text = match serde_json::to_vec(body) {
        Ok(text) => text,
        // Our answer types always serialize; if one ever did not, say so without a body.
        Err(err) => {
            tracing::error!(error = %err, "an answer did not serialize");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    text.push(b'\n');
    let mut response = Response::new(text.into());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Turns every rejection, ours and warp's, into a JSON error answer.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    use StatusCode as S;
    let problem = if let Some(problem) = rejection.find::<Problem>() {
        problem.clone()
    } else if rejection.is_not_found() {
        Problem::new(S::NOT_FOUND, "not_found", "no such route")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        Problem::new(
            S::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    } else if rejection
        .find::<warp::reject::UnsupportedMediaType>()
        .is_some()
    {
        Problem::new(
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "unsupported Content-Type",
        )
    } else if rejection.find::<warp::reject::InvalidHeader>().is_some() {
        Problem::new(
            S::BAD_REQUEST,
            "invalid_request",
            "a request header is malformed",
        )
    } else {
        tracing::warn!(?rejection, "unhandled rejection");
        Problem::new(
            S::BAD_REQUEST,
            "invalid_request",
            "the request could not be handled",
        )
    };
    Ok(problem.into_response())
}

/// Adds to `routes` what RFC 9110 asks of the methods a path does not serve: every 405 names the
/// methods the path takes in `Allow`, and an `OPTIONS` request, which no route serves, is answered
/// 204 with that `Allow` wherever another method would have been 405 (behind the admin token, it
/// stays behind it). HEAD is served by every GET route itself.
pub fn with_allow<F>(routes: F) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone
where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    warp::method().and(warp::path::full()).and(routes).map(
        |method: Method, path: FullPath, response: Response| {
            if response.status() != StatusCode::METHOD_NOT_ALLOWED {
                return response;
            }
            let Some(allow) = allowed_methods(path.as_str()) else {
                return response;
            };
            let mut response = if method == Method::OPTIONS {
                StatusCode::NO_CONTENT.into_response()
            } else {
                response
            };
            response.headers_mut().insert(ALLOW, allow);
            response
        },
    )
}

/// The `Allow` value of each path of the OpenAPI document, which the conformance test holds to
/// the routes: its methods, HEAD beside GET, and OPTIONS.
static ALLOWED: LazyLock<Vec<(Vec<String>, HeaderValue)>> = LazyLock::new(|| {
    let document: serde_json::Value = serde_json::from_str(include_str!("../openapi.json"))
        .expect("the OpenAPI document is JSON");
    let paths = document["paths"]
        .as_object()
        .expect("the OpenAPI document has paths");
    paths
        .iter()
        .map(|(template, item)| {
            let methods: Vec<&str> = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
                .into_iter()
                .filter(|method| match *method {
                    "HEAD" => item.get("get").is_some(),
                    "OPTIONS" => true,
                    _ => item.get(method.to_ascii_lowercase()).is_some(),
                })
                .collect();
            let allow = HeaderValue::from_str(&methods.join(", ")).expect("method names are ASCII");
            (segments(template).map(str::to_owned).collect(), allow)
        })
        .collect()
});

/// The `Allow` value for a request `path`, if it falls under a documented path. A `{parameter}`
/// segment stands for any non-empty segment: the methods are the path's, whatever its value.
fn allowed_methods(path: &str) -> Option<HeaderValue> {
    let given: Vec<&str> = segments(path).collect();
    ALLOWED.iter().find_map(|(template, allow)| {
        let matches = template.len() == given.len()
            && template.iter().zip(&given).all(|(part, segment)| {
                part == segment || (part.starts_with('{') && !segment.is_empty())
            });
        matches.then(|| allow.clone())
    })
}

/// The segments of a path, without the one trailing slash warp's routes ignore.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let path = match path.strip_suffix('/') {
        Some(trimmed) if !trimmed.is_empty() => trimmed,
        _ => path,
    };
    path.split('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_names_the_methods_of_the_documented_path() {
        let allow = |path| allowed_methods(path).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(allow("/v1/login").as_deref(), Some("POST, OPTIONS"));
        assert_eq!(allow("/healthz/").as_deref(), Some("GET, HEAD, OPTIONS"));
        assert_eq!(
            allow("/admin/users/7/sessions").as_deref(),
            Some("GET, HEAD, DELETE, OPTIONS")
        );
        assert_eq!(allow("/admin/users//sessions"), None);
        assert_eq!(allow("/healthz//"), None);
        assert_eq!(allow("/v1/nothing"), None);
    }
}
