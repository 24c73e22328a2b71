//! A sandbox WeChat on loopback: the real wire formats of `code2Session` and the server APIs,
//! without WeChat.
//!
//! The binary starts it when no credentials are set; tests and newcomers use it to log in as
//! named users and to provoke every errcode. The code grammar:
//!
//! | code | answer |
//! |---|---|
//! | `alice`, `alice.2`, `alice.anything` | log in as user `alice`: same openid for every code, a fresh session_key each time |
//! | `alice.union.1` | the same, and the answer carries a unionid (as for a mini program bound to an Open Platform account) |
//! | `err40029.1`, `err-1.x`, `err45011`... | answers that errcode (never marked as used, so it can be sent again) |
//!
//! A name is 1 to 32 letters, digits or `_`. Each code works once; the same code again is
//! answered 40163 ("code been used"). Anything else is 40029 ("invalid code"). A wrong appid is
//! 40013 and a wrong secret 40125, as from WeChat. Bodies are JSON sent as `text/plain`.
//!
//! It serves two mini programs of one company, each with its own appid ([`SANDBOX_APPID`] and
//! [`SANDBOX_LITE_APPID`]) and secret: the same user gets a different openid in each, and the
//! same unionid (with `.union` codes), as WeChat does for apps bound to one Open Platform
//! account. A code is an app's own: `alice.1` may be used once through each.
//!
//! It also plays the WeChat client's part for encrypted user data, encrypting with the session_key
//! of the user's latest login, as `wx.getUserProfile` and the phone-number button would:
//!
//! - `GET /sandbox/userinfo?user=NAME[&appid=APPID]`: `{"encryptedData", "iv", "rawData",
//!   "signature"}`
//! - `GET /sandbox/phone?user=NAME[&phone=DIGITS][&appid=APPID]`: `{"encryptedData", "iv"}`
//!
//! (the user's data in that app, the default [`SANDBOX_APPID`]: its session_key and watermark)
//!
//! - `GET /sandbox/phonecode[?phone=DIGITS]`: `{"code"}` for `POST /v1/phone`
//!
//! The binary in sandbox mode serves these client routes on its own port too. The server APIs
//! behind an access_token (tokens, phone numbers by code, session_key check and reset) are in
//! [`server_api`].

mod server_api;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::Url;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::config::Secret;
use crate::crypto::{encrypt_for_client, raw_data_signature};
use crate::used_codes::UsedCodes;
use crate::{Config, EncryptedData, Error};

/// How long the sandbox refuses a code it exchanged, as WeChat does for a code's life.
const CODE_LIFETIME: Duration = Duration::from_secs(300);

/// The appid of the sandbox's first mini program: not a real one, so it can never be mistaken
/// for production.
pub const SANDBOX_APPID: &str = "wxsandbox0000000";

/// The appid of the sandbox's second mini program (a "lite" one of the same company).
pub const SANDBOX_LITE_APPID: &str = "wxsandbox0000001";

/// Both apps of the sandbox, the default first.
pub const SANDBOX_APPIDS: [&str; 2] = [SANDBOX_APPID, SANDBOX_LITE_APPID];

/// How the sandbox behaves.
#[derive(Clone, Debug, Default)]
pub struct SandboxOptions {
    /// Delay before every answer, to imitate WeChat's latency.
    pub latency: Duration,
    /// The `expires_in` of the access_tokens it issues; `None` is WeChat's 7200 s.
    pub access_token_lifetime: Option<Duration>,
}

/// A running sandbox WeChat. Stops when dropped.
pub struct Sandbox {
    addr: SocketAddr,
    state: Arc<SandboxState>,
    server: JoinHandle<()>,
}

struct SandboxState {
    /// The secret of each app of [`SANDBOX_APPIDS`], in that order.
    secrets: [String; 2],
    latency: Duration,
    access_token_lifetime: Duration,
    used_codes: Mutex<UsedCodes>,
    /// openid -> what the latest exchange for it told the broker.
    logins: Mutex<HashMap<String, SandboxLogin>>,
    exchanges: AtomicU64,
    server_api: server_api::ServerApiState,
}

