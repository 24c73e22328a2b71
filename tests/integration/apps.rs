//! Several mini programs on one broker: the sandbox WeChat serves two apps (each its own appid
//! and secret, a user a different openid in each and the same unionid), and the broker serves
//! both. A person is one uid across them when WeChat gives a unionid, and two without one; an
//! appid the broker does not serve is refused; decrypting, the server APIs and signed tokens use
//! the session's own app; the same holds for brokers sharing Redis, and for the data of a broker
//! that served one app before.

use std::sync::Arc;

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use wxbroker::{SANDBOX_APPID, SANDBOX_LITE_APPID, Sandbox, SandboxOptions};

use crate::edge::{VERIFIER_TOKEN, access, claims, verifier, with_secrets};
use crate::support::{
    RedisServer, StoreKind, T0, TestBroker, assert_error, me, metric, parts, post,
};

/// The admin secret in these tests.
const ADMIN: &str = "apps-test-admin-secret-0123456789abcdef";

/// POST /v1/login with `{"code", "appid"}` (no appid: the default app).
async fn login_to(tb: &TestBroker, appid: Option<&str>, code: &str) -> reqwest::Response {
    let mut body = json!({ "code": code });
    if let Some(appid) = appid {
        body["appid"] = json!(appid);
    }
    let url = format!("{}/v1/login", tb.url);
    tb.http.post(url).json(&body).send().await.unwrap()
}

/// A login through `appid` that worked: its answer.
async fn logged_in(tb: &TestBroker, appid: Option<&str>, code: &str) -> Value {
    let (status, body) = parts(login_to(tb, appid, code).await).await;
    assert_eq!(status, StatusCode::OK, "{code} through {appid:?}: {body}");
    body
}

/// A login answer's `uid` and `isNew`.
fn uid_and_new(login: &Value) -> (Option<u64>, Option<bool>) {
    (login["uid"].as_u64(), login["isNew"].as_bool())
}

fn token(login: &Value) -> &str {
    login["thirdSession"].as_str().unwrap()
}

