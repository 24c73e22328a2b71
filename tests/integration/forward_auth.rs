//! ANY /v1/auth[/...]: forward auth for a proxy. Headers, never a body; 401 with a challenge.

use reqwest::{Method, StatusCode};
use wxbroker::Sandbox;

use crate::support::{T0, TestBroker, parts};

#[tokio::test]
async fn a_valid_token_answers_the_user_in_headers_for_any_method_and_path() {
    let tb = TestBroker::start().await;
    let token = tb.token("ana.union").await;
    let (_, session) = parts(tb.session(&token).await).await;
    for (method, path) in [
        (Method::GET, "/v1/auth"),
        (Method::GET, "/v1/auth/orders/17?page=2"),
        (Method::POST, "/v1/auth/orders"),
        (Method::DELETE, "/v1/auth/x/y/z"),
        (Method::HEAD, "/v1/auth"),
    ] {
        let response = tb
            .http
            .request(method.clone(), format!("{}{path}", tb.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{method} {path}");
        let headers = response.headers().clone();
        assert_eq!(headers["x-wx-uid"], session["uid"].to_string().as_str());
        assert_eq!(headers["x-wx-openid"], session["openid"].as_str().unwrap());
        assert_eq!(headers["x-wx-unionid"], Sandbox::unionid_of("ana").as_str());
        assert!(
            response.bytes().await.unwrap().is_empty(),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn a_user_without_unionid_gets_no_unionid_header() {
    let tb = TestBroker::start().await;
    let token = tb.token("bo").await;
    let response = tb
        .http
        .get(format!("{}/v1/auth", tb.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-wx-openid"));
    assert!(!response.headers().contains_key("x-wx-unionid"));
}

#[tokio::test]
async fn no_valid_token_is_401_with_a_challenge_and_no_body() {
    let tb = TestBroker::start().await;
    let token = tb.token("cy").await;
    assert_eq!(tb.logout(&token).await.status(), StatusCode::NO_CONTENT);
    let unknown = format!("Bearer {}", "A".repeat(43));
    let logged_out = format!("Bearer {token}");
    for authorization in [
        None,
        Some("Basic YWxhZGRpbjpvcGVu"),
        Some("Bearer"),
        Some(&*unknown),
        Some(&*logged_out),
    ] {
        let mut request = tb.http.get(format!("{}/v1/auth/orders", tb.url));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{authorization:?}"
        );
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert!(!response.headers().contains_key("x-wx-uid"));
        assert!(
            response.bytes().await.unwrap().is_empty(),
            "{authorization:?}"
        );
    }
}

#[tokio::test]
async fn forward_auth_slides_the_idle_expiry_like_the_session_check() {
    let tb = TestBroker::start_with(|c| {
        c.session_idle_ttl = 100;
        c.session_max_ttl = 1000;
    })
    .await;
    let token = tb.token("dee").await;
    for step in 1..=3 {
        tb.clock.advance(99);
        let response = tb
            .http
            .get(format!("{}/v1/auth", tb.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "step {step}");
    }
    // Only the three forward-auth checks kept it alive past its first idle expiry (T0 + 100).
    let (status, body) = parts(tb.session(&token).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["expiresAt"].as_u64(), Some(T0 + 3 * 99 + 100));
}
