//! The one step pipeline (docs/design.md §5), used by `multipos train` and by every cluster worker:
//! embed this rank's shard, all-gather the embeddings, compute the task's loss over the whole global
//! batch (own slice live, the others detached), backpropagate, all-reduce the gradients with SUM,
//! clip. Applying the update is a separate call, so a worker can commit the step first.
//!
//! The step runs on a [`Prepared`] input (tokens, seeds and indices already on the device), queues
//! its work without waiting for the device, and reads the device once at its end: the loss and the
//! gradient norm together ([`Trainer::forward_backward`]).
//!
//! With `mini_batch_size` set (GradCache), the shard is embedded without autograd, the loss is
//! taken on those cached embeddings to get d loss / d embedding, and each mini-batch is then
//! embedded again with autograd (the same dropout masks: they are counter-based) and
//! backpropagated against its cached gradient. One gradient all-reduce per step either way.
use std::time::Instant;

use tch::{Kind, Tensor};

use super::flat::Owner;
use super::optim::{AdamW, LinearSchedule};
use super::prepare::{Prepared, Preparer};
use super::state::TrainState;
use super::step::StepOptions;
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::loss::Targets;

/// Where a step's wall time went, in seconds (the step profile of `metrics.jsonl`). On a GPU the
/// host queues work faster than the device runs it: forward, backward and optimizer then measure
/// the queueing, and the device's own time shows up as `sync`, the one wait for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepTimes {
    /// Waiting for the step's input (tokenizing, padding and copying when not prefetched).
    pub data: f64,
    pub forward: f64,
    pub backward: f64,
    /// All-gathers of embeddings.
    pub gather: f64,
    /// The gradient all-reduce.
    pub reduce: f64,
    /// Clipping, AdamW and the moving average.
    pub optimizer: f64,
    /// Waiting for the device to deliver the loss and gradient norm.
    pub sync: f64,
}

impl StepTimes {
    /// Everything.
    pub(crate) fn total(&self) -> f64 {
        self.data + self.compute() + self.comm() + self.sync
    }

    /// On this rank's device: forward, backward, optimizer.
    pub(crate) fn compute(&self) -> f64 {
        self.forward + self.backward + self.optimizer
    }

    /// In the collectives.
    pub(crate) fn comm(&self) -> f64 {
        self.gather + self.reduce
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
    pub times: StepTimes,
    /// Gradient bytes that crossed between the device and the host (the all-reduce's buckets).
    pub grad_host_bytes: u64,
}

/// A replica: trainable state, optimizer, schedule.
pub struct Trainer {
    pub state: TrainState,
    pub optim: AdamW,
    pub schedule: LinearSchedule,
    pub opts: StepOptions,
}

/// Accumulates the seconds of the step's phases.
struct Clock {
    times: StepTimes,
    mark: Instant,
}

/// A phase of the step.
#[derive(Clone, Copy)]
enum Phase {
    Forward,
    Backward,
    Gather,
    Reduce,
    Optimizer,
    Sync,
}

impl Clock {
    fn new() -> Self {
        Self {
            times: StepTimes::default(),
            mark: Instant::now(),
        }
    }

    /// Charges the time since the previous charge to `phase`.
    fn charge(&mut self, phase: Phase) {
        let now = Instant::now();
        let s = now.duration_since(self.mark).as_secs_f64();
        self.mark = now;
        let t = &mut self.times;
        *match phase {
            Phase::Forward => &mut t.forward,
            Phase::Backward => &mut t.backward,
            Phase::Gather => &mut t.gather,
            Phase::Reduce => &mut t.reduce,
            Phase::Optimizer => &mut t.optimizer,
            Phase::Sync => &mut t.sync,
        } += s;
    }

