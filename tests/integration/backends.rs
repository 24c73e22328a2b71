//! The behaviour every store must have, run against sled and against a real `redis-server`:
//! each test below runs twice, as `backends::sled::NAME` and `backends::redis::NAME`.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;
use wxbroker::UserKey;
use wxbroker::storage::Storage;
use wxbroker::upstream::Code2Session;
use wxbroker::{MAX_SESSIONS_PER_USER, Sandbox, Secret};

use crate::support::{StoreKind, T0, TestBroker, assert_error, me, parts, post};

const ADMIN: &str = "backends-admin-secret-at-least-32-chars";

/// Defines `sled::NAME` and `redis::NAME` for each `NAME(kind)` test function.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sled {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::StoreKind::Sled).await
            })*
        }
        mod redis {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::StoreKind::Redis).await
            })*
        }
    };
}

on_every_store!(
    a_new_user_gets_the_next_uid_and_a_returning_one_keeps_it,
    concurrent_first_logins_of_one_openid_yield_one_uid,
    a_logout_is_refused_from_the_next_request_on,
    sessions_slide_with_use_and_expire_idle_or_at_their_maximum,
    a_user_beyond_the_session_cap_loses_the_oldest_session,
    a_unionid_reaches_every_session_of_the_user_only,
    users_and_sessions_survive_a_broker_restart,
    the_admin_lists_revokes_finds_and_counts,
    a_used_code_is_refused_without_reaching_wechat,
    a_session_key_replaced_meanwhile_is_kept,
);

async fn start(kind: StoreKind) -> TestBroker {
    TestBroker::start_backend(kind, |c| c.admin_token = Some(Secret::new(ADMIN))).await
}

async fn login(tb: &TestBroker, code: &str) -> Value {
    let (status, body) = parts(tb.login(code).await).await;
    assert_eq!(status, StatusCode::OK, "{code}: {body}");
    body
}

fn token(login: &Value) -> String {
    login["thirdSession"].as_str().unwrap().to_owned()
}

async fn session(tb: &TestBroker, token: &str) -> (StatusCode, Value) {
    parts(tb.session(token).await).await
}

fn admin(tb: &TestBroker, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    tb.http
        .request(method, format!("{}{path}", tb.url))
        .bearer_auth(ADMIN)
}

async fn a_new_user_gets_the_next_uid_and_a_returning_one_keeps_it(kind: StoreKind) {
    let tb = start(kind).await;
    let first = login(&tb, "amy.1").await;
    assert_eq!(
        (first["uid"].as_u64(), first["isNew"].as_bool()),
        (Some(1), Some(true))
    );
    let again = login(&tb, "amy.2").await;
    assert_eq!(
        (again["uid"].as_u64(), again["isNew"].as_bool()),
        (Some(1), Some(false))
    );
    let other = login(&tb, "ben.1").await;
    assert_eq!(
        (other["uid"].as_u64(), other["isNew"].as_bool()),
        (Some(2), Some(true))
    );

    let (status, info) = session(&tb, &token(&first)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["openid"], Sandbox::openid_of("amy"));
    assert_eq!(info["uid"], 1);
    let user = me(&tb, &token(&again)).await;
    assert_eq!(
        (user["uid"].as_u64(), &user["openid"]),
        (Some(1), &info["openid"])
    );
    assert!(
        !user.to_string().contains("session"),
        "no session_key: {user}"
    );
}

async fn concurrent_first_logins_of_one_openid_yield_one_uid(kind: StoreKind) {
    let tb = Arc::new(start(kind).await);
    let logins: Vec<_> = (0..20)
        .map(|i| {
            let tb = tb.clone();
            tokio::spawn(async move { login(&tb, &format!("zed.{i}")).await })
        })
        .collect();
    let mut uids = Vec::new();
    let mut new = 0;
    for login in logins {
        let body = login.await.unwrap();
        uids.push(body["uid"].as_u64().unwrap());
        new += usize::from(body["isNew"] == true);
    }
    uids.dedup();
    assert_eq!((uids, new), (vec![1], 1));
}

