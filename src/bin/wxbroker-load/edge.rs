//! The edge host of the `edge` and `edge-bare` scenarios: a process of its own (this tool, run
//! again with `--serve-edge`), so that it shares a runtime with neither the generator nor the
//! broker. It serves `GET /edge/verified` behind `wxbroker::edge::Verifier`'s filter and
//! `GET /edge/bare`, the same answer without it, so that the two scenarios measure what the
//! filter costs.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::Method;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use warp::Filter;
use wxbroker::edge::{Verifier, VerifierOptions};
use wxbroker::jwt::AccessClaims;

use crate::client::{Call, Conn};

/// The environment variable that hands the feed's secret to the edge host (not on its command
/// line, where any user of the machine could read it).
const TOKEN_ENV: &str = "WXBROKER_VERIFIER_TOKEN";

/// The edge host's own line that says where it serves.
const SERVING: &str = "edge host serving on ";

/// An edge host this tool started.
pub struct EdgeHost {
    child: Child,
    /// Where it serves.
    pub addr: SocketAddr,
}

impl EdgeHost {
    /// Starts an edge host that verifies the tokens of the broker at `broker` (in sandbox mode)
    /// with the feed's secret `token`; returns once it has read the broker's feed.
    pub async fn spawn(broker: SocketAddr, token: &str) -> anyhow::Result<EdgeHost> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-edge")
            .arg(format!("http://{broker}"))
            .env(TOKEN_ENV, token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the edge host")?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix(SERVING) {
                    return Ok::<_, anyhow::Error>(addr.parse()?);
                }
            }
            bail!("the edge host exited before serving")
        })
        .await
        .context("the edge host did not start within 30 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let host = EdgeHost { child, addr };
        host.wait_ready().await?;
        Ok(host)
    }

    /// Waits (up to 30 s) until the edge host's verifier has read the feed.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut conn = Conn::open(self.addr).await?;
        let call = Call {
            method: Method::GET,
            path: "/edge/ready",
            token: None,
            json: None,
        };
        while !matches!(conn.send(&call).await, Ok((200, _))) {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the edge host's verifier did not read the broker's feed within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Serves as the edge host (`--serve-edge BROKER_URL`) until killed.
pub async fn serve(broker: &str) -> anyhow::Result<()> {
    let token = std::env::var(TOKEN_ENV).with_context(|| format!("{TOKEN_ENV} is not set"))?;
    let options = VerifierOptions::new(broker, wxbroker::SANDBOX_APPID, token);
    let verifier = Verifier::start(options)?;
    let ready_verifier = verifier.clone();
    let ready = warp::path!("edge" / "ready").map(move || {
        let status = match ready_verifier.is_synced() {
            true => warp::http::StatusCode::OK,
            false => warp::http::StatusCode::SERVICE_UNAVAILABLE,
        };
        warp::reply::with_status("", status)
    });
    // The same answer, with and without the verifier's filter in front.
    let bare = warp::path!("edge" / "bare")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({ "uid": 0 })));
    let verified = warp::path!("edge" / "verified")
        .and(warp::get())
        .and(verifier.require())
        .map(|claims: Arc<AccessClaims>| {
            warp::reply::json(&serde_json::json!({ "uid": claims.uid() }))
        });
    let routes = ready.or(bare).or(verified).recover(wxbroker::recover);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{SERVING}{}", listener.local_addr()?);
    warp::serve(routes).incoming(listener).run().await;
    Ok(())
}
