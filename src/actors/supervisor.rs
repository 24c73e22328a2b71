//! Supervisor: spawns the broker's actors linked to itself and restarts any that fails.
//!
//! ractor's default reaction to a child's death is to stop the supervisor too; this one re-spawns
//! the child instead, after a backoff that grows with recent restarts, and gives up (stops,
//! which makes the broker report not-ready) when restarts exceed a cap within a window. The
//! current `ActorRef` of each child is published in [`Children`], where the front end reads it.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, Message, RpcReplyPort,
    SupervisionEvent,
};
use tokio::time::Instant;

use super::access_token_keeper::{AccessTokenKeeper, AccessTokenKeeperArgs, AccessTokenKeeperMsg};
use super::decryptor::{Decryptor, DecryptorArgs, DecryptorMsg};
use super::session_keeper::{ReaderSlot, SessionKeeper, SessionKeeperArgs, SessionKeeperMsg};
use super::user_registry::{UserRegistry, UserRegistryArgs, UserRegistryMsg};
use super::wechat_exchanger::{WeChatExchanger, WeChatExchangerArgs, WeChatExchangerMsg};

/// More restarts than this within [`RESTART_WINDOW`] and the supervisor gives up.
const MAX_RESTARTS: usize = 10;
/// The window in which restarts are counted.
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// The wait before the first restart; doubles with each further restart in the window.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The supervised actors, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActorKind {
    /// The [`WeChatExchanger`].
    WeChatExchanger,
    /// The [`UserRegistry`].
    UserRegistry,
    /// The [`SessionKeeper`].
    SessionKeeper,
    /// The [`Decryptor`].
    Decryptor,
    /// The [`AccessTokenKeeper`].
    AccessTokenKeeper,
}

impl ActorKind {
    /// The actor's name, as logs and metrics show it.
    pub fn name(self) -> &'static str {
        match self {
            ActorKind::WeChatExchanger => "wechat_exchanger",
            ActorKind::UserRegistry => "user_registry",
            ActorKind::SessionKeeper => "session_keeper",
            ActorKind::Decryptor => "decryptor",
            ActorKind::AccessTokenKeeper => "access_token_keeper",
        }
    }

    /// Every kind, in start order.
    pub const ALL: [ActorKind; 5] = [
        ActorKind::WeChatExchanger,
        ActorKind::UserRegistry,
        ActorKind::SessionKeeper,
        ActorKind::Decryptor,
        ActorKind::AccessTokenKeeper,
    ];
}

/// Where the supervisor publishes one child's current reference; `None` while it is dead or
/// restarting.
pub struct Slot<M> {
    kind: ActorKind,
    actor: RwLock<Option<ActorRef<M>>>,
}

impl<M: Message> Slot<M> {
    fn new(kind: ActorKind) -> Slot<M> {
        Slot {
            kind,
            actor: RwLock::new(None),
        }
    }

    /// Which child this is.
    pub fn kind(&self) -> ActorKind {
        self.kind
    }

    /// The child, if it runs.
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.actor.read().expect("slot lock").clone()
    }

    fn set(&self, actor: ActorRef<M>) {
        *self.actor.write().expect("slot lock") = Some(actor);
    }
}

/// What the supervisor does with a slot whatever its message type.
trait AnySlot {
    fn id(&self) -> Option<ActorId>;
    fn clear(&self);
}

impl<M: Message> AnySlot for Slot<M> {
    fn id(&self) -> Option<ActorId> {
        self.actor
            .read()
            .expect("slot lock")
            .as_ref()
            .map(|a| a.get_id())
    }

    fn clear(&self) {
        *self.actor.write().expect("slot lock") = None;
    }
}

/// The current reference to each child.
pub struct Children {
    /// The current WeChatExchanger.
    pub wechat_exchanger: Slot<WeChatExchangerMsg>,
    /// The current UserRegistry.
    pub user_registry: Slot<UserRegistryMsg>,
    /// The current SessionKeeper.
    pub session_keeper: Slot<SessionKeeperMsg>,
    /// The current Decryptor.
    pub decryptor: Slot<DecryptorMsg>,
    /// The current AccessTokenKeeper.
    pub access_token_keeper: Slot<AccessTokenKeeperMsg>,
    /// The current SessionKeeper's reader (sled only), which it publishes itself; emptied with
    /// its slot, so that nobody reads a dead keeper's table.
    pub session_reader: Arc<ReaderSlot>,
}

impl Default for Children {
    fn default() -> Children {
        Children {
            wechat_exchanger: Slot::new(ActorKind::WeChatExchanger),
            user_registry: Slot::new(ActorKind::UserRegistry),
            session_keeper: Slot::new(ActorKind::SessionKeeper),
            decryptor: Slot::new(ActorKind::Decryptor),
            access_token_keeper: Slot::new(ActorKind::AccessTokenKeeper),
            session_reader: Arc::default(),
        }
    }
}

impl Children {
    /// Whether every child is running.
    pub fn all_running(&self) -> bool {
        ActorKind::ALL
            .iter()
            .all(|kind| self.slot(*kind).id().is_some())
    }

    fn slot(&self, kind: ActorKind) -> &dyn AnySlot {
        match kind {
            ActorKind::WeChatExchanger => &self.wechat_exchanger,
            ActorKind::UserRegistry => &self.user_registry,
            ActorKind::SessionKeeper => &self.session_keeper,
            ActorKind::Decryptor => &self.decryptor,
            ActorKind::AccessTokenKeeper => &self.access_token_keeper,
        }
    }

