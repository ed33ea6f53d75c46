//! The model card: every model directory a run leaves (`model/`, `model-best/`, `model-ema/`, and
//! `multipos average`'s) holds a README.md that Python sentence-transformers and the Hub's card
//! reader (huggingface_hub 's `ModelCard`, in the pinned Python reference that `deploy/pyref.sh`
//! installs) read: front matter with the expected keys, metrics equal to `metrics.jsonl`'s, and
//! no cluster token or machine path in it.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use multipos::model::tiny::TinySpec;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The pinned Python reference (installed once by deploy/pyref.sh, from PyPI).
fn python() -> PathBuf {
    let ok = Command::new("bash")
        .arg(repo("deploy/pyref.sh"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "deploy/pyref.sh could not install the Python reference (PyPI must be reachable)"
    );
    let cache = common::cache_dir();
    cache.join("pyref/bin/python")
}

/// What Python reads of the model directory `dir`.
fn read_in_python(dir: &Path) -> Value {
    let out = Command::new(python())
        .arg(repo("tests/reference/check_model_card.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Python could not load {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The metrics of the evaluation at `step` in `metrics.jsonl`, or of the last one.
fn logged_eval(out: &Path, step: Option<u64>) -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let evals: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["event"] == "eval")
        .collect();
    let e = match step {
        Some(s) => evals.iter().find(|v| v["step"] == s).unwrap(),
        None => evals.last().unwrap(),
    };
    e["metrics"].as_object().unwrap().clone()
}

fn best_step(out: &Path) -> u64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .rev()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["event"] == "best")
        .unwrap()["step"]
        .as_u64()
        .unwrap()
}

/// Checks what Python read of `dir`: it embeds, the front matter has the expected keys, the
/// metrics are `want`'s, and nothing private is in the card.
fn assert_card(dir: &Path, want: &serde_json::Map<String, Value>, private: &[&str]) {
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for p in private {
        assert!(!card.contains(p), "{}: the card shows {p:?}", dir.display());
    }
    let got = read_in_python(dir);
    assert_eq!(
        got["shape"],
        serde_json::json!([2, 32]),
        "{}",
        dir.display()
    );
    let fm = &got["front_matter"];
    assert_eq!(fm["library_name"], "sentence-transformers");
    assert_eq!(fm["pipeline_tag"], "sentence-similarity");
    assert!(fm["base_model"].is_string(), "{fm}");
    let tags: Vec<&str> = fm["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(tags.contains(&"sentence-transformers"), "{tags:?}");
    assert!(
        tags.contains(&"loss:MultipleNegativesRankingLoss"),
        "{tags:?}"
    );
    assert!(
        tags.iter().any(|t| t.starts_with("dataset_size:")),
        "{tags:?}"
    );
    let results = got["eval_results"].as_object().unwrap();
    assert_eq!(results.len(), want.len(), "{results:?} vs {want:?}");
    for (k, v) in want {
        let read = &results[&format!("cosine_{k}")];
        assert_eq!(read.as_f64(), v.as_f64(), "{}: {k}", dir.display());
    }
    let text = got["text"].as_str().unwrap();
    for section in [
        "## Model Details",
        "## Evaluation",
        "## Training Details",
        "### Training Hyperparameters",
        "### Framework Versions",
        "## Reproduce",
    ] {
        assert!(
            text.contains(section),
            "{section} missing from the card of {}",
            dir.display()
        );
    }
}

#[test]
fn every_model_of_a_run_and_of_a_cluster_has_a_card_that_python_and_the_hub_read() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let token = "card-must-not-show-this-token";
    let out = dir.path().join("single");
    let mut sets = common::tiny_config_sets(&model, &out);
    sets.extend([
        "eval.every_steps=2".into(),
        "eval.at_start=true".into(),
        "train.ema_decay=0.9".into(),
        format!("cluster.token=\"{token}\""),
    ]);
    common::run_tiny(&["train"], &sets);
    let tmp = dir.path().display().to_string();
    let root = env!("CARGO_MANIFEST_DIR");
    let private = [token, tmp.as_str(), root];
    assert_card(&out.join("model"), &logged_eval(&out, None), &private);
    assert_card(
        &out.join("model-best"),
        &logged_eval(&out, Some(best_step(&out))),
        &private,
    );
    let ema = std::fs::read_to_string(out.join("model-ema/README.md")).unwrap();
    assert!(ema.contains("moving average"));
    let card = std::fs::read_to_string(out.join("model/README.md")).unwrap();
    // The data, the loss and the exact command are there, by file name.
    for part in [
        "train.jsonl",
        "\"scale\": 20.0",
        "multipos train --config tiny.toml",
        "[train]",
    ] {
        assert!(card.contains(part), "{part:?} missing:\n{card}");
    }
    let st: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model/config_sentence_transformers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["__version__"]["multipos"], env!("CARGO_PKG_VERSION"));
    assert!(
        st["__version__"]["pytorch"]
            .as_str()
            .unwrap()
            .starts_with("2.11.0"),
        "{st}"
    );
    assert!(st["__version__"].get("sentence_transformers").is_none());

    let out = dir.path().join("cluster");
    let mut sets = common::tiny_config_sets(&model, &out);
    sets.extend([
        "eval.every_steps=2".into(),
        "cluster.threads_per_worker=1".into(),
    ]);
    common::run_tiny(&["launch", "--workers", "2"], &sets);
    assert_card(&out.join("model"), &logged_eval(&out, None), &private);
}

#[test]
fn an_averaged_model_has_a_card_naming_its_models() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let avg = dir.path().join("avg");
    let o = Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args(["average", "--models"])
        .arg(&model)
        .arg(&model)
        .arg("--output")
        .arg(&avg)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card = std::fs::read_to_string(avg.join("README.md")).unwrap();
    assert!(card.contains("| 0.5000 |"), "{card}");
    assert!(!card.contains(&dir.path().display().to_string()), "{card}");
    let got = read_in_python(&avg);
    assert_eq!(got["front_matter"]["library_name"], "sentence-transformers");
    assert_eq!(got["shape"], serde_json::json!([2, 32]));
}
