//! Secrets stay secret: no session_key, app secret, token, access_token, session_key signature or
//! decrypted text in any log line, and no session_key, secret or access_token in any response.

use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use serde_json::json;
use sha2::Sha256;
use warp::Filter;
use wxbroker::{SANDBOX_APPID, Sandbox, Secret};

use crate::support::{TestBroker, eventually, fault_upstream, logs, parts};

const ADMIN: &str = "secrecy-admin-secret-at-least-32-chars";

/// What WeChat's session_key APIs take as `signature`: as secret as the key for those APIs.
fn signature(session_key: &str) -> String {
    let mac = Hmac::<Sha256>::new_from_slice(session_key.as_bytes()).unwrap();
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn secrets_never_reach_logs_or_responses() {
    let tb = TestBroker::start_with(|c| c.admin_token = Some(Secret::new(ADMIN))).await;
    let secret = tb.config.secret.clone().unwrap();
    let mut responses = String::new();
    let mut tokens = Vec::new();
    for code in [
        "kim.union.1",
        "kim.2",
        "lou.1",
        "err40029.s",
        "err-1.s",
        "err45011.s",
    ] {
        let response = tb.login(code).await;
        let text = response.text().await.unwrap();
        if let Ok(body) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(token) = body["thirdSession"].as_str()
        {
            tokens.push(token.to_owned());
        }
        responses.push_str(&text);
    }
    let token = tokens[1].clone();
    let marker = "Nick-7f3a9c-decrypted";
    let profile = json!({
        "openId": Sandbox::openid_of("kim"),
        "nickName": marker,
        "watermark": { "appid": SANDBOX_APPID, "timestamp": 1 },
    });
    let sealed = tb
        .sandbox
        .encrypt_for("kim", profile.to_string().as_bytes())
        .unwrap();
    for route in ["userinfo", "phone", "me", "session"] {
        let request = if matches!(route, "me" | "session") {
            tb.http.get(format!("{}/v1/{route}", tb.url))
        } else {
            tb.http.post(format!("{}/v1/{route}", tb.url)).json(&sealed)
        };
        responses.push_str(
            &request
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    // A rejected decrypt (not JSON inside) must not log what it decrypted either.
    let junk = tb
        .sandbox
        .encrypt_for("kim", format!("not json {marker}").as_bytes())
        .unwrap();
    let response = tb
        .http
        .post(format!("{}/v1/userinfo", tb.url))
        .bearer_auth(&token)
        .json(&junk)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    tb.logout(&tokens[2]).await;

    // The server APIs carry the access_token (and the session_key APIs a signature) in their
    // queries. The sandbox's errmsg for errNNNNN phone codes echoes the access_token.
    let phone = |code: &str| {
        tb.http
            .post(format!("{}/v1/phone", tb.url))
            .bearer_auth(&token)
            .json(&json!({ "code": code }))
    };
    for code in ["13800138001.s", "err99999.s", "err-1.s"] {
        responses.push_str(&phone(code).send().await.unwrap().text().await.unwrap());
    }
    let verify = || {
        tb.http
            .get(format!("{}/v1/session?verify=wechat", tb.url))
            .bearer_auth(&token)
    };
    responses.push_str(&verify().send().await.unwrap().text().await.unwrap());
    let kim_openid = Sandbox::openid_of("kim");
    let key_before_reset = tb.sandbox.session_key(&kim_openid).unwrap();
    let admin = |request: reqwest::RequestBuilder| request.bearer_auth(ADMIN);
    let (status, kim) = parts(
        admin(
            tb.http
                .get(format!("{}/admin/users?openid={kim_openid}", tb.url)),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{kim}");
    let reset = format!("{}/admin/users/{}/session-key/reset", tb.url, kim["uid"]);
    let response = admin(tb.http.post(&reset)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    responses.push_str(&response.text().await.unwrap());
    responses.push_str(&verify().send().await.unwrap().text().await.unwrap());
    // A stale access_token whose replacement cannot be fetched, then can.
    tb.sandbox.invalidate_access_tokens();
    tb.sandbox.fail_token_requests(1, 1);
    let (status, failed) = parts(phone("13800138002.s").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{failed}");
    responses.push_str(&failed.to_string());
    let mut attempt = 0;
    eventually("a new access_token after the backoff", || {
        attempt += 1;
        let request = phone(&format!("13800138003.{attempt}"));
        async move { parts(request.send().await.unwrap()).await.0 == StatusCode::OK }
    })
    .await;

    // A wrong secret and a garbage upstream are logged loudly, without the secret.
    let wrong_secret = "wrong-secret-4e1d0b";
    let wrong = TestBroker::start_with(|c| c.secret = Some(Secret::new(wrong_secret))).await;
    responses.push_str(&wrong.login("mia.1").await.text().await.unwrap());
    let (url, _) = fault_upstream().await;
    let faulty = TestBroker::start_with(|c| c.api_base = url.parse().unwrap()).await;
    let faulty_secret = faulty.config.secret.clone().unwrap();
    responses.push_str(&faulty.login("garbage").await.text().await.unwrap());

    let keys: Vec<String> = ["kim", "lou"]
        .iter()
        .map(|name| tb.sandbox.session_key(&Sandbox::openid_of(name)).unwrap())
        .collect();
    let access_tokens = tb.sandbox.issued_access_tokens();
    assert_eq!(
        access_tokens.len(),
        2,
        "the first, and the one forced after it went stale"
    );
    let mut signatures: Vec<String> = keys.iter().map(|key| signature(key)).collect();
    signatures.push(signature(&key_before_reset));
    let logs = logs();
    assert!(
        logs.contains("WeChat refused our credentials"),
        "the bad secret is logged loudly"
    );
    assert!(
        logs.contains("access_token=[redacted]"),
        "the echoed access_token is logged scrubbed"
    );
    for needle in access_tokens.iter().chain(&signatures) {
        assert!(!logs.contains(needle.as_str()), "logged: {needle}");
        assert!(!responses.contains(needle.as_str()), "answered: {needle}");
    }
    for needle in keys.iter().chain(&tokens) {
        assert!(!logs.contains(needle.as_str()), "logged: {needle}");
    }
    for secret in [secret.expose(), wrong_secret, faulty_secret.expose()] {
        assert!(!logs.contains(secret), "secret logged");
        assert!(!responses.contains(secret), "secret answered");
    }
    assert!(!logs.contains(marker), "decrypted text logged");
    for key in keys.iter().chain([&key_before_reset]) {
        assert!(!responses.contains(key.as_str()), "session_key answered");
        assert!(!logs.contains(key.as_str()), "session_key logged");
    }
    let (status, _) = parts(tb.session(&token).await).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_private_signing_keys_never_leave_the_store() {
    let verifier_token = "secrecy-verifier-secret-0123456789abcdef";
    let mut tb = TestBroker::start_with(|c| {
        c.admin_token = Some(Secret::new(ADMIN));
        c.verifier_token = Some(Secret::new(verifier_token));
    })
    .await;
    let mut responses = String::new();
    let mut answer = |text: String| responses.push_str(&text);
    let login = tb.login("nia.1").await.text().await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&login).unwrap();
    let session = body["thirdSession"].as_str().unwrap().to_owned();
    answer(login);
    let url = |path: &str| format!("{}{path}", tb.url);
    for _ in 0..2 {
        let rotate = tb.http.post(url("/admin/keys/rotate")).bearer_auth(ADMIN);
        answer(rotate.send().await.unwrap().text().await.unwrap());
        let minted = tb.http.post(url("/v1/token")).bearer_auth(&session);
        answer(minted.send().await.unwrap().text().await.unwrap());
        let jwks = tb.http.get(url("/.well-known/jwks.json"));
        answer(jwks.send().await.unwrap().text().await.unwrap());
    }
    assert_eq!(tb.logout(&session).await.status(), StatusCode::NO_CONTENT);
    let mut feed = tb
        .http
        .get(url("/v1/revocations"))
        .bearer_auth(verifier_token)
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    while !text.contains("event:synced") {
        let chunk = feed.chunk().await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    answer(text);
    drop(feed);
    tb.stop().await;
    let dir = tb.dir.clone();
    drop(tb);

    // The seeds, as the store holds them (base64url), and in other spellings.
    let mut opened = wxbroker::backup::open_for_export(dir.path(), 8);
    for _ in 0..500 {
        if opened.is_ok() {
            break;
        }
        // The stopped broker's last handles let go of sled's lock.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        opened = wxbroker::backup::open_for_export(dir.path(), 8);
    }
    let data = opened.unwrap();
    let stored = data.keys().list().unwrap();
    assert_eq!(stored.len(), 3);
    let mut export = Vec::new();
    wxbroker::backup::export(&data, &mut export).unwrap();
    let export = String::from_utf8(export).unwrap();
    let logs = logs();
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    for key in &stored {
        let record: serde_json::Value = serde_json::from_str(&key.encode()).unwrap();
        let seed = record["seed"].as_str().unwrap();
        let bytes = URL_SAFE_NO_PAD.decode(seed).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // As base64url (stored), base64, hex, and the byte array a derived `Debug` would print.
        for needle in [
            seed.to_owned(),
            STANDARD.encode(&bytes),
            hex,
            format!("{bytes:?}"),
        ] {
            assert!(!responses.contains(&needle), "a private key answered");
            assert!(!logs.contains(&needle), "a private key logged");
            assert!(!export.contains(&needle), "a private key exported");
            assert!(
                !format!("{key:?}").contains(&needle),
                "a private key in Debug"
            );
        }
        // What is published is the public half.
        assert!(responses.contains(&key.kid));
    }
}

/// A WeChat that echoes each request's path and query back in its error, as WeChat's errmsg has
/// been seen to echo request parameters, so that the broker's error text carries the URL with the
/// app secret as reqwest encoded it. The code picks how: `upper.N` the query as sent (escapes
/// `%2B`), `lower.N` with lower-case escapes (`%2b`), `typed.N` as a string where WeChat puts a
/// number, which the JSON error then quotes. Returns the base URL.
async fn echoing_wechat() -> String {
    let route = warp::path!("sns" / "jscode2session")
        .and(warp::path::full())
        .and(warp::query::raw())
        .map(|path: warp::path::FullPath, query: String| {
            let url = format!("{}?{query}", path.as_str());
            let body = if query.contains("js_code=lower.") {
                json!({ "errcode": 99999, "errmsg": format!("bad request {}", lower_escapes(&url)) })
            } else if query.contains("js_code=typed.") {
                json!({ "errcode": url })
            } else {
                json!({ "errcode": 99999, "errmsg": format!("bad request {url}") })
            };
            warp::reply::json(&body)
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(route).incoming(listener).run());
    url
}

/// `url` with the hex digits of its escapes in lower case.
fn lower_escapes(url: &str) -> String {
    let mut bytes = url.as_bytes().to_vec();
    for at in 0..bytes.len() {
        if bytes[at] == b'%' {
            bytes[at + 1..at + 3].make_ascii_lowercase();
        }
    }
    String::from_utf8(bytes).unwrap()
}

/// An app secret with `+`, `/` and `=`, which a URL carries percent-encoded, is scrubbed in that
/// form too (either case of hex digit), from the log and from every answer.
#[tokio::test]
async fn a_secret_is_scrubbed_also_in_the_form_a_url_carries_it() {
    let secret = "S3CRET+val/x=4b7e";
    let url = echoing_wechat().await;
    let tb = TestBroker::start_with(|c| {
        c.api_base = url.parse().unwrap();
        c.secret = Some(Secret::new(secret));
    })
    .await;
    let mut responses = String::new();
    for code in ["upper.4b7e", "lower.4b7e", "typed.4b7e"] {
        let (status, body) = parts(tb.login(code).await).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        responses.push_str(&body.to_string());
    }
    let logs = logs();
    for code in ["upper.4b7e", "lower.4b7e", "typed.4b7e"] {
        // The echo reached the log, scrubbed: else this test would show nothing.
        let line = logs
            .lines()
            .find(|line| line.contains(&format!("js_code={code}")))
            .unwrap_or_else(|| panic!("{code} was not logged"));
        assert!(line.contains("secret=[redacted]&"), "{line}");
    }
    for form in [secret, "S3CRET%2Bval%2Fx%3D4b7e", "S3CRET%2bval%2fx%3d4b7e"] {
        assert!(!logs.contains(form), "logged: {form}");
        assert!(!responses.contains(form), "answered: {form}");
    }
}
