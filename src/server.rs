//! The HTTP server: serves a warp filter through hyper with the limits warp's own server lacks.
//!
//! warp 0.4's server installs no timer, so hyper cannot time out a client that never finishes its
//! request headers, and it accepts connections without bound. Here every connection gets a
//! header-read timeout, the number of open connections is capped (the accept loop waits for a
//! free slot, leaving new clients in the kernel's queue, unread), one client address holds at
//! most its own share of them (past it, its new connections are answered 429 and closed at once,
//! without waiting for a slot of their own), and shutdown stops accepting, lets in-flight requests
//! finish for a bounded time, then closes what is left. The broker's metrics count the open
//! connections, each time the cap made the loop wait, and each refused connection.
//!
//! A connection the server closes first (an answer with `Connection: close`: a 413 before the
//! body was read, a 408, a refusal; an idle one past its header-read timeout) lingers: its write
//! side is shut, then what the client still sends is read and discarded, up to [`LINGER_BYTES`]
//! for at most [`LINGER_TIME`]. Closed with unread bytes, the socket would send a reset instead,
//! and the client could lose the answer it had not read yet.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;
use tracing::Instrument;
use warp::Filter;
use warp::http::HeaderValue;
use warp::http::header::{CONNECTION, HeaderName};
use warp::reject::Rejection;
use warp::reply::Response;

use crate::metrics::Metrics;
use crate::trusted_proxies::TrustedProxies;

/// The header that carries a request's id, in and out.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's socket address, put into every request's extensions for the filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The client's address as the limits and logs know it: the TCP peer, or behind a trusted proxy
/// the address it forwarded for ([`TrustedProxies::client`]). In every request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

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
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Time a client has to send a request's headers, on a new or a kept-alive connection.
    pub header_read_timeout: Duration,
    /// Connections open at once; the accept loop waits while the cap is reached.
    pub max_connections: usize,
    /// Connections open at once from one client address ([`client_key`]); past it, that
    /// client's new connections are refused. 0: no such limit.
    pub max_connections_per_ip: usize,
    /// The proxies whose forwarding headers name the client ([`ClientAddr`]).
    pub trusted_proxies: TrustedProxies,
    /// Time in-flight requests get to finish once shutdown starts.
    pub drain_timeout: Duration,
}

