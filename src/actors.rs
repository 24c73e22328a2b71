//! The supervised actors. Each owns one concern; none of them knows about HTTP or JSON.
//!
//! - [`supervisor::Supervisor`] spawns the others linked and restarts any that fails.
//! - [`wechat_exchanger::WeChatExchanger`] exchanges login codes with WeChat.
//! - [`user_registry::UserRegistry`] registers users and keeps their session_keys.
//! - [`session_keeper::SessionKeeper`] issues, checks, slides and expires session tokens.
//! - [`decryptor::Decryptor`] opens `encryptedData` (profiles, phone numbers) and checks it.
//! - [`access_token_keeper::AccessTokenKeeper`] holds each app's access_token and keeps it fresh.

pub mod access_token_keeper;
pub mod decryptor;
pub mod session_keeper;
pub mod supervisor;
pub mod user_registry;
pub mod wechat_exchanger;

use ractor::RpcReplyPort;

use crate::Error;
use crate::storage::Pending;

/// Answers `reply` with a storage outcome, from a task of its own when it is not known yet: the
/// actor goes on with its next message meanwhile.
fn answer<T: Send + 'static>(pending: Pending<T>, reply: RpcReplyPort<Result<T, Error>>) {
    pending.then(move |outcome| {
        // The caller may have given up (its timeout); nothing else is owed to it.
        let _ = reply.send(outcome);
    });
}
