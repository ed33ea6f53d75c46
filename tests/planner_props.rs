//! Planner properties on random, heavily duplicated data over many seeds and every mode (sample,
//! all, pairs) and both batchings (shuffled, by cluster): no conflict inside any global batch, every
//! pair of an epoch placed exactly once or reported, same seed -> same plan.
use std::collections::{BTreeMap, HashMap};

use multipos::data::{
    Batching, Cluster, Dataset, DatasetBuilder, FillNegatives, Mode, PlanSpec, Row, plan_epoch,
    planner,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Random groups drawing texts from a small pool, so texts repeat across groups and roles; a few
/// spellings differ only in whitespace, which must count as the same text. `clustered`: each group
/// also gets one of `groups / 10` cluster labels.
fn random_data(
    seed: u64,
    groups: usize,
    pool: usize,
    with_negatives: bool,
    clustered: bool,
) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let text = |rng: &mut ChaCha8Rng| {
        let i = rng.random_range(0..pool);
        if rng.random_bool(0.2) {
            format!("  text   {i} ")
        } else {
            format!("text {i}")
        }
    };
    let mut b = DatasetBuilder::new();
    for g in 0..groups {
        let query = if rng.random_bool(0.1) {
            text(&mut rng)
        } else {
            format!("query {g}")
        };
        let positives: Vec<String> = (0..rng.random_range(1..5))
            .map(|_| text(&mut rng))
            .collect();
        let negatives: Vec<String> = if with_negatives {
            (0..rng.random_range(2..6))
                .map(|_| text(&mut rng))
                .collect()
        } else {
            Vec::new()
        };
        let p: Vec<&str> = positives.iter().map(String::as_str).collect();
        let n: Vec<&str> = negatives.iter().map(String::as_str).collect();
        // A function of the query's identity: a repeated query keeps its label.
        let identity: u64 = query
            .split_whitespace()
            .flat_map(str::bytes)
            .map(u64::from)
            .sum();
        let label = clustered.then(|| Cluster::Id(identity * 31 % (groups as u64 / 10)));
        b.add(&query, &p, &n, label.as_ref()).unwrap();
    }
    b.finish()
}

fn check_no_conflict(data: &Dataset, rows: &[Row], negs: &[u32], k: usize, mode: Mode, what: &str) {
    let mut seen: HashMap<u64, (u32, bool)> = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        let mut texts = vec![
            (data.hash(row.query), true),
            (data.hash(row.positive), false),
        ];
        texts.extend(
            negs[i * k..(i + 1) * k]
                .iter()
                .map(|&n| (data.hash(n), false)),
        );
        for (h, is_query) in texts {
            if let Some(&(g, q)) = seen.get(&h) {
                let allowed = mode == Mode::All && g == row.group && q && is_query;
                assert!(
                    allowed,
                    "{what}: text {:?} twice in one batch",
                    data.text(row.query)
                );
            }
            seen.insert(h, (row.group, is_query));
        }
    }
    if mode != Mode::All {
        let mut groups: Vec<u32> = rows.iter().map(|r| r.group).collect();
        groups.sort_unstable();
        groups.dedup();
        assert_eq!(
            groups.len(),
            rows.len(),
            "{what}: a query group twice in one batch"
        );
    }
}

/// A filled row keeps its group's own negatives first, and nothing in it repeats or belongs to its group.
fn check_filled_rows(data: &Dataset, rows: &[Row], negs: &[u32], k: usize, what: &str) {
    for (i, row) in rows.iter().enumerate() {
        let g = row.group as usize;
        let mine = &negs[i * k..(i + 1) * k];
        let own = data.negatives(g);
        if own.len() < k {
            assert_eq!(&mine[..own.len()], own, "{what}: own negatives first");
        }
        let mut hashes: Vec<u64> = mine.iter().map(|&n| data.hash(n)).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), k, "{what}: a negative twice in one row");
        for &n in mine {
            assert_ne!(n, data.query(g), "{what}: the query as its own negative");
            assert!(
                !data.positives(g).contains(&n),
                "{what}: a positive of the group as its negative"
            );
        }
    }
}

