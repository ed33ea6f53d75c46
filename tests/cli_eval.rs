//! `multipos eval` end to end: metrics printed, the last stdout line a JSON object, bad qrels named.
mod common;

use std::path::Path;

use assert_cmd::Command;
use multipos::model::tiny::TinySpec;

fn eval(model: &Path, qrels: &Path) -> std::process::Output {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/data/bible_paraphrase_tiny");
    Command::cargo_bin("multipos")
        .unwrap()
        .args([
            "eval",
            "--device",
            "cpu",
            "--max-seq-length",
            "32",
            "--model",
        ])
        .arg(model)
        .arg("--queries")
        .arg(data.join("dev_queries.jsonl"))
        .arg("--corpus")
        .arg(data.join("corpus.jsonl"))
        .arg("--qrels")
        .arg(qrels)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn prints_metrics_with_a_json_last_line() {
    let (_dir, model) = common::tiny_model(&TinySpec::default());
    let qrels = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/data/bible_paraphrase_tiny/dev_qrels.tsv");
    let out = eval(&model, &qrels);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for key in [
        "ndcg@10",
        "mrr@10",
        "recall@10",
        "map@100",
        "accuracy@1",
        "precision@5",
    ] {
        let v = last[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {stdout}"));
        assert!((0.0..=1.0).contains(&v));
    }
    assert!(stdout.contains("16 queries"), "{stdout}");
}

#[test]
fn unknown_ids_in_qrels_are_reported_with_file_and_line() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let qrels = dir.path().join("bad_qrels.tsv");
    std::fs::write(&qrels, "query-id\tcorpus-id\tscore\ndev-0\tnope\t1\n").unwrap();
    let out = eval(&model, &qrels);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad_qrels.tsv:2:"),
        "{err}"
    );
}
