//! The handlers: parse what the filters extracted, call the broker, answer JSON.

use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use warp::http::StatusCode;
use warp::http::header::{self, HeaderValue};
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::problem::{Problem, json};
use crate::{Broker, EncryptedData, Error, SessionInfo, User};

/// The `X-Wx-Appid` value of each app the broker serves, made once: the forward-auth answer
/// copies one instead of building it per request.
pub struct AppHeaders(Vec<(Arc<str>, HeaderValue)>);

impl AppHeaders {
    /// The headers of `broker`'s apps (an appid that cannot be a header value is left out).
    pub fn of(broker: &Broker) -> AppHeaders {
        let apps = broker.appids().filter_map(|appid| {
            let value = HeaderValue::from_str(appid).ok()?;
            Some((Arc::from(appid), value))
        });
        AppHeaders(apps.collect())
    }

    /// The header of `appid`, if it is one of the broker's apps.
    fn header(&self, appid: &str) -> Option<HeaderValue> {
        let mut apps = self.0.iter();
        apps.find(|(app, _)| &**app == appid)
            .map(|(_, value)| value.clone())
    }
}

/// Longest appid a login may name (as `src/openapi.json` bounds it; WeChat's are 18).
const MAX_APPID_LEN: usize = 64;

/// The login request, as JSON or as a form.
#[derive(Deserialize)]
struct LoginRequest {
    code: String,
    /// The mini program the code is from; the default app without it.
    appid: Option<String>,
}

/// The login answer: the token and what the client may want to know about it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoginReply {
    third_session: String,
    expires_in: u64,
    is_new: bool,
    uid: u64,
    /// The signed access token for edge verifiers, while they are on.
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token_expires_in: Option<u64>,
}

pub async fn login(
    content_type: Option<String>,
    body: Bytes,
    broker: Broker,
) -> Result<Response, Rejection> {
    let LoginRequest { code, appid } =
        parse_body(content_type.as_deref(), &body, r#"{"code": "..."}"#)?;
    if let Some(appid) = &appid
        && !(1..=MAX_APPID_LEN).contains(&appid.len())
    {
        return Err(Problem::reject(Error::InvalidRequest(format!(
            "appid must be 1 to {MAX_APPID_LEN} characters"
        ))));
    }
    let login = broker
        .login_to(appid.as_deref(), &code)
        .await
        .map_err(Problem::reject)?;
    let (access_token, access_token_expires_in) = match login.access_token {
        Some(access) => (Some(access.token), Some(access.expires_in)),
        None => (None, None),
    };
    Ok(json(
        StatusCode::OK,
        &LoginReply {
            third_session: login.token,
            expires_in: login.expires_in,
            is_new: login.is_new,
            uid: login.uid,
            access_token,
            access_token_expires_in,
        },
    ))
}

/// The query of `/v1/session`.
#[derive(Deserialize)]
struct SessionQuery {
    verify: Option<String>,
}

/// The `/v1/session?verify=wechat` answer: the session, and that WeChat accepts its key.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VerifiedSession {
    #[serde(flatten)]
    session: SessionInfo,
    session_key_valid: bool,
}

pub async fn session(
    query: Option<String>,
    authorization: Option<String>,
    broker: Broker,
) -> Result<Response, Rejection> {
    let token = bearer_token(authorization.as_deref())?;
    let query: SessionQuery = match query {
        // The plain check is the hot path: it parses no query.
        None => SessionQuery { verify: None },
        Some(query) => serde_urlencoded::from_str(&query).map_err(|e| {
            Problem::reject(Error::InvalidRequest(format!("bad query string: {e}")))
        })?,
    };
    match query.verify.as_deref() {
        None => {
            let session = broker.check_session(token).await.map_err(Problem::reject)?;
            Ok(json(StatusCode::OK, &session))
        }
        Some("wechat") => {
            let session = broker
                .verify_session_key(token)
                .await
                .map_err(Problem::reject)?;
            Ok(json(
                StatusCode::OK,
                &VerifiedSession {
                    session,
                    session_key_valid: true,
                },
            ))
        }
        Some(_) => Err(Problem::reject(Error::InvalidRequest(
            "verify takes one value: wechat".into(),
        ))),
    }
}

