//! A [`Collective`] over a ring that moves host bytes (the gRPC ring, docs/design.md §5, §8): the
//! embeddings cross to the host and back as little-endian f32 blocks, and the flat gradient buffer
//! crosses once each way in buckets, a helper thread copying the next bucket out of the device
//! while the ring sums this one. With `Wire::Bf16` a bucket leaves the device in bf16 and travels
//! in bf16: half the bytes over PCIe and the network.
use std::sync::mpsc::sync_channel;

use tch::{Device, Kind, Tensor};

use crate::collective::{
    Collective, CollectiveError, HostRing, Wire, tensor_from_le_bytes, tensor_to_le_bytes,
};

/// Serves [`Collective`] from a [`HostRing`], staging tensors through host memory.
pub struct OverHost<R>(pub R);

impl<R: HostRing> Collective for OverHost<R> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }

    fn all_gather(&mut self, step: u64, local: &Tensor) -> Result<Tensor, CollectiveError> {
        let shape = local.size();
        let blocks = self.0.all_gather(step, tensor_to_le_bytes(local))?;
        let want = local.numel() * 4;
        if let Some((from, b)) = blocks.iter().enumerate().find(|(_, b)| b.len() != want) {
            return Err(CollectiveError::Protocol {
                from,
                reason: format!("sent {} bytes to gather, expected {want}", b.len()),
            });
        }
        let parts: Vec<Tensor> = blocks
            .iter()
            .map(|b| tensor_from_le_bytes(b, &shape))
            .collect();
        Ok(crate::device::upload(
            &Tensor::cat(&parts, 0),
            local.device(),
        ))
    }

    fn all_reduce_sum(
        &mut self,
        step: u64,
        grads: &Tensor,
        wire: Wire,
        bucket_bytes: usize,
    ) -> Result<u64, CollectiveError> {
        let plan = buckets(grads.numel() as i64, bucket_bytes);
        let moved = 2 * grads.numel() as u64 * wire.value_bytes() as u64;
        std::thread::scope(|scope| -> Result<(), CollectiveError> {
            // Two buckets in flight at most: one being summed, one copied out.
            let (tx, rx) = sync_channel::<Vec<f32>>(1);
            let source = grads.shallow_clone();
            let copies = plan.clone();
            scope.spawn(move || {
                for bucket in copies {
                    if tx.send(to_host(&source, bucket, wire)).is_err() {
                        return;
                    }
                }
            });
            for &bucket in &plan {
                let mut values = rx.recv().map_err(|_| {
                    CollectiveError::Failed("the gradient copying thread ended early".into())
                })?;
                self.0.all_reduce_sum(step, &mut values, wire)?;
                to_device(grads, bucket, &values, wire);
            }
            Ok(())
        })?;
        Ok(moved)
    }
}

/// The element ranges of `numel` values in buckets of at most `bucket_bytes` (f32).
pub(crate) fn buckets(numel: i64, bucket_bytes: usize) -> Vec<(i64, i64)> {
    let per = ((bucket_bytes / 4).max(1)) as i64;
    (0..numel)
        .step_by(per as usize)
        .map(|at| (at, per.min(numel - at)))
        .collect()
}

/// A bucket of the gradient buffer as host f32 values (read from the device in the wire's kind).
fn to_host(grads: &Tensor, (at, n): (i64, i64), wire: Wire) -> Vec<f32> {
    let slice = grads.narrow(0, at, n);
    let mut out = vec![0f32; n as usize];
    match wire {
        Wire::F32 => slice
            .to_device(Device::Cpu)
            .contiguous()
            .copy_data(&mut out, n as usize),
        Wire::Bf16 => {
            // As raw 16-bit words: tch takes `half::bf16` elements for f16 ones.
            let mut bits = vec![0i16; n as usize];
            slice
                .to_kind(Kind::BFloat16)
                .view_dtype(Kind::Int16)
                .to_device(Device::Cpu)
                .copy_data(&mut bits, n as usize);
            for (o, b) in out.iter_mut().zip(bits) {
                *o = half::bf16::from_bits(b as u16).to_f32();
            }
        }
    }
    out
}

/// Writes the summed `values` of a bucket back into the gradient buffer.
fn to_device(grads: &Tensor, (at, n): (i64, i64), values: &[f32], wire: Wire) {
    let device = grads.device();
    let host = match wire {
        Wire::F32 => Tensor::from_slice(values),
        // Every value is a bf16 already (the ring rounded the sums): nothing is lost on the way.
        Wire::Bf16 => Tensor::from_slice(
            &values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits() as i16)
                .collect::<Vec<_>>(),
        )
        .view_dtype(Kind::BFloat16),
    };
    let summed = crate::device::upload(&host, device).to_kind(Kind::Float);
    tch::no_grad(|| grads.narrow(0, at, n).copy_(&summed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_buffer_in_order() {
        assert_eq!(buckets(10, 16), [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(buckets(3, 1 << 20), [(0, 3)]);
        assert_eq!(buckets(0, 16), []);
    }
}
