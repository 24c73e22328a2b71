//! `wxbroker::run`, as the binary uses it: sandbox fallback, serving, clean shutdown; and what
//! the server does with connections: per-address limits, answers before the body.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wxbroker::{Config, Secret};

use crate::support::{TestBroker, assert_error, client, eventually, parts};

async fn serve_once(dir: &std::path::Path, code: &str) -> (StatusCode, serde_json::Value) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = Config {
        data_dir: dir.to_owned(),
        cache_mb: 8,
        ..Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(wxbroker::run(listener, config, async {
        let _ = stopped.await;
    }));
    let http = client();
    let answer = parts(
        http.post(format!("{url}/v1/login"))
            .form(&[("code", code)])
            .send()
            .await
            .unwrap(),
    )
    .await;
    // In sandbox mode the broker's own port also plays the client's part for encrypted data.
    let name = code.split('.').next().unwrap();
    let data = http
        .get(format!("{url}/sandbox/userinfo?user={name}"))
        .send()
        .await
        .unwrap();
    let (status, data) = parts(data).await;
    assert_eq!(status, StatusCode::OK, "{data}");
    let token = answer.1["thirdSession"].as_str().unwrap();
    let userinfo = http
        .post(format!("{url}/v1/userinfo"))
        .bearer_auth(token)
        .json(&data)
        .send()
        .await
        .unwrap();
    let (status, profile) = parts(userinfo).await;
    assert_eq!(
        (status, profile["nickName"].as_str()),
        (StatusCode::OK, Some(name))
    );
    drop(http);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    answer
}

#[tokio::test]
async fn run_serves_the_sandbox_without_credentials_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (status, first) = serve_once(dir.path(), "sam.1").await;
    assert_eq!(
        (status, first["isNew"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    // A second run on the same directory finds the user (a new sandbox, same openid).
    let (status, second) = serve_once(dir.path(), "sam.2").await;
    assert_eq!(
        (status, second["isNew"].as_bool()),
        (StatusCode::OK, Some(false))
    );
    assert_eq!(first["uid"], second["uid"]);
}

#[tokio::test]
async fn run_refuses_half_a_set_of_credentials() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        appid: Some("wx123".into()),
        ..Config::default()
    };
    let err = wxbroker::run(listener, config, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, wxbroker::Error::Config(_)), "{err}");
}

/// A burst of clients connecting at once must not overflow the accept queue: with the usual
/// backlog of 128 the kernel drops the SYNs beyond it, and each of those clients waits a 1 s
/// retransmit before it even reaches the broker. Nothing accepts here, so every connection that
/// completes was queued by the kernel, and one that found the queue full never completes.
///
/// A machine whose limits are too low for the burst fails it, saying what to raise (`.ci/run`
/// raises both): a skip would leave CI green without the test.
#[tokio::test]
async fn bind_queues_a_burst_of_connections_without_dropping_any() {
    const BURST: usize = 600;
    // The kernel caps the backlog at net.core.somaxconn (4096 since Linux 5.4).
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("/proc/sys/net/core/somaxconn is readable (this test needs Linux)");
    let somaxconn: usize = somaxconn.trim().parse().unwrap();
    assert!(
        somaxconn > BURST,
        "net.core.somaxconn is {somaxconn}, which caps every listen queue below this test's burst \
         of {BURST} connections: raise it (as root: sysctl -w net.core.somaxconn=4096; .ci/run \
         does it)"
    );
    // The burst needs its descriptors beside those of the tests running in parallel.
    let descriptors = rlimit::increase_nofile_limit(8192).unwrap() as usize;
    assert!(
        descriptors >= 4 * BURST,
        "the open-file limit is {descriptors} (and cannot be raised past the hard limit): this \
         test needs {} for a burst of {BURST} connections beside the other tests; raise it \
         (ulimit -n 8192, as root for a hard limit that low; .ci/run does it)",
        4 * BURST
    );
    let listener = wxbroker::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        connects.spawn(tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(addr),
        ));
    }
    let mut streams = Vec::new();
    while let Some(outcome) = connects.join_next().await {
        if let Ok(Ok(stream)) = outcome.unwrap() {
            streams.push(stream);
        }
    }
    let connected = streams.len();
    assert_eq!(connected, BURST, "connections the kernel queued in time");
}

