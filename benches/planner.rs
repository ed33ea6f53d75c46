//! Planning speed and memory on 1M query groups / 3M positives (mode `all`, B = 256), against a
//! baseline measured in the same run: a plain seeded shuffle of the same rows (what a sampler that
//! ignores conflicts would cost).
//!
//!     cargo bench --bench planner
//! Env: BENCH_GROUPS (default 1000000).
mod common;

use std::time::Instant;

use multipos::data::{Batching, DatasetBuilder, FillNegatives, Mode, PlanSpec, plan_epoch};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() {
    let groups = common::env_or("BENCH_GROUPS", 1_000_000usize);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let start = Instant::now();
    let mut b = DatasetBuilder::new();
    // 3 positives per group on average; 2 % of positives are drawn from a shared pool of 5,000
    // answers, so conflicts really occur (as with InsuranceQA's shared answers).
    for g in 0..groups {
        let n = rng.random_range(1..=5);
        let positives: Vec<String> = (0..n)
            .map(|j| {
                if rng.random_bool(0.02) {
                    format!("shared answer {}", rng.random_range(0..5000))
                } else {
                    format!("answer {g}-{j}")
                }
            })
            .collect();
        let refs: Vec<&str> = positives.iter().map(String::as_str).collect();
        b.add(&format!("question {g}"), &refs, &[], None).unwrap();
    }
    let data = b.finish();
    let load_s = start.elapsed().as_secs_f64();
    let rss_data = common::own_peak_rss_mib();

    let spec = PlanSpec {
        batch_size: 256,
        mode: Mode::All,
        negatives_per_row: 0,
        fill_negatives: FillNegatives::Error,
        batching: Batching::Shuffled,
        seed: 7,
    };
    let start = Instant::now();
    let plan = plan_epoch(&data, &spec, 0);
    let plan_s = start.elapsed().as_secs_f64();
    let rows = plan.planned_rows() + plan.leftovers.len();

    let start = Instant::now();
    let mut baseline: Vec<(u32, u32)> = (0..data.len() as u32)
        .flat_map(|g| data.positives(g as usize).iter().map(move |&p| (g, p)))
        .collect();
    baseline.shuffle(&mut ChaCha8Rng::seed_from_u64(7));
    let shuffle_s = start.elapsed().as_secs_f64();

    println!(
        "planner: {} groups, {} positives, {} distinct texts (built in {load_s:.1} s)",
        data.len(),
        data.pair_count(),
        data.stats().distinct_texts
    );
    println!(
        "plan: {} batches of {}, {} rows deferred at least once, {} leftovers",
        plan.num_batches(),
        spec.batch_size,
        plan.deferred,
        plan.leftovers.len()
    );
    println!(
        "conflict-free planning: {:.2} s = {:.2} M rows/s",
        plan_s,
        rows as f64 / plan_s / 1e6
    );
    println!(
        "baseline plain shuffle: {:.2} s = {:.2} M rows/s",
        shuffle_s,
        rows as f64 / shuffle_s / 1e6
    );
    println!("ratio planner / shuffle time: {:.1}", plan_s / shuffle_s);
    println!(
        "peak RSS: {:.0} MiB (data alone {:.0} MiB)",
        common::own_peak_rss_mib(),
        rss_data
    );
}
