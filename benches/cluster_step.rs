//! Step time of a cluster run on all-MiniLM-L6-v2: W = 2 workers × 1 thread vs W = 1 × 2 threads on
//! the same global batches (32 rows, max_seq_length 128), with the share of each step spent in
//! communication (all-gather of embeddings + all-reduce of ~91 MB of gradients over loopback), on
//! each data plane (`cluster.collective` = grpc, gloo), all in one run.
//!
//!     cargo bench --bench cluster_step
//! Env: BENCH_STEPS (default 8). Data: ../shared/data/insuranceqa_small when present, else the
//! bundled bible_paraphrase_small.
mod common;

use std::path::PathBuf;

fn main() {
    let n = common::env_or("BENCH_STEPS", 8u64);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let train = common::shared_data("insuranceqa_small")
        .map(|d| d.join("train.jsonl"))
        .unwrap_or_else(|| root.join("deploy/data/bible_paraphrase_small/train.jsonl"));
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    // One worker never communicates, whatever the plane: its runs, first and last, are the
    // baseline of both planes (their mean, so drift over the run counts against neither).
    let runs = [
        ("grpc", 1usize, 2usize),
        ("grpc", 2, 1),
        ("gloo", 2, 1),
        ("gloo", 1, 2),
    ];
    for (i, (plane, workers, threads)) in runs.into_iter().enumerate() {
        let out = tmp.path().join(format!("{i}"));
        let status = common::launch_command(workers, &out)
            .args(["--set", &format!("cluster.collective=\"{plane}\"")])
            .args(["--set", &format!("data.train=\"{}\"", train.display())])
            .args([
                "--set",
                "model.max_seq_length=128",
                "--set",
                &format!("train.max_steps={n}"),
            ])
            .args(["--set", &format!("cluster.threads_per_worker={threads}")])
            .status()
            .unwrap();
        assert!(status.success());
        // The first step pays for allocator and thread-pool warm-up: leave it out.
        let s = common::events(&out, "step");
        let body = &s[1..];
        let mean =
            |k: &str| body.iter().map(|v| v[k].as_f64().unwrap()).sum::<f64>() / body.len() as f64;
        rows.push((
            plane,
            workers,
            threads,
            mean("seconds"),
            mean("comm_seconds"),
        ));
    }
    println!(
        "cluster step time, all-MiniLM-L6-v2, batch 32, max_seq_length 128, {}, mean of steps 2..{n}",
        train.display()
    );
    for (plane, w, t, step, comm) in &rows {
        let plane = if *w == 1 { "one worker" } else { plane };
        println!(
            "{plane}: W={w} x {t} thread(s): {step:.2} s/step, communication {comm:.2} s ({:.1} % of the step)",
            100.0 * comm / step
        );
    }
    let baseline = (rows[0].3 + rows[3].3) / 2.0;
    for (plane, _, _, step, _) in &rows[1..3] {
        println!(
            "{plane}: cluster overhead, step time W=2x1 / W=1x2: {:.2}",
            step / baseline
        );
    }
}
