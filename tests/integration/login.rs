//! POST /v1/login: the happy path, every error row, single-flight codes and the in-flight limit.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use wxbroker::{Sandbox, SandboxOptions};

use crate::support::{TestBroker, assert_error, fault_upstream, metric, parts};

#[tokio::test]
async fn a_new_user_logs_in_and_a_returning_one_keeps_the_uid() {
    let tb = TestBroker::start().await;
    // The classic mini program snippet posts a form.
    let response = tb
        .http
        .post(format!("{}/v1/login", tb.url))
        .form(&[("code", "alice.1")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "no-store");
    let (status, first) = parts(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["isNew"], true);
    assert_eq!(first["uid"], 1);
    assert_eq!(first["expiresIn"], 7200);
    let token = first["thirdSession"].as_str().unwrap();
    assert_eq!(token.len(), 43);

    let (status, again) = parts(tb.login("alice.2").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (again["isNew"].clone(), again["uid"].clone()),
        (false.into(), 1.into())
    );
    assert_ne!(again["thirdSession"], first["thirdSession"]);

    let (status, bob) = parts(tb.login("bob").await).await;
    assert_eq!(
        (status, bob["uid"].clone(), bob["isNew"].clone()),
        (StatusCode::OK, 2.into(), true.into())
    );

    let (status, session) = parts(tb.session(token).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(session["uid"], 1);
    assert_eq!(session["openid"], Sandbox::openid_of("alice"));
    assert_eq!(session["unionid"], serde_json::Value::Null);
}

#[tokio::test]
async fn the_session_key_never_reaches_the_client() {
    let tb = TestBroker::start().await;
    let response = tb.login("carol.1").await;
    let body = response.text().await.unwrap();
    let key = tb
        .sandbox
        .session_key(&Sandbox::openid_of("carol"))
        .unwrap();
    assert!(
        !body.contains(&key) && !body.contains("session_key"),
        "{body}"
    );
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let session = tb
        .session(token["thirdSession"].as_str().unwrap())
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !session.contains(&key) && !session.contains("session_key"),
        "{session}"
    );
}

#[tokio::test]
async fn a_unionid_reported_once_is_kept() {
    let tb = TestBroker::start().await;
    let with_union = tb.token("dave.union.1").await;
    let (_, session) = parts(tb.session(&with_union).await).await;
    assert_eq!(session["unionid"], Sandbox::unionid_of("dave"));

    // WeChat does not repeat it on this login; the stored one still shows.
    let without = tb.token("dave.2").await;
    let (_, session) = parts(tb.session(&without).await).await;
    assert_eq!(session["unionid"], Sandbox::unionid_of("dave"));

    // A session from before WeChat first reported it learns it too.
    let early = tb.token("eli.1").await;
    tb.token("eli.union.2").await;
    let (_, session) = parts(tb.session(&early).await).await;
    assert_eq!(session["unionid"], Sandbox::unionid_of("eli"));
}

#[tokio::test]
async fn malformed_requests_are_400_and_never_reach_wechat() {
    let tb = TestBroker::start().await;
    let post = |body: &'static str, content_type: &'static str| {
        tb.http
            .post(format!("{}/v1/login", tb.url))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let json = "application/json";
    let form = "application/x-www-form-urlencoded";
    let long = Box::leak(format!(r#"{{"code":"{}"}}"#, "a".repeat(300)).into_boxed_str());
    for (body, content_type) in [
        ("{}", json),
        (r#"{"code":""}"#, json),
        (r#"{"code":42}"#, json),
        (r#"{"code":"abc"#, json),
        (r#"{"code":"a b"}"#, json),
        (long, json),
        ("", form),
        ("other=1", form),
        ("code=", form),
    ] {
        let body = assert_error(
            post(body, content_type).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        assert!(
            !body["message"].as_str().unwrap().contains("Error("),
            "{body}"
        );
    }
    assert_error(
        post("code=x", "text/plain").await.unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let huge = tb
        .http
        .post(format!("{}/v1/login", tb.url))
        .header("content-type", json)
        .body(vec![b' '; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_error(huge, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert_eq!(tb.sandbox.exchanges(), 0);
}

#[tokio::test]
async fn wechat_errcodes_map_to_their_statuses() {
    let tb = TestBroker::start_with(|c| c.upstream_retries = 2).await;
    let cases = [
        ("err40029", StatusCode::UNAUTHORIZED, "invalid_code"),
        ("err40163", StatusCode::UNAUTHORIZED, "code_used"),
        ("err40226", StatusCode::FORBIDDEN, "risky_user"),
        ("err40013", StatusCode::BAD_GATEWAY, "upstream_error"),
        ("err40125", StatusCode::BAD_GATEWAY, "upstream_error"),
        ("err99999", StatusCode::BAD_GATEWAY, "upstream_error"),
    ];
    for (code, status, error) in cases {
        assert_error(tb.login(code).await, status, error).await;
    }

    let limited = tb.login("err45011").await;
    assert_eq!(limited.headers()["retry-after"], "60");
    assert_error(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    // "System busy" is retried (twice here) before the broker gives up.
    let before = tb.sandbox.exchanges();
    let busy = tb.login("err-1").await;
    assert!(busy.headers().contains_key("retry-after"));
    assert_error(busy, StatusCode::SERVICE_UNAVAILABLE, "upstream_busy").await;
    assert_eq!(tb.sandbox.exchanges() - before, 3);
}

#[tokio::test]
async fn a_wrong_secret_is_a_502_that_does_not_leak_it() {
    let tb =
        TestBroker::start_with(|c| c.secret = Some(wxbroker::Secret::new("not-the-secret"))).await;
    let body = assert_error(
        tb.login("erin").await,
        StatusCode::BAD_GATEWAY,
        "upstream_error",
    )
    .await;
    assert!(!body.to_string().contains("not-the-secret"));
}

#[tokio::test]
async fn a_code_already_exchanged_is_refused_without_asking_wechat() {
    let tb = TestBroker::start().await;
    tb.token("frank.1").await;
    let before = tb.sandbox.exchanges();
    assert_error(
        tb.login("frank.1").await,
        StatusCode::UNAUTHORIZED,
        "code_used",
    )
    .await;
    assert_eq!(tb.sandbox.exchanges(), before);
}

#[tokio::test]
async fn concurrent_requests_with_one_code_make_one_upstream_call() {
    let sandbox = Sandbox::start(SandboxOptions {
        latency: Duration::from_millis(300),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let tb = TestBroker::start_on(Arc::new(sandbox), |_| {}).await;
    let answers = join_all((0..20).map(|_| tb.login("gina.1"))).await;
    let mut uids = HashSet::new();
    let mut tokens = HashSet::new();
    for answer in answers {
        let (status, body) = parts(answer).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        uids.insert(body["uid"].as_u64().unwrap());
        tokens.insert(body["thirdSession"].as_str().unwrap().to_owned());
    }
    assert_eq!(tb.sandbox.exchanges(), 1);
    assert_eq!(uids.len(), 1);
    assert_eq!(tokens.len(), 20, "every request gets a token of its own");
}

#[tokio::test]
async fn logins_beyond_the_in_flight_limit_get_503_at_once() {
    let sandbox = Sandbox::start(SandboxOptions {
        latency: Duration::from_millis(500),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let tb = TestBroker::start_on(Arc::new(sandbox), |c| c.max_inflight = 2).await;
    let codes: Vec<String> = (0..6).map(|i| format!("hank.{i}")).collect();
    let answers = join_all(codes.iter().map(|code| tb.login(code))).await;
    let mut ok = 0;
    for answer in answers {
        match answer.status() {
            StatusCode::OK => ok += 1,
            _ => {
                assert_error(answer, StatusCode::SERVICE_UNAVAILABLE, "upstream_busy").await;
            }
        }
    }
    assert_eq!(ok, 2);
    assert_eq!(tb.sandbox.exchanges(), 2);
    // Once the exchanges are done, there is room again.
    tb.token("hank.later").await;
}

#[tokio::test]
async fn an_unusable_or_silent_wechat_is_502_or_504() {
    let (url, _calls) = fault_upstream().await;
    let tb = TestBroker::start_with(|c| {
        c.api_base = url.parse().unwrap();
        c.upstream_timeout_ms = 300;
    })
    .await;
    for code in ["http500", "garbage", "truncated"] {
        assert_error(
            tb.login(code).await,
            StatusCode::BAD_GATEWAY,
            "upstream_error",
        )
        .await;
    }
    let started = std::time::Instant::now();
    assert_error(
        tb.login("hang").await,
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // And a sane answer from the same upstream works.
    let (status, _) = parts(tb.login("fine").await).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_refused_connection_is_502() {
    // Bind and drop a listener to find a port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tb = TestBroker::start_with(|c| {
        c.api_base = format!("http://127.0.0.1:{port}/").parse().unwrap()
    })
    .await;
    assert_error(
        tb.login("ivan").await,
        StatusCode::BAD_GATEWAY,
        "upstream_error",
    )
    .await;
}

#[tokio::test]
async fn tokens_are_unique_and_well_formed() {
    let tb = TestBroker::start().await;
    let mut tokens = HashSet::new();
    for i in 0..100 {
        let token = tb.token(&format!("user{}.{i}", i % 7)).await;
        assert_eq!(token.len(), 43);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{token}"
        );
        tokens.insert(token);
    }
    assert_eq!(tokens.len(), 100);
}

#[tokio::test]
async fn two_brokers_in_one_process_do_not_collide() {
    let a = TestBroker::start().await;
    let b = TestBroker::start().await;
    let token_a = a.token("jane").await;
    let token_b = b.token("jane").await;
    assert_eq!(a.session(&token_a).await.status(), StatusCode::OK);
    assert_eq!(b.session(&token_b).await.status(), StatusCode::OK);
    assert_error(
        a.session(&token_b).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    // Each counts its own.
    for broker in [&a.broker, &b.broker] {
        let metrics = broker.metrics().render();
        assert_eq!(
            metric(&metrics, r#"wxbroker_logins_total{outcome="new"}"#),
            Some(1.0),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn a_chunked_body_without_content_length_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tb = TestBroker::start().await;
    let mut stream = tokio::net::TcpStream::connect(tb.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let body = r#"{"code":"vera.1"}"#;
    let request = format!(
        "POST /v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("thirdSession"), "{answer}");
}
