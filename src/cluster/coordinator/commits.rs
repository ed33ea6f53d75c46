//! `Commit`: phase one and two of a step's commit. A member reports the step once it holds the
//! summed gradients; when every member of the ring reported, the coordinator decides its fate
//! (apply, or skip a non-finite step everywhere, or abort), logs it, and only then answers, so no
//! member applies a step the logs lack.
use std::time::Instant;

use serde_json::json;
use tonic::Status;

use super::callers::{Caller, check_member};
use super::journal::Log;
use super::metrics::StepTimes;
use super::{Coordinator, Shared};
use crate::data::text::{hash_normalized, normalize};
use crate::pb::*;
use crate::train::nonfinite::{Fate, verdict};

/// What one member's report did to its step.
enum Reported {
    /// Not this generation's open step: the member discards it, for this reason.
    Discard(String),
    /// Others are still to report.
    Waiting,
    /// The last report: every member's, when the ring broke up last, and the step's fate.
    Complete(Vec<CommitRequest>, Option<Instant>, Fate),
}

/// The answer that discards a step.
fn discard(reason: String) -> CommitResponse {
    CommitResponse {
        apply: false,
        reason,
        skip: false,
    }
}

impl Coordinator {
    /// Takes a member's report of its step and answers once every member reported and the step
    /// is logged (apply, or skip), or its generation ended first (discard).
    pub(super) async fn commit(
        self: &Shared,
        caller: &Caller,
        req: CommitRequest,
    ) -> Result<CommitResponse, Status> {
        let (step, generation) = (req.step, req.generation);
        match self.report(caller, req)? {
            Reported::Discard(reason) => return Ok(discard(reason)),
            Reported::Waiting => {}
            Reported::Complete(commits, broken_since, fate) => {
                // Its own task: a cancelled call must not leave the step committed but never logged.
                tokio::spawn(
                    self.clone()
                        .log_step(step, generation, commits, broken_since, fate),
                );
            }
        }
        let decided = self
            .wait_for(
                self.step_timeout(),
                "every worker to report the step",
                |st| {
                    if st.logged > step {
                        Some(Some(st.last_skipped == Some(step)))
                    } else {
                        (st.committed <= step && st.ended(generation)).then_some(None)
                    }
                },
            )
            .await?;
        Ok(match decided {
            Some(skip) => CommitResponse {
                apply: !skip,
                reason: String::new(),
                skip,
            },
            None => discard(format!(
                "generation {generation} ended before every worker reported step {}",
                step + 1
            )),
        })
    }

    /// Records a member's report under the lock; with the last one, decides the step's fate and
    /// commits it (an abort ends the run here).
    fn report(&self, caller: &Caller, req: CommitRequest) -> Result<Reported, Status> {
        let (step, generation) = (req.step, req.generation);
        let mut st = self.lock();
        if let Some(reason) = st.phase.aborted() {
            return Err(Status::aborted(reason));
        }
        if st.ended(generation) {
            return Ok(Reported::Discard(format!("generation {generation} ended")));
        }
        let rank = check_member(&st, generation, req.rank, caller)?;
        if step != st.committed {
            return Ok(Reported::Discard(format!(
                "commit for step {}, but step {} is open",
                step + 1,
                st.committed + 1
            )));
        }
        st.commits[rank] = Some(req);
        if !st.commits.iter().all(Option::is_some) {
            return Ok(Reported::Waiting);
        }
        let commits: Vec<CommitRequest> = st.commits.iter_mut().filter_map(Option::take).collect();
        let losses: Vec<f64> = commits.iter().map(|c| c.loss).collect();
        let norms: Vec<f64> = commits.iter().map(|c| c.grad_norm).collect();
        let fate = verdict(
            self.cfg.train.on_nonfinite,
            st.skipped_in_a_row,
            step,
            &losses,
            &norms,
        );
        if let Fate::Abort(reason) = fate {
            Self::abort_locked(&mut st, reason.clone());
            drop(st);
            self.notify();
            return Err(Status::aborted(reason));
        }
        st.committed += 1;
        st.step_started = None;
        st.shards_out = false;
        self.stop_if_budget_spent(&mut st);
        if let Fate::Skip(_) = fate {
            st.skipped_in_a_row += 1;
            st.last_skipped = Some(step);
        } else {
            st.skipped_in_a_row = 0;
        }
        Ok(Reported::Complete(commits, st.broken_since.take(), fate))
    }

