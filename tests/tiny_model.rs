//! The loader, encoder, pooling and saver on a tiny random BERT written in the real on-disk format.
mod common;

use multipos::SentenceModel;
use multipos::model::config::PoolingMode;
use multipos::model::dropout::RowSeeds;
use multipos::model::masks::MaskGenerator;
use multipos::model::tiny::TinySpec;
use tch::Device;

const TEXTS: &[&str] = &[
    "the lord said unto them",
    "what does my home insurance policy cover?",
    "a",
    "peace and faith, free of water!",
];

#[test]
fn save_and_reload_is_bit_identical() {
    let (_dir, path) = common::tiny_model(&TinySpec::default());
    let model = SentenceModel::load(&path, Device::Cpu).unwrap();
    let before = model.embed(TEXTS, 2).unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save(&out.path().join("copy")).unwrap();
    let reloaded = SentenceModel::load(&out.path().join("copy"), Device::Cpu).unwrap();
    assert!(before.equal(&reloaded.embed(TEXTS, 2).unwrap()));

    // Saving the reloaded model again gives the same bytes: nothing drifts across round trips.
    reloaded.save(&out.path().join("copy2")).unwrap();
    assert_eq!(
        common::dir_files(&out.path().join("copy")),
        common::dir_files(&out.path().join("copy2"))
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        2,
        "no staging leftovers"
    );
}

