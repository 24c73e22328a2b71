//! The WeChat HTTP client: one attempt, retries of "busy", WeChat's reply envelope and errcodes,
//! and `code2Session`. The APIs that need an access_token are in [`crate::server_api`].
//!
//! Base URL, credentials and timeouts are injected, so tests point it at a loopback server.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::Secret;
use crate::{Error, Metrics};

/// What WeChat tells us about a user for one login code.
#[derive(Clone, PartialEq, Eq)]
pub struct Code2Session {
    /// The user's id within this mini program.
    pub openid: String,
    /// The key for this user's encrypted data; rotates on every `wx.login`.
    pub session_key: String,
    /// Present only when the mini program is bound to an Open Platform account.
    pub unionid: Option<String>,
}

impl fmt::Debug for Code2Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Code2Session")
            .field("openid", &self.openid)
            .field("session_key", &"[redacted]")
            .field("unionid", &self.unionid)
            .finish()
    }
}

/// How to reach WeChat.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// `https://api.weixin.qq.com` in production; loopback in tests and the sandbox.
    pub base: Url,
    /// The mini program's appid.
    pub appid: String,
    /// The app secret; only ever put into the request to WeChat.
    pub secret: Secret,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Time for one whole attempt, body included.
    pub timeout: Duration,
    /// Retries after errcode -1 ("system busy").
    pub retries: u32,
    /// Where call latency and errors are counted.
    pub metrics: Arc<Metrics>,
}

/// A client for WeChat's server API. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Upstream {
    pub(crate) http: reqwest::Client,
    pub(crate) config: UpstreamConfig,
    /// The base URL with a trailing slash, so that `join` appends to it.
    base: Url,
    /// `sns/jscode2session` with appid, secret and grant_type already in the query: a login
    /// only appends its code, instead of joining and encoding the same parts every time.
    code2session: Url,
}

/// The first wait before retrying a busy WeChat; doubles with each retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Which API an errcode came from: some codes mean different things to different APIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// `sns/jscode2session`.
    Login,
    /// `cgi-bin/stable_token` and `cgi-bin/token`.
    AccessToken,
    /// `wxa/business/getuserphonenumber`.
    PhoneNumber,
    /// `wxa/checksession` and `wxa/resetusersessionkey`.
    SessionKey,
}

impl Upstream {
    /// Builds the client; fails only if the TLS stack cannot start or the base URL is unusable.
    pub fn new(config: UpstreamConfig) -> Result<Upstream, Error> {
        crate::tls::install_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            // The secret is in the query: it must never follow a redirect elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            // Retries are ours (`retrying`, for errcode -1). reqwest's own only resends HTTP/2
            // and HTTP/3 refusals, which cannot happen here; off, it no longer copies every
            // request in case it has to.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .build()
            .map_err(cannot_build_client)?;
        let mut base = config.base.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        // Fails at start, not at the first login, if the base cannot take a path.
        let mut code2session = api_url(&base, "sns/jscode2session")?;
        code2session
            .query_pairs_mut()
            .append_pair("appid", &config.appid)
            .append_pair("secret", config.secret.expose())
            .append_pair("grant_type", "authorization_code");
        Ok(Upstream {
            http,
            config,
            base,
            code2session,
        })
    }

    /// The same client (its connection pool shared) for another app: `appid` and `secret`.
    pub fn for_app(&self, appid: &str, secret: Secret) -> Result<Upstream, Error> {
        let mut code2session = api_url(&self.base, "sns/jscode2session")?;
        code2session
            .query_pairs_mut()
            .append_pair("appid", appid)
            .append_pair("secret", secret.expose())
            .append_pair("grant_type", "authorization_code");
        Ok(Upstream {
            http: self.http.clone(),
            config: UpstreamConfig {
                appid: appid.to_owned(),
                secret,
                ..self.config.clone()
            },
            base: self.base.clone(),
            code2session,
        })
    }

    /// The app this client calls WeChat for.
    pub fn appid(&self) -> &str {
        &self.config.appid
    }

    /// The URL of WeChat's API at `path` (relative to the base).
    pub(crate) fn url(&self, path: &str) -> Result<Url, Error> {
        api_url(&self.base, path)
    }

