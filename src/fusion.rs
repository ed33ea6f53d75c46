//! Model fusion (`multipos average`): weight averaging of models fine-tuned from one base
//! ("model soups"), uniform or weighted, and the greedy soup that adds models one by one while a
//! dev metric improves. Models must share their architecture, tensor shapes, tokenizer and
//! modules; anything else is refused naming the model and what differs.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;

/// Files that must be byte-identical across the models (when present in any of them).
const SAME_FILES: [&str; 7] = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// `config.json` keys that describe a save, not the architecture.
const INCIDENTAL_CONFIG_KEYS: [&str; 4] = [
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
];

/// The weight files of a model directory (`model.safetensors` and loss heads), relative.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.join("model.safetensors").is_file() {
        return Err(Error::invalid(
            dir,
            "not a model directory: no model.safetensors",
        ));
    }
    Ok(crate::io::tree::relative_files(dir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect())
}

fn architecture(dir: &Path) -> Result<serde_json::Value> {
    let mut v: serde_json::Value = crate::io::json::read(&dir.join("config.json"))?;
    if let Some(map) = v.as_object_mut() {
        for k in INCIDENTAL_CONFIG_KEYS {
            map.remove(k);
        }
    }
    Ok(v)
}

/// Refuses models that are not the same network with the same tokenizer as the first.
pub fn check_compatible(models: &[PathBuf]) -> Result<()> {
    let first = &models[0];
    let files = weight_files(first)?;
    let arch = architecture(first)?;
    for other in &models[1..] {
        if weight_files(other)? != files {
            return Err(Error::invalid(
                other,
                format!("holds other weight files than {}", first.display()),
            ));
        }
        if architecture(other)? != arch {
            return Err(Error::invalid(
                other.join("config.json"),
                format!(
                    "another architecture than {}: only models fine-tuned from one base can be averaged",
                    first.display()
                ),
            ));
        }
        for name in SAME_FILES {
            let (a, b) = (first.join(name), other.join(name));
            let same = match (a.exists(), b.exists()) {
                (false, false) => true,
                (true, true) => {
                    std::fs::read(&a).map_err(Error::io("read", &a))?
                        == std::fs::read(&b).map_err(Error::io("read", &b))?
                }
                _ => false,
            };
            if !same {
                return Err(Error::invalid(
                    &b,
                    format!(
                        "differs from {}: the models must share tokenizer and modules",
                        a.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Normalised weights (sum 1); `None` = uniform.
pub fn normalize_weights(n: usize, weights: Option<&[f64]>) -> Result<Vec<f64>> {
    let w = match weights {
        None => vec![1.0; n],
        Some(w) if w.len() != n => {
            return Err(Error::Usage(format!("{} weights for {n} models", w.len())));
        }
        Some(w) => w.to_vec(),
    };
    if let Some(bad) = w.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        return Err(Error::Usage(format!(
            "weights must be positive numbers, got {bad}"
        )));
    }
    let sum: f64 = w.iter().sum();
    Ok(w.into_iter().map(|x| x / sum).collect())
}

/// Σ w_i · file_i, tensor by tensor, accumulated in f64 and stored in the first model's kinds.
fn average_file(models: &[PathBuf], rel: &Path, weights: &[f64]) -> Result<Vec<(String, Tensor)>> {
    let read = |dir: &PathBuf| -> Result<BTreeMap<String, Tensor>> {
        let path = dir.join(rel);
        Ok(Tensor::read_safetensors(&path)
            .map_err(Error::Torch)?
            .into_iter()
            .collect())
    };
    let first = read(&models[0])?;
    let mut sums: BTreeMap<String, Tensor> = first
        .iter()
        .map(|(k, t)| (k.clone(), t.to_kind(Kind::Double) * weights[0]))
        .collect();
    for (dir, w) in models[1..].iter().zip(&weights[1..]) {
        let other = read(dir)?;
        let path = dir.join(rel);
        if other.len() != first.len() || other.keys().ne(first.keys()) {
            return Err(Error::invalid(
                &path,
                "holds other tensors than the first model's",
            ));
        }
        for (name, t) in other {
            let acc = sums.get_mut(&name).expect("same names");
            if t.size() != acc.size() {
                return Err(Error::invalid(
                    &path,
                    format!(
                        "{name}: shape {:?}, the first model's is {:?}",
                        t.size(),
                        acc.size()
                    ),
                ));
            }
            *acc += t.to_kind(Kind::Double) * *w;
        }
    }
    Ok(sums
        .into_iter()
        .map(|(k, t)| {
            let kind = first[&k].kind();
            (k, t.to_kind(kind))
        })
        .collect())
}

/// Writes the weighted average of `models` (weights normalised to sum 1) at `output`, atomically:
/// the first model's directory with every weight file averaged.
pub fn average(models: &[PathBuf], weights: &[f64], output: &Path) -> Result<()> {
    check_compatible(models)?;
    let staged = StagedDir::create(output)?;
    let weight_set = weight_files(&models[0])?;
    for rel in crate::io::tree::relative_files(&models[0])? {
        let dst = staged.path().join(&rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io("create directory", parent))?;
        }
        if weight_set.contains(&rel) {
            Tensor::write_safetensors(&average_file(models, &rel, weights)?, &dst)
                .map_err(Error::Torch)?;
        } else {
            let src = models[0].join(&rel);
            std::fs::copy(&src, &dst).map_err(Error::io("copy", &src))?;
        }
    }
    staged.commit()?;
    Ok(())
}

/// The greedy soup: models sorted by `score` (higher is better), then each added to the soup when
/// the uniform average with it scores at least as well as without. Returns the models kept and
/// the soup's score; the soup is left at `output`.
pub fn greedy_soup(
    models: &[PathBuf],
    output: &Path,
    mut score: impl FnMut(&Path) -> Result<f64>,
) -> Result<(Vec<PathBuf>, f64)> {
    check_compatible(models)?;
    let mut ranked = Vec::with_capacity(models.len());
    for m in models {
        let s = score(m)?;
        tracing::info!(model = %m.display(), score = s, "candidate");
        ranked.push((m.clone(), s));
    }
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut soup = vec![ranked[0].0.clone()];
    let mut best = ranked[0].1;
    average(&soup, &[1.0], output)?;
    let trial = output.with_extension("trial");
    for (m, _) in &ranked[1..] {
        let mut candidate = soup.clone();
        candidate.push(m.clone());
        average(
            &candidate,
            &normalize_weights(candidate.len(), None)?,
            &trial,
        )?;
        let s = score(&trial)?;
        tracing::info!(model = %m.display(), soup = candidate.len(), score = s, best, "tried");
        if s >= best {
            best = s;
            soup = candidate;
            average(&soup, &normalize_weights(soup.len(), None)?, output)?;
        }
    }
    if trial.exists() {
        std::fs::remove_dir_all(&trial).map_err(Error::io("remove", &trial))?;
    }
    Ok((soup, best))
}
