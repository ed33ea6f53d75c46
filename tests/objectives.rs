//! Objectives beyond plain MNRL in one process, on a tiny random BERT and the bundled tiny Bible data:
//! GradCache gives the loss and gradients of the plain step (one process and two ranks over a real
//! gRPC ring), a two-task MNRL + SoftmaxLoss run stops and resumes bit for bit with its classifier,
//! and the saved classifier loads and predicts.
mod common;

use std::path::{Path, PathBuf};

use multipos::collective::{Collective, Solo};
use multipos::config::RunConfig;
use multipos::loss::SoftmaxHead;
use multipos::model::tiny::TinySpec;
use multipos::train::build::{plan_for, trainer_for};
use multipos::train::load::load_model;
use multipos::train::task::{Task, load_tasks};
use multipos::train::{StepInput, Trainer};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A config with the given `[[tasks]]` blocks over the tiny data, written beside `out`.
fn config(model: &Path, out: &Path, tasks: &str, train: &str) -> RunConfig {
    let tiny = repo("deploy/data/bible_paraphrase_tiny");
    let lr = if train.contains("lr =") {
        ""
    } else {
        "lr = 1e-3\n"
    };
    let text = format!(
        "[model]\npath = {:?}\nmax_seq_length = 32\ndevice = \"cpu\"\nthreads = 1\n\
         [train]\nbatch_size = 8\n{lr}warmup_steps = 1\nseed = 7\nmicro_batch = 3\n{train}\n\
         {tasks}\n[output]\ndir = {:?}\n",
        model.display().to_string(),
        out.display().to_string()
    )
    .replace("TINY", &tiny.display().to_string());
    std::fs::create_dir_all(out).unwrap();
    let path = out.with_extension("toml");
    std::fs::write(&path, text).unwrap();
    RunConfig::load(&path, &[]).unwrap()
}

const MNRL_AND_SOFTMAX: &str = "[[tasks]]\nname = \"verses\"\ntrain = \"TINY/train.jsonl\"\nmode = \"all\"\n\
     loss = { type = \"mnrl\", hardness_mode = \"in_batch_negatives\", hardness_strength = 9.0 }\n\
     [[tasks]]\nname = \"nli\"\ntrain = \"TINY/labelled_pairs.jsonl\"\nloss = { type = \"softmax\" }\n";

/// Every gradient of the trainer, as its flat buffer holds them.
fn grads(trainer: &Trainer) -> Vec<f32> {
    Vec::<f32>::try_from(trainer.state.flat().grads()).unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max <= tol, "{what}: gradients differ by {max}");
    assert!(a.iter().any(|x| *x != 0.0), "{what}: no gradient at all");
}

/// One step's loss and gradients of `rank` of `world` on global batch `step`.
fn one_step(
    cfg: &RunConfig,
    tasks: &[Task],
    step: u64,
    mini: usize,
    coll: &mut dyn Collective,
) -> (f64, Vec<f32>) {
    let plan = plan_for(cfg, tasks).unwrap();
    let specs: Vec<_> = tasks.iter().map(Task::spec).collect();
    let mut trainer = trainer_for(cfg, load_model(cfg).unwrap(), &specs, plan.total_steps).unwrap();
    trainer.opts.mini_batch_size = mini;
    let batch = plan.batch(tasks, step);
    let (columns, first) = batch.shard(coll.rank(), coll.world());
    let input = StepInput {
        task: batch.task,
        columns,
        first_row: first as u64,
        targets: batch.targets.clone(),
    };
    let prepared = trainer.preparer().prepare(&input, step).unwrap();
    let stats = trainer.forward_backward(&prepared, coll).unwrap();
    (stats.loss, grads(&trainer))
}

