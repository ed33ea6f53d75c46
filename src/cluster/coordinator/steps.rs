//! `NextStep`: what a member does next. Once the step before is committed, and any work due
//! before the step (validation, mining pages) is done, the answer is a pure decision
//! (`step_answer`) over facts read under the lock: a shard to train, the end, a stop, or re-join.
use std::time::Instant;

use tonic::Status;

use super::callers::{Caller, check_member};
use super::pages::Before;
use super::{Coordinator, State};
use crate::loss::Targets;
use crate::pb::next_step_response::Answer;
use crate::pb::*;
use crate::train::policy::RunPolicy;

/// The reply to `NextStep` for `step`.
fn reply(step: u64, answer: Answer) -> NextStepResponse {
    NextStepResponse {
        step,
        answer: Some(answer),
    }
}

impl Coordinator {
    /// Answers `NextStep` for a member of the live ring: waits for the step before to commit,
    /// hands out the pages due before the step, lets rank 0 checkpoint a stop first, then
    /// answers.
    pub(super) async fn next_step(
        &self,
        caller: &Caller,
        req: &NextStepRequest,
    ) -> Result<NextStepResponse, Status> {
        // Membership first: a caller that is not this rank waits for nothing.
        {
            let st = self.lock();
            if !st.ended(req.generation) {
                check_member(&st, req.generation, req.rank, caller)?;
            }
        }
        let committed = match self.await_committed(req).await? {
            Ok(committed) => committed,
            Err(answer) => return Ok(reply(req.step, answer)),
        };
        if let Some(page) = self.pages_before(caller, req, committed).await? {
            return Ok(reply(req.step, Answer::Page(page)));
        }
        self.await_stop_checkpoint(caller, req, committed).await?;
        let answer = self.answer(caller, req, committed)?;
        Ok(reply(req.step, answer))
    }

    /// Waits until the step before `req.step` is committed: the steps committed then, or the
    /// answer when the caller's generation ended or the run aborted first.
    async fn await_committed(&self, req: &NextStepRequest) -> Result<Result<u64, Answer>, Status> {
        let next = self
            .wait_for(
                self.step_timeout(),
                "the previous step to be committed",
                |st| {
                    if st.ended(req.generation) {
                        let why = format!("generation {} ended", req.generation);
                        Some(Err(Answer::Rejoin(why)))
                    } else {
                        (st.committed >= req.step).then_some(Ok(st.committed))
                    }
                },
            )
            .await;
        match next {
            Ok(next) => Ok(next),
            Err(status) if status.code() == tonic::Code::Aborted => {
                Ok(Err(Answer::Aborted(status.message().into())))
            }
            Err(status) => Err(status),
        }
    }

    /// The work due before the step comes first: a page for the caller to embed, after waiting
    /// while the others' pages or the coordinator's scoring or mining are still to come; `None`
    /// once nothing (more) is due.
    async fn pages_before(
        &self,
        caller: &Caller,
        req: &NextStepRequest,
        committed: u64,
    ) -> Result<Option<Page>, Status> {
        loop {
            let work = {
                let mut st = self.lock();
                if st.ended(req.generation) {
                    return Ok(None);
                }
                let rank = check_member(&st, req.generation, req.rank, caller)?;
                // A stop skips validation (a resumed run makes it up); a wrong step is answered later.
                if (st.phase.stop_asked() && req.step < st.end) || committed != req.step {
                    return Ok(None);
                }
                match self.work_before(&mut st, rank, req.generation, req.step) {
                    None => return Ok(None),
                    Some(Before::Embed(work, range)) => {
                        return Ok(Some(self.page(&st, work, range)));
                    }
                    Some(Before::Wait(work)) => work,
                }
            };
            let what = match work {
                super::phase::Work::Mining => "the hard-negative mining to finish",
                super::phase::Work::Evaluating => "the validation to finish",
            };
            let (step, generation) = (req.step, req.generation);
            self.wait_for(self.step_timeout(), what, |st| {
                Self::work_waited(st, work, step, generation).then_some(())
            })
            .await?;
        }
    }

    /// Rank 0 checkpoints a stop before the others are told: a member told to stop leaves, and a
    /// rank 0 of a new ring still connecting to it would fail. The other ranks wait here.
    async fn await_stop_checkpoint(
        &self,
        caller: &Caller,
        req: &NextStepRequest,
        committed: u64,
    ) -> Result<(), Status> {
        let wait = {
            let st = self.lock();
            st.phase.stop_asked()
                && !st.shards_out
                && committed == req.step
                && !st.ended(req.generation)
                && !st.latest_is(req.step)
                && !st.mine_pending
                && check_member(&st, req.generation, req.rank, caller).is_ok_and(|rank| rank != 0)
        };
        if wait {
            let (step, generation) = (req.step, req.generation);
            self.wait_for(self.step_timeout(), "rank 0 to checkpoint the stop", |st| {
                (st.latest_is(step) || st.ended(generation) || st.phase.over()).then_some(())
            })
            .await?;
        }
        Ok(())
    }

