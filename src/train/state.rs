//! A replica's trainable state (docs/design.md §6): the encoder plus every task's loss head, under
//! one naming — encoder tensors by their checkpoint names, head tensors as
//! `heads.<task>.<name>`, all bound into one flat buffer ([`super::flat`]). AdamW, clipping, the
//! gradient all-reduce, checkpoints, resume and peer healing all go through those names and buffers,
//! so a head is never left out of any of them.
use std::path::Path;
use std::sync::Arc;

use tch::Tensor;

use super::flat::{FlatParams, Layout, Owner};
use super::optim::decays;
use super::task::TaskSpec;
use crate::error::Result;
use crate::io::atomic;
use crate::loss::Objective;
use crate::model::SentenceModel;
use crate::seed::mix_seed;

/// One task's name and ready-to-run loss.
#[derive(Debug)]
pub struct TaskState {
    pub name: String,
    pub objective: Objective,
}

/// The encoder and the tasks' losses, their trainable tensors bound into flat buffers, and an
/// exponential moving average of them when asked for.
pub struct TrainState {
    pub model: SentenceModel,
    pub tasks: Vec<TaskState>,
    pub ema: Option<Ema>,
    flat: FlatParams,
}

/// An exponential moving average of every trainable tensor (`train.ema_decay`), updated after each
/// optimizer step: shadow ← decay·shadow + (1 − decay)·weights, one kernel over the flat buffer.
/// Not trained itself; saved as `model-ema/` beside `model/` and in checkpoints, restored on resume,
/// sent to healing peers.
pub struct Ema {
    pub decay: f64,
    layout: Arc<Layout>,
    /// Laid out as the flat parameter buffer.
    shadow: Tensor,
}

impl Ema {
    /// The averaged tensors, by name (views of the flat average).
    pub(crate) fn tensors(&self) -> Vec<(String, Tensor)> {
        self.layout.views(&self.shadow)
    }
}

impl TrainState {
    /// The state for `tasks`; loss heads start from the run's `seed` (the same on every replica).
    /// Every trainable tensor moves into the flat buffers here.
    pub(crate) fn new(model: SentenceModel, tasks: &[TaskSpec], seed: u64) -> Result<Self> {
        let (dim, device) = (model.dimension(), model.device());
        let tasks: Vec<TaskState> = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| TaskState {
                name: t.name.clone(),
                objective: t.objective(dim, device, mix_seed(&[seed, i as u64, 0x6865_6164])),
            })
            .collect();
        let mut owned: Vec<(String, Tensor, Owner, bool)> = model
            .var_store()
            .variables()
            .into_iter()
            .map(|(n, t)| {
                let d = decays(&n);
                (n, t, Owner::Encoder, d)
            })
            .collect();
        for (i, t) in tasks.iter().enumerate() {
            let prefix = Self::head_prefix(&t.name);
            owned.extend(t.objective.parameters().into_iter().map(|(n, v)| {
                let name = format!("{prefix}{n}");
                let d = decays(&name);
                (name, v, Owner::Head(i), d)
            }));
        }
        let flat = FlatParams::bind(owned)?;
        Ok(Self {
            model,
            tasks,
            ema: None,
            flat,
        })
    }

    /// The trainable tensors' flat buffers.
    pub fn flat(&self) -> &FlatParams {
        &self.flat
    }

    /// The same, to change gradients (zeroing, clipping, the all-reduce).
    pub(crate) fn flat_mut(&mut self) -> &mut FlatParams {
        &mut self.flat
    }

    /// Starts averaging the current weights with `decay`.
    pub(crate) fn start_ema(&mut self, decay: f64) {
        self.ema = Some(Ema {
            decay,
            layout: self.flat.layout().clone(),
            shadow: self.flat.values().detach().copy(),
        });
    }

    /// Moves the average towards the current weights (after an optimizer step).
    pub(crate) fn update_ema(&mut self) {
        if let Some(ema) = self.ema.as_mut() {
            // lerp with weight 1 − decay; decay 0 copies the weights exactly.
            let _ = tch::no_grad(|| ema.shadow.lerp_(self.flat.values(), 1.0 - ema.decay));
        }
    }

    /// Runs `f` with the averaged values in place of the weights, then puts the weights back.
    fn with_ema_weights<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let Some(ema) = &self.ema else {
            return f(self);
        };
        let mut values = self.flat.values().shallow_clone();
        let saved = values.copy();
        tch::no_grad(|| values.copy_(&ema.shadow));
        let out = f(self);
        tch::no_grad(|| values.copy_(&saved));
        out
    }

    /// Writes the averaged model (a sentence-transformers directory, heads included) into `root`.
    pub(crate) fn write_ema_dir(&self, root: &Path) -> Result<()> {
        self.with_ema_weights(|s| s.write_dir(root))
    }

    /// Writes the averaged model at `dir`, atomically.
    pub(crate) fn save_ema(&self, dir: &Path) -> Result<()> {
        self.with_ema_weights(|s| s.save(dir))
    }

    /// Loads the average from a model directory [`TrainState::write_ema_dir`] wrote.
    pub(crate) fn load_ema_dir(&mut self, dir: &Path) -> Result<()> {
        if self.ema.is_none() {
            return Ok(());
        }
        let mut values = self.flat.values().shallow_clone();
        let current = values.copy();
        self.load_dir(dir)?;
        let loaded = values.copy();
        tch::no_grad(|| values.copy_(&current));
        if let Some(ema) = self.ema.as_mut() {
            ema.shadow = loaded;
        }
        Ok(())
    }

    /// The prefix of task `task`'s head tensors.
    pub(crate) fn head_prefix(task: &str) -> String {
        format!("heads.{task}.")
    }

    /// Every trainable tensor, named.
    pub(crate) fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.model.var_store().variables().into_iter().collect();
        for t in &self.tasks {
            let prefix = Self::head_prefix(&t.name);
            out.extend(
                t.objective
                    .parameters()
                    .into_iter()
                    .map(|(n, v)| (format!("{prefix}{n}"), v)),
            );
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Writes the model directory's files, the loss heads (`heads/<task>.*`) included, into `root`.
    pub(crate) fn write_dir(&self, root: &Path) -> Result<()> {
        self.model.write_dir(root)?;
        for t in &self.tasks {
            if let Objective::Softmax(head) = &t.objective {
                head.write(root, &t.name)?;
            }
        }
        Ok(())
    }

    /// Writes a complete model directory at `dir`, atomically.
    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let staged = atomic::StagedDir::create(dir)?;
        self.write_dir(staged.path())?;
        staged.commit()?;
        Ok(())
    }

    /// Loads weights and loss heads from a model directory this state wrote.
    pub(crate) fn load_dir(&mut self, dir: &Path) -> Result<()> {
        self.model.load_weights(&dir.join("model.safetensors"))?;
        for t in &self.tasks {
            if let Objective::Softmax(head) = &t.objective {
                head.load_weights(&dir.join("heads").join(format!("{}.safetensors", t.name)))?;
            }
        }
        Ok(())
    }
}
