//! The supervisor restarts a failed actor with its state rebuilt from sled; requests meanwhile
//! get an answer (success or 503), never a hang. Needs the `fault-injection` feature.

use std::time::Duration;

use reqwest::StatusCode;
use wxbroker::ActorKind;

use crate::support::{TestBroker, eventually, parts};

async fn wait_ready(tb: &TestBroker) {
    let broker = tb.broker.clone();
    eventually("the broker to be ready", || {
        let broker = broker.clone();
        async move { broker.is_ready() }
    })
    .await;
}

#[tokio::test]
async fn each_actor_is_restarted_and_works_after() {
    let tb = TestBroker::start().await;
    let token = tb.token("tom.0").await;
    for (i, kind) in ActorKind::ALL.into_iter().enumerate() {
        tb.broker.inject_panic(kind);
        // Whatever happens while it restarts is an answer, never a hang.
        for _ in 0..20 {
            let response = tb.session(&token).await;
            let status = response.status();
            let (_, body) = parts(response).await;
            assert!(
                status == StatusCode::OK
                    || (status == StatusCode::SERVICE_UNAVAILABLE
                        && body["error"] == "unavailable"),
                "{kind:?}: {status} {body}"
            );
        }
        wait_ready(&tb).await;
        // State rebuilt from sled: the old session is known, the user keeps the uid.
        let (status, session) = parts(tb.session(&token).await).await;
        assert_eq!(
            (status, session["uid"].as_u64()),
            (StatusCode::OK, Some(1)),
            "{kind:?}"
        );
        let (status, login) = parts(tb.login(&format!("tom.{}", i + 1)).await).await;
        assert_eq!(
            (status, login["uid"].as_u64()),
            (StatusCode::OK, Some(1)),
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn past_the_restart_cap_the_broker_reports_not_ready() {
    let tb = TestBroker::start().await;
    let healthz = format!("{}/healthz", tb.url);
    for _ in 0..=10 {
        wait_ready(&tb).await;
        tb.broker.inject_panic(ActorKind::SessionKeeper);
        // Wait until the panic has been noticed before the next one.
        let broker = tb.broker.clone();
        eventually("the actor to die", || {
            let broker = broker.clone();
            async move { !broker.is_ready() }
        })
        .await;
    }
    tokio::time::timeout(Duration::from_secs(10), tb.broker.stopped())
        .await
        .expect("the supervisor gives up");
    let response = tb.http.get(&healthz).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (_, body) = parts(tb.session(&"A".repeat(43)).await).await;
    assert_eq!(body["error"], "unavailable");
}