    /// Logs a step every worker committed, waits until its records are written, and only then
    /// lets the workers apply it: a coordinator killed now never leaves an applied step unlogged.
    async fn log_step(
        self: Shared,
        step: u64,
        generation: u64,
        commits: Vec<CommitRequest>,
        broken_since: Option<Instant>,
        fate: Fate,
    ) {
        if let Fate::Skip(reason) = &fate {
            tracing::warn!(%reason, "skipping the step on every worker");
            self.write_log(json!({"event": "skip", "step": step + 1, "reason": reason}));
        } else if let Err(e) = self.finish_step(step, commits, generation) {
            return self.abort(e.to_string());
        }
        if let Some(t) = broken_since {
            let seconds = t.elapsed().as_secs_f64();
            tracing::info!(
                seconds = format!("{seconds:.2}"),
                step = step + 1,
                "recovered: first step after the ring broke up"
            );
            self.write_log(json!({"event": "recovered", "step": step + 1, "generation": generation, "seconds": seconds}));
        }
        if let Err(e) = self.journal.flushed().await {
            return self.abort(format!("step {}: {e}", step + 1));
        }
        let mut st = self.lock();
        // A rollback in the meantime (a new ring from an older state) re-runs the step instead.
        if st.committed > step {
            st.logged = st.logged.max(step + 1);
        }
        drop(st);
        self.notify();
    }

    fn finish_step(
        &self,
        step: u64,
        commits: Vec<CommitRequest>,
        generation: u64,
    ) -> crate::Result<()> {
        let loss = commits[0].loss;
        for c in &commits {
            // Every worker computes the same global loss; disagreement means the replicas diverged.
            if (c.loss - loss).abs() > 1e-4 * loss.abs().max(1e-3) {
                return Err(crate::Error::Diverged(format!(
                    "workers disagree on the loss of step {}: {} vs {}",
                    step + 1,
                    c.loss,
                    loss
                )));
            }
        }
        // The slowest rank's time in each phase: the step waits for it.
        let slowest = |f: fn(&CommitRequest) -> f64| commits.iter().map(f).fold(0.0, f64::max);
        let compute = slowest(|c| c.compute_seconds);
        let comm = slowest(|c| c.comm_seconds);
        let gather = slowest(|c| c.gather_seconds);
        let reduce = slowest(|c| c.reduce_seconds);
        let (data_s, sync) = (slowest(|c| c.data_seconds), slowest(|c| c.sync_seconds));
        let seconds = data_s + compute + comm + sync;
        let pairs = self.cfg.train.batch_size;
        let data = self.data();
        let (task, epoch, batch) = data.training.plan.position(step);
        self.write_log(json!({
            "event": "step", "step": step + 1, "epoch": epoch, "task": data.training.tasks()[task].name, "batch": batch, "loss": loss, "lr": commits[0].lr, "grad_norm": commits[0].grad_norm,
            "pairs": pairs, "tokens": commits.iter().map(|c| c.tokens).sum::<u64>(), "seconds": seconds,
            "compute_seconds": compute, "comm_seconds": comm, "gather_seconds": gather, "reduce_seconds": reduce, "pairs_per_s": pairs as f64 / seconds.max(1e-9),
            "data_seconds": data_s, "forward_seconds": slowest(|c| c.forward_seconds), "backward_seconds": slowest(|c| c.backward_seconds),
            "optimizer_seconds": slowest(|c| c.optimizer_seconds), "sync_seconds": sync,
            "workers": commits.len(), "generation": generation, "elapsed": self.started.elapsed().as_secs_f64(),
        }));
        self.record_batch(step, commits.len());
        let interval = self.progress.step(step + 1, loss);
        self.metrics.step(
            step + 1,
            loss,
            commits[0].lr,
            self.progress.snapshot().pairs_per_s,
            StepTimes {
                compute,
                all_gather: gather,
                all_reduce: reduce,
                waiting: interval.map_or(0.0, |d| (d.as_secs_f64() - seconds).max(0.0)),
            },
        );
        Ok(())
    }

    /// Records the global batch of `step`, as hashes of its texts by shard, in `batches.jsonl`.
    fn record_batch(&self, step: u64, world: usize) {
        let data = self.data();
        let batch = data.training.batch(step);
        let hash = |t: &str| format!("{:016x}", hash_normalized(&normalize(t)));
        let shards: Vec<Vec<Vec<String>>> = (0..world)
            .map(|r| {
                let (columns, _) = batch.shard(r, world);
                (0..columns[0].len())
                    .map(|i| columns.iter().map(|c| hash(c[i])).collect())
                    .collect()
            })
            .collect();
        self.journal.write(Log::Batches, json!({"step": step + 1, "epoch": batch.epoch, "task": data.training.tasks()[batch.task].name, "batch": batch.index, "rows": batch.rows, "shards": shards}));
    }
}
