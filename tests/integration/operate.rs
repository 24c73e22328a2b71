//! What operators and developers build on: metrics, readiness, request ids, the admin surface,
//! the typed client and the session guard for other routes.

use reqwest::StatusCode;
use serde_json::Value;
use wxbroker::{BrokerClient, Error, Sandbox, Secret};

use crate::support::{TestBroker, assert_error, metric, parts};

const ADMIN: &str = "admin-secret-for-tests-at-least-32-chars";

async fn admin(tb: &TestBroker, method: reqwest::Method, path: &str) -> reqwest::Response {
    tb.http
        .request(method, format!("{}{path}", tb.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn metrics_count_logins_checks_upstream_calls_and_flushes() {
    let tb = TestBroker::start().await;
    let token = tb.token("mo.1").await;
    tb.token("mo.2").await;
    assert_eq!(tb.session(&token).await.status(), StatusCode::OK);
    tb.session(&"A".repeat(43)).await;
    tb.login("err40029").await;
    let response = tb
        .http
        .get(format!("{}/metrics", tb.url))
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for (series, value) in [
        (r#"wxbroker_logins_total{outcome="new"}"#, 1.0),
        (r#"wxbroker_logins_total{outcome="returning"}"#, 1.0),
        (r#"wxbroker_logins_total{outcome="invalid_code"}"#, 1.0),
        (r#"wxbroker_session_checks_total{outcome="valid"}"#, 1.0),
        (
            r#"wxbroker_session_checks_total{outcome="invalid_session"}"#,
            1.0,
        ),
        (r#"wxbroker_upstream_errors_total{errcode="40029"}"#, 1.0),
        ("wxbroker_upstream_call_seconds_count", 3.0),
        ("wxbroker_live_sessions", 2.0),
        ("wxbroker_upstream_inflight", 0.0),
    ] {
        assert_eq!(metric(&text, series), Some(value), "{series} in\n{text}");
    }
    // The new user's registration was flushed before its answer.
    let flushes = metric(&text, "wxbroker_store_flush_seconds_count");
    assert!(flushes.is_some_and(|n| n >= 1.0), "{flushes:?} in\n{text}");
}

#[tokio::test]
async fn readiness_and_request_ids() {
    let tb = TestBroker::start().await;
    let (status, body) = parts(
        tb.http
            .get(format!("{}/readyz", tb.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );

    let echoed = tb
        .http
        .get(format!("{}/healthz", tb.url))
        .header("x-request-id", "req-42.a")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "req-42.a");
    let made = tb
        .http
        .get(format!("{}/nope", tb.url))
        .send()
        .await
        .unwrap();
    let id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let junk = tb
        .http
        .get(format!("{}/healthz", tb.url))
        .header("x-request-id", "a b".repeat(40))
        .send()
        .await
        .unwrap();
    assert_ne!(junk.headers()["x-request-id"], "a b".repeat(40).as_str());
}

#[tokio::test]
async fn admin_routes_are_off_without_a_secret_and_refuse_a_wrong_one() {
    let off = TestBroker::start().await;
    assert_error(
        admin(&off, reqwest::Method::GET, "/admin/stats").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    let on = TestBroker::start_with(|c| c.admin_token = Some(Secret::new(ADMIN))).await;
    for header in [None, Some("Bearer wrong"), Some("Basic x")] {
        let mut request = on.http.get(format!("{}/admin/stats", on.url));
        if let Some(header) = header {
            request = request.header("authorization", header);
        }
        assert_error(
            request.send().await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "admin_unauthorized",
        )
        .await;
    }
}

#[tokio::test]
async fn an_admin_finds_users_lists_and_revokes_sessions() {
    let tb = TestBroker::start_with(|c| c.admin_token = Some(Secret::new(ADMIN))).await;
    let first = tb.token("ada.union.1").await;
    let second = tb.token("ada.2").await;
    let third = tb.token("ada.3").await;
    tb.token("bo.1").await;
    let get = reqwest::Method::GET;
    let delete = reqwest::Method::DELETE;

    let (status, by_uid) = parts(admin(&tb, get.clone(), "/admin/users/1").await).await;
    assert_eq!(
        (status, by_uid["openid"].clone()),
        (StatusCode::OK, Value::from(Sandbox::openid_of("ada")))
    );
    let openid = Sandbox::openid_of("ada");
    let (_, by_openid) =
        parts(admin(&tb, get.clone(), &format!("/admin/users?openid={openid}")).await).await;
    let unionid = Sandbox::unionid_of("ada");
    let (_, by_unionid) =
        parts(admin(&tb, get.clone(), &format!("/admin/users?unionid={unionid}")).await).await;
    assert_eq!(
        (by_openid["uid"].as_u64(), by_unionid["uid"].as_u64()),
        (Some(1), Some(1))
    );
    assert_error(
        admin(&tb, get.clone(), "/admin/users/99").await,
        StatusCode::NOT_FOUND,
        "user_not_found",
    )
    .await;
    assert_error(
        admin(&tb, get.clone(), "/admin/users").await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;

    let (_, listed) = parts(admin(&tb, get.clone(), "/admin/users/1/sessions").await).await;
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3);
    let text = listed.to_string();
    for token in [&first, &second, &third] {
        assert!(
            !text.contains(token.as_str()),
            "a session id is not its token"
        );
    }
    let id = sessions[0]["id"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    let revoked = admin(&tb, delete.clone(), &format!("/admin/sessions/{id}")).await;
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert_error(
        admin(&tb, delete.clone(), &format!("/admin/sessions/{id}")).await,
        StatusCode::NOT_FOUND,
        "session_not_found",
    )
    .await;
    let mut alive = 0;
    for token in [&first, &second, &third] {
        if tb.session(token).await.status() == StatusCode::OK {
            alive += 1;
        }
    }
    assert_eq!(alive, 2, "exactly the revoked session ended");

    let (status, all) = parts(admin(&tb, delete, "/admin/users/1/sessions").await).await;
    assert_eq!((status, all["revoked"].as_u64()), (StatusCode::OK, Some(2)));
    for token in [&first, &second, &third] {
        assert_error(
            tb.session(token).await,
            StatusCode::UNAUTHORIZED,
            "invalid_session",
        )
        .await;
    }
    let (_, stats) = parts(admin(&tb, get, "/admin/stats").await).await;
    assert_eq!(
        (stats["users"].as_u64(), stats["liveSessions"].as_u64()),
        (Some(2), Some(1))
    );
}

#[tokio::test]
async fn the_typed_client_checks_sessions_against_the_real_server() {
    let tb = TestBroker::start().await;
    let token = tb.token("cy.1").await;
    let client = BrokerClient::new(&tb.url).unwrap();
    let session = client.check_session(&token).await.unwrap();
    assert_eq!(
        (session.uid, session.openid.as_str()),
        (1, Sandbox::openid_of("cy").as_str())
    );
    assert_eq!(
        client.check_session(&"A".repeat(43)).await,
        Err(Error::InvalidSession)
    );
    tb.logout(&token).await;
    assert_eq!(
        client.check_session(&token).await,
        Err(Error::InvalidSession)
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = BrokerClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    assert!(matches!(
        nowhere.check_session(&token).await,
        Err(Error::Unavailable(_))
    ));
}
