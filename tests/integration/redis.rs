//! Several brokers on one Redis: what only a shared store must do. (What every store must do is
//! in `backends.rs`.) Each test starts its own `redis-server` on a free loopback port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use wxbroker::{Clock, SANDBOX_APPID, Sandbox, SandboxOptions};

use crate::binary::{Process, command};
use crate::support::{RedisServer, TestBroker, assert_error, client, parts};

async fn sandbox() -> Arc<Sandbox> {
    Arc::new(Sandbox::start(SandboxOptions::default()).await.unwrap())
}

#[tokio::test]
async fn a_code_replayed_to_another_broker_never_reaches_wechat() {
    let redis = Arc::new(RedisServer::start().await);
    let wechat = sandbox().await;
    let a = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |_| {}).await;
    let b = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |_| {}).await;
    a.token("ada.1").await;
    assert_error(
        b.login("ada.1").await,
        StatusCode::UNAUTHORIZED,
        "code_used",
    )
    .await;
    assert_eq!(
        wechat.exchanges(),
        1,
        "the replay was refused by the shared store"
    );
    // A code WeChat refused is given back: another broker may try it (and WeChat decides).
    assert_error(
        a.login("err-1.x").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_busy",
    )
    .await;
    let before = wechat.exchanges();
    assert_error(
        b.login("err-1.x").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_busy",
    )
    .await;
    assert!(wechat.exchanges() > before);
}

#[tokio::test]
async fn a_logout_on_one_broker_is_refused_by_the_others_on_the_next_request() {
    let redis = Arc::new(RedisServer::start().await);
    let wechat = sandbox().await;
    let a = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |_| {}).await;
    let b = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |_| {}).await;
    for round in 0..20 {
        let token = a.token(&format!("bo.{round}")).await;
        assert_eq!(b.session(&token).await.status(), StatusCode::OK);
        assert_eq!(b.logout(&token).await.status(), StatusCode::NO_CONTENT);
        assert_error(
            a.session(&token).await,
            StatusCode::UNAUTHORIZED,
            "invalid_session",
        )
        .await;
    }
}

