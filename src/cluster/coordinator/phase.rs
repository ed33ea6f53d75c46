//! What the run is doing, as one value: the coordinator's phase and its transitions. Each
//! transition is a pure function of the phase, the event and the clock passed in (docs/design.md
//! §9), unit-tested here without a network; the coordinator applies them under its lock and does
//! the I/O they imply (logs, metrics, replies).
//!
//! ```text
//!            formed              pages handed out          scored / mined
//! Forming ─────────▶ Stepping ───────────────────▶ Evaluating, Mining ──▶ Stepping
//!    ▲                  │ ring ends (also from Evaluating, Mining)
//!    └──────────────────┘
//! any live phase or Forming ── stop ──▶ Stopping ── checkpointed / grace over ──▶ Done(Stopped)
//! a live phase ── model uploaded ──▶ Done(Finished);  anything not over ── fault ──▶ Aborted
//! ```
//!
//! The work rounds (validation and mining pages) are not part of the phase: they outlive a ring
//! that breaks up mid-round, and the next ring takes up their open pages.
use std::time::{Duration, Instant};

/// The run's phase.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Phase {
    /// No live ring: workers wait in `Join` for the next generation (since `since`).
    Forming { since: Instant },
    /// The live ring trains.
    Stepping,
    /// The live ring embeds validation pages before a step; the coordinator then scores them.
    Evaluating,
    /// The live ring embeds `train.mine` pages; the coordinator then mines from them.
    Mining,
    /// A graceful stop: the open step finishes, rank 0 checkpoints, every member is told.
    Stopping(Stopping),
    /// Over, with the model saved or a checkpoint to resume from.
    Done(Ending),
    /// Failed for good.
    Aborted(String),
}

/// A stop in progress.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Stopping {
    /// `train.stop_after_steps` asked for it, not a signal.
    pub(super) as_asked: bool,
    /// Ranks of the live ring told to stop.
    told: Vec<bool>,
    /// While no ring is live: since when the stop waits for one (the later of the stop and the
    /// ring's end).
    waiting_since: Option<Instant>,
}

/// How a run that is over ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Ending {
    /// Every step ran and the final model is saved.
    Finished,
    /// Stopped early (`as_asked`: by `train.stop_after_steps`).
    Stopped { as_asked: bool },
}

/// How a requested stop ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum StopEnd {
    /// The committed state is in the newest checkpoint.
    Checkpointed,
    /// No ring formed to write it: the steps since the newest checkpoint are lost.
    Lost,
}

/// Work a live ring does before a step, besides training it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Work {
    Evaluating,
    Mining,
}

impl Phase {
    /// The phase a coordinator starts in: waiting for its first ring.
    pub(super) fn start(now: Instant) -> Self {
        Phase::Forming { since: now }
    }

    /// Whether a ring is live and working (not forming, not over).
    fn live(&self) -> bool {
        matches!(
            self,
            Phase::Stepping
                | Phase::Evaluating
                | Phase::Mining
                | Phase::Stopping(Stopping {
                    waiting_since: None,
                    ..
                })
        )
    }

    /// Whether no ring is live while the run goes on: the next generation forms.
    pub(super) fn forming(&self) -> bool {
        matches!(
            self,
            Phase::Forming { .. }
                | Phase::Stopping(Stopping {
                    waiting_since: Some(_),
                    ..
                })
        )
    }

    /// Whether the run is over (done or aborted).
    pub(super) fn over(&self) -> bool {
        matches!(self, Phase::Done(_) | Phase::Aborted(_))
    }

    /// Why the run aborted, if it did.
    pub(super) fn aborted(&self) -> Option<&str> {
        match self {
            Phase::Aborted(reason) => Some(reason),
            _ => None,
        }
    }

    /// Whether a stop was asked for (in progress or done): no new work starts.
    pub(super) fn stop_asked(&self) -> bool {
        matches!(
            self,
            Phase::Stopping(_) | Phase::Done(Ending::Stopped { .. })
        )
    }

    /// Whether a worker may still join: the run goes on, or a stop waits for a ring to write its
    /// checkpoint.
    pub(super) fn admits_joins(&self) -> bool {
        match self {
            Phase::Forming { .. } | Phase::Stepping | Phase::Evaluating | Phase::Mining => true,
            Phase::Stopping(s) => s.waiting_since.is_some(),
            Phase::Done(_) | Phase::Aborted(_) => false,
        }
    }

