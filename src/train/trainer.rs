//! One training step, in pieces a cluster worker can drive: embed a shard with autograd, compute
//! the loss over (possibly gathered) global embeddings, backward, then clip and apply AdamW.
use std::time::Instant;

use tch::{Kind, Tensor};

use super::optim::{AdamW, AdamWConfig, LinearSchedule};
use crate::data::planner::mix_seed;
use crate::data::{Batch, Dataset};
use crate::error::Result;
use crate::loss::{MnrlConfig, mnrl_loss};
use crate::model::SentenceModel;
use crate::model::dropout::RowSeeds;

/// What a step needs besides the model and the data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    pub loss: MnrlConfig,
    /// Mask same-group positives (mode `all`).
    pub multi_positive: bool,
    pub dropout: bool,
    pub seed: u64,
    pub max_grad_norm: f64,
    /// Rows per forward within a column after sorting by length (0 = whole column).
    pub micro_batch: usize,
}

/// The texts of a batch or shard, by column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTexts<'a> {
    pub queries: Vec<&'a str>,
    pub positives: Vec<&'a str>,
    /// One vector per hard-negative column.
    pub negatives: Vec<Vec<&'a str>>,
}

impl<'a> ShardTexts<'a> {
    /// The texts of a planned batch.
    pub fn from_batch(data: &'a Dataset, batch: &Batch<'_>) -> Self {
        Self {
            queries: batch.rows.iter().map(|r| data.text(r.query)).collect(),
            positives: batch.rows.iter().map(|r| data.text(r.positive)).collect(),
            negatives: (0..batch.negatives_per_row)
                .map(|j| {
                    (0..batch.rows.len())
                        .map(|i| data.text(batch.row_negatives(i)[j]))
                        .collect()
                })
                .collect(),
        }
    }
}

/// Embeddings of one shard: queries, then the positive column and each hard-negative column.
pub struct ShardEmbeddings {
    pub queries: Tensor,
    pub docs: Vec<Tensor>,
    /// Real (non-padding) tokens processed.
    pub tokens: usize,
}

/// Numbers of one applied step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepStats {
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub pairs: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// Model, optimizer and schedule of one process.
pub struct Trainer {
    pub model: SentenceModel,
    pub optim: AdamW,
    pub schedule: LinearSchedule,
    pub opts: StepOptions,
}

impl Trainer {
    /// Wraps a loaded model.
    pub fn new(
        model: SentenceModel,
        adamw: AdamWConfig,
        schedule: LinearSchedule,
        opts: StepOptions,
    ) -> Self {
        let optim = AdamW::new(model.var_store(), adamw);
        Self {
            model,
            optim,
            schedule,
            opts,
        }
    }

    /// Embeds one column with autograd. Texts are sorted by token count and run `micro_batch` at a
    /// time (less padding; the result is the same), then put back in input order. `rows` are the
    /// global batch indices of the texts: dropout masks come from (seed, step, column, row), so a
    /// row draws the same masks however the batch is split into micro-batches or shards.
    pub fn embed_column(
        &self,
        texts: &[&str],
        rows: &[u64],
        step: u64,
        column: usize,
    ) -> Result<(Tensor, usize)> {
        let tokenizer = self.model.tokenizer();
        let encodings = tokenizer.encode_each(texts)?;
        let tokens = encodings.iter().map(|e| e.len()).sum();
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));
        let chunk = if self.opts.micro_batch == 0 {
            texts.len()
        } else {
            self.opts.micro_batch
        };
        let mut parts = Vec::new();
        for idx in order.chunks(chunk.max(1)) {
            let batch = tokenizer.pad(&idx.iter().map(|&i| &encodings[i]).collect::<Vec<_>>());
            let seeds = self.opts.dropout.then(|| {
                RowSeeds(
                    idx.iter()
                        .map(|&i| mix_seed(&[self.opts.seed, step, column as u64, rows[i]]))
                        .collect(),
                )
            });
            parts.push(self.model.forward_t(&batch, seeds.as_ref()));
        }
        let sorted = Tensor::cat(&parts, 0);
        let mut inverse = vec![0i64; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as i64;
        }
        let inverse = Tensor::from_slice(&inverse).to_device(sorted.device());
        Ok((sorted.index_select(0, &inverse), tokens))
    }

    /// Embeds a batch (or a worker's shard of it, whose first row is global row `first_row`): query
    /// column, positive column, negative columns.
    pub fn embed_shard(
        &self,
        shard: &ShardTexts<'_>,
        step: u64,
        first_row: u64,
    ) -> Result<ShardEmbeddings> {
        let rows: Vec<u64> = (first_row..first_row + shard.queries.len() as u64).collect();
        let (q, mut tokens) = self.embed_column(&shard.queries, &rows, step, 0)?;
        let mut docs = Vec::with_capacity(1 + shard.negatives.len());
        let (p, t) = self.embed_column(&shard.positives, &rows, step, 1)?;
        tokens += t;
        docs.push(p);
        for (j, column) in shard.negatives.iter().enumerate() {
            let (n, t) = self.embed_column(column, &rows, step, 2 + j)?;
            tokens += t;
            docs.push(n);
        }
        Ok(ShardEmbeddings {
            queries: q,
            docs,
            tokens,
        })
    }

    /// The global loss over embeddings in batch order (`groups` = each row's query group).
    pub fn loss(&self, queries: &Tensor, docs: &[Tensor], groups: &[u32]) -> Tensor {
        let groups = self.opts.multi_positive.then_some(groups);
        mnrl_loss(queries, docs, groups, &self.opts.loss)
    }

    /// Clips, applies AdamW for optimizer step `step` (0-based) and clears gradients; returns the
    /// learning rate used and the gradient norm before clipping.
    pub fn apply(&mut self, step: u64) -> (f64, f64) {
        let norm = self.clip();
        (self.update(step), norm)
    }

    /// Clips the gradients to `max_grad_norm`; returns their norm before clipping.
    pub fn clip(&mut self) -> f64 {
        self.optim.clip_grad_norm(self.opts.max_grad_norm)
    }

    /// Applies AdamW with the (clipped) gradients for optimizer step `step` and clears them;
    /// returns the learning rate used.
    pub fn update(&mut self, step: u64) -> f64 {
        let lr = self.schedule.lr(step);
        self.optim.step(lr);
        self.optim.zero_grad();
        lr
    }

    /// A whole single-process step on a global batch.
    pub fn step(&mut self, data: &Dataset, batch: &Batch<'_>, step: u64) -> Result<StepStats> {
        let start = Instant::now();
        let emb = self.embed_shard(&ShardTexts::from_batch(data, batch), step, 0)?;
        let groups: Vec<u32> = batch.rows.iter().map(|r| r.group).collect();
        let loss = self.loss(&emb.queries, &emb.docs, &groups);
        loss.backward();
        let value = loss.to_kind(Kind::Double).double_value(&[]);
        let (lr, grad_norm) = self.apply(step);
        Ok(StepStats {
            loss: value,
            lr,
            grad_norm,
            pairs: batch.rows.len(),
            tokens: emb.tokens,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}
