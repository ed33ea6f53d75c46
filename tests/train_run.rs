//! Single-process training end to end on a tiny random BERT and the bundled tiny Bible data.
mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use multipos::config::RunConfig;
use multipos::model::tiny::TinySpec;
use multipos::train::StepInput;
use multipos::train::build::{plan_for, trainer_for};
use multipos::train::load::load_model;
use multipos::train::task::{Task, load_tasks};
use tch::Kind;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The tiny config with the data paths made absolute and the model and output dir set.
fn config(model: &Path, out: &Path, extra: &[&str]) -> RunConfig {
    let mut sets: Vec<String> = vec![
        format!("model.path=\"{}\"", model.display()),
        format!("output.dir=\"{}\"", out.display()),
        format!(
            "data.train=\"{}\"",
            repo("deploy/data/bible_paraphrase_tiny/train.jsonl").display()
        ),
    ];
    for key in ["queries", "corpus", "qrels"] {
        let file = match key {
            "queries" => "dev_queries.jsonl",
            "corpus" => "corpus.jsonl",
            _ => "dev_qrels.tsv",
        };
        sets.push(format!(
            "eval.{key}=\"{}\"",
            repo("deploy/data/bible_paraphrase_tiny")
                .join(file)
                .display()
        ));
    }
    sets.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::load(&repo("configs/tiny.toml"), &sets).unwrap()
}

#[test]
fn a_run_writes_a_loadable_model_metrics_and_is_repeatable() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let runs: Vec<_> = (0..2)
        .map(|i| {
            let out = dir.path().join(format!("run{i}"));
            let summary = multipos::train::run(
                &config(&model, &out, &["train.epochs=2"]),
                multipos::progress::Show::OFF,
            )
            .unwrap();
            (out, summary)
        })
        .collect();
    let (out, summary) = &runs[0];
    assert_eq!(summary.steps, 16, "64 groups, batch 8, two epochs");
    assert!(summary.eval_before.is_some() && summary.eval_after.is_some());
    let losses = common::step_losses(&out.join("metrics.jsonl"));
    assert_eq!(losses.len(), 16);
    assert!(losses.iter().all(|l| l.is_finite()));
    // Same seed, same data: identical losses and bit-identical weights (CPU).
    assert_eq!(
        losses,
        common::step_losses(&runs[1].0.join("metrics.jsonl"))
    );
    assert_eq!(
        std::fs::read(out.join("model/model.safetensors")).unwrap(),
        std::fs::read(runs[1].0.join("model/model.safetensors")).unwrap()
    );
    let trained = multipos::SentenceModel::load(&out.join("model"), tch::Device::Cpu).unwrap();
    let original = multipos::SentenceModel::load(&model, tch::Device::Cpu).unwrap();
    let (a, b) = (
        trained.embed(&["peace"], 1).unwrap(),
        original.embed(&["peace"], 1).unwrap(),
    );
    assert!(!a.equal(&b), "training must change the model");
    assert!(out.join("config.toml").exists());
}

#[test]
fn loss_falls_when_training_on_the_same_data() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.0,
        ..TinySpec::default()
    });
    let out = dir.path().join("run");
    let cfg = config(
        &model,
        &out,
        &[
            "train.epochs=6",
            "eval.at_start=false",
            "train.lr=3e-3",
            "train.dropout=false",
        ],
    );
    multipos::train::run(&cfg, multipos::progress::Show::OFF).unwrap();
    let losses = common::step_losses(&out.join("metrics.jsonl"));
    let first: f64 = losses[..8].iter().sum::<f64>() / 8.0;
    let last: f64 = losses[losses.len() - 8..].iter().sum::<f64>() / 8.0;
    assert!(
        last < 0.7 * first,
        "loss did not fall: first epoch {first:.4}, last epoch {last:.4}"
    );
}

#[test]
fn length_bucketed_micro_batches_give_the_same_loss_and_gradients() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let cfg = config(&model, &dir.path().join("unused"), &["train.dropout=false"]);
    let tasks = load_tasks(&cfg.tasks()).unwrap();
    let specs: Vec<_> = tasks.iter().map(Task::spec).collect();
    let plan = plan_for(&cfg, &tasks).unwrap();
    let batch = plan.batch(&tasks, 0);
    let mut results = Vec::new();
    for micro in [0, 1, 3] {
        let mut trainer =
            trainer_for(&cfg, load_model(&cfg).unwrap(), &specs, plan.total_steps).unwrap();
        trainer.opts.micro_batch = micro;
        let input = trainer
            .preparer()
            .prepare(&StepInput::whole(&batch), 0)
            .unwrap();
        let emb = trainer.embed(&input);
        let loss = trainer.loss(0, &emb, &batch.targets).unwrap();
        loss.backward();
        let grads = Vec::<f32>::try_from(trainer.state.flat().grads()).unwrap();
        results.push((loss.to_kind(Kind::Double).double_value(&[]), grads));
    }
    for (micro, (loss, grads)) in results.iter().enumerate().skip(1) {
        assert!(
            (loss - results[0].0).abs() < 1e-5,
            "micro-batching changed the loss: {loss} vs {}",
            results[0].0
        );
        let max = grads
            .iter()
            .zip(&results[0].1)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-5, "case {micro}: gradients differ by {max}");
    }
}