/// What the sandbox last answered for a user, as the WeChat client would know it.
#[derive(Clone)]
struct SandboxLogin {
    /// The app the user logged in through.
    appid: &'static str,
    session_key: String,
    unionid: Option<String>,
}

/// The phone number the sandbox's phone button gives unless told another.
const SANDBOX_PHONE: &str = "13800138000";

impl Sandbox {
    /// Starts a sandbox on `127.0.0.1` on a free port, with a random secret.
    pub async fn start(options: SandboxOptions) -> Result<Sandbox, Error> {
        let state = Arc::new(SandboxState {
            secrets: [(); 2].map(|()| URL_SAFE_NO_PAD.encode(random_bytes::<24>())),
            latency: options.latency,
            access_token_lifetime: options
                .access_token_lifetime
                .unwrap_or(Duration::from_secs(7200)),
            used_codes: Mutex::new(UsedCodes::new(CODE_LIFETIME)),
            logins: Mutex::new(HashMap::new()),
            exchanges: AtomicU64::new(0),
            server_api: Default::default(),
        });
        // A login burst opens a connection per exchange at once: see `crate::bind`.
        let listener = crate::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| Error::Config(format!("cannot bind the sandbox WeChat: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("cannot bind the sandbox WeChat: {e}")))?;
        let route_state = state.clone();
        let code2session = warp::path!("sns" / "jscode2session")
            .and(warp::get())
            .and(warp::query::<HashMap<String, String>>())
            .then(move |query: HashMap<String, String>| {
                let state = route_state.clone();
                async move {
                    // Even a zero sleep waits for the timer's next millisecond tick.
                    if !state.latency.is_zero() {
                        tokio::time::sleep(state.latency).await;
                    }
                    text_json(&state.code2session(&query))
                }
            });
        let routes = code2session
            .or(server_api::routes(state.clone()))
            .unify()
            .or(client_routes(state.clone()))
            .unify();
        let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
        Ok(Sandbox {
            addr,
            state,
            server,
        })
    }

    /// The client-side routes (`/sandbox/userinfo`, `/sandbox/phone`), to mount beside the
    /// broker's own so that a newcomer finds them on the broker's port.
    pub fn client_routes(&self) -> BoxedFilter<(Response,)> {
        client_routes(self.state.clone())
    }

    /// `encryptedData` for `plaintext` under the session_key of `name`'s latest login, as the
    /// WeChat client would make it; `None` if `name` never logged in.
    pub fn encrypt_for(&self, name: &str, plaintext: &[u8]) -> Option<EncryptedData> {
        self.state.encrypt_for(SANDBOX_APPID, name, plaintext)
    }

    /// What `wx.getUserProfile` would give `name` now (signed `rawData` included).
    pub fn encrypted_profile(&self, name: &str) -> Option<EncryptedData> {
        self.state.encrypted_profile(SANDBOX_APPID, name)
    }

    /// What the phone-number button would give `name` now, for `phone` (digits).
    pub fn encrypted_phone(&self, name: &str, phone: &str) -> Option<EncryptedData> {
        self.state.encrypted_phone(SANDBOX_APPID, name, phone)
    }

    /// As [`Sandbox::encrypted_profile`], in the mini program `appid`: under the session_key
    /// of `name`'s latest login through it, with its watermark.
    pub fn encrypted_profile_in(&self, appid: &str, name: &str) -> Option<EncryptedData> {
        self.state.encrypted_profile(appid, name)
    }

    /// As [`Sandbox::encrypted_phone`], in the mini program `appid`.
    pub fn encrypted_phone_in(
        &self,
        appid: &str,
        name: &str,
        phone: &str,
    ) -> Option<EncryptedData> {
        self.state.encrypted_phone(appid, name, phone)
    }

    /// The base URL to use as `WECHAT_API_BASE`.
    pub fn url(&self) -> Url {
        Url::parse(&format!("http://{}/", self.addr)).expect("a socket address makes a URL")
    }

    /// The secret this sandbox accepts for [`SANDBOX_APPID`].
    pub fn secret(&self) -> Secret {
        Secret::new(self.state.secrets[0].clone())
    }

    /// The secret this sandbox accepts for `appid` (one of [`SANDBOX_APPIDS`]).
    pub fn secret_of(&self, appid: &str) -> Option<Secret> {
        let index = SANDBOX_APPIDS.iter().position(|app| *app == appid)?;
        Some(Secret::new(self.state.secrets[index].clone()))
    }

    /// Points `config` at this sandbox: its URL, and both apps (appid and secret):
    /// [`SANDBOX_APPID`] the default, [`SANDBOX_LITE_APPID`] in `apps`.
    pub fn configure(&self, config: &mut Config) {
        config.appid = Some(SANDBOX_APPID.to_owned());
        config.secret = Some(self.secret());
        config.apps = vec![crate::App {
            appid: SANDBOX_LITE_APPID.to_owned(),
            secret: Secret::new(self.state.secrets[1].clone()),
            name: Some("sandbox lite".into()),
        }];
        config.api_base = self.url();
    }

    /// How many code2Session requests the sandbox has answered, errors included.
    pub fn exchanges(&self) -> u64 {
        self.state.exchanges.load(Ordering::Relaxed)
    }

    /// How many access_token requests (`stable_token` and `token`) the sandbox has answered,
    /// errors included.
    pub fn token_requests(&self) -> u64 {
        self.state.server_api.token_requests.load(Ordering::Relaxed)
    }

    /// How many `getuserphonenumber` requests (phone numbers by code) the sandbox has answered,
    /// errors included.
    pub fn phone_number_requests(&self) -> u64 {
        self.state.server_api.phone_requests.load(Ordering::Relaxed)
    }

    /// How many `checksession` requests the sandbox has answered, errors included.
    pub fn checksession_requests(&self) -> u64 {
        let checks = &self.state.server_api.checksession_requests;
        checks.load(Ordering::Relaxed)
    }

    /// Makes every access_token issued so far stale (errcode 40001 from the APIs that take
    /// one), as when WeChat drops tokens before their time. As WeChat's `stable_token` would,
    /// it keeps answering the stale token until asked with `force_refresh`.
    pub fn invalidate_access_tokens(&self) {
        self.state.server_api.invalidate_tokens();
    }

    /// Every access_token the sandbox has issued, stale ones included: what must never show in
    /// the broker's logs or answers.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.state.server_api.issued_tokens()
    }

    /// The next `stable_token` and `cgi-bin/token` requests answer HTTP 500, this many of each.
    pub fn fail_token_requests(&self, stable_token: u32, token: u32) {
        self.state
            .server_api
            .fail_token_requests(stable_token, token);
    }

    /// Gives `name` a new session_key without telling the broker, as when the mini program calls
    /// `wx.login` again and never sends that code on. Returns whether `name` had logged in.
    pub fn rotate_session_key(&self, name: &str) -> bool {
        let mut logins = self.state.logins.lock().expect("sandbox lock");
        match logins.get_mut(&Sandbox::openid_of(name)) {
            Some(login) => {
                login.session_key = STANDARD.encode(random_bytes::<16>());
                true
            }
            None => false,
        }
    }

    /// The openid the sandbox gives the user `name` in [`SANDBOX_APPID`].
    pub fn openid_of(name: &str) -> String {
        derived_id('o', "openid", name)
    }

    /// The openid the sandbox gives the user `name` in the mini program `appid`.
    pub fn openid_in(appid: &str, name: &str) -> String {
        match appid {
            SANDBOX_APPID => Sandbox::openid_of(name),
            _ => derived_id('o', &format!("openid:{appid}"), name),
        }
    }

    /// The unionid the sandbox gives the user `name` (for codes with `.union`).
    pub fn unionid_of(name: &str) -> String {
        derived_id('u', "unionid", name)
    }

    /// The session_key of the latest exchange for `openid`, as WeChat's client would hold it.
    pub fn session_key(&self, openid: &str) -> Option<String> {
        self.state.login_of(openid).map(|login| login.session_key)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl SandboxState {
    fn code2session(&self, query: &HashMap<String, String>) -> serde_json::Value {
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        let param = |name: &str| query.get(name).map(String::as_str).unwrap_or("");
        let Some(app) = SANDBOX_APPIDS.iter().position(|app| *app == param("appid")) else {
            return wechat_error(40013, "invalid appid");
        };
        let appid = SANDBOX_APPIDS[app];
        if param("secret") != self.secrets[app] {
            return wechat_error(40125, "invalid appsecret");
        }
        if param("grant_type") != "authorization_code" {
            return wechat_error(40002, "invalid grant_type");
        }
        let code = param("js_code");
        if code.is_empty() {
            return wechat_error(41008, "missing code");
        }
        let mut parts = code.split('.');
        let name = parts.next().unwrap_or("");
        if let Some(errcode) = name.strip_prefix("err").and_then(|n| n.parse::<i64>().ok()) {
            return wechat_error(errcode, errmsg(errcode));
        }
        let valid_name = (1..=32).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return wechat_error(40029, "invalid code");
        }
        // A code is an app's own: the default app's as it is, the other's under its appid.
        let used = match app {
            0 => code.to_owned(),
            _ => format!("{appid}:{code}"),
        };
        if !self
            .used_codes
            .lock()
            .expect("sandbox lock")
            .insert(&used, tokio::time::Instant::now())
        {
            return wechat_error(40163, "code been used");
        }
        let openid = Sandbox::openid_in(appid, name);
        let login = SandboxLogin {
            appid,
            session_key: STANDARD.encode(random_bytes::<16>()),
            unionid: parts
                .any(|flag| flag == "union")
                .then(|| Sandbox::unionid_of(name)),
        };
        self.logins
            .lock()
            .expect("sandbox lock")
            .insert(openid.clone(), login.clone());
        let mut body = json!({ "openid": openid, "session_key": login.session_key });
        if let Some(unionid) = login.unionid {
            body["unionid"] = json!(unionid);
        }
        body
    }

    fn login_of(&self, openid: &str) -> Option<SandboxLogin> {
        self.logins
            .lock()
            .expect("sandbox lock")
            .get(openid)
            .cloned()
    }

    fn encrypt_for(&self, appid: &str, name: &str, plaintext: &[u8]) -> Option<EncryptedData> {
        let login = self.login_of(&Sandbox::openid_in(appid, name))?;
        let iv = random_bytes::<16>();
        let sealed = encrypt_for_client(&login.session_key, &iv, plaintext)
            .expect("sandbox session_keys are 16 bytes");
        Some(EncryptedData {
            encrypted_data: sealed,
            iv: STANDARD.encode(iv),
            raw_data: None,
            signature: None,
        })
    }

    fn encrypted_profile(&self, appid: &str, name: &str) -> Option<EncryptedData> {
        let openid = Sandbox::openid_in(appid, name);
        let login = self.login_of(&openid)?;
        let public = json!({
            "nickName": name,
            "gender": 0,
            "language": "zh_CN",
            "city": "Shenzhen",
            "province": "Guangdong",
            "country": "China",
            "avatarUrl": format!("https://thirdwx.qlogo.cn/sandbox/{name}/132"),
        });
        let raw_data = public.to_string();
        let mut full = public;
        full["openId"] = json!(openid);
        if let Some(unionid) = &login.unionid {
            full["unionId"] = json!(unionid);
        }
        full["watermark"] = watermark(login.appid);
        let mut data = self.encrypt_for(appid, name, full.to_string().as_bytes())?;
        data.signature = Some(raw_data_signature(&raw_data, &login.session_key));
        data.raw_data = Some(raw_data);
        Some(data)
    }

    fn encrypted_phone(&self, appid: &str, name: &str, phone: &str) -> Option<EncryptedData> {
        let text = json!({
            "phoneNumber": phone,
            "purePhoneNumber": phone,
            "countryCode": "86",
            "watermark": watermark(appid),
        });
        self.encrypt_for(appid, name, text.to_string().as_bytes())
    }
}

/// The watermark WeChat puts in data decrypted for the mini program `appid`.
fn watermark(appid: &str) -> serde_json::Value {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({ "appid": appid, "timestamp": timestamp })
}

/// The query of the client-side routes.
#[derive(serde::Deserialize)]
struct ClientQuery {
    user: String,
    phone: Option<String>,
    /// The mini program; [`SANDBOX_APPID`] without it.
    appid: Option<String>,
}

impl ClientQuery {
    fn appid(&self) -> &str {
        self.appid.as_deref().unwrap_or(SANDBOX_APPID)
    }
}

fn client_routes(state: Arc<SandboxState>) -> BoxedFilter<(Response,)> {
    let userinfo_state = state.clone();
    let userinfo = warp::path!("sandbox" / "userinfo")
        .and(warp::get())
        .and(warp::query::<ClientQuery>())
        .map(move |query: ClientQuery| {
            let profile = userinfo_state.encrypted_profile(query.appid(), &query.user);
            client_answer(&query.user, profile)
        });
    let phone = warp::path!("sandbox" / "phone")
        .and(warp::get())
        .and(warp::query::<ClientQuery>())
        .map(move |query: ClientQuery| {
            let phone = query.phone.as_deref().unwrap_or(SANDBOX_PHONE);
            if !is_phone(phone) {
                return bad_phone();
            }
            let phone = state.encrypted_phone(query.appid(), &query.user, phone);
            client_answer(&query.user, phone)
        });
    userinfo
        .or(phone)
        .unify()
        .or(server_api::phone_code_route())
        .unify()
        .boxed()
}

/// Whether `phone` is a phone number as the sandbox takes one: 1 to 20 digits.
fn is_phone(phone: &str) -> bool {
    (1..=20).contains(&phone.len()) && phone.bytes().all(|b| b.is_ascii_digit())
}

fn bad_phone() -> Response {
    let body = json!({ "error": "invalid_request", "message": "phone must be 1 to 20 digits" });
    warp::reply::with_status(warp::reply::json(&body), StatusCode::BAD_REQUEST).into_response()
}

/// A WeChat answer: JSON, sent as `text/plain` as WeChat does.
fn text_json(body: &serde_json::Value) -> Response {
    warp::reply::with_header(body.to_string(), "content-type", "text/plain").into_response()
}

fn client_answer(user: &str, data: Option<EncryptedData>) -> Response {
    match data {
        Some(data) => warp::reply::json(&data).into_response(),
        None => {
            let body = json!({
                "error": "unknown_user",
                "message": format!(
                    "{user} has not logged in: the sandbox encrypts with the session_key of the \
                     user's latest login, so log in first (POST /v1/login with code={user}.1)"
                ),
            });
            warp::reply::with_status(warp::reply::json(&body), StatusCode::NOT_FOUND)
                .into_response()
        }
    }
}

fn wechat_error(errcode: i64, errmsg: &str) -> serde_json::Value {
    json!({ "errcode": errcode, "errmsg": format!("{errmsg}, rid: sandbox") })
}

fn errmsg(errcode: i64) -> &'static str {
    match errcode {
        -1 => "system error",
        40029 => "invalid code",
        40163 => "code been used",
        45011 => "api minute-quota reach limit  mustslower  retry next minute",
        40226 => "invalid user, risky user",
        40013 => "invalid appid",
        40125 => "invalid appsecret",
        _ => "sandbox error",
    }
}

/// A stable id for `name`, shaped like WeChat's (28 characters).
fn derived_id(prefix: char, kind: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("wxbroker-sandbox:{kind}:{name}"));
    let mut id = String::from(prefix);
    id.push_str(&URL_SAFE_NO_PAD.encode(digest)[..27]);
    id
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::fill(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SandboxState {
        SandboxState {
            secrets: ["s".into(), "s2".into()],
            latency: Duration::ZERO,
            access_token_lifetime: Duration::from_secs(7200),
            used_codes: Mutex::new(UsedCodes::new(CODE_LIFETIME)),
            logins: Mutex::new(HashMap::new()),
            exchanges: AtomicU64::new(0),
            server_api: Default::default(),
        }
    }

    fn ask(state: &SandboxState, code: &str) -> serde_json::Value {
        ask_in(state, SANDBOX_APPID, "s", code)
    }

    /// code2Session in the app `appid` with `secret`.
    fn ask_in(state: &SandboxState, appid: &str, secret: &str, code: &str) -> serde_json::Value {
        let query = [
            ("appid", appid),
            ("secret", secret),
            ("js_code", code),
            ("grant_type", "authorization_code"),
        ];
        state.code2session(
            &query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn the_code_grammar() {
        let state = state();
        let first = ask(&state, "alice.1");
        let second = ask(&state, "alice.2");
        assert_eq!(first["openid"], Sandbox::openid_of("alice"));
        assert_eq!(first["openid"], second["openid"]);
        assert_ne!(first["session_key"], second["session_key"]);
        assert!(first.get("unionid").is_none());
        assert_eq!(
            STANDARD
                .decode(first["session_key"].as_str().unwrap())
                .unwrap()
                .len(),
            16
        );

        assert_eq!(
            ask(&state, "alice.union.3")["unionid"],
            Sandbox::unionid_of("alice")
        );
        assert_eq!(ask(&state, "alice.1")["errcode"], 40163);
        assert_eq!(ask(&state, "err45011")["errcode"], 45011);
        assert_eq!(ask(&state, "err-1.7")["errcode"], -1);
        assert_eq!(ask(&state, "err-1.7")["errcode"], -1);
        assert_eq!(ask(&state, "bad-name")["errcode"], 40029);
        assert_eq!(ask(&state, &"a".repeat(33))["errcode"], 40029);
        assert_eq!(Sandbox::openid_of("bob").len(), 28);
        assert!(
            state.encrypted_profile(SANDBOX_APPID, "bob").is_none(),
            "bob never logged in"
        );
        assert_ne!(Sandbox::openid_of("bob"), Sandbox::openid_of("alice"));
    }

    #[test]
    fn wrong_credentials_get_wechat_errcodes() {
        let state = state();
        let mut query: HashMap<String, String> = [
            ("appid", "wxother"),
            ("secret", "s"),
            ("js_code", "a"),
            ("grant_type", "authorization_code"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(state.code2session(&query)["errcode"], 40013);
        query.insert("appid".into(), SANDBOX_APPID.into());
        query.insert("secret".into(), "wrong".into());
        assert_eq!(state.code2session(&query)["errcode"], 40125);
    }

    #[test]
    fn each_app_has_its_secret_openids_and_codes_and_shares_the_unionid() {
        let state = state();
        let ask_in = |appid: &str, secret: &str, code: &str| ask_in(&state, appid, secret, code);
        let main = ask_in(SANDBOX_APPID, "s", "amy.union.1");
        let lite = ask_in(SANDBOX_LITE_APPID, "s2", "amy.union.1");
        assert_eq!(
            lite["openid"],
            Sandbox::openid_in(SANDBOX_LITE_APPID, "amy")
        );
        assert_ne!(lite["openid"], main["openid"]);
        assert_eq!(main["openid"], Sandbox::openid_in(SANDBOX_APPID, "amy"));
        assert_eq!(lite["unionid"], main["unionid"]);
        assert_eq!(
            ask_in(SANDBOX_LITE_APPID, "s2", "amy.union.1")["errcode"],
            40163
        );
        assert_eq!(ask_in(SANDBOX_LITE_APPID, "s", "amy.2")["errcode"], 40125);
        // Each app's data carries its own watermark, under its own session_key.
        let data = state
            .encrypted_phone(SANDBOX_LITE_APPID, "amy", "1")
            .unwrap();
        let key = lite["session_key"].as_str().unwrap();
        let plain = crate::crypto::decrypt_encrypted_data(key, &data.iv, &data.encrypted_data);
        let plain: serde_json::Value = serde_json::from_slice(&plain.unwrap()).unwrap();
        assert_eq!(plain["watermark"]["appid"], SANDBOX_LITE_APPID);
    }
}
