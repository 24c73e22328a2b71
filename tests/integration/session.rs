//! GET /v1/session and POST /v1/logout: checks, sliding and absolute expiry, sweep, restarts.

use reqwest::StatusCode;

use crate::support::{T0, TestBroker, assert_error, eventually, parts};

#[tokio::test]
async fn a_missing_or_malformed_token_is_401() {
    let tb = TestBroker::start().await;
    let url = format!("{}/v1/session", tb.url);
    let no_header = tb.http.get(&url).send().await.unwrap();
    assert_eq!(no_header.headers()["www-authenticate"], "Bearer");
    assert_error(no_header, StatusCode::UNAUTHORIZED, "invalid_session").await;
    let unknown = "A".repeat(43);
    for header in [
        "Basic YWxhZGRpbjpvcGVu",
        "Bearer",
        "Bearer short",
        "Bearer+x",
        &format!("Bearer {unknown}"),
    ] {
        let response = tb
            .http
            .get(&url)
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::UNAUTHORIZED, "invalid_session").await;
    }
    assert_error(
        tb.logout("nope").await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
}

#[tokio::test]
async fn logout_ends_the_session_and_survives_a_restart() {
    let tb = TestBroker::start().await;
    let ended = tb.token("kate.1").await;
    let kept = tb.token("kate.2").await;
    let response = tb.logout(&ended).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.bytes().await.unwrap().is_empty());
    assert_error(
        tb.session(&ended).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    assert_error(
        tb.logout(&ended).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;

    let tb = tb.restart().await;
    assert_error(
        tb.session(&ended).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    assert_eq!(tb.session(&kept).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn users_and_sessions_survive_a_restart() {
    let tb = TestBroker::start().await;
    let token = tb.token("liam.1").await;
    tb.token("mia.1").await;

    let tb = tb.restart().await;
    let (status, session) = parts(tb.session(&token).await).await;
    assert_eq!((status, session["uid"].as_u64()), (StatusCode::OK, Some(1)));
    let (_, again) = parts(tb.login("liam.2").await).await;
    assert_eq!(
        (again["uid"].as_u64(), again["isNew"].as_bool()),
        (Some(1), Some(false))
    );
    let (_, new) = parts(tb.login("noah.1").await).await;
    assert_eq!(
        (new["uid"].as_u64(), new["isNew"].as_bool()),
        (Some(3), Some(true))
    );
}

#[tokio::test]
async fn use_slides_the_idle_expiry() {
    let tb = TestBroker::start_with(|c| {
        c.session_idle_ttl = 100;
        c.session_max_ttl = 1000;
    })
    .await;
    let token = tb.token("olga").await;
    for step in 1..=5 {
        tb.clock.advance(99);
        let (status, body) = parts(tb.session(&token).await).await;
        assert_eq!(status, StatusCode::OK, "step {step}");
        assert_eq!(body["expiresAt"].as_u64(), Some(T0 + 99 * step + 100));
    }
    tb.clock.advance(100);
    assert_error(
        tb.session(&token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
}

#[tokio::test]
async fn no_use_extends_a_session_past_its_absolute_ttl() {
    let tb = TestBroker::start_with(|c| {
        c.session_idle_ttl = 100;
        c.session_max_ttl = 250;
    })
    .await;
    let token = tb.token("pia").await;
    tb.clock.advance(90);
    assert_eq!(tb.session(&token).await.status(), StatusCode::OK);
    tb.clock.advance(90);
    let (_, body) = parts(tb.session(&token).await).await;
    assert_eq!(body["expiresAt"].as_u64(), Some(T0 + 250));
    tb.clock.advance(70);
    assert_error(
        tb.session(&token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
}

#[tokio::test]
async fn the_last_use_is_written_back_at_a_clean_stop() {
    let tb = TestBroker::start_with(|c| c.session_idle_ttl = 1000).await;
    let token = tb.token("quin").await;
    // 50 s is under a tenth of the idle TTL: held in memory only, until the stop.
    tb.clock.advance(50);
    assert_eq!(tb.session(&token).await.status(), StatusCode::OK);
    let tb = tb.restart().await;
    // Valid until T0 + 1050 only if the use at T0 + 50 was persisted.
    tb.clock.advance(980);
    assert_eq!(tb.session(&token).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn expired_sessions_are_swept_from_memory_and_disk() {
    let tb = TestBroker::start_with(|c| {
        c.session_idle_ttl = 100;
        c.sweep_interval_secs = 1;
    })
    .await;
    for i in 0..3 {
        tb.token(&format!("rosa.{i}")).await;
    }
    assert_eq!(tb.broker.session_count().await.unwrap(), 3);
    tb.clock.advance(101);
    let broker = tb.broker.clone();
    eventually("the sweep", || {
        let broker = broker.clone();
        async move { broker.session_count().await.unwrap() == 0 }
    })
    .await;
    drop(broker);
    let tb = tb.restart().await;
    assert_eq!(tb.broker.session_count().await.unwrap(), 0);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let tb = TestBroker::start().await;
    let missing = tb
        .http
        .get(format!("{}/v2/nothing", tb.url))
        .send()
        .await
        .unwrap();
    assert_error(missing, StatusCode::NOT_FOUND, "not_found").await;
    let wrong = tb
        .http
        .get(format!("{}/v1/login", tb.url))
        .send()
        .await
        .unwrap();
    assert_error(wrong, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    let (status, body) = parts(
        tb.http
            .get(format!("{}/healthz", tb.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
}