#[test]
fn gradcache_gives_the_loss_and_gradients_of_the_plain_step() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    // No clipping, so the raw gradients are compared; dropout on: both passes must draw the same masks.
    let cfg = config(
        &model,
        &dir.path().join("gc"),
        MNRL_AND_SOFTMAX,
        "max_grad_norm = 0.0\nepochs = 1",
    );
    let tasks = load_tasks(&cfg.tasks()).unwrap();
    let plan = plan_for(&cfg, &tasks).unwrap();
    // One batch of each task (the SoftmaxLoss one exercises the classifier's gradient too).
    let steps: Vec<u64> = (0..2)
        .map(|t| {
            (0..plan.total_steps)
                .find(|&s| plan.batch(&tasks, s).task == t)
                .unwrap()
        })
        .collect();
    for &step in &steps {
        let (plain_loss, plain) = one_step(&cfg, &tasks, step, 0, &mut Solo);
        for mini in [1, 3] {
            let (loss, cached) = one_step(&cfg, &tasks, step, mini, &mut Solo);
            assert!(
                (loss - plain_loss).abs() <= 1e-5 * plain_loss.abs().max(1.0),
                "W=1 mini {mini}: {loss} vs {plain_loss}"
            );
            assert_close(
                &cached,
                &plain,
                1e-5,
                &format!("W=1, step {step}, mini-batches of {mini}"),
            );
        }
        // Two ranks over a real gRPC ring, each a thread with its own replica; rank r's gradients
        // after the all-reduce equal the single process's.
        let results: Vec<(f64, Vec<f32>)> =
            common::on_ring(2, |coll| one_step(&cfg, &tasks, step, 2, coll));
        for (rank, (loss, g)) in results.iter().enumerate() {
            assert!(
                (loss - plain_loss).abs() <= 1e-5 * plain_loss.abs().max(1.0),
                "W=2 rank {rank}: {loss} vs {plain_loss}"
            );
            assert_close(
                g,
                &plain,
                1e-5,
                &format!("W=2 rank {rank}, step {step}, mini-batches of 2"),
            );
        }
        assert_eq!(
            results[0].1, results[1].1,
            "both ranks hold bit-identical reduced gradients"
        );
    }
}

#[test]
fn a_two_task_run_with_a_classifier_stops_and_resumes_bit_for_bit() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let whole = dir.path().join("whole");
    let cfg = config(&model, &whole, MNRL_AND_SOFTMAX, "epochs = 2");
    let summary = multipos::train::run(&cfg, multipos::progress::Show::OFF).unwrap();
    let tasks = load_tasks(&cfg.tasks()).unwrap();
    let plan = plan_for(&cfg, &tasks).unwrap();
    assert_eq!(
        summary.steps, plan.total_steps,
        "the step count known up front"
    );
    let steps = common::events(&whole, "step");
    for (t, task) in ["verses", "nli"].iter().enumerate() {
        let planned: usize = (0..2).map(|e| plan.epoch(e).tasks[t].num_batches()).sum();
        let n = steps.iter().filter(|v| v["task"] == *task).count();
        assert!(planned > 4, "task {task}: {planned} batches");
        assert_eq!(
            n, planned,
            "every batch of task {task} ran once per epoch, its loss logged"
        );
    }

    let stopped = dir.path().join("stopped");
    let cfg2 = config(
        &model,
        &stopped,
        MNRL_AND_SOFTMAX,
        "epochs = 2\nstop_after_steps = 23",
    );
    let err = multipos::train::run(&cfg2, multipos::progress::Show::OFF).unwrap_err();
    assert!(err.to_string().contains("stopped after 23"), "{err}");
    let resumed_cfg = config(
        &model,
        &stopped,
        MNRL_AND_SOFTMAX,
        "epochs = 2\nresume = \"latest\"",
    );
    multipos::train::run(&resumed_cfg, multipos::progress::Show::OFF).unwrap();
    assert_eq!(common::resumed_from(&stopped), vec![23]);
    assert_eq!(
        common::losses_by_step(&whole),
        common::losses_by_step(&stopped)
    );
    for file in [
        "model.safetensors",
        "heads/nli.safetensors",
        "heads/nli.json",
    ] {
        assert_eq!(
            std::fs::read(whole.join("model").join(file)).unwrap(),
            std::fs::read(stopped.join("model").join(file)).unwrap(),
            "{file} differs after stop + resume"
        );
    }
}

