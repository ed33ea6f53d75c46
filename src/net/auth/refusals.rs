//! The refusal log: a storm of refused calls costs one log line per cause and address a minute.
use std::net::IpAddr;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use super::window::WindowCounts;

/// The span over which refusals of one cause from one address share one log line.
pub const LOG_WINDOW: Duration = Duration::from_secs(60);
/// (cause, address) pairs tracked at most; beyond, expired ones are dropped and new ones logged.
const MAX_TRACKED: usize = 4096;

/// Which refusals to log: the first of each (cause, address) in a window, with the count of those
/// left unlogged in the window before. A pure function of the refusals and the clock passed in.
#[derive(Debug)]
pub struct RefusalLog {
    counts: WindowCounts<(&'static str, Option<IpAddr>)>,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self {
            counts: WindowCounts::new(LOG_WINDOW, MAX_TRACKED),
        }
    }
}

impl RefusalLog {
    /// Counts a refusal; `Some(n)` when it is to be logged, `n` being how many of its kind went
    /// unlogged in the window before. One that cannot be tracked (the table is full) is logged.
    pub(crate) fn note(
        &mut self,
        cause: &'static str,
        from: Option<IpAddr>,
        now: Instant,
    ) -> Option<u64> {
        match self.counts.count((cause, from), now) {
            None => Some(0),
            Some(c) if c.nth == 1 => Some(c.before.saturating_sub(1)),
            Some(_) => None,
        }
    }
}

static REFUSALS: LazyLock<Mutex<RefusalLog>> = LazyLock::new(Default::default);

/// Logs a refused call (a wrong secret, a claim the caller cannot prove, a bound passed) once per
/// cause and address a window: a storm of refusals costs one line a minute, not one each.
pub fn log_refusal(cause: &'static str, from: Option<IpAddr>, detail: &str) {
    let due = REFUSALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .note(cause, from, Instant::now());
    if let Some(unlogged) = due {
        let from = from.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        tracing::warn!(%cause, %from, %detail, unlogged_before = unlogged, "refused a call");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_and_address_is_logged_once_a_window_with_the_count_left_unlogged() {
        let t0 = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut log = RefusalLog::default();
        assert_eq!(log.note("wrong cluster token", Some(a), t0), Some(0));
        for i in 1..50 {
            let at = t0 + Duration::from_millis(i);
            assert_eq!(log.note("wrong cluster token", Some(a), at), None);
        }
        assert_eq!(
            log.note("wrong cluster token", Some(b), t0),
            Some(0),
            "another address"
        );
        assert_eq!(
            log.note("not a member", Some(a), t0),
            Some(0),
            "another cause"
        );
        assert_eq!(
            log.note("wrong cluster token", Some(a), t0 + LOG_WINDOW),
            Some(49),
            "the next window's first line says how many went unlogged"
        );
    }

    #[test]
    fn tracking_stays_bounded() {
        let t0 = Instant::now();
        let mut log = RefusalLog::default();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a02_0000 + i));
            assert!(log.note("x", Some(ip), t0).is_some());
        }
        assert!(log.counts.keys() <= MAX_TRACKED);
        log.note("y", None, t0 + LOG_WINDOW);
        assert!(log.counts.keys() <= MAX_TRACKED);
    }
}
