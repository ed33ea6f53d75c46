//! What a run trains on, epoch by epoch (docs/design.md §11): the tasks' data and the plan of its
//! global batches. With `train.remine_every_epochs` the hard negatives are mined again before
//! every N-th epoch with the model as trained so far; the epochs from there on are planned on that
//! data version, and each version is recorded (`mined/<task>.epoch-<E>.jsonl`), so a resumed run
//! rebuilds the same versions and the same plan.
use super::build::plan_for;
use super::plan::{GlobalBatch, RunPlan};
use super::policy::RunPolicy;
use super::task::{Task, TaskData, data_fingerprint};
use crate::config::RunConfig;
use crate::data::{LoadOptions, load_files};
use crate::error::{Error, Result};

/// The data versions of a run and its plan.
#[derive(Debug, Clone)]
pub(crate) struct TrainingData {
    /// The tasks as loaded, before any mining: what re-mining starts from (kept only when the
    /// run re-mines).
    source: Option<Vec<Task>>,
    /// Data versions in the order they begin; version 0 from epoch 0.
    versions: Vec<Vec<Task>>,
    /// The epoch each version begins at.
    begins: Vec<usize>,
    pub plan: RunPlan,
    /// The fingerprint of version 0: the run's identity (later versions derive from it).
    pub fingerprint: String,
}

impl TrainingData {
    /// Plans the run on `tasks`; `source` are the tasks before mining, kept for re-mining (needed
    /// only when the run re-mines).
    pub(crate) fn new(
        cfg: &RunConfig,
        source: Option<Vec<Task>>,
        tasks: Vec<Task>,
    ) -> Result<Self> {
        let plan = plan_for(cfg, &tasks)?;
        Ok(Self {
            source: source.filter(|_| cfg.train.remine_every_epochs.is_some()),
            fingerprint: data_fingerprint(&tasks),
            versions: vec![tasks],
            begins: vec![0],
            plan,
        })
    }

    /// The run's tasks (names, losses, labels: the same in every version).
    pub(crate) fn tasks(&self) -> &[Task] {
        &self.versions[0]
    }

    /// The tasks before mining, which re-mining starts from.
    pub(crate) fn source(&self) -> Option<&[Task]> {
        self.source.as_deref()
    }

    /// The global batch of step `step`, from the data version of its epoch.
    pub(crate) fn batch(&self, step: u64) -> GlobalBatch<'_> {
        let (e, _) = self.plan.locate(step);
        self.plan
            .batch(&self.versions[self.plan.epoch(e).version], step)
    }

    /// The epoch that begins at step `step` when the run re-mines before it and has not yet.
    pub(crate) fn remine_due(&self, cfg: &RunConfig, step: u64) -> Option<usize> {
        self.source.as_ref()?;
        if step >= self.plan.total_steps {
            return None;
        }
        let (e, pos) = self.plan.locate(step);
        (pos == 0 && RunPolicy::new(cfg).remines_before(e) && !self.begins.contains(&e))
            .then_some(e)
    }

    /// Epochs from `epoch` on train on `tasks`, a new data version.
    pub(crate) fn remined(&mut self, epoch: usize, tasks: Vec<Task>) -> Result<()> {
        let version = self.versions.len();
        self.plan.replan_from(epoch, &tasks, version)?;
        self.versions.push(tasks);
        self.begins.push(epoch);
        Ok(())
    }

    /// Rebuilds the versions a resumed run had made before step `step` from their records:
    /// every re-mining due at or before `step` whose record exists (one due exactly at `step`
    /// may still be missing: the run mines it next).
    pub(crate) fn restore_versions(&mut self, cfg: &RunConfig, step: u64) -> Result<()> {
        while let Some(e) = self.next_due_at_or_before(cfg, step) {
            let start = self.plan.epoch_start(e).unwrap_or(u64::MAX);
            let mut tasks = self.versions[0].clone();
            for task in tasks.iter_mut() {
                if !matches!(task.data, TaskData::Groups(_)) {
                    continue;
                }
                let path = super::mining::record_path(cfg, &task.name, Some(e));
                if !path.is_file() {
                    if start == step {
                        return Ok(());
                    }
                    return Err(Error::Usage(format!(
                        "cannot resume exactly: {} (the data re-mined before epoch {}) is missing",
                        path.display(),
                        e + 1
                    )));
                }
                task.data = TaskData::Groups(load_files(&[path], LoadOptions::default())?);
            }
            tracing::info!(epoch = e + 1, "resuming on the recorded re-mined data");
            self.remined(e, tasks)?;
        }
        Ok(())
    }

    /// Whether a re-mining due at or before `step` is not in place (`restore_versions` has work).
    pub(crate) fn lacks_versions(&self, cfg: &RunConfig, step: u64) -> bool {
        self.next_due_at_or_before(cfg, step).is_some()
    }

    fn next_due_at_or_before(&self, cfg: &RunConfig, step: u64) -> Option<usize> {
        let policy = RunPolicy::new(cfg);
        self.source.as_ref()?;
        (1..)
            .take_while(|&e| self.plan.epoch_start(e).is_some_and(|s| s <= step))
            .filter(|&e| policy.remines_before(e))
            .find(|e| !self.begins.contains(e))
    }
}