    /// The longest one API call can take: every attempt timing out, plus backoffs.
    pub fn worst_case(&self) -> Duration {
        let attempts = self.config.retries + 1;
        let backoffs: Duration = (1..=self.config.retries).map(backoff).sum();
        self.config.timeout * attempts + backoffs
    }

    /// Exchanges a login code for the user's openid and session_key.
    pub async fn code2session(&self, code: &str) -> Result<Code2Session, Error> {
        let mut url = self.code2session.clone();
        url.query_pairs_mut().append_pair("js_code", code);
        self.retrying(|| self.attempt(self.http.get(url.clone()), parse_code2session))
            .await
    }

    /// Runs `attempt` again while WeChat answers "system busy" (-1), with backoff.
    ///
    /// A "code used" or "invalid code" after such a retry means our earlier attempt went through
    /// (codes are single-use), so it is reported as busy rather than as the client's fault.
    pub(crate) async fn retrying<T, F>(&self, mut attempt: impl FnMut() -> F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let mut retry = 0;
        loop {
            match attempt().await {
                Err(Error::UpstreamBusy) if retry < self.config.retries => {
                    retry += 1;
                    tracing::warn!(retry, "WeChat is busy (errcode -1); retrying");
                    tokio::time::sleep(backoff(retry)).await;
                }
                Err(Error::CodeUsed | Error::InvalidPhoneCode) if retry > 0 => {
                    return Err(Error::UpstreamBusy);
                }
                outcome => return outcome,
            }
        }
    }

    /// One call to WeChat: sends `request`, reads the answer and parses it with `parse`; timed,
    /// failures counted by errcode, and the app secret scrubbed from any error detail.
    pub(crate) async fn attempt<T>(
        &self,
        request: reqwest::RequestBuilder,
        parse: impl FnOnce(u16, &[u8]) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.attempt_hiding(request, &[], parse).await
    }

    /// As [`Upstream::attempt`], scrubbing also `hidden` (the access_token, a signature: the
    /// other secrets a request carries) from any error detail.
    pub(crate) async fn attempt_hiding<T>(
        &self,
        request: reqwest::RequestBuilder,
        hidden: &[&str],
        parse: impl FnOnce(u16, &[u8]) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let metrics = &self.config.metrics;
        let timer = metrics.upstream_seconds.start_timer();
        let outcome = async {
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status().as_u16();
            let body = response.bytes().await.map_err(transport_error)?;
            parse(status, &body)
        }
        .await;
        timer.observe_duration();
        let label = match &outcome {
            Ok(_) => std::borrow::Cow::Borrowed("ok"),
            Err(e) => {
                let label = error_label(e);
                metrics.upstream_errors.with_label_values(&[&label]).inc();
                label.into()
            }
        };
        metrics
            .app_upstream_calls
            .with_label_values(&[self.config.appid.as_str(), &label])
            .inc();
        outcome.map_err(|e| match e {
            // WeChat's errmsg has been seen to echo request parameters back.
            Error::Upstream(detail) => {
                let secret = self.config.secret.expose();
                Error::Upstream(scrub(detail, [secret].iter().chain(hidden)))
            }
            other => other,
        })
    }
}

/// `path` under `base` (which ends in a slash).
fn api_url(base: &Url, path: &str) -> Result<Url, Error> {
    base.join(path)
        .map_err(|e| Error::Config(format!("bad WECHAT_API_BASE: {e}")))
}

/// `detail` with every one of `secrets` replaced by `[redacted]`: as it is, and as a URL carries
/// it (WeChat's errmsg may echo the request's query), any of its bytes percent-encoded with hex
/// digits of either case and a space as `+`.
fn scrub<'a>(mut detail: String, secrets: impl IntoIterator<Item = &'a &'a str>) -> String {
    for secret in secrets {
        // An empty needle would match between every character.
        if !secret.is_empty() {
            detail = scrub_one(&detail, secret.as_bytes());
        }
    }
    detail
}

