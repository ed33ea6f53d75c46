//! The plan of a whole run: for every epoch, each task's batches (conflict-free for in-batch-negative
//! losses, shuffled for pointwise ones) and the order in which the tasks take turns. It is a pure
//! function of (data, seed, batch size, sampler), so every process and every restart sees the same
//! sequence of global batches, and the step count is known before the first step.
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::task::{Task, TaskData};
use crate::config::Sampler;
use crate::data::planner;
use crate::data::{EpochPlan, PairEpoch, PairTargets, PlanSpec, plan_epoch};
use crate::error::{Error, Result};
use crate::loss::Targets;
use crate::seed::mix_seed;

/// One task's batches in one epoch.
#[derive(Debug, Clone)]
pub enum TaskEpoch {
    Groups(EpochPlan),
    Pairs(PairEpoch),
}

impl TaskEpoch {
    /// Whole global batches.
    pub fn num_batches(&self) -> usize {
        match self {
            TaskEpoch::Groups(e) => e.num_batches(),
            TaskEpoch::Pairs(e) => e.num_batches(),
        }
    }
}

/// One epoch: each task's batches and the run order as (task, batch index).
#[derive(Debug, Clone)]
pub struct Epoch {
    pub tasks: Vec<TaskEpoch>,
    pub order: Vec<(usize, usize)>,
    /// The data version the batches index (0 unless `train.remine_every_epochs` re-mined).
    pub version: usize,
}

/// What one step trains on: a whole global batch of one task.
#[derive(Debug, Clone)]
pub struct GlobalBatch<'a> {
    pub task: usize,
    pub epoch: usize,
    /// Index of the batch within its task's epoch.
    pub index: usize,
    /// Column 0 anchors (queries), 1 positives (partners), 2.. hard negatives; B texts each.
    pub columns: Vec<Vec<&'a str>>,
    pub targets: Targets,
    /// Identity of each row: its query group, or its pair index (for logs).
    pub rows: Vec<u32>,
}

impl<'a> GlobalBatch<'a> {
    /// Rows in the batch.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Rank `rank`'s contiguous shard of `world` equal shards: its columns and first global row.
    /// The config makes every batch a multiple of the world (`cluster.workers` divides
    /// `train.batch_size`), so an uneven split is a bug, not an input.
    pub fn shard(&self, rank: usize, world: usize) -> (Vec<Vec<&'a str>>, usize) {
        assert!(
            rank < world && self.len().is_multiple_of(world),
            "a batch of {} rows has no shard {rank} of {world} equal ones",
            self.len()
        );
        let n = self.len() / world;
        let columns = self
            .columns
            .iter()
            .map(|c| c[rank * n..(rank + 1) * n].to_vec())
            .collect();
        (columns, rank * n)
    }
}

/// The plan of a run.
#[derive(Debug, Clone)]
pub struct RunPlan {
    epochs: Vec<Epoch>,
    pub total_steps: u64,
    sizing: Sizing,
}

/// What fixes a plan's batches and length besides the data.
#[derive(Debug, Clone, Copy)]
struct Sizing {
    batch_size: usize,
    seed: u64,
    sampler: Sampler,
    epochs: u64,
    max_steps: u64,
}

impl RunPlan {
    /// Plans enough epochs to know the exact step count (`max_steps` wins over `epochs`).
    pub(crate) fn new(
        tasks: &[Task],
        batch_size: usize,
        seed: u64,
        sampler: Sampler,
        epochs: u64,
        max_steps: u64,
    ) -> Result<Self> {
        let mut plan = RunPlan {
            epochs: Vec::new(),
            total_steps: 0,
            sizing: Sizing {
                batch_size,
                seed,
                sampler,
                epochs,
                max_steps,
            },
        };
        plan.extend(tasks, 0)?;
        Ok(plan)
    }

    /// Plans the epochs from `epoch` on anew, on `tasks` (data version `version`); the epochs
    /// before keep their batches. The step count follows (unless `max_steps` fixes it).
    pub(crate) fn replan_from(
        &mut self,
        epoch: usize,
        tasks: &[Task],
        version: usize,
    ) -> Result<()> {
        self.epochs.truncate(epoch);
        self.extend(tasks, version)
    }

    /// Plans epochs on `tasks` until the run has enough.
    fn extend(&mut self, tasks: &[Task], version: usize) -> Result<()> {
        let z = self.sizing;
        check(tasks, z.batch_size, z.seed)?;
        let want_epochs = if z.max_steps > 0 { u64::MAX } else { z.epochs };
        let mut total: u64 = self.epochs.iter().map(|e| e.order.len() as u64).sum();
        while (self.epochs.len() as u64) < want_epochs && (z.max_steps == 0 || total < z.max_steps)
        {
            let mut e = plan_run_epoch(
                tasks,
                z.batch_size,
                z.seed,
                z.sampler,
                self.epochs.len() as u64,
            )?;
            e.version = version;
            total += e.order.len() as u64;
            self.epochs.push(e);
        }
        self.total_steps = if z.max_steps > 0 { z.max_steps } else { total };
        Ok(())
    }