fn train_cli(config: &Path, sets: &[String]) -> Output {
    let mut cmd = Command::cargo_bin("multipos").unwrap();
    cmd.arg("train")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn");
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.output().unwrap()
}

#[test]
fn cli_trains_and_rejects_bad_configs_and_data_clearly() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("model.path=\"{}\"", model.display()),
            format!("output.dir=\"{}\"", dir.path().join("out").display()),
            // Every bad run below must fail for its own reason, not for the good run's output.
            "output.overwrite=true".to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cfg = repo("configs/tiny.toml");
    let run_in_repo = |sets: Vec<String>| {
        let mut cmd = Command::cargo_bin("multipos").unwrap();
        cmd.current_dir(repo("."))
            .arg("train")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn");
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        cmd.output().unwrap()
    };

    let ok = run_in_repo(base(&["train.max_steps=2"]));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["steps"], 2);
    assert!(stdout.contains("ndcg@10"));

    let cases: [(Vec<String>, &str); 4] = [
        (
            base(&["train.batch_size=100"]),
            "batch_size 100 is larger than the 64 rows",
        ),
        (
            base(&["train.max_steps=3", "train.warmup_steps=5"]),
            "warmup_steps = 5 exceeds train.max_steps = 3",
        ),
        (base(&["train.bogus=1"]), "bogus"),
        (base(&["data.negatives_per_row=1"]), "fewer hard negatives"),
    ];
    for (sets, needle) in cases {
        let out = run_in_repo(sets);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{needle}: {err}"
        );
    }

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"query\": \"q\", \"positives\": [\"a\"]}\n{\"query\": \"q2\", \"positives\": [\"b\"\n",
    )
    .unwrap();
    let out = train_cli(&cfg, &base(&[&format!("data.train=\"{}\"", bad.display())]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.jsonl:2:"),
        "{err}"
    );
    let out = train_cli(&cfg, &base(&["data.train=\"/no/such/file.jsonl\""]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.jsonl does not exist"));
}

/// Early stopping: the run stops at the first evaluation that ends `patience` evaluations in a row
/// without a new best, and with `keep_best` the final model is the best evaluated one. Ranking by
/// *lowest* NDCG makes training itself the thing that stops improving, so the stop comes early.
#[test]
fn early_stopping_stops_at_the_right_step_and_keeps_the_best_model() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.0,
        ..TinySpec::default()
    });
    let out = dir.path().join("run");
    let cfg = config(
        &model,
        &out,
        &[
            "train.epochs=10",
            "train.lr=3e-3",
            "eval.every_steps=2",
            "eval.patience=2",
            "eval.greater_is_better=false",
            "eval.keep_best=true",
            "output.checkpoint_every_steps=2",
            "output.keep_checkpoints=1",
        ],
    );
    let summary = multipos::train::run(&cfg, multipos::progress::Show::OFF).unwrap();
    let evals = common::events(&out, "eval");
    let stops = common::events(&out, "early_stop");
    assert_eq!(stops.len(), 1, "the run stopped early");
    let stopped_at = stops[0]["step"].as_u64().unwrap();
    assert!(stopped_at < 80 && summary.steps == stopped_at);
    // Replay the rule on the logged evaluations.
    let (step, (best_step, best_value)) =
        common::first_stop_lower_is_better(&evals, 2).expect("two evaluations without a new best");
    assert_eq!(
        stopped_at, step,
        "stopped at the first evaluation the rule names"
    );
    assert_eq!(stops[0]["best_step"].as_u64(), Some(best_step));
    // Pruning kept the newest checkpoint and the best step's (when training had begun there).
    let mut kept: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    kept.sort();
    let mut want = vec![multipos::train::checkpoint::name(stopped_at)];
    if best_step > 0 {
        want.insert(0, multipos::train::checkpoint::name(best_step));
    }
    want.dedup();
    assert_eq!(kept, want);
    assert_eq!(
        evals.last().unwrap()["step"].as_u64(),
        Some(stopped_at),
        "no evaluation after the stop"
    );
    let kept = multipos::SentenceModel::load(&out.join("model"), tch::Device::Cpu).unwrap();
    let tiny = repo("deploy/data/bible_paraphrase_tiny");
    let set = multipos::eval::IrDataset::load(
        &tiny.join("dev_queries.jsonl"),
        &tiny.join("corpus.jsonl"),
        &tiny.join("dev_qrels.tsv"),
    )
    .unwrap();
    let m = multipos::eval::evaluate(&kept, &set, 64, &Default::default()).unwrap();
    assert!(
        (m["ndcg@10"] - best_value).abs() < 1e-6,
        "model/ is the best evaluation ({best_value} at step {best_step}), got {}",
        m["ndcg@10"]
    );
}
