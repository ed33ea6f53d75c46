//! Embedding throughput of multipos vs. Python sentence-transformers: same model, texts, thread
//! count and batch size, measured in one run, reported as a ratio.
//!
//!     cargo bench --bench embed_throughput
//! Env: BENCH_TEXTS (default 1000), BENCH_THREADS (2), BENCH_BATCH (32), BENCH_ROUNDS (3).
mod common;

use std::io::Write;
use std::time::Instant;

use multipos::SentenceModel;

fn texts(n: usize) -> (String, Vec<String>) {
    let (source, path) = match common::shared_data("insuranceqa_small") {
        Some(dir) => (
            "insuranceqa_small corpus (answers)",
            dir.join("corpus.jsonl"),
        ),
        None => (
            "bundled bible_paraphrase_tiny corpus",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/data/bible_paraphrase_tiny/corpus.jsonl"),
        ),
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let texts: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .cycle()
        .take(n)
        .collect();
    (source.to_string(), texts)
}

fn main() {
    let n = common::env_or("BENCH_TEXTS", 1000usize);
    let threads = common::env_or("BENCH_THREADS", 2usize);
    let batch = common::env_or("BENCH_BATCH", 32usize);
    let rounds = common::env_or("BENCH_ROUNDS", 3usize);
    let (source, texts) = texts(n);
    let model_dir = multipos::model::default_dir();

    tch::set_num_threads(threads as i32);
    let model = SentenceModel::load(&model_dir, tch::Device::Cpu).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let _warmup = model.embed(&refs[..batch.min(n)], batch).unwrap();
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let start = Instant::now();
        let _vectors = model.embed(&refs, batch).unwrap();
        best = best.min(start.elapsed().as_secs_f64());
    }
    let ours = n as f64 / best;

    let mut file = tempfile::NamedTempFile::new().unwrap();
    for t in &texts {
        writeln!(file, "{}", serde_json::json!({ "text": t })).unwrap();
    }
    file.flush().unwrap();
    let args = [
        model_dir.display().to_string(),
        file.path().display().to_string(),
        threads.to_string(),
        batch.to_string(),
        rounds.to_string(),
    ];
    let theirs = common::run_python("bench_embed.py", &args)["texts_per_s"]
        .as_f64()
        .unwrap();

    println!("embedding throughput, all-MiniLM-L6-v2, {n} texts from the {source}");
    println!("threads {threads}, batch {batch}, best of {rounds} rounds");
    println!("multipos:              {ours:8.1} texts/s");
    println!("sentence-transformers: {theirs:8.1} texts/s");
    println!("ratio multipos / python: {:.2}", ours / theirs);
}
