//! POST /v1/userinfo, POST /v1/phone, GET /v1/me: encrypted user data end to end.

use reqwest::StatusCode;
use serde_json::{Value, json};
use wxbroker::{EncryptedData, SANDBOX_APPID, Sandbox, UserKey};

use crate::support::{TestBroker, assert_error, me, parts, post};

fn profile_text(name: &str, appid: &str, union_id: Option<&str>) -> String {
    let mut profile = json!({
        "openId": Sandbox::openid_of(name),
        "nickName": name,
        "gender": 1,
        "watermark": { "appid": appid, "timestamp": 1_790_000_000 },
    });
    if let Some(union_id) = union_id {
        profile["unionId"] = json!(union_id);
    }
    profile.to_string()
}

#[tokio::test]
async fn a_profile_is_decrypted_stored_and_shown() {
    let tb = TestBroker::start().await;
    let token = tb.token("ann.union.1").await;
    let data = tb.sandbox.encrypted_profile("ann").unwrap();
    let (status, profile) = parts(post(&tb, "userinfo", &token, &data).await).await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile["nickName"], "ann");
    assert_eq!(profile["openId"], Sandbox::openid_of("ann"));
    assert_eq!(profile["unionId"], Sandbox::unionid_of("ann"));
    assert_eq!(profile["city"], "Shenzhen");
    assert!(profile.get("watermark").is_none(), "{profile}");

    let me = me(&tb, &token).await;
    assert_eq!(me["uid"], 1);
    assert_eq!(me["unionid"], Sandbox::unionid_of("ann"));
    assert_eq!(me["profile"]["nickName"], "ann");
    assert_eq!(me["phone"], Value::Null);
    assert!(me["createdAt"].as_u64().is_some() && me["updatedAt"].as_u64().is_some());
    let text = me.to_string();
    let key = tb.sandbox.session_key(&Sandbox::openid_of("ann")).unwrap();
    assert!(!text.contains(&key) && !text.contains("session_key") && !text.contains("sessionKey"));
}