/// The forward-auth answer: 200 with who the user is in headers, or 401 with a challenge; no body
/// either way, as proxies copy headers, not JSON. A broker that cannot answer still says why in
/// JSON (a 5xx), which the proxy turns into its own error rather than a login prompt.
pub async fn auth(
    authorization: Option<String>,
    broker: Broker,
    apps: Arc<AppHeaders>,
) -> Result<Response, Rejection> {
    let challenge = || {
        let mut response = StatusCode::UNAUTHORIZED.into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Ok(response)
    };
    let Some(token) = bearer_value(authorization.as_deref()) else {
        return challenge();
    };
    let session = match broker.check_session(token).await {
        Ok(session) => session,
        Err(Error::InvalidSession) => return challenge(),
        Err(err) => return Err(Problem::reject(err)),
    };
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert("x-wx-uid", HeaderValue::from(session.uid));
    if let Some(appid) = apps.header(&session.appid) {
        headers.insert("x-wx-appid", appid);
    }
    // WeChat's ids are ASCII; one that is not could not travel in a header, so it is left out.
    if let Ok(openid) = HeaderValue::try_from(session.openid) {
        headers.insert("x-wx-openid", openid);
    }
    if let Some(Ok(unionid)) = session.unionid.map(HeaderValue::try_from) {
        headers.insert("x-wx-unionid", unionid);
    }
    Ok(response)
}

pub async fn logout(authorization: Option<String>, broker: Broker) -> Result<Response, Rejection> {
    let token = bearer_token(authorization.as_deref())?;
    broker.logout(token).await.map_err(Problem::reject)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn userinfo(
    authorization: Option<String>,
    content_type: Option<String>,
    body: Bytes,
    broker: Broker,
) -> Result<Response, Rejection> {
    let token = bearer_token(authorization.as_deref())?;
    let data: EncryptedData = parse_body(content_type.as_deref(), &body, ENCRYPTED_SHAPE)?;
    let profile = broker
        .userinfo(token, data)
        .await
        .map_err(Problem::reject)?;
    Ok(json(StatusCode::OK, &profile))
}

pub async fn phone(
    authorization: Option<String>,
    content_type: Option<String>,
    body: Bytes,
    broker: Broker,
) -> Result<Response, Rejection> {
    let token = bearer_token(authorization.as_deref())?;
    let request: PhoneRequest = parse_body(content_type.as_deref(), &body, PHONE_SHAPE)?;
    // Mini programs often post the button's whole `e.detail`, which in newer base libraries
    // carries the code and the encrypted form both: the code needs no session_key, so it wins.
    let phone = match request {
        PhoneRequest {
            code: Some(code), ..
        } => broker.phone_by_code(token, &code).await,
        PhoneRequest {
            code: None,
            encrypted_data: Some(encrypted_data),
            iv: Some(iv),
        } => {
            let data = EncryptedData {
                encrypted_data,
                iv,
                raw_data: None,
                signature: None,
            };
            broker.phone(token, data).await
        }
        _ => Err(Error::InvalidRequest(format!(
            "expected a body {PHONE_SHAPE}"
        ))),
    };
    Ok(json(StatusCode::OK, &phone.map_err(Problem::reject)?))
}

pub async fn me(authorization: Option<String>, broker: Broker) -> Result<Response, Rejection> {
    let token = bearer_token(authorization.as_deref())?;
    let user: User = broker.me(token).await.map_err(Problem::reject)?;
    Ok(json(StatusCode::OK, &user))
}

const ENCRYPTED_SHAPE: &str = r#"{"encryptedData": "...", "iv": "..."}"#;

/// The phone request: a code from the phone-number button, or the older encrypted form; the code
/// when both are there. Other fields (`errMsg`, `cloudID` of `e.detail`) are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PhoneRequest {
    code: Option<String>,
    encrypted_data: Option<String>,
    iv: Option<String>,
}