    /// The step epoch `e` starts at, while it is planned.
    pub(crate) fn epoch_start(&self, e: usize) -> Option<u64> {
        (e < self.epochs.len()).then(|| self.epochs[..e].iter().map(|x| x.order.len() as u64).sum())
    }

    /// (epoch, position in that epoch's order) of global step `step` (0-based).
    pub(crate) fn locate(&self, step: u64) -> (usize, usize) {
        match self.find(step) {
            Some(at) => at,
            None => unreachable!("step {step} beyond the planned {} steps", self.total_steps),
        }
    }

    fn find(&self, step: u64) -> Option<(usize, usize)> {
        let mut left = step as usize;
        for (e, epoch) in self.epochs.iter().enumerate() {
            if left < epoch.order.len() {
                return Some((e, left));
            }
            left -= epoch.order.len();
        }
        None
    }

    /// The data cursor after `step` steps: (epoch, position) of the next global batch, (epochs, 0)
    /// once every planned batch ran.
    pub fn cursor(&self, step: u64) -> (u64, u64) {
        self.find(step)
            .map_or((self.epochs.len() as u64, 0), |(e, p)| (e as u64, p as u64))
    }

    /// (task, epoch, batch index within the task's epoch) of step `step`.
    pub(crate) fn position(&self, step: u64) -> (usize, usize, usize) {
        let (e, pos) = self.locate(step);
        let (t, index) = self.epochs[e].order[pos];
        (t, e, index)
    }

    /// The global batch of step `step`.
    pub fn batch<'a>(&self, tasks: &'a [Task], step: u64) -> GlobalBatch<'a> {
        let (t, e, index) = self.position(step);
        let task = &tasks[t];
        let (columns, targets, rows) = match (&self.epochs[e].tasks[t], &task.data) {
            (TaskEpoch::Groups(plan), TaskData::Groups(data)) => {
                let b = plan.batch(index);
                let mut columns = vec![
                    b.rows.iter().map(|r| data.text(r.query)).collect(),
                    b.rows
                        .iter()
                        .map(|r| data.text(r.positive))
                        .collect::<Vec<_>>(),
                ];
                for j in 0..b.negatives_per_row {
                    columns.push(
                        (0..b.rows.len())
                            .map(|i| data.text(b.row_negatives(i)[j]))
                            .collect(),
                    );
                }
                let groups: Vec<u32> = b.rows.iter().map(|r| r.group).collect();
                (columns, Targets::Groups(groups.clone()), groups)
            }
            (TaskEpoch::Pairs(plan), TaskData::Pairs(pairs)) => {
                let idx = plan.batch(index);
                let columns = vec![
                    idx.iter()
                        .map(|&i| pairs.first[i as usize].as_str())
                        .collect(),
                    idx.iter()
                        .map(|&i| pairs.second[i as usize].as_str())
                        .collect(),
                ];
                let targets = match &pairs.targets {
                    PairTargets::Scores(s) => {
                        Targets::Scores(idx.iter().map(|&i| s[i as usize]).collect())
                    }
                    PairTargets::Labels { ids, .. } => {
                        Targets::Labels(idx.iter().map(|&i| ids[i as usize]).collect())
                    }
                };
                (columns, targets, idx.to_vec())
            }
            _ => unreachable!("a task's epoch plan matches its data"),
        };
        GlobalBatch {
            task: t,
            epoch: e,
            index,
            columns,
            targets,
            rows,
        }
    }

    /// Epoch `e`'s plan.
    pub fn epoch(&self, e: usize) -> &Epoch {
        &self.epochs[e]
    }
}

/// The planner settings of a query-group task.
pub(crate) fn spec(task: &Task, batch_size: usize, seed: u64) -> PlanSpec {
    PlanSpec {
        batch_size,
        mode: task.mode,
        negatives_per_row: task.negatives_per_row,
        fill_negatives: task.fill_negatives,
        batching: task.batching,
        seed,
    }
}

/// Refuses data the planner cannot plan; warns of groups short of hard negatives.
fn check(tasks: &[Task], batch_size: usize, seed: u64) -> Result<()> {
    for t in tasks {
        if let TaskData::Groups(d) = &t.data {
            planner::validate(d, &spec(t, batch_size, seed))
                .map_err(|e| Error::Usage(format!("task {:?}: {e}", t.name)))?;
            let short = planner::short_of_negatives(d, t.negatives_per_row);
            if short > 0 {
                tracing::warn!(
                    task = %t.name,
                    short,
                    groups = d.len(),
                    "query groups with fewer than {} hard negatives: their rows get random texts of other groups in the missing places",
                    t.negatives_per_row
                );
            }
        }
    }
    Ok(())
}

