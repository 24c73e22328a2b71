//! WeChatExchanger: turns login codes into openid + session_key, many at once.
//!
//! The actor itself never awaits WeChat: it marks the code in flight, spawns the HTTP call and
//! hears the outcome back as a message. That keeps one slow upstream call from delaying every other login,
//! lets concurrent requests with the same code share one call, and lets the actor remember which
//! codes were already exchanged. Each app the broker serves has its own: WeChat client (its
//! credentials), single-flight and used-code memory (a code is an app's). With a shared store, the
//! spawned call first books the code there (`book_code.lua`), so that a replay to another broker is
//! refused without reaching WeChat.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::time::Instant;

use crate::storage::{Booking, CodeBook};
use crate::upstream::{Code2Session, Upstream};
use crate::used_codes::UsedCodes;
use crate::{Error, Metrics};

/// WeChat's codes live about five minutes; remembering one longer would only cost memory.
const CODE_LIFETIME: Duration = Duration::from_secs(300);

/// The actor. Configuration comes in [`WeChatExchangerArgs`].
pub struct WeChatExchanger;

/// What the exchanger is started with.
#[derive(Clone)]
pub struct WeChatExchangerArgs {
    /// The WeChat client of each app, the default first (an exchange names its app by index).
    pub upstreams: Vec<Upstream>,
    /// Where codes are booked across brokers (a shared store), if anywhere.
    pub claims: Option<CodeBook>,
    /// Exchanges in flight at once; beyond it a login gets `UpstreamBusy` immediately.
    pub max_inflight: usize,
    /// Where the in-flight gauge is kept.
    pub metrics: Arc<Metrics>,
}

/// Everyone waiting for the exchange of one code.
type Waiters = Vec<RpcReplyPort<Result<Code2Session, Error>>>;

/// Codes in flight and codes already used.
pub struct WeChatExchangerState {
    metrics: Arc<Metrics>,
    upstreams: Vec<Upstream>,
    claims: Option<CodeBook>,
    max_inflight: usize,
    /// (app, code) -> everyone waiting for its exchange (the first caller and any duplicates).
    inflight: HashMap<(usize, String), Waiters>,
    /// Per app, the codes exchanged in the last five minutes: WeChat would refuse them.
    used: Vec<UsedCodes>,
}

/// Messages of the exchanger.
pub enum WeChatExchangerMsg {
    /// Exchange a code of the app with this index; duplicates in flight share the first one's
    /// outcome.
    Exchange(usize, String, RpcReplyPort<Result<Code2Session, Error>>),
    /// The spawned call for an app's code has finished.
    Finished(usize, String, Result<Code2Session, Error>),
    /// Test hook: suffer a fault inside the handler.
    #[cfg(feature = "fault-injection")]
    Inject(crate::Fault),
}

impl Actor for WeChatExchanger {
    type Msg = WeChatExchangerMsg;
    type State = WeChatExchangerState;
    type Arguments = WeChatExchangerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: WeChatExchangerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WeChatExchangerState {
            metrics: args.metrics,
            used: args
                .upstreams
                .iter()
                .map(|_| UsedCodes::new(CODE_LIFETIME))
                .collect(),
            upstreams: args.upstreams,
            claims: args.claims,
            max_inflight: args.max_inflight,
            inflight: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WeChatExchangerMsg::Exchange(app, code, reply) => {
                state.exchange(myself, app, code, reply)
            }
            WeChatExchangerMsg::Finished(app, code, outcome) => state.finish(app, code, outcome),
            #[cfg(feature = "fault-injection")]
            WeChatExchangerMsg::Inject(fault) => fault.strike("WeChatExchanger").await,
        }
        Ok(())
    }
}

impl WeChatExchangerState {
    fn exchange(
        &mut self,
        myself: ActorRef<WeChatExchangerMsg>,
        app: usize,
        code: String,
        reply: RpcReplyPort<Result<Code2Session, Error>>,
    ) {
        let (Some(used), Some(upstream)) = (self.used.get_mut(app), self.upstreams.get(app)) else {
            let _ = reply.send(Err(Error::UnknownApp));
            return;
        };
        if used.contains(&code, Instant::now()) {
            let _ = reply.send(Err(Error::CodeUsed));
            return;
        }
        let key = (app, code);
        if let Some(waiters) = self.inflight.get_mut(&key) {
            waiters.push(reply);
            return;
        }
        if self.inflight.len() >= self.max_inflight {
            tracing::warn!(
                limit = self.max_inflight,
                "in-flight exchange limit reached"
            );
            let _ = reply.send(Err(Error::UpstreamBusy));
            return;
        }
        let (upstream, claims) = (upstream.clone(), self.claims.clone());
        let code = key.1.clone();
        self.inflight.insert(key, vec![reply]);
        self.metrics
            .upstream_inflight
            .set(self.inflight.len() as i64);
        // The default app's codes are booked as they are (as before several apps).
        let booked = match app {
            0 => None,
            _ => Some(upstream.appid().to_owned()),
        };
        tokio::spawn(async move {
            let outcome = exchange_once(&upstream, claims.as_ref(), booked.as_deref(), &code).await;
            // If the actor died meanwhile, its waiters were already answered with an error.
            let _ = myself.send_message(WeChatExchangerMsg::Finished(app, code, outcome));
        });
    }

    fn finish(&mut self, app: usize, code: String, outcome: Result<Code2Session, Error>) {
        if outcome.is_ok()
            && let Some(used) = self.used.get_mut(app)
        {
            // Not used when its exchange began, and single-flight let no other exchange record it.
            used.record(&code, Instant::now());
        }
        let waiters = self.inflight.remove(&(app, code)).unwrap_or_default();
        self.metrics
            .upstream_inflight
            .set(self.inflight.len() as i64);
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

/// Exchanges `code` with WeChat, booking it first in the shared store if there is one. A code
/// another broker is exchanging right now is "busy" (a retry once that exchange ended is "used"
/// if it succeeded, and may reach WeChat if it failed); one exchanged already is "used". A failed exchange gives the booking back, so a retry of a code
/// WeChat did not take may reach WeChat. Another app's code than the default is booked under
/// `appid:code`.
async fn exchange_once(
    upstream: &Upstream,
    claims: Option<&CodeBook>,
    appid: Option<&str>,
    code: &str,
) -> Result<Code2Session, Error> {
    let Some(claims) = claims else {
        return upstream.code2session(code).await;
    };
    let booked = crate::user::identity_key(appid, code);
    match claims.book(&booked).await? {
        Booking::Booked => {}
        Booking::InFlight => return Err(Error::UpstreamBusy),
        Booking::Used => return Err(Error::CodeUsed),
    }
    let outcome = upstream.code2session(code).await;
    let settled = match &outcome {
        Ok(_) => claims.done(&booked).await,
        Err(_) => claims.release(&booked).await,
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "could not settle a login code booking");
    }
    outcome
}
