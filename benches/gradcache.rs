//! GradCache (`train.mini_batch_size`) on all-MiniLM-L6-v2, CPU, ratios measured in one run:
//!
//! 1. Memory: peak RSS of one `multipos train` process per setting, over 2 steps at max_seq_length 32:
//!    plain global batch 64, cached global batch 1024 (mini-batches of 32), plain global batch 1024.
//!    Target: cached 1024 within 1.3x of plain 64.
//! 2. Speed at global batch 64 (max_seq_length 128): cached (mini-batches of 32) vs plain multipos, and
//!    sentence-transformers' CachedMultipleNegativesRankingLoss on the same data and batch.
//!    Targets: cached <= 1.4x plain step time; >= 1.3x sentence-transformers' pairs/s.
//!
//!     deploy/pyref.sh && cargo bench --bench gradcache
//!
//! Env: BENCH_STEPS (default 5, speed part), BENCH_THREADS (default 2), BENCH_SKIP_PLAIN_1024=1 to
//! leave out the largest run. Data: ../shared/data/insuranceqa_small when present, else the bundled
//! bible_paraphrase_small.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `multipos train` and returns (peak RSS in MiB, mean seconds per step, the first included as
/// sentence-transformers' timing includes it).
fn train(cfg: &Path, out: &Path, sets: &[String]) -> (f64, f64) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_multipos"));
    cmd.arg("train")
        .arg("--config")
        .arg(cfg)
        .args(["--set", &format!("output.dir=\"{}\"", out.display())])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    for s in sets {
        cmd.args(["--set", s]);
    }
    let rss = common::peak_rss_mib(cmd);
    let steps = common::events(out, "step");
    let mean = steps
        .iter()
        .map(|v| v["seconds"].as_f64().unwrap())
        .sum::<f64>()
        / steps.len() as f64;
    (rss, mean)
}

fn main() {
    let steps = common::env_or("BENCH_STEPS", 5u64);
    let threads = common::env_or("BENCH_THREADS", 2usize);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let train_file = common::shared_data("insuranceqa_small")
        .map(|d| d.join("train.jsonl"))
        .unwrap_or_else(|| root.join("deploy/data/bible_paraphrase_small/train.jsonl"));
    let model = multipos::model::default_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\ndevice = \"cpu\"\nthreads = {threads}\n[data]\ntrain = {:?}\nmode = \"pairs\"\n\
             [train]\nlr = 2e-5\nseed = 42\nwarmup_steps = 0\n[output]\ndir = \"unused\"\n",
            model.display().to_string(),
            train_file.display().to_string()
        ),
    )
    .unwrap();
    let run = |name: &str, sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        train(&cfg, &tmp.path().join(name), &sets)
    };

    println!(
        "GradCache, all-MiniLM-L6-v2, {}, {threads} threads",
        train_file.display()
    );
    let mem = ["model.max_seq_length=32", "train.max_steps=2"];
    let (plain64, _) = run("m-plain64", &[mem[0], mem[1], "train.batch_size=64"]);
    let (cached1024, _) = run(
        "m-cached1024",
        &[
            mem[0],
            mem[1],
            "train.batch_size=1024",
            "train.mini_batch_size=32",
        ],
    );
    println!(
        "peak RSS, max_seq_length 32: plain B=64 {plain64:.0} MiB, cached B=1024 (mini 32) {cached1024:.0} MiB"
    );
    println!(
        "ratio cached B=1024 / plain B=64: {:.2} (target <= 1.3)",
        cached1024 / plain64
    );
    if std::env::var_os("BENCH_SKIP_PLAIN_1024").is_none() {
        let (plain1024, _) = run("m-plain1024", &[mem[0], mem[1], "train.batch_size=1024"]);
        println!(
            "plain B=1024 {plain1024:.0} MiB: ratio plain B=1024 / plain B=64 {:.2}",
            plain1024 / plain64
        );
    }

    let speed = format!("train.max_steps={steps}");
    let (_, plain) = run(
        "s-plain",
        &["model.max_seq_length=128", &speed, "train.batch_size=64"],
    );
    let (_, cached) = run(
        "s-cached",
        &[
            "model.max_seq_length=128",
            &speed,
            "train.batch_size=64",
            "train.mini_batch_size=32",
        ],
    );
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--train",
        &train_file.display().to_string(),
        "--batch-size",
        "64",
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
        "--cached-mini-batch",
        "32",
        "--skip-before",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let theirs = common::run_python("train_st.py", &args)["pairs_per_s"]
        .as_f64()
        .unwrap();
    let ours = 64.0 / cached;
    println!(
        "step time, B=64, max_seq_length 128: plain {plain:.2} s, cached (mini 32) {cached:.2} s"
    );
    println!(
        "ratio cached / plain step time: {:.2} (target <= 1.4)",
        cached / plain
    );
    println!("cached pairs/s: multipos {ours:.2}, sentence-transformers CachedMNRL {theirs:.2}");
    println!(
        "ratio multipos / sentence-transformers: {:.2} (target >= 1.3)",
        ours / theirs
    );
}
