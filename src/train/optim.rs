//! AdamW over tch tensors, with state we own (so checkpoints can hold it), torch's update rule,
//! weight-decay exclusions, global-norm gradient clipping, and the linear warmup/decay schedule.
use tch::{Kind, Tensor};

/// AdamW hyper-parameters (torch's defaults; weight decay as in Hugging Face's Trainer examples).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
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
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layer_norm"))
}

struct Param {
    name: String,
    value: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// The optimizer. Parameters are held in name order, so every process iterates them identically.
pub struct AdamW {
    params: Vec<Param>,
    step: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// Tracks the trainable tensors `vars` (named; held in name order).
    pub fn new(mut vars: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, value)| Param {
                decay: decays(&name),
                exp_avg: value.zeros_like(),
                exp_avg_sq: value.zeros_like(),
                name,
                value,
            })
            .collect();
        Self {
            params,
            step: 0,
            cfg,
        }
    }

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The parameters' current gradients, in name order (undefined ones as zeros).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| {
                let g = p.value.grad();
                if g.defined() { g } else { p.value.zeros_like() }
            })
            .collect()
    }

    /// All gradients in name order as one f32 vector on the host (what the ring all-reduces);
    /// those of parameters `keep` rejects count as zeros.
    pub fn flat_grads(&self, keep: impl Fn(&str) -> bool) -> Vec<f32> {
        let grads = self.grads();
        let total: usize = grads.iter().map(Tensor::numel).sum();
        let mut out = vec![0f32; total];
        let mut at = 0;
        for (g, p) in grads.into_iter().zip(&self.params) {
            let n = g.numel();
            if !keep(&p.name) {
                at += n;
                continue;
            }
            g.to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous()
                .copy_data(&mut out[at..at + n], n);
            at += n;
        }
        out
    }

    /// Overwrites the gradients from a vector laid out as [`AdamW::flat_grads`] makes it.
    pub fn set_flat_grads(&mut self, flat: &[f32]) {
        let mut at = 0;
        tch::no_grad(|| {
            for p in &mut self.params {
                let n = p.value.numel();
                let src = Tensor::from_slice(&flat[at..at + n])
                    .view(p.value.size().as_slice())
                    .to_device(p.value.device());
                // A parameter without a gradient was unused by the forward pass on every rank alike
                // (the graph is the same everywhere), so there is nothing to write back.
                let mut g = p.value.grad();
                if g.defined() {
                    g.copy_(&src);
                }
                at += n;
            }
        });
    }

    /// Clears gradients.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.value.zero_grad();
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm` (torch's `clip_grad_norm_`);
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.value.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max_norm / (total.double_value(&[]) + 1e-6)).min(1.0);
        if max_norm > 0.0 {
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(coef);
                }
            });
        }
        total.double_value(&[])
    }

    /// One AdamW update at learning rate `lr` of the parameters `update` accepts (the others took
    /// no part in the step, as a parameter whose gradient is None in torch), torch's formulation:
    /// p ← p·(1 − lr·wd); m ← lerp(m, g, 1 − β1); v ← β2·v + (1 − β2)·g²;
    /// p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε).
    pub fn step(&mut self, lr: f64, update: impl Fn(&str) -> bool) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.cfg.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.cfg.beta2.powi(t)).sqrt();
        let cfg = self.cfg;
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.value.grad();
                if !g.defined() || !update(&p.name) {
                    continue;
                }
                if p.decay && cfg.weight_decay != 0.0 {
                    let _ = p.value.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
                }
                let _ = p.exp_avg.lerp_(&g, 1.0 - cfg.beta1);
                let _ = p.exp_avg_sq.g_mul_scalar_(cfg.beta2);
                let _ = p.exp_avg_sq.addcmul_(&(&g * (1.0 - cfg.beta2)), &g);
                // In place where possible: these tensors are as large as the model.
                let mut denom = p.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bc2_sqrt);
                let _ = denom.g_add_scalar_(cfg.eps);
                let _ = denom.g_mul_scalar_(-bc1 / lr);
                let _ = p.value.addcdiv_(&p.exp_avg, &denom);
            }
        });
    }

    /// The moments by name (`exp_avg.<param>`, `exp_avg_sq.<param>`), for checkpoints.
    pub fn state(&self) -> Vec<(String, &Tensor)> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("exp_avg.{}", p.name), &p.exp_avg),
                    (format!("exp_avg_sq.{}", p.name), &p.exp_avg_sq),
                ]
            })
            .collect()
    }

    /// Restores moments and step count saved by [`AdamW::state`].
    pub fn load_state(
        &mut self,
        step: u64,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<(), String> {
        for p in &mut self.params {
            for (prefix, slot) in [
                ("exp_avg", &mut p.exp_avg),
                ("exp_avg_sq", &mut p.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{}", p.name);
                let t = get(&key).ok_or_else(|| format!("optimizer state lacks {key}"))?;
                if t.size() != slot.size() {
                    return Err(format!(
                        "{key}: shape {:?}, expected {:?}",
                        t.size(),
                        slot.size()
                    ));
                }
                tch::no_grad(|| slot.copy_(&t.to_kind(Kind::Float)));
            }
        }
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
    pub fn lr(&self, k: u64) -> f64 {
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
        let mut opt = AdamW::new(vs.variables().into_iter().collect(), cfg);
        let w0: Vec<f64> = Vec::<f32>::try_from(lin.ws.view([-1]))
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let (mut m, mut v, mut w) = (vec![0.0; 3], vec![0.0; 3], w0);
        for (t, lr) in [(1, 0.1), (2, 0.05)] {
            opt.zero_grad();
            lin.forward(&x).sum(Kind::Float).backward();
            let g = [1.0, -2.0, 0.5];
            opt.step(lr, |_| true);
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

    #[test]
    fn clipping_scales_to_max_norm() {
        let vs = VarStore::new(tch::Device::Cpu);
        let lin = nn::linear(vs.root() / "lin", 2, 1, Default::default());
        let mut opt = AdamW::new(vs.variables().into_iter().collect(), AdamWConfig::default());
        (lin.forward(&Tensor::from_slice(&[3.0f32, 4.0]).view([1, 2]))
            .sum(Kind::Float)
            * 10.0)
            .backward();
        let before = opt.clip_grad_norm(1.0);
        let after: f64 = opt
            .grads()
            .iter()
            .map(|g| g.norm().double_value(&[]).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (before - (2500.0f64 + 100.0).sqrt()).abs() < 1e-3,
            "{before}"
        );
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }
}