    /// The phase in one word, for `Status`.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Phase::Forming { .. } => "forming",
            Phase::Stepping => "training",
            Phase::Evaluating => "evaluating",
            Phase::Mining => "mining",
            Phase::Stopping(_) => "stopping",
            Phase::Done(_) => "finished",
            Phase::Aborted(_) => "aborted",
        }
    }

    /// Since when the ring forms (`None` while one is live or the run is over).
    pub(super) fn forming_since(&self) -> Option<Instant> {
        match self {
            Phase::Forming { since } => Some(*since),
            Phase::Stopping(s) => s.waiting_since,
            _ => None,
        }
    }

    /// A ring of `members` formed. A stop in progress now waits for each of them to be told.
    pub(super) fn ring_formed(&mut self, members: usize) {
        match self {
            Phase::Forming { .. } => *self = Phase::Stepping,
            Phase::Stopping(s) if s.waiting_since.is_some() => {
                s.waiting_since = None;
                s.told = vec![false; members];
            }
            _ => {}
        }
    }

    /// The live ring broke up at `now`; whether it was live (a ring that forms ends no generation).
    pub(super) fn ring_ended(&mut self, now: Instant) -> bool {
        if !self.live() {
            return false;
        }
        match self {
            Phase::Stopping(s) => s.waiting_since = Some(now),
            _ => *self = Phase::Forming { since: now },
        }
        true
    }

    /// The live ring is handed `work` before its step; a stop skips such work.
    pub(super) fn work_began(&mut self, work: Work) {
        if matches!(self, Phase::Stepping | Phase::Evaluating | Phase::Mining) {
            *self = match work {
                Work::Evaluating => Phase::Evaluating,
                Work::Mining => Phase::Mining,
            };
        }
    }

    /// The scores or the mined data are in: the live ring trains again.
    pub(super) fn work_done(&mut self) {
        if matches!(self, Phase::Evaluating | Phase::Mining) {
            *self = Phase::Stepping;
        }
    }

    /// A stop is asked for at `now` (`as_asked`: by `train.stop_after_steps`), with `members` in
    /// the live ring; whether this started one (a stop is asked once, and not of a run that is over).
    pub(super) fn stop(&mut self, now: Instant, as_asked: bool, members: usize) -> bool {
        let waiting_since = match self {
            Phase::Forming { .. } => Some(now),
            Phase::Stepping | Phase::Evaluating | Phase::Mining => None,
            Phase::Stopping(_) | Phase::Done(_) | Phase::Aborted(_) => return false,
        };
        *self = Phase::Stopping(Stopping {
            as_asked,
            told: vec![false; if waiting_since.is_some() { 0 } else { members }],
            waiting_since,
        });
        true
    }

    /// `rank` of the live ring was told to stop.
    pub(super) fn told(&mut self, rank: usize) {
        if let Phase::Stopping(s) = self
            && let Some(t) = s.told.get_mut(rank)
        {
            *t = true;
        }
    }

    /// Ends a stop once it is complete (`stop_end`), given whether the committed state is
    /// checkpointed; how it ended, when it did.
    pub(super) fn settle(
        &mut self,
        checkpointed: bool,
        now: Instant,
        grace: Duration,
    ) -> Option<StopEnd> {
        let Phase::Stopping(s) = self else {
            return None;
        };
        let end = stop_end(
            s.waiting_since.map(|t| now.saturating_duration_since(t)),
            s.told.iter().all(|t| *t),
            checkpointed,
            grace,
        )?;
        *self = Phase::Done(Ending::Stopped {
            as_asked: s.as_asked,
        });
        Some(end)
    }

    /// The final model is saved: the run is over.
    pub(super) fn finished(&mut self) {
        if !self.over() {
            *self = Phase::Done(Ending::Finished);
        }
    }

    /// The run fails for good with `reason`; whether this aborted it (a run over stays as it ended).
    pub(super) fn abort(&mut self, reason: String) -> bool {
        if self.over() {
            return false;
        }
        *self = Phase::Aborted(reason);
        true
    }
}

