//! Validation during a cluster run (real worker processes over loopback gRPC): the workers embed
//! the validation texts in pages and the coordinator scores once; the metrics equal `multipos eval`
//! on the same weights, the best checkpoint survives pruning, and patience and `keep_best` behave as
//! in one process.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `multipos launch --workers W` on configs/tiny.toml with `sets`; panics unless it succeeds.
fn launch(workers: usize, model: &Path, out: &Path, sets: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_multipos"));
    cmd.args(["launch", "--workers", &workers.to_string(), "--config"])
        .arg(repo("configs/tiny.toml"))
        .current_dir(repo(""));
    let fixed = [
        format!("model.path=\"{}\"", model.display()),
        format!("output.dir=\"{}\"", out.display()),
        "cluster.threads_per_worker=1".into(),
        "cluster.heartbeat_timeout_ms=4000".into(),
    ];
    for s in fixed.iter().map(String::as_str).chain(sets.iter().copied()) {
        cmd.arg("--set").arg(s);
    }
    let output = cmd
        .env("RUST_LOG", "warn")
        .env_remove("MULTIPOS_CLUSTER_TOKEN")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "launch {sets:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `multipos eval` of `model` on the tiny dev set, as the run's model settings embed it.
fn eval(model: &Path) -> BTreeMap<String, f64> {
    let data = repo("deploy/data/bible_paraphrase_tiny");
    let output = Command::new(env!("CARGO_BIN_EXE_multipos"))
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
        .arg(data.join("dev_qrels.tsv"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn logged_metrics(e: &serde_json::Value) -> BTreeMap<String, f64> {
    serde_json::from_value(e["metrics"].clone()).unwrap()
}

fn assert_same_metrics(logged: &BTreeMap<String, f64>, direct: &BTreeMap<String, f64>, what: &str) {
    assert!(logged.len() >= 15, "{what}: {logged:?}");
    for (k, v) in logged {
        let d = direct
            .get(k)
            .unwrap_or_else(|| panic!("{what}: {k} missing"));
        assert!(
            (v - d).abs() <= 1e-6,
            "{what}: {k} = {v} sharded, {d} by multipos eval"
        );
    }
}

#[test]
fn sharded_validation_equals_multipos_eval_and_the_best_checkpoint_is_never_pruned() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("run");
    // 16 steps, evaluated at 0, 4, 8, 12 and 16; a checkpoint every 4 steps, only the newest kept.
    // Lower NDCG counts as better, so the best evaluation comes before the end and its checkpoint
    // must outlive the newer ones.
    launch(
        3,
        &model,
        &out,
        &[
            "train.batch_size=6",
            "train.epochs=2",
            "train.max_steps=16",
            "eval.at_start=true",
            "eval.every_steps=4",
            "eval.greater_is_better=false",
            "output.checkpoint_every_steps=4",
            "output.keep_checkpoints=1",
        ],
    );
    let evals = common::events(&out, "eval");
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 4, 8, 12, 16], "each evaluation once");
    // The end: the uploaded model, scored in one process.
    assert_same_metrics(
        &logged_metrics(&evals[4]),
        &eval(&out.join("model")),
        "step 16",
    );
    // The start: the untrained model.
    assert_same_metrics(&logged_metrics(&evals[0]), &eval(&model), "step 0");

    let best: Vec<serde_json::Value> = common::events(&out, "best");
    let best_step = best.last().unwrap()["step"].as_u64().unwrap();
    let best_value = best.last().unwrap()["value"].as_f64().unwrap();
    let by_step: BTreeMap<u64, f64> = evals
        .iter()
        .map(|e| {
            (
                e["step"].as_u64().unwrap(),
                e["metrics"]["ndcg@10"].as_f64().unwrap(),
            )
        })
        .collect();
    let top = by_step.values().copied().fold(f64::MAX, f64::min);
    assert_eq!(best_value, top);
    assert_eq!(
        by_step[&best_step], top,
        "the first step with the top value"
    );
    assert!(by_step.range(..best_step).all(|(_, v)| *v > top));
    assert!(best_step < 16, "training made NDCG worse: {by_step:?}");
    // Pruning kept only the newest checkpoint, and the best one.
    let ckpts: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    let mut want = vec![
        multipos::train::checkpoint::name(16),
        multipos::train::checkpoint::name(best_step),
    ];
    want.sort();
    want.dedup();
    let mut got = ckpts.clone();
    got.sort();
    assert_eq!(got, want);
    // model-best/ is the best step's weights: it scores the best value.
    assert_same_metrics(
        &logged_metrics(&evals[steps.iter().position(|s| *s == best_step).unwrap()]),
        &eval(&out.join("model-best")),
        "model-best",
    );
    let ckpt_model = out
        .join("checkpoints")
        .join(multipos::train::checkpoint::name(best_step))
        .join("model");
    assert_eq!(
        common::dir_files(&ckpt_model)["model.safetensors"],
        common::dir_files(&out.join("model-best"))["model.safetensors"]
    );
}

#[test]
fn patience_stops_the_cluster_at_the_right_step_and_keep_best_keeps_the_best_model() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.0,
        ..TinySpec::default()
    });
    let out = dir.path().join("run");
    // Lower NDCG counts as better, so training makes it worse and patience runs out.
    launch(
        2,
        &model,
        &out,
        &[
            "train.epochs=10",
            "train.lr=3e-3",
            "eval.every_steps=2",
            "eval.patience=2",
            "eval.greater_is_better=false",
            "eval.keep_best=true",
        ],
    );
    let evals = common::events(&out, "eval");
    let stops = common::events(&out, "early_stop");
    assert_eq!(stops.len(), 1, "the run stopped early");
    let stopped_at = stops[0]["step"].as_u64().unwrap();
    let (step, (best_step, best_value)) =
        common::first_stop_lower_is_better(&evals, 2).expect("two evaluations without a new best");
    assert_eq!(
        stopped_at, step,
        "stopped at the first evaluation the rule names"
    );
    assert!(stopped_at < 80);
    assert_eq!(stops[0]["best_step"].as_u64(), Some(best_step));
    assert_eq!(evals.last().unwrap()["step"].as_u64(), Some(stopped_at));
    let steps = common::step_losses(&out.join("metrics.jsonl")).len() as u64;
    assert_eq!(steps, stopped_at, "no step after the stop");
    let done = common::events(&out, "done");
    assert_eq!(done[0]["steps"].as_u64(), Some(stopped_at));
    let kept = eval(&out.join("model"));
    assert!(
        (kept["ndcg@10"] - best_value).abs() <= 1e-6,
        "model/ is the best evaluation ({best_value} at step {best_step}), got {}",
        kept["ndcg@10"]
    );
}
