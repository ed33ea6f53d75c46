//! Tasks: each is a name, its data, how its rows are formed and its loss (docs/design.md §3). A run
//! trains one or several; every global batch comes from one task.
use tch::Device;

use crate::config::TaskConfig;
use crate::data::{
    Batching, Dataset, FillNegatives, LoadOptions, Mode, PairSet, TargetKind, load_files, pairs,
};
use crate::error::{Error, Result};
use crate::loss::{LossConfig, Objective, SoftmaxHead};

/// A task's training data.
#[derive(Debug, Clone)]
pub enum TaskData {
    /// Query groups, planned into conflict-free batches (in-batch-negative losses).
    Groups(Dataset),
    /// Scored or labelled pairs, in shuffled batches (pointwise losses).
    Pairs(PairSet),
}

/// One task of a run.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub loss: LossConfig,
    pub mode: Mode,
    pub negatives_per_row: usize,
    pub fill_negatives: FillNegatives,
    pub batching: Batching,
    pub data: TaskData,
}

impl Task {
    /// Loads a task's files: query groups for MNRL; for a pointwise loss, scored or labelled pair
    /// files, or query groups turned into pairs (see [`PairSet::from_groups`]).
    pub(crate) fn load(cfg: &TaskConfig) -> Result<Self> {
        let paths = cfg.train.to_vec();
        let opts = LoadOptions {
            skip_invalid: cfg.skip_invalid,
            columns: cfg.columns.as_ref(),
        };
        let data = match cfg.loss {
            LossConfig::Mnrl(_) => TaskData::Groups(load_files(&paths, opts)?),
            LossConfig::CosineSimilarity(_) | LossConfig::Cosent(_) | LossConfig::Softmax(_) => {
                let kind = match cfg.loss {
                    LossConfig::Softmax(_) => TargetKind::Label,
                    LossConfig::CosineSimilarity(_) => TargetKind::Score { unit: true },
                    _ => TargetKind::Score { unit: false },
                };
                let pair_files = paths
                    .iter()
                    .map(|p| pairs::is_pair_file(p, cfg.columns.as_ref()))
                    .collect::<Result<Vec<bool>>>()?;
                if pair_files.iter().all(|&b| b) {
                    TaskData::Pairs(pairs::load_pair_files(&paths, kind, opts)?)
                } else if pair_files.iter().all(|&b| !b) {
                    TaskData::Pairs(PairSet::from_groups(&load_files(&paths, opts)?, kind))
                } else {
                    return Err(Error::Usage(format!(
                        "task {:?} mixes scored/labelled pair files with query-group files: give it one kind",
                        cfg.name
                    )));
                }
            }
        };
        if let (LossConfig::Softmax(s), TaskData::Pairs(p)) = (&cfg.loss, &data)
            && s.num_labels > 0
            && p.label_names().len() > s.num_labels
        {
            return Err(Error::Usage(format!(
                "task {:?}: the data has {} classes but loss.num_labels = {}",
                cfg.name,
                p.label_names().len(),
                s.num_labels
            )));
        }
        Ok(Self {
            name: cfg.name.clone(),
            loss: cfg.loss,
            mode: cfg.mode,
            negatives_per_row: cfg.negatives_per_row,
            fill_negatives: cfg.fill_negatives,
            batching: cfg.batching,
            data,
        })
    }

    /// A fingerprint of the task's content.
    pub(crate) fn fingerprint(&self) -> u64 {
        match &self.data {
            TaskData::Groups(d) => d.fingerprint(),
            TaskData::Pairs(p) => p.fingerprint(),
        }
    }

    /// What loading counted, as one line.
    pub(crate) fn describe(&self) -> String {
        match &self.data {
            TaskData::Groups(d) => format!("task {}: {}", self.name, d.stats()),
            TaskData::Pairs(p) => format!(
                "task {}: {} pairs{}",
                self.name,
                p.len(),
                match p.label_names().len() {
                    0 => String::new(),
                    n => format!(", {n} classes"),
                }
            ),
        }
    }

    /// The task's size for the model card: groups, pairs and records read (groups), or pairs.
    pub(crate) fn size(&self) -> serde_json::Value {
        match &self.data {
            TaskData::Groups(d) => serde_json::json!({
                "groups": d.len(), "pairs": d.pair_count(), "records": d.stats().records,
            }),
            TaskData::Pairs(p) => serde_json::json!({"pairs": p.len()}),
        }
    }

    /// What a replica needs of this task to build its loss.
    pub fn spec(&self) -> TaskSpec {
        let mut labels = match &self.data {
            TaskData::Pairs(p) => p.label_names().to_vec(),
            TaskData::Groups(_) => Vec::new(),
        };
        if let LossConfig::Softmax(c) = self.loss {
            while labels.len() < c.num_labels {
                labels.push(labels.len().to_string());
            }
        }
        TaskSpec {
            name: self.name.clone(),
            loss: self.loss,
            multi_positive: self.mode == Mode::All,
            labels,
        }
    }
}

/// What a replica needs of a task to build its loss, without the data: a cluster worker gets it
/// from the config and the coordinator (class names).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub name: String,
    pub loss: LossConfig,
    /// Mask same-group positives (MNRL over mode `all`).
    pub multi_positive: bool,
    /// SoftmaxLoss class names, by label id.
    pub labels: Vec<String>,
}

impl TaskSpec {
    /// The task's loss, ready to run on embeddings of `dim`; a SoftmaxLoss classifier starts from
    /// `seed` (the same on every replica).
    pub(crate) fn objective(&self, dim: i64, device: Device, seed: u64) -> Objective {
        match self.loss {
            LossConfig::Mnrl(cfg) => Objective::Mnrl {
                cfg,
                multi_positive: self.multi_positive,
            },
            LossConfig::CosineSimilarity(c) => Objective::CosineSimilarity(c),
            LossConfig::Cosent(c) => Objective::Cosent(c),
            LossConfig::Softmax(c) => {
                Objective::Softmax(SoftmaxHead::new(c, dim, self.labels.clone(), device, seed))
            }
        }
    }

    /// Builds the specs of `cfgs` on a replica without the data, with each task's class names.
    pub(crate) fn from_config(
        cfgs: &[TaskConfig],
        labels: &[(String, Vec<String>)],
    ) -> Result<Vec<Self>> {
        if cfgs.len() != labels.len() || cfgs.iter().zip(labels).any(|(c, (n, _))| &c.name != n) {
            return Err(Error::Usage(format!(
                "the coordinator described {} tasks that do not match the config's {}",
                labels.len(),
                cfgs.len()
            )));
        }
        Ok(cfgs
            .iter()
            .zip(labels)
            .map(|(c, (_, l))| TaskSpec {
                name: c.name.clone(),
                loss: c.loss,
                multi_positive: c.mode == Mode::All,
                labels: l.clone(),
            })
            .collect())
    }
}

/// Loads every task of a run, logging what loading did.
pub fn load_tasks(cfgs: &[TaskConfig]) -> Result<Vec<Task>> {
    cfgs.iter()
        .map(|c| {
            let t = Task::load(c)?;
            tracing::info!("{}", t.describe());
            Ok(t)
        })
        .collect()
}

/// The fingerprint of a run's data: one task's own, or all tasks' combined in order.
pub(crate) fn data_fingerprint(tasks: &[Task]) -> String {
    let fp = match tasks {
        [one] => one.fingerprint(),
        many => {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for t in many {
                h.update(t.name.as_bytes());
                h.update(&t.fingerprint().to_le_bytes());
            }
            h.digest()
        }
    };
    format!("{fp:016x}")
}
