//! The brokers under load, and which of them each connection is pinned to.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::ensure;

use crate::target::{Launch, Target};

/// Every target of a run: brokers given by URL, or instances this tool started.
pub struct Fleet {
    targets: Vec<Target>,
}

impl Fleet {
    /// Running brokers, in the order given; `pids`, when given, name their processes in the
    /// same order.
    pub fn remote(urls: &[String], pids: &[u32], allow_remote: bool) -> anyhow::Result<Fleet> {
        ensure!(
            pids.is_empty() || pids.len() == urls.len(),
            "--pid must name one process per target, in the same order (got {} for {})",
            pids.len(),
            urls.len()
        );
        let targets = urls
            .iter()
            .enumerate()
            .map(|(i, url)| Target::remote(url, pids.get(i).copied(), allow_remote))
            .collect::<anyhow::Result<_>>()?;
        Ok(Fleet { targets })
    }

    /// Starts `instances` brokers with the same launch settings; stops the ones already
    /// started if one fails.
    pub async fn spawn(instances: usize, launch: &Launch) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet {
            targets: Vec::with_capacity(instances),
        };
        for _ in 0..instances {
            match Target::spawn(launch.clone()).await {
                Ok(target) => fleet.targets.push(target),
                Err(e) => {
                    fleet.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(fleet)
    }

    /// The target that connection (or task) number `n` is pinned to: round-robin, so that
    /// load spreads evenly.
    pub fn pick(&self, n: usize) -> usize {
        n % self.targets.len()
    }

    /// The address of target number `index`.
    pub fn addr(&self, index: usize) -> SocketAddr {
        self.targets[index].addr
    }

    /// Every target's address, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.targets.iter().map(|target| target.addr).collect()
    }

    /// Target number `index`'s peak resident memory so far, when its PID is known.
    pub fn peak_rss(&self, index: usize) -> Option<u64> {
        self.targets[index].peak_rss()
    }

    /// The resident memory of all targets together, when every PID is known.
    pub fn rss(&self) -> Option<u64> {
        self.targets.iter().map(Target::rss).sum()
    }

    /// Restarts the one broker this tool started; see [`Target::restart`].
    pub async fn restart(&mut self) -> anyhow::Result<Duration> {
        ensure!(
            self.targets.len() == 1,
            "--restart needs exactly one broker started by this tool"
        );
        self.targets[0].restart().await
    }

    /// Stops every broker this tool started.
    pub async fn stop(&mut self) {
        for target in &mut self.targets {
            target.stop().await;
        }
    }
}
