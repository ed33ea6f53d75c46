//! A replica's trainable state (docs/design.md §6): the encoder plus every task's loss head, under
//! one naming — encoder tensors by their checkpoint names, head tensors as
//! `heads.<task>.<name>`. AdamW, clipping, the gradient all-reduce, checkpoints, resume and peer
//! healing all go through [`TrainState::parameters`], so a head is never left out of any of them.
use std::path::Path;

use tch::Tensor;

use super::task::TaskSpec;
use crate::data::planner::mix_seed;
use crate::error::Result;
use crate::io::atomic;
use crate::loss::Objective;
use crate::model::SentenceModel;

/// One task's name and ready-to-run loss.
#[derive(Debug)]
pub struct TaskState {
    pub name: String,
    pub objective: Objective,
}

/// The encoder and the tasks' losses, and an exponential moving average of them when asked for.
pub struct TrainState {
    pub model: SentenceModel,
    pub tasks: Vec<TaskState>,
    pub ema: Option<Ema>,
}

/// An exponential moving average of every trainable tensor (`train.ema_decay`), updated after each
/// optimizer step: shadow ← decay·shadow + (1 − decay)·weights. Not trained itself; saved as
/// `model-ema/` beside `model/` and in checkpoints, restored on resume, sent to healing peers.
pub struct Ema {
    pub decay: f64,
    /// Same names and order as [`TrainState::parameters`].
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// The averaged tensors, by name.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.shadow
    }
}

impl TrainState {
    /// The state for `tasks`; loss heads start from the run's `seed` (the same on every replica).
    pub fn new(model: SentenceModel, tasks: &[TaskSpec], seed: u64) -> Self {
        let (dim, device) = (model.dimension(), model.device());
        let tasks = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| TaskState {
                name: t.name.clone(),
                objective: t.objective(dim, device, mix_seed(&[seed, i as u64, 0x6865_6164])),
            })
            .collect();
        Self {
            model,
            tasks,
            ema: None,
        }
    }

    /// Starts averaging the current weights with `decay`.
    pub fn start_ema(&mut self, decay: f64) {
        let shadow = self
            .parameters()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        self.ema = Some(Ema { decay, shadow });
    }

    /// Moves the average towards the current weights (after an optimizer step).
    pub fn update_ema(&mut self) {
        let params = self.parameters();
        if let Some(ema) = self.ema.as_mut() {
            tch::no_grad(|| {
                for ((_, s), (_, p)) in ema.shadow.iter_mut().zip(&params) {
                    // lerp with weight 1 − decay; decay 0 copies the weights exactly.
                    let _ = s.lerp_(p, 1.0 - ema.decay);
                }
            });
        }
    }

    /// Runs `f` with the averaged values in place of the weights, then puts the weights back.
    fn with_ema_weights<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let Some(ema) = &self.ema else {
            return f(self);
        };
        let params = self.parameters();
        let saved: Vec<Tensor> = params.iter().map(|(_, t)| t.detach().copy()).collect();
        tch::no_grad(|| {
            for ((_, p), (_, s)) in params.iter().zip(&ema.shadow) {
                p.shallow_clone().copy_(s);
            }
        });
        let out = f(self);
        tch::no_grad(|| {
            for ((_, p), v) in params.iter().zip(&saved) {
                p.shallow_clone().copy_(v);
            }
        });
        out
    }

    /// Writes the averaged model (a sentence-transformers directory, heads included) into `root`.
    pub fn write_ema_dir(&self, root: &Path) -> Result<()> {
        self.with_ema_weights(|s| s.write_dir(root))
    }

    /// Writes the averaged model at `dir`, atomically.
    pub fn save_ema(&self, dir: &Path) -> Result<()> {
        self.with_ema_weights(|s| s.save(dir))
    }

    /// Loads the average from a model directory [`TrainState::write_ema_dir`] wrote.
    pub fn load_ema_dir(&mut self, dir: &Path) -> Result<()> {
        if self.ema.is_none() {
            return Ok(());
        }
        let weights = self.parameters();
        let current: Vec<Tensor> = weights.iter().map(|(_, t)| t.detach().copy()).collect();
        self.load_dir(dir)?;
        let loaded: Vec<Tensor> = self
            .parameters()
            .iter()
            .map(|(_, t)| t.detach().copy())
            .collect();
        tch::no_grad(|| {
            for ((_, p), v) in weights.iter().zip(&current) {
                p.shallow_clone().copy_(v);
            }
        });
        if let Some(ema) = self.ema.as_mut() {
            for ((_, s), v) in ema.shadow.iter_mut().zip(loaded) {
                *s = v;
            }
        }
        Ok(())
    }

    /// The prefix of task `task`'s head tensors.
    pub fn head_prefix(task: &str) -> String {
        format!("heads.{task}.")
    }

    /// Whether a parameter name belongs to a loss head.
    pub fn is_head(name: &str) -> bool {
        name.starts_with("heads.")
    }

    /// Every trainable tensor, named.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
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
    pub fn write_dir(&self, root: &Path) -> Result<()> {
        self.model.write_dir(root)?;
        for t in &self.tasks {
            if let Objective::Softmax(head) = &t.objective {
                head.write(root, &t.name)?;
            }
        }
        Ok(())
    }

    /// Writes a complete model directory at `dir`, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let staged = atomic::StagedDir::create(dir)?;
        self.write_dir(staged.path())?;
        staged.commit()?;
        Ok(())
    }

    /// Loads weights and loss heads from a model directory this state wrote.
    pub fn load_dir(&mut self, dir: &Path) -> Result<()> {
        self.model.load_weights(&dir.join("model.safetensors"))?;
        for t in &self.tasks {
            if let Objective::Softmax(head) = &t.objective {
                head.load_weights(&dir.join("heads").join(format!("{}.safetensors", t.name)))?;
            }
        }
        Ok(())
    }
}
