//! SoftmaxLoss, as sentence-transformers defines it: a classifier `Linear(k·d, num_labels)` over the
//! features [u, v, |u − v|] of a pair (u·v appended when asked), trained with cross-entropy against
//! an integer label. Unlike sentence-transformers, the classifier is a first-class trained tensor:
//! it is all-reduced, checkpointed, healed and saved beside the model (`heads/<task>.safetensors`
//! plus `heads/<task>.json`), so it can be reloaded and used to predict.
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::error::{Error, Result};
use crate::io::json;

/// SoftmaxLoss options (sentence-transformers' names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoftmaxConfig {
    /// Number of classes; 0 = as many as the task's data has.
    pub num_labels: usize,
    pub concatenation_sent_rep: bool,
    pub concatenation_sent_difference: bool,
    pub concatenation_sent_multiplication: bool,
}

impl Default for SoftmaxConfig {
    fn default() -> Self {
        Self {
            num_labels: 0,
            concatenation_sent_rep: true,
            concatenation_sent_difference: true,
            concatenation_sent_multiplication: false,
        }
    }
}

impl SoftmaxConfig {
    /// How many d-wide blocks the features concatenate.
    pub(crate) fn blocks(&self) -> i64 {
        2 * i64::from(self.concatenation_sent_rep)
            + i64::from(self.concatenation_sent_difference)
            + i64::from(self.concatenation_sent_multiplication)
    }
}

/// What `heads/<task>.json` records: enough to rebuild the classifier and name its classes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeadInfo {
    pub loss: String,
    pub sentence_embedding_dimension: i64,
    pub num_labels: usize,
    pub concatenation_sent_rep: bool,
    pub concatenation_sent_difference: bool,
    pub concatenation_sent_multiplication: bool,
    /// Class names by label id.
    pub labels: Vec<String>,
}

/// The trained classifier of one SoftmaxLoss task.
pub struct SoftmaxHead {
    vs: nn::VarStore,
    pub cfg: SoftmaxConfig,
    pub dim: i64,
    pub labels: Vec<String>,
}

impl std::fmt::Debug for SoftmaxHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SoftmaxHead({} -> {})",
            self.cfg.blocks() * self.dim,
            self.labels.len()
        )
    }
}

impl SoftmaxHead {
    /// A fresh classifier for embeddings of `dim` and the classes `labels`, initialised as torch's
    /// `nn.Linear` is (uniform in ±1/√fan_in) from `seed`, so every replica starts identical.
    pub fn new(
        cfg: SoftmaxConfig,
        dim: i64,
        labels: Vec<String>,
        device: Device,
        seed: u64,
    ) -> Self {
        let mut cfg = cfg;
        cfg.num_labels = labels.len();
        let fan_in = cfg.blocks() * dim;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform = |n: i64| -> Tensor {
            let v: Vec<f32> = (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            Tensor::from_slice(&v)
        };
        let n = cfg.num_labels as i64;
        let weight = uniform(n * fan_in).view([n, fan_in]);
        let bias = uniform(n);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let _ = root.var_copy("weight", &weight);
        let _ = root.var_copy("bias", &bias);
        Self {
            vs,
            cfg,
            dim,
            labels,
        }
    }

    /// The trainable tensors, by sentence-transformers' names (`classifier.weight`, `classifier.bias`).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, v)| (format!("classifier.{k}"), v))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn tensor(&self, name: &str) -> Tensor {
        self.vs.variables()[name].shallow_clone()
    }

    /// Class logits (B, num_labels) of pairs (u_i, v_i).
    pub(crate) fn logits(&self, u: &Tensor, v: &Tensor) -> Tensor {
        let mut parts = Vec::new();
        if self.cfg.concatenation_sent_rep {
            parts.push(u.shallow_clone());
            parts.push(v.shallow_clone());
        }
        if self.cfg.concatenation_sent_difference {
            parts.push((u - v).abs());
        }
        if self.cfg.concatenation_sent_multiplication {
            parts.push(u * v);
        }
        Tensor::cat(&parts, 1).linear(&self.tensor("weight"), Some(&self.tensor("bias")))
    }

