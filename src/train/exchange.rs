//! The gradient all-reduce of a cluster step (docs/design.md §5, §8): the flat gradient buffer
//! crosses to the host once and back once, in buckets, and a helper thread copies the next bucket
//! out of the device while the ring sums this one. With `cluster.grad_dtype = "bf16"` a bucket
//! leaves the device in bf16 and travels in bf16: half the bytes over PCIe and the network.
use std::sync::mpsc::sync_channel;

use tch::{Device, Kind, Tensor};

use super::flat::FlatParams;
use crate::collective::{Collective, Wire};
use crate::error::{Error, Result};

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

/// Sums the gradients of `flat` over the ranks of `coll` for step `step`, in buckets of
/// `bucket_bytes`; returns the gradient bytes that crossed between device and host.
pub(crate) fn all_reduce(
    flat: &mut FlatParams,
    coll: &mut dyn Collective,
    step: u64,
    wire: Wire,
    bucket_bytes: usize,
) -> Result<u64> {
    let grads = flat.grads().shallow_clone();
    let plan = buckets(grads.numel() as i64, bucket_bytes);
    let moved = 2 * grads.numel() as u64 * wire.value_bytes() as u64;
    std::thread::scope(|scope| -> Result<()> {
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
            let mut values = rx
                .recv()
                .map_err(|_| Error::Internal("the gradient copying thread ended early".into()))?;
            coll.all_reduce_sum(step, &mut values, wire)?;
            to_device(&grads, bucket, &values, wire);
        }
        Ok(())
    })?;
    Ok(moved)
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
