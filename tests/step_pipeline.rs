//! The device-resident step pipeline (docs/design.md §5, §6, §7) on a tiny random BERT with dropout:
//! a one-process step moves no gradient to the host while a cluster step moves every gradient byte
//! once each way, in buckets that sum to what one process computes (f32 bit-identical across ranks;
//! bf16 within its rounding); steps prepared ahead are never reordered or dropped, also across a
//! stop and a resume; and a run checkpointed by an older version resumes with its own dropout masks.
mod common;

use std::path::{Path, PathBuf};

use multipos::collective::{Collective, Solo, Wire};
use multipos::config::RunConfig;
use multipos::model::tiny::TinySpec;
use multipos::train::build::{plan_for, trainer_for};
use multipos::train::load::load_model;
use multipos::train::task::{Task, load_tasks};
use multipos::train::{StepInput, StepStats};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The tiny run's config with `sets` on top.
fn config(model: &Path, out: &Path, sets: &[&str]) -> RunConfig {
    let mut all = common::tiny_config_sets(model, out);
    // No clipping: the raw sums are compared.
    all.push("train.max_grad_norm=0.0".into());
    all.extend(sets.iter().map(|s| s.to_string()));
    RunConfig::load(&repo("configs/tiny.toml"), &all).unwrap()
}

/// Gradient buckets of 4 KiB: the tiny model's gradients take dozens.
const SMALL_BUCKETS: usize = 4096;

/// One step (global step 2) of `rank` of `coll`'s ring: its stats and its reduced gradients.
fn one_step(cfg: &RunConfig, coll: &mut dyn Collective) -> (StepStats, Vec<f32>) {
    let tasks = load_tasks(&cfg.tasks()).unwrap();
    let plan = plan_for(cfg, &tasks).unwrap();
    let specs: Vec<_> = tasks.iter().map(Task::spec).collect();
    let mut trainer = trainer_for(cfg, load_model(cfg).unwrap(), &specs, plan.total_steps).unwrap();
    trainer.opts.bucket_bytes = SMALL_BUCKETS;
    let batch = plan.batch(&tasks, 2);
    let (columns, first) = batch.shard(coll.rank(), coll.world());
    let input = StepInput {
        task: batch.task,
        columns,
        first_row: first as u64,
        targets: batch.targets.clone(),
    };
    let prepared = trainer.preparer().prepare(&input, 2).unwrap();
    let stats = trainer.forward_backward(&prepared, coll).unwrap();
    let grads = Vec::<f32>::try_from(trainer.state.flat().grads()).unwrap();
    (stats, grads)
}

/// Both ranks of a two-rank loopback ring run `one_step` side by side.
fn two_ranks(cfg: &RunConfig) -> Vec<(StepStats, Vec<f32>)> {
    common::on_ring(2, |coll| one_step(cfg, coll))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn gradients_cross_to_the_host_only_in_the_cluster_once_each_way_in_buckets() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let out = dir.path().join("unused");
    let (solo, plain) = one_step(&config(&model, &out, &[]), &mut Solo);
    assert_eq!(
        solo.grad_host_bytes, 0,
        "one process: no gradient byte leaves the device"
    );
    let numel = plain.len() as u64;
    assert!(plain.iter().any(|&g| g != 0.0));
    assert!(
        numel as usize * 4 > 10 * SMALL_BUCKETS,
        "{numel} values: too few buckets"
    );

    // f32 in buckets: the sum one process makes, the same bits on both ranks, every byte once to
    // the host and once back.
    let ranks = two_ranks(&config(&model, &out, &[]));
    for (rank, (stats, grads)) in ranks.iter().enumerate() {
        assert_eq!(stats.grad_host_bytes, 2 * 4 * numel, "rank {rank}");
        assert!(
            (stats.loss - solo.loss).abs() <= 1e-5 * solo.loss.abs().max(1.0),
            "rank {rank}: loss {} vs {}",
            stats.loss,
            solo.loss
        );
        let d = max_diff(grads, &plain);
        assert!(
            d <= 1e-5,
            "rank {rank}: f32 all-reduce differs from one process by {d}"
        );
    }
    assert_eq!(ranks[0].1, ranks[1].1, "f32: bit-identical on both ranks");

    // bf16 on the wire: half the bytes; both ranks agree; the sum is off by the rounding of each
    // rank's share and of the sum to bf16 (8 significant bits): relative to the gradient's size, a
    // few 2^-9. What it costs is printed (and recorded in docs/design.md §8).
    let bf16_cfg = config(&model, &out, &["cluster.grad_dtype=\"bf16\""]);
    assert_eq!(bf16_cfg.cluster.grad_dtype, Wire::Bf16);
    let ranks = two_ranks(&bf16_cfg);
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    for (rank, (stats, grads)) in ranks.iter().enumerate() {
        assert_eq!(stats.grad_host_bytes, 2 * 2 * numel, "rank {rank}");
        let diff: Vec<f32> = grads.iter().zip(&plain).map(|(g, p)| g - p).collect();
        let relative = norm(&diff) / norm(&plain);
        let worst = max_diff(grads, &plain) / plain.iter().fold(0f32, |m, g| m.max(g.abs()));
        eprintln!(
            "bf16 gradients, rank {rank}: |error| / |gradient| = {relative:.2e}, \
             largest error / largest gradient = {worst:.2e}"
        );
        assert!(
            relative <= 2f64.powi(-8),
            "rank {rank}: relative error {relative}"
        );
        assert!(
            worst <= 2f32.powi(-7),
            "rank {rank}: worst element error {worst}"
        );
    }
    assert_eq!(ranks[0].1, ranks[1].1, "bf16: bit-identical on both ranks");
}

