//! The one step pipeline (docs/design.md §5), used by `multipos train` and by every cluster worker:
//! embed this rank's shard, all-gather the embeddings, compute the task's loss over the whole global
//! batch (own slice live, the others detached), backpropagate, all-reduce the gradients with SUM,
//! clip. Applying the update is a separate call, so a worker can commit the step first.
//!
//! With `mini_batch_size` set (GradCache), the shard is embedded without autograd, the loss is
//! taken on those cached embeddings to get d loss / d embedding, and each mini-batch is then
//! embedded again with autograd (the same dropout masks: they are counter-based) and
//! backpropagated against its cached gradient. One gradient all-reduce per step either way.
use std::time::Instant;

use tch::{Kind, Tensor};

use super::optim::{AdamW, LinearSchedule};
use super::state::TrainState;
use crate::collective::{Collective, tensor_from_le_bytes, tensor_to_le_bytes};
use crate::data::planner::mix_seed;
use crate::error::{Error, Result};
use crate::loss::Targets;
use crate::model::dropout::RowSeeds;

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

/// Numbers of one step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepStats {
    pub task: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Rows of the global batch.
    pub pairs: usize,
    /// Real (non-padding) tokens this rank processed.
    pub tokens: usize,
    pub compute_seconds: f64,
    /// In the collectives: all-gathers of embeddings plus the all-reduce of gradients.
    pub comm_seconds: f64,
    pub gather_seconds: f64,
    pub reduce_seconds: f64,
}

impl StepStats {
    /// Wall time of the step.
    pub fn seconds(&self) -> f64 {
        self.compute_seconds + self.comm_seconds
    }
}

/// A replica: trainable state, optimizer, schedule.
pub struct Trainer {
    pub state: TrainState,
    pub optim: AdamW,
    pub schedule: LinearSchedule,
    pub opts: StepOptions,
}

/// Times what runs inside the collective calls apart from everything else.
#[derive(Default)]
struct Clock {
    gather: f64,
    reduce: f64,
}

impl Clock {
    fn gather<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.gather += start.elapsed().as_secs_f64();
        out
    }

    fn reduce<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.reduce += start.elapsed().as_secs_f64();
        out
    }

    fn comm(&self) -> f64 {
        self.gather + self.reduce
    }
}

impl Trainer {
    /// Wraps a replica's state; the optimizer tracks every trainable tensor of it.
    pub fn new(
        state: TrainState,
        adamw: super::optim::AdamWConfig,
        schedule: LinearSchedule,
        opts: StepOptions,
    ) -> Self {
        let optim = AdamW::new(state.parameters(), adamw);
        Self {
            state,
            optim,
            schedule,
            opts,
        }
    }

