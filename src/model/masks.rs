//! The counter-based generators of dropout masks: every element's keep bit is a pure function of
//! (row seed, dropout site, the element's coordinates inside its row), never of libtorch's RNG, of
//! the device, or of how the batch is laid out (docs/design.md §7).
//!
//! Two generators exist, and a checkpoint records which one its run used:
//! - [`MaskGenerator::V1`] (runs before 0.2 of the checkpoint format): a hash chain absorbed
//!   coordinate by coordinate, computed in Rust. It stays for resuming such runs exactly; on a GPU it
//!   costs a host round trip per dropout site.
//! - [`MaskGenerator::V2`] (every new run): SplitMix64 at a counter. Each row has a key
//!   `k = absorb(0, seed)` (the same word V1 starts from); an element at coordinates
//!   (c₁, …, cₙ) of a (rows, d₁, …, dₙ) tensor takes 16 bits of
//!   `mix(k + γ·counter)`, `counter = site·2⁴⁸ | c₁·2³² | … | cₙ₋₁·2¹⁶ | ⌊cₙ/4⌋` (the fields
//!   right-aligned; four consecutive elements of the last dimension share one 64-bit word, lane
//!   `cₙ mod 4`). Written as tensor ops that is one broadcast add and the eleven integer ops of
//!   `mix` over a quarter of the elements, on whatever device the activations are: few kernels, no
//!   host work per element, and the same bits on the CPU and on CUDA (on the CPU it is also faster
//!   than V1 in Rust: `cargo bench --bench masks`). A scalar Rust version (`v2_lanes`) is the
//!   reference the tests hold the tensor ops to, bit for bit.
//!
//! A lane is a uniform signed 16-bit value `u`; the element is kept when `u ≥ t` with
//! `t = round(p·65536) − 32768`, so the drop probability is p quantised to 1/65536.
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Which function makes the masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MaskGenerator {
    /// The hash chain of runs written before the device path existed.
    #[serde(rename = "v1-hash-chain")]
    V1,
    /// SplitMix64 at a coordinate counter, as tensor ops on any device.
    #[serde(rename = "v2-splitmix-counter")]
    V2,
}

impl MaskGenerator {
    /// What a new run uses.
    pub const CURRENT: MaskGenerator = MaskGenerator::V2;

    /// What a checkpoint that names no generator was written with.
    pub(crate) fn before_versions() -> Self {
        MaskGenerator::V1
    }
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const ABSORB_ADD: u64 = 0x632B_E59B_D9B4_E019;
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX2: u64 = 0x94D0_49BB_1331_11EB;
/// Bits per coordinate field of a V2 counter, and the most fields after the site's.
const FIELD: u32 = 16;
const MAX_FIELDS: usize = 3;

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX2);
    z ^ (z >> 31)
}

#[inline]
fn absorb(h: u64, x: u64) -> u64 {
    mix(h ^ x.wrapping_mul(GAMMA).wrapping_add(ABSORB_ADD))
}

/// The drop threshold on signed 16-bit lanes for probability `p`: keep when `lane >= threshold`.
pub fn threshold(p: f64) -> i64 {
    ((p * 65536.0).round() as i64).clamp(0, 65536) - 32768
}

/// A dropped tensor's shape as (rows, the middle dimensions, the last): a mask needs two dims.
fn split_shape(shape: &[i64]) -> (usize, Vec<usize>, usize) {
    assert!(shape.len() >= 2, "dropout masks need (rows, ..., features)");
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    (
        dims[0],
        dims[1..dims.len() - 1].to_vec(),
        dims[dims.len() - 1],
    )
}

/// V1's lanes for a tensor of `shape`, row r seeded by `seeds[r]`.
pub fn v1_lanes(shape: &[i64], seeds: &[u64], site: u64) -> Vec<i16> {
    let (rows, outer_dims, inner) = split_shape(shape);
    assert_eq!(rows, seeds.len(), "one seed per batch row");
    let outer: usize = outer_dims.iter().product();
    let mut out = vec![0i16; rows * outer * inner];
    out.par_chunks_mut((outer * inner).max(1))
        .zip(seeds.par_iter())
        .for_each(|(row, &seed)| {
            let row_state = absorb(absorb(0, seed), site);
            let mut coords = vec![0usize; outer_dims.len()];
            for o in 0..outer {
                let mut rem = o;
                for (c, &d) in coords.iter_mut().zip(&outer_dims).rev() {
                    *c = rem % d;
                    rem /= d;
                }
                let state = coords.iter().fold(row_state, |h, &c| absorb(h, c as u64));
                let slot = &mut row[o * inner..(o + 1) * inner];
                for (g, chunk) in slot.chunks_mut(4).enumerate() {
                    let bits = absorb(state, g as u64);
                    for (i, v) in chunk.iter_mut().enumerate() {
                        *v = ((bits >> (16 * i)) as u16 ^ 0x8000) as i16;
                    }
                }
            }
        });
    out
}

