//! Events counted per key over fixed windows, in a table of bounded size: what the refusal log
//! (one line per window) and the failure throttle (later answers past the free failures) both
//! keep. A pure record of the events and the clock passed in.
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Window {
    since: Instant,
    count: u64,
}

/// Where an event falls in its key's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counted {
    /// Its place in the window (1: the event that opened it).
    pub nth: u64,
    /// The events of the key's window before, when this event opened a new one (else 0).
    pub before: u64,
}

/// Counts per key over windows of `span`, at most `max_keys` keys; a new key finding the table
/// full of live windows is not counted.
#[derive(Debug)]
pub(crate) struct WindowCounts<K> {
    by_key: HashMap<K, Window>,
    span: Duration,
    max_keys: usize,
}

impl<K: Hash + Eq> WindowCounts<K> {
    /// An empty table of windows of `span` for at most `max_keys` keys.
    pub(crate) fn new(span: Duration, max_keys: usize) -> Self {
        Self {
            by_key: HashMap::new(),
            span,
            max_keys,
        }
    }

    /// Counts an event of `key` at `now`; `None` when the table is full of live windows.
    pub(crate) fn count(&mut self, key: K, now: Instant) -> Option<Counted> {
        if self.by_key.len() >= self.max_keys && !self.by_key.contains_key(&key) {
            let span = self.span;
            self.by_key
                .retain(|_, w| now.duration_since(w.since) < span);
            if self.by_key.len() >= self.max_keys {
                return None;
            }
        }
        let opened = Window {
            since: now,
            count: 1,
        };
        Some(match self.by_key.entry(key) {
            Entry::Occupied(mut e) if now.duration_since(e.get().since) < self.span => {
                let w = e.get_mut();
                w.count += 1;
                Counted {
                    nth: w.count,
                    before: 0,
                }
            }
            Entry::Occupied(mut e) => Counted {
                nth: 1,
                before: std::mem::replace(e.get_mut(), opened).count,
            },
            Entry::Vacant(e) => {
                e.insert(opened);
                Counted { nth: 1, before: 0 }
            }
        })
    }

    /// Keys tracked now.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_count_per_key_and_window_within_a_bounded_table() {
        let t0 = Instant::now();
        let span = Duration::from_secs(60);
        let mut w = WindowCounts::new(span, 2);
        assert_eq!(w.count("a", t0), Some(Counted { nth: 1, before: 0 }));
        assert_eq!(w.count("a", t0), Some(Counted { nth: 2, before: 0 }));
        assert_eq!(w.count("b", t0), Some(Counted { nth: 1, before: 0 }));
        assert_eq!(w.count("c", t0), None, "the table is full of live windows");
        assert_eq!(
            w.count("a", t0 + span),
            Some(Counted { nth: 1, before: 2 }),
            "a new window says how many the one before had"
        );
        // "b" has expired: it makes room for "c".
        assert_eq!(w.count("c", t0 + span), Some(Counted { nth: 1, before: 0 }));
        assert_eq!(w.keys(), 2);
    }
}
