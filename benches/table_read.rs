//! Peak memory of reading training data: 1M query-group rows (a query, a list of 1-5 positives) as
//! Parquet against the same rows as JSONL, each loaded into a dataset in a process of its own. The
//! baseline is the JSONL reader, measured in the same run; both keep the same texts, so a Parquet
//! reader that held the file (or its decoded columns) whole would show up as the difference.
//!
//!     cargo bench --bench table_read
//! Env: BENCH_ROWS (default 1000000).
mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use multipos::data::{LoadOptions, load_files};
use parquet::arrow::ArrowWriter;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Writes the same rows as JSONL and as Parquet (the parquet crate's default row groups, 1M rows:
/// the whole file is one row group, the hardest case for a reader that must not hold it whole).
fn write_data(dir: &Path, rows: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut jsonl = std::io::BufWriter::new(std::fs::File::create(dir.join("d.jsonl")).unwrap());
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("query", arrow_schema::DataType::Utf8, false),
        arrow_schema::Field::new(
            "positives",
            arrow_schema::DataType::List(Arc::new(arrow_schema::Field::new(
                "item",
                arrow_schema::DataType::Utf8,
                true,
            ))),
            false,
        ),
    ]));
    let file = std::fs::File::create(dir.join("d.parquet")).unwrap();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), None).unwrap();
    let chunk = 65_536;
    for start in (0..rows).step_by(chunk) {
        let mut q = StringBuilder::new();
        let mut p = ListBuilder::new(StringBuilder::new());
        for g in start..(start + chunk).min(rows) {
            let query = format!("how does question number {g} get its answer, asked a user");
            let n = rng.random_range(1..=5);
            let positives: Vec<String> = (0..n)
                .map(|j| format!("answer {j} to question {g}: a paragraph that explains it"))
                .collect();
            serde_json::to_writer(
                &mut jsonl,
                &serde_json::json!({"query": query, "positives": positives}),
            )
            .unwrap();
            jsonl.write_all(b"\n").unwrap();
            q.append_value(&query);
            for a in &positives {
                p.values().append_value(a);
            }
            p.append(true);
        }
        let columns: Vec<ArrayRef> = vec![Arc::new(q.finish()), Arc::new(p.finish())];
        writer
            .write(&RecordBatch::try_new(schema.clone(), columns).unwrap())
            .unwrap();
    }
    writer.close().unwrap();
    jsonl.flush().unwrap();
}

/// In a child: loads `path` and prints "seconds peak_rss_mib groups".
fn load_one(path: &Path) {
    let start = Instant::now();
    let data = load_files(&[path.to_path_buf()], LoadOptions::default()).unwrap();
    println!(
        "{} {} {}",
        start.elapsed().as_secs_f64(),
        common::own_peak_rss_mib(),
        data.len()
    );
}

fn measure(path: &Path) -> (f64, f64, usize) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--load")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<&str> = text.split_whitespace().collect();
    (
        f[0].parse().unwrap(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--load") {
        load_one(Path::new(&args[i + 1]));
        return;
    }
    let rows = common::env_or("BENCH_ROWS", 1_000_000usize);
    let dir = tempfile::tempdir().unwrap();
    write_data(dir.path(), rows);
    let size =
        |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len() as f64 / 1048576.0;
    let (jsonl_mib, parquet_mib) = (size("d.jsonl"), size("d.parquet"));
    // Twice each, alternating, so that the page cache favours neither.
    let mut results = Vec::new();
    for _ in 0..2 {
        results.push(("jsonl", measure(&dir.path().join("d.jsonl"))));
        results.push(("parquet", measure(&dir.path().join("d.parquet"))));
    }
    for (name, (s, rss, groups)) in &results {
        println!("{name:8} {groups} groups in {s:.2} s, peak RSS {rss:.0} MiB");
    }
    let best = |n: &str| {
        results
            .iter()
            .filter(|(name, _)| *name == n)
            .map(|(_, r)| *r)
            .fold((f64::MAX, f64::MAX), |(s, m), (rs, rm, _)| {
                (s.min(rs), m.min(rm))
            })
    };
    let (js, jm) = best("jsonl");
    let (ps, pm) = best("parquet");
    println!(
        "{rows} rows: files JSONL {jsonl_mib:.0} MiB, Parquet {parquet_mib:.0} MiB; peak RSS Parquet {pm:.0} MiB vs JSONL {jm:.0} MiB = {:.2}x; load time {ps:.2} s vs {js:.2} s = {:.2}x",
        pm / jm,
        ps / js
    );
}
