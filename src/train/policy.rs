//! The run policy: when a run evaluates, checkpoints, re-mines and stops, and which models it
//! leaves behind. One pure answer from the config and the step, asked by the single-process run
//! (`train/run.rs`) and by the coordinator alike, so the two cannot drift apart.
use crate::config::RunConfig;

/// What the config says about the run's rhythm, read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunPolicy {
    checkpoint_every: u64,
    eval_every: Option<u64>,
    eval_at_start: bool,
    remine_every_epochs: Option<u64>,
    stop_after_steps: u64,
    keep_best: bool,
    ema: bool,
}

/// The models a finished run writes besides its final checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FinalOutputs {
    /// `model/` is the best evaluated step's model (`eval.keep_best`, when one was saved), not
    /// the last step's.
    pub model_from_best: bool,
    /// `model-ema/` holds the moving average of the weights (`train.ema_decay`).
    pub ema: bool,
}

impl RunPolicy {
    /// The policy of `cfg`.
    pub(crate) fn new(cfg: &RunConfig) -> Self {
        Self {
            checkpoint_every: cfg.output.checkpoint_every_steps,
            eval_every: cfg.eval.as_ref().map(|e| e.every_steps),
            eval_at_start: cfg.eval.as_ref().is_some_and(|e| e.at_start),
            remine_every_epochs: cfg.train.remine_every_epochs,
            stop_after_steps: cfg.train.stop_after_steps,
            keep_best: cfg.eval.as_ref().is_some_and(|e| e.keep_best),
            ema: cfg.train.ema_decay.is_some(),
        }
    }

    /// Whether a periodic checkpoint falls after `step` steps (`output.checkpoint_every_steps`).
    pub(crate) fn checkpoint_due(&self, step: u64) -> bool {
        self.checkpoint_every > 0 && step > 0 && step.is_multiple_of(self.checkpoint_every)
    }

    /// Whether the end of a run gets a checkpoint of its own in a cluster: a checkpointed run
    /// does, and so does a run with a moving average, which reaches `model-ema/` through it.
    pub(crate) fn checkpoint_at_end(&self) -> bool {
        self.checkpoint_every > 0 || self.ema
    }

    /// Whether the run evaluates after `step` steps of a run that ends at `end` (the last step,
    /// or where patience stopped it): before training when asked, every `eval.every_steps`, and
    /// at the end. Never without an eval set.
    pub(crate) fn eval_due(&self, step: u64, end: u64) -> bool {
        let Some(every) = self.eval_every else {
            return false;
        };
        (step == 0 && self.eval_at_start)
            || step == end
            || (step > 0 && every > 0 && step.is_multiple_of(every))
    }

    /// Whether the run re-mines its data before epoch `epoch` (0-based) begins
    /// (`train.remine_every_epochs`).
    pub(crate) fn remines_before(&self, epoch: usize) -> bool {
        self.remine_every_epochs
            .is_some_and(|every| epoch > 0 && (epoch as u64).is_multiple_of(every))
    }

    /// Whether the run evaluates before its first step (`eval.at_start`, with an eval set).
    pub(crate) fn eval_before_training(&self) -> bool {
        self.eval_every.is_some() && self.eval_at_start
    }

    /// Whether a run that resumed at `start` has spent its budget of steps after `done`
    /// (`train.stop_after_steps`; it then stops with a checkpoint to resume from).
    pub(crate) fn budget_spent(&self, start: u64, done: u64) -> bool {
        self.stop_after_steps > 0 && done - start >= self.stop_after_steps
    }

    /// The models a finished run writes besides its final checkpoint.
    pub(crate) fn final_outputs(&self) -> FinalOutputs {
        FinalOutputs {
            model_from_best: self.keep_best,
            ema: self.ema,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(checkpoint_every: u64, eval_every: Option<u64>, at_start: bool) -> RunPolicy {
        RunPolicy {
            checkpoint_every,
            eval_every,
            eval_at_start: at_start,
            remine_every_epochs: Some(2),
            stop_after_steps: 3,
            keep_best: true,
            ema: false,
        }
    }

    #[test]
    fn each_decision_over_a_ten_step_run() {
        // (policy, step, end) → (checkpoint, evaluate)
        let table = [
            (policy(5, Some(4), true), 0, 10, false, true),
            (policy(5, Some(4), false), 0, 10, false, false),
            (policy(5, Some(4), false), 4, 10, false, true),
            (policy(5, Some(4), false), 5, 10, true, false),
            (policy(5, Some(4), false), 8, 10, false, true),
            (policy(5, Some(4), false), 10, 10, true, true),
            // Patience stopped the run at step 6: that is its end.
            (policy(5, Some(4), false), 6, 6, false, true),
            // No periodic evaluation, but still one at the end.
            (policy(0, Some(0), false), 7, 10, false, false),
            (policy(0, Some(0), false), 10, 10, false, true),
            // No eval set: never.
            (policy(3, None, true), 0, 10, false, false),
            (policy(3, None, true), 10, 10, false, false),
            (policy(3, None, true), 9, 10, true, false),
        ];
        for (s, step, end, checkpoint, evaluate) in table {
            assert_eq!(
                s.checkpoint_due(step),
                checkpoint,
                "{s:?} checkpoint at {step}"
            );
            assert_eq!(
                s.eval_due(step, end),
                evaluate,
                "{s:?} eval at {step}/{end}"
            );
        }
    }

    #[test]
    fn remining_budgets_end_checkpoints_and_final_models() {
        let s = policy(0, None, false);
        let remines: Vec<usize> = (0..7).filter(|&e| s.remines_before(e)).collect();
        assert_eq!(remines, [2, 4, 6], "never before the first epoch");
        assert!(
            !RunPolicy {
                remine_every_epochs: None,
                ..s
            }
            .remines_before(2)
        );
        assert!(!s.budget_spent(10, 12));
        assert!(s.budget_spent(10, 13));
        assert!(
            !RunPolicy {
                stop_after_steps: 0,
                ..s
            }
            .budget_spent(0, 1000)
        );
        assert!(!s.checkpoint_at_end());
        assert!(RunPolicy { ema: true, ..s }.checkpoint_at_end());
        assert!(policy(5, None, false).checkpoint_at_end());
        assert_eq!(
            RunPolicy {
                ema: true,
                keep_best: false,
                ..s
            }
            .final_outputs(),
            FinalOutputs {
                model_from_best: false,
                ema: true
            }
        );
    }
}