#[tokio::test]
async fn a_unionid_learned_from_a_profile_shows_in_the_session_and_finds_the_user() {
    let tb = TestBroker::start().await;
    let token = tb.token("ben.1").await;
    let (_, session) = parts(tb.session(&token).await).await;
    assert_eq!(session["unionid"], Value::Null);

    let data = tb
        .sandbox
        .encrypt_for(
            "ben",
            profile_text("ben", SANDBOX_APPID, Some("u-ben")).as_bytes(),
        )
        .unwrap();
    assert_eq!(
        post(&tb, "userinfo", &token, &data).await.status(),
        StatusCode::OK
    );
    let (_, session) = parts(tb.session(&token).await).await;
    assert_eq!(session["unionid"], "u-ben");
    let found = tb
        .broker
        .find_user(UserKey::Unionid("u-ben".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((found.uid, found.openid), (1, Sandbox::openid_of("ben")));

    // Durable and rebuilt after a restart.
    let tb = tb.restart().await;
    let (_, session) = parts(tb.session(&token).await).await;
    assert_eq!(session["unionid"], "u-ben");
    assert_eq!(me(&tb, &token).await["profile"]["nickName"], "ben");
}

#[tokio::test]
async fn a_phone_number_is_decrypted_stored_and_shown() {
    let tb = TestBroker::start().await;
    let token = tb.token("cai.1").await;
    let data = tb.sandbox.encrypted_phone("cai", "13912345678").unwrap();
    let (status, phone) = parts(post(&tb, "phone", &token, &data).await).await;
    assert_eq!(status, StatusCode::OK, "{phone}");
    assert_eq!(
        phone,
        json!({ "phoneNumber": "13912345678", "purePhoneNumber": "13912345678", "countryCode": "86" })
    );
    let tb = tb.restart().await;
    assert_eq!(
        me(&tb, &token).await["phone"]["purePhoneNumber"],
        "13912345678"
    );
}

#[tokio::test]
async fn data_made_for_a_rotated_session_key_asks_for_a_new_login() {
    let tb = TestBroker::start().await;
    tb.token("dan.1").await;
    let stale = tb.sandbox.encrypted_profile("dan").unwrap();
    // The client called wx.login again: a new session_key.
    let token = tb.token("dan.2").await;
    let body = assert_error(
        post(&tb, "userinfo", &token, &stale).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "decrypt_failed",
    )
    .await;
    assert_eq!(body["relogin"], true);
    assert!(
        body["message"].as_str().unwrap().contains("log in again"),
        "{body}"
    );
    // Fresh data for the current key works.
    let fresh = tb.sandbox.encrypted_profile("dan").unwrap();
    assert_eq!(
        post(&tb, "userinfo", &token, &fresh).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn each_check_has_its_own_error() {
    let tb = TestBroker::start().await;
    let token = tb.token("eva.1").await;
    let other_app = tb
        .sandbox
        .encrypt_for("eva", profile_text("eva", "wx-other-app", None).as_bytes())
        .unwrap();
    assert_error(
        post(&tb, "userinfo", &token, &other_app).await,
        StatusCode::FORBIDDEN,
        "watermark_mismatch",
    )
    .await;

    let other_user = tb
        .sandbox
        .encrypt_for("eva", profile_text("zed", SANDBOX_APPID, None).as_bytes())
        .unwrap();
    assert_error(
        post(&tb, "userinfo", &token, &other_user).await,
        StatusCode::FORBIDDEN,
        "openid_mismatch",
    )
    .await;

    let mut tampered = tb.sandbox.encrypted_profile("eva").unwrap();
    tampered.raw_data = Some(tampered.raw_data.unwrap().replace("eva", "eve"));
    assert_error(
        post(&tb, "userinfo", &token, &tampered).await,
        StatusCode::FORBIDDEN,
        "signature_mismatch",
    )
    .await;

    let good = tb.sandbox.encrypted_profile("eva").unwrap();
    let broken = [
        EncryptedData {
            encrypted_data: "!!!".into(),
            ..good.clone()
        },
        EncryptedData {
            iv: "AAAA".into(),
            ..good.clone()
        },
        EncryptedData {
            encrypted_data: good.encrypted_data[..20].to_owned(),
            ..good.clone()
        },
        EncryptedData {
            signature: None,
            ..good.clone()
        },
    ];
    for data in broken {
        assert_error(
            post(&tb, "userinfo", &token, &data).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
    }
    assert_error(
        post(&tb, "userinfo", &token, &json!({ "iv": good.iv })).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    assert_error(
        post(&tb, "phone", &token, &json!({})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    assert_error(
        post(&tb, "userinfo", &"A".repeat(43), &good).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    let no_auth = tb
        .http
        .get(format!("{}/v1/me", tb.url))
        .send()
        .await
        .unwrap();
    assert_error(no_auth, StatusCode::UNAUTHORIZED, "invalid_session").await;
    // Nothing was stored by the failures.
    assert_eq!(me(&tb, &token).await["profile"], Value::Null);
}

#[tokio::test]
async fn the_sandbox_plays_the_client_over_http() {
    let tb = TestBroker::start().await;
    let unknown = tb
        .http
        .get(format!("{}sandbox/userinfo?user=fay", tb.sandbox.url()))
        .send()
        .await
        .unwrap();
    assert_error(unknown, StatusCode::NOT_FOUND, "unknown_user").await;
    let token = tb.token("fay.1").await;
    let response = tb
        .http
        .get(format!(
            "{}sandbox/phone?user=fay&phone=13700000000",
            tb.sandbox.url()
        ))
        .send()
        .await
        .unwrap();
    let (status, data) = parts(response).await;
    assert_eq!(status, StatusCode::OK, "{data}");
    let (status, phone) = parts(post(&tb, "phone", &token, &data).await).await;
    assert_eq!(
        (status, phone["phoneNumber"].as_str()),
        (StatusCode::OK, Some("13700000000"))
    );
}
