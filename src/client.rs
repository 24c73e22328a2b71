//! A small client for business backends that run wxbroker as a separate service.
//!
//! ```no_run
//! # async fn demo(token: &str) -> Result<(), wxbroker::Error> {
//! let broker = wxbroker::BrokerClient::new("http://127.0.0.1:8080")?;
//! let session = broker.check_session(token).await?; // Err(Error::InvalidSession) on 401
//! println!("uid {}", session.uid);
//! # Ok(()) }
//! ```

use std::time::Duration;

use reqwest::{StatusCode, Url};

use crate::{Error, SessionInfo};

/// A client of a wxbroker's HTTP API. Cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct BrokerClient {
    http: reqwest::Client,
    session_url: Url,
}

impl BrokerClient {
    /// A client of the broker at `base_url` (e.g. `http://wxbroker.internal:8080`), with a
    /// 5-second timeout per call.
    pub fn new(base_url: &str) -> Result<BrokerClient, Error> {
        crate::tls::install_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(crate::upstream::cannot_build_client)?;
        BrokerClient::with_http(base_url, http)
    }

    /// As [`BrokerClient::new`], with a `reqwest::Client` of the caller's (timeouts, pool), built
    /// after [`crate::tls::install_provider`] or the host's own provider.
    pub fn with_http(base_url: &str, http: reqwest::Client) -> Result<BrokerClient, Error> {
        let base = Url::parse(base_url)
            .map_err(|e| Error::Config(format!("bad broker URL {base_url}: {e}")))?;
        let session_url = base
            .join("/v1/session")
            .map_err(|e| Error::Config(format!("bad broker URL {base_url}: {e}")))?;
        Ok(BrokerClient { http, session_url })
    }

    /// Who `token` belongs to. `Err(Error::InvalidSession)` means the client must log in again;
    /// `Err(Error::Unavailable)` means the broker could not answer (retry later).
    pub async fn check_session(&self, token: &str) -> Result<SessionInfo, Error> {
        let unavailable =
            |e: reqwest::Error| Error::Unavailable(format!("wxbroker: {}", e.without_url()));
        let response = self
            .http
            .get(self.session_url.clone())
            .bearer_auth(token)
            .send()
            .await
            .map_err(unavailable)?;
        match response.status() {
            StatusCode::OK => response.json().await.map_err(unavailable),
            StatusCode::UNAUTHORIZED => Err(Error::InvalidSession),
            status => Err(Error::Unavailable(format!(
                "wxbroker answered HTTP {status}"
            ))),
        }
    }
}
