//! The sandbox's server APIs: access tokens (`cgi-bin/stable_token`, `cgi-bin/token`), phone
//! numbers by code (`wxa/business/getuserphonenumber`), and the session_key check and reset
//! (`wxa/checksession`, `wxa/resetusersessionkey`), with WeChat's wire formats and errcodes.
//!
//! Phone codes: `13800138000` or `13800138000.anything` gives that number (1 to 20 digits), each
//! code once; `errNNNNN` answers that errcode, with an errmsg that echoes the access_token (WeChat's
//! errmsg has been seen to echo request parameters, so the broker must scrub them from its logs).
//! `GET /sandbox/phonecode?phone=DIGITS` makes a fresh code, as the phone-number button would.
//!
//! Signatures are checked with HMAC-SHA256 computed here, not with the broker's own function, so
//! that a wrong signing rule in the broker fails the tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::{SANDBOX_APPIDS, SandboxState, random_bytes, watermark, wechat_error};

/// What the sandbox knows about access tokens and phone codes.
#[derive(Default)]
pub(super) struct ServerApiState {
    tokens: Mutex<Tokens>,
    /// Token requests answered, errors included.
    pub(super) token_requests: AtomicU64,
    /// `getuserphonenumber` requests answered, errors included.
    pub(super) phone_requests: AtomicU64,
    /// `checksession` requests answered, errors included.
    pub(super) checksession_requests: AtomicU64,
    /// How many of the next requests to each token endpoint answer HTTP 500.
    failures: Mutex<Failures>,
    used_phone_codes: Mutex<HashSet<String>>,
}

#[derive(Default)]
struct Tokens {
    /// Per app: what `stable_token` gives without `force_refresh`, valid or not.
    stable: HashMap<&'static str, String>,
    /// Every token that WeChat would accept now, and the app it was issued to.
    valid: HashMap<String, &'static str>,
    /// Every token ever issued, for tests that look for them where they must not be.
    issued: Vec<String>,
}

#[derive(Default)]
pub(super) struct Failures {
    pub(super) stable_token: u32,
    pub(super) token: u32,
}

impl ServerApiState {
    /// Makes every token issued so far stale (40001), as when WeChat drops them early.
    /// `stable_token` keeps answering the stale one until asked with `force_refresh`.
    pub(super) fn invalidate_tokens(&self) {
        self.tokens.lock().expect("sandbox lock").valid.clear();
    }

    /// Every access_token issued so far, valid or not.
    pub(super) fn issued_tokens(&self) -> Vec<String> {
        self.tokens.lock().expect("sandbox lock").issued.clone()
    }

    /// The next `stable_token` and `token` requests fail with HTTP 500, this many of each.
    pub(super) fn fail_token_requests(&self, stable_token: u32, token: u32) {
        *self.failures.lock().expect("sandbox lock") = Failures {
            stable_token,
            token,
        };
    }

    fn issue(&self, tokens: &mut Tokens, appid: &'static str) -> String {
        let token = URL_SAFE_NO_PAD.encode(random_bytes::<48>());
        tokens.valid.insert(token.clone(), appid);
        tokens.issued.push(token.clone());
        token
    }

    /// WeChat's answer to an API call with an access_token it does not accept (now), if so.
    /// The app `token` was issued to, or WeChat's answer to a token it does not hold.
    fn token_app(&self, token: &str) -> Result<&'static str, Value> {
        let tokens = self.tokens.lock().expect("sandbox lock");
        let app = tokens.valid.get(token).copied();
        app.ok_or_else(|| wechat_error(40001, "invalid credential, access_token is invalid"))
    }

    fn take_failure(&self, pick: impl FnOnce(&mut Failures) -> &mut u32) -> bool {
        let mut failures = self.failures.lock().expect("sandbox lock");
        let left = pick(&mut failures);
        let fail = *left > 0;
        *left = left.saturating_sub(1);
        fail
    }
}

