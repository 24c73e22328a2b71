//! An edge host that serves its own business route beside the broker's, in one process:
//! `GET /api/orders` answers only callers with a valid session, with the same 401 JSON as the
//! broker's `/v1/session` otherwise.
//!
//! `cargo run --example edge_host`, then log in with the sandbox (`POST /v1/login -d code=alice.1`)
//! and `curl localhost:8080/api/orders -H "Authorization: Bearer $TOKEN"`.

use warp::Filter;
use wxbroker::{Broker, Config, Sandbox, SandboxOptions, SessionInfo};

/// The business routes, guarded by the broker's session filter, beside the broker's own routes.
fn app(
    broker: Broker,
) -> impl Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible> + Clone {
    // Past its path, the business route answers every failure itself (401 JSON and the like).
    let orders = warp::path!("api" / "orders").and(
        warp::get()
            .and(broker.require_session())
            .map(|session: SessionInfo| {
                warp::reply::json(&serde_json::json!({ "uid": session.uid, "orders": [] }))
            })
            .recover(wxbroker::recover),
    );
    orders.or(wxbroker::routes(broker))
}

#[tokio::main]
async fn main() -> Result<(), wxbroker::Error> {
    tracing_subscriber::fmt().init();
    // A real host would set appid and secret; the sandbox keeps the example self-contained.
    let sandbox = Sandbox::start(SandboxOptions::default()).await?;
    let mut config = Config::default();
    sandbox.configure(&mut config);
    let broker = Broker::start(&config).await?;
    let listener = wxbroker::bind(([127, 0, 0, 1], 8080).into())
        .map_err(|e| wxbroker::Error::Config(e.to_string()))?;
    warp::serve(app(broker.clone()))
        .incoming(listener)
        .graceful(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .run()
        .await;
    broker.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_business_route_needs_a_session() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        sandbox.configure(&mut config);
        let broker = Broker::start(&config).await.unwrap();
        let app = app(broker.clone());

        let anonymous = warp::test::request().path("/api/orders").reply(&app).await;
        assert_eq!(anonymous.status(), 401);
        let body: serde_json::Value = serde_json::from_slice(anonymous.body()).unwrap();
        assert_eq!(body["error"], "invalid_session");

        let login = warp::test::request()
            .method("POST")
            .path("/v1/login")
            .json(&serde_json::json!({ "code": "alice.1" }))
            .reply(&app)
            .await;
        let login: serde_json::Value = serde_json::from_slice(login.body()).unwrap();
        let token = login["thirdSession"].as_str().unwrap();
        let orders = warp::test::request()
            .path("/api/orders")
            .header("authorization", format!("Bearer {token}"))
            .reply(&app)
            .await;
        assert_eq!(orders.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(orders.body()).unwrap();
        assert_eq!(body["uid"], login["uid"]);
        broker.shutdown().await.unwrap();
    }
}
