//! `multipos mine` against sentence-transformers' `mine_hard_negatives`, and the memory its chunked
//! search saves, ratios measured in one run:
//!
//! 1. Speed: the same model (all-MiniLM-L6-v2), data (InsuranceQA small: 2,000 queries, 3,201
//!    positives as the corpus), threads and max_seq_length, 3 negatives, top; multipos without its
//!    embedding cache. Both timed with the model loaded (multipos: its logged mining time; the
//!    whole process is printed too). Target: >= 1.2x.
//! 2. Memory: exact top-10 search of 10,000 random unit queries in 100,000 corpus vectors (d = 384, a
//!    corpus 10x the query count), chunked as `mine` does vs the full score matrix, each in its own
//!    process (peak RSS).
//!
//!     deploy/pyref.sh && cargo bench --bench mine
//!
//! Env: BENCH_THREADS (default 2). Without ../shared/data the speed part uses bible_paraphrase_small.
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use tch::{Kind, Tensor};

const CHILD: &str = "MULTIPOS_BENCH_MINE_CHILD";

fn search_child(mode: &str) {
    tch::manual_seed(1);
    let unit = |n| {
        multipos::model::pooling::normalize_l2(&Tensor::randn(
            [n, 384],
            (Kind::Float, tch::Device::Cpu),
        ))
    };
    let (q, c) = (unit(10_000), unit(100_000));
    let start = Instant::now();
    if mode == "chunked" {
        let top = multipos::mine::search::top_k(&q, &c, 10, |_| {});
        assert_eq!(top.len(), 10_000);
    } else {
        let (s, _) = q.matmul(&c.transpose(0, 1)).topk(10, 1, true, true);
        assert_eq!(s.size(), [10_000, 10]);
    }
    eprintln!("{mode} search: {:.1} s", start.elapsed().as_secs_f64());
}

fn main() {
    if let Ok(mode) = std::env::var(CHILD) {
        search_child(&mode);
        return;
    }
    let threads = common::env_or("BENCH_THREADS", 2usize);
    tch::set_num_threads(threads as i32);
    let rss = |mode: &str| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.env(CHILD, mode);
        common::peak_rss_mib(c)
    };
    let (chunked, full) = (rss("chunked"), rss("full"));
    println!("search of 10,000 queries in 100,000 vectors (d = 384), top 10, peak RSS:");
    println!(
        "chunked {chunked:.0} MiB, full score matrix {full:.0} MiB: ratio full / chunked {:.1}",
        full / chunked
    );
    println!(
        "(the full matrix alone is {:.0} MiB; at 100k queries x 1M texts it would be {:.0} GiB)",
        10_000.0 * 100_000.0 * 4.0 / 1048576.0,
        100_000.0 * 1_000_000.0 * 4.0 / 1073741824.0
    );

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let train = common::shared_data("insuranceqa_small")
        .map(|d| d.join("train.jsonl"))
        .unwrap_or_else(|| root.join("deploy/data/bible_paraphrase_small/train.jsonl"));
    let model = multipos::model::default_dir();
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args([
            "mine",
            "--no-cache",
            "--device",
            "cpu",
            "--max-seq-length",
            "128",
            "--num-negatives",
            "3",
        ])
        .args(["--threads", &threads.to_string(), "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&train)
        .arg("--output")
        .arg(tmp.path().join("mined.jsonl"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(run.status.success());
    let whole = start.elapsed().as_secs_f64();
    // The region Python times: model loaded and data read, then mining and the output.
    let log = String::from_utf8_lossy(&run.stderr);
    let ours: f64 = log
        .split("seconds=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|v| v.parse().ok())
        .expect("mine logs its seconds");
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--train",
        &train.display().to_string(),
        "--num-negatives",
        "3",
        "--max-seq-length",
        "128",
        "--threads",
        &threads.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let theirs = common::run_python("mine_st.py", &args)["seconds"]
        .as_f64()
        .unwrap();
    println!(
        "mining {}, all-MiniLM-L6-v2, {threads} threads, 3 negatives:",
        train.display()
    );
    println!(
        "multipos mine {ours:.1} s (mining and writing, model loaded; {whole:.1} s the whole process), \
         sentence-transformers mine_hard_negatives {theirs:.1} s (the call alone, model loaded)"
    );
    println!(
        "ratio sentence-transformers / multipos time: {:.2} (target >= 1.2; against the whole process {:.2})",
        theirs / ours,
        theirs / whole
    );
}
