//! Spherical k-means over unit embeddings (`mine --clusters K`; docs/design.md §11): seeded
//! k-means++ starts, then Lloyd rounds by cosine similarity until no assignment changes. It labels
//! query topics for `data.batching = "by_cluster"`, where a batch's in-batch negatives then share
//! its topic.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// Rows scored against the centroids at once: bounds the similarity block to `CHUNK × k` floats.
const CHUNK: i64 = 8192;
/// Lloyd rounds at most; on real data assignments settle well before.
const MAX_ROUNDS: usize = 100;

/// The clustering: a label below `k` per row, and the Lloyd rounds it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Clusters {
    pub labels: Vec<u32>,
    pub rounds: usize,
}

impl Clusters {
    /// Rows per label, for `k` labels.
    pub(crate) fn sizes(&self, k: usize) -> Vec<u64> {
        let mut sizes = vec![0u64; k];
        for &l in &self.labels {
            sizes[l as usize] += 1;
        }
        sizes
    }
}

/// Clusters the unit rows of `emb` (n × d) into `k` groups; `k` must be in 1..=n.
pub(crate) fn cluster(emb: &Tensor, k: usize, seed: u64) -> Clusters {
    tch::no_grad(|| {
        let emb = emb.to_kind(Kind::Float);
        let mut centroids = seed_centroids(&emb, k, seed);
        let mut labels = assign(&emb, &centroids);
        let mut rounds = 0;
        while rounds < MAX_ROUNDS {
            rounds += 1;
            centroids = update(&emb, &labels, &centroids);
            let next = assign(&emb, &centroids);
            let settled = next.equal(&labels);
            labels = next;
            if settled {
                break;
            }
        }
        Clusters {
            labels: Vec::<i64>::try_from(&labels)
                .expect("labels are int64")
                .into_iter()
                .map(|l| l as u32)
                .collect(),
            rounds,
        }
    })
}

/// k-means++: each next centroid is a row drawn with probability ∝ its squared distance to the
/// nearest centroid so far (2 − 2·cos for unit rows), from a seeded generator.
fn seed_centroids(emb: &Tensor, k: usize, seed: u64) -> Tensor {
    let n = emb.size()[0];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut picked = vec![rng.random_range(0..n)];
    let mut best = emb.matmul(&emb.get(picked[0]).unsqueeze(1)).squeeze_dim(1);
    while picked.len() < k {
        let dist = (best.g_mul_scalar(-2.0) + 2.0).clamp_min(0.0);
        let weights = Vec::<f32>::try_from(&dist.to_device(tch::Device::Cpu)).expect("float");
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let next = if total > 0.0 {
            let mut at = rng.random::<f64>() * total;
            weights
                .iter()
                .position(|&w| {
                    at -= f64::from(w);
                    at < 0.0
                })
                .unwrap_or(weights.len() - 1) as i64
        } else {
            // Every row sits on a centroid (duplicates): any row not yet taken.
            (0..n).find(|i| !picked.contains(i)).expect("k <= n")
        };
        picked.push(next);
        let sims = emb.matmul(&emb.get(next).unsqueeze(1)).squeeze_dim(1);
        best = best.maximum(&sims);
    }
    let index = Tensor::from_slice(&picked).to_device(emb.device());
    emb.index_select(0, &index)
}

/// The nearest centroid (highest cosine) of every row, scored in chunks.
fn assign(emb: &Tensor, centroids: &Tensor) -> Tensor {
    let n = emb.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(CHUNK as usize)
        .map(|at| {
            emb.narrow(0, at, CHUNK.min(n - at))
                .matmul(&centroids.tr())
                .argmax(1, false)
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// Each centroid moves to the normalised mean of its rows; one left without rows stays put.
fn update(emb: &Tensor, labels: &Tensor, centroids: &Tensor) -> Tensor {
    let sums = centroids.zeros_like().index_add(0, labels, emb);
    let norms = sums.norm_scalaropt_dim(2, [1], true);
    let empty = norms.eq(0.0);
    (sums / norms.clamp_min(1e-12)).where_self(&empty.logical_not(), centroids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per` unit rows around each of `centres` (in d = 3), perturbed by a fixed small offset.
    fn blobs(centres: &[[f32; 3]], per: usize) -> Tensor {
        let mut rows = Vec::new();
        for c in centres {
            for i in 0..per {
                let e = 0.05 * (i as f32 - per as f32 / 2.0) / per as f32;
                rows.extend([c[0] + e, c[1] - e, c[2] + e * 0.5]);
            }
        }
        let t = Tensor::from_slice(&rows).view([(centres.len() * per) as i64, 3]);
        &t / t.norm_scalaropt_dim(2, [1], true)
    }

    #[test]
    fn separated_blobs_are_found_whatever_the_seed() {
        let emb = blobs(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], 20);
        for seed in 0..10 {
            let c = cluster(&emb, 3, seed);
            for b in 0..3 {
                let labels = &c.labels[b * 20..(b + 1) * 20];
                assert!(labels.iter().all(|&l| l == labels[0]), "seed {seed}");
            }
            assert_ne!(c.labels[0], c.labels[20]);
            assert_ne!(c.labels[20], c.labels[40]);
            assert_ne!(c.labels[0], c.labels[40]);
            assert_eq!(c.sizes(3), vec![20, 20, 20]);
        }
    }

    #[test]
    fn seeded_and_exact_with_duplicates_and_k_equal_to_n() {
        let emb = blobs(&[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], 1);
        let c = cluster(&emb, 3, 7);
        assert_eq!(c.sizes(3).iter().sum::<u64>(), 3);
        assert_eq!(
            c,
            cluster(&emb, 3, 7),
            "the same seed clusters the same way"
        );
        let one = cluster(&emb, 1, 0);
        assert_eq!(one.labels, vec![0, 0, 0]);
    }
}
