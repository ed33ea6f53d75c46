//! Conflict-free global batches (docs/design.md §2), as a pure function of (data, seed, epoch, spec).
//!
//! A global batch holds `batch_size` rows (query, positive, `negatives_per_row` hard negatives). It is
//! conflict-free when no normalised text appears twice anywhere in it, in any column, except that in
//! mode `all` the rows of one query group share their query. Then every in-batch candidate of a
//! query is a true negative, or (mode `all`) a positive of the same group that the loss masks.
//!
//! Packing is greedy over a seeded shuffle: a row that conflicts with the batch being filled waits
//! in a queue and is offered first to the next batches, so a duplicate-heavy text delays its rows
//! instead of dropping them. Rows still waiting when the data cannot fill another whole batch are
//! returned as leftovers, never silently dropped. The plan is computed whole before the epoch, so its
//! batch count is exact.
use std::collections::VecDeque;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashMap;

use super::dataset::{Dataset, TextId};
use crate::seed::mix_seed;

/// How the positives of a query group become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One row per group per epoch; the group's positives take turns across epochs.
    Sample,
    /// One row per (query, positive) pair; a group's rows are kept together so its positives share
    /// batches (the multi-positive loss masks them from each other).
    All,
    /// One row per (query, positive) pair, shuffled pair by pair, a query at most once per batch:
    /// what sentence-transformers' NO_DUPLICATES sampler does with a pair dataset, but checked over
    /// the whole global batch and every column.
    Pairs,
}

/// What a row gets when its group lists fewer hard negatives than `negatives_per_row`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FillNegatives {
    /// Refuse to plan (the default): the data promised more negatives than it has.
    #[default]
    Error,
    /// Keep the group's negatives and fill the missing places with positives of other groups, drawn
    /// per row from the seed (never the row's query, a positive of its group or a negative it has),
    /// so every pair still trains after mining found nothing for its query.
    Random,
}

/// Which rows share a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// Any rows: the epoch's seeded shuffle, packed in order (the default).
    #[default]
    Shuffled,
    /// Rows of one cluster together: the shuffled rows, ordered cluster by cluster (the clusters in
    /// a seeded order), so a batch's in-batch negatives share its topic and are harder to tell
    /// apart. Every query group needs a `cluster` label (`multipos mine --clusters K` writes them).
    ByCluster,
}

/// What to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSpec {
    pub batch_size: usize,
    pub mode: Mode,
    pub negatives_per_row: usize,
    pub fill_negatives: FillNegatives,
    pub batching: Batching,
    pub seed: u64,
}

/// One planned row: indices into the [`Dataset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Row {
    pub group: u32,
    pub query: TextId,
    pub positive: TextId,
}

/// The plan of one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    pub epoch: u64,
    pub batch_size: usize,
    pub negatives_per_row: usize,
    rows: Vec<Row>,
    negatives: Vec<TextId>,
    /// Rows that could not be placed in a whole conflict-free batch this epoch.
    pub leftovers: Vec<Row>,
    /// Rows that waited at least once because of a conflict.
    pub deferred: usize,
}

/// A global batch or one worker's shard of it.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub rows: &'a [Row],
    /// `negatives_per_row` entries per row, row-major.
    pub negatives: &'a [TextId],
    pub negatives_per_row: usize,
}

impl<'a> Batch<'a> {
    /// The hard negatives of row `i`.
    pub(crate) fn row_negatives(&self, i: usize) -> &'a [TextId] {
        &self.negatives[i * self.negatives_per_row..(i + 1) * self.negatives_per_row]
    }
}

impl EpochPlan {
    /// Number of whole global batches.
    pub fn num_batches(&self) -> usize {
        self.rows.len() / self.batch_size
    }

    /// Global batch `k`.
    pub fn batch(&self, k: usize) -> Batch<'_> {
        let b = self.batch_size;
        let n = self.negatives_per_row;
        Batch {
            rows: &self.rows[k * b..(k + 1) * b],
            negatives: &self.negatives[k * b * n..(k + 1) * b * n],
            negatives_per_row: n,
        }
    }

    /// Rows placed in batches.
    pub fn planned_rows(&self) -> usize {
        self.rows.len()
    }
}