/// `detail` with every form of `secret` (see [`scrub`]) replaced.
fn scrub_one(detail: &str, secret: &[u8]) -> String {
    let text = detail.as_bytes();
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    while at < text.len() {
        match encoded_len(&text[at..], secret) {
            Some(len) => {
                out.extend_from_slice(b"[redacted]");
                at += len;
            }
            None => {
                out.push(text[at]);
                at += 1;
            }
        }
    }
    // A match starts and ends on a character boundary (a byte of its own or an ASCII escape).
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// How long `secret` is at the start of `text`, each of its bytes there as itself, as `%XX` (hex
/// digits of either case) or, for a space, as `+`; `None` if it is not there.
fn encoded_len(text: &[u8], secret: &[u8]) -> Option<usize> {
    let Some((&byte, rest)) = secret.split_first() else {
        return Some(0);
    };
    let hex = |digit: u8| (digit as char).to_digit(16);
    // The escape first: a `%` of the secret may be the start of `%25`, or itself.
    if let [b'%', high, low, ..] = text
        && hex(*high).zip(hex(*low)).map(|(h, l)| h * 16 + l) == Some(u32::from(byte))
        && let Some(len) = encoded_len(&text[3..], rest)
    {
        return Some(3 + len);
    }
    match text.first() {
        Some(&first) if first == byte || (byte == b' ' && first == b'+') => {
            encoded_len(&text[1..], rest).map(|len| 1 + len)
        }
        _ => None,
    }
}

/// The metric label of a failed call: the errcode where WeChat gave one; `phone_code` for a
/// refused phone code.
fn error_label(err: &Error) -> String {
    match err {
        Error::UpstreamBusy => "-1".into(),
        Error::InvalidCode => "40029".into(),
        // 40029 and 40163 alike: a phone code is not worth telling apart by errcode.
        Error::InvalidPhoneCode => "phone_code".into(),
        Error::CodeUsed => "40163".into(),
        Error::RateLimited { .. } => "45011".into(),
        Error::RiskyUser => "40226".into(),
        Error::SessionKeyExpired => "87009".into(),
        Error::AccessTokenStale(errcode) => errcode.to_string(),
        Error::UpstreamTimeout => "timeout".into(),
        Error::Upstream(detail) => detail
            .split("errcode ")
            .nth(1)
            .and_then(|rest| {
                rest.split(|c: char| !(c.is_ascii_digit() || c == '-'))
                    .next()
            })
            .filter(|code| !code.is_empty())
            .unwrap_or("other")
            .to_owned(),
        _ => "other".into(),
    }
}

fn backoff(retry: u32) -> Duration {
    FIRST_BACKOFF * 2u32.saturating_pow(retry.saturating_sub(1))
}

/// Maps a transport failure, dropping the URL: it carries the app secret in its query.
fn transport_error(err: reqwest::Error) -> Error {
    if err.is_timeout() {
        Error::UpstreamTimeout
    } else {
        let err = err.without_url();
        Error::Upstream(format!("request to WeChat failed: {err}"))
    }
}

/// Reads an answer of WeChat's `api`: HTTP 2xx with a JSON body whatever its Content-Type, then
/// either an errcode other than 0 (errors come with HTTP 200) or a body of shape `T`.
pub(crate) fn parse_reply<T: DeserializeOwned>(
    api: Api,
    status: u16,
    body: &[u8],
) -> Result<T, Error> {
    #[derive(Deserialize)]
    struct Errcode {
        errcode: Option<i64>,
        errmsg: Option<String>,
    }
    if !(200..300).contains(&status) {
        return Err(Error::Upstream(format!("WeChat answered HTTP {status}")));
    }
    let not_json = |e: serde_json::Error| {
        Error::Upstream(format!(
            "WeChat answered a body that is not the expected JSON: {e}"
        ))
    };
    let head: Errcode = serde_json::from_slice(body).map_err(not_json)?;
    match head.errcode {
        None | Some(0) => serde_json::from_slice(body).map_err(not_json),
        Some(errcode) => Err(errcode_error(
            api,
            errcode,
            head.errmsg.as_deref().unwrap_or(""),
        )),
    }
}

/// The body of a successful code2Session answer.
#[derive(Deserialize)]
struct Wire {
    openid: Option<String>,
    session_key: Option<String>,
    unionid: Option<String>,
}

/// Parses a code2Session answer from its HTTP status and body, whatever its Content-Type.
///
/// Errors come with HTTP 200 and an errcode; success may or may not carry `errcode: 0`.
pub fn parse_code2session(status: u16, body: &[u8]) -> Result<Code2Session, Error> {
    let wire: Wire = parse_reply(Api::Login, status, body)?;
    match (wire.openid, wire.session_key) {
        (Some(openid), Some(session_key)) if !openid.is_empty() && !session_key.is_empty() => {
            Ok(Code2Session {
                openid,
                session_key,
                unionid: wire.unionid.filter(|u| !u.is_empty()),
            })
        }
        _ => Err(Error::Upstream(
            "WeChat answered without openid or session_key".into(),
        )),
    }
}

fn errcode_error(api: Api, errcode: i64, errmsg: &str) -> Error {
    match (api, errcode) {
        (_, -1) => Error::UpstreamBusy,
        (Api::Login, 40029) => Error::InvalidCode,
        (Api::Login, 40163) => Error::CodeUsed,
        (Api::Login, 40226) => Error::RiskyUser,
        (Api::PhoneNumber, 40029 | 40163) => Error::InvalidPhoneCode,
        (Api::SessionKey, 87009) => Error::SessionKeyExpired,
        (_, 45011) => Error::RateLimited {
            retry_after_secs: 60,
        },
        // From the token endpoints, 40001 means the secret is wrong.
        (Api::AccessToken, 40001) | (_, 40013 | 40125 | 40164 | 61004) => {
            tracing::error!(
                errcode,
                errmsg,
                "WeChat refused our credentials or our IP: check WECHAT_APPID, WECHAT_SECRET \
                 and the IP whitelist"
            );
            Error::CredentialsRejected {
                errcode,
                errmsg: errmsg.to_owned(),
            }
        }
        (_, 40001 | 42001) => Error::AccessTokenStale(errcode),
        _ => Error::Upstream(format!("WeChat answered errcode {errcode}: {errmsg}")),
    }
}

/// The error of a client that did not build. The usual cause is a host (a container image) without
/// CA certificates: rustls loads them when the client is built, even for a plain-HTTP sandbox.
pub(crate) fn cannot_build_client(err: reqwest::Error) -> Error {
    Error::Config(format!(
        "cannot build the HTTP client ({err}); it loads the system's CA certificates, \
         so check that they are installed (/etc/ssl/certs/ca-certificates.crt, Debian's \
         ca-certificates package)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Code2Session {
        parse_code2session(200, body.as_bytes()).unwrap()
    }

    #[test]
    fn success_with_and_without_errcode_zero_and_unionid() {
        let plain = ok(r#"{"openid":"o1","session_key":"k1"}"#);
        assert_eq!(plain.openid, "o1");
        assert_eq!(plain.session_key, "k1");
        assert_eq!(plain.unionid, None);

        let full = ok(
            r#"{"errcode":0,"errmsg":"ok","openid":"o2","session_key":"k2","unionid":"u2","expires_in":7200}"#,
        );
        assert_eq!(full.unionid.as_deref(), Some("u2"));
    }

    #[test]
    fn errcodes_map_to_their_errors() {
        let cases = [
            (-1, Error::UpstreamBusy),
            (40029, Error::InvalidCode),
            (40163, Error::CodeUsed),
            (
                45011,
                Error::RateLimited {
                    retry_after_secs: 60,
                },
            ),
            (40226, Error::RiskyUser),
        ];
        for (errcode, expected) in cases {
            let body = format!(r#"{{"errcode":{errcode},"errmsg":"x"}}"#);
            assert_eq!(parse_code2session(200, body.as_bytes()), Err(expected));
        }
        for errcode in [40013, 40125, 40164, 61004] {
            let body = format!(r#"{{"errcode":{errcode},"errmsg":"x"}}"#);
            assert!(matches!(
                parse_code2session(200, body.as_bytes()),
                Err(Error::CredentialsRejected { .. })
            ));
        }
        assert!(matches!(
            parse_code2session(200, br#"{"errcode":99999,"errmsg":"x"}"#),
            Err(Error::Upstream(_))
        ));
    }

    #[test]
    fn unusable_answers_are_upstream_errors() {
        for (status, body) in [
            (502, r#"{"openid":"o","session_key":"k"}"#),
            (200, "<html>bad gateway</html>"),
            (200, r#"{"openid":"o","session_ke"#),
            (200, r#"{"openid":"o"}"#),
            (200, r#"{"openid":"","session_key":"k"}"#),
            (200, ""),
        ] {
            assert!(
                matches!(
                    parse_code2session(status, body.as_bytes()),
                    Err(Error::Upstream(_))
                ),
                "{status} {body}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_answers_never_panic(status in 0u16..1000, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse_code2session(status, &body);
        }

        #[test]
        fn arbitrary_json_shapes_never_panic(
            openid in proptest::option::of(".{0,40}"),
            key in proptest::option::of(".{0,40}"),
            errcode in proptest::option::of(proptest::prelude::any::<i64>()),
        ) {
            let body = serde_json::json!({ "openid": openid, "session_key": key, "errcode": errcode });
            let outcome = parse_code2session(200, body.to_string().as_bytes());
            if let Ok(session) = outcome {
                proptest::prop_assert!(!session.openid.is_empty() && !session.session_key.is_empty());
            }
        }
    }

    #[test]
    fn debug_hides_the_session_key() {
        let shown = format!("{:?}", ok(r#"{"openid":"o","session_key":"SECRETKEY"}"#));
        assert!(!shown.contains("SECRETKEY"));
    }

    #[test]
    fn scrub_hides_every_secret_and_ignores_empty_ones() {
        let detail = "errmsg echoed secret=S3 access_token=T0K sig=5164 end".to_owned();
        let scrubbed = scrub(detail, &["S3", "", "T0K", "5164"]);
        assert_eq!(
            scrubbed,
            "errmsg echoed secret=[redacted] access_token=[redacted] sig=[redacted] end"
        );
    }

    #[test]
    fn scrub_hides_a_secret_also_as_a_url_carries_it() {
        let secret = "S3CRET+val/x= é%";
        let forms = [
            "S3CRET+val/x= é%",
            // As reqwest's query encoding writes it, and with lower-case hex digits.
            "S3CRET%2Bval%2Fx%3D+%C3%A9%25",
            "S3CRET%2bval%2fx%3d+%c3%a9%25",
            // Every byte escaped, a space as %20; a WHATWG query, which leaves `+/=` as they are.
            "%53%33CRET%2Bval%2Fx%3D%20é%25",
            "S3CRET+val/x=%20%C3%A9%",
        ];
        for form in forms {
            let detail = format!("errmsg: /sns/jscode2session?secret={form}&js_code=c");
            assert_eq!(
                scrub(detail, &[secret]),
                "errmsg: /sns/jscode2session?secret=[redacted]&js_code=c",
                "{form}"
            );
        }
        // Near misses stay: another byte, a bad escape, the secret cut short.
        for near in [
            "S3CRET%2Cval/x= é%",
            "S3CRET%2val/x= é%",
            "S3CRET+val/x= %C3",
        ] {
            assert_eq!(scrub(near.to_owned(), &[secret]), near);
        }
        assert_eq!(scrub("ab%".into(), &["b%"]), "a[redacted]");
        assert_eq!(
            scrub("a%25 %2525 %".into(), &["%25"]),
            "a[redacted] [redacted] %"
        );
    }

    #[test]
    fn worst_case_covers_every_attempt_and_backoff() {
        let upstream = Upstream::new(UpstreamConfig {
            base: Url::parse("http://127.0.0.1:1/").unwrap(),
            appid: "a".into(),
            secret: Secret::new("s"),
            connect_timeout: Duration::from_millis(10),
            timeout: Duration::from_secs(1),
            retries: 2,
            metrics: Arc::default(),
        })
        .unwrap();
        assert_eq!(
            upstream.worst_case(),
            Duration::from_millis(3000 + 100 + 200)
        );
    }
}
