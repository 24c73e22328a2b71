//! AccessTokenKeeper: holds each app's access_token for WeChat's server APIs and keeps it fresh.
//! Each app the broker serves has a token of its own, with everything below kept per app
//! (messages name the app by its index, the default app 0).
//!
//! One fetch at most is in flight: callers that need a token while it runs wait for its outcome,
//! however many they are. The fetch runs in a spawned task and reports back as a message, so the
//! actor never awaits WeChat and holds nothing across an await; a fetch task that panics reports
//! [`Error::Unavailable`], so its waiters are answered all the same. A failed fetch answers every
//! waiter at once with its error, and for a short, growing backoff further callers get that error
//! at once instead of another call to WeChat; after it, the next caller (or the background
//! refresh) tries again. The token is fetched when first needed and then refreshed ahead of its
//! expiry while still served; one refresh timer at most is pending.
//!
//! A token WeChat calls stale (40001/42001) is replaced by a plain fetch, shared by every caller
//! that reports it. Only if that fetch brings back the very token reported stale (`stable_token`
//! answers the same token until told otherwise) is a fetch with `force_refresh` made. WeChat
//! limits forced refreshes, so at most one is made per [`FORCE_INTERVAL`]; within it the token
//! fetched is taken as it is, and callers whose retry meets it stale get a 502.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Secret;
use crate::server_api::AccessToken;
use crate::upstream::Upstream;
use crate::{Error, Metrics};

/// A token is refreshed this long before WeChat says it expires...
const REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// ...and it is not served in its last seconds, so it cannot expire between us and WeChat.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// The wait after a first failed fetch; doubles with each further failure.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between fetches while they fail.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// At most one `force_refresh` fetch in this long: WeChat limits them per app.
const FORCE_INTERVAL: Duration = Duration::from_secs(30);

/// The actor. Configuration comes in [`AccessTokenKeeperArgs`].
pub struct AccessTokenKeeper;

/// What the keeper is started with.
#[derive(Clone)]
pub struct AccessTokenKeeperArgs {
    /// The WeChat client of each app, the default first.
    pub upstreams: Vec<Upstream>,
    /// Where fetches are counted.
    pub metrics: Arc<Metrics>,
}

/// A reply port for a token.
type TokenReply = RpcReplyPort<Result<Secret, Error>>;

/// A pending `RefreshDue`, as `send_after` returns it.
type Timer = JoinHandle<Result<(), MessagingErr<AccessTokenKeeperMsg>>>;

/// Each app's token.
pub struct AccessTokenKeeperState {
    apps: Vec<AppToken>,
}

/// One app's token, the fetch in flight and the recent failures.
struct AppToken {
    /// The app's index, which its messages carry.
    app: usize,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    current: Option<Current>,
    /// The fetch in flight, if one runs.
    fetching: Option<Fetch>,
    /// A token WeChat called stale: if a fetch (even one after a failed fetch) brings it back,
    /// a forced fetch follows.
    stale: Option<Secret>,
    /// The last failure and until when callers get it without a new fetch.
    failed: Option<(Error, Instant)>,
    /// Fetches failed in a row.
    failures: u32,
    /// When the last forced fetch started, for WeChat's limit on them.
    last_forced: Option<Instant>,
    /// The pending refresh (or retry) timer; replaced, not added to, so timers never pile up.
    timer: Option<Timer>,
}

/// A fetch in flight and the callers waiting for it.
struct Fetch {
    waiters: Vec<TokenReply>,
    /// Whether it asked WeChat for a new token rather than the current one.
    forced: bool,
}

struct Current {
    token: Secret,
    /// From here on a background refresh starts.
    refresh_at: Instant,
    /// From here on the token is not served.
    expires_at: Instant,
}

/// Messages of the keeper.
pub enum AccessTokenKeeperMsg {
    /// The current token of the app, fetched first if there is none.
    Get(usize, TokenReply),
    /// WeChat answered 40001/42001 to this token of the app: answer with a new one.
    Stale(usize, Secret, TokenReply),
    /// Time to refresh the app's token ahead of expiry, or to retry a failed background refresh.
    RefreshDue(usize),
    /// The app's fetch in flight has finished.
    Fetched(usize, Result<AccessToken, Error>),
    /// Test hook: suffer a fault inside the handler.
    #[cfg(feature = "fault-injection")]
    Inject(crate::Fault),
}

