//! CosineSimilarityLoss, as sentence-transformers defines it: for pairs (u_i, v_i) with a gold score
//! y_i in [0, 1], L = mean_i (cos(u_i, v_i) − y_i)² (its default `loss_fct = MSELoss()`, identity
//! `cos_score_transformation`), or the mean absolute error with `loss_fct = "l1"`.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::model::pooling::normalize_l2;

/// The distance between predicted cosine and gold score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PointLoss {
    /// Mean squared error (`torch.nn.MSELoss`), sentence-transformers' default.
    #[default]
    Mse,
    /// Mean absolute error (`torch.nn.L1Loss`).
    L1,
}

/// CosineSimilarityLoss options.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CosineConfig {
    pub loss_fct: PointLoss,
}

/// Row-wise cosine of two (B, d) matrices.
pub(crate) fn pairwise_cosine(a: &Tensor, b: &Tensor) -> Tensor {
    (normalize_l2(a) * normalize_l2(b)).sum_dim_intlist([1].as_slice(), false, Kind::Float)
}

/// The loss for anchors `a`, partners `b` (B, d each) and gold `scores` (B).
pub fn cosine_similarity_loss(
    a: &Tensor,
    b: &Tensor,
    scores: &Tensor,
    cfg: &CosineConfig,
) -> Tensor {
    let diff = pairwise_cosine(a, b) - scores;
    match cfg.loss_fct {
        PointLoss::Mse => diff.square().mean(Kind::Float),
        PointLoss::L1 => diff.abs().mean(Kind::Float),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_scores_give_zero_and_opposites_give_four() {
        let a = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let zero = cosine_similarity_loss(
            &a,
            &a,
            &Tensor::from_slice(&[1.0f32, 1.0]),
            &CosineConfig::default(),
        );
        assert!(zero.double_value(&[]).abs() < 1e-7);
        let four = cosine_similarity_loss(
            &a,
            &(-&a),
            &Tensor::from_slice(&[1.0f32, 1.0]),
            &CosineConfig::default(),
        );
        assert!((four.double_value(&[]) - 4.0).abs() < 1e-6);
    }
}
