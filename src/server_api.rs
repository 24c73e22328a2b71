//! WeChat's server APIs beyond login: the app's access_token, phone numbers by code, and the
//! check and reset of a user's session_key. Each is one method on [`Upstream`]; which token to
//! use and when to fetch a new one is the [`crate::actors::access_token_keeper`]'s business.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::Error;
use crate::config::Secret;
use crate::crypto::session_key_signature;
use crate::upstream::{Api, Upstream, parse_reply};
use crate::user::Phone;

/// The app's access_token for WeChat's server APIs.
#[derive(Clone, Debug)]
pub struct AccessToken {
    /// The token; as secret as the app secret while it lives.
    pub token: Secret,
    /// How long WeChat says it stays valid.
    pub expires_in: Duration,
}

#[derive(Deserialize)]
struct TokenWire {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize)]
struct PhoneWire {
    phone_info: serde_json::Value,
}

#[derive(Deserialize)]
struct ResetWire {
    session_key: String,
}

impl Upstream {
    /// Fetches an access_token from `cgi-bin/stable_token`, or from the older `cgi-bin/token`
    /// when that fails outright ([`Error::Upstream`]). A timeout, "busy" or rate limit is
    /// returned as it is: the other endpoint would only double the wait. `force` asks the stable
    /// endpoint for a new token rather than the current one (for a token WeChat has called stale).
    pub async fn fetch_access_token(&self, force: bool) -> Result<AccessToken, Error> {
        match self.stable_token(force).await {
            Err(e @ Error::Upstream(_)) => {
                tracing::warn!(error = %e, "stable_token failed; falling back to cgi-bin/token");
                self.classic_token().await
            }
            outcome => outcome,
        }
    }

    async fn stable_token(&self, force: bool) -> Result<AccessToken, Error> {
        let url = self.url("cgi-bin/stable_token")?;
        let body = json!({
            "grant_type": "client_credential",
            "appid": self.config.appid,
            "secret": self.config.secret.expose(),
            "force_refresh": force,
        });
        self.retrying(|| {
            let request = self.http.post(url.clone()).json(&body);
            self.attempt(request, parse_token)
        })
        .await
    }

    async fn classic_token(&self) -> Result<AccessToken, Error> {
        let mut url = self.url("cgi-bin/token")?;
        url.query_pairs_mut()
            .append_pair("grant_type", "client_credential")
            .append_pair("appid", &self.config.appid)
            .append_pair("secret", self.config.secret.expose());
        self.retrying(|| self.attempt(self.http.get(url.clone()), parse_token))
            .await
    }

    /// The phone number behind a code from the phone-number button. Needs no session_key, so a
    /// rotated one cannot make it fail.
    pub async fn phone_number(&self, access_token: &Secret, code: &str) -> Result<Phone, Error> {
        let mut url = self.url("wxa/business/getuserphonenumber")?;
        url.query_pairs_mut()
            .append_pair("access_token", access_token.expose());
        let body = json!({ "code": code });
        let appid = &self.config.appid;
        let hidden = [access_token.expose()];
        self.retrying(|| {
            let request = self.http.post(url.clone()).json(&body);
            self.attempt_hiding(request, &hidden, |status, body| {
                parse_phone(appid, status, body)
            })
        })
        .await
    }

    /// Asks WeChat whether `session_key` is still the user's current one: `Ok` if so,
    /// [`Error::SessionKeyExpired`] if not.
    pub async fn check_session_key(
        &self,
        access_token: &Secret,
        openid: &str,
        session_key: &str,
    ) -> Result<(), Error> {
        let (url, signature) =
            self.signed_url("wxa/checksession", access_token, openid, session_key)?;
        let hidden = [access_token.expose(), signature.as_str()];
        self.retrying(|| {
            self.attempt_hiding(self.http.get(url.clone()), &hidden, |status, body| {
                parse_reply::<serde_json::Value>(Api::SessionKey, status, body).map(drop)
            })
        })
        .await
    }

    /// Has WeChat replace the user's session_key (proving we hold the current one); returns the
    /// new key.
    pub async fn reset_session_key(
        &self,
        access_token: &Secret,
        openid: &str,
        session_key: &str,
    ) -> Result<String, Error> {
        let (url, signature) =
            self.signed_url("wxa/resetusersessionkey", access_token, openid, session_key)?;
        let hidden = [access_token.expose(), signature.as_str()];
        // Not retried: if a busy answer hid a reset that happened, our key is stale either way.
        self.attempt_hiding(self.http.get(url), &hidden, |status, body| {
            let wire: ResetWire = parse_reply(Api::SessionKey, status, body)?;
            if wire.session_key.is_empty() {
                return Err(Error::Upstream(
                    "WeChat answered an empty session_key".into(),
                ));
            }
            Ok(wire.session_key)
        })
        .await
    }

