//! Secrets stay secret: no session_key, app secret, token or decrypted text in any log line, and
//! no session_key or secret in any response.

use reqwest::StatusCode;
use serde_json::json;
use wxbroker::{SANDBOX_APPID, Sandbox, Secret};

use crate::support::{TestBroker, fault_upstream, logs, parts};

#[tokio::test]
async fn secrets_never_reach_logs_or_responses() {
    let tb = TestBroker::start().await;
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
    let logs = logs();
    assert!(
        logs.contains("WeChat rejected our credentials"),
        "the bad secret is logged loudly"
    );
    for needle in keys.iter().chain(&tokens) {
        assert!(!logs.contains(needle.as_str()), "logged: {needle}");
    }
    for secret in [secret.expose(), wrong_secret, faulty_secret.expose()] {
        assert!(!logs.contains(secret), "secret logged");
        assert!(!responses.contains(secret), "secret answered");
    }
    assert!(!logs.contains(marker), "decrypted text logged");
    for key in &keys {
        assert!(!responses.contains(key.as_str()), "session_key answered");
    }
    let (status, _) = parts(tb.session(&token).await).await;
    assert_eq!(status, StatusCode::OK);
}
