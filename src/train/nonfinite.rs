//! What a run does with a step whose loss or gradient is not finite (`train.on_nonfinite`,
//! docs/design.md §5): a pure rule, used by the single process and by the coordinator, which sees
//! every worker's numbers at the step's commit.
use crate::config::NonFinite;

/// Skipped steps in a row after which a `skip` run gives up: the run has diverged.
pub(crate) const MAX_SKIPS_IN_A_ROW: u64 = 3;

/// The fate of a step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fate {
    Apply,
    /// Discard the gradients; the step counts as done, the weights and optimizer stay as they were.
    Skip(String),
    Abort(String),
}

/// Decides step `step` (0-based) from the losses and gradient norms every rank reported, after
/// `skipped_in_a_row` skipped steps just before it.
pub(crate) fn verdict(
    policy: NonFinite,
    skipped_in_a_row: u64,
    step: u64,
    losses: &[f64],
    grad_norms: &[f64],
) -> Fate {
    let bad = losses
        .iter()
        .map(|l| ("loss", l))
        .chain(grad_norms.iter().map(|g| ("gradient norm", g)))
        .find(|(_, v)| !v.is_finite());
    let Some((what, value)) = bad else {
        return Fate::Apply;
    };
    let reason = format!("step {}: the {what} is {value}", step + 1);
    match policy {
        NonFinite::Abort => Fate::Abort(format!(
            "{reason}; the run diverged: lower train.lr, or set train.on_nonfinite = \"skip\" (the last checkpoint is the last good state)"
        )),
        NonFinite::Skip if skipped_in_a_row + 1 >= MAX_SKIPS_IN_A_ROW => Fate::Abort(format!(
            "{reason}, the {MAX_SKIPS_IN_A_ROW}th skipped step in a row: the run diverged; lower train.lr (the last checkpoint is the last good state)"
        )),
        NonFinite::Skip => Fate::Skip(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_steps_apply_and_others_abort_or_skip_until_too_many() {
        let ok = verdict(NonFinite::Abort, 0, 4, &[0.5, 0.5], &[1.0, 1.0]);
        assert_eq!(ok, Fate::Apply);
        match verdict(NonFinite::Abort, 0, 4, &[0.5, f64::NAN], &[1.0, 1.0]) {
            Fate::Abort(r) => assert!(r.starts_with("step 5: the loss is NaN"), "{r}"),
            v => panic!("{v:?}"),
        }
        let inf = verdict(NonFinite::Skip, 0, 0, &[0.5], &[f64::INFINITY]);
        assert_eq!(inf, Fate::Skip("step 1: the gradient norm is inf".into()));
        assert!(matches!(
            verdict(NonFinite::Skip, 1, 0, &[f64::NAN], &[1.0]),
            Fate::Skip(_)
        ));
        assert!(matches!(
            verdict(NonFinite::Skip, 2, 0, &[f64::NAN], &[1.0]),
            Fate::Abort(_)
        ));
    }
}
