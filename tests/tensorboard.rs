//! `output.tensorboard`: the event files multipos writes, read back by TensorBoard's own reader
//! (the pinned `tensorboard` Python package, installed into a cache on first use), hold every scalar
//! of `metrics.jsonl` at every step — loss by task, learning rate, gradient norm, rate, the parts of
//! the step's time, evaluation metrics — for `multipos train` and for a cluster (`launch`).
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use multipos::model::tiny::TinySpec;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A Python with the pinned TensorBoard, in `$MULTIPOS_CACHE/tbreader` (made once, from PyPI).
fn reader() -> PathBuf {
    let cache = common::cache_dir();
    let venv = cache.join("tbreader");
    let python = venv.join("bin/python");
    let req = repo("tests/reference/tensorboard-requirements.txt");
    let stamp = venv.join(".requirements");
    if std::fs::read(&stamp).ok() == std::fs::read(&req).ok() && python.exists() {
        return python;
    }
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    assert!(
        ok(Command::new("python3").args(["-m", "venv"]).arg(&venv)),
        "cannot make a Python venv at {} (python3 -m venv)",
        venv.display()
    );
    assert!(
        ok(Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&req)),
        "cannot install TensorBoard's reader from {} (PyPI must be reachable)",
        req.display()
    );
    std::fs::copy(&req, &stamp).unwrap();
    python
}

/// Every scalar under `dir` as TensorBoard reads it: tag -> [(step, value)].
fn read_board(dir: &Path) -> BTreeMap<String, Vec<(i64, f64)>> {
    let out = Command::new(reader())
        .arg(repo("tests/reference/read_tensorboard.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "TensorBoard's reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The scalars `metrics.jsonl` holds, tagged as the event files tag them.
fn expected(out: &Path) -> BTreeMap<String, Vec<(i64, f64)>> {
    let mut want: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let step = r["step"].as_i64();
        match (r["event"].as_str(), step) {
            (Some("step"), Some(step)) => {
                for (k, v) in r.as_object().unwrap() {
                    let Some(v) = v.as_f64() else { continue };
                    let tag = match k.as_str() {
                        "loss" => format!("loss/{}", r["task"].as_str().unwrap()),
                        "lr" | "grad_norm" | "pairs_per_s" => format!("train/{k}"),
                        "seconds" => "time/step".into(),
                        k if k.ends_with("_seconds") => {
                            format!("time/{}", k.trim_end_matches("_seconds"))
                        }
                        _ => continue,
                    };
                    want.entry(tag).or_default().push((step, v));
                }
            }
            (Some("eval"), Some(step)) => {
                for (k, v) in r["metrics"].as_object().unwrap() {
                    want.entry(format!("eval/{k}"))
                        .or_default()
                        .push((step, v.as_f64().unwrap()));
                }
            }
            _ => {}
        }
    }
    want
}

fn assert_board_matches_metrics(out: &Path, what: &str) {
    let want = expected(out);
    assert!(want.contains_key("loss/train") || want.keys().any(|k| k.starts_with("loss/")));
    assert!(
        want.keys().any(|k| k.starts_with("eval/")),
        "{what}: an evaluation was logged"
    );
    assert!(want.keys().any(|k| k.starts_with("time/")));
    let got = read_board(&out.join("tensorboard"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: the tags"
    );
    for (tag, points) in &want {
        let read = &got[tag];
        assert_eq!(read.len(), points.len(), "{what}: {tag} at every step");
        for ((s, v), (rs, rv)) in points.iter().zip(read) {
            assert_eq!(s, rs, "{what}: {tag}");
            // Summaries carry f32.
            assert!(
                (v - rv).abs() <= 1e-6 * v.abs().max(1e-30),
                "{what}: {tag} at step {s}: {v} vs {rv}"
            );
        }
    }
}

#[test]
fn train_and_a_cluster_write_every_scalar_at_every_step_for_tensorboard() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("single");
    let mut sets = common::tiny_config_sets(&model, &out);
    sets.extend([
        "output.tensorboard=true".into(),
        "eval.every_steps=2".into(),
    ]);
    common::run_tiny(&["train"], &sets);
    assert_board_matches_metrics(&out, "train");

    let out = dir.path().join("cluster");
    let mut sets = common::tiny_config_sets(&model, &out);
    sets.extend([
        "output.tensorboard=true".into(),
        "eval.every_steps=2".into(),
        "cluster.threads_per_worker=1".into(),
    ]);
    common::run_tiny(&["launch", "--workers", "2"], &sets);
    assert_board_matches_metrics(&out, "launch");
}