impl Actor for AccessTokenKeeper {
    type Msg = AccessTokenKeeperMsg;
    type State = AccessTokenKeeperState;
    type Arguments = AccessTokenKeeperArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AccessTokenKeeperArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let apps = (args.upstreams.into_iter().enumerate())
            .map(|(app, upstream)| AppToken {
                app,
                upstream,
                metrics: args.metrics.clone(),
                current: None,
                fetching: None,
                stale: None,
                failed: None,
                failures: 0,
                last_forced: None,
                timer: None,
            })
            .collect();
        Ok(AccessTokenKeeperState { apps })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for app in &mut state.apps {
            if let Some(timer) = app.timer.take() {
                timer.abort();
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let apps = &mut state.apps;
        match message {
            AccessTokenKeeperMsg::Get(index, reply) => match apps.get_mut(index) {
                Some(app) => app.get(&myself, reply),
                None => drop(reply.send(Err(Error::UnknownApp))),
            },
            AccessTokenKeeperMsg::Stale(index, token, reply) => match apps.get_mut(index) {
                Some(app) => app.stale(&myself, token, reply),
                None => drop(reply.send(Err(Error::UnknownApp))),
            },
            AccessTokenKeeperMsg::RefreshDue(index) => {
                if let Some(app) = apps.get_mut(index) {
                    app.refresh_due(&myself)
                }
            }
            AccessTokenKeeperMsg::Fetched(index, outcome) => {
                if let Some(app) = apps.get_mut(index) {
                    app.fetched(&myself, outcome)
                }
            }
            #[cfg(feature = "fault-injection")]
            AccessTokenKeeperMsg::Inject(fault) => fault.strike("AccessTokenKeeper").await,
        }
        Ok(())
    }
}

impl AppToken {
    fn get(&mut self, myself: &ActorRef<AccessTokenKeeperMsg>, reply: TokenReply) {
        let now = Instant::now();
        if let Some(current) = self.current.as_ref().filter(|c| now < c.expires_at) {
            let _ = reply.send(Ok(current.token.clone()));
            self.refresh_due(myself);
            return;
        }
        self.current = None;
        self.wait_for_fetch(myself, reply);
    }

    fn stale(&mut self, myself: &ActorRef<AccessTokenKeeperMsg>, token: Secret, reply: TokenReply) {
        let reported_current = self
            .current
            .as_ref()
            .is_some_and(|c| c.token.expose() == token.expose());
        if !reported_current {
            // Already replaced (another caller reported it first): the new one will do.
            self.get(myself, reply);
            return;
        }
        tracing::warn!(
            appid = self.upstream.appid(),
            "WeChat called the access_token stale; fetching a new one"
        );
        self.current = None;
        self.stale = Some(token);
        // Plain first: WeChat may already hold a new token, and forced fetches are limited.
        self.wait_for_fetch(myself, reply);
    }

    /// Queues `reply` for the fetch in flight, starting one unless a recent failure says wait.
    fn wait_for_fetch(&mut self, myself: &ActorRef<AccessTokenKeeperMsg>, reply: TokenReply) {
        if let Some(fetch) = &mut self.fetching {
            fetch.waiters.push(reply);
            return;
        }
        if let Some((error, until)) = &self.failed
            && Instant::now() < *until
        {
            let _ = reply.send(Err(error.clone()));
            return;
        }
        self.start_fetch(myself, vec![reply], false);
    }

    fn refresh_due(&mut self, myself: &ActorRef<AccessTokenKeeperMsg>) {
        let now = Instant::now();
        let due = self.current.as_ref().is_some_and(|c| now >= c.refresh_at);
        let backing_off = self.failed.as_ref().is_some_and(|(_, until)| now < *until);
        if due && self.fetching.is_none() && !backing_off {
            self.start_fetch(myself, Vec::new(), false);
        }
    }

    fn start_fetch(
        &mut self,
        myself: &ActorRef<AccessTokenKeeperMsg>,
        waiters: Vec<TokenReply>,
        force: bool,
    ) {
        if force {
            self.last_forced = Some(Instant::now());
        }
        self.fetching = Some(Fetch {
            waiters,
            forced: force,
        });
        let (upstream, app) = (self.upstream.clone(), self.app);
        let fetch = tokio::spawn(async move { upstream.fetch_access_token(force).await });
        let myself = myself.clone();
        tokio::spawn(async move {
            // A panicking fetch must still end the fetch in flight, or its waiters wait forever.
            let outcome = fetch.await.unwrap_or_else(|e| {
                Err(Error::Unavailable(format!(
                    "the access_token fetch task failed: {e}"
                )))
            });
            // If the actor died meanwhile, its waiters were already answered with an error.
            let _ = myself.send_message(AccessTokenKeeperMsg::Fetched(app, outcome));
        });
    }

    /// Whether WeChat's limit leaves room for a forced fetch now.
    fn may_force(&self) -> bool {
        self.last_forced
            .is_none_or(|at| at.elapsed() >= FORCE_INTERVAL)
    }

    /// Sends `RefreshDue` after `wait`, replacing any timer still pending.
    fn schedule_refresh(&mut self, myself: &ActorRef<AccessTokenKeeperMsg>, wait: Duration) {
        if let Some(old) = self.timer.take() {
            old.abort();
        }
        let app = self.app;
        self.timer = Some(myself.send_after(wait, move || AccessTokenKeeperMsg::RefreshDue(app)));
    }