/// Checks a spec against the data before any planning; the message says what to change.
pub fn validate(data: &Dataset, spec: &PlanSpec) -> Result<(), String> {
    if spec.batch_size < 2 {
        return Err(format!(
            "batch_size must be at least 2 (in-batch negatives), got {}",
            spec.batch_size
        ));
    }
    let rows = match spec.mode {
        Mode::Sample => data.len(),
        Mode::All | Mode::Pairs => data.pair_count(),
    };
    if spec.batch_size > rows {
        return Err(format!(
            "batch_size {} is larger than the {rows} rows one epoch has (mode {:?}): lower batch_size",
            spec.batch_size, spec.mode
        ));
    }
    if spec.batching == Batching::ByCluster
        && let Some(g) = (0..data.len()).find(|&g| data.cluster(g).is_none())
    {
        return Err(format!(
            "batching = \"by_cluster\" needs a \"cluster\" label on every query group, but query group {g} ({:?}) has none: label the data (multipos mine --clusters K does) or use batching = \"shuffled\"",
            data.text(data.query(g))
        ));
    }
    let short = short_of_negatives(data, spec.negatives_per_row);
    match spec.fill_negatives {
        FillNegatives::Error if short > 0 => {
            return Err(format!(
                "negatives_per_row = {} but {short} of {} query groups have fewer hard negatives: lower it, add negatives, or set fill_negatives = \"random\"",
                spec.negatives_per_row,
                data.len()
            ));
        }
        FillNegatives::Random if short > 0 => {
            // Enough other texts for every short group, so filling always terminates.
            let distinct: rustc_hash::FxHashSet<TextId> = (0..data.len())
                .flat_map(|g| data.positives(g).iter().copied())
                .collect();
            let k = spec.negatives_per_row;
            if let Some(g) = (0..data.len()).find(|&g| {
                distinct.len() < data.positives(g).len() + data.negatives(g).len() + 1 + k
            }) {
                return Err(format!(
                    "fill_negatives = \"random\": query group {g} ({:?}) has too few other texts to draw {k} negatives from",
                    data.text(data.query(g))
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// How many query groups list fewer than `k` hard negatives.
pub fn short_of_negatives(data: &Dataset, k: usize) -> usize {
    (0..data.len())
        .filter(|&g| data.negatives(g).len() < k)
        .count()
}

/// `k` negatives for one row of group `g`: the group's own, taking turns from `base`, or, when it has
/// fewer than `k`, all of them followed by random positives of other groups (`FillNegatives::Random`;
/// `validate` guarantees there are enough). Seeded per (seed, group, epoch, row of the group).
fn row_negatives(
    data: &Dataset,
    spec: &PlanSpec,
    g: usize,
    base: usize,
    row_seed: u64,
    out: &mut Vec<TextId>,
) {
    let k = spec.negatives_per_row;
    let negs = data.negatives(g);
    if negs.len() >= k {
        out.extend((0..k).map(|i| negs[(base + i) % negs.len()]));
        return;
    }
    let start = out.len();
    out.extend_from_slice(negs);
    let taken = |out: &[TextId], t: TextId| {
        t == data.query(g) || data.positives(g).contains(&t) || out[start..].contains(&t)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(row_seed);
    let mut tries = 0;
    while out.len() - start < k {
        let h = rng.random_range(0..data.len());
        let ps = data.positives(h);
        let t = ps[rng.random_range(0..ps.len())];
        tries += 1;
        if !taken(out, t) {
            out.push(t);
        } else if tries > 64 * k {
            // Crowded data: walk every positive in order from a random group instead.
            let from = rng.random_range(0..data.len());
            let t = (0..data.len())
                .flat_map(|i| data.positives((from + i) % data.len()).iter().copied())
                .find(|&t| !taken(out, t))
                .expect("validate() guarantees enough other texts");
            out.push(t);
        }
    }
}

/// The rows of one epoch before packing, in shuffled order, with their negatives.
fn epoch_rows(
    data: &Dataset,
    spec: &PlanSpec,
    epoch: u64,
    rng: &mut ChaCha8Rng,
) -> (Vec<Row>, Vec<TextId>) {
    let mut order: Vec<u32> = (0..data.len() as u32).collect();
    order.shuffle(rng);
    let k = spec.negatives_per_row;
    let mut rows = Vec::with_capacity(match spec.mode {
        Mode::Sample => data.len(),
        Mode::All | Mode::Pairs => data.pair_count(),
    });
    let mut negatives = Vec::with_capacity(rows.capacity() * k);
    for g in order {
        let gi = g as usize;
        let positives = data.positives(gi);
        let group_seed = mix_seed(&[spec.seed, g as u64]);
        // Positives (and negatives) take turns: epoch e starts where epoch e-1 stopped.
        let start = (group_seed as usize).wrapping_add(epoch as usize) % positives.len();
        let take = match spec.mode {
            Mode::Sample => 1,
            Mode::All | Mode::Pairs => positives.len(),
        };
        for j in 0..take {
            rows.push(Row {
                group: g,
                query: data.query(gi),
                positive: positives[(start + j) % positives.len()],
            });
            if k > 0 {
                let turn = epoch as usize * take + j;
                let base = ((group_seed >> 32) as usize).wrapping_add(turn * k);
                let row_seed = mix_seed(&[group_seed, epoch, j as u64]);
                row_negatives(data, spec, gi, base, row_seed, &mut negatives);
            }
        }
    }
    if spec.mode != Mode::Pairs && spec.batching == Batching::Shuffled {
        return (rows, negatives);
    }
    let mut perm: Vec<usize> = (0..rows.len()).collect();
    if spec.mode == Mode::Pairs {
        // Shuffle rows (with their negatives) one by one instead of group by group.
        perm.shuffle(rng);
    }
    if spec.batching == Batching::ByCluster {
        // Stable: within a cluster the rows keep their shuffled order (and a group its rows).
        let mut rank: Vec<usize> = (0..data.cluster_count()).collect();
        rank.shuffle(rng);
        let cluster = |i: usize| data.cluster(rows[i].group as usize).expect("validated");
        perm.sort_by_key(|&i| rank[cluster(i) as usize]);
    }
    let rows_p = perm.iter().map(|&i| rows[i]).collect();
    let negs_p = perm
        .iter()
        .flat_map(|&i| negatives[i * k..(i + 1) * k].iter().copied())
        .collect();
    (rows_p, negs_p)
}

/// The texts a row puts into a batch, with the role of each: (hash, is_query).
fn row_texts<'a>(
    data: &'a Dataset,
    row: &Row,
    negs: &'a [TextId],
) -> impl Iterator<Item = (u64, bool)> + 'a {
    let q = data.hash(row.query);
    let p = data.hash(row.positive);
    [(q, true), (p, false)]
        .into_iter()
        .chain(negs.iter().map(|&n| (data.hash(n), false)))
}

/// Texts of the batch being filled: hash -> (group, is_query).
struct Occupancy {
    seen: FxHashMap<u64, (u32, bool)>,
    /// Mode `all`: a group's rows may share their query.
    shared_queries: bool,
}

impl Occupancy {
    /// Only one thing may repeat, in mode `all`: the query of the same group. Within a row nothing
    /// repeats: loading removed positives equal to the query and contradicting negatives, and
    /// `validate` ensures a group has enough distinct negatives.
    fn fits(&self, data: &Dataset, row: &Row, negs: &[TextId]) -> bool {
        row_texts(data, row, negs).all(|(h, is_query)| match self.seen.get(&h) {
            None => true,
            Some(&(g, q)) => self.shared_queries && g == row.group && q && is_query,
        })
    }

    fn insert(&mut self, data: &Dataset, row: &Row, negs: &[TextId]) {
        for (h, is_query) in row_texts(data, row, negs) {
            self.seen.insert(h, (row.group, is_query));
        }
    }
}

/// Plans epoch `epoch`. Pure: the same (data, spec, epoch) always gives the same plan.
pub fn plan_epoch(data: &Dataset, spec: &PlanSpec, epoch: u64) -> EpochPlan {
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[spec.seed, epoch, data.fingerprint()]));
    let (rows, negatives) = epoch_rows(data, spec, epoch, &mut rng);
    let k = spec.negatives_per_row;
    let b = spec.batch_size;
    let negs_of = |i: usize| &negatives[i * k..(i + 1) * k];

    let mut out_rows = Vec::with_capacity(rows.len());
    let mut out_negs = Vec::with_capacity(negatives.len());
    let mut occupancy = Occupancy {
        seen: FxHashMap::default(),
        shared_queries: spec.mode == Mode::All,
    };
    let mut waiting: VecDeque<usize> = VecDeque::new();
    let mut deferred = 0;
    let mut next = 0;
    let mut batch: Vec<usize> = Vec::with_capacity(b);
    loop {
        batch.clear();
        occupancy.seen.clear();
        // Rows that waited go first, in order, so none waits longer than it must.
        let mut still_waiting = VecDeque::with_capacity(waiting.len());
        while let Some(i) = waiting.pop_front() {
            if batch.len() < b && occupancy.fits(data, &rows[i], negs_of(i)) {
                occupancy.insert(data, &rows[i], negs_of(i));
                batch.push(i);
            } else {
                still_waiting.push_back(i);
            }
        }
        waiting = still_waiting;
        while batch.len() < b && next < rows.len() {
            let i = next;
            next += 1;
            if occupancy.fits(data, &rows[i], negs_of(i)) {
                occupancy.insert(data, &rows[i], negs_of(i));
                batch.push(i);
            } else {
                deferred += 1;
                waiting.push_back(i);
            }
        }
        if batch.len() < b {
            break;
        }
        for &i in &batch {
            out_rows.push(rows[i]);
            out_negs.extend_from_slice(negs_of(i));
        }
    }
    let mut leftovers: Vec<usize> = batch.iter().copied().chain(waiting).collect();
    leftovers.sort_unstable();
    EpochPlan {
        epoch,
        batch_size: b,
        negatives_per_row: k,
        rows: out_rows,
        negatives: out_negs,
        leftovers: leftovers.into_iter().map(|i| rows[i]).collect(),
        deferred,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::{Cluster, DatasetBuilder};

    fn data(groups: &[(&str, &[&str])]) -> Dataset {
        let mut b = DatasetBuilder::new();
        for (q, p) in groups {
            b.add(q, p, &[], None).unwrap();
        }
        b.finish()
    }

    fn spec(batch_size: usize, mode: Mode) -> PlanSpec {
        PlanSpec {
            batch_size,
            mode,
            negatives_per_row: 0,
            fill_negatives: FillNegatives::Error,
            batching: Batching::Shuffled,
            seed: 1,
        }
    }

    #[test]
    fn shared_answer_never_shares_a_batch() {
        // Three questions share one answer: at most one of them per batch.
        let d = data(&[
            ("q1", &["shared", "a"]),
            ("q2", &["shared"]),
            ("q3", &["shared"]),
            ("q4", &["b"]),
            ("q5", &["c"]),
            ("q6", &["d"]),
        ]);
        for seed in 0..20 {
            let plan = plan_epoch(
                &d,
                &PlanSpec {
                    seed,
                    ..spec(2, Mode::All)
                },
                0,
            );
            for k in 0..plan.num_batches() {
                let shared = plan
                    .batch(k)
                    .rows
                    .iter()
                    .filter(|r| d.text(r.positive) == "shared")
                    .count();
                assert!(shared <= 1, "seed {seed} batch {k}");
            }
            assert_eq!(plan.planned_rows() + plan.leftovers.len(), d.pair_count());
        }
    }

    #[test]
    fn all_mode_keeps_a_groups_positives_together() {
        let d = data(&[
            ("q1", &["a", "b", "c"]),
            ("q2", &["d"]),
            ("q3", &["e"]),
            ("q4", &["f"]),
        ]);
        let plan = plan_epoch(&d, &spec(3, Mode::All), 0);
        let together = (0..plan.num_batches())
            .any(|k| plan.batch(k).rows.iter().filter(|r| r.group == 0).count() >= 2);
        assert!(together);
    }

    #[test]
    fn sample_mode_rotates_positives_across_epochs() {
        let d = data(&[("q1", &["a", "b", "c"]), ("q2", &["d"])]);
        let s = spec(2, Mode::Sample);
        let used: std::collections::BTreeSet<u32> = (0..3)
            .map(|e| plan_epoch(&d, &s, e))
            .flat_map(|p| p.batch(0).rows.to_vec())
            .filter(|r| r.group == 0)
            .map(|r| r.positive)
            .collect();
        assert_eq!(used.len(), 3, "each positive gets a turn in three epochs");
    }

    #[test]
    fn validate_explains_impossible_specs() {
        let d = data(&[("q1", &["a"]), ("q2", &["b"])]);
        assert!(
            validate(&d, &spec(3, Mode::Sample))
                .unwrap_err()
                .contains("larger than the 2 rows")
        );
        let mut s = spec(2, Mode::Sample);
        s.negatives_per_row = 1;
        assert!(
            validate(&d, &s)
                .unwrap_err()
                .contains("2 of 2 query groups have fewer hard negatives")
        );
    }

    /// 12 clusters of 8 single-answer questions each (labelled "t0".."t11").
    fn clustered() -> Dataset {
        let mut b = DatasetBuilder::new();
        for i in 0..96 {
            let label = Cluster::Name(format!("t{}", i % 12));
            b.add(&format!("q{i}"), &[&format!("a{i}")], &[], Some(&label))
                .unwrap();
        }
        b.finish()
    }

    #[test]
    fn by_cluster_batches_hold_one_cluster_each_and_plan_every_row() {
        let d = clustered();
        for mode in [Mode::Pairs, Mode::Sample, Mode::All] {
            for seed in 0..5 {
                let s = PlanSpec {
                    seed,
                    batching: Batching::ByCluster,
                    ..spec(8, mode)
                };
                validate(&d, &s).unwrap();
                let plan = plan_epoch(&d, &s, 0);
                assert_eq!(plan.num_batches(), 12, "{mode:?} seed {seed}");
                let mut first = Vec::new();
                for k in 0..12 {
                    let clusters: std::collections::BTreeSet<_> = plan
                        .batch(k)
                        .rows
                        .iter()
                        .map(|r| d.cluster(r.group as usize).unwrap())
                        .collect();
                    assert_eq!(clusters.len(), 1, "{mode:?} seed {seed} batch {k}");
                    first.extend(clusters);
                }
                if seed == 0 {
                    let shuffled = plan_epoch(&d, &spec(8, mode), 0);
                    let mixed = (0..12).any(|k| {
                        let b = shuffled.batch(k);
                        b.rows.iter().any(|r| {
                            d.cluster(r.group as usize) != d.cluster(b.rows[0].group as usize)
                        })
                    });
                    assert!(mixed, "the default batching mixes clusters");
                }
                let other = plan_epoch(
                    &d,
                    &PlanSpec {
                        seed: seed + 100,
                        ..s
                    },
                    0,
                );
                let other_first: Vec<_> = (0..12)
                    .map(|k| d.cluster(other.batch(k).rows[0].group as usize).unwrap())
                    .collect();
                assert_ne!(first, other_first, "the seed orders the clusters");
            }
        }
    }

    #[test]
    fn by_cluster_needs_every_group_labelled() {
        let mut b = DatasetBuilder::new();
        b.add("q1", &["a"], &[], Some(&Cluster::Id(1))).unwrap();
        b.add("q2", &["b"], &[], None).unwrap();
        let s = PlanSpec {
            batching: Batching::ByCluster,
            ..spec(2, Mode::Pairs)
        };
        let err = validate(&b.finish(), &s).unwrap_err();
        assert!(err.contains("query group 1 (\"q2\") has none"), "{err}");
    }
}
