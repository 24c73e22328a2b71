//! POST /v1/userinfo, POST /v1/phone, GET /v1/me: encrypted user data end to end; and what
//! encrypted data may not do to who a user is (`identity::sled::NAME`, `identity::redis::NAME`:
//! each runs on both stores).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use serde_json::{Value, json};
use wxbroker::crypto::decrypt_encrypted_data;
use wxbroker::{EncryptedData, SANDBOX_APPID, Sandbox, UserKey};

use crate::support::{StoreKind, TestBroker, assert_error, me, parts, post};

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

/// Defines `identity::sled::NAME` and `identity::redis::NAME` for each `NAME(kind)` below.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod identity {
            mod sled {
                $(#[tokio::test]
                async fn $name() {
                    super::super::$name(crate::support::StoreKind::Sled).await
                })*
            }
            mod redis {
                $(#[tokio::test]
                async fn $name() {
                    super::super::$name(crate::support::StoreKind::Redis).await
                })*
            }
        }
    };
}

on_both_stores!(
    an_iv_flip_cannot_rewrite_a_users_unionid,
    a_profile_must_name_the_sessions_openid,
    a_unionid_bound_to_another_user_is_never_moved,
    a_unionid_from_login_is_confirmed_never_replaced,
);

/// The first 16 bytes an IV flip writes into a profile: the start of a `unionId` field.
const FORGED_START: &[u8; 16] = br#"{"unionId":"EVIL"#;

/// `name`'s real profile, as the sandbox sealed it with the user's session_key, with its IV
/// flipped the way a tampering client can (it chooses the IV, so it controls the first block of
/// the plaintext): `{"avatarUrl":"ht` becomes `{"unionId":"EVIL`, so the avatar URL's tail is the
/// unionid and the rest, openId included, is intact. Returns the data and the unionid it names
/// (read back by decrypting it as the broker will).
fn iv_flipped_profile(tb: &TestBroker, name: &str) -> (EncryptedData, String) {
    let mut data = tb.sandbox.encrypted_profile(name).unwrap();
    let key = tb.sandbox.session_key(&Sandbox::openid_of(name)).unwrap();
    let plain = decrypt_encrypted_data(&key, &data.iv, &data.encrypted_data).unwrap();
    assert_eq!(
        &plain[..16],
        br#"{"avatarUrl":"ht"#,
        "the sandbox's field order changed"
    );
    let mut iv = STANDARD.decode(&data.iv).unwrap();
    for (i, byte) in iv.iter_mut().enumerate() {
        *byte ^= plain[i] ^ FORGED_START[i];
    }
    data.iv = STANDARD.encode(&iv);
    let forged = decrypt_encrypted_data(&key, &data.iv, &data.encrypted_data).unwrap();
    let forged: Value = serde_json::from_slice(&forged).unwrap();
    assert_eq!(forged["openId"], Sandbox::openid_of(name), "{forged}");
    assert!(forged.get("avatarUrl").is_none(), "{forged}");
    let unionid = forged["unionId"].as_str().unwrap().to_owned();
    assert!(unionid.starts_with("EVIL"), "{forged}");
    (data, unionid)
}

/// A profile of `name` that WeChat could have made, naming `union_id`.
fn profile_claiming(tb: &TestBroker, name: &str, union_id: &str) -> EncryptedData {
    let text = profile_text(name, SANDBOX_APPID, Some(union_id));
    tb.sandbox.encrypt_for(name, text.as_bytes()).unwrap()
}

async fn unionid_of_session(tb: &TestBroker, token: &str) -> Value {
    let (status, session) = parts(tb.session(token).await).await;
    assert_eq!(status, StatusCode::OK, "{session}");
    session["unionid"].clone()
}

/// The openid of the user the unionid index names for `unionid`, if any.
async fn indexed(tb: &TestBroker, unionid: &str) -> Option<String> {
    let user = tb.broker.find_user(UserKey::Unionid(unionid.into())).await;
    user.unwrap().map(|user| user.openid)
}

