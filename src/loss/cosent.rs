//! CoSENTLoss, as sentence-transformers defines it: with s_i = scale · cos(u_i, v_i) over the pairs of
//! a batch and gold scores y_i,
//!
//!   L = log(1 + Σ_{(i, j): y_i < y_j} exp(s_i − s_j))
//!
//! a logsumexp over every ordered pair whose gold order the predicted order contradicts, with a
//! leading 0. Only the order of the gold scores matters, so any scale of scores works.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::cosine::pairwise_cosine;

/// CoSENTLoss options.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoSentConfig {
    /// Multiplier of the cosines (sentence-transformers' default 20).
    pub scale: f64,
}

impl Default for CoSentConfig {
    fn default() -> Self {
        Self { scale: 20.0 }
    }
}

/// The loss for anchors `a`, partners `b` (B, d each) and gold `scores` (B).
pub fn cosent_loss(a: &Tensor, b: &Tensor, scores: &Tensor, cfg: &CoSentConfig) -> Tensor {
    let s = pairwise_cosine(a, b) * cfg.scale;
    let diff = s.unsqueeze(1) - s.unsqueeze(0);
    let lower = scores.unsqueeze(1).lt_tensor(&scores.unsqueeze(0));
    let terms = diff.masked_select(&lower);
    let zero = Tensor::zeros([1], (Kind::Float, a.device()));
    Tensor::cat(&[zero, terms], 0).logsumexp([0].as_slice(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreeing_order_costs_less_than_contradicting_order() {
        let a = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).view([2, 2]);
        let b = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let cfg = CoSentConfig::default();
        // Pair 0 has cosine 1, pair 1 cosine 0.
        let agree =
            cosent_loss(&a, &b, &Tensor::from_slice(&[1.0f32, 0.0]), &cfg).double_value(&[]);
        let contradict =
            cosent_loss(&a, &b, &Tensor::from_slice(&[0.0f32, 1.0]), &cfg).double_value(&[]);
        assert!(
            (agree - (1.0 + (-20.0f64).exp()).ln()).abs() < 1e-6,
            "{agree}"
        );
        assert!(
            (contradict - (1.0 + 20.0f64.exp()).ln()).abs() < 1e-4,
            "{contradict}"
        );
        let tie = cosent_loss(&a, &b, &Tensor::from_slice(&[0.5f32, 0.5]), &cfg).double_value(&[]);
        assert_eq!(tie, 0.0, "no ordered pair, no loss");
    }
}