    fn fetched(
        &mut self,
        myself: &ActorRef<AccessTokenKeeperMsg>,
        outcome: Result<AccessToken, Error>,
    ) {
        let Some(Fetch { waiters, forced }) = self.fetching.take() else {
            return;
        };
        let label = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.metrics
            .access_token_fetches
            .with_label_values(&[label])
            .inc();
        match outcome {
            Ok(fetched) => {
                let stale_again = self
                    .stale
                    .take()
                    .is_some_and(|stale| stale.expose() == fetched.token.expose());
                if stale_again && !forced {
                    if self.may_force() {
                        // WeChat still hands out the token it calls stale: make it issue another.
                        self.start_fetch(myself, waiters, true);
                        return;
                    }
                    tracing::warn!(
                        "WeChat still hands out the stale access_token, and a forced refresh was \
                         made less than {FORCE_INTERVAL:?} ago; keeping it"
                    );
                }
                self.failed = None;
                self.failures = 0;
                let now = Instant::now();
                let lifetime = fetched.expires_in;
                let expires_at = now + lifetime.saturating_sub(EXPIRY_MARGIN).max(lifetime / 2);
                let refresh_at = now + lifetime.saturating_sub(REFRESH_AHEAD).max(lifetime / 2);
                for waiter in waiters {
                    let _ = waiter.send(Ok(fetched.token.clone()));
                }
                self.current = Some(Current {
                    token: fetched.token,
                    refresh_at,
                    expires_at,
                });
                self.schedule_refresh(myself, refresh_at - now);
            }
            Err(error) => {
                tracing::warn!(%error, failures = self.failures + 1, "access_token fetch failed");
                let exponent = self.failures.min(16);
                self.failures += 1;
                let wait = (FIRST_RETRY * 2u32.pow(exponent)).min(MAX_RETRY);
                self.failed = Some((error.clone(), Instant::now() + wait));
                for waiter in waiters {
                    let _ = waiter.send(Err(error.clone()));
                }
                // A token still being served is refreshed again after the wait.
                if self.current.is_some() {
                    self.schedule_refresh(myself, wait);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::UpstreamConfig;
    use crate::{SANDBOX_APPID, Sandbox, SandboxOptions};

    async fn keeper(sandbox: &Sandbox) -> ActorRef<AccessTokenKeeperMsg> {
        let upstream = Upstream::new(UpstreamConfig {
            base: sandbox.url(),
            appid: SANDBOX_APPID.into(),
            secret: sandbox.secret(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            retries: 0,
            metrics: Arc::default(),
        })
        .unwrap();
        let args = AccessTokenKeeperArgs {
            upstreams: vec![upstream],
            metrics: Arc::default(),
        };
        Actor::spawn(None, AccessTokenKeeper, args).await.unwrap().0
    }

    async fn get(keeper: &ActorRef<AccessTokenKeeperMsg>) -> String {
        let token = ractor::call!(keeper, |reply| AccessTokenKeeperMsg::Get(0, reply)).unwrap();
        token.unwrap().expose().to_owned()
    }

    async fn stale(keeper: &ActorRef<AccessTokenKeeperMsg>, token: &str) -> String {
        let token = ractor::call!(keeper, |reply| {
            AccessTokenKeeperMsg::Stale(0, Secret::new(token), reply)
        })
        .unwrap();
        token.unwrap().expose().to_owned()
    }

    #[tokio::test]
    async fn a_stale_token_is_fetched_plainly_then_forced_and_a_late_report_fetches_nothing() {
        let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let keeper = keeper(&sandbox).await;
        let old = get(&keeper).await;
        assert_eq!(get(&keeper).await, old);
        sandbox.invalidate_access_tokens();
        let fresh = stale(&keeper, &old).await;
        // stable_token still answers the stale token until forced: without the forced fetch the
        // caller would get the stale token back.
        assert_ne!(fresh, old, "no forced fetch was made");
        assert_eq!(
            sandbox.token_requests(),
            3,
            "the first fetch, a plain one, a forced one"
        );
        // A caller that met the old token before the refresh reports it after.
        assert_eq!(stale(&keeper, &old).await, fresh);
        assert_eq!(sandbox.token_requests(), 3);
    }

    #[tokio::test]
    async fn a_second_forced_fetch_within_the_interval_is_not_made() {
        let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let keeper = keeper(&sandbox).await;
        let old = get(&keeper).await;
        sandbox.invalidate_access_tokens();
        let fresh = stale(&keeper, &old).await;
        assert_eq!(sandbox.token_requests(), 3);
        // Stale again at once: the plain fetch brings it back, and WeChat's limit on forced
        // refreshes leaves it as it is.
        sandbox.invalidate_access_tokens();
        assert_eq!(stale(&keeper, &fresh).await, fresh);
        assert_eq!(sandbox.token_requests(), 4, "no second forced fetch");
    }

    #[tokio::test]
    async fn a_token_is_refreshed_ahead_of_its_expiry_without_a_caller() {
        let sandbox = Sandbox::start(SandboxOptions {
            access_token_lifetime: Some(Duration::from_secs(2)),
            ..SandboxOptions::default()
        })
        .await
        .unwrap();
        let keeper = keeper(&sandbox).await;
        get(&keeper).await;
        assert_eq!(sandbox.token_requests(), 1);
        // Refresh is due at half the lifetime; nobody asks in between.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sandbox.token_requests() < 2 {
            assert!(Instant::now() < deadline, "no refresh ahead of expiry");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