/// `GET /v1/session` with `token`, asserting 200.
async fn session(tb: &TestBroker, token: &str) -> Value {
    let (status, body) = parts(tb.session(token).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The identities a `/v1/me` or admin answer lists, as (appid, openid) pairs.
fn identities(user: &Value) -> Vec<(String, String)> {
    let list = user["identities"].as_array().expect("identities listed");
    list.iter()
        .map(|id| {
            let text = |field: &str| id[field].as_str().unwrap().to_owned();
            (text("appid"), text("openid"))
        })
        .collect()
}

fn both(name: &str) -> Vec<(String, String)> {
    vec![
        (SANDBOX_APPID.into(), Sandbox::openid_of(name)),
        (
            SANDBOX_LITE_APPID.into(),
            Sandbox::openid_in(SANDBOX_LITE_APPID, name),
        ),
    ]
}

async fn admin_get(tb: &TestBroker, path: &str) -> (StatusCode, Value) {
    let response = tb
        .http
        .get(format!("{}/admin/{path}", tb.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    parts(response).await
}

#[tokio::test]
async fn a_person_is_one_uid_across_two_apps_by_unionid_and_two_without_one() {
    let tb = TestBroker::start_with(|c| {
        c.admin_token = Some(wxbroker::Secret::new(ADMIN));
    })
    .await;
    let lite = Some(SANDBOX_LITE_APPID);

    // Alice, through the main app, then the lite one: the same code text is each app's own.
    let first = logged_in(&tb, None, "alice.union.1").await;
    assert_eq!(uid_and_new(&first), (Some(1), Some(true)));
    let second = logged_in(&tb, lite, "alice.union.1").await;
    assert_eq!(
        uid_and_new(&second),
        (Some(1), Some(false)),
        "the lite app's identity joins alice's uid; she is not new"
    );
    let main_session = session(&tb, token(&first)).await;
    assert_eq!(main_session["appid"], SANDBOX_APPID);
    assert_eq!(main_session["openid"], Sandbox::openid_of("alice"));
    let lite_session = session(&tb, token(&second)).await;
    assert_eq!(lite_session["appid"], SANDBOX_LITE_APPID);
    assert_eq!(
        lite_session["openid"],
        Sandbox::openid_in(SANDBOX_LITE_APPID, "alice")
    );
    assert_ne!(lite_session["openid"], main_session["openid"]);
    assert_eq!(lite_session["unionid"], Sandbox::unionid_of("alice"));
    assert_eq!(lite_session["uid"], 1);

    // /v1/me answers the session's identity and lists both.
    let lite_me = me(&tb, token(&second)).await;
    assert_eq!(lite_me["appid"], SANDBOX_LITE_APPID);
    assert_eq!(lite_me["openid"], lite_session["openid"]);
    assert_eq!(identities(&lite_me), both("alice"));
    let main_me = me(&tb, token(&first)).await;
    assert_eq!(main_me["appid"], SANDBOX_APPID);
    assert_eq!(identities(&main_me), both("alice"));

    // Bob has no unionid: a stranger in the second app, with a uid of his own.
    let bob = logged_in(&tb, None, "bob.1").await;
    assert_eq!(uid_and_new(&bob), (Some(2), Some(true)));
    let response = tb
        .http
        .post(format!("{}/v1/login", tb.url))
        .form(&[("code", "bob.1"), ("appid", SANDBOX_LITE_APPID)])
        .send()
        .await
        .unwrap();
    let (status, lite_bob) = parts(response).await;
    assert_eq!(status, StatusCode::OK, "{lite_bob}");
    assert_eq!(uid_and_new(&lite_bob), (Some(3), Some(true)));
    let bob_me = me(&tb, token(&lite_bob)).await;
    assert_eq!(
        identities(&bob_me),
        vec![(
            SANDBOX_LITE_APPID.to_owned(),
            Sandbox::openid_in(SANDBOX_LITE_APPID, "bob")
        )]
    );

    // The admin finds alice by either identity, and by uid, with both identities.
    let lite_openid = Sandbox::openid_in(SANDBOX_LITE_APPID, "alice");
    let by_lite = format!("users?openid={lite_openid}&appid={SANDBOX_LITE_APPID}");
    for path in [
        by_lite,
        format!("users?openid={}", Sandbox::openid_of("alice")),
        "users/1".into(),
    ] {
        let (status, user) = admin_get(&tb, &path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {user}");
        assert_eq!(user["uid"], 1, "{path}");
        assert_eq!(identities(&user), both("alice"), "{path}");
    }
    // The lite openid is no identity of the default app.
    let (status, _) = admin_get(&tb, &format!("users?openid={lite_openid}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The stats count persons: three uids, four identities.
    let (status, stats) = admin_get(&tb, "stats").await;
    assert_eq!((status, stats["users"].as_u64()), (StatusCode::OK, Some(3)));

    // Forward auth names the session's app.
    let response = tb
        .http
        .get(format!("{}/v1/auth", tb.url))
        .bearer_auth(token(&second))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-wx-appid"], SANDBOX_LITE_APPID);
    assert_eq!(response.headers()["x-wx-uid"], "1");

    // Logins are counted per app.
    let metrics = tb
        .http
        .get(format!("{}/metrics", tb.url))
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    let count = |appid: &str, outcome: &str| {
        let series = format!(r#"wxbroker_app_logins_total{{appid="{appid}",outcome="{outcome}"}}"#);
        metric(&metrics, &series)
    };
    assert_eq!(count(SANDBOX_APPID, "new"), Some(2.0), "{metrics}");
    assert_eq!(count(SANDBOX_LITE_APPID, "returning"), Some(1.0));
    assert_eq!(count(SANDBOX_LITE_APPID, "new"), Some(1.0));
    let calls = format!(
        r#"wxbroker_app_upstream_calls_total{{appid="{SANDBOX_LITE_APPID}",outcome="ok"}}"#
    );
    assert_eq!(metric(&metrics, &calls), Some(2.0), "{metrics}");
}

#[tokio::test]
async fn a_null_appid_is_the_default_app_as_the_document_says() {
    let tb = TestBroker::start().await;
    let url = format!("{}/v1/login", tb.url);
    let body = json!({ "code": "alice.1", "appid": null });
    let (status, login) = parts(tb.http.post(url).json(&body).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(session(&tb, token(&login)).await["appid"], SANDBOX_APPID);
    let url = format!("{}/openapi.json", tb.url);
    let (_, document) = parts(tb.http.get(url).send().await.unwrap()).await;
    let appid = &document["components"]["schemas"]["LoginRequest"]["properties"]["appid"];
    assert_eq!(appid["type"], json!(["string", "null"]), "{appid}");
}

#[tokio::test]
async fn an_appid_the_broker_does_not_serve_is_refused_as_json_and_as_a_form() {
    let tb = TestBroker::start().await;
    let exchanges = tb.sandbox.exchanges();
    assert_error(
        login_to(&tb, Some("wx-not-ours"), "alice.1").await,
        StatusCode::BAD_REQUEST,
        "unknown_app",
    )
    .await;
    let response = tb
        .http
        .post(format!("{}/v1/login", tb.url))
        .form(&[("code", "alice.1"), ("appid", "wx-not-ours")])
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::BAD_REQUEST, "unknown_app").await;
    assert_eq!(tb.sandbox.exchanges(), exchanges, "nothing went to WeChat");
    // The code was not spent: it still logs in through an app the broker serves.
    logged_in(&tb, Some(SANDBOX_LITE_APPID), "alice.1").await;
}

#[tokio::test]
async fn decrypting_uses_the_session_apps_key_and_watermark() {
    let tb = TestBroker::start().await;
    let main = logged_in(&tb, None, "dora.union.1").await;
    let lite = logged_in(&tb, Some(SANDBOX_LITE_APPID), "dora.union.1").await;
    let (main, lite) = (token(&main).to_owned(), token(&lite).to_owned());

    // Each app's data opens with that app's session_key, under its session only.
    let lite_profile = tb
        .sandbox
        .encrypted_profile_in(SANDBOX_LITE_APPID, "dora")
        .unwrap();
    let main_profile = tb.sandbox.encrypted_profile("dora").unwrap();
    assert_error(
        post(&tb, "userinfo", &main, &lite_profile).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "decrypt_failed",
    )
    .await;
    let (status, body) = parts(post(&tb, "userinfo", &lite, &lite_profile).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["nickName"], "dora");
    let (status, body) = parts(post(&tb, "userinfo", &main, &main_profile).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Data sealed with the lite session's key but watermarked for the main app is refused.
    let key = tb
        .sandbox
        .session_key(&Sandbox::openid_in(SANDBOX_LITE_APPID, "dora"))
        .unwrap();
    let sealed = |watermark: &str| {
        let text = json!({
            "phoneNumber": "13900000001",
            "purePhoneNumber": "13900000001",
            "countryCode": "86",
            "watermark": { "appid": watermark, "timestamp": T0 },
        });
        let iv = [7u8; 16];
        let data =
            wxbroker::crypto::encrypt_for_client(&key, &iv, text.to_string().as_bytes()).unwrap();
        use base64::Engine;
        json!({
            "encryptedData": data,
            "iv": base64::engine::general_purpose::STANDARD.encode(iv),
        })
    };
    assert_error(
        post(&tb, "phone", &lite, &sealed(SANDBOX_APPID)).await,
        StatusCode::FORBIDDEN,
        "watermark_mismatch",
    )
    .await;
    let (status, body) = parts(post(&tb, "phone", &lite, &sealed(SANDBOX_LITE_APPID)).await).await;
    assert_eq!(
        (status, body["phoneNumber"].as_str()),
        (StatusCode::OK, Some("13900000001"))
    );
    // Stored on the lite identity: the main one shows the profile only.
    let lite_me = me(&tb, &lite).await;
    assert_eq!(lite_me["phone"]["phoneNumber"], "13900000001");
    assert_eq!(me(&tb, &main).await["phone"], Value::Null);

    // The server APIs run with the session's app's access_token: the sandbox's checksession
    // knows an openid only under its own app's token.
    for token in [&main, &lite] {
        let response = tb
            .http
            .get(format!("{}/v1/session?verify=wechat", tb.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let (status, body) = parts(response).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["sessionKeyValid"], true);
    }
    let code = tb.http.get(format!(
        "{}sandbox/phonecode?phone=13700000002",
        tb.sandbox.url()
    ));
    let code: Value = code.send().await.unwrap().json().await.unwrap();
    let (status, body) =
        parts(post(&tb, "phone", &lite, &json!({ "code": code["code"] })).await).await;
    assert_eq!(
        (status, body["phoneNumber"].as_str()),
        (StatusCode::OK, Some("13700000002"))
    );
    assert_eq!(tb.sandbox.token_requests(), 2, "one token per app");
}

#[tokio::test]
async fn the_admin_reset_replaces_the_session_key_of_every_identity() {
    let tb = TestBroker::start_with(|c| {
        c.admin_token = Some(wxbroker::Secret::new(ADMIN));
    })
    .await;
    let main = logged_in(&tb, None, "erin.union.1").await;
    let lite = logged_in(&tb, Some(SANDBOX_LITE_APPID), "erin.union.1").await;
    let response = tb
        .http
        .post(format!("{}/admin/users/1/session-key/reset", tb.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    // Data sealed with each app's key as WeChat now holds it opens under that app's session.
    let (main, lite) = (token(&main), token(&lite));
    let profile = tb.sandbox.encrypted_profile("erin").unwrap();
    assert_eq!(
        post(&tb, "userinfo", main, &profile).await.status(),
        StatusCode::OK
    );
    let profile = tb
        .sandbox
        .encrypted_profile_in(SANDBOX_LITE_APPID, "erin")
        .unwrap();
    assert_eq!(
        post(&tb, "userinfo", lite, &profile).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn signed_access_tokens_name_the_sessions_app_and_a_verifier_takes_both() {
    let tb = TestBroker::start_with(with_secrets).await;
    let main = logged_in(&tb, None, "fay.union.1").await;
    let lite = logged_in(&tb, Some(SANDBOX_LITE_APPID), "fay.union.1").await;
    let (main, lite) = (access(&main), access(&lite));
    let (main_claims, lite_claims) = (claims(&main), claims(&lite));
    assert_eq!(main_claims.aud, SANDBOX_APPID);
    assert_eq!(main_claims.appid.as_deref(), Some(SANDBOX_APPID));
    assert_eq!(lite_claims.aud, SANDBOX_LITE_APPID);
    assert_eq!(lite_claims.appid.as_deref(), Some(SANDBOX_LITE_APPID));
    assert_eq!(lite_claims.sub, main_claims.sub, "one uid");
    assert_eq!(
        lite_claims.openid,
        Sandbox::openid_in(SANDBOX_LITE_APPID, "fay")
    );

    // A verifier of the main app only (the single-appid constructor) refuses the lite token.
    let one = verifier(&tb, |_| {}).await;
    assert!(one.verify(&main).await.is_ok());
    assert_eq!(
        one.verify(&lite).await.unwrap_err(),
        wxbroker::jwt::Refusal::Audience
    );
    // One for both apps takes both.
    let both = verifier(&tb, |options| {
        *options = wxbroker::edge::VerifierOptions {
            clock: options.clock.clone(),
            ..wxbroker::edge::VerifierOptions::for_apps(
                &tb.url,
                [SANDBOX_APPID, SANDBOX_LITE_APPID],
                VERIFIER_TOKEN,
            )
        };
    })
    .await;
    assert_eq!(both.verify(&lite).await.unwrap().aud, SANDBOX_LITE_APPID);
    assert!(both.verify(&main).await.is_ok());

    // A token minted later for the lite session names the lite app too.
    let response = tb
        .http
        .post(format!("{}/v1/token", tb.url))
        .bearer_auth(
            logged_in(&tb, Some(SANDBOX_LITE_APPID), "fay.2").await["thirdSession"]
                .as_str()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let (status, body) = parts(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        claims(body["accessToken"].as_str().unwrap()).aud,
        SANDBOX_LITE_APPID
    );
}

#[tokio::test]
async fn a_sessions_app_and_identities_survive_a_restart() {
    let tb = TestBroker::start().await;
    let main = logged_in(&tb, None, "ora.union.1").await;
    let lite = logged_in(&tb, Some(SANDBOX_LITE_APPID), "ora.union.1").await;
    let (main, lite) = (token(&main).to_owned(), token(&lite).to_owned());
    let tb = tb.restart().await;
    // The session log kept each session's app; the lite identity its own session_key.
    assert_eq!(session(&tb, &lite).await["appid"], SANDBOX_LITE_APPID);
    assert_eq!(session(&tb, &main).await["appid"], SANDBOX_APPID);
    assert_eq!(identities(&me(&tb, &lite).await), both("ora"));
    let profile = tb
        .sandbox
        .encrypted_profile_in(SANDBOX_LITE_APPID, "ora")
        .unwrap();
    let (status, body) = parts(post(&tb, "userinfo", &lite, &profile).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again = logged_in(&tb, Some(SANDBOX_LITE_APPID), "ora.2").await;
    assert_eq!(uid_and_new(&again), (Some(1), Some(false)));
}

/// Concurrent first logins of `people` persons named `{prefix}{n}`, each through both apps at
/// once (on `main` and `lite`): each person ends with one uid, which both logins report, one of
/// them as new.
async fn concurrent_first_logins(
    main: &TestBroker,
    lite: &TestBroker,
    prefix: &str,
    people: usize,
) {
    let logins = (0..people).map(|n| async move {
        let code = format!("{prefix}{n}.union.1");
        let (a, b) = tokio::join!(
            login_to(main, None, &code),
            login_to(lite, Some(SANDBOX_LITE_APPID), &code)
        );
        let ((sa, a), (sb, b)) = (parts(a).await, parts(b).await);
        assert_eq!((sa, sb), (StatusCode::OK, StatusCode::OK), "{a} {b}");
        assert_eq!(a["uid"], b["uid"], "{prefix}{n} got two uids: {a} {b}");
        let new = [&a, &b].iter().filter(|x| x["isNew"] == true).count();
        assert_eq!(new, 1, "{prefix}{n}: exactly one login registers: {a} {b}");
        a["uid"].as_u64().unwrap()
    });
    let uids = join_all(logins).await;
    let distinct: std::collections::HashSet<_> = uids.iter().collect();
    assert_eq!(distinct.len(), people, "one uid per person: {uids:?}");
}

#[tokio::test]
async fn concurrent_first_logins_through_two_apps_end_with_one_uid_on_one_broker() {
    let tb = TestBroker::start().await;
    concurrent_first_logins(&tb, &tb, "twin", 16).await;
}

#[tokio::test]
async fn three_brokers_on_redis_link_identities_and_agree_on_one_uid() {
    let redis = Arc::new(RedisServer::start().await);
    let sandbox = Arc::new(Sandbox::start(SandboxOptions::default()).await.unwrap());
    let mut brokers = Vec::new();
    for _ in 0..3 {
        let admin = |c: &mut wxbroker::Config| c.admin_token = Some(wxbroker::Secret::new(ADMIN));
        brokers.push(
            TestBroker::start_shared(Some(redis.clone()), Some(sandbox.clone()), admin).await,
        );
    }
    let [a, b, c] = [&brokers[0], &brokers[1], &brokers[2]];

    // Linked through two brokers; the third sees the session's app and both identities.
    let first = logged_in(a, None, "gus.union.1").await;
    let second = logged_in(b, Some(SANDBOX_LITE_APPID), "gus.union.1").await;
    assert_eq!(
        (second["uid"].clone(), second["isNew"].clone()),
        (first["uid"].clone(), json!(false))
    );
    let lite_session = session(c, token(&second)).await;
    assert_eq!(lite_session["appid"], SANDBOX_LITE_APPID);
    assert_eq!(session(c, token(&first)).await["appid"], SANDBOX_APPID);
    assert_eq!(identities(&me(c, token(&second)).await), both("gus"));
    let lite_openid = Sandbox::openid_in(SANDBOX_LITE_APPID, "gus");
    let (status, user) = admin_get(
        c,
        &format!("users?openid={lite_openid}&appid={SANDBOX_LITE_APPID}"),
    )
    .await;
    assert_eq!((status, identities(&user)), (StatusCode::OK, both("gus")));
    let (status, stats) = admin_get(c, "stats").await;
    assert_eq!((status, stats["users"].as_u64()), (StatusCode::OK, Some(1)));

    // Without a unionid: strangers.
    let h1 = logged_in(a, None, "hal.1").await;
    let h2 = logged_in(c, Some(SANDBOX_LITE_APPID), "hal.1").await;
    assert_ne!(h1["uid"], h2["uid"]);
    assert_eq!(h2["isNew"], true);

    // An app's code is booked per app: the same code text through the other app is not a replay,
    // a replay through the same app on another broker is.
    assert_error(
        login_to(c, Some(SANDBOX_LITE_APPID), "hal.1").await,
        StatusCode::UNAUTHORIZED,
        "code_used",
    )
    .await;

    // Decrypting on a third broker uses the lite identity's key.
    let profile = sandbox
        .encrypted_profile_in(SANDBOX_LITE_APPID, "gus")
        .unwrap();
    let (status, body) = parts(post(c, "userinfo", token(&second), &profile).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    concurrent_first_logins(a, b, "twin", 12).await;
    concurrent_first_logins(c, a, "pair", 12).await;
}

/// A data dir written as a broker serving one app wrote it before several apps (the layout
/// spelt out here, key by key and frame by frame), then opened by a broker serving two.
#[tokio::test]
async fn a_data_dir_of_one_app_keeps_working_as_the_default_apps() {
    let dir = tempfile::tempdir().unwrap();
    let openid = Sandbox::openid_of("ivy");
    let unionid = Sandbox::unionid_of("ivy");
    let token = wxbroker::crypto::new_token().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let user = json!({
            "uid": 7, "openid": openid, "unionid": unionid, "session_key": "a2V5LW9mLWl2eS0xMjM0NQ==",
            "created_at": T0 - 100, "updated_at": T0 - 100, "profile": null, "phone": null,
        });
        db.open_tree("users")
            .unwrap()
            .insert(openid.as_bytes(), user.to_string().as_bytes())
            .unwrap();
        db.open_tree("uids")
            .unwrap()
            .insert(7u64.to_be_bytes(), openid.as_bytes())
            .unwrap();
        db.open_tree("unionids")
            .unwrap()
            .insert(unionid.as_bytes(), &7u64.to_be_bytes())
            .unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("next_uid", &8u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
        drop(db);
        // The session log, one frame as written before sessions named their app: length, CRC,
        // then PUT, the token's hash, uid, created_at, last_seen, expires_at, openid, unionid.
        let mut body = vec![1u8];
        body.extend_from_slice(&wxbroker::crypto::token_hash(&token));
        for n in [7, T0 - 10, T0 - 10, T0 + 80_000] {
            body.extend_from_slice(&n.to_le_bytes());
        }
        for text in [&openid, &unionid] {
            body.extend_from_slice(&(text.len() as u16).to_le_bytes());
            body.extend_from_slice(text.as_bytes());
        }
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        std::fs::write(dir.path().join("sessions.log"), frame).unwrap();
    }
    let path = dir.path().to_owned();
    let tb = TestBroker::start_with(|c| c.data_dir = path).await;

    // The old session holds, as the default app's.
    let old = session(&tb, &token).await;
    assert_eq!(
        (old["uid"].as_u64(), old["appid"].as_str()),
        (Some(7), Some(SANDBOX_APPID))
    );
    let user = me(&tb, &token).await;
    assert_eq!(user["appid"], SANDBOX_APPID);
    assert_eq!(
        identities(&user),
        vec![(SANDBOX_APPID.to_owned(), openid.clone())]
    );
    // A login through the default app finds the user; through the lite app it joins the uid.
    let main = logged_in(&tb, None, "ivy.1").await;
    assert_eq!(uid_and_new(&main), (Some(7), Some(false)));
    let lite = logged_in(&tb, Some(SANDBOX_LITE_APPID), "ivy.union.1").await;
    assert_eq!(uid_and_new(&lite), (Some(7), Some(false)));
    assert_eq!(identities(&me(&tb, &token).await), both("ivy"));
    // New people come after the old uids.
    assert_eq!(logged_in(&tb, None, "jon.1").await["uid"], 8);
}

/// Redis as a broker serving one app left it before several apps, key by key.
#[tokio::test]
async fn a_redis_of_one_app_keeps_working_as_the_default_apps() {
    let redis = Arc::new(RedisServer::start().await);
    let openid = Sandbox::openid_of("kim");
    let unionid = Sandbox::unionid_of("kim");
    let token = wxbroker::crypto::new_token().unwrap();
    let id = wxbroker::crypto::session_id(&wxbroker::crypto::token_hash(&token));
    {
        let client = redis::Client::open(redis.url.as_str()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let mut pipe = redis::pipe();
        pipe.cmd("HSET").arg(format!("wxb:user:{openid}")).arg(&[
            ("uid", "3"),
            ("openid", &openid),
            ("unionid", &unionid),
            ("session_key", "a2V5LW9mLWtpbS0xMjM0NQ=="),
            ("created_at", &(T0 - 100).to_string()),
            ("updated_at", &(T0 - 100).to_string()),
        ]);
        pipe.cmd("SET").arg("wxb:uid:3").arg(&openid);
        pipe.cmd("SET").arg(format!("wxb:unionid:{unionid}")).arg(3);
        pipe.cmd("SET").arg("wxb:next_uid").arg(3);
        pipe.cmd("SET").arg("wxb:user_count").arg(1);
        pipe.cmd("HSET").arg(format!("wxb:session:{id}")).arg(&[
            ("uid", "3"),
            ("openid", &openid),
            ("unionid", &unionid),
            ("created_at", &(T0 - 10).to_string()),
            ("last_seen", &(T0 - 10).to_string()),
            ("expires_at", &(T0 + 80_000).to_string()),
        ]);
        pipe.cmd("ZADD").arg("wxb:sessions:3").arg(T0 - 10).arg(&id);
        let () = pipe.query_async(&mut con).await.unwrap();
    }
    let tb = TestBroker::start_shared(Some(redis), None, |_| {}).await;
    let old = session(&tb, &token).await;
    assert_eq!(
        (old["uid"].as_u64(), old["appid"].as_str()),
        (Some(3), Some(SANDBOX_APPID))
    );
    let main = logged_in(&tb, None, "kim.1").await;
    assert_eq!(uid_and_new(&main), (Some(3), Some(false)));
    let lite = logged_in(&tb, Some(SANDBOX_LITE_APPID), "kim.union.1").await;
    assert_eq!(uid_and_new(&lite), (Some(3), Some(false)));
    assert_eq!(identities(&me(&tb, &token).await), both("kim"));
    assert_eq!(logged_in(&tb, None, "lea.1").await["uid"], 4);
}

#[tokio::test]
async fn exports_on_sled_carry_the_identities_and_an_old_export_imports_into_the_default_app() {
    exports_carry_the_identities(StoreKind::Sled).await;
}

#[tokio::test]
async fn exports_on_redis_carry_the_identities_and_an_old_export_imports_into_the_default_app() {
    exports_carry_the_identities(StoreKind::Redis).await;
}

async fn exports_carry_the_identities(kind: StoreKind) {
    // A person through both apps, exported while serving.
    let admin = |c: &mut wxbroker::Config| c.admin_token = Some(wxbroker::Secret::new(ADMIN));
    let tb = TestBroker::start_backend(kind, admin).await;
    logged_in(&tb, None, "max.union.1").await;
    logged_in(&tb, Some(SANDBOX_LITE_APPID), "max.union.1").await;
    logged_in(&tb, Some(SANDBOX_LITE_APPID), "ned.1").await;
    let response = tb
        .http
        .get(format!("{}/admin/export", tb.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let export = response.text().await.unwrap();
    let lines: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{export}");
    let lite_lines = lines
        .iter()
        .filter(|l| l["appid"] == SANDBOX_LITE_APPID)
        .count();
    let default_lines = lines.iter().filter(|l| l.get("appid").is_none()).count();
    assert_eq!((lite_lines, default_lines), (2, 1), "{export}");

    // Into a fresh data dir, beside an old export's line (no appid: the default app).
    let old_line = json!({
        "uid": 40, "openid": Sandbox::openid_of("old"), "unionid": null, "profile": null,
        "phone": null, "createdAt": 1, "updatedAt": 2,
    });
    let dir = tempfile::tempdir().unwrap();
    let data = wxbroker::backup::open_for_import(dir.path(), 8).unwrap();
    let input = format!("{export}{old_line}\n");
    assert_eq!(
        wxbroker::backup::import(&data, input.as_bytes()).unwrap(),
        4
    );
    drop(data);
    let path = dir.path().to_owned();
    let restored = TestBroker::start_with(|c| {
        c.data_dir = path;
        c.admin_token = Some(wxbroker::Secret::new(ADMIN));
    })
    .await;
    let (status, max) = admin_get(&restored, "users/1").await;
    assert_eq!((status, identities(&max)), (StatusCode::OK, both("max")));
    let (status, old) = admin_get(
        &restored,
        &format!("users?openid={}", Sandbox::openid_of("old")),
    )
    .await;
    assert_eq!(
        (status, old["uid"].as_u64(), old["appid"].as_str()),
        (StatusCode::OK, Some(40), Some(SANDBOX_APPID))
    );
    // The restored identities log in to their uids.
    let lite = logged_in(&restored, Some(SANDBOX_LITE_APPID), "max.2").await;
    assert_eq!(uid_and_new(&lite), (Some(1), Some(false)));
    let old = logged_in(&restored, None, "old.1").await;
    assert_eq!(uid_and_new(&old), (Some(40), Some(false)));

    // The restored data dir, stopped, moved to a fresh Redis: the identities come along.
    let mut restored = restored;
    restored.stop().await;
    let policy = restored.config.session_policy();
    drop(restored);
    let redis = Arc::new(RedisServer::start().await);
    let store = wxbroker::storage::redis::Redis::connect(&redis.url)
        .await
        .unwrap();
    // The stopped broker lets go of its database a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let data = loop {
        match wxbroker::backup::open_for_export(dir.path(), 8) {
            Ok(data) => break data,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("in use") => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    wxbroker::backup::migrate_to_redis(&data, &store, policy, T0, false)
        .await
        .unwrap();
    drop(data);
    let on_redis = TestBroker::start_shared(Some(redis), None, admin).await;
    let (status, max) = admin_get(&on_redis, "users/1").await;
    assert_eq!((status, identities(&max)), (StatusCode::OK, both("max")));
    let lite = logged_in(&on_redis, Some(SANDBOX_LITE_APPID), "max.3").await;
    assert_eq!(uid_and_new(&lite), (Some(1), Some(false)));
}

#[tokio::test]
async fn another_apps_secret_session_keys_and_tokens_stay_out_of_answers_and_logs() {
    let tb = TestBroker::start().await;
    let lite = Some(SANDBOX_LITE_APPID);
    let secret = tb.sandbox.secret_of(SANDBOX_LITE_APPID).unwrap();
    assert!(!format!("{:?}", tb.config).contains(secret.expose()));
    let mut answers = String::new();
    let first = logged_in(&tb, lite, "pia.union.1").await;
    answers.push_str(&first.to_string());
    for code in ["err40029.p", "err-1.p", "err40125.p"] {
        answers.push_str(&login_to(&tb, lite, code).await.text().await.unwrap());
    }
    let token = token(&first);
    let verify = tb
        .http
        .get(format!("{}/v1/session?verify=wechat", tb.url))
        .bearer_auth(token);
    answers.push_str(&verify.send().await.unwrap().text().await.unwrap());
    // The sandbox's errmsg for errNNNNN phone codes echoes the access_token.
    for code in ["13800138001.p", "err99999.p"] {
        let response = post(&tb, "phone", token, &json!({ "code": code })).await;
        answers.push_str(&response.text().await.unwrap());
    }
    let key = tb
        .sandbox
        .session_key(&Sandbox::openid_in(SANDBOX_LITE_APPID, "pia"))
        .unwrap();
    let logs = crate::support::logs();
    let mut hidden = vec![secret.expose().to_owned(), key];
    hidden.extend(tb.sandbox.issued_access_tokens());
    assert!(hidden.len() >= 3, "the lite app's access_token was fetched");
    for hidden in &hidden {
        assert!(
            !answers.contains(hidden.as_str()),
            "an answer holds a secret"
        );
        assert!(!logs.contains(hidden.as_str()), "the log holds a secret");
    }
}

/// A joined identity acknowledges a uid, so its login waits for the flush that puts it on disk,
/// as a new user's does: a failed flush is a failed login, and the next login of that identity
/// waits for a flush that succeeds.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_joined_identity_is_answered_only_once_on_disk() {
    let tb = TestBroker::start().await;
    logged_in(&tb, None, "quinn.union.1").await;
    assert!(tb.broker.fail_flushes(1));
    let (status, body) =
        parts(login_to(&tb, Some(SANDBOX_LITE_APPID), "quinn.union.1").await).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let again = logged_in(&tb, Some(SANDBOX_LITE_APPID), "quinn.union.2").await;
    assert_eq!(uid_and_new(&again), (Some(1), Some(false)));
}

/// The stores file the default app's data without an appid, so a store keeps the default app it
/// recorded: a broker configured with another one first refuses to start, naming both (on sled
/// and on Redis), and starts again with the recorded one first. Nothing is recorded before
/// `Broker::record_default_app`: until then another app first starts.
#[tokio::test]
async fn a_store_keeps_its_default_app_and_a_broker_with_another_first_refuses_to_start() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    for store in [None, Some(redis.url.clone())] {
        let config = |first: &str, second: &str| wxbroker::Config {
            data_dir: dir.path().join("data"),
            store: store.clone().map(wxbroker::Secret::new),
            appid: Some(first.into()),
            secret: Some(wxbroker::Secret::new("secret-of-the-first-app")),
            apps: vec![wxbroker::App {
                appid: second.into(),
                secret: wxbroker::Secret::new("secret-of-the-second-app"),
                name: None,
            }],
            ..wxbroker::Config::default()
        };
        // Not recorded yet: another default app starts.
        let unbound = wxbroker::Broker::start(&config("wxlite000000001", "wxmain000000001"))
            .await
            .unwrap();
        unbound.shutdown().await.unwrap();
        drop(unbound);
        let broker = wxbroker::Broker::start(&config("wxmain000000001", "wxlite000000001"))
            .await
            .unwrap();
        // Recorded once the credentials proved good (the binary: when WeChat accepted them).
        broker.record_default_app().await.unwrap();
        broker.shutdown().await.unwrap();
        drop(broker);
        let err = wxbroker::Broker::start(&config("wxlite000000001", "wxmain000000001"))
            .await
            .err()
            .expect("another default app is refused");
        assert!(
            matches!(&err, wxbroker::Error::Config(m)
                if m.contains("wxmain000000001 as its default app")
                    && m.contains("but wxlite000000001 is configured")),
            "{err}"
        );
        let again = wxbroker::Broker::start(&config("wxmain000000001", "wxlite000000001"))
            .await
            .unwrap();
        again.shutdown().await.unwrap();
        drop(again);
    }
}

/// `migrate` keeps the default apps apart too: a data dir recorded for one default app is not
/// copied into a Redis recorded for another (the data dir is left as it was, Redis untouched).
#[tokio::test]
async fn migrate_refuses_a_redis_recorded_for_another_default_app() {
    let redis = RedisServer::start().await;
    let store = wxbroker::storage::redis::Redis::connect(&redis.url)
        .await
        .unwrap();
    store.claim_default_app("wxother00000001").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = wxbroker::backup::open_for_import(dir.path(), 8).unwrap();
    data.users().claim_default_app("wxmain000000001").unwrap();
    data.users()
        .upsert(None, "o-mia", "key-of-mia", None, T0)
        .unwrap();
    let policy = wxbroker::Config::default().session_policy();
    let err = wxbroker::backup::migrate_to_redis(&data, &store, policy, T0, false)
        .await
        .expect_err("another default app is refused");
    assert!(
        err.to_string().contains("wxother00000001") && err.to_string().contains("wxmain000000001"),
        "{err}"
    );
    assert_eq!(store.migrated_at().await.unwrap(), None);
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let copied: bool = redis::cmd("EXISTS")
        .arg("wxb:user:o-mia")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!copied, "nothing was copied");
}

/// WeChat's "valid" answer about a session_key is reused per app: a person checking through both
/// mini programs, turn by turn, asks WeChat once per app, not at every turn.
#[tokio::test]
async fn a_valid_checksession_answer_is_reused_in_each_app() {
    let tb = TestBroker::start().await;
    let main = logged_in(&tb, None, "ida.union.1").await;
    let lite = logged_in(&tb, Some(SANDBOX_LITE_APPID), "ida.union.1").await;
    assert_eq!(main["uid"], lite["uid"]);
    for _ in 0..3 {
        for login in [&main, &lite] {
            let verify = tb
                .http
                .get(format!("{}/v1/session?verify=wechat", tb.url))
                .bearer_auth(token(login));
            let (status, body) = parts(verify.send().await.unwrap()).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["sessionKeyValid"], true);
        }
    }
    assert_eq!(
        tb.sandbox.checksession_requests(),
        2,
        "one question per app"
    );
}