async fn an_iv_flip_cannot_rewrite_a_users_unionid(kind: StoreKind) {
    let tb = TestBroker::start_backend(kind, |_| {}).await;
    // A user whose login gave a unionid (WeChat's own word) cannot swap it. (The later login
    // carries none, so the profile the sandbox seals carries none either: with one, the flipped
    // profile would name unionId twice, which does not decrypt to a profile.)
    tb.token("mal.union.1").await;
    let mal = tb.token("mal.2").await;
    let own = Sandbox::unionid_of("mal");
    let (flipped, forged) = iv_flipped_profile(&tb, "mal");
    assert_error(
        post(&tb, "userinfo", &mal, &flipped).await,
        StatusCode::CONFLICT,
        "unionid_conflict",
    )
    .await;
    assert_eq!(unionid_of_session(&tb, &mal).await, own.as_str());
    assert_eq!(indexed(&tb, &own).await, Some(Sandbox::openid_of("mal")));
    assert_eq!(indexed(&tb, &forged).await, None);
    let stored = me(&tb, &mal).await;
    assert_eq!(
        (&stored["unionid"], &stored["profile"]),
        (&json!(own), &Value::Null)
    );

    // Nor can a user without one take the unionid another user holds: here the flip names
    // exactly the unionid that ned's profile gave ned.
    let ola = tb.token("ola.1").await;
    let (flipped, forged) = iv_flipped_profile(&tb, "ola");
    let ned = tb.token("ned.1").await;
    let ned_profile = profile_claiming(&tb, "ned", &forged);
    assert_eq!(
        post(&tb, "userinfo", &ned, &ned_profile).await.status(),
        StatusCode::OK
    );
    assert_error(
        post(&tb, "userinfo", &ola, &flipped).await,
        StatusCode::CONFLICT,
        "unionid_conflict",
    )
    .await;
    assert_eq!(indexed(&tb, &forged).await, Some(Sandbox::openid_of("ned")));
    assert_eq!(unionid_of_session(&tb, &ola).await, Value::Null);
    assert_eq!(unionid_of_session(&tb, &ned).await, forged.as_str());
    let stored = me(&tb, &ola).await;
    assert_eq!(
        (&stored["unionid"], &stored["profile"]),
        (&Value::Null, &Value::Null)
    );

    // The untouched profile still goes through.
    let real = tb.sandbox.encrypted_profile("mal").unwrap();
    assert_eq!(
        post(&tb, "userinfo", &mal, &real).await.status(),
        StatusCode::OK
    );
}

async fn a_profile_must_name_the_sessions_openid(kind: StoreKind) {
    let tb = TestBroker::start_backend(kind, |_| {}).await;
    let pia = tb.token("pia.1").await;
    tb.token("quin.1").await;
    let without_openid = json!({
        "unionId": "u-nobody",
        "nickName": "pia",
        "watermark": { "appid": SANDBOX_APPID, "timestamp": 1_790_000_000 },
    });
    let without_openid = tb
        .sandbox
        .encrypt_for("pia", without_openid.to_string().as_bytes())
        .unwrap();
    // Sealed with pia's own session_key, but naming quin, another registered user.
    let quins = tb
        .sandbox
        .encrypt_for(
            "pia",
            profile_text("quin", SANDBOX_APPID, Some("u-quin")).as_bytes(),
        )
        .unwrap();
    for data in [&without_openid, &quins] {
        assert_error(
            post(&tb, "userinfo", &pia, data).await,
            StatusCode::FORBIDDEN,
            "openid_mismatch",
        )
        .await;
    }
    assert_eq!(unionid_of_session(&tb, &pia).await, Value::Null);
    let stored = me(&tb, &pia).await;
    assert_eq!(
        (&stored["unionid"], &stored["profile"]),
        (&Value::Null, &Value::Null)
    );
    for unionid in ["u-nobody", "u-quin"] {
        assert_eq!(indexed(&tb, unionid).await, None);
    }
}