#[tokio::test]
async fn a_lost_redis_is_a_503_and_not_ready_never_a_hang() {
    let tb = TestBroker::start_backend(crate::support::StoreKind::Redis, |_| {}).await;
    let token = tb.token("cy.1").await;
    tb.redis.as_ref().unwrap().kill();
    let started = std::time::Instant::now();
    assert_error(
        tb.session(&token).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    )
    .await;
    assert_error(
        tb.login("cy.2").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    )
    .await;
    let ready = tb
        .http
        .get(format!("{}/readyz", tb.url))
        .send()
        .await
        .unwrap();
    assert_error(ready, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// A `wxbroker` process on `redis` with `wechat` as its WeChat.
async fn instance(redis: &RedisServer, wechat: &Sandbox) -> (Process, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = command(dir.path());
    command
        .env("WXBROKER_STORE", &redis.url)
        .env("WECHAT_APPID", SANDBOX_APPID)
        .env("WECHAT_SECRET", wechat.secret().expose())
        .env("WECHAT_API_BASE", wechat.url().as_str());
    (Process::spawn(command).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_broker_processes_share_users_and_sessions() {
    let redis = RedisServer::start().await;
    let wechat = sandbox().await;
    let (a, _a) = instance(&redis, &wechat).await;
    let (b, _b) = instance(&redis, &wechat).await;
    let (c, _c) = instance(&redis, &wechat).await;
    let urls = [a.url.clone(), b.url.clone(), c.url.clone()];
    let http = client();
    let login = |url: &str, code: &str| {
        http.post(format!("{url}/v1/login"))
            .form(&[("code", code.to_owned())])
            .send()
    };
    let check = |url: &str, token: &str| {
        http.get(format!("{url}/v1/session"))
            .bearer_auth(token)
            .send()
    };

    // Login on A, check on B, logout on C: refused on A and B from then on.
    let (status, body) = parts(login(&a.url, "dee.1").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["thirdSession"].as_str().unwrap().to_owned();
    let (status, info) = parts(check(&b.url, &token).await.unwrap()).await;
    assert_eq!((status, info["uid"].as_u64()), (StatusCode::OK, Some(1)));
    let logout = http
        .post(format!("{}/v1/logout", c.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    for url in [&a.url, &b.url] {
        assert_error(
            check(url, &token).await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_session",
        )
        .await;
    }

    // 50 concurrent first logins of one openid, spread over the three: one uid.
    let logins: Vec<_> = (0..50)
        .map(|i| {
            let (http, url) = (http.clone(), urls[i % 3].clone());
            tokio::spawn(async move {
                let response = http
                    .post(format!("{url}/v1/login"))
                    .form(&[("code", format!("eli.{i}"))])
                    .send()
                    .await
                    .unwrap();
                parts(response).await
            })
        })
        .collect();
    let mut uids = Vec::new();
    let mut new = 0;
    for login in logins {
        let (status, body) = login.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        uids.push(body["uid"].as_u64().unwrap());
        new += usize::from(body["isNew"] == true);
    }
    uids.sort();
    uids.dedup();
    assert_eq!((uids, new), (vec![2], 1), "one uid, registered once");

    // Kill C in the middle of load on all three: A and B keep answering every request.
    let mut tokens = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let (_, body) = parts(login(url, &format!("fox.{i}")).await.unwrap()).await;
        tokens.push(body["thirdSession"].as_str().unwrap().to_owned());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for url in [a.url.clone(), b.url.clone()] {
        for token in tokens.clone() {
            let (http, url, stop, answered) =
                (http.clone(), url.clone(), stop.clone(), answered.clone());
            workers.push(tokio::spawn(async move {
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) && sent < 5_000 {
                    let response = http
                        .get(format!("{url}/v1/session"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .expect("A and B keep answering");
                    assert_eq!(response.status(), StatusCode::OK);
                    answered.fetch_add(1, Ordering::Relaxed);
                    sent += 1;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill9().await;
    let at_kill = answered.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let after_kill = answered.load(Ordering::Relaxed) - at_kill;
    assert!(after_kill > 0, "no request answered after C died");
    // C's session is good on the survivors.
    let (status, _) = parts(check(&a.url, &tokens[2]).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn migrate_moves_a_sled_deployment_to_redis_without_logging_anyone_out() {
    let wechat = sandbox().await;
    // Real time on both sides: `migrate` keeps the sessions live at the real now.
    let mut sled = TestBroker::start_on(wechat.clone(), |c| c.clock = Clock::system()).await;
    let token = sled.token("gil.union.1").await;
    let profile = wechat.encrypted_profile("gil").unwrap();
    let saved = crate::support::post(&sled, "userinfo", &token, &profile).await;
    assert_eq!(saved.status(), StatusCode::OK);
    sled.token("hu.1").await;
    let before = crate::support::me(&sled, &token).await;
    sled.stop().await;
    let dir = sled.dir.clone();
    let data_dir = dir.path().to_owned();
    drop(sled);

    let redis = Arc::new(RedisServer::start().await);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxbroker"))
        .arg("migrate")
        .arg("--from")
        .arg(format!("sled:{}", data_dir.display()))
        .arg("--to")
        .arg(&redis.url)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("users=2") && stderr.contains("sessions=2"),
        "{stderr}"
    );

    let tb = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |c| {
        c.clock = Clock::system();
    })
    .await;
    assert_eq!(
        crate::support::me(&tb, &token).await,
        before,
        "still logged in, same user"
    );
    // The session_key came along: data sealed with it still opens.
    let profile = wechat.encrypted_profile("gil").unwrap();
    let again = crate::support::post(&tb, "userinfo", &token, &profile).await;
    assert_eq!(again.status(), StatusCode::OK);
    let (_, next) = parts(tb.login("ivo.1").await).await;
    assert_eq!(next["uid"], 3, "uids go on after the migrated ones");

    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxbroker"))
        .args(["migrate", "--from", "/nowhere", "--to", &redis.url])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sled:DIR"));
}