#[test]
fn the_saved_classifier_loads_and_predicts() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.0,
        ..TinySpec::default()
    });
    let out = dir.path().join("nli");
    let tasks = "[[tasks]]\nname = \"nli\"\ntrain = \"TINY/labelled_pairs.jsonl\"\nloss = { type = \"SoftmaxLoss\" }\n";
    let cfg = config(
        &model,
        &out,
        tasks,
        "epochs = 8\nlr = 3e-3\ndropout = false",
    );
    multipos::train::run(&cfg, multipos::progress::Show::OFF).unwrap();

    let encoder = multipos::SentenceModel::load(&out.join("model"), tch::Device::Cpu).unwrap();
    let head = SoftmaxHead::read(&out.join("model"), "nli", tch::Device::Cpu).unwrap();
    assert_eq!(head.labels, ["paraphrase", "unrelated"]);
    let pairs: Vec<serde_json::Value> = std::fs::read_to_string(repo(
        "deploy/data/bible_paraphrase_tiny/labelled_pairs.jsonl",
    ))
    .unwrap()
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let text = |k: &str| {
        pairs
            .iter()
            .map(|p| p[k].as_str().unwrap())
            .collect::<Vec<_>>()
    };
    let (u, v) = (
        encoder.embed(&text("premise"), 32).unwrap(),
        encoder.embed(&text("hypothesis"), 32).unwrap(),
    );
    let probs = head.predict(&u, &v);
    assert_eq!(probs.size(), [pairs.len() as i64, 2]);
    let predicted = Vec::<i64>::try_from(probs.argmax(1, false)).unwrap();
    let correct = predicted
        .iter()
        .zip(&pairs)
        .filter(|(p, pair)| head.labels[**p as usize] == pair["label"].as_str().unwrap())
        .count();
    assert!(
        correct as f64 >= 0.9 * pairs.len() as f64,
        "the trained classifier gets {correct} of {} training pairs right",
        pairs.len()
    );
}

#[test]
fn ema_with_decay_zero_is_the_model_and_ema_survives_a_resume() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let tensors = |d: &Path| {
        let mut t = tch::Tensor::read_safetensors(d.join("model.safetensors")).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let zero = dir.path().join("zero");
    multipos::train::run(
        &config(
            &model,
            &zero,
            MNRL_AND_SOFTMAX,
            "max_steps = 6\nema_decay = 0.0",
        ),
        multipos::progress::Show::OFF,
    )
    .unwrap();
    for ((n, a), (_, b)) in tensors(&zero.join("model"))
        .iter()
        .zip(tensors(&zero.join("model-ema")))
    {
        assert!(
            a.equal(&b),
            "{n}: EMA with decay 0 differs from the weights by {}",
            (a - &b).abs().max().double_value(&[])
        );
    }
    assert_eq!(
        std::fs::read(zero.join("model/heads/nli.safetensors")).unwrap(),
        std::fs::read(zero.join("model-ema/heads/nli.safetensors")).unwrap()
    );
    let plain = dir.path().join("plain");
    multipos::train::run(
        &config(&model, &plain, MNRL_AND_SOFTMAX, "max_steps = 6"),
        multipos::progress::Show::OFF,
    )
    .unwrap();
    assert_eq!(
        common::losses_by_step(&plain),
        common::losses_by_step(&zero),
        "EMA does not change training"
    );

    let whole = dir.path().join("ema");
    multipos::train::run(
        &config(
            &model,
            &whole,
            MNRL_AND_SOFTMAX,
            "max_steps = 12\nema_decay = 0.9",
        ),
        multipos::progress::Show::OFF,
    )
    .unwrap();
    let averaged = tensors(&whole.join("model-ema"));
    assert!(
        tensors(&whole.join("model"))
            .iter()
            .zip(&averaged)
            .any(|((_, a), (_, b))| !a.equal(b)),
        "decay 0.9 averages"
    );
    let parted = dir.path().join("ema-parted");
    let stop = config(
        &model,
        &parted,
        MNRL_AND_SOFTMAX,
        "max_steps = 12\nema_decay = 0.9\nstop_after_steps = 5",
    );
    assert!(multipos::train::run(&stop, multipos::progress::Show::OFF).is_err());
    let resume = config(
        &model,
        &parted,
        MNRL_AND_SOFTMAX,
        "max_steps = 12\nema_decay = 0.9\nresume = \"latest\"",
    );
    multipos::train::run(&resume, multipos::progress::Show::OFF).unwrap();
    for ((n, a), (_, b)) in averaged.iter().zip(tensors(&parted.join("model-ema"))) {
        assert!(a.equal(&b), "{n}: the EMA after stop + resume differs");
    }
}
