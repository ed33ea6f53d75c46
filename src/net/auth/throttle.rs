//! The failure throttle: refusals of a wrong secret are answered later and later, per client
//! address and presented identity, while the right secret is answered at once. The old lockout
//! refused everything from an address after 20 failures, so a stranger behind the workers' NAT could
//! stop the run; delaying only the failures costs a guesser time and costs the cluster nothing.
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;

use super::window::WindowCounts;

/// The span over which one address and identity's failures are counted.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Failures answered at once in a window (a mistyped token file should fail fast).
pub const FREE_FAILURES: u32 = 10;
/// An address's failures under all identities together get this many times the free ones.
pub(crate) const ANY_IDENTITY_FACTOR: u32 = 4;
/// The delay of the first failure past the free ones; it doubles with each further one.
pub const FIRST_DELAY: Duration = Duration::from_millis(50);
/// The longest a failure is held (long enough to slow a guesser, short of a client's timeout).
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(3200);
/// (address, identity) pairs tracked at most; beyond, expired ones are dropped, and if none has
/// expired the failure is held for the longest delay.
const MAX_TRACKED: usize = 4096;

/// How long to hold each failure: a pure function of the failures seen and the clock passed in.
#[derive(Debug)]
pub(crate) struct FailureThrottle {
    counts: WindowCounts<Key>,
}

impl Default for FailureThrottle {
    fn default() -> Self {
        Self {
            counts: WindowCounts::new(WINDOW, MAX_TRACKED),
        }
    }
}

/// A client address and a presented identity, or the address under any identity (`None`).
type Key = (Option<IpAddr>, Option<String>);

impl FailureThrottle {
    /// Counts a failure of `identity` from `from` and says how long to hold its answer: the longer
    /// of what that identity's failures from the address call for and what the address's failures
    /// under any identity call for (so inventing names does not buy fresh free failures).
    pub(crate) fn failed(
        &mut self,
        from: Option<IpAddr>,
        identity: &str,
        now: Instant,
    ) -> Duration {
        let one = self.counts.count((from, Some(identity.to_string())), now);
        let all = self.counts.count((from, None), now);
        hold(one.map(|c| c.nth), FREE_FAILURES).max(hold(
            all.map(|c| c.nth),
            FREE_FAILURES * ANY_IDENTITY_FACTOR,
        ))
    }
}

/// The hold of the `failures`-th failure in a window with `free` answered at once; untracked
/// (`None`, the table full) is held longest.
fn hold(failures: Option<u64>, free: u32) -> Duration {
    let Some(failures) = failures else {
        return MAX_DELAY;
    };
    match failures.checked_sub(u64::from(free) + 1) {
        None => Duration::ZERO,
        Some(past) => FIRST_DELAY
            .saturating_mul(1u32 << past.min(16))
            .min(MAX_DELAY),
    }
}

/// Who a call claims to be, for throttling: the worker name of a `Worker NAME:MAC` credential, else
/// one shared identity for anything presented as the token (or nothing).
fn presented_identity(headers: &http::HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Worker "))
        .and_then(|c| c.split_once(':'))
        .map_or_else(
            || "token".to_string(),
            |(name, _)| format!("worker {}", name.chars().take(64).collect::<String>()),
        )
}

fn remote_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

/// A gRPC service whose `Unauthenticated` answers are held by a shared [`FailureThrottle`]; every
/// other answer passes untouched.
#[derive(Clone)]
pub struct Throttled<S> {
    inner: S,
    throttle: Arc<Mutex<FailureThrottle>>,
}

impl<S> Throttled<S> {
    /// Wraps `inner` (an authenticated service) with a throttle of its own.
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            throttle: Arc::default(),
        }
    }
}

impl<S: NamedService> NamedService for Throttled<S> {
    const NAME: &'static str = S::NAME;
}

/// gRPC's code for `Unauthenticated`, as a trailers-only answer carries it in its headers.
const UNAUTHENTICATED: &str = "16";

impl<S, B, R> Service<http::Request<B>> for Throttled<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let from = remote_ip(&request);
        let identity = presented_identity(request.headers());
        let throttle = self.throttle.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let refused = response
                .headers()
                .get("grpc-status")
                .is_some_and(|s| s.as_bytes() == UNAUTHENTICATED.as_bytes());
            if refused {
                let hold = throttle.lock().unwrap_or_else(|e| e.into_inner()).failed(
                    from,
                    &identity,
                    Instant::now(),
                );
                if !hold.is_zero() {
                    tokio::time::sleep(hold).await;
                }
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_free_ones_are_held_longer_and_longer_per_address_and_identity() {
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut t = FailureThrottle::default();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.failed(Some(a), "token", t0), Duration::ZERO);
        }
        assert_eq!(t.failed(Some(a), "token", t0), FIRST_DELAY);
        assert_eq!(t.failed(Some(a), "token", t0), FIRST_DELAY * 2);
        assert_eq!(t.failed(Some(a), "token", t0), FIRST_DELAY * 4);
        // Another identity from the same address starts free (within the address's budget).
        assert_eq!(t.failed(Some(a), "worker w1", t0), Duration::ZERO);
        for _ in 0..40 {
            assert!(t.failed(Some(a), "token", t0) <= MAX_DELAY);
        }
        assert_eq!(t.failed(Some(a), "token", t0), MAX_DELAY);
        // Another address starts free.
        assert_eq!(t.failed(Some(b), "token", t0), Duration::ZERO);
        // Inventing names from one address runs into the address's own budget.
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let held = (0..FREE_FAILURES * ANY_IDENTITY_FACTOR + 1)
            .map(|i| t.failed(Some(c), &format!("worker n{i}"), t0))
            .collect::<Vec<_>>();
        assert!(held[..held.len() - 1].iter().all(Duration::is_zero));
        assert_eq!(held.last(), Some(&FIRST_DELAY));
        // A new window starts free again.
        assert_eq!(t.failed(Some(a), "token", t0 + WINDOW), Duration::ZERO);
    }

    #[test]
    fn tracking_stays_bounded() {
        let t0 = Instant::now();
        let mut t = FailureThrottle::default();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a02_0000 + i));
            t.failed(Some(ip), "token", t0);
        }
        assert!(t.counts.keys() <= MAX_TRACKED);
        t.failed(None, "token", t0 + WINDOW);
        assert!(t.counts.keys() <= MAX_TRACKED);
    }

    #[test]
    fn the_presented_identity_is_the_credential_name_or_the_token() {
        let mut h = http::HeaderMap::new();
        assert_eq!(presented_identity(&h), "token");
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(presented_identity(&h), "token");
        h.insert("authorization", "Worker w1:abc".parse().unwrap());
        assert_eq!(presented_identity(&h), "worker w1");
    }
}