#[test]
fn normalized_output_has_unit_norm_and_padding_does_not_leak() {
    let (_dir, path) = common::tiny_model(&TinySpec::default());
    let model = SentenceModel::load(&path, Device::Cpu).unwrap();
    let batched = common::rows(&model.embed(TEXTS, 4).unwrap());
    for (i, text) in TEXTS.iter().enumerate() {
        let alone = common::rows(&model.embed(&[text], 1).unwrap()).remove(0);
        let diff = alone
            .iter()
            .zip(&batched[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "text {i}: padding changed the embedding by {diff}"
        );
        let norm: f32 = alone.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}

#[test]
fn pooling_modes_concatenate_and_skip_normalize() {
    let spec = TinySpec {
        pooling: vec![PoolingMode::Cls, PoolingMode::Max],
        normalize: false,
        ..TinySpec::default()
    };
    let (_dir, path) = common::tiny_model(&spec);
    let model = SentenceModel::load(&path, Device::Cpu).unwrap();
    assert_eq!(model.dimension(), 64);
    let v = model.embed(TEXTS, 4).unwrap();
    assert_eq!(v.size(), vec![4, 64]);
    let norms = common::rows(&v.norm_scalaropt_dim(2, [1].as_slice(), true));
    assert!(
        norms.iter().any(|n| (n[0] - 1.0).abs() > 1e-3),
        "Normalize must not run"
    );
}

#[test]
fn dropout_masks_follow_row_seeds_not_batch_layout() {
    let spec = TinySpec {
        dropout: 0.2,
        ..TinySpec::default()
    };
    let (_dir, path) = common::tiny_model(&spec);
    let model = SentenceModel::load(&path, Device::Cpu).unwrap();
    let batch = model.tokenizer().encode(TEXTS).unwrap();
    let seeds = RowSeeds::new(vec![11, 12, 13, 14], MaskGenerator::CURRENT, Device::Cpu);
    let eval = model.forward_t(&batch, None);
    assert!(
        eval.equal(&model.forward_t(&batch, None)),
        "inference is deterministic"
    );
    let a = model.forward_t(&batch, Some(&seeds));
    assert!(
        a.equal(&model.forward_t(&batch, Some(&seeds))),
        "same seeds, same masks"
    );
    assert!(!a.equal(&eval), "dropout must change activations");
    assert!(!a.equal(&model.forward_t(
        &batch,
        Some(&RowSeeds::new(
            vec![1, 2, 3, 4],
            MaskGenerator::CURRENT,
            Device::Cpu
        ))
    )));

    // Row 2 ("a", the shortest) alone, unpadded, with its seed: the same vector as inside the batch.
    let alone = model.forward_t(
        &model.tokenizer().encode(&[TEXTS[2]]).unwrap(),
        Some(&RowSeeds::new(
            vec![13],
            MaskGenerator::CURRENT,
            Device::Cpu,
        )),
    );
    let diff = (alone.get(0) - a.get(2)).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "padding changed a row's dropout: {diff}");
}

#[test]
fn truncates_at_max_seq_length() {
    let spec = TinySpec {
        max_seq_length: 16,
        ..TinySpec::default()
    };
    let (_dir, path) = common::tiny_model(&spec);
    let model = SentenceModel::load(&path, Device::Cpu).unwrap();
    let long = "the lord said unto them ".repeat(20);
    assert_eq!(
        model.tokenizer().lengths(&[&long, "a"]).unwrap(),
        vec![16, 3]
    );
    let batch = model.tokenizer().encode(&[&long, "a"]).unwrap();
    assert_eq!(
        batch.input_ids.size(),
        vec![2, 16],
        "padded to the longest, not to a fixed length"
    );
}

fn load_err(path: &std::path::Path) -> String {
    match SentenceModel::load(path, Device::Cpu) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_model_directories_give_clear_errors() {
    let (dir, path) = common::tiny_model(&TinySpec::default());
    let err = load_err(&dir.path().join("nope"));
    assert!(
        err.contains("nope") && err.contains("does not exist"),
        "{err}"
    );

    let edit = |file: &str, f: &dyn Fn(String) -> String| {
        let p = path.join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, f(text.clone())).unwrap();
        text
    };

    let orig = edit("config.json", &|t| t.replace("\"bert\"", "\"gpt2\""));
    let err = load_err(&path);
    assert!(
        err.contains("config.json")
            && err.contains("unsupported model_type")
            && err.contains("gpt2"),
        "{err}"
    );
    edit("config.json", &|_| "{ not json".into());
    let err = load_err(&path);
    assert!(
        err.contains("config.json") && err.contains("invalid JSON"),
        "{err}"
    );
    edit("config.json", &|_| orig.clone());

    let orig = edit("1_Pooling/config.json", &|_| {
        r#"{"word_embedding_dimension": 32, "pooling_mode": "median"}"#.into()
    });
    let err = load_err(&path);
    assert!(
        err.contains("1_Pooling/config.json") && err.contains("'median'"),
        "{err}"
    );
    edit("1_Pooling/config.json", &|_| orig.clone());

    let orig = edit("config.json", &|t| {
        t.replace("\"hidden_size\": 32", "\"hidden_size\": 48")
    });
    let err = load_err(&path);
    assert!(
        err.contains("word_embedding_dimension 32 differs from hidden_size 48"),
        "{err}"
    );
    edit("1_Pooling/config.json", &|t| t.replace(": 32", ": 48"));
    let err = load_err(&path);
    assert!(
        err.contains("model.safetensors") && err.contains("shape mismatch"),
        "{err}"
    );
    edit("config.json", &|_| orig.clone());
    edit("1_Pooling/config.json", &|t| t.replace(": 48", ": 32"));

    std::fs::write(path.join("model.safetensors"), b"garbage").unwrap();
    let err = load_err(&path);
    assert!(
        err.contains("model.safetensors") && err.contains("not a safetensors file"),
        "{err}"
    );
    std::fs::remove_file(path.join("model.safetensors")).unwrap();
    let err = load_err(&path);
    assert!(
        err.contains("model.safetensors") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn accepts_bert_prefixed_checkpoints() {
    let (_dir, path) = common::tiny_model(&TinySpec::default());
    let model = SentenceModel::load(&path, Device::Cpu).unwrap();
    let expected = model.embed(TEXTS, 4).unwrap();
    // Rewrite the weights the way BertForX checkpoints store them: every name under `bert.`.
    let bytes = std::fs::read(path.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (format!("bert.{n}"), v))
        .collect();
    let out = safetensors::serialize(renamed, None).unwrap();
    std::fs::write(path.join("model.safetensors"), out).unwrap();
    let prefixed = SentenceModel::load(&path, Device::Cpu).unwrap();
    assert!(expected.equal(&prefixed.embed(TEXTS, 4).unwrap()));
}

/// bf16 mixed precision (for CUDA; exercised here on the CPU, which has bf16 kernels too): products
/// in bf16 give vectors close to f32, outputs stay f32, and gradients reach the f32 weights.
#[test]
fn bf16_products_stay_close_to_f32_and_train_f32_weights() {
    let (_dir, path) = common::tiny_model(&TinySpec::default());
    let mut model = SentenceModel::load(&path, Device::Cpu).unwrap();
    let batch = model.tokenizer().encode(TEXTS).unwrap();
    let f32_out = model.forward_t(&batch, None);
    model.set_bf16(true);
    let bf16_out = model.forward_t(&batch, None);
    assert_eq!(bf16_out.kind(), tch::Kind::Float);
    let diff = (&bf16_out - &f32_out).abs().max().double_value(&[]);
    assert!(diff > 0.0 && diff < 0.05, "bf16 vs f32: {diff}");
    let trained = model.forward_t(
        &batch,
        Some(&RowSeeds::new(
            vec![1, 2, 3, 4],
            MaskGenerator::CURRENT,
            Device::Cpu,
        )),
    );
    trained.square().sum(tch::Kind::Float).backward();
    for (name, var) in model.var_store().variables() {
        if name.contains("query.weight") {
            assert_eq!(
                var.kind(),
                tch::Kind::Float,
                "{name}: master weights stay f32"
            );
            assert!(
                var.grad().defined()
                    && var.grad().abs().sum(tch::Kind::Float).double_value(&[]) > 0.0,
                "{name} got no gradient"
            );
        }
    }
}

#[test]
fn kept_inference_streams_follow_new_weights() {
    // Two threads: the second stream's encoder is built on the first call and kept.
    tch::set_num_threads(2);
    let (_a, first) = common::tiny_model(&TinySpec::default());
    let (_b, second) = common::tiny_model(&TinySpec {
        seed: 1,
        ..TinySpec::default()
    });
    let model = SentenceModel::load(&first, Device::Cpu).unwrap();
    let before = common::rows(&model.embed(TEXTS, 1).unwrap());
    // New storage for every parameter, as set_data gives it (not an in-place copy).
    let other = SentenceModel::load(&second, Device::Cpu).unwrap();
    let source = other.var_store().variables();
    for (name, mut var) in model.var_store().variables() {
        var.set_data(&source[&name].copy());
    }
    let after = common::rows(&model.embed(TEXTS, 1).unwrap());
    assert_ne!(before, after);
    assert_eq!(after, common::rows(&other.embed(TEXTS, 1).unwrap()));
}