    /// Decides the answer from the facts under the lock (`step_answer`) and applies it.
    fn answer(
        &self,
        caller: &Caller,
        req: &NextStepRequest,
        committed: u64,
    ) -> Result<Answer, Status> {
        let mut st = self.lock();
        if st.ended(req.generation) {
            return Ok(Answer::Rejoin(format!(
                "generation {} ended",
                req.generation
            )));
        }
        let rank = check_member(&st, req.generation, req.rank, caller)?;
        let facts = StepFacts::of(&st, req.step, committed, rank);
        let decided = step_answer(&facts, &self.policy);
        if decided.checkpoint() {
            st.checkpoint_asked = Some(req.step);
        }
        Ok(match decided {
            StepAnswer::Behind => Answer::Rejoin(format!(
                "asked for step {}, but the run is at step {committed}",
                req.step + 1
            )),
            StepAnswer::Done { checkpoint } => Answer::Done(Finish { checkpoint }),
            StepAnswer::Stop { checkpoint } => {
                st.phase.told(rank);
                self.settle_stop(&mut st);
                drop(st);
                self.notify();
                Answer::Stop(Finish { checkpoint })
            }
            StepAnswer::Grow => {
                self.end_generation(&mut st, "a worker waits to join: growing the ring".into());
                drop(st);
                self.notify();
                Answer::Rejoin("growing the ring".into())
            }
            StepAnswer::Shard { checkpoint } => {
                st.step_started.get_or_insert_with(Instant::now);
                st.shards_out = true;
                let world = st.ring.len();
                drop(st);
                Answer::Shard(self.shard(rank, world, req.step, checkpoint))
            }
        })
    }

    /// `rank`'s shard of the global batch of `step` in a ring of `world`.
    fn shard(&self, rank: usize, world: usize, step: u64, checkpoint: bool) -> Shard {
        let data = self.data();
        let batch = data.training.batch(step);
        let (columns, first_row) = batch.shard(rank, world);
        let rows = (0..columns[0].len())
            .map(|i| ShardRow {
                query: columns[0][i].to_string(),
                positive: columns[1][i].to_string(),
                negatives: columns[2..].iter().map(|c| c[i].to_string()).collect(),
            })
            .collect();
        let targets = match batch.targets {
            Targets::Groups(values) => shard::Targets::Groups(Groups { values }),
            Targets::Scores(values) => shard::Targets::Scores(Scores { values }),
            Targets::Labels(values) => shard::Targets::Labels(Labels { values }),
        };
        Shard {
            first_row: first_row as u64,
            rows,
            task: batch.task as u32,
            targets: Some(targets),
            checkpoint,
        }
    }
}

/// What `NextStep` knows once the step before is committed and any validation is done: the
/// facts its answer depends on, read from the state under its lock.
#[derive(Debug, Clone, Copy)]
struct StepFacts {
    /// The step asked for (steps done before it).
    step: u64,
    /// Steps the run has committed.
    committed: u64,
    /// The step the run ends at.
    end: u64,
    /// The caller's rank in the live ring.
    rank: usize,
    /// The step the live ring started at.
    start: u64,
    /// A stop was asked for.
    stopping: bool,
    /// Some member was already handed this step's shard.
    shards_out: bool,
    /// A worker waits to join: the ring should grow.
    grow: bool,
    /// A checkpoint of this step exists.
    checkpointed: bool,
    /// `train.mine` has not finished: no step ran on the run's data yet.
    mine_pending: bool,
    /// This step is the best evaluation's.
    best_here: bool,
}

impl StepFacts {
    /// The facts for `rank` asking for `step` with `committed` steps committed.
    fn of(st: &State, step: u64, committed: u64, rank: usize) -> Self {
        Self {
            step,
            committed,
            end: st.end,
            rank,
            start: st.formation.as_ref().map_or(0, |f| f.start_step),
            stopping: st.phase.stop_asked(),
            shards_out: st.shards_out,
            grow: st.grow,
            checkpointed: st.latest_is(step),
            mine_pending: st.mine_pending,
            best_here: Coordinator::best_step(st) == Some(step),
        }
    }
}

/// `NextStep`'s answer; `checkpoint` asks rank 0 to checkpoint the state before the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepAnswer {
    /// The caller asked for another step than the run is at.
    Behind,
    /// The run is over.
    Done { checkpoint: bool },
    /// A stop takes effect here.
    Stop { checkpoint: bool },
    /// End the generation so the waiting worker joins.
    Grow,
    /// Train the step: the caller's shard.
    Shard { checkpoint: bool },
}

impl StepAnswer {
    /// Whether rank 0 is asked to checkpoint.
    fn checkpoint(self) -> bool {
        matches!(
            self,
            StepAnswer::Done { checkpoint: true }
                | StepAnswer::Stop { checkpoint: true }
                | StepAnswer::Shard { checkpoint: true }
        )
    }
}

