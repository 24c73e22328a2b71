//! Per-client-IP limits: logins (a token bucket per address) and failed admin bearers (a count
//! per address and minute).
//!
//! Each login costs WeChat quota and sends our secret upstream; one address hammering the route
//! gets 429 with `Retry-After` instead. An address that keeps presenting a wrong admin token gets
//! 429 too, for the rest of the minute, whatever it presents. The tables of addresses are pruned
//! as they are used, so they stay bounded by the addresses seen within one refill period. An IPv6
//! client is known by its /64 ([`client_key`]), since one host or subscriber holds all of it.
//!
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use warp::http::StatusCode;
use warp::{Filter, Rejection};

use super::problem::Problem;
use crate::server::{ClientAddr, client_key};

/// How often (in checks) the table drops addresses whose buckets are full again.
const PRUNE_EVERY: u64 = 4096;

/// The login limiter; `None` inside when the limit is off.
pub struct LoginLimiter {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl LoginLimiter {
    /// `per_minute` sustained with bursts of `burst`; a `per_minute` of 0 turns it off.
    pub fn new(per_minute: u32, burst: u32) -> LoginLimiter {
        let limiter = NonZeroU32::new(per_minute).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            DefaultKeyedRateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))
        });
        LoginLimiter {
            limiter,
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes a token for `ip`'s client, or says how many seconds until one is free.
    fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let ip = client_key(ip);
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            limiter.retain_recent();
        }
        limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// Passes a request whose client still has a login token; rejects with 429 otherwise.
pub fn login_limit(
    limiter: Arc<LoginLimiter>,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    client_ip()
        .and_then(move |ip: Option<IpAddr>| {
            let verdict = match ip {
                Some(ip) => limiter.check(ip),
                None => Ok(()),
            };
            async move {
                verdict.map_err(|secs| {
                    rate_limited(
                        format!("too many logins from this address; retry in {secs} seconds"),
                        secs,
                    )
                })
            }
        })
        .untuple_one()
}

/// The client's IP address, if known: behind a trusted proxy, the address it forwarded for.
pub fn client_ip()
-> impl Filter<Extract = (Option<IpAddr>,), Error = std::convert::Infallible> + Clone {
    // Our own server sets `ClientAddr`; under `warp::serve` (embedders) warp knows the peer.
    warp::ext::optional::<ClientAddr>()
        .and(warp::addr::remote())
        .map(
            |client: Option<ClientAddr>, remote: Option<std::net::SocketAddr>| {
                client
                    .map(|ClientAddr(ip)| ip)
                    .or(remote.map(|addr| addr.ip()))
            },
        )
}

/// A 429 `rate_limited` rejection with `Retry-After: secs`.
fn rate_limited(message: String, secs: u64) -> Rejection {
    warp::reject::custom(
        Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).with_retry_after(secs),
    )
}

/// Failed admin bearers one client address may present per minute; past them, every admin
/// request from it is refused until the minute is over, a right token too (else guessing would
/// go on, each right guess still told apart).
pub const ADMIN_FAILURES_PER_MIN: u32 = 10;
/// The window [`ADMIN_FAILURES_PER_MIN`] counts in.
const ADMIN_WINDOW: Duration = Duration::from_secs(60);

/// Failed admin bearers per client address, counted in windows of [`ADMIN_WINDOW`] that start
/// with an address's first failure.
#[derive(Default)]
pub struct AdminFailures {
    /// Per client address: when its window started, and its failures in it.
    windows: Mutex<AdminWindows>,
}

/// The table of [`AdminFailures`], behind its lock.
#[derive(Default)]
struct AdminWindows {
    /// Per client address: when its window started, and its failures in it.
    by_client: HashMap<IpAddr, (Instant, u32)>,
    /// Size at which the table next drops the windows that are over.
    prune_at: usize,
}

impl AdminFailures {
    /// `Err(seconds)` while `ip`'s client has used up its failures of the current window.
    fn check(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        match windows.by_client.get(&client_key(ip)) {
            Some(&(started, failures)) if failures >= ADMIN_FAILURES_PER_MIN => {
                let left = ADMIN_WINDOW.saturating_sub(now.saturating_duration_since(started));
                if left.is_zero() {
                    Ok(())
                } else {
                    Err(left.as_secs() + u64::from(left.subsec_nanos() > 0))
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed bearer of `ip`'s client.
    fn failed(&self, ip: IpAddr, now: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if windows.by_client.len() >= windows.prune_at {
            windows
                .by_client
                .retain(|_, (started, _)| now.saturating_duration_since(*started) < ADMIN_WINDOW);
            windows.prune_at = (2 * windows.by_client.len()).max(1024);
        }
        let window = windows.by_client.entry(client_key(ip)).or_insert((now, 0));
        if now.saturating_duration_since(window.0) >= ADMIN_WINDOW {
            *window = (now, 0);
        }
        window.1 += 1;
    }

    /// Passes a request whose client may still try the admin token; 429 otherwise.
    pub fn allow(&self, ip: Option<IpAddr>) -> Result<(), Rejection> {
        let Some(ip) = ip else {
            return Ok(());
        };
        self.check(ip, Instant::now()).map_err(|secs| {
            rate_limited(
                format!("too many wrong admin tokens from this address; retry in {secs} seconds"),
                secs,
            )
        })
    }

    /// Counts a wrong admin token from `ip`.
    pub fn record_failure(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            self.failed(ip, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_address() {
        let limiter = LoginLimiter::new(1, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.check(a), Ok(()));
        }
        let wait = limiter.check(a).unwrap_err();
        assert!((1..=60).contains(&wait), "{wait}");
        assert_eq!(limiter.check(b), Ok(()), "other addresses are not affected");
    }

    #[test]
    fn an_ipv6_client_shares_one_bucket_with_its_64() {
        let limiter = LoginLimiter::new(1, 2);
        let a: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:0:1:ffff:ffff:ffff:ffff".parse().unwrap();
        let next_64: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        assert_eq!(limiter.check(a), Ok(()));
        assert_eq!(limiter.check(same_64), Ok(()));
        assert!(limiter.check(a).is_err(), "its /64 spent the burst");
        assert!(limiter.check(same_64).is_err());
        assert_eq!(
            limiter.check(next_64),
            Ok(()),
            "another /64 is another client"
        );
    }

    #[test]
    fn wrong_admin_tokens_are_limited_per_client_and_minute() {
        let failures = AdminFailures::default();
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..ADMIN_FAILURES_PER_MIN {
            assert_eq!(failures.check(a, t0), Ok(()));
            failures.failed(a, t0);
        }
        assert_eq!(failures.check(a, t0), Err(60));
        assert_eq!(
            failures.check(a, t0 + Duration::from_millis(59_500)),
            Err(1)
        );
        assert_eq!(
            failures.check(b, t0),
            Ok(()),
            "other addresses are not affected"
        );
        let later = t0 + ADMIN_WINDOW;
        assert_eq!(failures.check(a, later), Ok(()), "a new minute");
        failures.failed(a, later);
        assert_eq!(failures.check(a, later), Ok(()), "counted from 0 again");
    }

    #[test]
    fn zero_turns_it_off() {
        let limiter = LoginLimiter::new(0, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..10_000 {
            assert_eq!(limiter.check(a), Ok(()));
        }
    }
}