    /// Embeds one column of a shard. Texts are sorted by token count and run `micro_batch` at a
    /// time (less padding; the result is the same), then put back in input order. `rows` are the
    /// global batch indices of the texts: dropout masks come from (seed, step, column, row), so a
    /// row draws the same masks however the batch is split into micro-batches, mini-batches or
    /// shards, and in both GradCache passes.
    pub fn embed_column(
        &self,
        texts: &[&str],
        rows: &[u64],
        step: u64,
        column: usize,
    ) -> Result<(Tensor, usize)> {
        let model = &self.state.model;
        let tokenizer = model.tokenizer();
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
            parts.push(model.forward_t(&batch, seeds.as_ref()));
        }
        let sorted = Tensor::cat(&parts, 0);
        let mut inverse = vec![0i64; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as i64;
        }
        let inverse = Tensor::from_slice(&inverse).to_device(sorted.device());
        Ok((sorted.index_select(0, &inverse), tokens))
    }

    /// Embeds every column of a shard whose first row is global row `first_row`.
    pub fn embed_shard(
        &self,
        columns: &[Vec<&str>],
        step: u64,
        first_row: u64,
    ) -> Result<(Vec<Tensor>, usize)> {
        let n = columns.first().map_or(0, Vec::len) as u64;
        let rows: Vec<u64> = (first_row..first_row + n).collect();
        let mut tokens = 0;
        let mut out = Vec::with_capacity(columns.len());
        for (c, texts) in columns.iter().enumerate() {
            let (t, k) = self.embed_column(texts, &rows, step, c)?;
            tokens += k;
            out.push(t);
        }
        Ok((out, tokens))
    }

    /// The global columns: every rank's shard, in rank order, with this rank's `local` tensors in
    /// its slot (live, so autograd reaches them) and the others as gathered (constants).
    fn gather(
        &self,
        local: &[Tensor],
        step: u64,
        coll: &mut dyn Collective,
        clock: &mut Clock,
    ) -> Result<Vec<Tensor>> {
        let world = coll.world();
        if world == 1 {
            return Ok(local.iter().map(Tensor::shallow_clone).collect());
        }
        let (cols, n, dim) = (local.len() as i64, local[0].size()[0], local[0].size()[1]);
        let payload = tensor_to_le_bytes(&Tensor::cat(local, 0));
        let blocks = clock.gather(|| coll.all_gather(step, payload))?;
        let want = (cols * n * dim * 4) as usize;
        if let Some((r, b)) = blocks.iter().enumerate().find(|(_, b)| b.len() != want) {
            return Err(Error::Usage(format!(
                "rank {r} sent {} bytes of embeddings, expected {want}",
                b.len()
            )));
        }
        let device = self.state.model.device();
        let gathered: Vec<Tensor> = blocks
            .iter()
            .map(|b| tensor_from_le_bytes(b, &[cols, n, dim]).to_device(device))
            .collect();
        let rank = coll.rank();
        Ok((0..cols)
            .map(|c| {
                let parts: Vec<Tensor> = (0..world)
                    .map(|r| {
                        if r == rank {
                            local[c as usize].shallow_clone()
                        } else {
                            gathered[r].get(c)
                        }
                    })
                    .collect();
                Tensor::cat(&parts, 0)
            })
            .collect())
    }

    /// The loss of task `task` over embedded columns; autograd reaches whatever `columns` hold live.
    pub fn loss(&self, task: usize, columns: &[Tensor], targets: &Targets) -> Result<Tensor> {
        let objective = &self.state.tasks[task].objective;
        objective
            .loss(columns, targets)
            .map_err(|e| Error::Usage(format!("task {:?}: {e}", self.state.tasks[task].name)))
    }

    /// Embeds, gathers, computes the loss and backpropagates (plainly, or with GradCache); returns
    /// the loss and the real tokens processed. Gradients accumulate in the trainable tensors.
    fn backward(
        &self,
        input: &StepInput<'_>,
        step: u64,
        coll: &mut dyn Collective,
        clock: &mut Clock,
    ) -> Result<(f64, usize)> {
        let mini = self.opts.mini_batch_size;
        if mini == 0 {
            let (local, tokens) = self.embed_shard(&input.columns, step, input.first_row)?;
            let columns = self.gather(&local, step, coll, clock)?;
            let loss = self.loss(input.task, &columns, &input.targets)?;
            loss.backward();
            return Ok((loss.to_kind(Kind::Double).double_value(&[]), tokens));
        }
        // Pass 1: embeddings without autograd, kept as leaves that will receive the loss's gradient.
        let (cached, tokens) =
            tch::no_grad(|| self.embed_shard(&input.columns, step, input.first_row))?;
        let leaves: Vec<Tensor> = cached
            .iter()
            .map(|t| t.detach().set_requires_grad(true))
            .collect();
        // Pass 2: the loss over the global batch, backpropagated to the leaves (and loss heads).
        let columns = self.gather(&leaves, step, coll, clock)?;
        let loss = self.loss(input.task, &columns, &input.targets)?;
        loss.backward();
        // Pass 3: each mini-batch again with autograd, backpropagating its cached gradient.
        let n = input.columns.first().map_or(0, Vec::len);
        for (c, texts) in input.columns.iter().enumerate() {
            let grad = leaves[c].grad();
            if !grad.defined() {
                continue;
            }
            for start in (0..n).step_by(mini) {
                let end = (start + mini).min(n);
                let rows: Vec<u64> = (start..end).map(|i| input.first_row + i as u64).collect();
                let (emb, _) = self.embed_column(&texts[start..end], &rows, step, c)?;
                let g = grad.narrow(0, start as i64, (end - start) as i64);
                (emb * g).sum(Kind::Float).backward();
            }
        }
        Ok((loss.to_kind(Kind::Double).double_value(&[]), tokens))
    }

    /// Everything of a step up to the update: the gradients end up summed over the ranks and
    /// clipped, ready for [`Trainer::update`].
    pub fn forward_backward(
        &mut self,
        input: &StepInput<'_>,
        step: u64,
        coll: &mut dyn Collective,
    ) -> Result<StepStats> {
        let start = Instant::now();
        let mut clock = Clock::default();
        // A non-finite loss still goes through the all-reduce: every rank must take part, and
        // whether to apply is decided afterwards from every rank's numbers (`nonfinite::verdict`).
        let (loss, tokens) = self.backward(input, step, coll, &mut clock)?;
        if coll.world() > 1 {
            // Every rank computed the loss heads' gradients whole (they see the whole batch); the
            // encoder's are partial. So rank 0 alone contributes the heads' to the sum.
            let rank = coll.rank();
            let mut grads = self
                .optim
                .flat_grads(|name| rank == 0 || !TrainState::is_head(name));
            clock.reduce(|| coll.all_reduce_sum(step, &mut grads))?;
            self.optim.set_flat_grads(&grads);
        }
        let grad_norm = self.optim.clip_grad_norm(self.opts.max_grad_norm);
        Ok(StepStats {
            task: input.task,
            loss,
            lr: self.schedule.lr(step),
            grad_norm,
            pairs: input.targets.len(),
            tokens,
            compute_seconds: start.elapsed().as_secs_f64() - clock.comm(),
            comm_seconds: clock.comm(),
            gather_seconds: clock.gather,
            reduce_seconds: clock.reduce,
        })
    }

    /// Applies AdamW with the (reduced, clipped) gradients of a step of task `task` and clears
    /// them; other tasks' loss heads, which took no part, stay as they are. Returns the rate used.
    pub fn update(&mut self, step: u64, task: usize) -> f64 {
        let lr = self.schedule.lr(step);
        let own = TrainState::head_prefix(&self.state.tasks[task].name);
        self.optim.step(lr, |name| {
            !TrainState::is_head(name) || name.starts_with(&own)
        });
        self.optim.zero_grad();
        self.state.update_ema();
        lr
    }

    /// Drops the gradients of a step that will not be applied.
    pub fn discard(&mut self) {
        self.optim.zero_grad();
    }

    /// A whole step on this rank's part of a global batch: forward, backward, all-reduce, update;
    /// a non-finite loss or gradient is an error.
    pub fn step(
        &mut self,
        input: &StepInput<'_>,
        step: u64,
        coll: &mut dyn Collective,
    ) -> Result<StepStats> {
        let stats = self.forward_backward(input, step, coll)?;
        match super::nonfinite::verdict(
            crate::config::NonFinite::Abort,
            0,
            step,
            &[stats.loss],
            &[stats.grad_norm],
        ) {
            super::nonfinite::Fate::Apply => {
                self.update(step, input.task);
                Ok(stats)
            }
            super::nonfinite::Fate::Skip(r) | super::nonfinite::Fate::Abort(r) => {
                self.discard();
                Err(Error::Usage(r))
            }
        }
    }
}
