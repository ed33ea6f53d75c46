//! Training throughput (pairs/s) of multipos vs. Python sentence-transformers: all-MiniLM-L6-v2,
//! batch 32, max_seq_length 128, lr 2e-5, MNRL scale 20, same data, same thread count, one run,
//! reported as a ratio. multipos runs its single-process training run (`multipos train`'s: mode
//! `pairs`, the next step prepared ahead, length-bucketed micro-batches, seeded dropout); Python runs
//! SentenceTransformerTrainer with NO_DUPLICATES. Both are timed over their training loop.
//!
//!     deploy/pyref.sh && cargo bench --bench train_throughput
//! Env: BENCH_STEPS (default 12), BENCH_THREADS (2). Data: ../shared/data/insuranceqa_small when
//! present, else the bundled bible_paraphrase_small.
mod common;

use std::path::PathBuf;

use multipos::config::RunConfig;

fn main() {
    let steps = common::env_or("BENCH_STEPS", 12u64);
    let threads = common::env_or("BENCH_THREADS", 2usize);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let train = common::shared_data("insuranceqa_small")
        .map(|d| d.join("train.jsonl"))
        .unwrap_or_else(|| root.join("deploy/data/bible_paraphrase_small/train.jsonl"));
    let model_dir = multipos::model::default_dir();

    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = tmp.path().join("bench.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[model]\npath = {:?}\nmax_seq_length = 128\ndevice = \"cpu\"\nthreads = {threads}\n\
             [data]\ntrain = {:?}\nmode = \"pairs\"\n[train]\nbatch_size = 32\nmax_steps = {steps}\nlr = 2e-5\nseed = 42\n\
             [output]\ndir = {:?}\n",
            model_dir.display().to_string(),
            train.display().to_string(),
            tmp.path().join("out").display().to_string()
        ),
    )
    .unwrap();
    let cfg = RunConfig::load(&cfg_path, &[]).unwrap();
    let ours = multipos::train::run(&cfg, multipos::progress::Show::OFF)
        .unwrap()
        .pairs_per_s;

    let args: Vec<String> = [
        "--model",
        &model_dir.display().to_string(),
        "--train",
        &train.display().to_string(),
        "--batch-size",
        "32",
        "--lr",
        "2e-5",
        "--max-steps",
        &steps.to_string(),
        "--max-seq-length",
        "128",
        "--seed",
        "42",
        "--threads",
        &threads.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let theirs = common::run_python("train_st.py", &args)["pairs_per_s"]
        .as_f64()
        .unwrap();

    println!(
        "training throughput, all-MiniLM-L6-v2, {} ({steps} steps of 32 pairs, max_seq_length 128)",
        train.display()
    );
    println!("threads {threads}");
    println!("multipos:              {ours:7.2} pairs/s");
    println!("sentence-transformers: {theirs:7.2} pairs/s");
    println!("ratio multipos / python: {:.2}", ours / theirs);
}
