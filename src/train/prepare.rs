//! A step's texts made ready for the device (docs/design.md §5): tokenized, each chunk of a column
//! (the whole column, or one GradCache mini-batch) sorted by length and padded in micro-batches,
//! every row's dropout seed drawn, and all of it copied to the device asynchronously. Host work only,
//! owning its data, so [`super::prefetch`] can do it for the next step while the device runs this one.
use std::time::Instant;

use tch::{Device, Tensor};
use tokenizers::Encoding;

use super::step::{StepInput, StepOptions};
use crate::error::Result;
use crate::loss::Targets;
use crate::model::dropout::RowSeeds;
use crate::model::tokenize::{TextTokenizer, TokenBatch};
use crate::seed::mix_seed;

/// Everything of one rank's part of a step that the device runs, already on the device.
#[derive(Debug)]
pub struct Prepared {
    pub step: u64,
    pub task: usize,
    /// Per column (anchors, positives or partners, negatives): its chunks in row order.
    pub columns: Vec<Vec<Chunk>>,
    /// The targets of the whole global batch.
    pub targets: Targets,
    /// Real (non-padding) tokens of this rank's rows.
    pub tokens: usize,
    /// Host seconds spent preparing.
    pub seconds: f64,
}

/// Consecutive rows of a column, run together (GradCache re-runs one chunk at a time).
#[derive(Debug)]
pub struct Chunk {
    /// Index of the chunk's first row in its column.
    pub start: usize,
    pub rows: usize,
    /// Longest first, `micro_batch` rows each.
    pub micro: Vec<Micro>,
    /// For each row of the chunk, its place in the length-sorted order (absent when the order is
    /// the chunk's own).
    pub inverse: Option<Tensor>,
}

/// One forward pass: padded token ids and, with dropout, the rows' seeds.
#[derive(Debug)]
pub struct Micro {
    pub batch: TokenBatch,
    pub seeds: Option<RowSeeds>,
}

/// Makes [`Prepared`] steps for one replica: its tokenizer, device and step options.
#[derive(Clone)]
pub struct Preparer {
    tokenizer: TextTokenizer,
    device: Device,
    opts: StepOptions,
}

impl Preparer {
    /// A preparer for a model's `tokenizer` on `device`.
    pub(crate) fn new(tokenizer: TextTokenizer, device: Device, opts: StepOptions) -> Self {
        Self {
            tokenizer,
            device,
            opts,
        }
    }

    /// Prepares `input`, the part of global step `step` this rank runs.
    pub fn prepare(&self, input: &StepInput<'_>, step: u64) -> Result<Prepared> {
        let start = Instant::now();
        let n = input.columns.first().map_or(0, Vec::len);
        let per_chunk = match self.opts.mini_batch_size {
            0 => n.max(1),
            m => m,
        };
        let mut tokens = 0;
        let mut columns = Vec::with_capacity(input.columns.len());
        for (c, texts) in input.columns.iter().enumerate() {
            let encodings = self.tokenizer.encode_each(texts)?;
            tokens += encodings.iter().map(Encoding::len).sum::<usize>();
            let chunks = (0..n)
                .step_by(per_chunk)
                .map(|at| {
                    let end = (at + per_chunk).min(n);
                    self.chunk(&encodings[at..end], at, step, c, input.first_row)
                })
                .collect();
            columns.push(chunks);
        }
        Ok(Prepared {
            step,
            task: input.task,
            columns,
            targets: input.targets.clone(),
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The chunk of `encodings`, rows `start..` of column `column`. Rows are sorted by token count
    /// and run `micro_batch` at a time (less padding; the result is the same). Dropout seeds come
    /// from (seed, step, column, global row), so a row draws the same masks however the batch is
    /// split into micro-batches, mini-batches or shards, and in both GradCache passes.
    fn chunk(
        &self,
        encodings: &[Encoding],
        start: usize,
        step: u64,
        column: usize,
        first_row: u64,
    ) -> Chunk {
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));
        let per_micro = match self.opts.micro_batch {
            0 => order.len(),
            m => m,
        };
        let micro = order
            .chunks(per_micro.max(1))
            .map(|idx| {
                let rows: Vec<&Encoding> = idx.iter().map(|&i| &encodings[i]).collect();
                let seeds = self.opts.dropout.then(|| {
                    let seeds = idx
                        .iter()
                        .map(|&i| {
                            let row = first_row + (start + i) as u64;
                            mix_seed(&[self.opts.seed, step, column as u64, row])
                        })
                        .collect();
                    RowSeeds::new(seeds, self.opts.masks, self.device)
                });
                Micro {
                    batch: self.tokenizer.pad(&rows).to(self.device),
                    seeds,
                }
            })
            .collect();
        let sorted = order.iter().enumerate().all(|(pos, &i)| pos == i);
        let inverse = (!sorted).then(|| {
            let mut inverse = vec![0i64; order.len()];
            for (pos, &i) in order.iter().enumerate() {
                inverse[i] = pos as i64;
            }
            crate::device::upload(&Tensor::from_slice(&inverse), self.device)
        });
        Chunk {
            start,
            rows: encodings.len(),
            micro,
            inverse,
        }
    }
}

impl Chunk {
    /// The chunk's rows embedded by `embed` (one micro-batch at a time), back in row order.
    pub(crate) fn embed(&self, mut embed: impl FnMut(&Micro) -> Tensor) -> Tensor {
        let mut parts: Vec<Tensor> = self.micro.iter().map(&mut embed).collect();
        let sorted = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 0)
        };
        match &self.inverse {
            Some(inverse) => sorted.index_select(0, inverse),
            None => sorted,
        }
    }
}
