//! The supervisor restarts a failed actor with its state rebuilt from sled; requests meanwhile
//! get an answer (success or 503), never a hang. Needs the `fault-injection` feature.

use std::time::Duration;

use reqwest::StatusCode;
use wxbroker::{ActorKind, Fault};

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
        tb.broker.inject(kind, Fault::Panic);
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
    // Each restart is counted, by actor.
    let metrics = tb.broker.metrics().render();
    for kind in ActorKind::ALL {
        let line = format!(
            "wxbroker_actor_restarts_total{{actor=\"{}\"}} 1",
            kind.name()
        );
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test]
async fn past_the_restart_cap_the_broker_reports_not_ready() {
    let tb = TestBroker::start().await;
    let healthz = format!("{}/healthz", tb.url);
    for _ in 0..=10 {
        wait_ready(&tb).await;
        tb.broker.inject(ActorKind::SessionKeeper, Fault::Panic);
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
    // What /healthz reports; the server itself stops accepting at once.
    assert!(!tb.broker.is_ready());
    assert!(matches!(
        tb.broker.check_session(&"A".repeat(43)).await,
        Err(wxbroker::Error::Unavailable(_))
    ));
    // `serve` (and with it the binary) ends with an error rather than limping on.
    let mut tb = tb;
    assert!(matches!(
        tb.stop_with().await,
        Err(wxbroker::Error::Unavailable(_))
    ));
    assert!(
        tb.http.get(&healthz).send().await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn a_stuck_actor_is_a_503_within_the_call_timeout_not_a_hang() {
    let tb = TestBroker::start_with(|c| c.call_timeout_ms = 200).await;
    let token = tb.token("uma.1").await;
    tb.broker.inject(
        ActorKind::SessionKeeper,
        Fault::Stall(Duration::from_secs(2)),
    );
    let started = std::time::Instant::now();
    let (status, body) = parts(tb.logout(&token).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"))
    );
    // A check needs no change, so the keeper's table answers it meanwhile.
    assert_eq!(tb.session(&token).await.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // Once unstuck, it answers again.
    let broker = tb.broker.clone();
    let wait_token = token.clone();
    crate::support::eventually("the keeper to answer", || {
        let broker = broker.clone();
        let token = wait_token.clone();
        async move { broker.check_session(&token).await.is_ok() }
    })
    .await;
    // The same for the registry, behind /v1/me (a read: the plain call timeout applies).
    tb.broker.inject(
        ActorKind::UserRegistry,
        Fault::Stall(Duration::from_secs(2)),
    );
    let started = std::time::Instant::now();
    let me = tb
        .http
        .get(format!("{}/v1/me", tb.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_every_request_is_answered_while_each_actor_restarts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let tb = Arc::new(TestBroker::start().await);
    let mut tokens = Vec::new();
    for i in 0..4 {
        tokens.push(tb.token(&format!("load{i}.0")).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (tb, stop, token) = (tb.clone(), stop.clone(), tokens[w].clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                // Bounded in count; the client's own timeout turns a hang into a failure.
                for i in 0..2_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Logins as other users: the checked token's user must stay under the
                    // session cap, which would end its oldest session.
                    let response = if i % 4 == 0 {
                        tb.login(&format!("new{w}_{i}")).await
                    } else {
                        tb.session(&token).await
                    };
                    statuses.push(response.status());
                }
                statuses
            })
        })
        .collect();
    for kind in ActorKind::ALL {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tb.broker.inject(kind, Fault::Panic);
        wait_ready(&tb).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for worker in workers {
        for status in worker.await.unwrap() {
            assert!(
                status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                "{status}"
            );
            answered += 1;
        }
    }
    assert!(answered > 40, "the load ran: {answered}");
    // Everything works after, with the sessions rebuilt from sled.
    for token in &tokens {
        assert_eq!(tb.session(token).await.status(), StatusCode::OK);
    }
}