    /// Charges a collective's time, if there was one: alone, its call costs nothing worth a phase.
    fn charge_collective(&mut self, phase: Phase, coll: &dyn Collective) {
        if coll.world() > 1 {
            self.charge(phase);
        }
    }
}

impl Trainer {
    /// Wraps a replica's state; the optimizer tracks every trainable tensor of it.
    pub(crate) fn new(
        state: TrainState,
        adamw: super::optim::AdamWConfig,
        schedule: LinearSchedule,
        opts: StepOptions,
    ) -> Self {
        let optim = AdamW::new(state.flat().layout().clone(), state.model.device(), adamw);
        Self {
            state,
            optim,
            schedule,
            opts,
        }
    }

    /// What prepares this replica's steps (cloneable, for a prefetching thread).
    pub fn preparer(&self) -> Preparer {
        Preparer::new(
            self.state.model.tokenizer().clone(),
            self.state.model.device(),
            self.opts,
        )
    }

    /// Every column of a prepared shard embedded (autograd as the caller has it), in row order.
    pub fn embed(&self, input: &Prepared) -> Vec<Tensor> {
        input
            .columns
            .iter()
            .map(|chunks| {
                let parts: Vec<Tensor> = chunks
                    .iter()
                    .map(|chunk| {
                        chunk.embed(|m| self.state.model.forward_t(&m.batch, m.seeds.as_ref()))
                    })
                    .collect();
                if parts.len() == 1 {
                    parts.into_iter().next().expect("one part")
                } else {
                    Tensor::cat(&parts, 0)
                }
            })
            .collect()
    }

