//! Signed access tokens, their keys and the revocation feed, and `wxbroker::edge::Verifier`
//! against the real broker over HTTP: what a login and `POST /v1/token` sign, the JWKS and its
//! rotation, the feed (resumed across a restart, reset when it cannot vouch), forged tokens, and
//! how fast a logout reaches a verifier.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use wxbroker::edge::{Verifier, VerifierOptions};
use wxbroker::jwt::{AccessClaims, JwkSet, Refusal};
use wxbroker::{ACCESS_SLACK, SANDBOX_APPID, Secret};

use crate::support::{T0, TestBroker, assert_error, metric, parts};

/// The feed's secret in these tests.
pub const VERIFIER_TOKEN: &str = "edge-test-verifier-secret-0123456789abcdef";
/// The admin secret in these tests.
pub const ADMIN_TOKEN: &str = "edge-test-admin-secret-0123456789abcdef";

/// A broker with the feed and the admin routes on.
pub async fn broker() -> TestBroker {
    TestBroker::start_with(with_secrets).await
}

/// Turns on the feed and the admin routes.
pub fn with_secrets(config: &mut wxbroker::Config) {
    config.verifier_token = Some(Secret::new(VERIFIER_TOKEN));
    config.admin_token = Some(Secret::new(ADMIN_TOKEN));
}

/// The claims of `token`, unverified.
pub fn claims(token: &str) -> AccessClaims {
    wxbroker::jwt::parse(token).unwrap().claims().unwrap()
}

