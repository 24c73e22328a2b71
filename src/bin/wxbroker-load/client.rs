//! One keep-alive HTTP/1.1 connection, driven directly through hyper: the generator must cost
//! far less CPU per request than the server it measures.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// A connection to the broker.
pub struct Conn {
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
}

/// A request to send: method, path, bearer token, JSON body.
pub struct Call<'a> {
    /// GET or POST.
    pub method: Method,
    /// Path and query.
    pub path: &'a str,
    /// Sent as `Authorization: Bearer`.
    pub token: Option<&'a str>,
    /// Sent as `application/json`.
    pub json: Option<String>,
}

impl Conn {
    /// Connects to `addr`.
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Conn { addr, sender })
    }

    /// Sends one request; returns the status and body. A broken connection is reopened for the
    /// next call.
    pub async fn send(&mut self, call: &Call<'_>) -> anyhow::Result<(u16, Bytes)> {
        let outcome = self.try_send(call).await;
        if outcome.is_err()
            && let Ok(fresh) = Conn::open(self.addr).await
        {
            *self = fresh;
        }
        outcome
    }

    async fn try_send(&mut self, call: &Call<'_>) -> anyhow::Result<(u16, Bytes)> {
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(call.path)
            .header(HOST, "wxbroker");
        if let Some(token) = call.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match &call.json {
            Some(json) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(json.clone())
            }
            None => Bytes::new(),
        };
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(request.body(Full::new(body))?)
            .await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Waits (up to 60 s) until the broker answers `/healthz` with 200.
pub async fn wait_healthy(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut conn) = Conn::open(addr).await {
            let call = Call {
                method: Method::GET,
                path: "/healthz",
                token: None,
                json: None,
            };
            if let Ok((200, _)) = conn.send(&call).await {
                return Ok(());
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the broker did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