#[test]
fn random_duplicated_data_plans_are_conflict_free_complete_and_deterministic() {
    let mut checked_batches = 0;
    let mut filled_batches = 0;
    let mut by_mode: HashMap<String, usize> = HashMap::new();
    for seed in 0..60u64 {
        let with_negatives = seed % 4 == 0;
        let by_cluster = seed % 2 == 1;
        let data = random_data(
            seed,
            150 + (seed as usize % 7) * 40,
            120 + (seed as usize % 5) * 60,
            with_negatives,
            by_cluster,
        );
        let mode = [Mode::Sample, Mode::All, Mode::Pairs][seed as usize % 3];
        // Every other seed with negatives asks for more than most groups list, and fills.
        let fill = seed % 8 == 0;
        let spec = PlanSpec {
            batch_size: [4, 8, 16][(seed / 3) as usize % 3],
            mode,
            negatives_per_row: match (with_negatives, fill) {
                (false, _) => 0,
                (true, false) => 2,
                (true, true) => 4,
            },
            fill_negatives: if fill {
                FillNegatives::Random
            } else {
                FillNegatives::Error
            },
            batching: if by_cluster {
                Batching::ByCluster
            } else {
                Batching::Shuffled
            },
            seed,
        };
        if fill {
            assert!(planner::short_of_negatives(&data, 4) > 0, "seed {seed}");
        }
        if planner::validate(&data, &spec).is_err() {
            continue;
        }
        for epoch in 0..3 {
            let plan = plan_epoch(&data, &spec, epoch);
            let what = format!("seed {seed} epoch {epoch} {mode:?} {:?}", spec.batching);
            let mut placed: BTreeMap<(u32, u32), usize> = BTreeMap::new();
            for k in 0..plan.num_batches() {
                let b = plan.batch(k);
                assert_eq!(b.rows.len(), spec.batch_size);
                check_no_conflict(
                    &data,
                    b.rows,
                    b.negatives,
                    spec.negatives_per_row,
                    mode,
                    &what,
                );
                if fill {
                    check_filled_rows(&data, b.rows, b.negatives, 4, &what);
                    filled_batches += 1;
                }
                for r in b.rows {
                    *placed.entry((r.group, r.positive)).or_default() += 1;
                }
                checked_batches += 1;
                *by_mode.entry(format!("{mode:?}")).or_default() += 1;
            }
            for r in &plan.leftovers {
                *placed.entry((r.group, r.positive)).or_default() += 1;
            }
            // Exactly the rows the epoch owes: every pair in mode all, one per group in mode sample.
            assert!(
                placed.values().all(|&n| n == 1),
                "{what}: a pair used twice"
            );
            match mode {
                Mode::All | Mode::Pairs => assert_eq!(placed.len(), data.pair_count(), "{what}"),
                Mode::Sample => {
                    assert_eq!(placed.len(), data.len(), "{what}");
                    for g in 0..data.len() as u32 {
                        assert!(
                            placed.keys().any(|&(pg, _)| pg == g),
                            "{what}: group {g} missing"
                        );
                    }
                }
            }
            assert_eq!(
                plan,
                plan_epoch(&data, &spec, epoch),
                "{what}: same seed must give the same plan"
            );
        }
        let other = PlanSpec {
            seed: seed + 1000,
            ..spec
        };
        assert_ne!(
            plan_epoch(&data, &spec, 0),
            plan_epoch(&data, &other, 0),
            "seed {seed}: seeds must matter"
        );
    }
    assert!(
        checked_batches > 1000,
        "too few batches checked: {checked_batches}"
    );
    for mode in ["Sample", "All", "Pairs"] {
        let n = by_mode.get(mode).copied().unwrap_or(0);
        assert!(n > 200, "too few {mode} batches checked: {n}");
    }
    assert!(
        filled_batches > 50,
        "too few filled batches checked: {filled_batches}"
    );
}

#[test]
fn a_text_in_every_group_is_spread_one_per_batch() {
    // The worst case: one answer shared by 40 questions. Each batch may hold one of them, so the
    // rest wait, the plan still uses every row it can, and the remainder is reported.
    let mut b = DatasetBuilder::new();
    for g in 0..40 {
        b.add(
            &format!("q{g}"),
            &["the shared answer", &format!("own {g}")],
            &[],
            None,
        )
        .unwrap();
    }
    let data = b.finish();
    let spec = PlanSpec {
        batch_size: 8,
        mode: Mode::All,
        negatives_per_row: 0,
        fill_negatives: FillNegatives::Error,
        batching: Batching::Shuffled,
        seed: 3,
    };
    let plan = plan_epoch(&data, &spec, 0);
    for k in 0..plan.num_batches() {
        let shared = plan
            .batch(k)
            .rows
            .iter()
            .filter(|r| data.text(r.positive) == "the shared answer")
            .count();
        assert!(shared <= 1);
    }
    assert_eq!(plan.planned_rows() + plan.leftovers.len(), 80);
    assert!(plan.deferred > 0);
}