/// Whether a requested stop is over (docs/design.md §9): once every member of the live ring was
/// told and the committed state is checkpointed. While a ring forms (`waiting`: for how long),
/// the stop waits for it (its rank 0 writes the checkpoint), unless that state is checkpointed
/// already, or `grace` passed without a ring forming.
fn stop_end(
    waiting: Option<Duration>,
    told_all: bool,
    checkpointed: bool,
    grace: Duration,
) -> Option<StopEnd> {
    match waiting {
        _ if checkpointed && (waiting.is_some() || told_all) => Some(StopEnd::Checkpointed),
        Some(waited) if waited >= grace => Some(StopEnd::Lost),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(3);

    fn t0() -> Instant {
        Instant::now()
    }

    /// The phase's name after each event, from `from`.
    fn names(mut phase: Phase, events: &[&dyn Fn(&mut Phase)]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| {
                e(&mut phase);
                phase.name()
            })
            .collect()
    }

    #[test]
    fn a_run_forms_trains_evaluates_mines_breaks_and_finishes() {
        let t = t0();
        let got = names(
            Phase::start(t),
            &[
                &|p| p.ring_formed(2),
                &|p| p.work_began(Work::Mining),
                &|p| assert!(p.ring_ended(t)),
                &|p| p.ring_formed(2),
                // The round outlives the ring: the next one takes it up.
                &|p| p.work_began(Work::Mining),
                &|p| p.work_done(),
                &|p| p.work_began(Work::Evaluating),
                &|p| p.work_done(),
                &|p| p.finished(),
            ],
        );
        assert_eq!(
            got,
            [
                "training",
                "mining",
                "forming",
                "training",
                "mining",
                "training",
                "evaluating",
                "training",
                "finished"
            ]
        );
    }

    #[test]
    fn a_ring_that_forms_ends_no_generation() {
        let mut p = Phase::start(t0());
        assert!(!p.ring_ended(t0()));
        assert!(p.forming() && !p.over() && p.admits_joins());
        p.ring_formed(3);
        assert!(!p.forming() && p.ring_ended(t0()) && p.forming());
    }

    #[test]
    fn every_transition_from_every_phase() {
        let t = t0();
        let stopping_live = || {
            let mut p = Phase::Stepping;
            p.stop(t, false, 2);
            p
        };
        let stopping_forming = || {
            let mut p = Phase::start(t);
            p.stop(t, false, 0);
            p
        };
        let phases = [
            ("forming", Phase::start(t)),
            ("training", Phase::Stepping),
            ("evaluating", Phase::Evaluating),
            ("mining", Phase::Mining),
            ("stopping (live ring)", stopping_live()),
            ("stopping (ring forming)", stopping_forming()),
            ("finished", Phase::Done(Ending::Finished)),
            ("aborted", Phase::Aborted("x".into())),
        ];
        type Event = (&'static str, fn(&mut Phase, Instant));
        let events: [Event; 7] = [
            ("formed", |p, _| p.ring_formed(2)),
            ("ended", |p, t| {
                p.ring_ended(t);
            }),
            ("eval", |p, _| p.work_began(Work::Evaluating)),
            ("done", |p, _| p.work_done()),
            ("stop", |p, t| {
                p.stop(t, true, 2);
            }),
            ("saved", |p, _| p.finished()),
            ("abort", |p, _| {
                p.abort("fault".into());
            }),
        ];
        // The phase each event leads to, for each phase in the order above.
        let want: [[&str; 7]; 8] = [
            [
                "training", "forming", "forming", "forming", "stopping", "finished", "aborted",
            ],
            [
                "training",
                "forming",
                "evaluating",
                "training",
                "stopping",
                "finished",
                "aborted",
            ],
            [
                "evaluating",
                "forming",
                "evaluating",
                "training",
                "stopping",
                "finished",
                "aborted",
            ],
            [
                "mining",
                "forming",
                "evaluating",
                "training",
                "stopping",
                "finished",
                "aborted",
            ],
            [
                "stopping", "stopping", "stopping", "stopping", "stopping", "finished", "aborted",
            ],
            [
                "stopping", "stopping", "stopping", "stopping", "stopping", "finished", "aborted",
            ],
            [
                "finished", "finished", "finished", "finished", "finished", "finished", "finished",
            ],
            [
                "aborted", "aborted", "aborted", "aborted", "aborted", "aborted", "aborted",
            ],
        ];
        for ((name, phase), want) in phases.iter().zip(want) {
            for ((event, apply), want) in events.iter().zip(want) {
                let mut p = phase.clone();
                apply(&mut p, t);
                assert_eq!(p.name(), want, "{event} in {name}");
            }
        }
    }

    #[test]
    fn a_stop_is_asked_once_and_remembers_who_asked() {
        let mut p = Phase::Stepping;
        assert!(p.stop(t0(), true, 1));
        assert!(!p.stop(t0(), false, 1));
        p.told(0);
        assert_eq!(p.settle(true, t0(), GRACE), Some(StopEnd::Checkpointed));
        assert_eq!(p, Phase::Done(Ending::Stopped { as_asked: true }));
        assert!(p.stop_asked() && !p.admits_joins() && !p.stop(t0(), false, 1));
    }

    #[test]
    fn a_stop_on_a_live_ring_waits_for_every_member_and_the_checkpoint() {
        let t = t0();
        let mut p = Phase::Stepping;
        p.stop(t, false, 2);
        assert!(!p.admits_joins(), "a live ring finishes the stop itself");
        assert_eq!(p.settle(true, t, GRACE), None, "rank 1 not told");
        p.told(0);
        p.told(1);
        // However long it takes: the step timeout, not the stop, ends a stalled ring.
        assert_eq!(p.settle(false, t + GRACE * 10, GRACE), None);
        assert_eq!(p.settle(true, t, GRACE), Some(StopEnd::Checkpointed));
    }

    // The race already found: a stop while the ring re-forms waits for the next ring (whose rank
    // 0 writes the checkpoint) within the grace, and that ring's members must all be told.
    #[test]
    fn a_stop_while_the_ring_forms_waits_for_the_ring_within_the_grace() {
        let t = t0();
        let mut p = Phase::Stepping;
        p.ring_ended(t);
        p.stop(t + GRACE / 2, false, 0);
        assert!(p.forming() && p.admits_joins());
        // Steps since the newest checkpoint: wait for a ring to write them.
        assert_eq!(p.settle(false, t + GRACE, GRACE), None);
        // The grace counts from the stop, not from the ring's end.
        let mut lost = p.clone();
        assert_eq!(
            lost.settle(false, t + GRACE / 2 + GRACE, GRACE),
            Some(StopEnd::Lost)
        );
        // Nothing to lose: end at once.
        let mut clean = p.clone();
        assert_eq!(
            clean.settle(true, t + GRACE, GRACE),
            Some(StopEnd::Checkpointed)
        );
        // A ring forms: its two members are told before the stop ends.
        p.ring_formed(2);
        assert!(!p.forming() && !p.admits_joins());
        p.told(0);
        assert_eq!(p.settle(true, t + GRACE, GRACE), None);
        p.told(1);
        assert_eq!(
            p.settle(true, t + GRACE, GRACE),
            Some(StopEnd::Checkpointed)
        );
        assert_eq!(p, Phase::Done(Ending::Stopped { as_asked: false }));
    }

    #[test]
    fn a_stopping_ring_that_breaks_waits_again_from_its_end() {
        let t = t0();
        let mut p = Phase::Stepping;
        p.stop(t, false, 2);
        assert!(p.ring_ended(t + GRACE));
        assert_eq!(p.forming_since(), Some(t + GRACE));
        assert_eq!(p.settle(false, t + GRACE * 3 / 2, GRACE), None);
        assert_eq!(p.settle(false, t + GRACE * 2, GRACE), Some(StopEnd::Lost));
    }

    #[test]
    fn an_aborted_or_finished_run_stays_as_it_ended() {
        let mut p = Phase::Done(Ending::Finished);
        assert!(!p.abort("late".into()));
        assert_eq!(p, Phase::Done(Ending::Finished));
        let mut p = Phase::Aborted("first".into());
        assert!(!p.abort("second".into()));
        p.finished();
        assert_eq!(p.aborted(), Some("first"));
    }
}
