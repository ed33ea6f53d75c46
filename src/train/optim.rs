//! AdamW over the flat parameter buffers ([`super::flat`]), with state we own (so checkpoints can
//! hold it), torch's update rule, weight-decay exclusions, and the linear warmup/decay schedule.
use std::sync::Arc;

use tch::{Kind, Tensor};

use super::flat::{FlatParams, Layout, Owner, Run};
use super::fused;
use crate::error::Error;

/// AdamW hyper-parameters (torch's defaults; weight decay as in Hugging Face's Trainer examples).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Biases and LayerNorm parameters are not decayed (Hugging Face's `get_decay_parameter_names`).
pub(crate) fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layer_norm"))
}

/// The optimizer: its moments are flat buffers of the parameters' [`Layout`], so an update is a few
/// kernels per run of the layout (owner × weight decay), not per tensor.
pub struct AdamW {
    layout: Arc<Layout>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// Moments (zero) for the parameters laid out as `layout`, on `device`.
    pub(crate) fn new(layout: Arc<Layout>, device: tch::Device, cfg: AdamWConfig) -> Self {
        Self {
            exp_avg: layout.zeros(device),
            exp_avg_sq: layout.zeros(device),
            layout,
            step: 0,
            cfg,
        }
    }

    /// Optimizer steps taken so far.
    pub(crate) fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One AdamW update at learning rate `lr` of the runs whose owner `update` accepts (the others
    /// took no part in the step, as a parameter whose gradient is None in torch), torch's
    /// formulation: p ← p·(1 − lr·wd); m ← lerp(m, g, 1 − β1); v ← β2·v + (1 − β2)·g²;
    /// p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε). ATen's fused AdamW does it: one
    /// kernel per weight-decay setting on CUDA, one pass over memory on the CPU.
    pub(crate) fn step(
        &mut self,
        params: &FlatParams,
        lr: f64,
        update: impl Fn(Owner) -> bool,
    ) -> Result<(), Error> {
        self.step += 1;
        let device = self.exp_avg.device();
        // Bias correction counts the run's steps (docs/design.md §6): one count for every tensor.
        let count = Tensor::full([], self.step as f64, (Kind::Float, device));
        for decay in [true, false] {
            let runs: Vec<&Run> = self
                .layout
                .runs()
                .iter()
                .filter(|r| r.decay == decay && update(r.owner))
                .collect();
            if runs.is_empty() {
                continue;
            }
            let part = |buf: &Tensor| -> Vec<Tensor> {
                runs.iter()
                    .map(|r| buf.narrow(0, r.range.start, r.range.end - r.range.start))
                    .collect()
            };
            let weight_decay = if decay { self.cfg.weight_decay } else { 0.0 };
            fused::adamw(
                [
                    &part(params.values()),
                    &part(params.grads()),
                    &part(&self.exp_avg),
                    &part(&self.exp_avg_sq),
                    &runs.iter().map(|_| count.shallow_clone()).collect(),
                ],
                lr,
                (self.cfg.beta1, self.cfg.beta2),
                weight_decay,
                self.cfg.eps,
            )?;
        }
        Ok(())
    }

    /// The moments by name (`exp_avg.<param>`, `exp_avg_sq.<param>`), for checkpoints: views of
    /// the flat buffers.
    pub(crate) fn state(&self) -> Vec<(String, Tensor)> {
        let (m, v) = (
            self.layout.views(&self.exp_avg),
            self.layout.views(&self.exp_avg_sq),
        );
        m.into_iter()
            .zip(v)
            .flat_map(|((name, m), (_, v))| {
                [
                    (format!("exp_avg.{name}"), m),
                    (format!("exp_avg_sq.{name}"), v),
                ]
            })
            .collect()
    }

    /// Restores moments and step count saved by [`AdamW::state`] (any version: the names are the
    /// parameters', whatever the layout).
    pub(crate) fn load_state(
        &mut self,
        step: u64,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<(), String> {
        let mut loaded = Vec::new();
        for (key, slot) in self.state() {
            let t = get(&key).ok_or_else(|| format!("optimizer state lacks {key}"))?;
            if t.size() != slot.size() {
                return Err(format!(
                    "{key}: shape {:?}, expected {:?}",
                    t.size(),
                    slot.size()
                ));
            }
            loaded.push((slot, t));
        }
        // Checked whole before anything is copied: a bad file leaves the moments as they were.
        tch::no_grad(|| {
            for (mut slot, t) in loaded {
                slot.copy_(&t.to_kind(Kind::Float));
            }
        });
        self.step = step;
        Ok(())
    }
}

/// Linear warmup from 0 to `peak`, then linear decay to 0 at `total` (Hugging Face's
/// `get_linear_schedule_with_warmup`: optimizer step k, counted from 0, uses `lr(k)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
}

impl LinearSchedule {
    /// The learning rate of optimizer step `k` (0-based).
    pub(crate) fn lr(&self, k: u64) -> f64 {
        if k < self.warmup {
            self.peak * k as f64 / self.warmup.max(1) as f64
        } else {
            let left = self.total.saturating_sub(k) as f64;
            self.peak * (left / (self.total - self.warmup).max(1) as f64).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module, VarStore};

    #[test]
    fn schedule_matches_hugging_face() {
        let s = LinearSchedule {
            peak: 1.0,
            warmup: 10,
            total: 110,
        };
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(5), 0.5);
        assert_eq!(s.lr(10), 1.0);
        assert_eq!(s.lr(60), 0.5);
        assert_eq!(s.lr(110), 0.0);
        assert_eq!(
            LinearSchedule {
                peak: 2.0,
                warmup: 0,
                total: 4
            }
            .lr(0),
            2.0
        );
    }

