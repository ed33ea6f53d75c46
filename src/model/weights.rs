//! Moving encoder weights between `model.safetensors` and a tch `VarStore`.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tch::{Kind, Tensor, nn::VarStore};

use crate::error::{Error, Result};

/// Checkpoint prefixes under which a bare encoder may be stored (`BertForX` saves `bert.*`).
const PREFIXES: &[&str] = &["", "bert."];

/// Tensors a checkpoint may carry that the encoder does not need; kept so a save loses nothing
/// that Python would otherwise re-initialise at random (`pooler.*`).
fn is_passthrough(name: &str) -> bool {
    name.starts_with("pooler.")
}

/// A tensor read from disk: raw f32 values and shape, independent of any device.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The values of a floating-point tensor as f32 (`None` for other dtypes).
pub(crate) fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    f32_values(view.dtype(), view.data())
}

/// Little-endian `bytes` of `dtype` (F32, F16 or BF16) as f32 values (`None` for other dtypes).
pub(crate) fn f32_values(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let halves = |conv: fn(u16) -> f32| {
        bytes
            .chunks_exact(2)
            .map(|c| conv(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    };
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::BF16 => Some(halves(|b| half::bf16::from_bits(b).to_f32())),
        Dtype::F16 => Some(halves(|b| half::f16::from_bits(b).to_f32())),
        _ => None,
    }
}

/// A safetensors file mapped into memory, read-only. Mapped, not read: its tensors are used one
/// at a time, so the whole file never sits in memory beside what is made of them (a model load
/// peaked at twice the model's size).
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(Error::io("open", path))?;
    // SAFETY: the map is read-only and its users drop it once they have copied out what they need.
    // multipos replaces model files only by renaming a new file into place, which leaves a mapped
    // file intact; a file truncated in place by another program meanwhile could fault the read.
    unsafe { memmap2::Mmap::map(&file) }.map_err(Error::io("map", path))
}

/// The tensors of the safetensors `bytes` read from `path`.
pub(crate) fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::invalid(path, format!("not a safetensors file: {e}")))
}

/// Copies every variable of `vs` from the safetensors file at `path`, accepting an optional
/// `bert.` prefix. Returns the passthrough tensors found (e.g. the pooler) to be written back on save.
pub(crate) fn load_into(vs: &mut VarStore, path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = map_file(path)?;
    let st = parse(path, &bytes)?;
    let names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    let prefix = PREFIXES
        .iter()
        .copied()
        .find(|p| {
            names
                .iter()
                .any(|n| n == &format!("{p}embeddings.word_embeddings.weight"))
        })
        .ok_or_else(|| {
            Error::invalid(
                path,
                "no embeddings.word_embeddings.weight (with or without a 'bert.' prefix)",
            )
        })?;

    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &mut variables {
        let key = format!("{prefix}{name}");
        let view = st
            .tensor(&key)
            .map_err(|_| Error::invalid(path, format!("missing parameter {key}")))?;
        let expected: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
        if view.shape() != expected.as_slice() {
            return Err(Error::invalid(
                path,
                format!(
                    "shape mismatch for {key}: file has {:?}, config.json implies {expected:?}",
                    view.shape()
                ),
            ));
        }
        let values = to_f32(&view).ok_or_else(|| {
            Error::invalid(path, format!("{key}: unsupported dtype {:?}", view.dtype()))
        })?;
        let src = Tensor::from_slice(&values)
            .view(var.size().as_slice())
            .to_kind(var.kind());
        tch::no_grad(|| var.copy_(&src));
    }

    let known: HashMap<String, ()> = variables
        .iter()
        .map(|(n, _)| (format!("{prefix}{n}"), ()))
        .collect();
    let mut passthrough = BTreeMap::new();
    for name in &names {
        if known.contains_key(name) {
            continue;
        }
        let bare = name.strip_prefix(prefix).unwrap_or(name);
        if is_passthrough(bare) {
            let view = st.tensor(name).expect("name listed by the file");
            if let Some(data) = to_f32(&view) {
                passthrough.insert(
                    bare.to_string(),
                    HostTensor {
                        shape: view.shape().to_vec(),
                        data,
                    },
                );
            }
        } else if bare != "embeddings.position_ids" {
            tracing::warn!(file = %path.display(), tensor = %name, "ignoring a tensor the encoder does not use");
        }
    }
    Ok(passthrough)
}

/// Copies a tensor to host f32 values.
pub(crate) fn to_host(t: &Tensor) -> HostTensor {
    let t = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let mut data = vec![0f32; t.numel()];
    t.copy_data(&mut data, t.numel());
    HostTensor { shape, data }
}

/// Serialises the variables of `vs` plus `extra` tensors as F32 safetensors bytes, names unprefixed.
pub(crate) fn serialize(vs: &VarStore, extra: &BTreeMap<String, HostTensor>) -> Result<Vec<u8>> {
    let mut host: BTreeMap<String, HostTensor> = extra.clone();
    for (name, var) in vs.variables() {
        host.insert(name, to_host(&var));
    }
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = host
        .into_iter()
        .map(|(name, t)| {
            let bytes = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name, t.shape, bytes)
        })
        .collect();
    let views = raw
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Usage(format!("cannot serialise weights: {e}")))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Usage(format!("cannot serialise weights: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_views_widen_to_known_values() {
        let f16: Vec<u8> = [0x3c00u16, 0xc000, 0x0001, 0x7c00]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let view = TensorView::new(Dtype::F16, vec![4], &f16).unwrap();
        let v = to_f32(&view).unwrap();
        assert_eq!(&v[..3], &[1.0, -2.0, 5.960_464_5e-8]);
        assert!(v[3].is_infinite());
        let bf16: Vec<u8> = 0x3f80u16.to_le_bytes().to_vec();
        let view = TensorView::new(Dtype::BF16, vec![1], &bf16).unwrap();
        assert_eq!(to_f32(&view).unwrap(), vec![1.0]);
    }
}
