//! MultipleNegativesRankingLoss, as sentence-transformers defines it, plus the multi-positive form.
//!
//! Notation: a batch of B rows; q_i the query embedding of row i; the candidate documents are the
//! positive column p_1..p_B followed by each hard-negative column n^1_1..n^1_B, n^2_1.., i.e.
//! C = B·(1+K) candidates d_1..d_C in sentence-transformers' order. With s_ij = scale · cos(q_i, d_j):
//!
//!   plain / with negatives:  L = (1/B) Σ_i [ logsumexp_j s_ij − s_ii ]
//!
//! (cross-entropy with label i; hard negatives only widen the softmax). Symmetric (sentence-transformers'
//! `directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"`, formerly
//! MultipleNegativesSymmetricRankingLoss) adds the document→query direction over queries only,
//! t_ik = scale · cos(p_i, q_k):
//!
//!   L = (1/B) Σ_i [ ½ (logsumexp_j s_ij + logsumexp_k t_ik) − s_ii ]
//!
//! Multi-positive (mode `all`): rows i and j of the same query group g(i) = g(j) have p_j as a second
//! correct answer for q_i, so it must not act as a negative. It is removed from row i's softmax:
//!
//!   L = (1/B) Σ_i [ logsumexp_{j ∉ M_i} s_ij − s_ii ],   M_i = { j ≤ B : j ≠ i, g(j) = g(i) }
//!
//! and likewise t_ik for k ≠ i with g(k) = g(i) (the same query text) in the symmetric direction.
//! Each row still has exactly one target, so every positive of a group is pulled towards the query
//! once per row it occupies, and no positive is ever pushed away from its own query. Hard negatives
//! of other rows of the same group stay negatives: they are negatives of that query too.
//!
//! Hardness weighting (sentence-transformers 5.3+, `hardness_mode` / `hardness_strength` α): chosen
//! negative logits of the query→document direction become s_ij + α·stopgrad(cos(q_i, d_j)), the
//! added term unscaled, so harder negatives weigh more in the softmax while the gradient still flows
//! through s_ij alone. `in_batch_negatives` picks every document of another row (its positive and
//! its hard negatives), `hard_negatives` the row's own hard negatives, `all_negatives` both; the
//! row's own positive never.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::model::pooling::normalize_l2;

/// Which negatives hardness weighting applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HardnessMode {
    InBatchNegatives,
    HardNegatives,
    AllNegatives,
}

/// Loss options.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MnrlConfig {
    /// Multiplier of the cosine similarities (1 / temperature); sentence-transformers' default is 20.
    pub scale: f64,
    /// Add the document→query direction.
    pub symmetric: bool,
    /// Hardness weighting; none by default.
    pub hardness_mode: Option<HardnessMode>,
    /// α of the hardness weighting (sentence-transformers' default 0: off).
    pub hardness_strength: f64,
}

impl Default for MnrlConfig {
    fn default() -> Self {
        Self {
            scale: 20.0,
            symmetric: false,
            hardness_mode: None,
            hardness_strength: 0.0,
        }
    }
}

impl MnrlConfig {
    /// Checks values that are impossible on their own.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(self.scale > 0.0 && self.scale.is_finite()) {
            return Err(format!(
                "the MNRL scale must be positive, got {}",
                self.scale
            ));
        }
        if !(self.hardness_strength >= 0.0 && self.hardness_strength.is_finite()) {
            return Err(format!(
                "hardness_strength must be a non-negative number, got {}",
                self.hardness_strength
            ));
        }
        Ok(())
    }
}

/// The (B, C) boolean mask of the logits hardness weighting applies to, or `None` when it is off.
fn hardness_mask(cfg: &MnrlConfig, b: i64, c: i64, device: tch::Device) -> Option<Tensor> {
    let mode = cfg.hardness_mode.filter(|_| cfg.hardness_strength > 0.0)?;
    // own[i, j]: document j belongs to row i (its positive or one of its hard negatives).
    let own = Tensor::eye(b, (Kind::Bool, device)).repeat([1, c / b]);
    let in_positive_block = Tensor::arange(c, (Kind::Int64, device))
        .lt(b)
        .unsqueeze(0)
        .expand([b, c], false);
    Some(match mode {
        HardnessMode::InBatchNegatives => own.logical_not(),
        HardnessMode::HardNegatives => own.logical_and(&in_positive_block.logical_not()),
        HardnessMode::AllNegatives => own.logical_and(&in_positive_block).logical_not(),
    })
}