/// Logs in with `code`; returns the answer, asserting 200.
pub async fn login(tb: &TestBroker, code: &str) -> Value {
    let (status, body) = parts(tb.login(code).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The access token of a login answer.
pub fn access(body: &Value) -> String {
    body["accessToken"].as_str().unwrap().to_owned()
}

/// A verifier of `tb`'s tokens on `tb`'s clock, once it has read the feed.
pub async fn verifier(tb: &TestBroker, tweak: impl FnOnce(&mut VerifierOptions)) -> Verifier {
    let mut options = VerifierOptions::new(&tb.url, SANDBOX_APPID, VERIFIER_TOKEN);
    options.clock = tb.clock.clone();
    tweak(&mut options);
    let verifier = Verifier::start(options).unwrap();
    tokio::time::timeout(Duration::from_secs(10), verifier.synced())
        .await
        .expect("the verifier read the feed within 10 s");
    verifier
}

/// How long after now `verifier` starts refusing `token`; fails past `limit`.
pub async fn refused_within(verifier: &Verifier, token: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match verifier.verify(token).await {
            Err(Refusal::Revoked) => return started.elapsed(),
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => {}
        }
        assert!(
            started.elapsed() < limit,
            "the verifier still accepts the token {:?} after the revocation",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `GET path` on `tb` with the admin secret, or `method`.
async fn admin(tb: &TestBroker, method: reqwest::Method, path: &str) -> reqwest::Response {
    tb.http
        .request(method, format!("{}{path}", tb.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
}

/// The JWKS of `tb`.
async fn jwks(tb: &TestBroker) -> JwkSet {
    let response = tb
        .http
        .get(format!("{}/.well-known/jwks.json", tb.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// `POST /v1/token` with `session`.
async fn mint(tb: &TestBroker, session: &str) -> reqwest::Response {
    tb.http
        .post(format!("{}/v1/token", tb.url))
        .bearer_auth(session)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_login_signs_an_access_token_that_names_its_session() {
    let tb = broker().await;
    let body = login(&tb, "alice.union.1").await;
    assert_eq!(body["accessTokenExpiresIn"], 300);
    let token = access(&body);
    let uid = body["uid"].as_u64().unwrap();
    let c = claims(&token);
    assert_eq!(
        (c.iss.as_str(), c.aud.as_str(), c.sub.as_str()),
        ("wxbroker", SANDBOX_APPID, uid.to_string().as_str())
    );
    assert_eq!(c.appid.as_deref(), Some(SANDBOX_APPID));
    assert_eq!((c.iat, c.exp), (T0, T0 + 300));
    assert_eq!(c.openid, wxbroker::Sandbox::openid_of("alice"));
    assert_eq!(c.unionid, Some(wxbroker::Sandbox::unionid_of("alice")));
    // The session's id as the admin routes show it.
    let sessions = admin(
        &tb,
        reqwest::Method::GET,
        &format!("/admin/users/{uid}/sessions"),
    )
    .await;
    let (_, sessions) = parts(sessions).await;
    assert_eq!(sessions["sessions"][0]["id"], c.sid.as_str());
    // The payload holds nothing else (never the session_key).
    let payload = token.split('.').nth(1).unwrap();
    let payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let mut names: Vec<_> = payload.as_object().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "appid", "aud", "exp", "iat", "iss", "jti", "openid", "sid", "sub", "unionid"
        ]
    );

    // Signed by a published key.
    let response = tb
        .http
        .get(format!("{}/.well-known/jwks.json", tb.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["cache-control"],
        "public, max-age=60",
        "the JWKS may be cached"
    );
    let set: Value = response.json().await.unwrap();
    let key = &set["keys"][0];
    assert_eq!(set["keys"].as_array().unwrap().len(), 1);
    for (name, value) in [
        ("kty", "OKP"),
        ("crv", "Ed25519"),
        ("use", "sig"),
        ("alg", "EdDSA"),
    ] {
        assert_eq!(key[name], value, "{set}");
    }
    let parsed = wxbroker::jwt::parse(&token).unwrap();
    assert_eq!(key["kid"], parsed.kid());
    let jwk: wxbroker::jwt::Jwk = serde_json::from_value(key.clone()).unwrap();
    parsed.verify(&jwk.verifying_key().unwrap()).unwrap();
}

#[tokio::test]
async fn post_token_mints_a_fresh_token_and_slides_the_session() {
    let tb = TestBroker::start_with(|c| {
        with_secrets(c);
        c.session_idle_ttl = 200;
    })
    .await;
    let body = login(&tb, "bob.1").await;
    let session = body["thirdSession"].as_str().unwrap().to_owned();
    // The token never outlives its session.
    assert_eq!(body["accessTokenExpiresIn"], 200);
    let first = claims(&access(&body));

    tb.clock.advance(150);
    let (status, minted) = parts(mint(&tb, &session).await).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    let second = claims(minted["accessToken"].as_str().unwrap());
    assert_eq!(minted["accessTokenExpiresIn"], 200);
    assert_eq!((second.iat, second.exp), (T0 + 150, T0 + 350));
    assert_eq!(second.sid, first.sid);
    assert_ne!(second.jti, first.jti);
    // Slid: alive past its first idle deadline.
    tb.clock.advance(100);
    let (status, _) = parts(tb.session(&session).await).await;
    assert_eq!(status, StatusCode::OK);

    assert_error(
        mint(&tb, "not-a-session").await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    let anonymous = tb
        .http
        .post(format!("{}/v1/token", tb.url))
        .send()
        .await
        .unwrap();
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "invalid_session").await;
    assert_eq!(tb.logout(&session).await.status(), StatusCode::NO_CONTENT);
    assert_error(
        mint(&tb, &session).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
}

#[tokio::test]
async fn with_signed_tokens_off_nothing_of_them_is_there() {
    let tb = TestBroker::start_with(|c| {
        with_secrets(c);
        c.access_token_ttl = 0;
    })
    .await;
    let body = login(&tb, "carl.1").await;
    assert!(body.get("accessToken").is_none(), "{body}");
    assert!(body.get("accessTokenExpiresIn").is_none(), "{body}");
    let session = body["thirdSession"].as_str().unwrap();
    assert_error(mint(&tb, session).await, StatusCode::NOT_FOUND, "not_found").await;
    for path in ["/.well-known/jwks.json", "/v1/revocations"] {
        let response = tb
            .http
            .get(format!("{}{path}", tb.url))
            .bearer_auth(VERIFIER_TOKEN)
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    let rotate = admin(&tb, reqwest::Method::POST, "/admin/keys/rotate").await;
    assert_error(rotate, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn a_verifier_accepts_live_tokens_and_refuses_a_logout_within_a_second() {
    let tb = broker().await;
    let verifier = verifier(&tb, |_| {}).await;
    let body = login(&tb, "dora.1").await;
    let token = access(&body);
    let session = body["thirdSession"].as_str().unwrap().to_owned();
    let verified = verifier.check(&token).unwrap();
    assert_eq!(verified.uid(), body["uid"].as_u64());
    // Seen before: the same claims from the cache.
    assert!(Arc::ptr_eq(&verified, &verifier.check(&token).unwrap()));

    let logout = tb.logout(&session).await;
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    let took = refused_within(&verifier, &token, Duration::from_secs(1)).await;
    eprintln!("a logout reached the verifier {took:?} after its 204");

    // Counted: the tokens signed, the feeds served (until the verifier goes).
    let metrics = |tb: &TestBroker| {
        let http = tb.http.clone();
        let url = format!("{}/metrics", tb.url);
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let text = metrics(&tb).await;
    assert_eq!(
        metric(&text, "wxbroker_access_tokens_signed_total"),
        Some(1.0)
    );
    assert_eq!(metric(&text, "wxbroker_revocation_feeds_open"), Some(1.0));
    drop(verifier);
    crate::support::eventually("the feed's end counted", || async {
        metric(&metrics(&tb).await, "wxbroker_revocation_feeds_open") == Some(0.0)
    })
    .await;
}

#[tokio::test]
async fn admin_revocations_reach_the_verifier_and_spare_later_logins() {
    let tb = broker().await;
    let verifier = verifier(&tb, |_| {}).await;
    let first = login(&tb, "eve.1").await;
    let second = login(&tb, "eve.2").await;
    let other = login(&tb, "fay.1").await;
    let uid = first["uid"].as_u64().unwrap();
    for body in [&first, &second, &other] {
        verifier.check(&access(body)).unwrap();
    }
    // One session, by its id.
    let sid = claims(&access(&first)).sid;
    let revoked = admin(
        &tb,
        reqwest::Method::DELETE,
        &format!("/admin/sessions/{sid}"),
    )
    .await;
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    refused_within(&verifier, &access(&first), Duration::from_secs(1)).await;
    verifier.check(&access(&second)).unwrap();

    // Every session of the user; a login in the same second (the clock stands still here) is a
    // new session, and stays valid.
    let all = admin(
        &tb,
        reqwest::Method::DELETE,
        &format!("/admin/users/{uid}/sessions"),
    )
    .await;
    assert_eq!(all.status(), StatusCode::OK);
    refused_within(&verifier, &access(&second), Duration::from_secs(1)).await;
    let after = login(&tb, "eve.3").await;
    assert_eq!(claims(&access(&after)).iat, claims(&access(&second)).iat);
    verifier.check(&access(&after)).unwrap();
    verifier.check(&access(&other)).unwrap();
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let tb = broker().await;
    let verifier = verifier(&tb, |_| {}).await;
    let token = access(&login(&tb, "gus.1").await);
    verifier.check(&token).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let kid = header["kid"].as_str().unwrap().to_owned();
    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());

    // Another uid in the payload, the signature kept.
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = "999".into();
    let tampered = format!("{}.{}.{}", parts[0], encode(&payload), parts[2]);
    assert_eq!(verifier.check(&tampered).err(), Some(Refusal::Signature));
    // A signature bit flipped.
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[10] ^= 1;
    let flipped = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(&signature)
    );
    assert_eq!(verifier.check(&flipped).err(), Some(Refusal::Signature));

    // alg none, unsigned.
    let none = format!(
        "{}.{}.",
        encode(&json!({ "alg": "none", "typ": "JWT", "kid": kid })),
        parts[1]
    );
    assert_eq!(verifier.check(&none).err(), Some(Refusal::Algorithm));
    // HS256 with the public key (as the JWK's x bytes, and as the JWK's text) for the secret.
    let jwk = jwks(&tb).await.keys.remove(0);
    let secrets = [
        URL_SAFE_NO_PAD.decode(&jwk.x).unwrap(),
        serde_json::to_vec(&jwk).unwrap(),
    ];
    for secret in secrets {
        let signed = format!(
            "{}.{}",
            encode(&json!({ "alg": "HS256", "typ": "JWT", "kid": kid })),
            parts[1]
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(&secret).unwrap();
        mac.update(signed.as_bytes());
        let hs256 = format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(verifier.check(&hs256).err(), Some(Refusal::Algorithm));
        assert!(verifier.verify(&hs256).await.is_err());
    }
    // A kid no key has, even after a fetch.
    let unknown = format!(
        "{}.{}.{}",
        encode(&json!({ "alg": "EdDSA", "kid": "no-such-key" })),
        parts[1],
        parts[2]
    );
    assert_eq!(
        verifier.verify(&unknown).await.err(),
        Some(Refusal::UnknownKey)
    );
    assert_eq!(verifier.check("junk").err(), Some(Refusal::Malformed));

    // For another mini program, or from another issuer.
    let foreign = self::verifier(&tb, |o| o.audience = "wx-another-app".into()).await;
    assert_eq!(foreign.check(&token).err(), Some(Refusal::Audience));
    let other_issuer = self::verifier(&tb, |o| o.issuer = "someone-else".into()).await;
    assert_eq!(other_issuer.check(&token).err(), Some(Refusal::Issuer));

    // Expired: refused past exp and the leeway, also once cached.
    tb.clock.advance(300 + 4);
    verifier.check(&token).unwrap();
    tb.clock.advance(1);
    assert_eq!(verifier.check(&token).err(), Some(Refusal::Expired));
    let fresh = self::verifier(&tb, |_| {}).await;
    assert_eq!(fresh.check(&token).err(), Some(Refusal::Expired));
}

#[tokio::test]
async fn rotation_keeps_old_tokens_valid_until_they_expire() {
    let tb = broker().await;
    let verifier = verifier(&tb, |_| {}).await;
    let old = access(&login(&tb, "hal.1").await);
    let old_kid = wxbroker::jwt::parse(&old).unwrap().kid().to_owned();
    verifier.check(&old).unwrap();

    tb.clock.advance(10);
    let (status, rotation) =
        parts(admin(&tb, reqwest::Method::POST, "/admin/keys/rotate").await).await;
    assert_eq!(status, StatusCode::OK, "{rotation}");
    let new_kid = rotation["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    let keys = rotation["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{rotation}");
    assert_eq!(keys[0]["kid"], new_kid.as_str());
    assert!(keys[0].get("retiredAt").is_none(), "{rotation}");
    assert_eq!(keys[1]["retiredAt"], T0 + 10);
    let until = T0 + 10 + 300 + ACCESS_SLACK;
    assert_eq!(keys[1]["publishedUntil"], until);
    assert!(!rotation.to_string().contains("seed"), "{rotation}");

    // The new key signs; the verifier fetches it at the first token it signed.
    let new = access(&login(&tb, "hal.2").await);
    assert_eq!(wxbroker::jwt::parse(&new).unwrap().kid(), new_kid);
    assert_eq!(verifier.check(&new).err(), Some(Refusal::UnknownKey));
    verifier.verify(&new).await.unwrap();
    // The old key's tokens stay valid, seen before or not.
    verifier.check(&old).unwrap();
    let fresh = self::verifier(&tb, |_| {}).await;
    fresh.check(&old).unwrap();
    let kids: Vec<String> = jwks(&tb).await.keys.into_iter().map(|k| k.kid).collect();
    assert_eq!(kids, [new_kid.clone(), old_kid.clone()]);

    // Until they expire; the old key leaves the JWKS once every token it signed has expired.
    tb.clock.advance(300);
    assert_eq!(fresh.check(&old).err(), Some(Refusal::Expired));
    // Now T0 + 310.
    tb.clock.advance(until - 1 - (T0 + 310));
    assert_eq!(jwks(&tb).await.keys.len(), 2);
    tb.clock.advance(1);
    let kids: Vec<String> = jwks(&tb).await.keys.into_iter().map(|k| k.kid).collect();
    assert_eq!(kids, [new_kid]);
}

/// The events of a feed's text: (name, id, data).
pub fn events(text: &str) -> Vec<(String, Option<String>, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let (mut name, mut id, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = Some(value.trim().to_owned());
                } else if let Some(value) = line.strip_prefix("id:") {
                    id = Some(value.trim().to_owned());
                } else if let Some(value) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(value.trim()).unwrap());
                }
            }
            Some((name?, id, data?))
        })
        .collect()
}

/// Opens `tb`'s feed from `since` (as Last-Event-ID) and reads it up to its `synced` event;
/// returns its events before that.
pub async fn replay(tb: &TestBroker, since: Option<&str>) -> Vec<(String, Option<String>, Value)> {
    let mut request = tb
        .http
        .get(format!("{}/v1/revocations", tb.url))
        .bearer_auth(VERIFIER_TOKEN);
    if let Some(since) = since {
        request = request.header("last-event-id", since);
    }
    let mut response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let read = async {
        while !text.contains("event:synced") {
            let chunk = response.chunk().await.unwrap().expect("the feed goes on");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the feed replayed within 10 s");
    let mut events = events(&text);
    assert_eq!(events.pop().map(|e| e.0).as_deref(), Some("synced"));
    events
}

#[tokio::test]
async fn the_feed_is_guarded_resumes_after_a_restart_and_resets_what_it_cannot_vouch_for() {
    let tb = broker().await;
    let feed = format!("{}/v1/revocations", tb.url);
    let wrong = tb
        .http
        .get(&feed)
        .bearer_auth("wrong-secret")
        .send()
        .await
        .unwrap();
    assert_error(wrong, StatusCode::UNAUTHORIZED, "verifier_unauthorized").await;
    let anonymous = tb.http.get(&feed).send().await.unwrap();
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "verifier_unauthorized").await;
    let bad = tb
        .http
        .get(format!("{feed}?since=yesterday"))
        .bearer_auth(VERIFIER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_error(bad, StatusCode::BAD_REQUEST, "invalid_request").await;
    // Off without a secret.
    let off = TestBroker::start().await;
    let response = off
        .http
        .get(format!("{}/v1/revocations", off.url))
        .bearer_auth(VERIFIER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::NOT_FOUND, "not_found").await;

    // A new feed: nothing to replay, but tokens issued before its origin (less than a lifetime
    // ago) are not vouched for.
    let fresh = replay(&tb, None).await;
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    assert_eq!(
        (fresh[0].0.as_str(), &fresh[0].2),
        ("reset", &json!({ "notBefore": T0 }))
    );
    let origin = fresh[0].1.clone().unwrap();
    assert_eq!(replay(&tb, Some(&origin)).await, []);
    let ann = login(&tb, "ann.1").await;
    let ann_session = ann["thirdSession"].as_str().unwrap();
    assert_eq!(
        tb.logout(ann_session).await.status(),
        StatusCode::NO_CONTENT
    );
    let uid = login(&tb, "ben.1").await["uid"].as_u64().unwrap();
    let all = admin(
        &tb,
        reqwest::Method::DELETE,
        &format!("/admin/users/{uid}/sessions"),
    )
    .await;
    assert_eq!(all.status(), StatusCode::OK);
    let events = replay(&tb, Some(&origin)).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, "revoke");
    assert_eq!(events[0].2["sid"], claims(&access(&ann)).sid.as_str());
    assert_eq!(events[0].2["until"], T0 + 300 + ACCESS_SLACK);
    assert_eq!(events[1].2["uid"], uid);
    assert_eq!(events[1].2["notBefore"], T0);
    assert_eq!(events[1].2["sids"].as_array().unwrap().len(), 1);
    let first = events[0].1.clone().unwrap();
    let last = events[1].1.clone().unwrap();

    // A restarted broker (same data dir and clock) resumes where the verifier left off.
    let tb = tb.restart().await;
    let after_first = replay(&tb, Some(&first)).await;
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].1.as_deref(), Some(last.as_str()));
    assert_eq!(replay(&tb, Some(&last)).await, []);
    let query = tb
        .http
        .get(format!("{}/v1/revocations?since={first}", tb.url))
        .bearer_auth(VERIFIER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), StatusCode::OK);
    drop(query);

    // A cursor the feed never issued: it lost history, so it vouches for nothing before now.
    tb.clock.advance(5);
    let ahead = replay(&tb, Some("99999999999999-0")).await;
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    assert_eq!(ahead[0].0, "reset");
    assert_eq!(ahead[0].1.as_deref(), Some(last.as_str()));
    assert_eq!(ahead[0].2, json!({ "notBefore": T0 + 5 }));

    // Events are dropped once past their until: every token they concerned has expired, so a
    // verifier behind them needs no reset. Nor does a new one, the origin being over a lifetime
    // ago.
    tb.clock.advance(300 + ACCESS_SLACK);
    let cal = login(&tb, "cal.1").await;
    let cal_session = cal["thirdSession"].as_str().unwrap();
    assert_eq!(
        tb.logout(cal_session).await.status(),
        StatusCode::NO_CONTENT
    );
    let behind = replay(&tb, Some(&first)).await;
    assert_eq!(behind.len(), 1, "{behind:?}");
    assert_eq!(behind[0].2["sid"], claims(&access(&cal)).sid.as_str());
    assert_eq!(replay(&tb, None).await, behind);
}

/// A directory holding `tests/jose` with its pinned jose installed (`npm ci`).
async fn install_jose() -> tempfile::TempDir {
    // jose 6 runs on the global Web Crypto API, which Node has without a flag from version 20.
    let version = tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run node ({e}): the jose test needs Node.js >= 20"));
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "the jose test needs Node.js >= 20 (jose 6 uses the global Web Crypto API); found {version}"
    );
    let dir = tempfile::tempdir().unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jose");
    for file in ["package.json", "package-lock.json", "verify.mjs"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let install = tokio::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), install)
        .await
        .expect("npm ci finished within 180 s")
        .unwrap_or_else(|e| panic!("cannot run npm ({e}): this test needs Node.js and npm"));
    assert!(
        output.status.success(),
        "npm ci failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}

/// What jose (in `dir`) says of `token` against `tb`'s JWKS, with its clock at `at`.
async fn jose(dir: &tempfile::TempDir, tb: &TestBroker, token: &str, at: u64) -> Value {
    let run = tokio::process::Command::new("node")
        .arg("verify.mjs")
        .arg(format!("{}/.well-known/jwks.json", tb.url))
        .args([token, "wxbroker", SANDBOX_APPID, &at.to_string()])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("node finished within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "node printed nothing: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str(line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jose_verifies_our_tokens_against_the_jwks_and_refuses_one_whose_key_was_dropped() {
    let (tb, dir) = tokio::join!(broker(), install_jose());
    let body = login(&tb, "ivy.union.1").await;
    let old = access(&body);
    let verified = jose(&dir, &tb, &old, T0 + 1).await;
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["header"]["alg"], "EdDSA");
    assert_eq!(verified["payload"]["sub"], body["uid"].to_string());
    assert_eq!(verified["payload"]["sid"], claims(&old).sid.as_str());

    // What the verifier of the tests refuses, jose refuses too.
    let parts: Vec<&str> = old.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = "999".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        parts[2]
    );
    let refused = jose(&dir, &tb, &tampered, T0 + 1).await;
    assert_eq!(
        refused["code"], "ERR_JWS_SIGNATURE_VERIFICATION_FAILED",
        "{refused}"
    );
    let expired = jose(&dir, &tb, &old, T0 + 301).await;
    assert_eq!(expired["code"], "ERR_JWT_EXPIRED", "{expired}");

    // After a rotation the new key's tokens verify; once the old key is past its retirement (every
    // token it signed has expired) it leaves the JWKS, and jose refuses its token even on a clock
    // at which the token itself would still be valid.
    let rotate = admin(&tb, reqwest::Method::POST, "/admin/keys/rotate").await;
    assert_eq!(rotate.status(), StatusCode::OK);
    let new = access(&login(&tb, "ivy.2").await);
    assert_eq!(jose(&dir, &tb, &new, T0 + 1).await["ok"], true);
    assert_eq!(jose(&dir, &tb, &old, T0 + 1).await["ok"], true);
    tb.clock.advance(300 + ACCESS_SLACK);
    let dropped = jose(&dir, &tb, &old, T0 + 1).await;
    assert_eq!(dropped["code"], "ERR_JWKS_NO_MATCHING_KEY", "{dropped}");
}

/// The environment variable that makes [`edge_host_child`] serve, naming the broker's URL.
const CHILD_BROKER: &str = "WXBROKER_TEST_EDGE_BROKER";

/// An edge host in a process of its own (this test binary, run again by
/// [`a_verifier_process_keeps_verifying_while_the_broker_is_stopped`]): `GET /api/me` behind a
/// [`Verifier`] of the broker named in [`CHILD_BROKER`], and `GET /status`. Prints its URL, then
/// serves until its standard input closes.
#[tokio::test]
#[ignore = "a child process of a_verifier_process_keeps_verifying_while_the_broker_is_stopped"]
async fn edge_host_child() {
    use warp::Filter;
    let Ok(broker) = std::env::var(CHILD_BROKER) else {
        return;
    };
    // Its log goes to the parent's standard error, which the test harness shows on a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("wxbroker=debug")
        .with_writer(std::io::stderr)
        .try_init();
    let mut options = VerifierOptions::new(broker, SANDBOX_APPID, VERIFIER_TOKEN);
    options.max_backoff = Duration::from_millis(500);
    let verifier = Verifier::start(options).unwrap();
    let me = warp::path!("api" / "me")
        .and(verifier.require())
        .map(|claims: Arc<AccessClaims>| {
            warp::reply::json(&json!({ "sub": claims.sub, "sid": claims.sid }))
        })
        .recover(wxbroker::recover);
    let state = verifier.clone();
    let status = warp::path!("status").map(move || {
        warp::reply::json(&json!({
            "synced": state.is_synced(),
            "connected": state.is_connected(),
            "cursor": state.cursor(),
        }))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("EDGE_HOST http://{}", listener.local_addr().unwrap());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            use std::io::Read;
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        })
        .await;
    };
    warp::serve(status.or(me))
        .incoming(listener)
        .graceful(stdin_closed)
        .run()
        .await;
}

/// Prints a child's log when the test fails (the harness shows what a failed test printed).
struct ShowOnPanic(Arc<std::sync::Mutex<String>>);

impl Drop for ShowOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- the edge host's log ---\n{}", self.0.lock().unwrap());
        }
    }
}

/// The `wxbroker` binary in sandbox mode on `port`, with the feed on (as
/// [`crate::binary::command`], which listens on a port of the system's choosing).
fn broker_command(dir: &std::path::Path, port: u16) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxbroker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("WECHAT_") || name.starts_with("WXBROKER_") {
            command.env_remove(name);
        }
    }
    command
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--login-rate-per-min", "0", "--cache-mb", "16"])
        .arg("--data-dir")
        .arg(dir)
        .env("WXBROKER_VERIFIER_TOKEN", VERIFIER_TOKEN)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_process_keeps_verifying_while_the_broker_is_stopped() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = crate::binary::Process::spawn(broker_command(dir.path(), port)).await;
    let http = crate::support::client();
    let login = |code: &'static str| {
        let (http, url) = (http.clone(), broker.url.clone());
        async move {
            let response = http
                .post(format!("{url}/v1/login"))
                .form(&[("code", code)])
                .send()
                .await
                .unwrap();
            let (status, body) = parts(response).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body
        }
    };
    let (first, second, third) = (
        login("kai.1").await,
        login("kai.2").await,
        login("lee.1").await,
    );

    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "edge::edge_host_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_BROKER, &broker.url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The edge host's log, shown if this test fails.
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let _shown = ShowOnPanic(log.clone());
    let mut errors = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = errors.next_line().await {
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let edge = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("EDGE_HOST ") {
                return url.to_owned();
            }
        }
        panic!("the edge host exited before serving");
    })
    .await
    .expect("the edge host serves within 20 s");
    let status = |field: &'static str| {
        let (http, edge) = (http.clone(), edge.clone());
        async move {
            let body: Value = http
                .get(format!("{edge}/status"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body[field] == true
        }
    };
    crate::support::eventually("the edge host read the feed", || status("synced")).await;
    let me = |body: &Value| {
        let (http, edge, token) = (http.clone(), edge.clone(), access(body));
        async move {
            http.get(format!("{edge}/api/me"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(me(&first).await, StatusCode::OK);

    // A logout reaches the other process within a second of its 204.
    let session = |body: &Value| body["thirdSession"].as_str().unwrap().to_owned();
    let took = logout_refused_within_a_second(&http, &broker.url, &session(&first), || async {
        me(&first).await == StatusCode::UNAUTHORIZED
    })
    .await;
    eprintln!("the logout reached the edge host's verifier after {took:?}");

    // The broker stops (as hard as it can): the edge host goes on verifying, tokens it has seen
    // and tokens it has not, and goes on refusing the one logged out.
    broker.kill9().await;
    crate::support::eventually("the edge host noticed", || async {
        !status("connected").await
    })
    .await;
    for body in [&second, &third, &second] {
        assert_eq!(me(body).await, StatusCode::OK);
    }
    assert_eq!(me(&first).await, StatusCode::UNAUTHORIZED);

    // Back on its port: the edge host reconnects, resuming from its cursor (no reset: a token
    // issued before stays valid), and the next logout reaches it as fast. A second passes first,
    // so that a reset (which refuses every token issued before it) would show.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let broker = crate::binary::Process::spawn(broker_command(dir.path(), port)).await;
    crate::support::eventually("the edge host reconnected", || status("connected")).await;
    assert_eq!(me(&third).await, StatusCode::OK);
    logout_refused_within_a_second(&http, &broker.url, &session(&second), || async {
        me(&second).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(me(&third).await, StatusCode::OK);
    drop(child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_logout_on_one_broker_is_refused_by_a_verifier_fed_by_another() {
    use crate::support::RedisServer;
    let redis = Arc::new(RedisServer::start().await);
    let wechat = Arc::new(
        wxbroker::Sandbox::start(wxbroker::SandboxOptions::default())
            .await
            .unwrap(),
    );
    let a = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), with_secrets).await;
    let b = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), with_secrets).await;
    // One key in Redis: both brokers sign with it and publish it.
    assert_eq!(jwks(&a).await, jwks(&b).await);
    assert_eq!(jwks(&a).await.keys.len(), 1);
    let verifier = verifier(&b, |_| {}).await;
    let (first, second) = (login(&a, "amy.1").await, login(&a, "amy.2").await);
    let other = login(&b, "bo.1").await;
    for body in [&first, &second, &other] {
        verifier.check(&access(body)).unwrap();
    }

    let logout = a.logout(first["thirdSession"].as_str().unwrap()).await;
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    let took = refused_within(&verifier, &access(&first), Duration::from_secs(1)).await;
    eprintln!("a logout on broker A reached a verifier fed by broker B after {took:?}");
    let uid = second["uid"].as_u64().unwrap();
    let all = admin(
        &a,
        reqwest::Method::DELETE,
        &format!("/admin/users/{uid}/sessions"),
    )
    .await;
    assert_eq!(all.status(), StatusCode::OK);
    refused_within(&verifier, &access(&second), Duration::from_secs(1)).await;
    verifier.check(&access(&other)).unwrap();

    // A rotation on A: B publishes the new key at once, so the verifier fed by B takes A's new
    // tokens; B signs with it within seconds.
    let rotation = admin(&a, reqwest::Method::POST, "/admin/keys/rotate").await;
    let (_, rotation) = parts(rotation).await;
    let kid = rotation["kid"].as_str().unwrap().to_owned();
    let new = access(&login(&a, "amy.3").await);
    assert_eq!(wxbroker::jwt::parse(&new).unwrap().kid(), kid);
    verifier.verify(&new).await.unwrap();
    let codes = std::sync::atomic::AtomicU32::new(10);
    crate::support::eventually("broker B signs with the new key", || {
        let (b, kid) = (&b, kid.clone());
        let code = format!(
            "bo.{}",
            codes.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        async move {
            let token = access(&login(b, &code).await);
            wxbroker::jwt::parse(&token).unwrap().kid() == kid
        }
    })
    .await;

    // A verifier that comes later is told of what happened before, from either broker.
    for tb in [&a, &b] {
        let late = self::verifier(tb, |_| {}).await;
        assert_eq!(late.check(&access(&first)).err(), Some(Refusal::Revoked));
        assert_eq!(late.check(&access(&second)).err(), Some(Refusal::Revoked));
        late.check(&access(&other)).unwrap();
    }
}

/// Logs `session` out at the broker at `url` and waits until `refused` says so, which must come
/// within a second of the 204; returns how long it took.
async fn logout_refused_within_a_second<F: std::future::Future<Output = bool>>(
    http: &reqwest::Client,
    url: &str,
    session: &str,
    mut refused: impl FnMut() -> F,
) -> Duration {
    let logout = http
        .post(format!("{url}/v1/logout"))
        .bearer_auth(session)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    let started = Instant::now();
    while !refused().await {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}
