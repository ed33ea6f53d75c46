//! What a training step needs of its peers (docs/design.md §8): the [`Collective`] trait
//! (all-gather for embeddings, all-reduce SUM for gradients), [`Solo`] for one process, the wire
//! format of the values, the error a collective fails with, and [`HostRing`], what a ring of host
//! byte blocks offers (`train::exchange::OverHost` serves the trait from one). The engines behind
//! them in a cluster (the gRPC ring, c10d's Gloo) live in `cluster`; nothing here knows of a network.
use std::time::Duration;

use tch::Tensor;

#[cfg(target_endian = "big")]
compile_error!("the wire format is little-endian f32; big-endian hosts are not supported");

/// A tensor as the wire carries it: its values as little-endian f32 bytes (row-major).
pub(crate) fn tensor_to_le_bytes(t: &tch::Tensor) -> Vec<u8> {
    let t = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Float)
        .contiguous();
    let mut v = vec![0f32; t.numel()];
    t.copy_data(&mut v, t.numel());
    bytemuck::cast_slice(&v).to_vec()
}

/// The inverse of [`tensor_to_le_bytes`]: `bytes` (4 per value, any alignment) as a CPU f32
/// tensor of `shape`.
pub(crate) fn tensor_from_le_bytes(bytes: &[u8], shape: &[i64]) -> tch::Tensor {
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    tch::Tensor::from_slice(&v).view(shape)
}

/// Why a collective failed; the step is then aborted, never half-applied.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("timed out after {0:?} waiting for rank {1}")]
    Timeout(Duration, usize),
    #[error("the stream from rank {0} closed")]
    Closed(usize),
    #[error("protocol error from rank {from}: {reason}")]
    Protocol { from: usize, reason: String },
    #[error("cannot reach rank {rank} at {address}: {reason}")]
    Connect {
        rank: usize,
        address: String,
        reason: String,
    },
    #[error("abandoned: {0}")]
    Aborted(String),
    /// The engine under the collective (c10d, or the thread that feeds the ring) failed.
    #[error("{0}")]
    Failed(String),
}

/// How values of an all-reduce travel: f32 as they are, or bf16 (half the bytes). With bf16 each
/// rank still adds in f32, and every segment's sum is rounded to bf16 once, by its owner, before it
/// is sent round: every rank ends with the same values, each within half a bf16 step of the f32 sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wire {
    #[default]
    F32,
    Bf16,
}

impl Wire {
    /// Bytes per value on the wire.
    pub(crate) fn value_bytes(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::Bf16 => 2,
        }
    }

    /// `values` as the wire carries them (little-endian).
    pub(crate) fn encode(self, values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Wire::F32 => std::borrow::Cow::Borrowed(bytemuck::cast_slice(values)),
            Wire::Bf16 => std::borrow::Cow::Owned(
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                    .collect(),
            ),
        }
    }

    /// The value encoded at the start of `bytes`.
    #[inline]
    pub(crate) fn decode(self, bytes: &[u8]) -> f32 {
        match self {
            Wire::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            Wire::Bf16 => half::bf16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32(),
        }
    }

    /// Rounds `values` to what the wire can carry exactly.
    pub(crate) fn round(self, values: &mut [f32]) {
        if self == Wire::Bf16 {
            for v in values {
                *v = half::bf16::from_f32(*v).to_f32();
            }
        }
    }
}

/// The two collectives a training step needs, as blocking calls: the step pipeline (in `train/`)
/// runs them between tensor work, alone ([`Solo`]), over a ring of host byte blocks
/// (`train::exchange::OverHost` over the gRPC ring), or on an engine that takes tensors (c10d's Gloo).
pub trait Collective {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Every rank's `local` (f32, the same shape on every rank) concatenated along the first
    /// dimension in rank order, on `local`'s device, without autograd history.
    fn all_gather(&mut self, step: u64, local: &Tensor) -> Result<Tensor, CollectiveError>;
    /// Replaces `grads` (a contiguous f32 vector) by its element-wise sum over all ranks, its
    /// values travelling as `wire` says; a collective that stages through the host moves it
    /// `bucket_bytes` at a time. Returns the gradient bytes that crossed between device and host.
    fn all_reduce_sum(
        &mut self,
        step: u64,
        grads: &Tensor,
        wire: Wire,
        bucket_bytes: usize,
    ) -> Result<u64, CollectiveError>;
}

/// One process: the collectives are identities.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_gather(&mut self, _step: u64, local: &Tensor) -> Result<Tensor, CollectiveError> {
        Ok(local.detach())
    }
    fn all_reduce_sum(
        &mut self,
        _step: u64,
        _grads: &Tensor,
        _wire: Wire,
        _bucket_bytes: usize,
    ) -> Result<u64, CollectiveError> {
        Ok(0)
    }
}

/// The collectives of a ring that moves blocks of host bytes.
pub trait HostRing {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Every rank's `local` block (all the same length), in rank order.
    fn all_gather(&mut self, step: u64, local: Vec<u8>) -> Result<Vec<Vec<u8>>, CollectiveError>;
    /// Replaces `buf` by its element-wise sum over all ranks, its values travelling as `wire` says.
    fn all_reduce_sum(
        &mut self,
        step: u64,
        buf: &mut [f32],
        wire: Wire,
    ) -> Result<(), CollectiveError>;
}