/// The pure decision of `NextStep`. Rank 0 checkpoints the state before a step when one is due
/// (the policy's period, the end of a checkpointed or averaged run, a stop) or the step is the
/// best evaluation's, unless one exists already or no step has run on the run's data yet. A
/// stop takes effect at the first step no member was handed yet, so a step handed out is
/// finished by every member first.
fn step_answer(f: &StepFacts, policy: &RunPolicy) -> StepAnswer {
    let checkpoint =
        |due: bool| f.rank == 0 && (due || f.best_here) && !f.checkpointed && !f.mine_pending;
    if f.committed != f.step {
        StepAnswer::Behind
    } else if f.step >= f.end {
        StepAnswer::Done {
            checkpoint: checkpoint(policy.checkpoint_at_end()),
        }
    } else if f.stopping && !f.shards_out {
        StepAnswer::Stop {
            checkpoint: checkpoint(true),
        }
    } else if f.grow {
        StepAnswer::Grow
    } else {
        StepAnswer::Shard {
            checkpoint: checkpoint(f.step > f.start && policy.checkpoint_due(f.step)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy checkpointing every `every` steps (with a moving average when `ema`).
    fn policy(every: u64, ema: bool) -> RunPolicy {
        let mut text = format!("[output]\ndir = \"out\"\ncheckpoint_every_steps = {every}\n");
        if ema {
            text.push_str("[train]\nema_decay = 0.999\n");
        }
        RunPolicy::new(&toml::from_str(&text).unwrap())
    }

    /// Rank 0 asking for step 4 of a 10-step run on a ring started at step 0, nothing pending.
    fn at(step: u64) -> StepFacts {
        StepFacts {
            step,
            committed: step,
            end: 10,
            rank: 0,
            start: 0,
            stopping: false,
            shards_out: false,
            grow: false,
            checkpointed: false,
            mine_pending: false,
            best_here: false,
        }
    }

    #[test]
    fn next_step_answers_every_case() {
        use StepAnswer::*;
        let p = policy(2, false);
        let table: Vec<(&str, StepFacts, RunPolicy, StepAnswer)> = vec![
            (
                "a step off the period",
                at(3),
                p,
                Shard { checkpoint: false },
            ),
            ("a step on the period", at(4), p, Shard { checkpoint: true }),
            (
                "only rank 0 checkpoints",
                StepFacts { rank: 1, ..at(4) },
                p,
                Shard { checkpoint: false },
            ),
            (
                "not twice",
                StepFacts {
                    checkpointed: true,
                    ..at(4)
                },
                p,
                Shard { checkpoint: false },
            ),
            (
                "not the ring's first step",
                StepFacts { start: 4, ..at(4) },
                p,
                Shard { checkpoint: false },
            ),
            (
                "not before train.mine is done",
                StepFacts {
                    mine_pending: true,
                    ..at(4)
                },
                p,
                Shard { checkpoint: false },
            ),
            (
                "the best evaluation's step",
                StepFacts {
                    best_here: true,
                    ..at(3)
                },
                p,
                Shard { checkpoint: true },
            ),
            (
                "a caller behind the run",
                StepFacts {
                    committed: 5,
                    ..at(4)
                },
                p,
                Behind,
            ),
            (
                "the end of a checkpointed run",
                at(10),
                p,
                Done { checkpoint: true },
            ),
            (
                "the end without checkpoints",
                at(10),
                policy(0, false),
                Done { checkpoint: false },
            ),
            (
                "the end of an averaged run",
                at(10),
                policy(0, true),
                Done { checkpoint: true },
            ),
            (
                "a stop before any shard",
                StepFacts {
                    stopping: true,
                    ..at(3)
                },
                policy(0, false),
                Stop { checkpoint: true },
            ),
            // The race already found: a stop after the step was handed out lets it finish first.
            (
                "a stop after a shard went out",
                StepFacts {
                    stopping: true,
                    shards_out: true,
                    ..at(3)
                },
                p,
                Shard { checkpoint: false },
            ),
            (
                "a stop at the end is the end",
                StepFacts {
                    stopping: true,
                    ..at(10)
                },
                p,
                Done { checkpoint: true },
            ),
            (
                "a joiner waiting",
                StepFacts {
                    grow: true,
                    ..at(3)
                },
                p,
                Grow,
            ),
            (
                "a stop wins over growing",
                StepFacts {
                    grow: true,
                    stopping: true,
                    ..at(3)
                },
                p,
                Stop { checkpoint: true },
            ),
            (
                "a joiner waiting, a shard out",
                StepFacts {
                    grow: true,
                    shards_out: true,
                    ..at(3)
                },
                p,
                Grow,
            ),
        ];
        for (case, facts, policy, want) in table {
            assert_eq!(step_answer(&facts, &policy), want, "{case}");
        }
    }
}
