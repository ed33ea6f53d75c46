//! Both model layouts in: the tiny test model as sentence-transformers 6.2 saved it (the 6.x
//! layout, `tests/fixtures/st6_tiny/`, made by `tests/reference/make_st6_fixture.py`) and the same
//! weights in the layout 3.x–5.x write embed as Python embeds them, and a run trains from the 6.x
//! directory and saves a model that loads again.
mod common;

use std::path::{Path, PathBuf};

use multipos::SentenceModel;
use multipos::model::Role;
use multipos::model::tiny::{TinySpec, write_random_model};
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn fixture() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/st6_tiny_embeddings.json")).unwrap(),
    )
    .unwrap()
}

/// The largest difference between `dir`'s embeddings of the fixture's texts and Python's.
/// The fixture's texts.
fn texts_of(f: &Value) -> Vec<&str> {
    f["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect()
}

fn max_diff_to_python(dir: &Path) -> f64 {
    let f = fixture();
    let texts = texts_of(&f);
    let model = SentenceModel::load(dir, tch::Device::Cpu).unwrap();
    assert_eq!(
        model.max_seq_length() as u64,
        f["max_seq_length"].as_u64().unwrap(),
        "{}",
        dir.display()
    );
    let ours: Vec<Vec<f32>> = Vec::try_from(model.embed(&texts, 4).unwrap()).unwrap();
    worst(&ours, &f["embeddings"])
}

#[test]
fn a_model_saved_by_sentence_transformers_6_embeds_as_python_does_and_so_does_the_older_layout() {
    let st6 = repo("tests/fixtures/st6_tiny");
    let modules = std::fs::read_to_string(st6.join("modules.json")).unwrap();
    assert!(
        modules.contains("sentence_transformers.base.modules.transformer.Transformer"),
        "the fixture is in the 6.x layout"
    );
    let sbert = std::fs::read_to_string(st6.join("sentence_bert_config.json")).unwrap();
    assert!(!sbert.contains("max_seq_length"), "{sbert}");
    let d = max_diff_to_python(&st6);
    assert!(d <= 1e-5, "6.x layout: {d}");

    let dir = tempfile::tempdir().unwrap();
    let older = dir.path().join("tiny");
    write_random_model(&older, &TinySpec::default()).unwrap();
    let d = max_diff_to_python(&older);
    assert!(d <= 1e-5, "older layout: {d}");
}

#[test]
fn a_run_trains_from_the_6_x_layout_and_its_model_loads_again() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut sets = common::tiny_config_sets(&repo("tests/fixtures/st6_tiny"), &out);
    sets.push("train.max_steps=3".into());
    common::run_tiny(&["train"], &sets);
    println!("trained model: {}", out.join("model").display());
    let model = SentenceModel::load(&out.join("model"), tch::Device::Cpu).unwrap();
    // configs/tiny.toml's model.max_seq_length, which the saved model keeps.
    assert_eq!(model.max_seq_length(), 32);
    assert_eq!(model.embed(&["peace"], 1).unwrap().size()[1], 32);
}

/// Writes the tiny test model (older layout) to target/tiny-model: the input of
/// tests/reference/make_st6_fixture.py.
#[test]
#[ignore = "writes the input of the fixture script"]
fn write_the_tiny_model() {
    let dir = repo("target/tiny-model");
    let _ = std::fs::remove_dir_all(&dir);
    write_random_model(&dir, &TinySpec::default()).unwrap();
}

#[test]
fn the_tokenizers_length_sets_max_seq_length_and_a_bad_one_is_refused_by_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    common::copy_dir(&repo("tests/fixtures/st6_tiny"), &model);
    let config = model.join("tokenizer_config.json");
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let with = |v: Value| {
        let mut c = original.clone();
        c["model_max_length"] = v;
        std::fs::write(&config, c.to_string()).unwrap();
        SentenceModel::load(&model, tch::Device::Cpu)
    };
    assert_eq!(with(Value::from(48)).unwrap().max_seq_length(), 48);
    // Tokenizers without a limit write a huge sentinel: the position table (128) decides.
    assert_eq!(with(Value::from(1e30)).unwrap().max_seq_length(), 128);
    let err = with(Value::from("long")).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("model_max_length"),
        "{err}"
    );
}

#[test]
fn prompts_and_the_similarity_function_survive_training() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    common::copy_dir(&repo("tests/fixtures/st6_tiny"), &model);
    let path = model.join("config_sentence_transformers.json");
    let mut st: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    st["prompts"] = serde_json::json!({"query": "query: ", "document": "passage: "});
    st["default_prompt_name"] = "query".into();
    st["similarity_fn_name"] = "dot".into();
    std::fs::write(&path, st.to_string()).unwrap();

    let out = dir.path().join("run");
    let mut sets = common::tiny_config_sets(&model, &out);
    sets.push("train.max_steps=2".into());
    common::run_tiny(&["train"], &sets);
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model/config_sentence_transformers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["prompts"], st["prompts"]);
    assert_eq!(saved["default_prompt_name"], "query");
    assert_eq!(saved["similarity_fn_name"], "dot");
}

/// The worst difference between `got` and the fixture's rows `want`.
fn worst(got: &[Vec<f32>], want: &Value) -> f64 {
    let mut worst = 0f64;
    for (row, want) in got.iter().zip(want.as_array().unwrap()) {
        for (a, b) in row.iter().zip(want.as_array().unwrap()) {
            worst = worst.max((*a as f64 - b.as_f64().unwrap()).abs());
        }
    }
    worst
}

#[test]
fn prompts_go_in_front_as_encode_query_encode_document_and_encode_put_them() {
    let f = fixture();
    let p = &f["with_prompts"];
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    common::copy_dir(&repo("tests/fixtures/st6_tiny"), &model_dir);
    let path = model_dir.join("config_sentence_transformers.json");
    let mut st: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    st["prompts"] = p["prompts"].clone();
    st["default_prompt_name"] = p["default_prompt_name"].clone();
    std::fs::write(&path, st.to_string()).unwrap();
    let texts = texts_of(&f);
    let model = SentenceModel::load(&model_dir, tch::Device::Cpu).unwrap();
    for (role, key) in [
        (Role::Query, "query"),
        (Role::Document, "document"),
        (Role::Plain, "text"),
    ] {
        let got: Vec<Vec<f32>> = Vec::try_from(model.embed_as(&texts, role, 4).unwrap()).unwrap();
        let d = worst(&got, &p[key]);
        assert!(d <= 1e-5, "{key}: max |diff| to Python {d:e}");
        let plain: Vec<Vec<f32>> = Vec::try_from(model.embed(&texts, 4).unwrap()).unwrap();
        assert!(
            worst(&plain, &p[key]) > 1e-3,
            "{key}: the prompt changes the embedding"
        );
    }

    // The command: `embed --as query` writes encode_query's vectors and the texts as given.
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::json!({"text": t}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = dir.path().join("out.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args(["embed", "--device", "cpu", "--as", "query", "--model"])
        .arg(&model_dir)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| {
            r["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    assert!(worst(&got, &p["query"]) <= 1e-5);
    assert_eq!(rows[0]["text"], texts[0]);
}
