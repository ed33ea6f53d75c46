//! The trainable tensors as views into one flat buffer, and their gradients as views into another
//! (docs/design.md §6). Autograd accumulates every gradient in place into the flat gradient buffer,
//! so zeroing, clipping, the all-reduce, AdamW and the moving average each work on a few long
//! contiguous ranges — a handful of kernels per step, whatever the number of tensors — and the
//! gradients need no packing before they cross to another rank.
//!
//! The layout groups tensors by owner (the encoder, then each task's loss head) and, within an owner,
//! the weight-decayed ones before the others, each group in name order; every replica builds the same
//! layout from the same names, so flat buffers line up across ranks.
use std::ops::Range;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Who a trainable tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Owner {
    Encoder,
    /// The loss head of task i (it trains only on that task's steps).
    Head(usize),
}

/// One tensor's place in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    pub name: String,
    pub shape: Vec<i64>,
    pub owner: Owner,
    pub decay: bool,
    pub offset: i64,
    pub numel: i64,
}

/// A contiguous range of slots that share an owner and a weight-decay setting: what the optimizer
/// updates with one set of kernels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    pub owner: Owner,
    pub decay: bool,
    pub range: Range<i64>,
}

/// Where each trainable tensor sits in a flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    slots: Vec<Slot>,
    runs: Vec<Run>,
    numel: i64,
}

impl Layout {
    /// The layout of tensors `(name, shape, owner, decays)`.
    pub(crate) fn new(mut tensors: Vec<(String, Vec<i64>, Owner, bool)>) -> Self {
        tensors.sort_by(|a, b| (a.2, !a.3, &a.0).cmp(&(b.2, !b.3, &b.0)));
        let mut slots = Vec::with_capacity(tensors.len());
        let mut runs: Vec<Run> = Vec::new();
        let mut offset = 0i64;
        for (name, shape, owner, decay) in tensors {
            let numel = shape.iter().product::<i64>();
            match runs.last_mut() {
                Some(r) if r.owner == owner && r.decay == decay => r.range.end += numel,
                _ => runs.push(Run {
                    owner,
                    decay,
                    range: offset..offset + numel,
                }),
            }
            slots.push(Slot {
                name,
                shape,
                owner,
                decay,
                offset,
                numel,
            });
            offset += numel;
        }
        Self {
            slots,
            runs,
            numel: offset,
        }
    }

    #[cfg(test)]
    /// Elements in all.
    pub(crate) fn numel(&self) -> i64 {
        self.numel
    }

    #[cfg(test)]
    /// The slots in buffer order.
    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The runs in buffer order.
    pub(crate) fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// `buf` (a flat buffer of this layout) as one view per tensor, by name.
    pub(crate) fn views(&self, buf: &Tensor) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), Self::view(buf, s)))
            .collect()
    }

    fn view(buf: &Tensor, slot: &Slot) -> Tensor {
        buf.narrow(0, slot.offset, slot.numel)
            .view(slot.shape.as_slice())
    }

    /// A zero buffer of this layout.
    pub(crate) fn zeros(&self, device: Device) -> Tensor {
        Tensor::zeros([self.numel], (Kind::Float, device))
    }
}

/// The flat buffers of a replica's trainable tensors and their gradients.
pub struct FlatParams {
    layout: Arc<Layout>,
    values: Tensor,
    grads: Tensor,
    /// The tensors themselves (the modules' own), in slot order, to point their gradients anew.
    vars: Vec<Tensor>,
}

impl std::fmt::Debug for FlatParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FlatParams({} tensors, {} values)",
            self.layout.slots.len(),
            self.layout.numel
        )
    }
}

