//! Dropout on the CPU, per element: the first mask generator (V1, a hash chain computed in Rust and
//! copied into a tensor) against the current one (V2, SplitMix64 at a counter, as the tensor ops a
//! GPU runs too), each as the bare keep mask and as whole dropout (mask, scale, multiply), against
//! `torch.dropout`'s Bernoulli sampling measured in the same run. Shapes of all-MiniLM-L6-v2 at
//! batch 32 and 128 tokens: hidden states (32, 128, 384), attention probabilities
//! (32, 12, 128, 128).
//!
//!     cargo bench --bench masks
//! Env: BENCH_REPS (default 20), BENCH_THREADS (default 2).
mod common;

use std::time::Instant;

use multipos::model::dropout::{RowSeeds, dropout};
use multipos::model::masks::{self, MaskGenerator};
use tch::{Device, Kind, Tensor};

/// Median nanoseconds per element of `f` over `reps` runs (after one warm-up run).
fn ns_per_element(numel: usize, reps: usize, mut f: impl FnMut() -> Tensor) -> f64 {
    let _ = f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            let t = f();
            assert_eq!(t.numel(), numel);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2] * 1e9 / numel as f64
}

fn main() {
    let reps = common::env_or("BENCH_REPS", 20usize);
    tch::set_num_threads(common::env_or("BENCH_THREADS", 2i32));
    let (p, site) = (0.1, 4u64);
    let threshold = masks::threshold(p);
    println!(
        "{:<20} {:>10} | {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7}",
        "ns per element", "torch", "V1 mask", "V2 mask", "V1/V2", "V1 drop", "V2 drop", "V1/V2"
    );
    for shape in [vec![32i64, 128, 384], vec![32, 12, 128, 128]] {
        let numel = shape.iter().product::<i64>() as usize;
        let rows: Vec<u64> = (0..shape[0] as u64).map(|r| r * 0x9E37_79B9 + 1).collect();
        let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
        let torch = ns_per_element(numel, reps, || x.dropout(p, true));
        let v1_mask = ns_per_element(numel, reps, || {
            let lanes = masks::v1_lanes(&shape, &rows, site);
            Tensor::from_slice(&lanes)
                .view(shape.as_slice())
                .ge(threshold)
        });
        let keys = masks::v2_row_keys(&Tensor::from_slice(
            &rows.iter().map(|&s| s as i64).collect::<Vec<_>>(),
        ));
        let counters = masks::v2_counters(&shape, Device::Cpu);
        let v2_mask = ns_per_element(numel, reps, || {
            masks::v2_keep(&shape, &keys, &counters, site, threshold)
        });
        let drop = |g: MaskGenerator| {
            let seeds = RowSeeds::new(rows.clone(), g, Device::Cpu);
            ns_per_element(numel, reps, || dropout(&x, p, Some(&seeds), site))
        };
        let (v1, v2) = (drop(MaskGenerator::V1), drop(MaskGenerator::V2));
        println!(
            "{:<20} {torch:>10.2} | {v1_mask:>9.2} {v2_mask:>9.2} {:>6.2}x | {v1:>9.2} {v2:>9.2} {:>6.2}x",
            format!("{shape:?}"),
            v1_mask / v2_mask,
            v1 / v2,
        );
        println!(
            "{:<20} whole dropout against torch.dropout: V1 {:.2}x, V2 {:.2}x (below 1: faster)",
            "",
            v1 / torch,
            v2 / torch
        );
    }
}