/// Boolean (B, B) mask of other rows of the same group, or `None` when every group occurs once.
fn same_group_mask(groups: &[u32], device: tch::Device) -> Option<Tensor> {
    let b = groups.len();
    let any = (0..b).any(|i| (i + 1..b).any(|j| groups[i] == groups[j]));
    if !any {
        return None;
    }
    let g = crate::device::upload(
        &Tensor::from_slice(&groups.iter().map(|&x| x as i64).collect::<Vec<_>>()),
        device,
    );
    let same = g.unsqueeze(1).eq_tensor(&g.unsqueeze(0));
    let eye = Tensor::eye(b as i64, (Kind::Bool, device));
    Some(same.logical_and(&eye.logical_not()))
}

/// The loss for queries (B, d) and candidate columns `docs[0]` = positives (B, d), `docs[1..]` =
/// hard-negative columns (B, d each). `groups`, when given, holds each row's query group and turns
/// on the multi-positive masking.
pub fn mnrl_loss(
    queries: &Tensor,
    docs: &[Tensor],
    groups: Option<&[u32]>,
    cfg: &MnrlConfig,
) -> Tensor {
    assert!(!docs.is_empty(), "MNRL needs at least the positive column");
    let b = queries.size()[0];
    let q = normalize_l2(queries);
    let candidates = normalize_l2(&Tensor::cat(docs, 0));
    let cos = q.matmul(&candidates.transpose(0, 1));
    let c = candidates.size()[0];
    let mut scores = &cos * cfg.scale;
    if let Some(mask) = hardness_mask(cfg, b, c, queries.device()) {
        let penalty = cos.detach() * cfg.hardness_strength;
        scores += penalty.masked_fill(&mask.logical_not(), 0.0);
    }
    let mask = groups.and_then(|g| same_group_mask(g, queries.device()));
    if let Some(mask) = &mask {
        let pad = Tensor::zeros([b, c - b], (Kind::Bool, queries.device()));
        scores = scores.masked_fill(&Tensor::cat(&[mask, &pad], 1), f64::NEG_INFINITY);
    }
    let positive = scores.narrow(1, 0, b).diagonal(0, 0, 1);
    let mut log_z = scores.logsumexp([1].as_slice(), false);
    if cfg.symmetric {
        let mut back = normalize_l2(&docs[0]).matmul(&q.transpose(0, 1)) * cfg.scale;
        if let Some(mask) = &mask {
            back = back.masked_fill(mask, f64::NEG_INFINITY);
        }
        log_z = (log_z + back.logsumexp([1].as_slice(), false)) * 0.5;
    }
    (log_z - positive).mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_separation_gives_near_zero_loss() {
        let q = Tensor::eye(4, (Kind::Float, tch::Device::Cpu));
        let loss = mnrl_loss(&q, &[q.shallow_clone()], None, &MnrlConfig::default());
        assert!(loss.double_value(&[]) < 1e-7);
    }

    #[test]
    fn masking_removes_same_group_positives_only() {
        // Rows 0 and 1 share a group and identical positives: unmasked, each is the other's hardest
        // negative; masked, the loss is that of two perfectly separated rows.
        let q = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0, 0.0, 1.0]).view([3, 2]);
        let p = q.shallow_clone();
        let cfg = MnrlConfig::default();
        let unmasked = mnrl_loss(&q, &[p.shallow_clone()], None, &cfg).double_value(&[]);
        let masked = mnrl_loss(&q, &[p], Some(&[7, 7, 9]), &cfg).double_value(&[]);
        assert!(
            unmasked > 0.4 && masked < 1e-7,
            "unmasked {unmasked}, masked {masked}"
        );
    }
}
