//! The TLS provider of every HTTPS client in the process.
//!
//! reqwest is built with rustls but without its default provider (aws-lc-rs, a C library built
//! through cmake that took minutes of a first build): rustls then takes the process's default
//! provider, which must exist before the first client is built, or the build panics.

/// Makes ring the process's rustls provider, unless the host installed one of its own first.
///
/// Idempotent and cheap. The library calls it before every client it builds; an embedder that
/// builds its own `reqwest::Client` (for [`crate::BrokerClient::with_http`]) calls it first.
pub fn install_provider() {
    // An error means a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
