//! The supervisor restarts a failed actor with its state rebuilt from storage, after a backoff that
//! grows with each restart; requests meanwhile get an answer (success or 503) within the call
//! timeout, never a hang. Needs the `fault-injection` feature.
//!
//! The real binary past the restart cap: `binary::past_the_restart_cap_the_binary_exits_1` (its
//! `fault-injection` build reads `WXBROKER_FAULT`, the one way to fail an actor from outside).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode};
use wxbroker::{ActorKind, Fault};

use crate::support::{TestBroker, eventually, metric, parts};

/// `WXBROKER_CALL_TIMEOUT_MS` of the brokers in these tests.
const CALL_TIMEOUT_MS: u64 = 500;
/// What an answer may take beyond the call timeout: the HTTP round trip, and for a login the
/// exchange with the loopback sandbox and a disk flush, on a busy 2-core machine running a debug
/// build (where such a request takes a few milliseconds, and rarely a few hundred).
const MARGIN: Duration = Duration::from_secs(1);
/// The backoff before each restart within the window, as the README promises: 20 ms doubling
/// with each restart, up to 2 s.
const BACKOFFS_MS: [u64; 9] = [20, 40, 80, 160, 320, 640, 1280, 2000, 2000];

/// The longest an answer may take.
fn bound() -> Duration {
    Duration::from_millis(CALL_TIMEOUT_MS) + MARGIN
}

/// A broker whose calls into its actors time out after [`CALL_TIMEOUT_MS`].
async fn start() -> TestBroker {
    TestBroker::start_with(|c| c.call_timeout_ms = CALL_TIMEOUT_MS).await
}

/// The answer to `request`, which must come within the call timeout and the margin.
async fn within_bound(what: &str, request: impl Future<Output = Response>) -> Response {
    let started = Instant::now();
    tokio::time::timeout(bound(), request)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: no answer within {:?} (the call timeout of {CALL_TIMEOUT_MS} ms and a \
                 margin of {MARGIN:?}), still none after {:?}",
                bound(),
                started.elapsed()
            )
        })
}

/// Whether a response is one a request may get while an actor restarts: a success, or 503
/// `unavailable`.
async fn success_or_unavailable(response: Response) -> Result<StatusCode, String> {
    let status = response.status();
    let (_, body) = parts(response).await;
    if status == StatusCode::OK
        || (status == StatusCode::SERVICE_UNAVAILABLE && body["error"] == "unavailable")
    {
        Ok(status)
    } else {
        Err(format!("{status} {body}"))
    }
}

async fn wait_ready(tb: &TestBroker) {
    let broker = tb.broker.clone();
    eventually("the broker to be ready", || {
        let broker = broker.clone();
        async move { broker.is_ready() }
    })
    .await;
}

/// How often the supervisor has restarted (or is about to restart) actors of `kind`: its metric,
/// counted when it notices the failure.
fn restarts(tb: &TestBroker, kind: ActorKind) -> u64 {
    tb.broker
        .metrics()
        .actor_restarts
        .with_label_values(&[kind.name()])
        .get()
}

/// Has `kind` panic and waits until the supervisor has noticed.
async fn fail(tb: &TestBroker, kind: ActorKind) {
    let before = restarts(tb, kind);
    tb.broker.inject(kind, Fault::Panic);
    let broker = tb.broker.clone();
    eventually("the supervisor to notice the failure", || {
        let broker = broker.clone();
        async move {
            let metrics = broker.metrics();
            metrics
                .actor_restarts
                .with_label_values(&[kind.name()])
                .get()
                > before
        }
    })
    .await;
}

