//! What one step is given: this rank's part of a global batch ([`StepInput`]) and how to run it
//! ([`StepOptions`]); the step pipeline (`trainer`) and its preparer (`prepare`) both read them.
use crate::collective::Wire;
use crate::loss::Targets;
use crate::model::masks::MaskGenerator;

/// What a step needs besides the model and the data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    pub dropout: bool,
    pub seed: u64,
    pub max_grad_norm: f64,
    /// Rows per forward within a column after sorting by length (0 = whole column).
    pub micro_batch: usize,
    /// GradCache: rows per forward with autograd (0 = off, the whole shard at once).
    pub mini_batch_size: usize,
    /// The function that makes the dropout masks (a resumed run keeps its own).
    pub masks: MaskGenerator,
    /// How gradients cross between ranks.
    pub wire: Wire,
    /// Gradient bytes per bucket of the all-reduce.
    pub bucket_bytes: usize,
}

/// One rank's part of a global batch.
#[derive(Debug, Clone)]
pub struct StepInput<'a> {
    pub task: usize,
    /// This rank's shard, by column (anchors, positives or partners, hard negatives).
    pub columns: Vec<Vec<&'a str>>,
    /// Global row index of the shard's first row.
    pub first_row: u64,
    /// The targets of the whole global batch.
    pub targets: Targets,
}

impl<'a> StepInput<'a> {
    /// A whole global batch, for one process.
    pub fn whole(batch: &super::plan::GlobalBatch<'a>) -> Self {
        Self {
            task: batch.task,
            columns: batch.columns.clone(),
            first_row: 0,
            targets: batch.targets.clone(),
        }
    }
}