    /// The URL of a session_key API, signed as WeChat asks: HMAC-SHA256 keyed with the key.
    /// The signature comes along too, to be scrubbed from errors like the token.
    fn signed_url(
        &self,
        path: &str,
        access_token: &Secret,
        openid: &str,
        session_key: &str,
    ) -> Result<(reqwest::Url, String), Error> {
        let signature = session_key_signature(session_key);
        let mut url = self.url(path)?;
        url.query_pairs_mut()
            .append_pair("access_token", access_token.expose())
            .append_pair("openid", openid)
            .append_pair("signature", &signature)
            .append_pair("sig_method", "hmac_sha256");
        Ok((url, signature))
    }
}

fn parse_token(status: u16, body: &[u8]) -> Result<AccessToken, Error> {
    let wire: TokenWire = parse_reply(Api::AccessToken, status, body)?;
    if wire.access_token.is_empty() || wire.expires_in == 0 {
        return Err(Error::Upstream(
            "WeChat answered an empty access_token".into(),
        ));
    }
    Ok(AccessToken {
        token: Secret::new(wire.access_token),
        expires_in: Duration::from_secs(wire.expires_in),
    })
}

/// Parses a getuserphonenumber answer; its watermark must name our appid.
fn parse_phone(appid: &str, status: u16, body: &[u8]) -> Result<Phone, Error> {
    let wire: PhoneWire = parse_reply(Api::PhoneNumber, status, body)?;
    if wire.phone_info["watermark"]["appid"] != appid {
        return Err(Error::WatermarkMismatch);
    }
    Phone::deserialize(&wire.phone_info)
        .map_err(|e| Error::Upstream(format!("WeChat answered an unusable phone_info: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_answers() {
        let token = parse_token(200, br#"{"access_token":"T","expires_in":7200}"#).unwrap();
        assert_eq!(token.token.expose(), "T");
        assert_eq!(token.expires_in, Duration::from_secs(7200));
        assert!(format!("{token:?}").contains("redacted"));
        assert!(matches!(
            parse_token(200, br#"{"errcode":40001,"errmsg":"invalid credential"}"#),
            Err(Error::CredentialsRejected { errcode: 40001, .. })
        ));
        assert_eq!(
            parse_token(200, br#"{"errcode":-1,"errmsg":"busy"}"#).unwrap_err(),
            Error::UpstreamBusy
        );
        assert!(parse_token(200, br#"{"access_token":"","expires_in":7200}"#).is_err());
        assert!(parse_token(502, br#"{"access_token":"T","expires_in":7200}"#).is_err());
    }

    #[test]
    fn phone_answers() {
        let ok = br#"{"errcode":0,"errmsg":"ok","phone_info":{"phoneNumber":"+86 138","purePhoneNumber":"138","countryCode":86,"watermark":{"appid":"wxA","timestamp":1}}}"#;
        let phone = parse_phone("wxA", 200, ok).unwrap();
        assert_eq!(
            (phone.phone_number.as_str(), phone.country_code.as_str()),
            ("+86 138", "86")
        );
        assert_eq!(parse_phone("wxB", 200, ok), Err(Error::WatermarkMismatch));
        for (errcode, expected) in [
            (40029, Error::InvalidPhoneCode),
            (40001, Error::AccessTokenStale(40001)),
            (42001, Error::AccessTokenStale(42001)),
            (
                45011,
                Error::RateLimited {
                    retry_after_secs: 60,
                },
            ),
        ] {
            let body = format!(r#"{{"errcode":{errcode},"errmsg":"x"}}"#);
            assert_eq!(parse_phone("wxA", 200, body.as_bytes()), Err(expected));
        }
        assert!(matches!(
            parse_phone(
                "wxA",
                200,
                br#"{"errcode":0,"phone_info":{"watermark":{"appid":"wxA"}}}"#
            ),
            Err(Error::Upstream(_))
        ));
    }

    #[test]
    fn a_stale_session_key_is_its_own_error() {
        let stale = br#"{"errcode":87009,"errmsg":"invalid signature"}"#;
        assert_eq!(
            parse_reply::<serde_json::Value>(Api::SessionKey, 200, stale).unwrap_err(),
            Error::SessionKeyExpired
        );
    }
}