/// Refuses shapes whose coordinates do not fit a V2 counter's fields.
fn check_v2_shape(outer_dims: &[usize], inner: usize, site: u64) {
    assert!(
        outer_dims.len() < MAX_FIELDS,
        "dropout over {} middle dimensions (at most {})",
        outer_dims.len(),
        MAX_FIELDS - 1
    );
    let limit = 1usize << FIELD;
    assert!(
        outer_dims.iter().all(|&d| d <= limit) && inner.div_ceil(4) <= limit && site < limit as u64,
        "dropout coordinates beyond 2^16 (dims {outer_dims:?} x {inner}, site {site})"
    );
}

/// The V2 key of a row at `site`: everything of its counter word that is not a coordinate.
#[inline]
#[cfg(test)]
fn v2_key(seed: u64, site: u64) -> u64 {
    absorb(0, seed).wrapping_add((site << (FIELD * MAX_FIELDS as u32)).wrapping_mul(GAMMA))
}

/// V2's lanes for a tensor of `shape`, row r seeded by `seeds[r]`, computed element by element: the
/// reference the tensor ops are tested against.
#[cfg(test)]
pub(crate) fn v2_lanes(shape: &[i64], seeds: &[u64], site: u64) -> Vec<i16> {
    let (rows, outer_dims, inner) = split_shape(shape);
    assert_eq!(rows, seeds.len(), "one seed per batch row");
    check_v2_shape(&outer_dims, inner, site);
    let outer: usize = outer_dims.iter().product();
    let mut out = vec![0i16; rows * outer * inner];
    out.par_chunks_mut((outer * inner).max(1))
        .zip(seeds.par_iter())
        .for_each(|(row, &seed)| {
            let key = v2_key(seed, site);
            for o in 0..outer {
                // The middle coordinates of `o`, right-aligned above the group field.
                let (mut rem, mut base, mut shift) = (o, 0u64, FIELD);
                for &d in outer_dims.iter().rev() {
                    base |= ((rem % d) as u64) << shift;
                    rem /= d;
                    shift += FIELD;
                }
                let slot = &mut row[o * inner..(o + 1) * inner];
                for (g, chunk) in slot.chunks_mut(4).enumerate() {
                    let bits = mix(key.wrapping_add((base | g as u64).wrapping_mul(GAMMA)));
                    for (i, v) in chunk.iter_mut().enumerate() {
                        *v = (bits >> (16 * i)) as u16 as i16;
                    }
                }
            }
        });
    out
}

/// `mix` in place on an int64 tensor. libtorch's `>>` on int64 is arithmetic, so each shift is
/// masked down to the logical one.
fn mix_tensor_(z: &mut Tensor) {
    for (shift, mul) in [(30, Some(MIX1)), (27, Some(MIX2)), (31, None)] {
        let high = z
            .bitwise_right_shift_tensor_scalar(shift)
            .bitwise_and(((1u64 << (64 - shift)) - 1) as i64);
        let _ = z.bitwise_xor_tensor_(&high);
        if let Some(m) = mul {
            let _ = z.g_mul_scalar_(m as i64);
        }
    }
}

/// `absorb(0, seeds)` for an int64 tensor of row seeds: the rows' V2 keys before the site.
pub fn v2_row_keys(seeds: &Tensor) -> Tensor {
    let mut z = seeds
        .g_mul_scalar(GAMMA as i64)
        .g_add_scalar(ABSORB_ADD as i64);
    mix_tensor_(&mut z);
    z
}

/// γ·(coordinate counter without the site) for every (middle coordinates, group) of a row of
/// `shape` (rows first): shape (d₁, …, dₙ₋₁, ⌈dₙ/4⌉), int64 on `device`. Depends only on the
/// shape, so one forward pass makes it once per shape and reuses it at every site.
pub fn v2_counters(shape: &[i64], device: tch::Device) -> Tensor {
    let (_, outer_dims, inner) = split_shape(shape);
    check_v2_shape(&outer_dims, inner, 0);
    let groups = inner.div_ceil(4) as i64;
    let n = outer_dims.len();
    let opts = (Kind::Int64, device);
    let groups = Tensor::arange(groups, opts).g_mul_scalar(GAMMA as i64);
    // Broadcast sums (not in place: the table grows with each coordinate's dimension).
    outer_dims
        .iter()
        .enumerate()
        .fold(groups, |table, (i, &d)| {
            // Coordinate i sits (n − i) fields above the group field.
            let step = (GAMMA << (FIELD * (n - i) as u32)) as i64;
            let mut shape = vec![1i64; n + 1];
            shape[i] = d as i64;
            table
                + Tensor::arange(d as i64, opts)
                    .g_mul_scalar(step)
                    .view(shape.as_slice())
        })
}