/// Without credentials, the sandbox WeChat (anyone logs in as anyone) never serves on an address
/// that is not loopback unless the operator says so: `run` refuses before it starts anything
/// (no data dir appears), naming what to set.
#[tokio::test]
async fn run_serves_the_sandbox_on_a_public_address_only_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = Config {
        data_dir: data_dir.clone(),
        cache_mb: 8,
        ..Config::default()
    };
    let public = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let refused = wxbroker::run(public, config.clone(), std::future::pending());
    let err = tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("refused at once, not served")
        .unwrap_err();
    let wxbroker::Error::Config(message) = &err else {
        panic!("{err}")
    };
    for name in ["WECHAT_APPID", "WECHAT_SECRET", "WXBROKER_SANDBOX"] {
        assert!(message.contains(name), "{message}");
    }
    assert!(!data_dir.exists(), "nothing was started");

    // Told to (WXBROKER_SANDBOX=1), it serves there.
    let public = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = public.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let told = Config {
        sandbox: true,
        ..config
    };
    let server = tokio::spawn(wxbroker::run(public, told, async {
        let _ = stopped.await;
    }));
    let http = client();
    let login = http
        .post(format!("http://127.0.0.1:{port}/v1/login"))
        .form(&[("code", "pia.1")])
        .send()
        .await
        .unwrap();
    let (status, body) = parts(login).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(http);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.2 is loopback on Linux
/// too, and another client address to the broker).
async fn connect_from(from: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(addr).await
}

/// Reads one HTTP/1.1 answer from `stream`: its head, then a `Content-Length` body.
async fn read_answer(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed mid-answer: {}", String::from_utf8_lossy(&answer)),
            ));
        }
        answer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&answer).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    answer.extend_from_slice(&body);
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The head line `name: value` of an answer, lowercased, if there is one.
fn header(answer: &str, name: &str) -> Option<String> {
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_ascii_lowercase())
    })
}

const HEALTH: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// One address that holds and refreshes every connection the broker allows (64 idle sockets,
/// each reopened as soon as it is cut) gets its share (16) and no more: a client on another
/// address is answered at once, each time, and the address's refused connections never take
/// the slots of others.
#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    let tb = TestBroker::start_with(|c| {
        c.max_connections = 64;
        c.max_connections_per_ip = 16;
    })
    .await;
    let addr: SocketAddr = tb.url.trim_start_matches("http://").parse().unwrap();
    let metrics = tb.broker.metrics();
    let stop = Arc::new(AtomicBool::new(false));
    let mut holders = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let stop = stop.clone();
        holders.spawn(async move {
            // Bounded: 2,000 reconnections of this socket at most, each read 100 ms at most.
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = connect_from("127.0.0.1", addr).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let read =
                        tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf));
                    match read.await {
                        Err(_) => continue,
                        Ok(Ok(0) | Err(_)) => break,
                        Ok(Ok(_)) => {}
                    }
                }
            }
        });
    }
    eventually("127.0.0.1 to take or be refused every slot", || async {
        metrics.connections_open.get() + metrics.connections_refused.get() as i64 >= 64
    })
    .await;
    for round in 0..5 {
        let started = std::time::Instant::now();
        let answered = tokio::time::timeout(Duration::from_secs(1), async {
            let mut stream = connect_from("127.0.0.2", addr).await?;
            stream.write_all(HEALTH.as_bytes()).await?;
            read_answer(&mut stream).await
        })
        .await;
        let answer = answered
            .unwrap_or_else(|_| panic!("round {round}: no answer within 1 s"))
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        println!("round {round}: answered in {:?}", started.elapsed());
        assert!(
            metrics.connections_open.get() <= 17,
            "127.0.0.1 holds 16 at most"
        );
    }
    stop.store(true, Ordering::Relaxed);
    while holders.join_next().await.is_some() {}
}

