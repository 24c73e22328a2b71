//! The HTTP server: serves a warp filter through hyper with the limits warp's own server lacks.
//!
//! warp 0.4's server installs no timer, so hyper cannot time out a client that never finishes its
//! request headers, and it accepts connections without bound. Here every connection gets a
//! header-read timeout, the number of open connections is capped (the accept loop waits for a
//! free slot, leaving new clients in the kernel's queue, unread), and shutdown stops accepting,
//! lets in-flight requests finish for a bounded time, then closes what is left. The broker's
//! metrics count the open connections and each time the cap made the loop wait.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;
use tracing::Instrument;
use warp::Filter;
use warp::http::HeaderValue;
use warp::http::header::HeaderName;
use warp::reject::Rejection;
use warp::reply::Response;

use crate::metrics::Metrics;

/// The header that carries a request's id, in and out.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's socket address, put into every request's extensions for the filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Connections the kernel queues for `accept`. The usual default of 128 is overrun by a burst of
/// clients connecting at once (a mini program opened by many users after a push; the broker's own
/// burst of exchanges against the sandbox): the kernel then drops their SYNs, and each of those
/// clients waits a 1 s retransmit. The kernel lowers it to `net.core.somaxconn` if that is smaller.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener for [`crate::run`] or [`crate::serve`] with a backlog of
/// [`LISTEN_BACKLOG`] (`TcpListener::bind` gives 128).
///
/// # Panics
///
/// Outside a Tokio runtime, as `TcpSocket::listen` does.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted broker can take its port back at once. Not on
    // Windows, where it would let another socket take over the port.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connection limits of the server.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Time a client has to send a request's headers, on a new or a kept-alive connection.
    pub header_read_timeout: Duration,
    /// Connections open at once; the accept loop waits while the cap is reached.
    pub max_connections: usize,
    /// Time in-flight requests get to finish once shutdown starts.
    pub drain_timeout: Duration,
}

/// Serves `filter` on `listener` until `shutdown` resolves, then drains within the limit;
/// counts its connections in `metrics`.
pub async fn serve_http<F>(
    listener: TcpListener,
    filter: F,
    limits: ServerLimits,
    metrics: &Metrics,
    shutdown: impl Future<Output = ()>,
) where
    F: Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static,
{
    let service = warp::service(filter);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let http = Arc::new(http);
    let slots = Slots {
        free: Arc::new(Semaphore::new(limits.max_connections)),
        open: metrics.connections_open.clone(),
        cap_reached: metrics.connection_cap_reached.clone(),
    };
    let graceful = GracefulShutdown::new();
    // Every connection's task, so that whatever outlives the drain can be ended.
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = slots.accept(&listener) => accepted,
        };
        let (stream, peer, slot) = accepted;
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let handler = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(PeerAddr(peer));
            let id = request_id(&request);
            let span = tracing::info_span!(
                "request",
                id = %id,
                method = %request.method(),
                path = %request.uri().path()
            );
            let call = service.clone().call(request);
            async move {
                let started = std::time::Instant::now();
                let mut response = call.instrument(span.clone()).await?;
                span.in_scope(|| {
                    tracing::debug!(
                        status = response.status().as_u16(),
                        micros = started.elapsed().as_micros() as u64,
                        "answered"
                    );
                });
                if let Ok(value) = HeaderValue::from_str(&id) {
                    response.headers_mut().insert(REQUEST_ID, value);
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), handler));
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight after {:?}; closing anyway",
            limits.drain_timeout
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// The request's id: the client's `X-Request-Id` when it is sane, else a fresh one. It is echoed
/// back and names the request's span, so every log line of a request carries it.
fn request_id<B>(request: &hyper::Request<B>) -> String {
    let given = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    match given {
        Some(id) => id.to_owned(),
        None => format!("{:016x}", rand::random::<u64>()),
    }
}

/// The connection cap: a slot per open connection, and the metrics that show it.
struct Slots {
    /// One permit per connection that may still be opened.
    free: Arc<Semaphore>,
    /// `wxbroker_connections_open`.
    open: IntGauge,
    /// `wxbroker_connection_cap_reached_total`.
    cap_reached: IntCounter,
}

impl Slots {
    /// Waits for a free slot, then for a connection. While no slot is free nothing is accepted:
    /// a new client's connection and request wait in the kernel's listen queue.
    async fn accept(&self, listener: &TcpListener) -> (tokio::net::TcpStream, SocketAddr, Slot) {
        let permit = match self.free.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.cap_reached.inc();
                self.free
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.open.inc();
                    let slot = Slot {
                        _permit: permit,
                        open: self.open.clone(),
                    };
                    return (stream, peer, slot);
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// A connection's slot, held by its task: freed, and uncounted, when the task ends or is aborted.
struct Slot {
    /// Given back to the cap on drop.
    _permit: OwnedSemaphorePermit,
    /// `wxbroker_connections_open`, lowered on drop.
    open: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}
