//! `multipos average`: two copies average to the same model bit for bit, weights are honoured,
//! half-precision models stay in their dtype, mismatched models (and unequal integer buffers) are
//! refused naming what differs, an existing output is kept unless asked, and the greedy soup never
//! scores below its best ingredient.
mod common;

use std::path::{Path, PathBuf};

use multipos::fusion::{average, greedy_soup, normalize_weights};
use multipos::model::tiny::TinySpec;

fn tensors(dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut t = tch::Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn two_copies_average_to_the_same_model_and_weights_are_honoured() {
    let (dir, a) = common::tiny_model(&TinySpec::default());
    let (_d2, b) = common::tiny_model(&TinySpec {
        seed: 2,
        ..TinySpec::default()
    });
    // A negative zero in the weights: "bit for bit" includes the sign of zero.
    let signed: Vec<(String, tch::Tensor)> = tensors(&a)
        .into_iter()
        .map(|(n, x)| {
            if n.ends_with("LayerNorm.bias") {
                (n, x.zeros_like().neg())
            } else {
                (n, x)
            }
        })
        .collect();
    tch::Tensor::write_safetensors(&signed, a.join("model.safetensors")).unwrap();
    let copy = dir.path().join("copy");
    common::copy_dir(&a, &copy);
    let out = dir.path().join("avg");
    average(
        &[a.clone(), copy.clone(), copy],
        &normalize_weights(3, None).unwrap(),
        &out,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap(),
        "the average of copies is the model, byte for byte"
    );
    assert_eq!(
        std::fs::read(a.join("tokenizer.json")).unwrap(),
        std::fs::read(out.join("tokenizer.json")).unwrap()
    );
    multipos::SentenceModel::load(&out, tch::Device::Cpu).unwrap();

    let weighted = dir.path().join("weighted");
    average(
        &[a.clone(), b.clone()],
        &normalize_weights(2, Some(&[1.0, 3.0])).unwrap(),
        &weighted,
    )
    .unwrap();
    for (((n, x), (_, y)), (_, z)) in tensors(&a).iter().zip(tensors(&b)).zip(tensors(&weighted)) {
        let want = (x.to_kind(tch::Kind::Double) * 0.25 + y.to_kind(tch::Kind::Double) * 0.75)
            .to_kind(tch::Kind::Float);
        assert!(want.equal(&z), "{n}: not 0.25 a + 0.75 b");
    }
    assert!(
        normalize_weights(2, Some(&[1.0, -1.0]))
            .unwrap_err()
            .to_string()
            .contains("positive")
    );
    assert!(
        normalize_weights(3, Some(&[1.0, 1.0]))
            .unwrap_err()
            .to_string()
            .contains("2 weights for 3 models")
    );
}

#[test]
fn mismatched_models_are_refused_naming_what_differs() {
    let (dir, a) = common::tiny_model(&TinySpec::default());
    let (_d2, wide) = common::tiny_model(&TinySpec {
        hidden_size: 48,
        ..TinySpec::default()
    });
    let out = dir.path().join("out");
    let err = average(&[a.clone(), wide.clone()], &[0.5, 0.5], &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("another architecture"),
        "{err}"
    );

    let retok: PathBuf = dir.path().join("retokenized");
    common::copy_dir(&a, &retok);
    let tok = retok.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok)
        .unwrap()
        .replacen("[UNK]", "[UNKNOWN]", 1);
    std::fs::write(&tok, text).unwrap();
    let err = average(&[a.clone(), retok], &[0.5, 0.5], &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("share tokenizer"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written for a refused average");

    std::fs::create_dir_all(&out).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args(["average", "--models"])
        .arg(&a)
        .arg(&a)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
}

#[test]
fn the_greedy_soup_scores_at_least_its_best_ingredient() {
    let (dir, a) = common::tiny_model(&TinySpec::default());
    let (_d2, b) = common::tiny_model(&TinySpec {
        seed: 2,
        ..TinySpec::default()
    });
    let (_d3, c) = common::tiny_model(&TinySpec {
        seed: 3,
        ..TinySpec::default()
    });
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/data/bible_paraphrase_tiny");
    let set = multipos::eval::IrDataset::load(
        &tiny.join("dev_queries.jsonl"),
        &tiny.join("corpus.jsonl"),
        &tiny.join("dev_qrels.tsv"),
    )
    .unwrap();
    let score = |d: &Path| -> multipos::Result<f64> {
        let m = multipos::SentenceModel::load(d, tch::Device::Cpu)?;
        Ok(multipos::eval::evaluate(&m, &set, 32, &Default::default())?["ndcg@10"])
    };
    let singles: Vec<f64> = [&a, &b, &c].iter().map(|m| score(m).unwrap()).collect();
    let out = dir.path().join("soup");
    let (soup, best) = greedy_soup(&[a, b, c], &out, score).unwrap();
    assert!(!soup.is_empty());
    let top = singles.iter().copied().fold(f64::MIN, f64::max);
    assert!(best >= top, "soup {best} below its best ingredient {top}");
    assert!(
        (score(&out).unwrap() - best).abs() < 1e-9,
        "the written soup is the scored one"
    );
    assert!(!out.with_extension("trial").exists());
}

/// Rewrites `dir`'s weights in `kind`, optionally with an extra integer buffer.
fn rewrite_weights(dir: &Path, kind: tch::Kind, position_ids: Option<&[i64]>) {
    let mut t: Vec<(String, tch::Tensor)> = tensors(dir)
        .into_iter()
        .filter(|(n, _)| n != "embeddings.position_ids")
        .map(|(n, x)| (n, x.to_kind(kind)))
        .collect();
    if let Some(ids) = position_ids {
        t.push((
            "embeddings.position_ids".into(),
            tch::Tensor::from_slice(ids),
        ));
    }
    tch::Tensor::write_safetensors(&t, dir.join("model.safetensors")).unwrap();
}

#[test]
fn half_precision_models_average_in_their_dtype_and_unequal_buffers_are_refused() {
    let (dir, a) = common::tiny_model(&TinySpec::default());
    let (_d2, b) = common::tiny_model(&TinySpec {
        seed: 2,
        ..TinySpec::default()
    });
    rewrite_weights(&a, tch::Kind::Half, Some(&[0, 1, 2]));
    rewrite_weights(&b, tch::Kind::Half, Some(&[0, 1, 2]));
    let out = dir.path().join("avg");
    average(&[a.clone(), b.clone()], &[0.5, 0.5], &out).unwrap();
    for (((n, x), (_, y)), (m, z)) in tensors(&a).iter().zip(tensors(&b)).zip(tensors(&out)) {
        assert_eq!(n, &m);
        assert_eq!(z.kind(), x.kind(), "{n} keeps its dtype");
        if x.kind() == tch::Kind::Half {
            let want = ((x.to_kind(tch::Kind::Double) + y.to_kind(tch::Kind::Double)) * 0.5)
                .to_kind(tch::Kind::Half);
            assert!(want.equal(&z), "{n}: not the f16 rounding of the mean");
        } else {
            assert!(x.equal(&z), "{n}: an integer buffer is copied");
        }
    }
    multipos::SentenceModel::load(&out, tch::Device::Cpu).unwrap();

    rewrite_weights(&b, tch::Kind::Half, Some(&[2, 1, 0]));
    let refused = dir.path().join("refused");
    let err = average(&[a, b.clone()], &[0.5, 0.5], &refused)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&b.join("model.safetensors").display().to_string())
            && err.contains("embeddings.position_ids")
            && err.contains("must be equal"),
        "{err}"
    );
    assert!(!refused.exists(), "nothing written for a refused average");
}
