//! Work a ring does before a step besides training: pages of validation texts or of `train.mine`
//! texts handed out to its members, their embeddings taken back, and, once a round is whole, the
//! coordinator's scoring or mining started.
use std::ops::Range;
use std::time::Instant;

use tonic::Status;

use super::callers::{Caller, check_member};
use super::evaluation::{self, Round};
use super::phase::Work;
use super::{Coordinator, Shared, State};
use crate::pb::*;

/// What the work due before a step asks of a member.
pub(super) enum Before {
    /// Embed this range of the texts.
    Embed(Work, Range<usize>),
    /// Wait: the other members' pages, or the coordinator's scoring or mining, are still to come.
    Wait(Work),
}

impl Coordinator {
    /// The work for `rank` before step `step`, if any is due: the mining first, then validation.
    pub(super) fn work_before(
        &self,
        st: &mut State,
        rank: usize,
        generation: u64,
        step: u64,
    ) -> Option<Before> {
        self.mine_work(st, rank, generation, step)
            .or_else(|| self.eval_work(st, rank, generation, step))
    }

    /// Validation work for `rank` before step `step`, when an evaluation is due there and not yet
    /// scored.
    fn eval_work(&self, st: &mut State, rank: usize, generation: u64, step: u64) -> Option<Before> {
        let set = self.eval_set.as_ref()?;
        let last = st.tracker.as_ref().and_then(|t| t.last);
        if last.is_some_and(|l| l >= step) || !self.policy.eval_due(step, st.end) {
            return None;
        }
        let texts = set.queries.len() + set.corpus.len();
        let page = evaluation::page_size(texts, st.ring.len());
        st.phase.work_began(Work::Evaluating);
        let round = match &mut st.eval {
            Some(r) if r.step == step => r,
            slot => slot.insert(Round::new(step, texts, page)),
        };
        Some(hand_out(
            round,
            &mut st.step_started,
            rank,
            generation,
            Work::Evaluating,
        ))
    }

    /// The `train.mine` work for `rank` before step `step`: the first mining (before step 0) or
    /// a re-mining (before an epoch `train.remine_every_epochs` names), while the ring embeds.
    fn mine_work(&self, st: &mut State, rank: usize, generation: u64, step: u64) -> Option<Before> {
        let job = self.mine_job.as_ref()?;
        let due = if st.mine_pending {
            step == 0
        } else {
            self.data().training.remine_due(&self.cfg, step).is_some()
        };
        if !due {
            return None;
        }
        let texts = job.texts(st.mine_pending).len();
        let page = evaluation::page_size(texts, st.ring.len());
        if st.mine_round.as_ref().is_none_or(|r| r.step != step) {
            st.mine_round = Some(Round::new(step, texts, page));
            st.mine_started = Some(Instant::now());
        }
        st.phase.work_began(Work::Mining);
        let round = st.mine_round.as_mut()?;
        Some(hand_out(
            round,
            &mut st.step_started,
            rank,
            generation,
            Work::Mining,
        ))
    }

    /// Whether the wait of `Before::Wait(work)` before `step` is over in `generation`: a page
    /// came open again, the work is done, or the generation ended.
    pub(super) fn work_waited(st: &State, work: Work, step: u64, generation: u64) -> bool {
        let done = match work {
            Work::Mining => st
                .mine_round
                .as_ref()
                .is_none_or(|r| r.step != step || r.has_open(generation)),
            Work::Evaluating => {
                st.eval.as_ref().is_some_and(|r| r.has_open(generation))
                    || st.tracker.as_ref().and_then(|t| t.last) >= Some(step)
            }
        };
        st.ended(generation) || done
    }

    /// The page of texts in `range` for `work` before `step` (the `train.mine` texts of the first
    /// mining while it is pending).
    pub(super) fn page(&self, st: &State, work: Work, range: Range<usize>) -> Page {
        let offset = range.start as u64;
        match work {
            Work::Mining => {
                let texts = self
                    .mine_job
                    .as_ref()
                    .map_or(&[][..], |j| j.texts(st.mine_pending));
                Page {
                    offset,
                    texts: texts[range].to_vec(),
                    mine: true,
                }
            }
            Work::Evaluating => {
                let set = self
                    .eval_set
                    .as_ref()
                    .expect("pages exist only with an eval set");
                let nq = set.queries.len();
                let text = |i: usize| {
                    if i < nq {
                        set.queries[i].clone()
                    } else {
                        set.corpus[i - nq].clone()
                    }
                };
                Page {
                    offset,
                    texts: range.map(text).collect(),
                    mine: false,
                }
            }
        }
    }

    /// Takes a member's page of embeddings back (`values`, decoded from `req`); once its round
    /// is whole, starts the scoring or the mining off the async threads.
    pub(super) fn deliver_page(
        self: &Shared,
        caller: &Caller,
        req: &EvalReport,
        values: Vec<f32>,
    ) -> Result<(), Status> {
        let complete = {
            let mut st = self.lock();
            if st.ended(req.generation) {
                // The page goes out again in the next generation; this worker learns to re-join.
                return Ok(());
            }
            let rank = check_member(&st, req.generation, req.rank, caller)?;
            let round = if req.mine {
                st.mine_round.as_mut()
            } else {
                st.eval.as_mut()
            };
            let round = round.filter(|r| r.step == req.step).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no {} is open before step {}",
                    if req.mine { "mining" } else { "validation" },
                    req.step + 1
                ))
            })?;
            round
                .deliver(
                    rank,
                    req.generation,
                    req.offset,
                    req.count as usize,
                    req.dim as usize,
                    values,
                )
                .map_err(Status::invalid_argument)?;
            let all = round.take();
            if all.is_some() {
                // Scoring or mining is the coordinator's work, not a stalled worker's.
                st.step_started = None;
            }
            let started = st.mine_started.unwrap_or_else(Instant::now);
            all.map(|(values, dim)| (values, dim, started))
        };
        if let Some((values, dim, started)) = complete {
            if req.mine {
                tokio::spawn(self.clone().finish_mining(req.step, values, dim, started));
            } else {
                tokio::spawn(self.clone().score(req.step, values, dim));
            }
        }
        self.notify();
        Ok(())
    }
}

/// Hands `rank` the next open page of `round` for `work`, or asks it to wait. The step clock
/// covers embedding too: a worker stuck on a page ends its ring.
fn hand_out(
    round: &mut Round,
    step_started: &mut Option<Instant>,
    rank: usize,
    generation: u64,
    work: Work,
) -> Before {
    match round.assign(rank, generation) {
        Some(range) => {
            step_started.get_or_insert_with(Instant::now);
            Before::Embed(work, range)
        }
        None => Before::Wait(work),
    }
}