    fn clear(&self, kind: ActorKind) {
        self.slot(kind).clear();
        if kind == ActorKind::SessionKeeper {
            *self
                .session_reader
                .write()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// The actor. Configuration comes in [`SupervisorArgs`].
pub struct Supervisor;

/// Everything needed to (re)start each child.
pub struct SupervisorArgs {
    /// Where the current children are published.
    pub children: Arc<Children>,
    /// Arguments of the WeChatExchanger.
    pub wechat_exchanger: WeChatExchangerArgs,
    /// Arguments of the UserRegistry.
    pub user_registry: UserRegistryArgs,
    /// Arguments of the SessionKeeper.
    pub session_keeper: SessionKeeperArgs,
    /// Arguments of the Decryptor.
    pub decryptor: DecryptorArgs,
    /// Arguments of the AccessTokenKeeper.
    pub access_token_keeper: AccessTokenKeeperArgs,
    /// Where restarts are counted.
    pub metrics: Arc<crate::Metrics>,
}

/// The children's arguments and the recent restart history.
pub struct SupervisorState {
    args: SupervisorArgs,
    restarts: VecDeque<Instant>,
    stopping: bool,
}

/// Messages of the supervisor.
pub enum SupervisorMsg {
    /// Start this child again (sent to itself after a backoff).
    Respawn(ActorKind),
    /// Stop every child cleanly (they persist what they hold), then answer.
    StopChildren(RpcReplyPort<()>),
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let state = SupervisorState {
            args,
            restarts: VecDeque::new(),
            stopping: false,
        };
        for kind in ActorKind::ALL {
            state.spawn(&myself, kind).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Respawn(kind) if !state.stopping => {
                match state.spawn(&myself, kind).await {
                    Ok(()) => tracing::info!(actor = ?kind, "actor restarted"),
                    Err(e) => {
                        tracing::error!(actor = ?kind, error = %e, "actor failed to restart");
                        state.schedule_restart(&myself, kind);
                    }
                }
            }
            SupervisorMsg::Respawn(_) => {}
            SupervisorMsg::StopChildren(reply) => {
                state.stopping = true;
                myself
                    .stop_children_and_wait(
                        Some("broker shutdown".into()),
                        Some(Duration::from_secs(10)),
                    )
                    .await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, cause) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let children = &state.args.children;
        let Some(kind) = ActorKind::ALL
            .into_iter()
            .find(|kind| children.slot(*kind).id() == Some(cell.get_id()))
        else {
            return Ok(());
        };
        children.clear(kind);
        if state.stopping {
            return Ok(());
        }
        tracing::error!(actor = ?kind, cause, "actor ended unexpectedly");
        state
            .args
            .metrics
            .actor_restarts
            .with_label_values(&[kind.name()])
            .inc();
        state.schedule_restart(&myself, kind);
        Ok(())
    }
}

impl SupervisorState {
    async fn spawn(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        kind: ActorKind,
    ) -> Result<(), ActorProcessingErr> {
        let cell = myself.get_cell();
        let (args, children) = (&self.args, &self.args.children);
        match kind {
            ActorKind::WeChatExchanger => {
                let args = args.wechat_exchanger.clone();
                spawn_into(&children.wechat_exchanger, WeChatExchanger, args, cell).await
            }
            ActorKind::UserRegistry => {
                let args = args.user_registry.clone();
                spawn_into(&children.user_registry, UserRegistry, args, cell).await
            }
            ActorKind::SessionKeeper => {
                let args = args.session_keeper.clone();
                spawn_into(&children.session_keeper, SessionKeeper, args, cell).await
            }
            ActorKind::Decryptor => {
                let args = args.decryptor.clone();
                spawn_into(&children.decryptor, Decryptor, args, cell).await
            }
            ActorKind::AccessTokenKeeper => {
                let args = args.access_token_keeper.clone();
                spawn_into(&children.access_token_keeper, AccessTokenKeeper, args, cell).await
            }
        }
    }

    /// Books a restart of `kind` after a backoff, or stops the supervisor past the cap.
    fn schedule_restart(&mut self, myself: &ActorRef<SupervisorMsg>, kind: ActorKind) {
        let now = Instant::now();
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        if self.restarts.len() > MAX_RESTARTS {
            tracing::error!(
                max = MAX_RESTARTS,
                window_secs = RESTART_WINDOW.as_secs(),
                "too many actor restarts; the broker gives up"
            );
            self.stopping = true;
            myself.stop(Some("restart cap reached".into()));
            return;
        }
        let exponent = (self.restarts.len() - 1).min(16) as u32;
        let backoff = (FIRST_BACKOFF * 2u32.pow(exponent)).min(MAX_BACKOFF);
        myself.send_after(backoff, move || SupervisorMsg::Respawn(kind));
    }
}

/// Spawns `actor` linked to the supervisor and publishes it in `slot`.
async fn spawn_into<A: Actor>(
    slot: &Slot<A::Msg>,
    actor: A,
    args: A::Arguments,
    supervisor: ActorCell,
) -> Result<(), ActorProcessingErr> {
    let (actor, _) = Actor::spawn_linked(None, actor, args, supervisor).await?;
    slot.set(actor);
    Ok(())
}
