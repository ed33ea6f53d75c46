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

/// The encoder and the tasks' losses.
pub struct TrainState {
    pub model: SentenceModel,
    pub tasks: Vec<TaskState>,
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
        Self { model, tasks }
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