    /// Cross-entropy of the pairs against `labels` (B, int64).
    pub(crate) fn loss(&self, u: &Tensor, v: &Tensor, labels: &Tensor) -> Tensor {
        self.logits(u, v).cross_entropy_for_logits(labels)
    }

    /// Class probabilities (B, num_labels) of pairs (u_i, v_i).
    pub fn predict(&self, u: &Tensor, v: &Tensor) -> Tensor {
        tch::no_grad(|| self.logits(u, v).softmax(-1, Kind::Float))
    }

    fn paths(dir: &Path, task: &str) -> (PathBuf, PathBuf) {
        let heads = dir.join("heads");
        (
            heads.join(format!("{task}.safetensors")),
            heads.join(format!("{task}.json")),
        )
    }

    /// Writes the classifier of task `task` into a model directory being written (not staged here).
    pub(crate) fn write(&self, dir: &Path, task: &str) -> Result<()> {
        let (weights, info) = Self::paths(dir, task);
        let parent = weights.parent().expect("heads/ has a parent");
        std::fs::create_dir_all(parent).map_err(Error::io("create directory", parent))?;
        Tensor::write_safetensors(&self.parameters(), &weights).map_err(Error::Torch)?;
        let meta = HeadInfo {
            loss: "SoftmaxLoss".into(),
            sentence_embedding_dimension: self.dim,
            num_labels: self.labels.len(),
            concatenation_sent_rep: self.cfg.concatenation_sent_rep,
            concatenation_sent_difference: self.cfg.concatenation_sent_difference,
            concatenation_sent_multiplication: self.cfg.concatenation_sent_multiplication,
            labels: self.labels.clone(),
        };
        std::fs::write(&info, json::to_pretty(&meta)).map_err(Error::io("write", &info))
    }

    /// Reads the classifier of task `task` from a model directory.
    pub fn read(dir: &Path, task: &str, device: Device) -> Result<Self> {
        let (weights, info_path) = Self::paths(dir, task);
        let info: HeadInfo = json::read(&info_path)?;
        let cfg = SoftmaxConfig {
            num_labels: info.num_labels,
            concatenation_sent_rep: info.concatenation_sent_rep,
            concatenation_sent_difference: info.concatenation_sent_difference,
            concatenation_sent_multiplication: info.concatenation_sent_multiplication,
        };
        if info.labels.len() != info.num_labels || cfg.blocks() == 0 {
            return Err(Error::invalid(
                &info_path,
                "inconsistent num_labels, labels or features",
            ));
        }
        let head = Self::new(
            cfg,
            info.sentence_embedding_dimension,
            info.labels,
            device,
            0,
        );
        head.load_weights(&weights)?;
        Ok(head)
    }

    /// Replaces the classifier's values with those in `weights` (same shapes required).
    pub(crate) fn load_weights(&self, weights: &Path) -> Result<()> {
        let saved = Tensor::read_safetensors(weights).map_err(Error::Torch)?;
        for (name, mut var) in self.parameters() {
            let Some((_, t)) = saved.iter().find(|(k, _)| *k == name) else {
                return Err(Error::invalid(weights, format!("lacks {name}")));
            };
            if t.size() != var.size() {
                return Err(Error::invalid(
                    weights,
                    format!("{name}: shape {:?}, expected {:?}", t.size(), var.size()),
                ));
            }
            tch::no_grad(|| var.copy_(&t.to_kind(Kind::Float)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_heads_read_back_identically() {
        let head = SoftmaxHead::new(
            SoftmaxConfig::default(),
            4,
            vec!["a".into(), "b".into(), "c".into()],
            Device::Cpu,
            7,
        );
        let dir = tempfile::tempdir().unwrap();
        head.write(dir.path(), "nli").unwrap();
        let back = SoftmaxHead::read(dir.path(), "nli", Device::Cpu).unwrap();
        let u = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let v = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        assert_eq!(head.logits(&u, &v), back.logits(&u, &v));
        assert_eq!(back.labels, ["a", "b", "c"]);
        assert_eq!(head.parameters()[0].1.size(), [3]);
        assert_eq!(head.parameters()[1].1.size(), [3, 12]);
    }
}