impl FlatParams {
    /// Moves `tensors` (name, tensor, owner, decays; f32, all on one device) into flat buffers: each
    /// tensor keeps its identity (modules hold it) but its data becomes a view of the value buffer,
    /// and its gradient a view of the gradient buffer.
    pub(crate) fn bind(tensors: Vec<(String, Tensor, Owner, bool)>) -> Result<Self> {
        let device = tensors.first().map_or(Device::Cpu, |t| t.1.device());
        if let Some((name, t, ..)) = tensors
            .iter()
            .find(|(_, t, ..)| t.kind() != Kind::Float || t.device() != device)
        {
            return Err(Error::Usage(format!(
                "trainable tensor {name} is {:?} on {:?}: every one must be f32 on {device:?}",
                t.kind(),
                t.device()
            )));
        }
        let layout = Arc::new(Layout::new(
            tensors
                .iter()
                .map(|(n, t, o, d)| (n.clone(), t.size(), *o, *d))
                .collect(),
        ));
        let values = layout.zeros(device);
        let grads = layout.zeros(device);
        let by_name: std::collections::HashMap<&str, &Tensor> =
            tensors.iter().map(|(n, t, ..)| (n.as_str(), t)).collect();
        tch::no_grad(|| {
            for slot in &layout.slots {
                let mut var = by_name[slot.name.as_str()].shallow_clone();
                let view = Layout::view(&values, slot);
                view.shallow_clone().copy_(&var);
                var.set_data(&view);
            }
        });
        // Give every tensor a gradient (zeros, from one backward pass), then point each at its view:
        // a defined gradient is accumulated in place, so it stays in the flat buffer from now on.
        let touch = tensors
            .iter()
            .map(|(_, t, ..)| t.sum(Kind::Float) * 0.0)
            .reduce(|a, b| a + b);
        if let Some(touch) = touch {
            touch.backward();
        }
        for slot in &layout.slots {
            let mut grad = by_name[slot.name.as_str()].grad();
            grad.set_data(&Layout::view(&grads, slot));
        }
        let _ = grads.shallow_clone().zero_();
        let vars = layout
            .slots
            .iter()
            .map(|slot| by_name[slot.name.as_str()].shallow_clone())
            .collect();
        Ok(Self {
            layout,
            values,
            grads,
            vars,
        })
    }

    /// The layout.
    pub(crate) fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Every trainable value, in layout order.
    pub(crate) fn values(&self) -> &Tensor {
        &self.values
    }

    /// Every gradient, in layout order.
    pub fn grads(&self) -> &Tensor {
        &self.grads
    }

    /// Clears the gradients (one kernel).
    pub(crate) fn zero_grad(&mut self) {
        let _ = self.grads.zero_();
    }

    /// Points every gradient at a new, zeroed buffer. Whoever still holds the old one (a
    /// collective given up on, which writes its sum there if a stalled peer wakes) no longer
    /// reaches the replica's gradients.
    pub(crate) fn renew_grads(&mut self) {
        let grads = self.layout.zeros(self.grads.device());
        for (slot, var) in self.layout.slots.iter().zip(&self.vars) {
            var.grad().set_data(&Layout::view(&grads, slot));
        }
        self.grads = grads;
    }

    /// Zeroes the gradients of every loss head (what ranks other than 0 send to the sum).
    pub(crate) fn zero_head_grads(&mut self) {
        for run in self
            .layout
            .runs
            .iter()
            .filter(|r| r.owner != Owner::Encoder)
        {
            let _ = self
                .grads
                .narrow(0, run.range.start, run.range.end - run.range.start)
                .zero_();
        }
    }

