//! Dropout whose masks are a pure function of (row seed, site, position), not of libtorch's global
//! RNG, the device or the batch layout.
//!
//! Each element's keep/drop decision comes from a counter-based generator ([`super::masks`]) over
//! the row's seed, the dropout site (which layer and which of its dropouts) and the element's
//! coordinates inside the row (e.g. position and feature, or head, query and key position).
//! Coordinates do not depend on how much the batch is padded, so a row gets the same masks whether it
//! runs alone, in a length-sorted micro-batch, or on another worker of a cluster: with per-row seeds
//! derived from the global row index, training with dropout is identical for any number of workers.
//!
//! The masks of the current generator are tensor ops on the activations' device, from the rows' keys
//! made once per forward pass, so no mask crosses from the host to a GPU (and on the CPU they cost
//! a fraction of `torch.dropout`'s Bernoulli sampling: `cargo bench --bench masks`). Runs resumed
//! from checkpoints of the first generator make its masks in Rust and copy them over.
use std::cell::RefCell;

use tch::{Device, Kind, Tensor};

use super::masks::{self, MaskGenerator};

/// The dropout of one forward pass: each row's seed and the generator of the masks; `None` in its
/// place means inference (no dropout).
#[derive(Debug)]
pub struct RowSeeds {
    seeds: Vec<u64>,
    /// The current generator's rows' keys on the device, made once per pass (none: the first
    /// generator's masks, made on the host).
    keys: Option<Tensor>,
    /// Per row shape (rows left out): the V2 coordinate counters, shared by the pass's sites.
    counters: RefCell<Vec<(Vec<i64>, Tensor)>>,
}

impl RowSeeds {
    /// Dropout for rows seeded `seeds`, run on `device` with masks from `generator`. On a GPU the
    /// seeds are copied there now (asynchronously): made ahead of the step, this costs it nothing.
    pub fn new(seeds: Vec<u64>, generator: MaskGenerator, device: Device) -> Self {
        let keys = (generator == MaskGenerator::V2).then(|| {
            let host = Tensor::from_slice(&seeds.iter().map(|&s| s as i64).collect::<Vec<_>>());
            masks::v2_row_keys(&crate::device::upload(&host, device))
        });
        Self {
            seeds,
            keys,
            counters: RefCell::new(Vec::new()),
        }
    }

    /// Rows covered.
    pub(crate) fn len(&self) -> usize {
        self.seeds.len()
    }

    /// The keep mask of a tensor of `shape` at `site` (bool, on `device`), made on the device.
    fn device_keep(&self, keys: &Tensor, shape: &[i64], site: u64, threshold: i64) -> Tensor {
        let row_shape = &shape[1..];
        let mut cache = self.counters.borrow_mut();
        let at = match cache
            .iter()
            .position(|(s, t)| s == row_shape && t.device() == keys.device())
        {
            Some(at) => at,
            None => {
                cache.push((row_shape.to_vec(), masks::v2_counters(shape, keys.device())));
                cache.len() - 1
            }
        };
        masks::v2_keep(shape, keys, &cache[at].1, site, threshold)
    }

    /// The V1 mask of a tensor of `shape` at `site`, made on the host, each element 0 or `scale`.
    fn host_mask(&self, shape: &[i64], site: u64, threshold: i64, scale: f64) -> Tensor {
        let lanes = masks::v1_lanes(shape, &self.seeds, site);
        let (keep, scale) = (threshold as i16, scale as f32);
        let values: Vec<f32> = lanes
            .iter()
            .map(|&l| if l >= keep { scale } else { 0.0 })
            .collect();
        Tensor::from_slice(&values).view(shape)
    }
}

/// Applies dropout with probability `p` at `site` when `seeds` is given; identity otherwise.
pub fn dropout(xs: &Tensor, p: f64, seeds: Option<&RowSeeds>, site: u64) -> Tensor {
    let Some(seeds) = seeds else {
        return xs.shallow_clone();
    };
    if p <= 0.0 {
        return xs.shallow_clone();
    }
    let shape = xs.size();
    assert_eq!(shape[0] as usize, seeds.len(), "one seed per batch row");
    let threshold = masks::threshold(p);
    let scale = 1.0 / (1.0 - p);
    match &seeds.keys {
        Some(keys) => {
            // Made for the model's device; moved only if a caller runs elsewhere.
            let keys = crate::device::upload(keys, xs.device());
            let keep = seeds.device_keep(&keys, &shape, site, threshold);
            // x · keep · scale in one kernel on CUDA (and its gradient likewise): what
            // torch.dropout's own backward computes, differentiable in x.
            Tensor::native_dropout_backward(xs, &keep, scale)
        }
        None => {
            let mask = crate::device::upload(
                &seeds.host_mask(&shape, site, threshold, scale),
                xs.device(),
            );
            match xs.kind() {
                Kind::Float => xs * mask,
                // Scaled in f32 and rounded once, as the device path does it.
                kind => (xs * mask).to_kind(kind),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(v: &[u64], generator: MaskGenerator) -> RowSeeds {
        RowSeeds::new(v.to_vec(), generator, Device::Cpu)
    }

    #[test]
    fn rate_and_scale_match_p() {
        for generator in [MaskGenerator::V1, MaskGenerator::V2] {
            let x = Tensor::ones([4, 64, 96], (Kind::Float, Device::Cpu));
            let y = dropout(&x, 0.1, Some(&seeds(&[1, 2, 3, 4], generator)), 0);
            let kept = y
                .ne(0.0)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            assert!((kept - 0.9).abs() < 0.01, "{generator:?} kept {kept}");
            let mean = y.sum(Kind::Float).double_value(&[]) / x.numel() as f64;
            assert!((mean - 1.0).abs() < 0.02, "{generator:?} mean {mean}");
        }
    }

    #[test]
    fn masks_depend_on_row_seed_and_site_not_on_padding() {
        for generator in [MaskGenerator::V1, MaskGenerator::V2] {
            let short = Tensor::ones([1, 3, 8], (Kind::Float, Device::Cpu));
            let long = Tensor::ones([2, 5, 8], (Kind::Float, Device::Cpu));
            let a = dropout(&short, 0.5, Some(&seeds(&[9], generator)), 2);
            let b = dropout(&long, 0.5, Some(&seeds(&[7, 9], generator)), 2);
            assert!(
                a.get(0).equal(&b.get(1).narrow(0, 0, 3)),
                "{generator:?}: row 9's first 3 positions must match"
            );
            let c = dropout(&short, 0.5, Some(&seeds(&[9], generator)), 3);
            assert!(!a.equal(&c), "another site draws another mask");
            assert!(dropout(&short, 0.5, None, 2).equal(&short));
        }
    }

    /// V2 dropout drops exactly the elements the reference generator says, and scales the rest.
    #[test]
    fn v2_dropout_follows_the_reference_generator() {
        let rows = [3u64, 1 << 40, 77];
        let seeds = seeds(&rows, MaskGenerator::V2);
        let shape = [3i64, 4, 11, 13];
        let x = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        for site in [0, 5, 19] {
            let lanes = masks::v2_lanes(&shape, &rows, site);
            let keep = Tensor::from_slice(&lanes)
                .view(shape)
                .ge(masks::threshold(0.1));
            let want = (&x * (1.0 / 0.9)) * keep;
            assert!(
                dropout(&x, 0.1, Some(&seeds), site).equal(&want),
                "site {site}"
            );
        }
        assert_eq!(
            seeds.counters.borrow().len(),
            1,
            "one counter table per shape"
        );
    }
}