/// A client past its share of connections is answered at once: 429 `too_many_connections` with
/// `Retry-After` and `Connection: close`, JSON as every error; once one of its connections
/// closes, it is served again. Other addresses are served all along.
#[tokio::test]
async fn a_client_past_its_share_of_connections_is_answered_429_at_once() {
    let tb = TestBroker::start_with(|c| c.max_connections_per_ip = 2).await;
    let addr: SocketAddr = tb.url.trim_start_matches("http://").parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect_from("127.0.0.1", addr).await.unwrap();
        stream.write_all(HEALTH.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
    }
    let refused = tb
        .http
        .get(format!("{}/healthz", tb.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()["connection"], "close");
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_error(
        refused,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections",
    )
    .await;
    assert_eq!(tb.broker.metrics().connections_refused.get(), 1);

    let mut other = connect_from("127.0.0.2", addr).await.unwrap();
    other.write_all(HEALTH.as_bytes()).await.unwrap();
    let answer = read_answer(&mut other).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    drop(held.pop());
    eventually("127.0.0.1 to be served again", || async {
        let response = tb.http.get(format!("{}/healthz", tb.url)).send().await;
        response.is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
}

/// An answer sent before the body was read (413 from the Content-Length) says `Connection:
/// close`, and the server reads what the client still sends before it closes: a client that
/// goes on writing its body reads the whole 413, then a clean end, not a reset.
#[tokio::test]
async fn an_answer_before_the_body_says_connection_close_and_is_read_whole() {
    let tb = TestBroker::start().await;
    let addr: SocketAddr = tb.url.trim_start_matches("http://").parse().unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = "POST /v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 10000000\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 32 * 1024];
    stream.write_all(&chunk).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .expect("answered")
        .expect("the whole answer, not a reset");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    assert_eq!(
        header(&answer, "connection").as_deref(),
        Some("close"),
        "{answer}"
    );
    // The client goes on sending its body: the server still reads it, then ends cleanly.
    for _ in 0..4 {
        stream
            .write_all(&chunk)
            .await
            .expect("the server still reads");
    }
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the server closes");
    assert_eq!(
        end.expect("a clean end, not a reset"),
        0,
        "nothing after the answer"
    );
}

/// A keep-alive client that sends an oversize body, then a normal request, gets both answers:
/// the 413 says `Connection: close`, so the client does not send the next request on a
/// connection the server is closing.
#[tokio::test]
async fn a_keep_alive_client_gets_its_next_answer_after_a_413() {
    let tb = TestBroker::start().await;
    let oversize = serde_json::json!({ "code": "x".repeat(200 * 1024) });
    for round in 0..5 {
        let response = tb
            .http
            .post(format!("{}/v1/login", tb.url))
            .json(&oversize)
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert_eq!(
            response
                .headers()
                .get("connection")
                .map(|v| v.to_str().unwrap()),
            Some("close"),
            "round {round}"
        );
        assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
        let (status, _) = parts(tb.login(&format!("kai.{round}")).await).await;
        assert_eq!(status, StatusCode::OK, "round {round}");
    }
}

const ADMIN: &str = "serve-test-admin-secret-at-least-32-chars";

/// A client sending from `from`.
fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// Wrong admin tokens are counted per address: past a handful a minute the address gets 429
/// `rate_limited` with `Retry-After`, whatever token it sends; another address is not affected,
/// and requests without a token are not counted.
#[tokio::test]
async fn wrong_admin_tokens_from_one_address_are_limited() {
    let tb = TestBroker::start_with(|c| c.admin_token = Some(Secret::new(ADMIN))).await;
    let stats = format!("{}/admin/stats", tb.url);
    let guesser = client_from("127.0.0.1");
    // Without a token nothing is guessed: those are not counted.
    for _ in 0..12 {
        let none = guesser.get(&stats).send().await.unwrap();
        assert_error(none, StatusCode::UNAUTHORIZED, "admin_unauthorized").await;
    }
    for _ in 0..10 {
        let wrong = guesser
            .get(&stats)
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_error(wrong, StatusCode::UNAUTHORIZED, "admin_unauthorized").await;
    }
    for token in ["guess", ADMIN] {
        let limited = guesser.get(&stats).bearer_auth(token).send().await.unwrap();
        let retry_after: u64 = limited.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        assert_error(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    }
    let admin = client_from("127.0.0.2");
    let (status, body) = parts(admin.get(&stats).bearer_auth(ADMIN).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let wrong = admin.get(&stats).bearer_auth("typo").send().await.unwrap();
    assert_error(wrong, StatusCode::UNAUTHORIZED, "admin_unauthorized").await;
}