/// Every server API route.
pub(super) fn routes(state: Arc<SandboxState>) -> BoxedFilter<(Response,)> {
    let s = state.clone();
    let stable_token = warp::path!("cgi-bin" / "stable_token")
        .and(warp::post())
        .and(warp::body::content_length_limit(4096))
        .and(warp::body::json::<Value>())
        .then(move |body: Value| {
            let state = s.clone();
            async move { answer(&state, |state| stable_token_reply(state, &body)).await }
        });
    let s = state.clone();
    let token = warp::path!("cgi-bin" / "token")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .then(move |query: HashMap<String, String>| {
            let state = s.clone();
            async move { answer(&state, |state| token_reply(state, &query)).await }
        });
    let s = state.clone();
    let phone = warp::path!("wxa" / "business" / "getuserphonenumber")
        .and(warp::post())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::body::content_length_limit(4096))
        .and(warp::body::json::<Value>())
        .then(move |query: HashMap<String, String>, body: Value| {
            let state = s.clone();
            async move { answer(&state, |state| phone_reply(state, &query, &body)).await }
        });
    let s = state.clone();
    let session_key = warp::path!("wxa" / String)
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and_then(move |api: String, query: HashMap<String, String>| {
            let state = s.clone();
            async move {
                let reset = match api.as_str() {
                    "checksession" => false,
                    "resetusersessionkey" => true,
                    _ => return Err(warp::reject::not_found()),
                };
                Ok(answer(&state, |state| session_key_reply(state, &query, reset)).await)
            }
        });
    stable_token
        .or(token)
        .unify()
        .or(phone)
        .unify()
        .or(session_key)
        .unify()
        .boxed()
}

/// `GET /sandbox/phonecode?phone=DIGITS`: a fresh phone code, as the phone-number button gives.
pub(super) fn phone_code_route() -> BoxedFilter<(Response,)> {
    warp::path!("sandbox" / "phonecode")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .map(|query: HashMap<String, String>| {
            let phone = query
                .get("phone")
                .map(String::as_str)
                .unwrap_or(super::SANDBOX_PHONE);
            if !super::is_phone(phone) {
                return super::bad_phone();
            }
            let nonce = URL_SAFE_NO_PAD.encode(random_bytes::<9>());
            warp::reply::json(&json!({ "code": format!("{phone}.{nonce}") })).into_response()
        })
        .boxed()
}

/// The answer `reply` makes, after the sandbox's latency; `None` means HTTP 500.
async fn answer(
    state: &SandboxState,
    reply: impl FnOnce(&SandboxState) -> Option<Value>,
) -> Response {
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    match reply(state) {
        Some(body) => super::text_json(&body),
        None => warp::reply::with_status(
            "internal error",
            warp::http::StatusCode::INTERNAL_SERVER_ERROR,
        )
        .into_response(),
    }
}

/// The credentials check of both token endpoints: the app they name, or WeChat's errcode.
fn credentials_app(state: &SandboxState, appid: &str, secret: &str) -> Result<&'static str, Value> {
    let Some(app) = SANDBOX_APPIDS.iter().position(|app| *app == appid) else {
        return Err(wechat_error(40013, "invalid appid"));
    };
    if secret != state.secrets[app] {
        return Err(wechat_error(
            40001,
            "invalid credential, access_token is invalid",
        ));
    }
    Ok(SANDBOX_APPIDS[app])
}

fn stable_token_reply(state: &SandboxState, body: &Value) -> Option<Value> {
    let api = &state.server_api;
    api.token_requests.fetch_add(1, Ordering::Relaxed);
    if api.take_failure(|f| &mut f.stable_token) {
        return None;
    }
    let field = |name: &str| body[name].as_str().unwrap_or("");
    if field("grant_type") != "client_credential" {
        return Some(wechat_error(40002, "invalid grant_type"));
    }
    let app = match credentials_app(state, field("appid"), field("secret")) {
        Ok(app) => app,
        Err(error) => return Some(error),
    };
    let force = body["force_refresh"].as_bool().unwrap_or(false);
    let mut tokens = api.tokens.lock().expect("sandbox lock");
    let token = match tokens.stable.get(app).cloned() {
        Some(token) if !force => token,
        _ => {
            let token = api.issue(&mut tokens, app);
            tokens.stable.insert(app, token.clone());
            token
        }
    };
    Some(json!({ "access_token": token, "expires_in": state.access_token_lifetime.as_secs() }))
}