/// Most bytes a closing connection reads and discards after its last answer: sixteen times the
/// largest body a route accepts, so a client still sending an oversize body reads the 413
/// instead of a reset; an endless sender is cut off there.
pub const LINGER_BYTES: usize = 1024 * 1024;
/// Longest a closing connection waits for its client to stop sending and close (an RTT or a
/// few is what a client needs to read the answer and see `Connection: close`).
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Refused connections answered at once; past it, a refused connection is closed unanswered, so
/// that a flood of them costs a bounded number of sockets.
const REFUSALS_AT_ONCE: usize = 64;
/// Time a refused connection has to send its request headers before it is closed unanswered.
const REFUSAL_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves `filter` on `listener` until `shutdown` resolves, then drains within the limit;
/// counts its connections in `metrics`. A connection refused under the per-client limit is
/// answered `refusal()`.
pub async fn serve_http<F>(
    listener: TcpListener,
    filter: F,
    refusal: fn() -> Response,
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
    let per_client = (limits.max_connections_per_ip > 0)
        .then(|| Arc::new(PerClient::new(limits.max_connections_per_ip)));
    let refusals = Refusals::new(refusal, metrics.connections_refused.clone());
    let trusted_proxies = Arc::new(limits.trusted_proxies);
    let graceful = GracefulShutdown::new();
    // Every connection's task, so that whatever outlives the drain can be ended.
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = slots.accept(&listener) => accepted,
        };
        let (stream, peer, permit) = accepted;
        let _ = stream.set_nodelay(true);
        while connections.try_join_next().is_some() {}
        // Refused before it counts as open: its slot goes back to the cap at once, so a client
        // past its share never keeps another waiting, however fast it reconnects.
        let share = match &per_client {
            Some(table) => match PerClient::admit(table, peer.ip()) {
                Some(share) => Some(share),
                None => {
                    drop(permit);
                    refusals.refuse(stream, &mut connections);
                    continue;
                }
            },
            None => None,
        };
        let slot = slots.open(permit, share);
        let service = service.clone();
        let trusted_proxies = trusted_proxies.clone();
        let handler = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let (mut parts, body) = request.into_parts();
            let client = trusted_proxies.client(peer.ip(), &parts.headers);
            parts.extensions.insert(PeerAddr(peer));
            parts.extensions.insert(ClientAddr(client));
            let (body, read) = Tracked::new(body);
            let request = hyper::Request::from_parts(parts, body);
            let id = request_id(&request);
            let span = tracing::info_span!(
                "request",
                id = %id,
                client = %client,
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
                // Answered before its body was read (a 413 from the Content-Length, a 408):
                // hyper closes such a connection after the answer, so the client must know not
                // to send another request on it.
                if read.is_some_and(|read| !read.load(Ordering::Relaxed)) {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let io = TokioIo::new(Lingering::new(stream, slot));
        let connection = graceful.watch(http.serve_connection(io, handler));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
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

/// The address a client is known by for the per-client limits: an IPv4 address as it is (also
/// when it comes mapped into IPv6), an IPv6 address as its /64, the block one subscriber or one
/// host usually holds whole: keyed by the full address, one client could take 2^64 shares.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
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
    async fn accept(
        &self,
        listener: &TcpListener,
    ) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
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
                Ok((stream, peer)) => return (stream, peer, permit),
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// An admitted connection's slot: `permit` and its client's `share`, counted as open.
    fn open(&self, permit: OwnedSemaphorePermit, share: Option<ClientShare>) -> Slot {
        self.open.inc();
        Slot {
            _permit: permit,
            _share: share,
            open: self.open.clone(),
        }
    }
}

/// A connection's slot, held by its socket: freed, and uncounted, once the socket is closed.
struct Slot {
    /// Given back to the cap on drop.
    _permit: OwnedSemaphorePermit,
    /// Given back to the client's share on drop (none without a per-client limit).
    _share: Option<ClientShare>,
    /// `wxbroker_connections_open`, lowered on drop.
    open: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Connections open per client address ([`client_key`]), against the per-client limit. Only
/// addresses with a connection open are in the table.
struct PerClient {
    /// Most connections one client address holds at once.
    cap: usize,
    /// Connections open per client address.
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerClient {
    fn new(cap: usize) -> PerClient {
        PerClient {
            cap,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A share for one more connection of `ip`'s client, or `None` when it holds its cap.
    fn admit(table: &Arc<PerClient>, ip: IpAddr) -> Option<ClientShare> {
        let key = client_key(ip);
        let mut open = table.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= table.cap {
            return None;
        }
        *count += 1;
        Some(ClientShare {
            table: table.clone(),
            key,
        })
    }
}

/// One connection's place in its client's share; given back on drop.
struct ClientShare {
    /// The table it counts in.
    table: Arc<PerClient>,
    /// Its client's address, as the table keys it.
    key: IpAddr,
}

impl Drop for ClientShare {
    fn drop(&mut self) {
        let mut open = self
            .table
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Entry::Occupied(mut entry) = open.entry(self.key) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

/// What answers the connections refused under the per-client limit, with a bound of its own:
/// they hold no connection slot, so that one client's refused connections never keep anyone
/// waiting at the cap.
struct Refusals {
    /// One permit per refused connection that may still be answered.
    free: Arc<Semaphore>,
    /// hyper without keep-alive and with a short header-read timeout.
    http: http1::Builder,
    /// The answer (429 JSON).
    answer: fn() -> Response,
    /// `wxbroker_connections_refused_total`.
    refused: IntCounter,
}

impl Refusals {
    fn new(answer: fn() -> Response, refused: IntCounter) -> Refusals {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(REFUSAL_HEADER_TIMEOUT)
            .keep_alive(false);
        Refusals {
            free: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
            http,
            answer,
            refused,
        }
    }

    /// Reads the request's headers, answers [`Refusals::answer`] with `Connection: close`, and
    /// closes (lingering); past [`REFUSALS_AT_ONCE`], closes at once. The answer comes after
    /// the request rather than right after `accept`: an HTTP client takes bytes that arrive
    /// before it sent its request for a broken connection, and would retry at once.
    fn refuse(&self, stream: TcpStream, tasks: &mut tokio::task::JoinSet<()>) {
        self.refused.inc();
        let Ok(permit) = self.free.clone().try_acquire_owned() else {
            return;
        };
        let answer = self.answer;
        let respond = hyper::service::service_fn(move |_request: hyper::Request<Incoming>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(answer()))
        });
        let io = TokioIo::new(Lingering::new(stream, permit));
        let connection = self.http.serve_connection(io, respond);
        tasks.spawn(async move {
            let _ = connection.await;
        });
    }
}

/// A request body that records whether it was read to its end (no flag for a request that has
/// no body).
struct Tracked {
    /// The body as hyper gives it.
    inner: Incoming,
    /// Set once the end of the body was reached.
    read: Option<Arc<AtomicBool>>,
}

impl Tracked {
    /// `body`, and the flag that says once it was read to its end (`None`: nothing to read).
    fn new(body: Incoming) -> (Tracked, Option<Arc<AtomicBool>>) {
        let read = (!body.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        let flag = read.clone();
        (Tracked { inner: body, read }, flag)
    }

    fn mark_read(&self) {
        if let Some(read) = &self.read {
            read.store(true, Ordering::Relaxed);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.mark_read();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.mark_read();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket and what it holds (its slot, or a refusal's permit). Dropped while the
/// client may still be sending, it lingers: in a task of its own it shuts its write side, reads
/// and discards until the client closes, for at most [`LINGER_TIME`] and [`LINGER_BYTES`], and
/// only then closes and lets go of what it holds.
struct Lingering<H: Send + 'static> {
    /// The socket; taken on drop.
    stream: Option<TcpStream>,
    /// Released once the socket is closed.
    hold: Option<H>,
    /// The client closed its side: nothing more will come, so closing sends no reset.
    client_closed: bool,
}

impl<H: Send + 'static> Lingering<H> {
    fn new(stream: TcpStream, hold: H) -> Lingering<H> {
        Lingering {
            stream: Some(stream),
            hold: Some(hold),
            client_closed: false,
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("taken only on drop"))
    }
}

impl<H: Send + 'static> Drop for Lingering<H> {
    fn drop(&mut self) {
        let (Some(stream), hold) = (self.stream.take(), self.hold.take()) else {
            return;
        };
        if self.client_closed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                linger(stream).await;
                drop(hold);
            });
        }
    }
}

/// Shuts `stream`'s write side (the client reads the end of the answer), then reads and
/// discards until the client closes, within [`LINGER_TIME`] and [`LINGER_BYTES`].
async fn linger(mut stream: TcpStream) {
    let drain = async {
        let _ = stream.shutdown().await;
        let mut scratch = vec![0u8; 16 * 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

impl<H: Send + Unpin + 'static> AsyncRead for Lingering<H> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (before, room) = (buf.filled().len(), buf.remaining() > 0);
        let read = this.stream().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read
            && room
            && buf.filled().len() == before
        {
            this.client_closed = true;
        }
        read
    }
}

impl<H: Send + Unpin + 'static> AsyncWrite for Lingering<H> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_is_known_by_its_64() {
        let key = |ip: &str| client_key(ip.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(
            key("::ffff:203.0.113.7"),
            "203.0.113.7",
            "an IPv4 client over IPv6"
        );
    }

    #[test]
    fn a_client_holds_at_most_its_share_and_gets_it_back() {
        let table = Arc::new(PerClient::new(2));
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let a_too: IpAddr = "2001:db8::2".parse().unwrap();
        let b: IpAddr = "192.0.2.1".parse().unwrap();
        let first = PerClient::admit(&table, a).unwrap();
        let _second = PerClient::admit(&table, a_too).unwrap();
        assert!(PerClient::admit(&table, a).is_none(), "the same /64");
        assert!(PerClient::admit(&table, b).is_some(), "another client");
        drop(first);
        assert!(PerClient::admit(&table, a).is_some(), "a share given back");
        assert!(
            table.open.lock().unwrap().get(&client_key(b)).is_none(),
            "no empty entry"
        );
    }
}
