//! Test-only faults that an actor can be made to suffer (the `fault-injection` feature).

use std::time::Duration;

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