const PHONE_SHAPE: &str = r#"{"code": "..."} or {"encryptedData": "...", "iv": "..."}"#;

pub fn healthz(broker: Broker) -> Response {
    if broker.is_ready() {
        json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
    } else {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the broker is starting, restarting an actor or shutting down",
        )
        .into_response()
    }
}

pub async fn readyz(broker: Broker) -> Result<Response, Rejection> {
    Ok(if broker.is_ready() && broker.store_answers().await {
        json(StatusCode::OK, &serde_json::json!({ "status": "ready" }))
    } else {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "an actor is not running or the store does not answer",
        )
        .into_response()
    })
}

/// A JSON body (also when no Content-Type is given) or a form body, of the given `shape`.
fn parse_body<T: DeserializeOwned>(
    content_type: Option<&str>,
    body: &[u8],
    shape: &str,
) -> Result<T, Rejection> {
    let media = content_type.map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    // `curl -d '{...}'` sends JSON labelled as a form: say what to change.
    let hint = if body.trim_ascii_start().starts_with(b"{") {
        "; the body looks like JSON: send it with `Content-Type: application/json`"
    } else {
        ""
    };
    let parsed = match media.as_deref() {
        None | Some("application/json") => serde_json::from_slice::<T>(body)
            .map_err(|e| format!("expected a JSON body {shape}: {e}")),
        Some("application/x-www-form-urlencoded") => serde_urlencoded::from_bytes::<T>(body)
            .map_err(|e| format!("expected a form body with the fields of {shape}: {e}{hint}")),
        Some(_) => {
            return Err(warp::reject::custom(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("send application/json or application/x-www-form-urlencoded{hint}"),
            )));
        }
    };
    parsed.map_err(|message| Problem::reject(Error::InvalidRequest(message)))
}

/// The token of an `Authorization: Bearer TOKEN` header; anything else is an invalid session.
pub fn bearer_token(header: Option<&str>) -> Result<&str, Rejection> {
    bearer_value(header).ok_or_else(|| Problem::reject(Error::InvalidSession))
}

/// The token of an `Authorization: Bearer TOKEN` header, if that is what it is.
fn bearer_value(header: Option<&str>) -> Option<&str> {
    header
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..200),
            content_type in proptest::option::of(prop_oneof![
                Just("application/json".to_owned()),
                Just("application/x-www-form-urlencoded; charset=utf-8".to_owned()),
                ".{0,30}",
            ]),
        ) {
            let _ = parse_body::<LoginRequest>(content_type.as_deref(), &body, "{}");
            let _ = parse_body::<EncryptedData>(content_type.as_deref(), &body, "{}");
        }

        #[test]
        fn arbitrary_authorization_headers_never_panic(header in proptest::option::of(".{0,80}")) {
            if let Ok(token) = bearer_token(header.as_deref()) {
                prop_assert!(header.as_deref().unwrap_or("").to_ascii_lowercase().starts_with("bearer "));
                prop_assert_eq!(token, token.trim());
            }
        }
    }

    #[test]
    fn login_bodies_as_json_or_form() {
        let json: LoginRequest = parse_body(None, br#"{"code":"a1"}"#, "").unwrap();
        let form: LoginRequest =
            parse_body(Some("application/x-www-form-urlencoded"), b"code=a%2B1", "").unwrap();
        assert_eq!((json.code.as_str(), form.code.as_str()), ("a1", "a+1"));
        assert!(parse_body::<LoginRequest>(Some("text/plain"), b"code=a", "").is_err());
    }

    #[test]
    fn a_phone_buttons_whole_detail_parses() {
        let detail = br#"{"errMsg":"getPhoneNumber:ok","code":"c1","encryptedData":"AAAA","iv":"BBBB","cloudID":"x"}"#;
        let request: PhoneRequest = parse_body(None, detail, "").unwrap();
        assert_eq!(request.code.as_deref(), Some("c1"));
        assert_eq!(request.iv.as_deref(), Some("BBBB"));
    }
}
