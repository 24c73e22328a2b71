//! The start-up check of real credentials: what WeChat refuses stops the start with exit 1 and
//! names the fix; a WeChat out of reach only warns.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use reqwest::StatusCode;
use tokio::process::Command;
use warp::Filter;

use crate::binary::{Process, command};
use crate::support::client;

/// A stand-in WeChat whose token endpoints (stable and classic) answer `body`; counts the calls.
async fn token_endpoint(body: &'static str) -> (String, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let route = warp::path("cgi-bin").map(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        warp::reply::with_header(body, "content-type", "application/json")
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (url, calls)
}

fn with_credentials(dir: &Path, base: &str) -> Command {
    let mut command = command(dir);
    command
        .env("WECHAT_APPID", "wx0123456789abcdef")
        .env("WECHAT_SECRET", "S3CRET-never-printed")
        .env("WECHAT_API_BASE", base);
    command
}

#[tokio::test]
async fn what_wechat_refuses_at_start_is_exit_1_naming_the_fix() {
    let cases = [
        (
            r#"{"errcode":40164,"errmsg":"invalid ip 203.0.113.7 ipv6 ::ffff:203.0.113.7, not in whitelist"}"#,
            ["IP whitelist", "203.0.113.7"],
        ),
        (
            r#"{"errcode":40125,"errmsg":"invalid appsecret"}"#,
            ["WECHAT_SECRET", "AppSecret"],
        ),
        (
            r#"{"errcode":40001,"errmsg":"invalid credential"}"#,
            ["WECHAT_SECRET", "AppSecret"],
        ),
        (
            r#"{"errcode":40013,"errmsg":"invalid appid"}"#,
            ["WECHAT_APPID", "wx0123456789abcdef"],
        ),
        (
            r#"{"errcode":61004,"errmsg":"access clientip is not registered"}"#,
            ["IP whitelist", "61004"],
        ),
    ];
    for (answer, expected) in cases {
        let (base, calls) = token_endpoint(answer).await;
        let dir = tempfile::tempdir().unwrap();
        // A broker that serves instead of stopping is killed at the timeout (kill_on_drop).
        let output = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            with_credentials(dir.path(), &base).output(),
        )
        .await
        .expect("the start stops within 20 s")
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(1), "{answer}: {stderr}{stdout}");
        for words in expected {
            assert!(stderr.contains(words), "{answer}: {words:?} in {stderr}");
        }
        assert!(calls.load(Ordering::Relaxed) >= 1);
        let all = format!("{stderr}{stdout}");
        assert!(!all.contains("S3CRET"), "{all}");
        assert!(!all.contains("serving"), "it must not serve: {all}");
    }
}

#[tokio::test]
async fn accepted_credentials_are_logged_with_the_appid_and_served() {
    let (base, calls) =
        token_endpoint(r#"{"access_token":"T0KEN-never-printed","expires_in":7200}"#).await;
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn(with_credentials(dir.path(), &base)).await;
    let log = process.log.lock().unwrap().clone();
    assert!(
        log.contains("WeChat accepts the credentials") && log.contains("wx0123456789abcdef"),
        "{log}"
    );
    assert!(!log.contains("T0KEN") && !log.contains("S3CRET"), "{log}");
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    let health = client()
        .get(format!("{}/healthz", process.url))
        .send()
        .await;
    assert_eq!(health.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn a_wechat_out_of_reach_at_start_only_warns() {
    // A port that refuses connections: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn(with_credentials(dir.path(), &base)).await;
    let log = process.log.lock().unwrap().clone();
    assert!(
        log.contains("could not check the credentials with WeChat at start"),
        "{log}"
    );
    let health = client()
        .get(format!("{}/healthz", process.url))
        .send()
        .await;
    assert_eq!(health.unwrap().status(), StatusCode::OK);
}