#[test]
fn steps_prepared_ahead_are_never_reordered_or_dropped_even_across_a_resume() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let run = |name: &str, sets: &[&str]| -> PathBuf {
        let out = dir.path().join(name);
        let cfg = config(&model, &out, sets);
        match multipos::train::run(&cfg, multipos::progress::Show::OFF) {
            Ok(_) | Err(multipos::Error::Stopped { .. }) => out,
            Err(e) => panic!("{name}: {e}"),
        }
    };
    let epochs = "train.epochs=2";
    let inline = run("inline", &[epochs, "train.prefetch=0"]);
    let ahead = run("ahead", &[epochs, "train.prefetch=3"]);
    common::assert_same_run(&inline, &ahead, "prefetch 3 vs none", &[]);
    assert_eq!(
        common::losses_by_step(&inline),
        common::losses_by_step(&ahead)
    );
    // Stopped while three steps are prepared ahead, then resumed: the same run again.
    run(
        "stopped",
        &[epochs, "train.prefetch=3", "train.stop_after_steps=5"],
    );
    let resumed = run(
        "stopped",
        &[epochs, "train.prefetch=3", "train.resume=\"latest\""],
    );
    common::assert_same_run(&inline, &resumed, "prefetch 3, stopped and resumed", &[]);
    assert_eq!(
        common::losses_by_step(&inline),
        common::losses_by_step(&resumed)
    );
    let batches = |out: &Path| -> Vec<(u64, u64)> {
        common::events(out, "step")
            .iter()
            .map(|v| (v["epoch"].as_u64().unwrap(), v["batch"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(
        batches(&inline),
        batches(&resumed),
        "every batch once, in order"
    );
}

/// Rewrites a checkpoint's `state.json` as an older version wrote it (no dropout generator named),
/// with its manifest entry to match.
fn as_older_version(ckpt: &Path) {
    let path = ckpt.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(state["dropout_masks"], "v2-splitmix-counter");
    state.as_object_mut().unwrap().remove("dropout_masks");
    let bytes = serde_json::to_vec_pretty(&state).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let manifest_path = ckpt.join("MANIFEST.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["state.json"] = serde_json::json!({
        "bytes": bytes.len(),
        "xxh3": format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)),
    });
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_run_checkpointed_by_an_older_version_resumes_with_its_own_dropout_masks() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let run = |out: &Path, sets: &[&str]| {
        let cfg = config(&model, out, sets);
        match multipos::train::run(&cfg, multipos::progress::Show::OFF) {
            Ok(_) | Err(multipos::Error::Stopped { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    };
    let (current, older, older_again) = (
        dir.path().join("current"),
        dir.path().join("older"),
        dir.path().join("older-again"),
    );
    for out in [&current, &older] {
        run(out, &["train.stop_after_steps=4"]);
    }
    as_older_version(&older.join("checkpoints/step-00000004"));
    common::copy_dir(&older, &older_again);
    for out in [&current, &older, &older_again] {
        run(out, &["train.resume=\"latest\""]);
    }
    let generator = |out: &Path| {
        let ckpt = multipos::train::checkpoint::latest_valid(&out.join("checkpoints"))
            .unwrap()
            .unwrap();
        serde_json::to_value(ckpt.1.dropout_masks).unwrap()
    };
    assert_eq!(generator(&current), "v2-splitmix-counter");
    assert_eq!(
        generator(&older),
        "v1-hash-chain",
        "the older run keeps its generator"
    );
    // Its own masks, exactly: resumed twice, the same run; and other masks than the current ones.
    common::assert_same_run(&older, &older_again, "an older run resumed twice", &[]);
    assert_eq!(
        common::losses_by_step(&older),
        common::losses_by_step(&older_again)
    );
    let (a, b) = (
        common::step_losses(&current.join("metrics.jsonl")),
        common::step_losses(&older.join("metrics.jsonl")),
    );
    assert_eq!(a[..4], b[..4], "the same run up to the checkpoint");
    assert_ne!(
        a[4..],
        b[4..],
        "after it, the older run draws the first generator's masks"
    );
}
