//! The TLS provider of every HTTPS client in the process.
//!
//! reqwest is built with rustls but without a provider of its own: rustls then takes the
//! process's default provider, which must exist before the first client is built, or the build
//! panics.

/// Makes aws-lc-rs (the crypto library the access tokens sign with) the process's rustls
/// provider, unless the host installed one of its own first.
///
/// Idempotent and cheap. The library calls it before every client it builds; an embedder that
/// builds its own `reqwest::Client` (for [`crate::BrokerClient::with_http`]) calls it first.
pub fn install_provider() {
    // An error means a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
