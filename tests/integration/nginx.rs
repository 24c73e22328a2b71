//! `deploy/nginx.conf` with the real Debian nginx: HTTPS in front of the broker, forward auth for
//! a business backend, `/admin` and `/metrics` kept inside, the client's address for the limits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;
use warp::Filter;

use crate::support::{TestBroker, parts};

/// A real nginx running `deploy/nginx.conf` on loopback, in front of `broker` and `business`.
struct Nginx {
    child: std::process::Child,
    /// `https://localhost:PORT`.
    https: String,
    /// `http://127.0.0.1:PORT` (the plain-HTTP server that redirects).
    http: String,
    /// The self-signed certificate, for the clients to trust.
    certificate: reqwest::Certificate,
    _dir: TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .expect("the tests need nginx (Debian's package `nginx`; .ci/run installs it)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Replaces `from` by `to` in `text`, which must hold it exactly once: a test that no longer
/// rewrites what it means to should fail, not run another configuration.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} in deploy/nginx.conf"
    );
    text.replace(from, to)
}

impl Nginx {
    async fn start(broker: SocketAddr, business: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let (http_port, https_port) = (free_port(), free_port());
        let site =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
                .unwrap();
        let site = replace_once(
            &site,
            "server 127.0.0.1:8080;",
            &format!("server {broker};"),
        );
        let site = replace_once(
            &site,
            "server 127.0.0.1:9000;",
            &format!("server {business};"),
        );
        let site = replace_once(
            &site,
            "listen 80;",
            &format!("listen 127.0.0.1:{http_port};"),
        );
        let site = replace_once(
            &site,
            "listen 443 ssl;",
            &format!("listen 127.0.0.1:{https_port} ssl;"),
        );
        let site = replace_once(
            &site,
            "/etc/letsencrypt/live/wx.example.com/fullchain.pem",
            &cert.display().to_string(),
        );
        let site = replace_once(
            &site,
            "/etc/letsencrypt/live/wx.example.com/privkey.pem",
            &key.display().to_string(),
        );
        let site = site.replace("wx.example.com", "localhost");
        std::fs::write(dir.path().join("wxbroker.conf"), site).unwrap();
        // What the distribution's nginx.conf gives around conf.d, with every path in `dir`.
        let root = dir.path().display();
        let main = format!(
            "daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {root}/access.log;\n  client_body_temp_path {root}/body;\n  \
             proxy_temp_path {root}/proxy;\n  fastcgi_temp_path {root}/fastcgi;\n  \
             uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;\n  \
             include {root}/wxbroker.conf;\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
        let child = std::process::Command::new(nginx_binary())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let certificate = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
        let nginx = Nginx {
            child,
            https: format!("https://localhost:{https_port}"),
            http: format!("http://127.0.0.1:{http_port}"),
            certificate,
            _dir: dir,
        };
        // Serving once the TLS port accepts.
        tokio::time::timeout(Duration::from_secs(20), async {
            while tokio::net::TcpStream::connect(("127.0.0.1", https_port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("nginx listens within 20 s");
        nginx
    }

    /// A client that trusts only the test's certificate, connecting from `from` (a loopback
    /// address: each one is another client to the broker's limits).
    fn client(&self, from: Ipv4Addr) -> reqwest::Client {
        wxbroker::tls::install_provider();
        reqwest::Client::builder()
            .tls_certs_only([self.certificate.clone()])
            .local_address(IpAddr::V4(from))
            .resolve("localhost", self.https_addr())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    fn https_addr(&self) -> SocketAddr {
        let port = self.https.rsplit(':').next().unwrap().parse().unwrap();
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// A self-signed certificate for `localhost` and its key, made by the `openssl` command.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        // A server's certificate, not a CA's (which TLS clients refuse to meet as the server).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the tests need the openssl command (Debian's package `openssl`)");
    assert!(status.success());
    (cert, key)
}

/// The business backend: answers every request with the method, path and X-Wx-* headers it got.
async fn business() -> SocketAddr {
    let route = warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .map(
            |method: warp::http::Method,
             path: warp::path::FullPath,
             headers: warp::http::HeaderMap| {
                let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
                warp::reply::json(&json!({
                    "method": method.as_str(),
                    "path": path.as_str(),
                    "uid": header("x-wx-uid"),
                    "appid": header("x-wx-appid"),
                    "openid": header("x-wx-openid"),
                    "unionid": header("x-wx-unionid"),
                }))
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    addr
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

#[tokio::test]
async fn logins_through_nginx_reach_the_business_backend_with_the_user() {
    let tb = TestBroker::start().await;
    let nginx = Nginx::start(addr_of(&tb.url), business().await).await;
    let client = nginx.client(Ipv4Addr::new(127, 0, 0, 2));

    let login = client
        .post(format!("{}/v1/login", nginx.https))
        .json(&json!({ "code": "nia.union" }))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(login).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["thirdSession"].as_str().unwrap().to_owned();
    let uid = body["uid"].as_u64().unwrap();
    let session = client
        .get(format!("{}/v1/session", nginx.https))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (status, session) = parts(session).await;
    assert_eq!(status, StatusCode::OK);

    // With the token: the backend gets the user, whatever the client claims to be.
    let order = client
        .post(format!("{}/api/orders?page=2", nginx.https))
        .bearer_auth(&token)
        .header("x-wx-uid", "1")
        .header("x-wx-openid", "forged")
        .header("x-wx-appid", "wxforged")
        .json(&json!({ "item": 7 }))
        .send()
        .await
        .unwrap();
    let (status, seen) = parts(order).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/api/orders");
    assert_eq!(seen["uid"], uid.to_string());
    assert_eq!(seen["appid"], session["appid"]);
    assert!(seen["appid"].is_string(), "{session}");
    assert_eq!(seen["openid"], session["openid"]);
    assert_eq!(seen["unionid"], session["unionid"]);

    // A user without unionid: no unionid header reaches the backend, even a forged one.
    let plain = client
        .post(format!("{}/v1/login", nginx.https))
        .json(&json!({ "code": "ole" }))
        .send()
        .await
        .unwrap();
    let (_, plain) = parts(plain).await;
    let seen: Value = client
        .get(format!("{}/api/profile", nginx.https))
        .bearer_auth(plain["thirdSession"].as_str().unwrap())
        .header("x-wx-unionid", "forged")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["uid"], plain["uid"].as_u64().unwrap().to_string());
    assert_eq!(seen["unionid"], Value::Null);

    // Without a valid token the backend is never reached: 401 with the broker's challenge.
    for authorization in [None, Some("Bearer not-a-token".to_owned())] {
        let mut request = client.get(format!("{}/api/orders", nginx.https));
        if let Some(value) = &authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{authorization:?}"
        );
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    assert_eq!(tb.logout(&token).await.status(), StatusCode::NO_CONTENT);
    let after_logout = client
        .get(format!("{}/api/orders", nginx.https))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(after_logout.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn nginx_keeps_admin_metrics_and_plain_http_away() {
    let tb = TestBroker::start_with(|c| {
        c.admin_token = Some(wxbroker::Secret::new("an-admin-token-of-at-least-32-chars"))
    })
    .await;
    let nginx = Nginx::start(addr_of(&tb.url), business().await).await;
    let client = nginx.client(Ipv4Addr::new(127, 0, 0, 2));
    for path in ["/admin/stats", "/metrics", "/readyz", "/_wxbroker_auth"] {
        let response = client
            .get(format!("{}{path}", nginx.https))
            .bearer_auth("an-admin-token-of-at-least-32-chars")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    // Plain HTTP only redirects to HTTPS.
    let plain = client
        .get(format!("{}/v1/session", nginx.http))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), StatusCode::PERMANENT_REDIRECT);
    assert!(
        plain.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("https://"),
        "{:?}",
        plain.headers()
    );
}

/// POST /v1/login through nginx from `client`, with an extra `X-Forwarded-For` the client forges.
async fn login_through(
    nginx: &Nginx,
    client: &reqwest::Client,
    code: &str,
    forged: Option<&str>,
) -> StatusCode {
    let mut request = client
        .post(format!("{}/v1/login", nginx.https))
        .json(&json!({ "code": code }));
    if let Some(forged) = forged {
        request = request.header("x-forwarded-for", forged);
    }
    request.send().await.unwrap().status()
}

#[tokio::test]
async fn the_login_limit_counts_the_client_nginx_forwards_for_not_nginx() {
    let tb = TestBroker::start_with(|c| {
        c.login_rate_per_min = 1;
        c.login_burst = 2;
        c.trusted_proxies = Some("127.0.0.1".parse().unwrap());
    })
    .await;
    let nginx = Nginx::start(addr_of(&tb.url), business().await).await;
    let first = nginx.client(Ipv4Addr::new(127, 0, 0, 6));
    let second = nginx.client(Ipv4Addr::new(127, 0, 0, 7));
    for i in 0..2 {
        assert_eq!(
            login_through(&nginx, &first, &format!("pam.{i}"), None).await,
            StatusCode::OK
        );
    }
    assert_eq!(
        login_through(&nginx, &first, "pam.3", None).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A forged X-Forwarded-For does not make another client: nginx appends the real address.
    assert_eq!(
        login_through(&nginx, &first, "pam.4", Some("198.51.100.1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client behind the same nginx has its own bucket.
    for i in 0..2 {
        assert_eq!(
            login_through(&nginx, &second, &format!("quin.{i}"), Some("198.51.100.1")).await,
            StatusCode::OK
        );
    }
    // The request log names the client, not nginx.
    assert!(crate::support::logs().contains("client=127.0.0.7"));
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_peer_are_ignored() {
    let tb = TestBroker::start_with(|c| {
        c.login_rate_per_min = 1;
        c.login_burst = 2;
        c.trusted_proxies = Some("10.0.0.0/8".parse().unwrap());
    })
    .await;
    for (i, forged) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        .into_iter()
        .enumerate()
    {
        let status = tb
            .http
            .post(format!("{}/v1/login", tb.url))
            .header("x-forwarded-for", forged)
            .header("forwarded", format!("for={forged}"))
            .json(&json!({ "code": format!("ray.{i}") }))
            .send()
            .await
            .unwrap()
            .status();
        let expected = if i < 2 {
            StatusCode::OK
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        assert_eq!(
            status, expected,
            "login {i} from 127.0.0.1 claiming {forged}"
        );
    }
}
