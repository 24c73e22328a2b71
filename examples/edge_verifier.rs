//! An edge host that verifies the broker's signed access tokens itself, with no broker in the
//! process: `GET /api/orders` answers callers whose access token verifies
//! (`wxbroker::edge::Verifier`), with the same 401 JSON as the broker's `/v1/session` otherwise.
//! It asks the broker nothing per request: it fetches its keys and follows its revocation feed,
//! and goes on verifying while the broker is unreachable.
//!
//! ```text
//! WXBROKER_VERIFIER_TOKEN=$(openssl rand -hex 24) cargo run          # a broker, sandbox mode
//! WXBROKER_VERIFIER_TOKEN=...same... cargo run --example edge_verifier
//! TOKEN=$(curl -s localhost:8080/v1/login -d code=alice.1 | jq -r .accessToken)
//! curl localhost:8081/api/orders -H "Authorization: Bearer $TOKEN"
//! ```
//!
//! Settings (environment): `BROKER_URL` (default `http://127.0.0.1:8080`), `WECHAT_APPID` (the
//! tokens' audience; default the sandbox's), `WXBROKER_VERIFIER_TOKEN` (the feed's secret), `EDGE_LISTEN`
//! (default `127.0.0.1:8081`).

use std::sync::Arc;

use warp::Filter;
use wxbroker::edge::{Verifier, VerifierOptions};
use wxbroker::jwt::AccessClaims;

/// The business routes, guarded by the verifier's filter.
fn app(
    verifier: Verifier,
) -> impl Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible> + Clone {
    warp::path!("api" / "orders")
        .and(warp::get())
        .and(verifier.require())
        .map(|claims: Arc<AccessClaims>| {
            warp::reply::json(&serde_json::json!({ "uid": claims.uid(), "orders": [] }))
        })
        .recover(wxbroker::recover)
}

#[tokio::main]
async fn main() -> Result<(), wxbroker::Error> {
    tracing_subscriber::fmt().init();
    let setting =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let token = std::env::var("WXBROKER_VERIFIER_TOKEN").map_err(|_| {
        wxbroker::Error::Config("set WXBROKER_VERIFIER_TOKEN to the broker's".into())
    })?;
    let options = VerifierOptions::new(
        setting("BROKER_URL", "http://127.0.0.1:8080"),
        setting("WECHAT_APPID", wxbroker::SANDBOX_APPID),
        token,
    );
    let verifier = Verifier::start(options)?;
    let listen = setting("EDGE_LISTEN", "127.0.0.1:8081");
    let addr = listen
        .parse()
        .map_err(|e| wxbroker::Error::Config(format!("bad EDGE_LISTEN {listen:?}: {e}")))?;
    let listener = wxbroker::bind(addr).map_err(|e| wxbroker::Error::Config(e.to_string()))?;
    tracing::info!(%addr, "edge host serving; tokens are refused until the feed is read");
    warp::serve(app(verifier))
        .incoming(listener)
        .graceful(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .run()
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use wxbroker::{Broker, Config, Sandbox, SandboxOptions, Secret};

    const VERIFIER_TOKEN: &str = "edge-example-verifier-secret-0123456789";

    #[tokio::test]
    async fn the_business_route_takes_live_access_tokens_only() {
        // A broker served on loopback, as it would run elsewhere.
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            verifier_token: Some(Secret::new(VERIFIER_TOKEN)),
            ..Config::default()
        };
        sandbox.configure(&mut config);
        let broker = Broker::start(&config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(wxbroker::serve(listener, broker, async {
            let _ = stopped.await;
        }));

        let verifier = Verifier::start(VerifierOptions::new(
            url.as_str(),
            wxbroker::SANDBOX_APPID,
            VERIFIER_TOKEN,
        ))
        .unwrap();
        tokio::time::timeout(Duration::from_secs(10), verifier.synced())
            .await
            .unwrap();
        let app = app(verifier);

        let anonymous = warp::test::request().path("/api/orders").reply(&app).await;
        assert_eq!(anonymous.status(), 401);
        let body: serde_json::Value = serde_json::from_slice(anonymous.body()).unwrap();
        assert_eq!(body["error"], "invalid_session");

        wxbroker::tls::install_provider();
        let http = reqwest::Client::new();
        let login: serde_json::Value = http
            .post(format!("{url}/v1/login"))
            .form(&[("code", "alice.1")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let orders = |token: String| {
            warp::test::request()
                .path("/api/orders")
                .header("authorization", format!("Bearer {token}"))
                .reply(&app)
        };
        let access = login["accessToken"].as_str().unwrap().to_owned();
        let answer = orders(access.clone()).await;
        assert_eq!(answer.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(answer.body()).unwrap();
        assert_eq!(body["uid"], login["uid"]);

        // Logged out at the broker: refused here within moments.
        let session = login["thirdSession"].as_str().unwrap();
        let logout = http
            .post(format!("{url}/v1/logout"))
            .bearer_auth(session)
            .send()
            .await
            .unwrap();
        assert_eq!(logout.status(), 204);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while orders(access.clone()).await.status() != 401 {
            assert!(tokio::time::Instant::now() < deadline, "still accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        served.await.unwrap().unwrap();
    }
}
