//! Test-only faults that an actor can be made to suffer (the `fault-injection` feature).

use std::time::Duration;

use crate::{ActorKind, Broker};

/// Names the actor that the binary makes panic each time it runs, so that a test can watch the
/// real binary give up past the restart cap (nothing else from outside can make an actor fail).
pub const FAULT_ENV: &str = "WXBROKER_FAULT";

/// What to do to an actor, inside its message handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Panic, as a bug would: the supervisor must restart the actor.
    Panic,
    /// Block the actor this long, as a stuck disk would: callers must time out, not hang.
    Stall(Duration),
}

impl Fault {
    /// Suffers the fault in the calling actor.
    pub(crate) async fn strike(self, actor: &str) {
        match self {
            Fault::Panic => panic!("injected panic in {actor}"),
            Fault::Stall(duration) => tokio::time::sleep(duration).await,
        }
    }
}

/// With [`FAULT_ENV`] set to an actor's name (`session_keeper`, ...), makes that actor panic each
/// time it runs, until the broker stops.
pub(crate) fn strike_from_env(broker: &Broker) {
    let Ok(name) = std::env::var(FAULT_ENV) else {
        return;
    };
    let Some(kind) = ActorKind::ALL.into_iter().find(|kind| kind.name() == name) else {
        tracing::warn!(name, "{FAULT_ENV} names no actor");
        return;
    };
    tracing::warn!(
        actor = name,
        "{FAULT_ENV}: panicking the actor each time it runs"
    );
    let broker = broker.clone();
    tokio::spawn(async move {
        let strikes = async {
            loop {
                broker.try_inject(kind, Fault::Panic);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            () = strikes => {}
            () = broker.stopped() => {}
        }
    });
}
