//! Model fusion (`multipos average`): weight averaging of models fine-tuned from one base
//! ("model soups"), uniform or weighted, and the greedy soup that adds models one by one while a
//! dev metric improves. Models must share their architecture, tensor shapes, tokenizer and
//! modules; anything else is refused naming the model and what differs.
use std::borrow::Cow;
use std::path::{Path, PathBuf};

use safetensors::tensor::{TensorView, View};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;
use crate::model::weights::{f32_values, map_file, parse};

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
pub(crate) fn check_compatible(models: &[PathBuf]) -> Result<()> {
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

/// One weight file of every model, memory-mapped.
struct MappedFiles {
    paths: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
}

impl MappedFiles {
    fn open(models: &[PathBuf], rel: &Path) -> Result<Self> {
        let paths: Vec<PathBuf> = models.iter().map(|m| m.join(rel)).collect();
        let maps = paths.iter().map(|p| map_file(p)).collect::<Result<_>>()?;
        Ok(Self { paths, maps })
    }

    fn parse(&self) -> Result<Vec<SafeTensors<'_>>> {
        self.paths
            .iter()
            .zip(&self.maps)
            .map(|(path, map)| parse(path, map))
            .collect()
    }
}

/// Elements averaged at a time (8 MiB of f64 sums).
const AVERAGE_CHUNK: usize = 1 << 20;

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// One tensor of the average, computed only when the writer asks for its bytes, so that memory
/// holds the output tensor being written and one slice of sums, not whole models.
struct Averaged<'a> {
    views: Vec<TensorView<'a>>,
    weights: &'a [f64],
}

impl View for Averaged<'_> {
    fn dtype(&self) -> Dtype {
        self.views[0].dtype()
    }

    fn shape(&self) -> &[usize] {
        self.views[0].shape()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let first = &self.views[0];
        if !is_float(first.dtype()) {
            // Integer buffers (e.g. position ids) are checked identical across the models.
            return Cow::Borrowed(first.data());
        }
        let out_dtype = first.dtype();
        let out_size = out_dtype.bitsize() / 8;
        let len: usize = first.shape().iter().product();
        let mut out = Vec::with_capacity(len * out_size);
        // In slices of elements, so the f64 sums take a bounded buffer whatever the tensor's size.
        for start in (0..len).step_by(AVERAGE_CHUNK) {
            let end = (start + AVERAGE_CHUNK).min(len);
            let values = |view: &TensorView<'_>| {
                let size = view.dtype().bitsize() / 8;
                f32_values(view.dtype(), &view.data()[start * size..end * size])
                    .expect("checked to be floating point")
            };
            // Started from the first term, not from 0.0, which would turn -0.0 into +0.0.
            let mut sum: Vec<f64> = values(first)
                .into_iter()
                .map(|x| f64::from(x) * self.weights[0])
                .collect();
            for (view, w) in self.views[1..].iter().zip(&self.weights[1..]) {
                for (acc, x) in sum.iter_mut().zip(values(view)) {
                    *acc += f64::from(x) * w;
                }
            }
            match out_dtype {
                Dtype::F16 => out.extend(
                    sum.iter()
                        .flat_map(|x| half::f16::from_f64(*x).to_le_bytes()),
                ),
                Dtype::BF16 => out.extend(
                    sum.iter()
                        .flat_map(|x| half::bf16::from_f64(*x).to_le_bytes()),
                ),
                _ => out.extend(sum.iter().flat_map(|x| (*x as f32).to_le_bytes())),
            }
        }
        Cow::Owned(out)
    }

    fn data_len(&self) -> usize {
        self.views[0].data_len()
    }
}

/// The tensors of the average of `files` (weights summing to 1), each in the first model's dtype,
/// after checking that every model holds the same tensors with the same shapes.
fn averaged_tensors<'a>(
    files: &'a MappedFiles,
    parsed: &'a [SafeTensors<'a>],
    weights: &'a [f64],
) -> Result<Vec<(String, Averaged<'a>)>> {
    let mut names: Vec<&str> = parsed[0].names();
    names.sort_unstable();
    for (st, path) in parsed[1..].iter().zip(&files.paths[1..]) {
        let mut other = st.names();
        other.sort_unstable();
        if other != names {
            return Err(Error::invalid(
                path,
                "holds other tensors than the first model's",
            ));
        }
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let views = parsed
            .iter()
            .map(|st| st.tensor(name).expect("name listed by the file"))
            .collect::<Vec<_>>();
        let first = &views[0];
        for (view, path) in views[1..].iter().zip(&files.paths[1..]) {
            if view.shape() != first.shape() {
                return Err(Error::invalid(
                    path,
                    format!(
                        "{name}: shape {:?}, the first model's is {:?}",
                        view.shape(),
                        first.shape()
                    ),
                ));
            }
            let same = if is_float(first.dtype()) {
                is_float(view.dtype())
            } else {
                view.dtype() == first.dtype() && view.data() == first.data()
            };
            if !same {
                return Err(Error::invalid(
                    path,
                    format!(
                        "{name}: {:?} tensor that cannot be averaged with the first model's {:?} \
                         (only floating-point tensors are averaged; others must be equal)",
                        view.dtype(),
                        first.dtype()
                    ),
                ));
            }
        }
        out.push((name.to_string(), Averaged { views, weights }));
    }
    Ok(out)
}

/// Writes Σ w_i · file_i at `dst`, tensor by tensor (accumulated in f64, stored in the first
/// model's dtypes and with its file metadata).
fn average_file(models: &[PathBuf], rel: &Path, weights: &[f64], dst: &Path) -> Result<()> {
    let files = MappedFiles::open(models, rel)?;
    let parsed = files.parse()?;
    let (_, header) = SafeTensors::read_metadata(&files.maps[0])
        .map_err(|e| Error::invalid(&files.paths[0], format!("not a safetensors file: {e}")))?;
    let tensors = averaged_tensors(&files, &parsed, weights)?;
    safetensors::serialize_to_file(tensors, header.metadata().clone(), dst)
        .map_err(|e| Error::invalid(dst, format!("cannot write the averaged weights: {e}")))
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
            average_file(models, &rel, weights, &dst)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_longer_than_a_chunk_is_averaged_element_by_element() {
        let len = AVERAGE_CHUNK * 2 + 3;
        let a: Vec<f32> = (0..len).map(|i| (i as f32).sin()).collect();
        let b: Vec<f32> = (0..len).map(|i| -(i as f32 * 0.5).cos()).collect();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (ab, bb) = (bytes(&a), bytes(&b));
        let weights = [0.25, 0.75];
        let avg = Averaged {
            views: vec![
                TensorView::new(Dtype::F32, vec![len], &ab).unwrap(),
                TensorView::new(Dtype::F32, vec![len], &bb).unwrap(),
            ],
            weights: &weights,
        };
        let want: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (f64::from(*x) * 0.25 + f64::from(*y) * 0.75) as f32)
            .collect();
        assert_eq!(avg.data_len(), len * 4);
        assert_eq!(avg.data().as_ref(), bytes(&want).as_slice());
    }
}