#[tokio::test]
async fn each_actor_is_restarted_and_works_after() {
    let tb = start().await;
    let token = tb.token("tom.0").await;
    for (i, kind) in ActorKind::ALL.into_iter().enumerate() {
        tb.broker.inject(kind, Fault::Panic);
        // Whatever happens while it restarts is an answer within the bound.
        for _ in 0..20 {
            let response = within_bound(&format!("{kind:?}"), tb.session(&token)).await;
            if let Err(answer) = success_or_unavailable(response).await {
                panic!("{kind:?}: {answer}");
            }
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
    // Each restart is counted, by actor, on /metrics.
    let metrics = tb.broker.metrics().render();
    for kind in ActorKind::ALL {
        let series = format!("wxbroker_actor_restarts_total{{actor=\"{}\"}}", kind.name());
        assert_eq!(
            metric(&metrics, &series),
            Some(1.0),
            "{series} in\n{metrics}"
        );
    }
}

/// A registration whose flush failed stays unacknowledged across a restart of the UserRegistry:
/// the next login of that user still waits for a flush (which fails here too), and only once one
/// succeeds is it answered. The binary's side: `binary::no_login_is_answered_before_its_registration_is_on_disk`.
#[tokio::test]
async fn a_registration_not_yet_on_disk_stays_unacknowledged_across_a_restart() {
    let tb = start().await;
    assert!(tb.broker.fail_flushes(2));
    let (status, body) = parts(tb.login("una.1").await).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    fail(&tb, ActorKind::UserRegistry).await;
    wait_ready(&tb).await;
    let (status, body) = parts(tb.login("una.2").await).await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "answered before the registration was on disk: {body}"
    );
    let (status, body) = parts(tb.login("una.3").await).await;
    assert_eq!(
        (status, body["isNew"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{body}"
    );
}

/// The supervisor waits before each restart: 20 ms, doubling with each restart in the window, up
/// to 2 s. Seen from outside as the time from a failure to readiness, which is at least that
/// backoff every time (a busy machine only adds to it); at the cap it stays near 2 s, where
/// doubling on would wait 5.12 s by the ninth restart. Meanwhile every request is answered, 503
/// at once while the actor is missing, within the call timeout and the margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_back_off_from_20_ms_doubling_to_2_s_and_requests_meanwhile_get_503() {
    let tb = start().await;
    let token = tb.token("vic.1").await;
    let mut downtimes = Vec::new();
    let mut unavailable = 0;
    for (n, backoff) in BACKOFFS_MS
        .map(Duration::from_millis)
        .into_iter()
        .enumerate()
    {
        let failed = Instant::now();
        fail(&tb, ActorKind::SessionKeeper).await;
        // Its table goes with it: every check needs the keeper, which is missing until restarted.
        while !tb.broker.is_ready() {
            let what = format!("a check during restart {}", n + 1);
            match success_or_unavailable(within_bound(&what, tb.session(&token)).await).await {
                Ok(StatusCode::SERVICE_UNAVAILABLE) => unavailable += 1,
                Ok(_) => {}
                Err(answer) => panic!("{what}: {answer}"),
            }
            // Paced, so as not to take a core of the machine for seconds.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let downtime = failed.elapsed();
        assert!(
            downtime >= backoff,
            "restart {} came after {downtime:?}, before its backoff of {backoff:?}",
            n + 1
        );
        downtimes.push(downtime);
    }
    let capped = downtimes[BACKOFFS_MS.len() - 1];
    let cap = Duration::from_millis(BACKOFFS_MS[BACKOFFS_MS.len() - 1]);
    assert!(
        capped < cap + MARGIN + MARGIN / 2,
        "past the cap a restart still waited {capped:?}: {downtimes:?}"
    );
    assert!(unavailable > 0, "no request met a restart");
    eprintln!(
        "restarts of the SessionKeeper after its failures came after {downtimes:?} (backoffs \
         {BACKOFFS_MS:?} ms); {unavailable} checks meanwhile were answered 503"
    );
    // And the keeper works after, with the session rebuilt.
    assert_eq!(tb.session(&token).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn past_the_restart_cap_the_broker_reports_not_ready() {
    let tb = start().await;
    let healthz = format!("{}/healthz", tb.url);
    for _ in 0..=10 {
        wait_ready(&tb).await;
        // Noticed before the next one: the supervisor counts each failure.
        fail(&tb, ActorKind::SessionKeeper).await;
    }
    tokio::time::timeout(Duration::from_secs(10), tb.broker.stopped())
        .await
        .expect("the supervisor gives up");
    // What /healthz reports; the server itself stops accepting at once.
    assert!(!tb.broker.is_ready());
    let check = tokio::time::timeout(bound(), tb.broker.check_session(&"A".repeat(43)))
        .await
        .expect("an answer within the call timeout and the margin");
    assert!(matches!(check, Err(wxbroker::Error::Unavailable(_))));
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
    let tb = start().await;
    let token = tb.token("uma.1").await;
    // Longer than the bound: an answer that waited for it would miss the bound.
    let stall = Fault::Stall(bound() * 2);
    tb.broker.inject(ActorKind::SessionKeeper, stall);
    let (status, body) = parts(within_bound("a logout", tb.logout(&token)).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"))
    );
    // A check needs no change, so the keeper's table answers it meanwhile.
    let check = within_bound("a check", tb.session(&token)).await;
    assert_eq!(check.status(), StatusCode::OK);
    // Once unstuck, it answers again.
    let broker = tb.broker.clone();
    let wait_token = token.clone();
    eventually("the keeper to answer", || {
        let broker = broker.clone();
        let token = wait_token.clone();
        async move { broker.check_session(&token).await.is_ok() }
    })
    .await;
    // The same for the registry, behind /v1/me (a read: the plain call timeout applies).
    tb.broker.inject(ActorKind::UserRegistry, stall);
    let me = tb.http.get(format!("{}/v1/me", tb.url)).bearer_auth(&token);
    let me = within_bound("/v1/me", async { me.send().await.unwrap() }).await;
    assert_eq!(me.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_every_request_is_answered_while_each_actor_restarts() {
    let tb = Arc::new(start().await);
    let mut tokens = Vec::new();
    for i in 0..4 {
        tokens.push(tb.token(&format!("load{i}.0")).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (tb, stop, token) = (tb.clone(), stop.clone(), tokens[w].clone());
            let answered = answered.clone();
            tokio::spawn(async move {
                // Bounded in count, and each answer in time.
                for i in 0..2_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Logins as other users: the checked token's user must stay under the
                    // session cap, which would end its oldest session.
                    let response = if i % 4 == 0 {
                        within_bound("a login", tb.login(&format!("new{w}_{i}"))).await
                    } else {
                        within_bound("a check", tb.session(&token)).await
                    };
                    if let Err(answer) = success_or_unavailable(response).await {
                        panic!("{answer}");
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Each failure strikes while requests flow: some are answered before it and after it.
    let flowing = |after: usize| {
        let answered = answered.clone();
        async move {
            eventually("requests to be answered", || {
                let answered = answered.clone();
                async move { answered.load(Ordering::Relaxed) >= after + 20 }
            })
            .await;
        }
    };
    for kind in ActorKind::ALL {
        flowing(answered.load(Ordering::Relaxed)).await;
        fail(&tb, kind).await;
        wait_ready(&tb).await;
    }
    flowing(answered.load(Ordering::Relaxed)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    // Everything works after, with the sessions rebuilt from sled.
    for token in &tokens {
        assert_eq!(tb.session(token).await.status(), StatusCode::OK);
    }
}
