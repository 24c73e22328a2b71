//! One broker under load: one this tool started (a child process), or one given by URL.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Where requests go, and the process behind it when known.
pub struct Target {
    /// The broker's address.
    pub addr: SocketAddr,
    pid: Option<u32>,
    spawned: Option<Spawned>,
}

/// How this tool starts a broker: the same for every instance of a run, and again on restart.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The `wxbroker` executable (default: beside this one).
    pub bin: Option<PathBuf>,
    /// The sandbox WeChat's latency in milliseconds.
    pub upstream_latency_ms: u64,
    /// The broker's in-flight exchange limit.
    pub max_inflight: usize,
    /// Passed as `WXBROKER_STORE`: the shared store that lets several instances serve the same
    /// users and sessions. Without it each broker keeps its own sled data dir.
    pub store: Option<String>,
    /// Passed as `WXBROKER_ACCESS_TOKEN_TTL` (the broker's default without it).
    pub access_token_ttl: Option<u64>,
    /// Passed as `WXBROKER_VERIFIER_TOKEN`, for the edge scenarios' verifier.
    pub verifier_token: Option<String>,
}

/// A broker this tool started.
struct Spawned {
    child: Child,
    launch: Launch,
    data_dir: PathBuf,
}

impl Target {
    /// A running broker; only on loopback unless `allow_remote`.
    pub fn remote(url: &str, pid: Option<u32>, allow_remote: bool) -> anyhow::Result<Target> {
        let url = reqwest::Url::parse(url).with_context(|| format!("{url} is not a URL"))?;
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(80);
        let ip: IpAddr = if host == "localhost" {
            IpAddr::from([127, 0, 0, 1])
        } else {
            host.trim_matches(['[', ']'])
                .parse()
                .context("--url must name an IP address or localhost")?
        };
        if !ip.is_loopback() && !allow_remote {
            bail!("{ip} is not loopback; pass --allow-remote to load another machine");
        }
        Ok(Target {
            addr: SocketAddr::new(ip, port),
            pid,
            spawned: None,
        })
    }

    /// Starts `wxbroker` in sandbox mode on a free loopback port with a temporary data dir.
    pub async fn spawn(mut launch: Launch) -> anyhow::Result<Target> {
        if launch.bin.is_none() {
            launch.bin = Some(std::env::current_exe()?.with_file_name("wxbroker"));
        }
        let data_dir = std::env::temp_dir().join(format!(
            "wxbroker-load-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let (child, addr) = match start(&launch, &data_dir).await {
            Ok(started) => started,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&data_dir);
                return Err(e);
            }
        };
        let spawned = Spawned {
            child,
            launch,
            data_dir,
        };
        Ok(Target {
            addr,
            pid: spawned.child.id(),
            spawned: Some(spawned),
        })
    }

    /// The broker's peak resident memory so far, when its PID is known (Linux).
    pub fn peak_rss(&self) -> Option<u64> {
        status_kib(self.pid?, "VmHWM:").map(|kib| kib * 1024)
    }

    /// The broker's current resident memory, when its PID is known (Linux).
    pub fn rss(&self) -> Option<u64> {
        status_kib(self.pid?, "VmRSS:").map(|kib| kib * 1024)
    }

    /// Stops the broker this tool started (SIGTERM, so it flushes) and starts it again on the same
    /// data dir; returns the time from start until it answers `/healthz` with 200.
    pub async fn restart(&mut self) -> anyhow::Result<Duration> {
        let Some(spawned) = &mut self.spawned else {
            bail!("--restart needs a broker started by this tool (no --url or --targets)");
        };
        terminate(&mut spawned.child).await?;
        let started = Instant::now();
        let (child, addr) = start(&spawned.launch, &spawned.data_dir).await?;
        spawned.child = child;
        self.addr = addr;
        self.pid = spawned.child.id();
        crate::client::wait_healthy(addr).await?;
        Ok(started.elapsed())
    }

    /// Stops a broker this tool started and removes its data dir.
    pub async fn stop(&mut self) {
        if let Some(mut spawned) = self.spawned.take() {
            let _ = terminate(&mut spawned.child).await;
            let _ = std::fs::remove_dir_all(&spawned.data_dir);
        }
    }
}

async fn start(launch: &Launch, data_dir: &Path) -> anyhow::Result<(Child, SocketAddr)> {
    let bin = launch.bin.as_deref().context("no broker executable")?;
    let mut command = Command::new(bin);
    // The run's settings alone, not whatever the caller's shell exports.
    for (name, _) in std::env::vars() {
        if name.starts_with("WECHAT_") || name.starts_with("WXBROKER_") {
            command.env_remove(name);
        }
    }
    if let Some(store) = &launch.store {
        command.env("WXBROKER_STORE", store);
    }
    if let Some(ttl) = launch.access_token_ttl {
        command.env("WXBROKER_ACCESS_TOKEN_TTL", ttl.to_string());
    }
    if let Some(token) = &launch.verifier_token {
        command.env("WXBROKER_VERIFIER_TOKEN", token);
    }
    let latency_ms = launch.upstream_latency_ms.to_string();
    let mut child = command
        .args(["--listen", "127.0.0.1:0", "--login-rate-per-min", "0"])
        .args(["--sandbox-latency-ms", &latency_ms])
        .args(["--max-inflight", &launch.max_inflight.to_string()])
        .args(["--max-connections", "16384"])
        // Every connection of the load comes from 127.0.0.1.
        .args(["--max-connections-per-ip", "0"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn,wxbroker=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (build it with cargo build --release)",
                bin.display()
            )
        })?;
    let stdout = child.stdout.take().context("no stdout")?;
    let addr = read_addr(stdout).await?;
    Ok((child, addr))
}

/// Reads the broker's log until it says where it serves, then keeps draining it.
async fn read_addr(stdout: tokio::process::ChildStdout) -> anyhow::Result<SocketAddr> {
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.split("addr=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return Ok::<_, anyhow::Error>(addr.parse()?);
            }
        }
        bail!("the broker exited before serving")
    })
    .await
    .context("the broker did not start within 60 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(addr)
}

async fn terminate(child: &mut Child) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
    }
    Ok(())
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
