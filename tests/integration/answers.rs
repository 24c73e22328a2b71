//! What every answer looks like to a newcomer with curl: JSON that ends with a newline, and a hint
//! when a JSON body goes out labelled as something else.

use reqwest::StatusCode;

use crate::support::{TestBroker, assert_error};

#[tokio::test]
async fn every_json_answer_ends_with_a_newline() {
    let tb = TestBroker::start().await;
    let token = tb.token("nell").await;
    let answers = [
        tb.login("nora").await,
        tb.session(&token).await,
        tb.login("").await,
        tb.session("nope").await,
        tb.http
            .get(format!("{}/v1/me", tb.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        tb.http
            .get(format!("{}/healthz", tb.url))
            .send()
            .await
            .unwrap(),
        tb.http
            .get(format!("{}/no/such/route", tb.url))
            .send()
            .await
            .unwrap(),
        tb.http
            .delete(format!("{}/v1/login", tb.url))
            .send()
            .await
            .unwrap(),
    ];
    for response in answers {
        let status = response.status();
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{status}"
        );
        let body = response.text().await.unwrap();
        assert!(body.ends_with("}\n"), "{status}: {body:?}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap();
    }
}

#[tokio::test]
async fn a_json_body_labelled_otherwise_gets_a_hint() {
    let tb = TestBroker::start().await;
    for content_type in ["application/x-www-form-urlencoded", "text/plain"] {
        let response = tb
            .http
            .post(format!("{}/v1/login", tb.url))
            .header("content-type", content_type)
            .body(r#" {"code": "olaf"}"#)
            .send()
            .await
            .unwrap();
        let status = if content_type == "text/plain" {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else {
            StatusCode::BAD_REQUEST
        };
        let code = if content_type == "text/plain" {
            "unsupported_media_type"
        } else {
            "invalid_request"
        };
        let body = assert_error(response, status, code).await;
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("Content-Type: application/json"),
            "{content_type}: {message}"
        );
    }
    // A real form that lacks the code gets no such hint.
    let response = tb
        .http
        .post(format!("{}/v1/login", tb.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("cod=x")
        .send()
        .await
        .unwrap();
    let body = assert_error(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(
        !body["message"]
            .as_str()
            .unwrap()
            .contains("looks like JSON")
    );
}