fn token_reply(state: &SandboxState, query: &HashMap<String, String>) -> Option<Value> {
    let api = &state.server_api;
    api.token_requests.fetch_add(1, Ordering::Relaxed);
    if api.take_failure(|f| &mut f.token) {
        return None;
    }
    let param = |name: &str| query.get(name).map(String::as_str).unwrap_or("");
    if param("grant_type") != "client_credential" {
        return Some(wechat_error(40002, "invalid grant_type"));
    }
    let app = match credentials_app(state, param("appid"), param("secret")) {
        Ok(app) => app,
        Err(error) => return Some(error),
    };
    let token = api.issue(&mut api.tokens.lock().expect("sandbox lock"), app);
    Some(json!({ "access_token": token, "expires_in": state.access_token_lifetime.as_secs() }))
}

fn phone_reply(
    state: &SandboxState,
    query: &HashMap<String, String>,
    body: &Value,
) -> Option<Value> {
    let api = &state.server_api;
    api.phone_requests.fetch_add(1, Ordering::Relaxed);
    let token = query.get("access_token").map(String::as_str).unwrap_or("");
    let app = match api.token_app(token) {
        Ok(app) => app,
        Err(error) => return Some(error),
    };
    let code = body["code"].as_str().unwrap_or("");
    let number = code.split('.').next().unwrap_or("");
    if let Some(errcode) = number
        .strip_prefix("err")
        .and_then(|n| n.parse::<i64>().ok())
    {
        let errmsg = format!("{} (access_token={token})", super::errmsg(errcode));
        return Some(wechat_error(errcode, &errmsg));
    }
    let fresh = api
        .used_phone_codes
        .lock()
        .expect("sandbox lock")
        .insert(code.to_owned());
    if !super::is_phone(number) || !fresh {
        return Some(wechat_error(40029, "invalid code"));
    }
    Some(json!({
        "errcode": 0,
        "errmsg": "ok",
        "phone_info": {
            "phoneNumber": number,
            "purePhoneNumber": number,
            "countryCode": "86",
            "watermark": watermark(app),
        },
    }))
}

fn session_key_reply(
    state: &SandboxState,
    query: &HashMap<String, String>,
    reset: bool,
) -> Option<Value> {
    if !reset {
        let checks = &state.server_api.checksession_requests;
        checks.fetch_add(1, Ordering::Relaxed);
    }
    let param = |name: &str| query.get(name).map(String::as_str).unwrap_or("");
    let app = match state.server_api.token_app(param("access_token")) {
        Ok(app) => app,
        Err(error) => return Some(error),
    };
    if param("sig_method") != "hmac_sha256" {
        return Some(wechat_error(87009, "invalid signature"));
    }
    let openid = param("openid");
    let mut logins = state.logins.lock().expect("sandbox lock");
    // An openid is an app's own: another app's token does not know it.
    let Some(login) = logins.get_mut(openid).filter(|login| login.appid == app) else {
        return Some(wechat_error(40003, "invalid openid"));
    };
    if param("signature") != signature(&login.session_key) {
        return Some(wechat_error(87009, "invalid signature"));
    }
    if !reset {
        return Some(json!({ "errcode": 0, "errmsg": "ok" }));
    }
    login.session_key = STANDARD.encode(random_bytes::<16>());
    Some(json!({
        "errcode": 0,
        "errmsg": "ok",
        "openid": openid,
        "session_key": login.session_key,
    }))
}

/// WeChat's session_key signature: lowercase hex of HMAC-SHA256 keyed with the session_key
/// string's bytes, over an empty message.
fn signature(session_key: &str) -> String {
    let mac = Hmac::<Sha256>::new_from_slice(session_key.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_signature_matches_wechats_documented_example() {
        assert_eq!(
            super::signature("tiihtNczf5v6AKRyjwEUhQ=="),
            "7154f9f8b4b76b92f541cbf0e37d48840fa06e5e42da92a6f80168a1516a4735"
        );
    }
}
