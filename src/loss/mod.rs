//! Training objectives over sentence embeddings (docs/design.md §4). Every objective takes the
//! embedding columns of a whole global batch plus that batch's per-row targets, so one process and
//! W workers (each with its own slice live, the others gathered) compute the same loss.
pub mod cosent;
pub mod cosine;
pub mod mnrl;
pub mod softmax;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use cosent::{CoSentConfig, cosent_loss};
pub use cosine::{CosineConfig, PointLoss, cosine_similarity_loss};
pub use mnrl::{HardnessMode, MnrlConfig, mnrl_loss};
pub use softmax::{SoftmaxConfig, SoftmaxHead};

/// What each row of a global batch is trained towards.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// The row's query group (in-batch-negative losses: rows of one group never push each other away).
    Groups(Vec<u32>),
    /// A gold similarity per pair (CosineSimilarityLoss, CoSENT).
    Scores(Vec<f32>),
    /// A class per pair (SoftmaxLoss).
    Labels(Vec<i64>),
}

impl Targets {
    /// Rows covered.
    pub(crate) fn len(&self) -> usize {
        match self {
            Targets::Groups(v) => v.len(),
            Targets::Scores(v) => v.len(),
            Targets::Labels(v) => v.len(),
        }
    }

    /// The targets of rows `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Targets {
        let r = start..start + len;
        match self {
            Targets::Groups(v) => Targets::Groups(v[r].to_vec()),
            Targets::Scores(v) => Targets::Scores(v[r].to_vec()),
            Targets::Labels(v) => Targets::Labels(v[r].to_vec()),
        }
    }
}

/// A loss as the config names it: sentence-transformers' class, parameter names and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LossConfig {
    #[serde(alias = "MultipleNegativesRankingLoss")]
    Mnrl(MnrlConfig),
    #[serde(alias = "CosineSimilarityLoss")]
    CosineSimilarity(CosineConfig),
    #[serde(alias = "CoSENTLoss")]
    Cosent(CoSentConfig),
    #[serde(alias = "SoftmaxLoss")]
    Softmax(SoftmaxConfig),
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig::Mnrl(MnrlConfig::default())
    }
}

impl LossConfig {
    /// sentence-transformers' class name of the loss.
    pub(crate) fn class_name(&self) -> &'static str {
        match self {
            LossConfig::Mnrl(_) => "MultipleNegativesRankingLoss",
            LossConfig::CosineSimilarity(_) => "CosineSimilarityLoss",
            LossConfig::Cosent(_) => "CoSENTLoss",
            LossConfig::Softmax(_) => "SoftmaxLoss",
        }
    }

    /// Whether the loss ranks each anchor against the other rows of its batch: then its batches must
    /// be conflict-free; the other (pointwise) losses take shuffled batches of scored or labelled pairs.
    pub(crate) fn in_batch_negatives(&self) -> bool {
        matches!(self, LossConfig::Mnrl(_))
    }

    /// Checks values that are impossible on their own.
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            LossConfig::Mnrl(c) => c.validate(),
            LossConfig::Cosent(c) if !(c.scale > 0.0 && c.scale.is_finite()) => {
                Err(format!("loss.scale must be positive, got {}", c.scale))
            }
            LossConfig::Softmax(c) if c.blocks() == 0 => Err(
                "SoftmaxLoss needs at least one of concatenation_sent_rep, _difference, _multiplication".into(),
            ),
            _ => Ok(()),
        }
    }
}

/// A loss ready to run: its settings and, for SoftmaxLoss, its trained classifier.
#[derive(Debug)]
pub enum Objective {
    Mnrl {
        cfg: MnrlConfig,
        /// Mask same-group positives (query groups planned several rows to a batch).
        multi_positive: bool,
    },
    CosineSimilarity(CosineConfig),
    Cosent(CoSentConfig),
    Softmax(SoftmaxHead),
}

impl Objective {
    /// The loss of a global batch: `columns[0]` anchors, `columns[1]` positives or partners,
    /// `columns[2..]` hard-negative columns, each (B, d).
    pub fn loss(&self, columns: &[Tensor], targets: &Targets) -> Result<Tensor, String> {
        let rows = columns.first().map_or(0, |c| c.size()[0]) as usize;
        if columns.len() < 2 || rows != targets.len() {
            return Err(format!(
                "a batch of {} columns and {rows} rows with {} targets",
                columns.len(),
                targets.len()
            ));
        }
        let device = columns[0].device();
        let pair = |what: &str| -> Result<(), String> {
            if columns.len() == 2 {
                Ok(())
            } else {
                Err(format!("{what} takes pairs, got {} columns", columns.len()))
            }
        };
        match (self, targets) {
            (
                Objective::Mnrl {
                    cfg,
                    multi_positive,
                },
                Targets::Groups(g),
            ) => Ok(mnrl_loss(
                &columns[0],
                &columns[1..],
                multi_positive.then_some(g.as_slice()),
                cfg,
            )),
            (Objective::CosineSimilarity(cfg), Targets::Scores(s)) => {
                pair("CosineSimilarityLoss")?;
                let s = crate::device::upload(&Tensor::from_slice(s), device);
                Ok(cosine_similarity_loss(&columns[0], &columns[1], &s, cfg))
            }
            (Objective::Cosent(cfg), Targets::Scores(s)) => {
                pair("CoSENTLoss")?;
                let s = crate::device::upload(&Tensor::from_slice(s), device);
                Ok(cosent_loss(&columns[0], &columns[1], &s, cfg))
            }
            (Objective::Softmax(head), Targets::Labels(l)) => {
                pair("SoftmaxLoss")?;
                if let Some(bad) = l
                    .iter()
                    .find(|&&x| x < 0 || x as usize >= head.labels.len())
                {
                    return Err(format!("label {bad} outside 0..{}", head.labels.len()));
                }
                let l = crate::device::upload(&Tensor::from_slice(l), device);
                Ok(head.loss(&columns[0], &columns[1], &l).to_kind(Kind::Float))
            }
            (o, t) => Err(format!("{o:?} cannot train on {t:?}")),
        }
    }

    /// The objective's own trainable tensors (names relative to the objective).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        match self {
            Objective::Softmax(head) => head.parameters(),
            _ => Vec::new(),
        }
    }
}
