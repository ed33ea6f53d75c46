//! The next steps prepared while the current one runs (docs/design.md §5): a thread of its own makes
//! [`Prepared`] steps in order, at most `depth` ahead of the loop that takes them, so tokenizing,
//! padding, seeding and copying to the device leave the step's critical path. Steps come out in
//! order or not at all: the loop asks for each step by number and a mismatch is an error, and a
//! loop that stops early simply drops what was made ahead (the next run prepares it again).
use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::Scope;

use super::prepare::Prepared;
use crate::error::{Error, Result};

/// Prepared steps of a range, in order: made ahead on a scoped thread (`depth` ≥ 1), or on demand
/// (`depth` = 0).
pub(crate) struct Prefetch<'s> {
    source: Source<'s>,
    next: u64,
    end: u64,
}

enum Source<'s> {
    Ahead(Receiver<Result<Prepared>>),
    OnDemand(Box<dyn FnMut(u64) -> Result<Prepared> + 's>),
}

impl<'s> Prefetch<'s> {
    /// Prepares `steps` with `make`, `depth` steps ahead on a thread of `scope` (0: in
    /// [`Prefetch::take`] itself).
    pub(crate) fn start<'env>(
        scope: &'s Scope<'s, 'env>,
        steps: Range<u64>,
        depth: usize,
        mut make: impl FnMut(u64) -> Result<Prepared> + Send + 's,
    ) -> Self {
        let source = if depth == 0 {
            Source::OnDemand(Box::new(make))
        } else {
            let (tx, rx): (SyncSender<Result<Prepared>>, _) = sync_channel(depth - 1);
            let range = steps.clone();
            scope.spawn(move || {
                for step in range {
                    let made = make(step);
                    let failed = made.is_err();
                    // The loop went away (stopped early, or failed): nothing more is wanted.
                    if tx.send(made).is_err() || failed {
                        return;
                    }
                }
            });
            Source::Ahead(rx)
        };
        Self {
            source,
            next: steps.start,
            end: steps.end,
        }
    }

    /// Prepared step `step`, which must be the next of the range.
    pub(crate) fn take(&mut self, step: u64) -> Result<Prepared> {
        if step != self.next || step >= self.end {
            return Err(Error::Internal(format!(
                "step {step} asked of a prefetch at step {} of ..{}",
                self.next, self.end
            )));
        }
        let prepared = match &mut self.source {
            Source::OnDemand(make) => make(step)?,
            Source::Ahead(rx) => rx
                .recv()
                .map_err(|_| Error::Internal("the prefetching thread ended early".into()))??,
        };
        if prepared.step != step {
            return Err(Error::Internal(format!(
                "the prefetch made step {} where {step} was due",
                prepared.step
            )));
        }
        self.next += 1;
        Ok(prepared)
    }
}