async fn a_unionid_bound_to_another_user_is_never_moved(kind: StoreKind) {
    let tb = TestBroker::start_backend(kind, |_| {}).await;
    // Held from a login (ann) and from a profile (cal): neither moves to bob.
    let ann = tb.token("ann.union.1").await;
    let cal = tb.token("cal.1").await;
    let cal_profile = profile_claiming(&tb, "cal", "u-cal");
    assert_eq!(
        post(&tb, "userinfo", &cal, &cal_profile).await.status(),
        StatusCode::OK
    );
    let bob = tb.token("bob.1").await;
    let held = [
        (Sandbox::unionid_of("ann"), "ann", &ann),
        ("u-cal".into(), "cal", &cal),
    ];
    for (unionid, holder, holder_token) in &held {
        let claim = profile_claiming(&tb, "bob", unionid);
        assert_error(
            post(&tb, "userinfo", &bob, &claim).await,
            StatusCode::CONFLICT,
            "unionid_conflict",
        )
        .await;
        assert_eq!(
            indexed(&tb, unionid).await,
            Some(Sandbox::openid_of(holder))
        );
        assert_eq!(
            unionid_of_session(&tb, holder_token).await,
            unionid.as_str()
        );
    }
    assert_eq!(unionid_of_session(&tb, &bob).await, Value::Null);
    let stored = me(&tb, &bob).await;
    assert_eq!(
        (&stored["unionid"], &stored["profile"]),
        (&Value::Null, &Value::Null)
    );
    // A unionid nobody holds is still learned from a profile.
    let own = profile_claiming(&tb, "bob", "u-bob");
    assert_eq!(
        post(&tb, "userinfo", &bob, &own).await.status(),
        StatusCode::OK
    );
    assert_eq!(indexed(&tb, "u-bob").await, Some(Sandbox::openid_of("bob")));
    assert_eq!(unionid_of_session(&tb, &bob).await, "u-bob");
}

async fn a_unionid_from_login_is_confirmed_never_replaced(kind: StoreKind) {
    let tb = TestBroker::start_backend(kind, |_| {}).await;
    let eve = tb.token("eve.union.1").await;
    let own = Sandbox::unionid_of("eve");
    let other = profile_claiming(&tb, "eve", "u-not-eves");
    assert_error(
        post(&tb, "userinfo", &eve, &other).await,
        StatusCode::CONFLICT,
        "unionid_conflict",
    )
    .await;
    assert_eq!(unionid_of_session(&tb, &eve).await, own.as_str());
    assert_eq!(indexed(&tb, &own).await, Some(Sandbox::openid_of("eve")));
    assert_eq!(indexed(&tb, "u-not-eves").await, None);
    assert_eq!(me(&tb, &eve).await["profile"], Value::Null);

    // The same unionid again is fine (the sandbox's profile carries the login's).
    let same = tb.sandbox.encrypted_profile("eve").unwrap();
    let (status, profile) = parts(post(&tb, "userinfo", &eve, &same).await).await;
    assert_eq!((status, &profile["unionId"]), (StatusCode::OK, &json!(own)));
    assert_eq!(me(&tb, &eve).await["unionid"], own.as_str());
    // One learned from a profile is kept the same way.
    let fay = tb.token("fay.1").await;
    let first = profile_claiming(&tb, "fay", "u-fay");
    assert_eq!(
        post(&tb, "userinfo", &fay, &first).await.status(),
        StatusCode::OK
    );
    let second = profile_claiming(&tb, "fay", "u-fay-2");
    assert_error(
        post(&tb, "userinfo", &fay, &second).await,
        StatusCode::CONFLICT,
        "unionid_conflict",
    )
    .await;
    assert_eq!(unionid_of_session(&tb, &fay).await, "u-fay");
    assert_eq!(indexed(&tb, "u-fay-2").await, None);
}
