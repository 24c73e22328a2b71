//! Several brokers on one Redis: what only a shared store must do. (What every store must do is
//! in `backends.rs`.) Each test starts its own `redis-server` on a free loopback port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use wxbroker::{Clock, SANDBOX_APPID, Sandbox, SandboxOptions};

use crate::binary::{Process, command};
use crate::support::{RedisServer, T0, TestBroker, assert_error, client, eventually, parts};

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

/// Two users on two brokers claim one unionid in profiles at the same moment: the check and the
/// write are one script, so exactly one gets it, and the index and the sessions name the winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_racing_for_one_unionid_bind_it_once() {
    let redis = Arc::new(RedisServer::start().await);
    let wechat = sandbox().await;
    let a = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |_| {}).await;
    let b = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |_| {}).await;
    let claim = |name: &str, unionid: &str| {
        let text = serde_json::json!({
            "openId": Sandbox::openid_of(name),
            "unionId": unionid,
            "nickName": name,
            "watermark": { "appid": SANDBOX_APPID, "timestamp": 1_790_000_000 },
        });
        wechat
            .encrypt_for(name, text.to_string().as_bytes())
            .unwrap()
    };
    for round in 0..10 {
        let unionid = format!("u-raced-{round}");
        let (x, y) = (format!("rx{round}"), format!("ry{round}"));
        let (tx, ty) = (
            a.token(&format!("{x}.1")).await,
            b.token(&format!("{y}.1")).await,
        );
        let (cx, cy) = (claim(&x, &unionid), claim(&y, &unionid));
        let (rx, ry) = tokio::join!(
            crate::support::post(&a, "userinfo", &tx, &cx),
            crate::support::post(&b, "userinfo", &ty, &cy),
        );
        let mut outcomes = [(rx.status(), &x, &tx), (ry.status(), &y, &ty)];
        outcomes.sort_by_key(|(status, _, _)| *status);
        let [(won, winner, winner_token), (lost, _, loser_token)] = outcomes;
        assert_eq!(
            (won, lost),
            (StatusCode::OK, StatusCode::CONFLICT),
            "round {round}"
        );
        let found = a
            .broker
            .find_user(wxbroker::UserKey::Unionid(unionid.clone()));
        assert_eq!(
            found.await.unwrap().unwrap().openid,
            Sandbox::openid_of(winner)
        );
        let (_, session) = parts(b.session(winner_token).await).await;
        assert_eq!(session["unionid"], unionid.as_str());
        let (_, session) = parts(a.session(loser_token).await).await;
        assert_eq!(session["unionid"], serde_json::Value::Null);
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

/// The README's promise: the broker reconnects by itself. Redis comes back on the same port
/// (empty: nothing was persisted, and no script is loaded) and the same broker serves again.
#[tokio::test]
async fn a_redis_back_after_an_outage_is_used_again_without_a_restart() {
    let tb = TestBroker::start_backend(crate::support::StoreKind::Redis, |_| {}).await;
    let redis = tb.redis.as_ref().unwrap();
    tb.token("cal.1").await;
    let ready = || async {
        let response = tb.http.get(format!("{}/readyz", tb.url)).send().await;
        response.unwrap().status()
    };
    redis.kill();
    assert_error(
        tb.login("cal.2").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    )
    .await;
    assert_eq!(ready().await, StatusCode::SERVICE_UNAVAILABLE);

    redis.restart().await;
    eventually(
        "the broker to be ready on the Redis that came back",
        || async { ready().await == StatusCode::OK },
    )
    .await;
    let (status, login) = parts(tb.login("cal.3").await).await;
    assert_eq!(
        (status, login["isNew"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{login}"
    );
    let token = login["thirdSession"].as_str().unwrap();
    let (status, session) = parts(tb.session(token).await).await;
    assert_eq!(status, StatusCode::OK, "{session}");
    assert_eq!(tb.logout(token).await.status(), StatusCode::NO_CONTENT);
}

/// Redis Cluster is not supported (the scripts touch keys of several hash slots): a cluster node
/// is refused at start with a message saying what to use instead, not found out at a login.
#[tokio::test]
async fn a_redis_cluster_node_is_refused_at_start() {
    let node = RedisServer::start_with(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut start = command(dir.path());
    start.env("WXBROKER_STORE", &node.url);
    // A broker that took the node would serve on and never exit.
    let output = tokio::time::timeout(Duration::from_secs(15), start.output())
        .await
        .expect("the broker refused the cluster node and exited")
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{all}");
    let refusal = format!(
        "Redis at {} is a Redis Cluster node, which wxbroker does not support: point \
         WXBROKER_STORE at a single Redis server (or a proxy presenting one)",
        node.url
    );
    assert!(all.contains(&refusal), "{all}");
    assert!(!all.contains("panicked"), "{all}");
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
    let c_killed = Arc::new(AtomicBool::new(false));
    let after_kill = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let survivor = i < 2;
        for token in tokens.clone() {
            let (http, url) = (http.clone(), url.clone());
            let (stop, c_killed, after_kill) = (stop.clone(), c_killed.clone(), after_kill.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let killed = c_killed.load(Ordering::Relaxed);
                    let sent = http
                        .get(format!("{url}/v1/session"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    if survivor {
                        let response = sent.expect("A and B keep answering");
                        assert_eq!(response.status(), StatusCode::OK);
                        if killed {
                            after_kill.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if sent.is_err() {
                        // C is gone; its clients would go to A or B.
                        return;
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill9().await;
    c_killed.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(
        after_kill.load(Ordering::Relaxed) > 0,
        "no request answered after C died"
    );
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
    assert_eq!(
        (logged(&stderr, "users"), logged(&stderr, "sessions")),
        (Some(2), Some(2)),
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

    // Again: refused, since brokers may have revoked sessions on Redis meanwhile; with --force,
    // what Redis holds already is kept.
    let migrate = |force: bool| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxbroker"));
        command
            .arg("migrate")
            .arg("--from")
            .arg(format!("sled:{}", data_dir.display()))
            .env("WXBROKER_STORE", &redis.url);
        if force {
            command.arg("--force");
        }
        command
    };
    let again = migrate(false).output().await.unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = migrate(true).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(forced.status.success(), "{stderr}");
    assert_eq!(
        (logged(&stderr, "users"), logged(&stderr, "users_kept")),
        (Some(0), Some(2)),
        "{stderr}"
    );
    let (_, kept) = parts(tb.login("gil.2").await).await;
    assert_eq!(kept["uid"], 1);

    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxbroker"))
        .args(["migrate", "--from", "/nowhere", "--to", &redis.url])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sled:DIR"));
}

/// The number logged as `field=N` in `log`: that field exactly (`users` is not `users_kept`,
/// and 2 is not 20).
fn logged(log: &str, field: &str) -> Option<u64> {
    log.split_whitespace()
        .find_map(|word| word.strip_prefix(field)?.strip_prefix('=')?.parse().ok())
}

/// The Redis key of the session of `token`.
fn session_key(token: &str) -> String {
    let id: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("wxb:session:{id}")
}

async fn redis_connection(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

#[tokio::test]
async fn checks_write_the_last_use_only_every_tenth_of_the_idle_ttl() {
    let tb = TestBroker::start_backend(crate::support::StoreKind::Redis, |c| {
        c.session_idle_ttl = 1000;
        c.session_max_ttl = 100_000;
    })
    .await;
    let token = tb.token("jo.1").await;
    let key = session_key(&token);
    let mut con = redis_connection(tb.redis.as_ref().unwrap()).await;
    let last_seen = |con: &mut redis::aio::MultiplexedConnection| {
        let mut con = con.clone();
        let key = key.clone();
        async move {
            redis::cmd("HGET")
                .arg(&key)
                .arg("last_seen")
                .query_async::<u64>(&mut con)
                .await
                .unwrap()
        }
    };
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(
        (990_000..=1_000_000).contains(&ttl_ms),
        "the idle TTL: {ttl_ms} ms"
    );

    tb.clock.advance(99);
    let (_, info) = parts(tb.session(&token).await).await;
    assert_eq!(info["expiresAt"], T0 + 1000, "not slid yet: under a tenth");
    assert_eq!(
        last_seen(&mut con).await,
        T0,
        "no write under a tenth of the idle TTL"
    );

    tb.clock.advance(1);
    let (_, info) = parts(tb.session(&token).await).await;
    assert_eq!(info["expiresAt"], T0 + 100 + 1000);
    assert_eq!(
        last_seen(&mut con).await,
        T0 + 100,
        "written once a tenth had passed"
    );
}

#[tokio::test]
async fn an_idle_session_is_expired_by_redis_itself() {
    let tb = TestBroker::start_backend(crate::support::StoreKind::Redis, |c| {
        c.clock = Clock::system();
        c.session_idle_ttl = 3;
    })
    .await;
    let token = tb.token("kay.1").await;
    let mut con = redis_connection(tb.redis.as_ref().unwrap()).await;
    let key = session_key(&token);
    let exists = |con: &mut redis::aio::MultiplexedConnection| {
        let mut con = con.clone();
        let key = key.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(&key)
                .query_async::<i64>(&mut con)
                .await
                .unwrap()
        }
    };
    assert_eq!(exists(&mut con).await, 1);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(exists(&mut con).await, 0, "gone without any sweep or check");
    assert_error(
        tb.session(&token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
}

#[tokio::test]
async fn a_password_in_the_store_url_is_never_shown() {
    let url = "redis://:sekrit-password@127.0.0.1:1/0";
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxbroker"))
        .arg("--help")
        .env("WXBROKER_STORE", url)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("WXBROKER_STORE") && !text.contains("sekrit"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut start = command(dir.path());
    start.env("WXBROKER_STORE", url);
    let output = start.output().await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        all.contains("cannot reach Redis at redis://:REDACTED@127.0.0.1:1/0"),
        "{all}"
    );
    assert!(!all.contains("sekrit"), "{all}");
}

#[tokio::test]
async fn a_code_another_broker_is_exchanging_is_busy_then_used() {
    let redis = Arc::new(RedisServer::start().await);
    let wechat = Arc::new(
        Sandbox::start(SandboxOptions {
            latency: Duration::from_millis(500),
            ..SandboxOptions::default()
        })
        .await
        .unwrap(),
    );
    let a =
        Arc::new(TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |_| {}).await);
    let b = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), |_| {}).await;
    let first = {
        let a = a.clone();
        tokio::spawn(async move { a.token("lu.1").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_error(
        b.login("lu.1").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_busy",
    )
    .await;
    first.await.unwrap();
    assert_error(b.login("lu.1").await, StatusCode::UNAUTHORIZED, "code_used").await;
    assert_eq!(wechat.exchanges(), 1);
}

#[tokio::test]
async fn brokers_on_one_redis_share_each_users_budget_of_wechat_calls() {
    let redis = Arc::new(RedisServer::start().await);
    let wechat = sandbox().await;
    let clock = Clock::manual(T0);
    let budget = |c: &mut wxbroker::Config| {
        c.wechat_calls_per_min = 20;
        c.clock = clock.clone();
    };
    let a = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), budget).await;
    let b = TestBroker::start_shared(Some(redis.clone()), Some(wechat.clone()), budget).await;
    let phone = |tb: &TestBroker, token: &str, i: usize| {
        let request = tb
            .http
            .post(format!("{}/v1/phone", tb.url))
            .bearer_auth(token)
            .json(&serde_json::json!({ "code": format!("1370000{i:04}.r") }));
        async move { request.send().await.unwrap() }
    };
    let token = a.token("kai.1").await;
    // Ten calls through each broker: the user's twenty for this minute.
    for i in 0..20 {
        let broker = if i % 2 == 0 { &a } else { &b };
        let (status, body) = parts(phone(broker, &token, i).await).await;
        assert_eq!(status, StatusCode::OK, "call {i}: {body}");
    }
    for (i, broker) in [(20, &a), (21, &b)] {
        let response = phone(broker, &token, i).await;
        let retry_after = response.headers().get("retry-after").cloned();
        assert_error(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
        let expected = (60 - T0 % 60).to_string();
        assert_eq!(retry_after.unwrap().to_str().unwrap(), expected);
    }
    assert_eq!(wechat.phone_number_requests(), 20);
    // Another user's budget is untouched, on either broker.
    let other = b.token("lin.1").await;
    assert_eq!(parts(phone(&b, &other, 30).await).await.0, StatusCode::OK);
    // The next minute, on the next minute's counter.
    clock.advance(60);
    assert_eq!(parts(phone(&b, &token, 31).await).await.0, StatusCode::OK);
    assert_eq!(wechat.phone_number_requests(), 22);
}
