//! Every objective trains the same on W = 1, 2 and 4 workers (real processes over loopback gRPC) as in
//! one process: SoftmaxLoss (classifier included), CoSENT, hardness-weighted MNRL, MNRL with hard
//! negatives and the symmetric term, a two-task run
//! (MNRL + CosineSimilarityLoss), GradCache and the weights' moving average (EMA) in the cluster.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Writes a run config with `body` (tasks or data + loss) over the tiny data; returns its path.
fn write_config(dir: &Path, name: &str, model: &Path, body: &str, train: &str) -> PathBuf {
    let tiny = repo("deploy/data/bible_paraphrase_tiny")
        .display()
        .to_string();
    let text = format!(
        "[model]\npath = {:?}\nmax_seq_length = 32\ndevice = \"cpu\"\nthreads = 1\n\
         [train]\nbatch_size = 8\nmax_steps = 8\nlr = 1e-3\nwarmup_steps = 1\nseed = 7\nmicro_batch = 3\n{train}\n\
         {}\n[output]\ndir = \"unused\"\n[cluster]\nheartbeat_timeout_ms = 4000\nthreads_per_worker = 1\n",
        model.display().to_string(),
        body.replace("TINY", &tiny)
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn multipos(cmd: &str, config: &Path, out: &Path, extra: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_multipos"))
        .arg(cmd)
        .arg("--config")
        .arg(config)
        .arg("--set")
        .arg(format!("output.dir=\"{}\"", out.display()))
        .args(extra)
        .env("RUST_LOG", "warn")
        .env_remove("MULTIPOS_CLUSTER_TOKEN")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{cmd} {} {extra:?}: {}",
        config.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A key bias shifts every score of a query's attention row by the same amount, which the softmax
/// cancels: its true gradient is exactly zero, so what it gets is rounding noise, and AdamW turns
/// noise of either sign into steps of size lr. It is compared by nothing but noise.
const NOISE_ONLY: &[&str] = &["attention.self.key.bias"];

/// The tiny training data with two hard negatives per query, texts of the dev and test splits that
/// appear nowhere else, so the planner never has to keep two rows apart for them.
fn with_negatives(dir: &Path) -> PathBuf {
    let read = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(repo(&format!("deploy/data/bible_paraphrase_tiny/{name}")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut pool: Vec<String> = Vec::new();
    for g in read("test.jsonl").iter().chain(&read("dev.jsonl")) {
        let texts = std::iter::once(&g["query"]).chain(g["positives"].as_array().unwrap());
        for t in texts {
            let t = t
                .as_str()
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if !pool.contains(&t) {
                pool.push(t);
            }
        }
    }
    let mut groups = read("train.jsonl");
    assert!(pool.len() >= 2 * groups.len(), "{} negatives", pool.len());
    for (i, g) in groups.iter_mut().enumerate() {
        g["negatives"] = serde_json::json!([pool[2 * i], pool[2 * i + 1]]);
    }
    let path = dir.join("train-negatives.jsonl");
    let lines: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn every_objective_trains_the_same_on_one_two_and_four_workers() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let cases = [
        (
            "softmax",
            "[[tasks]]\nname = \"nli\"\ntrain = \"TINY/labelled_pairs.jsonl\"\nloss = { type = \"softmax\", concatenation_sent_multiplication = true }\n",
            "",
        ),
        (
            "cosent",
            "[data]\ntrain = \"TINY/scored_pairs.jsonl\"\n[loss]\ntype = \"cosent\"\n",
            "",
        ),
        (
            "hardness",
            "[data]\ntrain = \"TINY/train.jsonl\"\nmode = \"all\"\n[loss]\ntype = \"mnrl\"\nhardness_mode = \"all_negatives\"\nhardness_strength = 5.0\n",
            "",
        ),
        (
            "two-tasks",
            "[[tasks]]\nname = \"verses\"\ntrain = \"TINY/train.jsonl\"\n[[tasks]]\nname = \"similarity\"\ntrain = \"TINY/scored_pairs.jsonl\"\nloss = { type = \"cosine_similarity\" }\n",
            "sampler = \"round_robin\"",
        ),
    ];
    let negatives = with_negatives(dir.path());
    let hard_symmetric = format!(
        "[data]\ntrain = {:?}\nnegatives_per_row = 2\n[loss]\ntype = \"mnrl\"\nsymmetric = true\n",
        negatives.display().to_string()
    );
    let cases =
        cases
            .iter()
            .copied()
            .chain([("hard-negatives-symmetric", hard_symmetric.as_str(), "")]);
    for (name, body, train) in cases {
        let cfg = write_config(dir.path(), name, &model, body, train);
        let single = dir.path().join(format!("{name}-single"));
        multipos("train", &cfg, &single, &[]);
        assert_eq!(
            common::step_losses(&single.join("metrics.jsonl")).len(),
            8,
            "{name}: steps"
        );
        for workers in ["1", "2", "4"] {
            let out = dir.path().join(format!("{name}-w{workers}"));
            multipos("launch", &cfg, &out, &["--workers", workers]);
            common::assert_same_run(&single, &out, &format!("{name}, W={workers}"), NOISE_ONLY);
        }
    }
    let tasks: Vec<String> = common::events(&dir.path().join("two-tasks-w2"), "step")
        .iter()
        .map(|v| v["task"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        tasks[..4],
        ["verses", "similarity", "verses", "similarity"],
        "round robin, logged per task"
    );
}

#[test]
fn gradcache_in_the_cluster_gives_the_model_of_the_plain_run() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let cfg = write_config(
        dir.path(),
        "mnrl",
        &model,
        "[data]\ntrain = \"TINY/train.jsonl\"\nmode = \"all\"\n",
        "",
    );
    let plain = dir.path().join("plain");
    multipos("train", &cfg, &plain, &[]);
    let cached = dir.path().join("cached-w2");
    multipos(
        "launch",
        &cfg,
        &cached,
        &["--workers", "2", "--set", "train.mini_batch_size=2"],
    );
    common::assert_same_run(&plain, &cached, "GradCache, W=2", NOISE_ONLY);
}

#[test]
fn ema_in_the_cluster_gives_the_average_of_the_single_process() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let cfg = write_config(
        dir.path(),
        "ema",
        &model,
        "[data]\ntrain = \"TINY/train.jsonl\"\n",
        "ema_decay = 0.9",
    );
    let single = dir.path().join("single");
    multipos("train", &cfg, &single, &[]);
    let cluster = dir.path().join("cluster-w2");
    multipos("launch", &cfg, &cluster, &["--workers", "2"]);
    common::assert_same_run(&single, &cluster, "EMA run, W=2", NOISE_ONLY);
    common::assert_same_tensors(
        &single.join("model-ema"),
        &cluster.join("model-ema"),
        "model-ema, W=2",
        NOISE_ONLY,
    );
    // The average is not the final weights: decay 0.9 over 8 steps lags behind them.
    assert_ne!(
        std::fs::read(cluster.join("model/model.safetensors")).unwrap(),
        std::fs::read(cluster.join("model-ema/model.safetensors")).unwrap()
    );
}