    /// The global columns: every rank's shard, in rank order, with this rank's `local` tensors in
    /// its slot (live, so autograd reaches them) and the others as gathered (constants).
    fn gather(
        &self,
        local: &[Tensor],
        step: u64,
        coll: &mut dyn Collective,
    ) -> Result<Vec<Tensor>> {
        let world = coll.world();
        if world == 1 {
            return Ok(local.iter().map(Tensor::shallow_clone).collect());
        }
        let (cols, n, dim) = (local.len() as i64, local[0].size()[0], local[0].size()[1]);
        let gathered = coll.all_gather(step, &Tensor::stack(local, 0).detach())?;
        if gathered.size() != [world as i64 * cols, n, dim] {
            return Err(Error::Internal(format!(
                "gathered embeddings of shape {:?}, expected {:?}",
                gathered.size(),
                [world as i64 * cols, n, dim]
            )));
        }
        let gathered = gathered.view([world as i64, cols, n, dim]);
        let rank = coll.rank();
        Ok((0..cols)
            .map(|c| {
                let parts: Vec<Tensor> = (0..world)
                    .map(|r| {
                        if r == rank {
                            local[c as usize].shallow_clone()
                        } else {
                            gathered.get(r as i64).get(c)
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
    /// the loss, still on the device. Gradients accumulate in the flat gradient buffer.
    fn backward(
        &self,
        input: &Prepared,
        coll: &mut dyn Collective,
        clock: &mut Clock,
    ) -> Result<Tensor> {
        let step = input.step;
        if self.opts.mini_batch_size == 0 {
            let local = self.embed(input);
            clock.charge(Phase::Forward);
            let columns = self.gather(&local, step, coll)?;
            clock.charge_collective(Phase::Gather, coll);
            let loss = self.loss(input.task, &columns, &input.targets)?;
            clock.charge(Phase::Forward);
            loss.backward();
            clock.charge(Phase::Backward);
            return Ok(loss.detach());
        }
        // Pass 1: embeddings without autograd, kept as leaves that will receive the loss's gradient.
        let cached = tch::no_grad(|| self.embed(input));
        let leaves: Vec<Tensor> = cached
            .iter()
            .map(|t| t.detach().set_requires_grad(true))
            .collect();
        clock.charge(Phase::Forward);
        // Pass 2: the loss over the global batch, backpropagated to the leaves (and loss heads).
        let columns = self.gather(&leaves, step, coll)?;
        clock.charge_collective(Phase::Gather, coll);
        let loss = self.loss(input.task, &columns, &input.targets)?;
        clock.charge(Phase::Forward);
        loss.backward();
        clock.charge(Phase::Backward);
        // Pass 3: each mini-batch again with autograd, backpropagating its cached gradient.
        for (leaf, chunks) in leaves.iter().zip(&input.columns) {
            let grad = leaf.grad();
            if !grad.defined() {
                continue;
            }
            for chunk in chunks {
                let emb = chunk.embed(|m| self.state.model.forward_t(&m.batch, m.seeds.as_ref()));
                let g = grad.narrow(0, chunk.start as i64, chunk.rows as i64);
                let surrogate = (emb * g).sum(Kind::Float);
                clock.charge(Phase::Forward);
                surrogate.backward();
                clock.charge(Phase::Backward);
            }
        }
        Ok(loss.detach())
    }

    /// Everything of a step up to the update: the gradients end up summed over the ranks and
    /// clipped, ready for [`Trainer::update`]. The host waits for the device once, at the end, for
    /// the loss and the gradient norm together.
    pub fn forward_backward(
        &mut self,
        input: &Prepared,
        coll: &mut dyn Collective,
    ) -> Result<StepStats> {
        let mut clock = Clock::new();
        // A non-finite loss still goes through the all-reduce: every rank must take part, and
        // whether to apply is decided afterwards from every rank's numbers (`nonfinite::verdict`).
        let loss = self.backward(input, coll, &mut clock)?;
        let mut grad_host_bytes = 0;
        if coll.world() > 1 {
            // Every rank computed the loss heads' gradients whole (they see the whole batch); the
            // encoder's are partial. So rank 0 alone contributes the heads' to the sum.
            if coll.rank() != 0 {
                self.state.flat_mut().zero_head_grads();
            }
            clock.charge(Phase::Backward);
            grad_host_bytes = coll.all_reduce_sum(
                input.step,
                self.state.flat().grads(),
                self.opts.wire,
                self.opts.bucket_bytes,
            )?;
            clock.charge(Phase::Reduce);
        }
        let norm = self
            .state
            .flat_mut()
            .clip_grad_norm(self.opts.max_grad_norm);
        clock.charge(Phase::Optimizer);
        let read = Tensor::stack(&[loss.to_kind(Kind::Double), norm.to_kind(Kind::Double)], 0)
            .to_device(tch::Device::Cpu);
        let (loss, grad_norm) = (read.double_value(&[0]), read.double_value(&[1]));
        clock.charge(Phase::Sync);
        Ok(StepStats {
            task: input.task,
            loss,
            lr: self.schedule.lr(input.step),
            grad_norm,
            pairs: input.targets.len(),
            tokens: input.tokens,
            times: clock.times,
            grad_host_bytes,
        })
    }

    /// Applies AdamW with the (reduced, clipped) gradients of a step of task `task` and clears
    /// them; other tasks' loss heads, which took no part, stay as they are. Returns the seconds it
    /// took (the host's share on a GPU).
    pub(crate) fn update(&mut self, step: u64, task: usize) -> Result<f64> {
        let start = Instant::now();
        let lr = self.schedule.lr(step);
        self.optim.step(self.state.flat(), lr, |owner| {
            owner == Owner::Encoder || owner == Owner::Head(task)
        })?;
        self.state.flat_mut().zero_grad();
        self.state.update_ema();
        Ok(start.elapsed().as_secs_f64())
    }

    /// Drops the gradients of a step that will not be applied.
    pub(crate) fn discard(&mut self) {
        self.state.flat_mut().zero_grad();
    }

    /// Drops the step's gradients by giving the replica a new gradient buffer: what a collective
    /// given up on (its generation ended) still holds of the old one is written to no one's harm.
    pub(crate) fn renew_gradients(&mut self) {
        self.state.flat_mut().renew_grads();
    }
}