fn plan_run_epoch(
    tasks: &[Task],
    batch_size: usize,
    seed: u64,
    sampler: Sampler,
    epoch: u64,
) -> Result<Epoch> {
    let mut plans = Vec::with_capacity(tasks.len());
    for t in tasks {
        let plan = match &t.data {
            TaskData::Groups(d) => {
                let e = plan_epoch(d, &spec(t, batch_size, seed), epoch);
                if !e.leftovers.is_empty() {
                    tracing::info!(task = %t.name, epoch, leftovers = e.leftovers.len(), deferred = e.deferred, "rows that fit no whole conflict-free batch this epoch");
                }
                TaskEpoch::Groups(e)
            }
            TaskData::Pairs(p) => {
                TaskEpoch::Pairs(PairEpoch::plan(p.len(), batch_size, seed, epoch))
            }
        };
        if plan.num_batches() == 0 {
            return Err(Error::Usage(format!(
                "task {:?} has no whole batch of {batch_size} rows in epoch {epoch}: lower train.batch_size",
                t.name
            )));
        }
        plans.push(plan);
    }
    let counts: Vec<usize> = plans.iter().map(TaskEpoch::num_batches).collect();
    let order = task_order(&counts, sampler, seed, epoch);
    Ok(Epoch {
        tasks: plans,
        order,
        version: 0,
    })
}

/// The order in which tasks with `counts` batches take turns in one epoch, as (task, batch index).
pub(crate) fn task_order(
    counts: &[usize],
    sampler: Sampler,
    seed: u64,
    epoch: u64,
) -> Vec<(usize, usize)> {
    let picks: Vec<usize> = match sampler {
        Sampler::RoundRobin => {
            let rounds = counts.iter().copied().min().unwrap_or(0);
            (0..rounds).flat_map(|_| 0..counts.len()).collect()
        }
        Sampler::Proportional => {
            let mut picks: Vec<usize> = counts
                .iter()
                .enumerate()
                .flat_map(|(t, &n)| std::iter::repeat_n(t, n))
                .collect();
            if counts.len() > 1 {
                let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[seed, epoch, 0x7461_736b]));
                picks.shuffle(&mut rng);
            }
            picks
        }
    };
    let mut next = vec![0usize; counts.len()];
    picks
        .into_iter()
        .map(|t| {
            next[t] += 1;
            (t, next[t] - 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_equal_and_in_rank_order() {
        let texts = ["a", "b", "c", "d", "e", "f"];
        let batch = GlobalBatch {
            task: 0,
            epoch: 0,
            index: 0,
            columns: vec![texts.to_vec(), texts.iter().rev().copied().collect()],
            targets: Targets::Groups((0..6).collect()),
            rows: (0..6).collect(),
        };
        let shards: Vec<_> = (0..3).map(|r| batch.shard(r, 3)).collect();
        assert_eq!(shards.iter().map(|s| s.1).collect::<Vec<_>>(), [0, 2, 4]);
        for c in 0..2 {
            let joined: Vec<&str> = shards.iter().flat_map(|s| s.0[c].clone()).collect();
            assert_eq!(joined, batch.columns[c]);
        }
        assert!(std::panic::catch_unwind(|| batch.shard(0, 4)).is_err());
    }

    #[test]
    fn samplers_cover_what_sentence_transformers_covers() {
        let rr = task_order(&[3, 1, 2], Sampler::RoundRobin, 1, 0);
        assert_eq!(
            rr,
            vec![(0, 0), (1, 0), (2, 0)],
            "round robin stops with the smallest task"
        );
        let p = task_order(&[3, 1, 2], Sampler::Proportional, 1, 0);
        assert_eq!(p.len(), 6, "proportional uses every batch of every task");
        for (t, n) in [(0, 3), (1, 1), (2, 2)] {
            let mine: Vec<usize> = p.iter().filter(|x| x.0 == t).map(|x| x.1).collect();
            assert_eq!(
                mine,
                (0..n).collect::<Vec<_>>(),
                "task {t}'s batches in order"
            );
        }
        assert_eq!(p, task_order(&[3, 1, 2], Sampler::Proportional, 1, 0));
        assert_ne!(
            (0..8)
                .map(|e| task_order(&[3, 1, 2], Sampler::Proportional, 1, e))
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[0] != w[1])
                .count(),
            0,
            "the order changes with the epoch"
        );
        assert_eq!(
            task_order(&[4], Sampler::Proportional, 9, 3),
            (0..4).map(|i| (0, i)).collect::<Vec<_>>()
        );
    }
}