    #[test]
    fn decay_exclusions_follow_hugging_face() {
        assert!(decays("encoder.layer.0.attention.self.query.weight"));
        assert!(!decays("encoder.layer.0.attention.self.query.bias"));
        assert!(!decays("embeddings.LayerNorm.weight"));
    }

    fn bound(vs: &VarStore) -> FlatParams {
        FlatParams::bind(
            vs.variables()
                .into_iter()
                .map(|(n, t)| {
                    let d = decays(&n);
                    (n, t, Owner::Encoder, d)
                })
                .collect(),
        )
        .unwrap()
    }

    /// Two AdamW steps on a linear layer, checked against the update written out in f64.
    #[test]
    fn update_matches_the_closed_form() {
        let vs = VarStore::new(tch::Device::Cpu);
        let lin = nn::linear(vs.root() / "lin", 3, 1, Default::default());
        let x = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).view([1, 3]);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut flat = bound(&vs);
        let mut opt = AdamW::new(flat.layout().clone(), tch::Device::Cpu, cfg);
        let w0: Vec<f64> = Vec::<f32>::try_from(lin.ws.view([-1]))
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let (mut m, mut v, mut w) = (vec![0.0; 3], vec![0.0; 3], w0);
        for (t, lr) in [(1, 0.1), (2, 0.05)] {
            flat.zero_grad();
            lin.forward(&x).sum(Kind::Float).backward();
            let g = [1.0, -2.0, 0.5];
            opt.step(&flat, lr, |_| true).unwrap();
            for i in 0..3 {
                w[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = (v[i] / (1.0 - 0.999f64.powi(t))).sqrt();
                w[i] -= lr * mh / (vh + 1e-8);
            }
        }
        let got = Vec::<f32>::try_from(lin.ws.view([-1])).unwrap();
        for i in 0..3 {
            assert!(
                (got[i] as f64 - w[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                got[i],
                w[i]
            );
        }
    }

    /// The per-tensor AdamW this optimizer replaced, kept here as the reference it must equal.
    struct PerTensor {
        params: Vec<(bool, Tensor, Tensor, Tensor)>,
        step: u64,
        cfg: AdamWConfig,
    }

    impl PerTensor {
        fn step(&mut self, lr: f64) {
            self.step += 1;
            let t = self.step as i32;
            let bc1 = 1.0 - self.cfg.beta1.powi(t);
            let bc2_sqrt = (1.0 - self.cfg.beta2.powi(t)).sqrt();
            let cfg = self.cfg;
            tch::no_grad(|| {
                for (decay, value, exp_avg, exp_avg_sq) in &mut self.params {
                    let g = value.grad();
                    if *decay && cfg.weight_decay != 0.0 {
                        let _ = value.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
                    }
                    let _ = exp_avg.lerp_(&g, 1.0 - cfg.beta1);
                    let _ = exp_avg_sq.g_mul_scalar_(cfg.beta2);
                    let _ = exp_avg_sq.addcmul_(&(&g * (1.0 - cfg.beta2)), &g);
                    let mut denom = exp_avg_sq.sqrt();
                    let _ = denom.g_div_scalar_(bc2_sqrt);
                    let _ = denom.g_add_scalar_(cfg.eps);
                    let _ = denom.g_mul_scalar_(-bc1 / lr);
                    let _ = value.addcdiv_(exp_avg, &denom);
                }
            });
        }
    }

    /// Twenty steps of a two-layer network with biases (decayed and not), flat against per tensor,
    /// on the same gradients: the weights agree to 1e-6.
    #[test]
    fn flat_adamw_equals_the_per_tensor_one() {
        tch::manual_seed(7);
        let make = || {
            let vs = VarStore::new(tch::Device::Cpu);
            let a = nn::linear(vs.root() / "a", 8, 16, Default::default());
            let b = nn::linear(vs.root() / "b", 16, 4, Default::default());
            (vs, a, b)
        };
        let (vs1, a1, b1) = make();
        let (mut vs2, a2, b2) = make();
        vs2.copy(&vs1).unwrap();
        let cfg = AdamWConfig::default();
        let mut flat = bound(&vs1);
        let mut opt = AdamW::new(flat.layout().clone(), tch::Device::Cpu, cfg);
        let mut reference = PerTensor {
            params: vs2
                .variables()
                .into_iter()
                .map(|(n, t)| {
                    (
                        decays(&n),
                        t.shallow_clone(),
                        t.zeros_like(),
                        t.zeros_like(),
                    )
                })
                .collect(),
            step: 0,
            cfg,
        };
        for step in 0..20 {
            let x = Tensor::randn([5, 8], (Kind::Float, tch::Device::Cpu));
            let lr = 1e-3 * (1.0 + step as f64 / 10.0);
            flat.zero_grad();
            b1.forward(&a1.forward(&x).relu())
                .pow_tensor_scalar(2)
                .sum(Kind::Float)
                .backward();
            opt.step(&flat, lr, |_| true).unwrap();
            for (_, v, ..) in &mut reference.params {
                v.zero_grad();
            }
            b2.forward(&a2.forward(&x).relu())
                .pow_tensor_scalar(2)
                .sum(Kind::Float)
                .backward();
            reference.step(lr);
        }
        let vars2 = vs2.variables();
        for (name, t) in vs1.variables() {
            let diff = (&t - &vars2[&name]).abs().max().double_value(&[]);
            assert!(diff <= 1e-6, "{name}: {diff}");
        }
    }

    #[test]
    fn moments_round_trip_by_name() {
        let vs = VarStore::new(tch::Device::Cpu);
        let lin = nn::linear(vs.root() / "lin", 2, 2, Default::default());
        let mut flat = bound(&vs);
        let mut opt = AdamW::new(
            flat.layout().clone(),
            tch::Device::Cpu,
            AdamWConfig::default(),
        );
        flat.zero_grad();
        lin.forward(&Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu)))
            .sum(Kind::Float)
            .backward();
        opt.step(&flat, 0.1, |_| true).unwrap();
        let saved: Vec<(String, Tensor)> = opt
            .state()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let mut other = AdamW::new(
            flat.layout().clone(),
            tch::Device::Cpu,
            AdamWConfig::default(),
        );
        other
            .load_state(1, |k| {
                saved
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, t)| t.shallow_clone())
            })
            .unwrap();
        assert!(other.exp_avg.equal(&opt.exp_avg) && other.exp_avg_sq.equal(&opt.exp_avg_sq));
        let err = other.load_state(1, |_| None).unwrap_err();
        assert!(err.contains("optimizer state lacks exp_avg.lin."), "{err}");
    }
}