async fn a_logout_is_refused_from_the_next_request_on(kind: StoreKind) {
    let tb = start(kind).await;
    let a = token(&login(&tb, "cat.1").await);
    let b = token(&login(&tb, "cat.2").await);
    assert_eq!(tb.logout(&a).await.status(), StatusCode::NO_CONTENT);
    assert_error(
        tb.session(&a).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    assert_error(
        tb.logout(&a).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    assert_eq!(
        session(&tb, &b).await.0,
        StatusCode::OK,
        "the other session lives"
    );
}

async fn sessions_slide_with_use_and_expire_idle_or_at_their_maximum(kind: StoreKind) {
    let tb = TestBroker::start_backend(kind, |c| {
        c.session_idle_ttl = 100;
        c.session_max_ttl = 250;
    })
    .await;
    let used = token(&login(&tb, "dan.1").await);
    let idle = token(&login(&tb, "dan.2").await);
    let (_, info) = session(&tb, &used).await;
    assert_eq!(info["expiresAt"], T0 + 100);
    for step in 1..=2 {
        tb.clock.advance(90);
        let (status, info) = session(&tb, &used).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "used every 90 s: alive at +{}",
            90 * step
        );
        assert_eq!(info["expiresAt"], (T0 + 90 * step + 100).min(T0 + 250));
    }
    assert_error(
        tb.session(&idle).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    tb.clock.advance(70);
    assert_error(
        tb.session(&used).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
}

async fn a_user_beyond_the_session_cap_loses_the_oldest_session(kind: StoreKind) {
    let tb = TestBroker::start_backend(kind, |_| {}).await;
    let mut tokens = Vec::new();
    for i in 0..=MAX_SESSIONS_PER_USER {
        tb.clock.advance(1);
        tokens.push(token(&login(&tb, &format!("eve.{i}")).await));
    }
    assert_error(
        tb.session(&tokens[0]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
    for token in &tokens[1..] {
        assert_eq!(session(&tb, token).await.0, StatusCode::OK);
    }
}

async fn a_unionid_reaches_every_session_of_the_user_only(kind: StoreKind) {
    let tb = start(kind).await;
    let older = token(&login(&tb, "fay.1").await);
    let other = token(&login(&tb, "gus.1").await);
    assert_eq!(session(&tb, &older).await.1["unionid"], Value::Null);
    let newer = token(&login(&tb, "fay.union.2").await);
    let unionid = Sandbox::unionid_of("fay");
    for token in [&older, &newer] {
        assert_eq!(session(&tb, token).await.1["unionid"], unionid.as_str());
    }
    assert_eq!(session(&tb, &other).await.1["unionid"], Value::Null);
    // Learned from a profile, too.
    let data = tb.sandbox.encrypted_profile("gus").unwrap();
    assert_eq!(
        parts(post(&tb, "userinfo", &other, &data).await).await.0,
        StatusCode::OK
    );
    let found = admin(&tb, reqwest::Method::GET, "/admin/users?openid=x")
        .send()
        .await;
    assert_eq!(found.unwrap().status(), StatusCode::NOT_FOUND);
    let by_unionid = format!("/admin/users?unionid={unionid}");
    let user = admin(&tb, reqwest::Method::GET, &by_unionid)
        .send()
        .await
        .unwrap();
    assert_eq!(parts(user).await.1["uid"], 1);
}

async fn users_and_sessions_survive_a_broker_restart(kind: StoreKind) {
    let tb = start(kind).await;
    let hal = token(&login(&tb, "hal.union.1").await);
    let data = tb.sandbox.encrypted_profile("hal").unwrap();
    assert_eq!(
        parts(post(&tb, "userinfo", &hal, &data).await).await.0,
        StatusCode::OK
    );
    let phone = tb.sandbox.encrypted_phone("hal", "13700000001").unwrap();
    assert_eq!(
        parts(post(&tb, "phone", &hal, &phone).await).await.0,
        StatusCode::OK
    );
    let before = me(&tb, &hal).await;

    let tb = tb.restart().await;
    assert_eq!(me(&tb, &hal).await, before);
    assert_eq!(before["profile"]["nickName"], "hal");
    assert_eq!(before["phone"]["purePhoneNumber"], "13700000001");
    let next = login(&tb, "ivy.1").await;
    assert_eq!(next["uid"], 2, "the uid counter survives too");
    // The session_key survived: data sealed with it still opens.
    let data = tb.sandbox.encrypted_profile("hal").unwrap();
    assert_eq!(
        parts(post(&tb, "userinfo", &hal, &data).await).await.0,
        StatusCode::OK
    );
}

async fn the_admin_lists_revokes_finds_and_counts(kind: StoreKind) {
    use reqwest::Method;
    let tb = start(kind).await;
    let a = token(&login(&tb, "jan.1").await);
    let b = token(&login(&tb, "jan.2").await);
    login(&tb, "kim.1").await;

    let (_, listed) = parts(
        admin(&tb, Method::GET, "/admin/users/1/sessions")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let ids: Vec<String> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    let first = &ids[0];
    let revoked = admin(&tb, Method::DELETE, &format!("/admin/sessions/{first}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let live: Vec<&String> = [&a, &b].into_iter().collect();
    let mut statuses = Vec::new();
    for token in live {
        statuses.push(session(&tb, token).await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::UNAUTHORIZED]);

    let (_, stats) = parts(
        admin(&tb, Method::GET, "/admin/stats")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (stats["users"].as_u64(), stats["liveSessions"].as_u64()),
        (Some(2), Some(2))
    );

    let (_, all) = parts(
        admin(&tb, Method::DELETE, "/admin/users/1/sessions")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(all["revoked"], 1);
    for token in [&a, &b] {
        assert_eq!(session(&tb, token).await.0, StatusCode::UNAUTHORIZED);
    }
    let (_, user) = parts(
        admin(&tb, Method::GET, "/admin/users/2")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(user["openid"], Sandbox::openid_of("kim"));
}

async fn a_used_code_is_refused_without_reaching_wechat(kind: StoreKind) {
    let tb = start(kind).await;
    login(&tb, "lea.1").await;
    assert_error(
        tb.login("lea.1").await,
        StatusCode::UNAUTHORIZED,
        "code_used",
    )
    .await;
    assert_eq!(tb.sandbox.exchanges(), 1);
    // A code WeChat refused is not remembered as used: WeChat decides again.
    assert_error(
        tb.login("err40029.x").await,
        StatusCode::UNAUTHORIZED,
        "invalid_code",
    )
    .await;
    assert_error(
        tb.login("err40029.x").await,
        StatusCode::UNAUTHORIZED,
        "invalid_code",
    )
    .await;
    assert_eq!(tb.sandbox.exchanges(), 3);
}

/// Straight through the store interface, as the registry uses it: an admin reset must not
/// overwrite a key that a login stored meanwhile.
async fn a_session_key_replaced_meanwhile_is_kept(kind: StoreKind) {
    let tb = start(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = tb.config.clone();
    config.data_dir = dir.path().to_owned();
    let storage = Storage::open(&config, &Default::default()).await.unwrap();
    let mut users = storage.users();
    let login = |key: &str| Code2Session {
        openid: "o-key".into(),
        session_key: key.into(),
        unionid: None,
    };
    users.upsert(None, login("k1"), T0).wait().await.unwrap();
    let key = |users: &wxbroker::storage::Users| users.session_key("o-key".into()).wait();
    users
        .replace_session_key("o-key".into(), "k0".into(), "k2".into(), T0)
        .wait()
        .await
        .unwrap();
    assert_eq!(key(&users).await.unwrap(), "k1", "k0 is not current: kept");
    users
        .replace_session_key("o-key".into(), "k1".into(), "k2".into(), T0)
        .wait()
        .await
        .unwrap();
    assert_eq!(key(&users).await.unwrap(), "k2");
    let found = users
        .find(UserKey::Openid("o-key".into()))
        .wait()
        .await
        .unwrap();
    assert_eq!(found.unwrap().uid, 1);
}
