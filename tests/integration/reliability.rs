//! Failure modes: a misbehaving WeChat, slow or idle clients, floods, shutdown while busy.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wxbroker::{Sandbox, SandboxOptions};

use crate::support::{TestBroker, assert_error, eventually, fault_upstream, parts};

async fn on_faults(
    tweak: impl FnOnce(&mut wxbroker::Config),
) -> (TestBroker, Arc<std::sync::atomic::AtomicU64>) {
    let (url, calls) = fault_upstream().await;
    let tb = TestBroker::start_with(|c| {
        c.api_base = url.parse().unwrap();
        tweak(c);
    })
    .await;
    (tb, calls)
}

#[tokio::test]
async fn a_busy_wechat_is_retried_and_then_succeeds() {
    let (tb, calls) = on_faults(|c| c.upstream_retries = 2).await;
    let (status, body) = parts(tb.login("busy_once.1").await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(calls.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn code_used_after_our_own_retry_is_busy_not_the_clients_fault() {
    let (tb, calls) = on_faults(|c| c.upstream_retries = 2).await;
    assert_error(
        tb.login("busy_then_used.1").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_busy",
    )
    .await;
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    // Busy on every try: 503 with a Retry-After, once the retries are spent.
    let always = tb.login("busy.1").await;
    assert!(always.headers().contains_key("retry-after"));
    assert_error(always, StatusCode::SERVICE_UNAVAILABLE, "upstream_busy").await;
    assert_eq!(
        calls.load(Ordering::Relaxed),
        2 + 3,
        "one try and two retries"
    );
}

#[tokio::test]
async fn a_redirect_from_wechat_is_not_followed() {
    // The request carries the secret in its query: it must not go anywhere else.
    let (tb, calls) = on_faults(|_| {}).await;
    assert_error(
        tb.login("redirect").await,
        StatusCode::BAD_GATEWAY,
        "upstream_error",
    )
    .await;
    assert_eq!(calls.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_slow_answer_within_the_timeout_succeeds() {
    let sandbox = Sandbox::start(SandboxOptions {
        latency: Duration::from_millis(400),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let tb = TestBroker::start_on(Arc::new(sandbox), |c| c.upstream_timeout_ms = 2000).await;
    let (status, _) = parts(tb.login("slow.1").await).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_hanging_wechat_fills_the_in_flight_limit_and_the_rest_get_503_quickly() {
    let (tb, _) = on_faults(|c| {
        c.max_inflight = 4;
        c.upstream_timeout_ms = 1500;
    })
    .await;
    let started = Instant::now();
    let codes: Vec<String> = (0..24).map(|i| format!("hang.{i}")).collect();
    let timed = join_all(codes.iter().map(|code| async {
        let response = tb.login(code).await;
        (response.status(), started.elapsed())
    }))
    .await;
    let busy: Vec<_> = timed
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    let timeouts = timed
        .iter()
        .filter(|(s, _)| *s == StatusCode::GATEWAY_TIMEOUT)
        .count();
    assert_eq!((busy.len(), timeouts), (20, 4), "{timed:?}");
    // The refused ones did not wait for the hanging ones.
    assert!(
        busy.iter().all(|(_, at)| *at < Duration::from_millis(1000)),
        "{timed:?}"
    );
}

#[tokio::test]
async fn idle_connections_do_not_lock_out_a_normal_client_and_are_cut_off() {
    let _ = rlimit::increase_nofile_limit(8192);
    let tb = TestBroker::start_with(|c| {
        c.header_read_timeout_ms = 700;
        // All 500 from one address, as the normal client: the per-address cap has tests of its
        // own (serve.rs).
        c.max_connections_per_ip = 0;
    })
    .await;
    let addr = tb.url.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for i in 0..500 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            // Half of them start a request and never finish its headers.
            stream
                .write_all(b"POST /v1/login HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    let (status, _) = parts(tb.login("walt.1").await).await;
    assert_eq!(status, StatusCode::OK);
    // The server closes every one of them once the header-read timeout passes.
    for mut stream in idle {
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
        // A reset counts as closed too.
        if let Ok(n) = read.expect("the server closes idle connections") {
            let answer = String::from_utf8_lossy(&buf[..n]);
            assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
        }
    }
}

/// Sends `request` on `stream` and reads one answer (its head, then a `Content-Length` body).
async fn exchange(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

/// Reads one HTTP/1.1 answer from `stream`: its head, then a `Content-Length` body.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert_eq!(
            n,
            1,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.push(byte[0]);
    }
    let head = String::from_utf8(answer.clone()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    answer.extend_from_slice(&body);
    String::from_utf8(answer).unwrap()
}

/// With every connection slot taken, a new client is not even accepted: its connection and its
/// whole request wait in the kernel's queue, unread, until a slot frees; then it is served. The
/// server's own counters say when it waited and how many connections it holds.
#[tokio::test]
async fn the_connection_cap_makes_new_clients_wait_for_a_free_slot() {
    let tb = TestBroker::start_with(|c| {
        c.max_connections = 2;
        // Longer than the test: the test itself frees a slot.
        c.header_read_timeout_ms = 60_000;
    })
    .await;
    let addr = tb.url.trim_start_matches("http://").to_owned();
    let metrics = tb.broker.metrics();
    let health = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    // Two clients, each answered once and kept alive: they hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let answer = exchange(&mut stream, health).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
    }
    eventually("the accept loop to wait for a free slot", || async {
        metrics.connection_cap_reached.get() == 1
    })
    .await;
    assert_eq!(metrics.connections_open.get(), 2);

    // A third client sends a whole login: nothing reads it, nothing answers it.
    let mut waiting = TcpStream::connect(&addr).await.unwrap();
    let body = r#"{"code":"xena.1"}"#;
    let login = format!(
        "POST /v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    waiting.write_all(login.as_bytes()).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), waiting.read(&mut byte)).await;
    assert!(early.is_err(), "answered with the cap full: {early:?}");
    assert_eq!(tb.sandbox.exchanges(), 0, "its request was read");
    assert_eq!(metrics.connections_open.get(), 2, "it was accepted");

    // A slot frees: it is served, and the loop waits again with the cap full once more.
    drop(held.pop());
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut waiting))
        .await
        .expect("served once a slot freed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("thirdSession"), "{answer}");
    assert_eq!(tb.sandbox.exchanges(), 1);
    eventually("the accept loop to wait again", || async {
        metrics.connection_cap_reached.get() == 2
    })
    .await;
    assert_eq!(metrics.connections_open.get(), 2);
    // The held client was served all along.
    let answer = exchange(&mut held[0], health).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn logins_from_one_address_are_rate_limited() {
    let tb = TestBroker::start_with(|c| {
        c.login_rate_per_min = 1;
        c.login_burst = 2;
    })
    .await;
    for i in 0..2 {
        let (status, _) = parts(tb.login(&format!("yara.{i}")).await).await;
        assert_eq!(status, StatusCode::OK);
    }
    let limited = tb.login("yara.3").await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_error(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(
        tb.sandbox.exchanges(),
        2,
        "a limited login never reaches WeChat"
    );
    // Other routes are not limited.
    assert_error(
        tb.session(&"A".repeat(43)).await,
        StatusCode::UNAUTHORIZED,
        "invalid_session",
    )
    .await;
}

#[tokio::test]
async fn past_the_drain_timeout_remaining_connections_are_closed() {
    let sandbox = Sandbox::start(SandboxOptions {
        latency: Duration::from_secs(5),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let mut tb = TestBroker::start_on(Arc::new(sandbox), |c| c.drain_timeout_ms = 300).await;
    let http = tb.http.clone();
    let url = format!("{}/v1/login", tb.url);
    let in_flight = tokio::spawn(async move {
        http.post(url)
            .json(&serde_json::json!({ "code": "yuri.1" }))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    tb.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Its connection was closed under it: no answer at all, not a late one.
    assert!(in_flight.await.unwrap().is_err());
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight() {
    let sandbox = Sandbox::start(SandboxOptions {
        latency: Duration::from_millis(600),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let mut tb = TestBroker::start_on(Arc::new(sandbox), |_| {}).await;
    let http = tb.http.clone();
    let url = format!("{}/v1/login", tb.url);
    let in_flight = tokio::spawn(async move {
        http.post(url)
            .json(&serde_json::json!({ "code": "zack.1" }))
            .send()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tb.stop().await;
    let response = in_flight.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let client = crate::support::client();
    assert!(
        client
            .get(format!("{}/healthz", tb.url))
            .send()
            .await
            .is_err(),
        "no longer accepting"
    );
}