    /// Scales the gradients so their global L2 norm is at most `max_norm` (torch's
    /// `clip_grad_norm_`; `max_norm` ≤ 0 leaves them), on the device. Returns the norm before
    /// clipping as a device scalar: reading it is the caller's one wait for the device.
    pub(crate) fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let norm = self.grads.norm();
        if max_norm > 0.0 {
            let coef = (norm.g_add_scalar(1e-6).reciprocal() * max_norm).clamp_max(1.0);
            let _ = self.grads.g_mul_(&coef);
        }
        norm
    }

    #[cfg(test)]
    /// Whether every tensor of `tensors` (by name) still points into the value and gradient buffers:
    /// true unless something gave a tensor new storage behind the layout's back.
    pub(crate) fn holds(&self, tensors: &[(String, Tensor)]) -> bool {
        let by_name: std::collections::HashMap<&str, &Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        self.layout.slots.iter().all(|s| {
            by_name.get(s.name.as_str()).is_some_and(|t| {
                let at = |buf: &Tensor| buf.data_ptr() as usize + s.offset as usize * 4;
                t.data_ptr() as usize == at(&self.values)
                    && t.grad().defined()
                    && t.grad().data_ptr() as usize == at(&self.grads)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module};

    #[test]
    fn layout_groups_by_owner_then_decay_then_name() {
        let l = Layout::new(vec![
            ("heads.b.w".into(), vec![2], Owner::Head(1), true),
            ("enc.bias".into(), vec![3], Owner::Encoder, false),
            ("enc.w".into(), vec![2, 2], Owner::Encoder, true),
            ("enc.a".into(), vec![1], Owner::Encoder, true),
            ("heads.a.w".into(), vec![5], Owner::Head(0), true),
        ]);
        let names: Vec<&str> = l.slots().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["enc.a", "enc.w", "enc.bias", "heads.a.w", "heads.b.w"]
        );
        let runs: Vec<(Owner, bool, Range<i64>)> = l
            .runs()
            .iter()
            .map(|r| (r.owner, r.decay, r.range.clone()))
            .collect();
        assert_eq!(
            runs,
            [
                (Owner::Encoder, true, 0..5),
                (Owner::Encoder, false, 5..8),
                (Owner::Head(0), true, 8..13),
                (Owner::Head(1), true, 13..15)
            ]
        );
        assert_eq!(l.numel(), 15);
    }

    /// After binding, a module trains through the flat buffers: its forward sees the values, its
    /// backward accumulates into the gradient buffer (in place, across two passes), and writes to
    /// the buffers are what the module uses next.
    #[test]
    fn modules_read_and_write_through_the_buffers() {
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "lin", 3, 2, Default::default());
        let before = lin.forward(&Tensor::ones([1, 3], (Kind::Float, Device::Cpu)));
        let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let mut flat = FlatParams::bind(
            vars.iter()
                .map(|(n, t)| {
                    (
                        n.clone(),
                        t.shallow_clone(),
                        Owner::Encoder,
                        n.ends_with("weight"),
                    )
                })
                .collect(),
        )
        .unwrap();
        assert!(flat.holds(&vars));
        let x = Tensor::ones([1, 3], (Kind::Float, Device::Cpu));
        assert!(lin.forward(&x).equal(&before), "binding keeps the values");
        assert_eq!(flat.grads().abs().sum(Kind::Float).double_value(&[]), 0.0);
        lin.forward(&x).sum(Kind::Float).backward();
        lin.forward(&x).sum(Kind::Float).backward();
        // Two passes accumulated: d/dW = 2 for every weight, d/db = 2.
        assert_eq!(Vec::<f32>::try_from(flat.grads()).unwrap(), vec![2.0f32; 8]);
        assert!(flat.holds(&vars), "accumulation stays in place");
        let _ = flat.values.shallow_clone().fill_(0.5);
        let after = lin.forward(&x);
        assert_eq!(
            Vec::<f32>::try_from(after.view([-1])).unwrap(),
            [2.0f32, 2.0]
        );
        flat.zero_grad();
        assert_eq!(flat.grads().abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(flat.holds(&vars));

        // New gradient buffer: a pass accumulates there, and a write to the old one (what a
        // collective given up on may still do) no longer reaches the module's gradients.
        let old = flat.grads().shallow_clone();
        flat.renew_grads();
        assert!(
            flat.holds(&vars),
            "the gradients are views of the new buffer"
        );
        lin.forward(&x).sum(Kind::Float).backward();
        let _ = old.shallow_clone().fill_(99.0);
        assert_eq!(Vec::<f32>::try_from(flat.grads()).unwrap(), vec![1.0f32; 8]);
        assert_eq!(
            Vec::<f32>::try_from(lin.ws.grad().view([-1])).unwrap(),
            vec![1.0f32; 6]
        );
    }

    #[test]
    fn clipping_scales_to_max_norm_on_the_device() {
        let w = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut flat =
            FlatParams::bind(vec![("w".into(), w.shallow_clone(), Owner::Encoder, true)]).unwrap();
        (w.dot(&Tensor::from_slice(&[30.0f32, 40.0]))).backward();
        let norm = flat.clip_grad_norm(1.0).double_value(&[]);
        assert!((norm - 50.0).abs() < 1e-4, "{norm}");
        let after = flat.grads().norm().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        // Below the bound nothing changes.
        let again = flat.clip_grad_norm(10.0).double_value(&[]);
        assert!((again - after).abs() < 1e-6);
    }

    #[test]
    fn tensors_of_another_kind_are_refused() {
        let t = Tensor::zeros([2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let err = FlatParams::bind(vec![("x".into(), t, Owner::Encoder, true)]).unwrap_err();
        assert!(
            err.to_string().contains("trainable tensor x is Double"),
            "{err}"
        );
    }
}
