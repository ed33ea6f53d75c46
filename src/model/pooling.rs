//! Sentence vectors from token states, as sentence-transformers' `Pooling` and `Normalize` modules.
use tch::Tensor;

use super::config::PoolingMode;

/// Pools token states (batch, seq, hidden) under `mask` (batch, seq; 1 = real token) with each
/// mode in turn and concatenates the results along the feature axis.
pub(crate) fn pool(states: &Tensor, mask: &Tensor, modes: &[PoolingMode]) -> Tensor {
    let parts: Vec<Tensor> = modes.iter().map(|&m| pool_one(states, mask, m)).collect();
    if parts.len() == 1 {
        parts.into_iter().next().expect("one part")
    } else {
        Tensor::cat(&parts, 1)
    }
}

fn pool_one(states: &Tensor, mask: &Tensor, mode: PoolingMode) -> Tensor {
    let mask3 = mask.unsqueeze(-1).to_kind(states.kind());
    match mode {
        PoolingMode::Cls => states.select(1, 0),
        PoolingMode::Max => {
            // Padding must never win the max, so push it far below any real activation.
            let masked = states.masked_fill(&mask3.eq(0.0), -1e9);
            masked.amax([1].as_slice(), false)
        }
        PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
            let summed = (states * &mask3).sum_dim_intlist([1].as_slice(), false, states.kind());
            let count = mask3
                .sum_dim_intlist([1].as_slice(), false, states.kind())
                .clamp_min(1e-9);
            if mode == PoolingMode::Mean {
                summed / count
            } else {
                summed / count.sqrt()
            }
        }
    }
}

/// Scales each row to unit L2 norm (torch's `F.normalize(p=2, eps=1e-12)`).
pub fn normalize_l2(v: &Tensor) -> Tensor {
    let norm = v
        .norm_scalaropt_dim(2, [1].as_slice(), true)
        .clamp_min(1e-12);
    v / norm
}

/// Cosine similarity matrix between the rows of `a` and `b`.
pub(crate) fn cosine_matrix(a: &Tensor, b: &Tensor) -> Tensor {
    normalize_l2(a).matmul(&normalize_l2(b).transpose(0, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> (Tensor, Tensor) {
        let states = Tensor::from_slice(&[
            1.0f32, 2.0, 3.0, 4.0, 100.0, 100.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0,
        ])
        .view([2, 3, 2]);
        let mask = Tensor::from_slice(&[1i64, 1, 0, 1, 1, 1]).view([2, 3]);
        (states, mask)
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        Vec::<Vec<f32>>::try_from(t).unwrap()
    }

    #[test]
    fn mean_and_max_ignore_padding() {
        let (s, m) = batch();
        assert_eq!(
            rows(&pool(&s, &m, &[PoolingMode::Mean])),
            vec![vec![2.0, 3.0], vec![7.0, 8.0]]
        );
        assert_eq!(
            rows(&pool(&s, &m, &[PoolingMode::Max])),
            vec![vec![3.0, 4.0], vec![9.0, 10.0]]
        );
        assert_eq!(
            rows(&pool(&s, &m, &[PoolingMode::Cls])),
            vec![vec![1.0, 2.0], vec![5.0, 6.0]]
        );
        let sqrt = rows(&pool(&s, &m, &[PoolingMode::MeanSqrtLen]));
        assert!((sqrt[0][0] - 4.0 / 2f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn modes_concatenate_and_normalize_gives_unit_rows() {
        let (s, m) = batch();
        let v = pool(&s, &m, &[PoolingMode::Cls, PoolingMode::Mean]);
        assert_eq!(v.size(), vec![2, 4]);
        let n = normalize_l2(&v).norm_scalaropt_dim(2, [1].as_slice(), false);
        for x in Vec::<f32>::try_from(&n).unwrap() {
            assert!((x - 1.0).abs() < 1e-6);
        }
    }
}