/// V2's keep mask (bool, `shape`) from the rows' keys ([`v2_row_keys`], on the device), the
/// shape's counters ([`v2_counters`]), the site and the threshold: tensor ops only.
pub fn v2_keep(
    shape: &[i64],
    row_keys: &Tensor,
    counters: &Tensor,
    site: u64,
    threshold: i64,
) -> Tensor {
    let (rows, outer_dims, inner) = split_shape(shape);
    check_v2_shape(&outer_dims, inner, site);
    let site_word = (site << (FIELD * MAX_FIELDS as u32)).wrapping_mul(GAMMA) as i64;
    let mut key_shape = vec![1i64; outer_dims.len() + 2];
    key_shape[0] = rows as i64;
    let mut z = row_keys.g_add_scalar(site_word).view(key_shape.as_slice()) + counters.unsqueeze(0);
    mix_tensor_(&mut z);
    z.view_dtype(Kind::Int16)
        .narrow(-1, 0, inner as i64)
        .ge(threshold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn lanes_tensor(lanes: &[i16], shape: &[i64]) -> Tensor {
        Tensor::from_slice(lanes).view(shape)
    }

    /// The device path, run on the CPU, against the Rust reference: bit for bit, over shapes with
    /// last dimensions that are and are not multiples of four, one to three middle dimensions'
    /// worth of coordinates, many sites and seeds, and thresholds from p = 0 to p = 1.
    #[test]
    fn device_path_equals_the_reference_bit_for_bit() {
        let shapes: [&[i64]; 8] = [
            &[1, 1],
            &[3, 7],
            &[2, 5, 8],
            &[4, 3, 13],
            &[2, 12, 9, 9],
            &[3, 2, 17, 33],
            &[1, 130, 384],
            &[5, 1, 1, 1],
        ];
        let seeds: Vec<u64> = (0..5u64)
            .map(|i| i.wrapping_mul(0x1234_5678_9ABC_DEF1) ^ (u64::MAX - i))
            .collect();
        for shape in shapes {
            let rows = shape[0] as usize;
            let seeds = &seeds[..rows];
            let keys = v2_row_keys(&Tensor::from_slice(
                &seeds.iter().map(|&s| s as i64).collect::<Vec<_>>(),
            ));
            let counters = v2_counters(shape, Device::Cpu);
            for site in [0u64, 1, 2, 7, 18, 19, 300, 65535] {
                let reference = lanes_tensor(&v2_lanes(shape, seeds, site), shape);
                for p in [0.0, 1e-5, 0.1, 0.5, 0.9, 1.0] {
                    let t = threshold(p);
                    let got = v2_keep(shape, &keys, &counters, site, t);
                    assert!(
                        got.equal(&reference.ge(t)),
                        "shape {shape:?} site {site} p {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn lanes_are_uniform_and_independent_of_padding_and_site() {
        let lanes = v2_lanes(&[8, 64, 96], &(0..8).collect::<Vec<_>>(), 3);
        let kept = lanes
            .iter()
            .filter(|&&l| l as i64 >= threshold(0.1))
            .count();
        let rate = kept as f64 / lanes.len() as f64;
        assert!((rate - 0.9).abs() < 0.01, "kept {rate}");
        let mean = lanes.iter().map(|&l| l as f64).sum::<f64>() / lanes.len() as f64;
        assert!(mean.abs() < 300.0, "mean lane {mean}");
        // A row's first positions are the same whether the batch pads it to 3 or to 5 positions.
        let short = v2_lanes(&[1, 3, 8], &[9], 2);
        let long = v2_lanes(&[2, 5, 8], &[7, 9], 2);
        assert_eq!(short, long[40..40 + 24]);
        assert_ne!(short, v2_lanes(&[1, 3, 8], &[9], 3));
        // Attention-shaped: a shorter key length keeps the first keys' bits.
        let a = v2_lanes(&[1, 2, 3, 5], &[4], 1);
        let b = v2_lanes(&[1, 2, 3, 7], &[4], 1);
        for row in 0..6 {
            assert_eq!(a[row * 5..row * 5 + 5], b[row * 7..row * 7 + 5]);
        }
    }

    /// The lanes of a fixed case as the V1 generator has always made them (recorded from the
    /// implementation before V2 existed): runs checkpointed then resume with exactly these masks.
    #[test]
    fn v1_is_unchanged() {
        assert_eq!(
            v1_lanes(&[1, 2, 5], &[42], 7),
            [
                23341, 29807, 28126, 9301, -19626, 10202, 25845, 20942, 10881, 10052
            ]
        );
    }

    #[test]
    fn generators_have_stable_names() {
        assert_eq!(
            serde_json::to_string(&MaskGenerator::V2).unwrap(),
            "\"v2-splitmix-counter\""
        );
        assert_eq!(
            serde_json::from_str::<MaskGenerator>("\"v1-hash-chain\"").unwrap(),
            MaskGenerator::V1
        );
    }
}
