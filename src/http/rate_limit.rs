//! Per-client-IP rate limit on logins (a token bucket per address).
//!
//! Each login costs WeChat quota and sends our secret upstream; one address hammering the route
//! gets 429 with `Retry-After` instead. The table of addresses is pruned as it is used, so it
//! stays bounded by the addresses seen within one refill period.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use warp::http::StatusCode;
use warp::{Filter, Rejection};

use super::problem::Problem;
use crate::server::PeerAddr;

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

    /// Takes a token for `ip`, or says how many seconds until one is free.
    fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
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
    // Our own server sets `PeerAddr`; under `warp::serve` (embedders) warp knows the address.
    warp::ext::optional::<PeerAddr>()
        .and(warp::addr::remote())
        .and_then(
            move |peer: Option<PeerAddr>, remote: Option<std::net::SocketAddr>| {
                let verdict = match peer.map(|PeerAddr(addr)| addr).or(remote) {
                    Some(addr) => limiter.check(addr.ip()),
                    None => Ok(()),
                };
                async move {
                    verdict.map_err(|secs| {
                        warp::reject::custom(
                            Problem::new(
                                StatusCode::TOO_MANY_REQUESTS,
                                "rate_limited",
                                format!(
                                    "too many logins from this address; retry in {secs} seconds"
                                ),
                            )
                            .with_retry_after(secs),
                        )
                    })
                }
            },
        )
        .untuple_one()
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
    fn zero_turns_it_off() {
        let limiter = LoginLimiter::new(0, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..10_000 {
            assert_eq!(limiter.check(a), Ok(()));
        }
    }
}
