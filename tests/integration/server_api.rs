//! WeChat's server APIs through the broker: the access_token keeper, phone numbers by code, and
//! the session_key check and reset, against the sandbox (and a hanging WeChat) over real HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use wxbroker::{Sandbox, SandboxOptions, Secret};

use crate::support::{TestBroker, assert_error, fault_upstream, me, metric, parts, post};

const ADMIN: &str = "server-api-admin-secret-at-least-32-chars";

/// A fresh phone code for `phone`, from the sandbox's stand-in for the phone-number button.
async fn phone_code(tb: &TestBroker, phone: &str) -> String {
    let url = format!("{}sandbox/phonecode?phone={phone}", tb.sandbox.url());
    let body: Value = tb.http.get(url).send().await.unwrap().json().await.unwrap();
    body["code"].as_str().unwrap().to_owned()
}

async fn phone_by_code(tb: &TestBroker, token: &str, code: &str) -> reqwest::Response {
    post(tb, "phone", token, &json!({ "code": code })).await
}

async fn verify(tb: &TestBroker, token: &str) -> reqwest::Response {
    tb.http
        .get(format!("{}/v1/session?verify=wechat", tb.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn reset(tb: &TestBroker, uid: u64) -> reqwest::Response {
    tb.http
        .post(format!("{}/admin/users/{uid}/session-key/reset", tb.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_phone_number_by_code_is_stored_and_needs_no_session_key() {
    let tb = TestBroker::start().await;
    let token = tb.token("pat.1").await;
    let code = phone_code(&tb, "13900001111").await;
    let (status, phone) = parts(phone_by_code(&tb, &token, &code).await).await;
    assert_eq!(status, StatusCode::OK, "{phone}");
    assert_eq!(phone["phoneNumber"], "13900001111");
    assert_eq!(phone["purePhoneNumber"], "13900001111");
    assert_eq!(phone["countryCode"], "86");
    assert_eq!(me(&tb, &token).await["phone"], phone);

    // The client called wx.login again behind our back: the encrypted form can no longer be
    // opened, the code form still works.
    assert!(tb.sandbox.rotate_session_key("pat"));
    let encrypted = tb.sandbox.encrypted_phone("pat", "13900002222").unwrap();
    let (status, _) = parts(post(&tb, "phone", &token, &encrypted).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let code = phone_code(&tb, "13900002222").await;
    let (status, phone) = parts(phone_by_code(&tb, &token, &code).await).await;
    assert_eq!(status, StatusCode::OK, "{phone}");
    assert_eq!(me(&tb, &token).await["phone"]["phoneNumber"], "13900002222");

    // A code works once.
    assert_error(
        phone_by_code(&tb, &token, &code).await,
        StatusCode::BAD_REQUEST,
        "invalid_phone_code",
    )
    .await;
}

#[tokio::test]
async fn phone_requests_are_checked_and_errcodes_map_like_logins() {
    let tb = TestBroker::start_with(|c| c.upstream_retries = 1).await;
    let token = tb.token("quinn.1").await;
    for body in [
        json!({}),
        json!({ "errMsg": "getPhoneNumber:fail user deny" }),
        json!({ "encryptedData": "AAAA" }),
        json!({ "code": "" }),
        json!({ "code": "a b" }),
    ] {
        assert_error(
            post(&tb, "phone", &token, &body).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
    }
    assert_error(
        phone_by_code(&tb, "not-a-token", "139.1").await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    let cases = [
        ("err45011", StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        ("err-1", StatusCode::SERVICE_UNAVAILABLE, "upstream_busy"),
        ("err40029", StatusCode::BAD_REQUEST, "invalid_phone_code"),
        ("err99999", StatusCode::BAD_GATEWAY, "upstream_error"),
        ("not-digits", StatusCode::BAD_REQUEST, "invalid_phone_code"),
    ];
    for (code, status, error) in cases {
        assert_error(phone_by_code(&tb, &token, code).await, status, error).await;
    }
    // The button's whole e.detail, code and encrypted form both (newer base libraries): the
    // code is used, so a bad encrypted form does not matter, and the extra fields are ignored.
    let code = phone_code(&tb, "13700000001").await;
    let detail = json!({
        "errMsg": "getPhoneNumber:ok",
        "code": code,
        "encryptedData": "AAAA",
        "iv": "AAAA",
        "cloudID": "cloud-1",
    });
    let (status, phone) = parts(post(&tb, "phone", &token, &detail).await).await;
    assert_eq!(status, StatusCode::OK, "{phone}");
    assert_eq!(phone["purePhoneNumber"], "13700000001");
    // The form body works too, as for the other routes.
    let code = phone_code(&tb, "13700000000").await;
    let response = tb
        .http
        .post(format!("{}/v1/phone", tb.url))
        .bearer_auth(&token)
        .form(&[("code", code.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(parts(response).await.0, StatusCode::OK);
    assert_eq!(tb.sandbox.token_requests(), 1, "one token served them all");
}

#[tokio::test]
async fn concurrent_callers_during_a_fetch_share_one_token_request() {
    let sandbox = Sandbox::start(SandboxOptions {
        latency: Duration::from_millis(100),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let tb = Arc::new(TestBroker::start_on(Arc::new(sandbox), |_| {}).await);
    let token = tb.token("rae.1").await;
    let mut calls = Vec::new();
    for i in 0..30 {
        let (tb, token) = (tb.clone(), token.clone());
        calls.push(tokio::spawn(async move {
            let code = format!("1380000{i:04}.x");
            parts(phone_by_code(&tb, &token, &code).await).await
        }));
    }
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(tb.sandbox.token_requests(), 1);
    // Held, not fetched again.
    let code = phone_code(&tb, "13800009999").await;
    assert_eq!(
        parts(phone_by_code(&tb, &token, &code).await).await.0,
        StatusCode::OK
    );
    assert_eq!(tb.sandbox.token_requests(), 1);
}

#[tokio::test]
async fn stable_token_failing_falls_back_to_cgi_bin_token() {
    let tb = TestBroker::start().await;
    let token = tb.token("sol.1").await;
    tb.sandbox.fail_token_requests(1, 0);
    let code = phone_code(&tb, "13800000001").await;
    let (status, body) = parts(phone_by_code(&tb, &token, &code).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        tb.sandbox.token_requests(),
        2,
        "stable_token, then cgi-bin/token"
    );
}

#[tokio::test]
async fn a_failed_fetch_answers_its_callers_and_is_retried() {
    // With WeChat this slow, a fetch (both endpoints) is in flight for 600 ms: every caller
    // joins it, however late the scheduler starts it.
    let sandbox = Sandbox::start(SandboxOptions {
        latency: Duration::from_millis(300),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let tb = Arc::new(TestBroker::start_on(Arc::new(sandbox), |_| {}).await);
    let token = tb.token("tao.1").await;
    // Two fetches fail, the third succeeds.
    tb.sandbox.fail_token_requests(2, 2);
    let mut calls = Vec::new();
    for i in 0..10 {
        let (tb, token) = (tb.clone(), token.clone());
        calls.push(tokio::spawn(async move {
            let code = format!("1390000{i:04}.x");
            parts(phone_by_code(&tb, &token, &code).await).await
        }));
    }
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_GATEWAY, Some("upstream_error")),
            "{body}"
        );
    }
    assert_eq!(
        tb.sandbox.token_requests(),
        2,
        "one fetch: both endpoints once"
    );

    // Callers keep asking until one gets a token. During the backoffs after each failure
    // (250 ms, then 500 ms) they get the failure without a fetch.
    let started = Instant::now();
    let mut answered_from_backoff = 0;
    for i in 0.. {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never recovered"
        );
        let before = tb.sandbox.token_requests();
        let code = format!("1390001{i:04}.y");
        let (status, body) = parts(phone_by_code(&tb, &token, &code).await).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        if tb.sandbox.token_requests() == before {
            answered_from_backoff += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered_from_backoff > 0, "every failure was a new fetch");
    assert_eq!(
        tb.sandbox.token_requests(),
        5,
        "one fetch per round: two failed (both endpoints), one served by stable_token"
    );
    let metrics = tb
        .http
        .get(format!("{}/metrics", tb.url))
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    let fetches = |outcome: &str| {
        let series = format!("wxbroker_access_token_fetches_total{{outcome=\"{outcome}\"}}");
        metric(&metrics, &series)
    };
    assert_eq!(
        (fetches("ok"), fetches("upstream_error")),
        (Some(1.0), Some(2.0)),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_hanging_token_endpoint_does_not_wedge_callers() {
    let (url, requests) = fault_upstream().await;
    let tb = Arc::new(
        TestBroker::start_with(|c| {
            c.api_base = url.parse().unwrap();
            c.upstream_timeout_ms = 300;
        })
        .await,
    );
    let token = tb.token("fine.1").await;
    let before = requests.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..10 {
        let (tb, token) = (tb.clone(), token.clone());
        calls.push(tokio::spawn(async move {
            phone_by_code(&tb, &token, &format!("1{i}.x")).await
        }));
    }
    for call in calls {
        assert_error(
            call.await.unwrap(),
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
        )
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let after = requests.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        after - before,
        1,
        "one fetch: stable_token only, a timeout does not fall back to cgi-bin/token"
    );
    // Logins do not depend on the token keeper.
    tb.token("fine.2").await;
}

#[tokio::test]
async fn a_token_reported_stale_is_replaced_once() {
    let tb = Arc::new(TestBroker::start().await);
    let token = tb.token("uma.1").await;
    let code = phone_code(&tb, "13800000002").await;
    assert_eq!(
        parts(phone_by_code(&tb, &token, &code).await).await.0,
        StatusCode::OK
    );
    assert_eq!(tb.sandbox.token_requests(), 1);

    tb.sandbox.invalidate_access_tokens();
    let mut calls = Vec::new();
    for i in 0..20 {
        let (tb, token) = (tb.clone(), token.clone());
        calls.push(tokio::spawn(async move {
            let code = format!("1370000{i:04}.x");
            parts(phone_by_code(&tb, &token, &code).await).await
        }));
    }
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // stable_token answers the stale token until forced: one plain fetch brings it back, then
    // one forced fetch replaces it, for all of them.
    assert_eq!(
        tb.sandbox.token_requests(),
        3,
        "the first fetch, one plain fetch, one forced fetch"
    );
}

#[tokio::test]
async fn verify_wechat_tells_a_client_its_session_key_went_stale() {
    let tb = TestBroker::start().await;
    let token = tb.token("vic.1").await;
    let (status, body) = parts(verify(&tb, &token).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sessionKeyValid"], true);
    assert_eq!(body["uid"], 1);
    assert_eq!(body["openid"], Sandbox::openid_of("vic"));

    tb.sandbox.rotate_session_key("vic");
    // WeChat's "valid" of a moment ago is reused for a minute (see the test below); past it,
    // WeChat is asked again.
    tb.clock.advance(60);
    let body = assert_error(
        verify(&tb, &token).await,
        StatusCode::UNAUTHORIZED,
        "session_key_expired",
    )
    .await;
    assert_eq!(body["relogin"], true);
    // The session itself is still good for everything but decrypting.
    assert_eq!(parts(tb.session(&token).await).await.0, StatusCode::OK);

    let token = tb.token("vic.2").await;
    assert_eq!(parts(verify(&tb, &token).await).await.0, StatusCode::OK);

    let other = tb
        .http
        .get(format!("{}/v1/session?verify=facebook", tb.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(other, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_error(
        verify(&tb, "no-such-token").await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
}

#[tokio::test]
async fn an_admin_reset_rotates_the_session_key_at_wechat_and_here() {
    let tb = TestBroker::start_with(|c| c.admin_token = Some(Secret::new(ADMIN))).await;
    let token = tb.token("wen.1").await;
    let openid = Sandbox::openid_of("wen");
    let before = tb.sandbox.session_key(&openid).unwrap();

    assert_eq!(reset(&tb, 1).await.status(), StatusCode::NO_CONTENT);
    let after = tb.sandbox.session_key(&openid).unwrap();
    assert_ne!(before, after, "WeChat holds a new key");
    // The broker holds the same new key: WeChat accepts it, and data sealed with it opens.
    assert_eq!(parts(verify(&tb, &token).await).await.0, StatusCode::OK);
    let profile = tb.sandbox.encrypted_profile("wen").unwrap();
    assert_eq!(
        parts(post(&tb, "userinfo", &token, &profile).await).await.0,
        StatusCode::OK
    );
    // And the new key survives a restart.
    let tb = tb.restart().await;
    assert_eq!(parts(verify(&tb, &token).await).await.0, StatusCode::OK);

    assert_error(
        reset(&tb, 99).await,
        StatusCode::NOT_FOUND,
        "user_not_found",
    )
    .await;
    tb.sandbox.rotate_session_key("wen");
    assert_error(
        reset(&tb, 1).await,
        StatusCode::CONFLICT,
        "session_key_expired",
    )
    .await;
    let unauthorized = tb
        .http
        .post(format!("{}/admin/users/1/session-key/reset", tb.url))
        .send()
        .await
        .unwrap();
    assert_error(unauthorized, StatusCode::UNAUTHORIZED, "admin_unauthorized").await;
    let text = tb
        .http
        .get(format!("{}/admin/users/1", tb.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains(&after),
        "the session_key never leaves the broker"
    );
}

/// `POST /v1/phone {"code"}` with a fresh code for a number of `i`: one call to WeChat each.
async fn phone_by_new_code(tb: &TestBroker, token: &str, i: usize) -> reqwest::Response {
    phone_by_code(tb, token, &format!("1390000{i:04}.n")).await
}

/// Asserts a 429 `rate_limited` whose `Retry-After` sends the client to the next minute of the
/// broker's clock; returns the seconds.
async fn assert_budget_spent(response: reqwest::Response, tb: &TestBroker) -> u64 {
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    assert_error(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let to_next_minute = 60 - tb.clock.now() % 60;
    assert_eq!(retry_after, Some(to_next_minute));
    to_next_minute
}

#[tokio::test]
async fn wechat_calls_are_rationed_per_user() {
    let tb = TestBroker::start_with(|c| c.wechat_calls_per_min = 20).await;
    let (yan, zoe) = (tb.token("yan.1").await, tb.token("zoe.1").await);
    let mut answered = Vec::new();
    for i in 0..25 {
        let response = phone_by_new_code(&tb, &yan, i).await;
        if i < 20 {
            assert_eq!(parts(response).await.0, StatusCode::OK, "call {i}");
        } else {
            answered.push(assert_budget_spent(response, &tb).await);
        }
    }
    assert_eq!(answered.len(), 5);
    assert_eq!(
        tb.sandbox.phone_number_requests(),
        20,
        "the rest never reached WeChat"
    );
    // The budget is the user's, whatever the route: a check with WeChat is refused too.
    assert_budget_spent(verify(&tb, &yan).await, &tb).await;
    assert_eq!(tb.sandbox.checksession_requests(), 0);
    // And only the user's: another one is served.
    assert_eq!(
        parts(phone_by_new_code(&tb, &zoe, 100).await).await.0,
        StatusCode::OK
    );
    // A check that WeChat answered "valid" is reused without spending: zoe checks far more
    // often than her budget allows, and WeChat is asked once.
    for _ in 0..25 {
        assert_eq!(parts(verify(&tb, &zoe).await).await.0, StatusCode::OK);
    }
    assert_eq!(tb.sandbox.checksession_requests(), 1);
    // Once the minute ends, yan may call again.
    tb.clock.advance(answered[0]);
    assert_eq!(
        parts(phone_by_new_code(&tb, &yan, 200).await).await.0,
        StatusCode::OK
    );
    assert_eq!(tb.sandbox.phone_number_requests(), 22);
}

#[tokio::test]
async fn a_budget_of_zero_rations_nothing() {
    let tb = TestBroker::start_with(|c| c.wechat_calls_per_min = 0).await;
    let token = tb.token("abe.1").await;
    for i in 0..25 {
        let (status, body) = parts(phone_by_new_code(&tb, &token, i).await).await;
        assert_eq!(status, StatusCode::OK, "call {i}: {body}");
    }
    assert_eq!(tb.sandbox.phone_number_requests(), 25);
}

#[tokio::test]
async fn a_valid_checksession_answer_is_reused_for_a_minute_per_session_key() {
    let tb = TestBroker::start_with(|c| c.admin_token = Some(Secret::new(ADMIN))).await;
    let checks = || tb.sandbox.checksession_requests();
    let ok = |response: reqwest::Response| async {
        let (status, body) = parts(response).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["sessionKeyValid"], true);
    };
    let token = tb.token("xia.1").await;
    for _ in 0..5 {
        ok(verify(&tb, &token).await).await;
    }
    assert_eq!(checks(), 1, "WeChat's answer was reused");

    // For a minute.
    tb.clock.advance(59);
    ok(verify(&tb, &token).await).await;
    assert_eq!(checks(), 1);
    tb.clock.advance(1);
    ok(verify(&tb, &token).await).await;
    assert_eq!(checks(), 2, "asked again after a minute");

    // For the session_key it was about: a new login stores another, for every session of the
    // user.
    let token2 = tb.token("xia.2").await;
    ok(verify(&tb, &token2).await).await;
    assert_eq!(checks(), 3);
    ok(verify(&tb, &token).await).await;
    assert_eq!(checks(), 3, "the other session has the same user and key");
    // A reset stores another too.
    assert_eq!(reset(&tb, 1).await.status(), StatusCode::NO_CONTENT);
    ok(verify(&tb, &token).await).await;
    assert_eq!(checks(), 4);

    // What a reused answer cannot see: wx.login called behind the broker's back. Within the
    // minute the answer is still "valid"; data sealed with the new key does not open, which
    // drops the answer, and WeChat is asked again.
    tb.sandbox.rotate_session_key("xia");
    ok(verify(&tb, &token).await).await;
    assert_eq!(checks(), 4);
    let profile = tb.sandbox.encrypted_profile("xia").unwrap();
    assert_error(
        post(&tb, "userinfo", &token, &profile).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "decrypt_failed",
    )
    .await;
    for expected in [5, 6] {
        assert_error(
            verify(&tb, &token).await,
            StatusCode::UNAUTHORIZED,
            "session_key_expired",
        )
        .await;
        assert_eq!(checks(), expected, "a stale key's answer is never reused");
    }
}

#[tokio::test]
async fn the_binary_rations_wechat_calls_per_user() {
    use crate::binary::{Process, command};
    let dir = tempfile::tempdir().unwrap();
    let mut started = command(dir.path());
    started.args(["--wechat-calls-per-min", "2"]);
    let process = Process::spawn(started).await;
    let http = crate::support::client();
    let login = http
        .post(format!("{}/v1/login", process.url))
        .json(&json!({ "code": "bin.1" }))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(login).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["thirdSession"].as_str().unwrap().to_owned();
    let minute = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 60
    };
    // Three calls within one minute of the wall clock: two are served, the third is refused.
    // Calls that straddle a minute are made again in a minute none of them touched.
    let mut fresh_from = minute();
    for attempt in 0..3 {
        let waiting = Instant::now();
        while minute() < fresh_from {
            assert!(waiting.elapsed() < Duration::from_secs(70));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let first_minute = minute();
        let mut statuses = Vec::new();
        let mut retry_after = None;
        for i in 0..3 {
            let response = http
                .post(format!("{}/v1/phone", process.url))
                .bearer_auth(&token)
                .json(&json!({ "code": format!("1380000{attempt}{i:03}.b") }))
                .send()
                .await
                .unwrap();
            retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .cloned();
            statuses.push(parts(response).await.0);
        }
        if minute() != first_minute {
            fresh_from = minute() + 1;
            continue;
        }
        assert_eq!(
            statuses,
            [
                StatusCode::OK,
                StatusCode::OK,
                StatusCode::TOO_MANY_REQUESTS
            ]
        );
        let secs: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&secs), "{secs}");
        return;
    }
    panic!("three calls never fitted in one minute");
}
