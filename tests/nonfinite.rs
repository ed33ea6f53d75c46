//! A diverging run (learning rate 1e30: after the first update the activations overflow) in one process
//! and in the cluster: `train.on_nonfinite = "abort"` stops at the first non-finite step with a clear
//! error and leaves the last checkpoint as the last good state; `"skip"` discards such steps, logs
//! each, and gives up after three in a row.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn diverge(cmd: &[&str], model: &Path, out: &Path, policy: &str) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_multipos"));
    c.args(cmd)
        .arg("--config")
        .arg(repo("configs/tiny.toml"))
        .current_dir(repo(""));
    for s in [
        format!("model.path=\"{}\"", model.display()),
        format!("output.dir=\"{}\"", out.display()),
        "train.lr=1e30".into(),
        "train.max_steps=8".into(),
        "train.warmup_steps=0".into(),
        "train.max_grad_norm=0".into(),
        "eval.at_start=false".into(),
        "output.checkpoint_every_steps=1".into(),
        "cluster.threads_per_worker=1".into(),
        format!("train.on_nonfinite=\"{policy}\""),
    ] {
        c.arg("--set").arg(s);
    }
    c.env("RUST_LOG", "warn")
        .env_remove("MULTIPOS_CLUSTER_TOKEN")
        .output()
        .unwrap()
}

/// Checks the run failed for divergence, and that its newest checkpoint is a finite state from
/// before the first non-finite step.
fn assert_diverged(out: &Output, dir: &Path, what: &str, reason: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: the run must fail");
    assert!(
        err.contains(reason) && err.contains("diverged"),
        "{what}: {err}"
    );
    assert!(!dir.join("model").exists(), "{what}: no final model");
    let (ckpt, state) = multipos::train::checkpoint::latest_valid(&dir.join("checkpoints"))
        .unwrap()
        .expect("a checkpoint");
    // Steps done: the applied ones and the skipped ones (their batches are passed over).
    let done =
        common::step_losses(&dir.join("metrics.jsonl")).len() + common::events(dir, "skip").len();
    assert_eq!(
        state.step, done as u64,
        "{what}: the newest checkpoint is the last step done"
    );
    for (name, values) in common::saved_tensors(&ckpt.join("model")) {
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{what}: {name} in the checkpoint"
        );
    }
}

#[test]
fn a_diverging_run_aborts_or_skips_in_one_process_and_in_the_cluster() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    for (cmd, name) in [
        (&["train"][..], "single"),
        (&["launch", "--workers", "2"][..], "cluster"),
    ] {
        let out = dir.path().join(format!("{name}-abort"));
        let o = diverge(cmd, &model, &out, "abort");
        assert_diverged(&o, &out, &format!("{name}, abort"), "is NaN");
        assert!(common::events(&out, "skip").is_empty());

        let out = dir.path().join(format!("{name}-skip"));
        let o = diverge(cmd, &model, &out, "skip");
        assert_diverged(&o, &out, &format!("{name}, skip"), "skipped step in a row");
        let skips: Vec<u64> = common::events(&out, "skip")
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect();
        let applied = common::step_losses(&out.join("metrics.jsonl")).len() as u64;
        assert_eq!(
            skips,
            [applied + 1, applied + 2],
            "{name}: two steps skipped and logged, the third gives up"
        );
    }
}
