//! The optimiser side of the trainer (docs/ALGORITHM.md §5.9): torch-exact AdamW over f32 master weights, global-norm gradient
//! clipping as `torch.nn.utils.clip_grad_norm_`, and the learning-rate schedules of diffusers' `get_scheduler`.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// AdamW hyper-parameters (torch defaults, weight decay as the training script's default).
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
            weight_decay: 1e-4,
        }
    }
}

/// Adam moments and step count of one parameter (torch keeps the step count per parameter).
struct ParamState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
}

/// `torch.optim.AdamW` with a single parameter group (decay on every parameter, docs/ALGORITHM.md §9 #16) over f32 `Var`s
/// (master weights); the moments are f32 whatever dtype the model computes in. Parameters without a gradient in a
/// step are skipped entirely (no decay, no step count), as in torch.
pub struct AdamW {
    params: Vec<(String, Var)>,
    states: Vec<ParamState>,
    config: AdamWConfig,
}

impl AdamW {
    /// An optimiser over named f32 variables; the names key the saved state.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in &params {
            if var.dtype() != DType::F32 {
                return Err(Error::Arg(format!(
                    "AdamW master weight {name} must be f32, got {:?}",
                    var.dtype()
                )));
            }
            states.push(ParamState {
                exp_avg: var.zeros_like()?,
                exp_avg_sq: var.zeros_like()?,
                step: 0,
            });
        }
        Ok(Self {
            params,
            states,
            config,
        })
    }

    /// The optimised variables with their names.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// How many updates each parameter has received (its bias-correction step), in parameter order.
    pub fn step_counts(&self) -> Vec<i64> {
        self.states.iter().map(|state| state.step).collect()
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// One AdamW update at learning rate `lr` using the gradients of `grads` (cast to f32):
    /// p ← p·(1 − lr·wd); m ← lerp(m, g, 1 − β1); v ← β2·v + (1 − β2)·g²;
    /// p ← p − lr/(1 − β1^k) · m / (sqrt(v)/sqrt(1 − β2^k) + eps), k the parameter's own step count.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        for ((_, var), state) in self.params.iter().zip(self.states.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let grad = grad.to_dtype(DType::F32)?;
            state.step += 1;
            let decayed = var.as_tensor().affine(1.0 - lr * weight_decay, 0.0)?;
            // torch's lerp_ with weight < 0.5 computes m + w·(g − m).
            state.exp_avg =
                (&state.exp_avg + (&grad - &state.exp_avg)?.affine(1.0 - beta1, 0.0)?)?;
            // torch's addcmul_ computes v + ((1 − β2)·g)·g.
            state.exp_avg_sq = (state.exp_avg_sq.affine(beta2, 0.0)?
                + grad.affine(1.0 - beta2, 0.0)?.mul(&grad)?)?;
            let bias_correction1 = 1.0 - beta1.powf(state.step as f64);
            let bias_correction2_sqrt = (1.0 - beta2.powf(state.step as f64)).powf(0.5);
            let step_size = lr / bias_correction1;
            let denom = state
                .exp_avg_sq
                .sqrt()?
                .affine(1.0 / bias_correction2_sqrt, eps)?;
            let update = (&state.exp_avg / denom)?.affine(step_size, 0.0)?;
            var.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    /// Writes the optimiser state (`{name}.exp_avg`, `{name}.exp_avg_sq`, `{name}.step`) to a safetensors file.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors = HashMap::new();
        for ((name, _), state) in self.params.iter().zip(&self.states) {
            tensors.insert(format!("{name}.exp_avg"), state.exp_avg.clone());
            tensors.insert(format!("{name}.exp_avg_sq"), state.exp_avg_sq.clone());
            tensors.insert(
                format!("{name}.step"),
                Tensor::new(state.step, &candle_core::Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&tensors, path.as_ref())?;
        Ok(())
    }

    /// Restores the state written by [`AdamW::save_state`] for the same parameter names and shapes (exact resume).
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::Missing {
                what: "optimizer state".into(),
                path: path.to_path_buf(),
                hint: "resume from a checkpoint folder written by this trainer".into(),
            });
        }
        let mut tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)?;
        let mut take = |key: String| {
            tensors
                .remove(&key)
                .ok_or_else(|| Error::model(path, format!("optimizer state lacks {key}")))
        };
        let mut loaded = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let exp_avg = take(format!("{name}.exp_avg"))?;
            let exp_avg_sq = take(format!("{name}.exp_avg_sq"))?;
            let step = take(format!("{name}.step"))?.to_scalar::<i64>()?;
            for (what, t) in [("exp_avg", &exp_avg), ("exp_avg_sq", &exp_avg_sq)] {
                if t.dims() != var.dims() || t.dtype() != DType::F32 {
                    return Err(Error::model(
                        path,
                        format!(
                            "{name}.{what} is {:?} {:?}, the parameter is f32 {:?}",
                            t.dtype(),
                            t.dims(),
                            var.dims()
                        ),
                    ));
                }
            }
            loaded.push(ParamState {
                exp_avg: exp_avg.to_device(var.device())?,
                exp_avg_sq: exp_avg_sq.to_device(var.device())?,
                step,
            });
        }
        if !tensors.is_empty() {
            let mut stray: Vec<&String> = tensors.keys().collect();
            stray.sort();
            return Err(Error::model(
                path,
                format!("optimizer state has entries for unknown parameters: {stray:?}"),
            ));
        }
        self.states = loaded;
        Ok(())
    }
}

/// Sum of squares (in f64) of each gradient of `vars` present in `grads`.
fn grad_sums_of_squares(grads: &GradStore, vars: &[Var]) -> Result<Vec<f64>> {
    let mut sums = Vec::with_capacity(vars.len());
    for var in vars {
        if let Some(grad) = grads.get(var.as_tensor()) {
            // rows first: candle's GPU reductions give each output element one thread block, so one sum over
            // a whole tensor would run on a single multiprocessor (1.5 s per step for the 1.6B student on an
            // H200)
            let n = grad.elem_count();
            let cols = (1..=n.min(4096)).rev().find(|c| n % c == 0).unwrap_or(1);
            sums.push(
                grad.to_dtype(DType::F64)?
                    .reshape((n / cols, cols))?
                    .sqr()?
                    .sum(1)?
                    .sum_all()?
                    .reshape(1)?,
            );
        }
    }
    if sums.is_empty() {
        return Ok(Vec::new());
    }
    // one read-back for all of them: on a GPU each read-back waits for the device
    Ok(Tensor::cat(&sums, 0)?.to_vec1::<f64>()?)
}

/// Total L2 norm over the gradients of `vars` present in `grads`, rounded like torch: the f32 norm of the f32
/// per-tensor norms (each accumulated in double).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let total_sq: f64 = grad_sums_of_squares(grads, vars)?
        .into_iter()
        .map(|sum_sq| (sum_sq.sqrt() as f32 as f64).powi(2))
        .sum();
    Ok(total_sq.sqrt() as f32 as f64)
}

/// Whether every gradient of `vars` is finite (no NaN/Inf), so that a bad step can be skipped and counted.
pub fn grads_are_finite(grads: &GradStore, vars: &[Var]) -> Result<bool> {
    // Squares of f32 values cannot overflow in f64, so the sum is finite exactly when every entry is.
    Ok(grad_sums_of_squares(grads, vars)?
        .into_iter()
        .sum::<f64>()
        .is_finite())
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales every gradient of `vars` in place by
/// max_norm/(total + 1e-6) when that is below 1, and returns the pre-clip total norm. A non-finite total leaves
/// the gradients untouched (the caller skips the step).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let total = grad_norm(grads, vars)?;
    // torch does this in f32 as `reciprocal(total + 1e-6) * max_norm`.
    let coef = (1.0 / (total as f32 + 1e-6)) * max_norm as f32;
    if total.is_finite() && coef < 1.0 {
        for var in vars {
            if let Some(grad) = grads.get(var.as_tensor()) {
                let clipped = grad.affine(coef as f64, 0.0)?;
                grads.insert(var.as_tensor(), clipped);
            }
        }
    }
    Ok(total)
}

/// The learning-rate schedules of `diffusers.optimization.get_scheduler` (piecewise_constant not supported),
/// under diffusers' names (`--lr_scheduler`, `train_config.json`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
}

impl LrScheduleKind {
    /// Every schedule, in diffusers' order.
    pub const ALL: [LrScheduleKind; 6] = [
        LrScheduleKind::Constant,
        LrScheduleKind::ConstantWithWarmup,
        LrScheduleKind::Linear,
        LrScheduleKind::Cosine,
        LrScheduleKind::CosineWithRestarts,
        LrScheduleKind::Polynomial,
    ];

    /// The diffusers name of this schedule (`--lr_scheduler`).
    pub fn name(self) -> &'static str {
        match self {
            LrScheduleKind::Constant => "constant",
            LrScheduleKind::ConstantWithWarmup => "constant_with_warmup",
            LrScheduleKind::Linear => "linear",
            LrScheduleKind::Cosine => "cosine",
            LrScheduleKind::CosineWithRestarts => "cosine_with_restarts",
            LrScheduleKind::Polynomial => "polynomial",
        }
    }
}

impl FromStr for LrScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::ALL.iter().map(|kind| kind.name()).collect();
                Error::Arg(format!(
                    "unknown lr scheduler {s:?}; valid: {}",
                    valid.join(", ")
                ))
            })
    }
}

/// A learning-rate schedule: `lr_at(step)` is the lr diffusers' scheduler gives after `step` scheduler steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: LrScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Hard restarts of cosine_with_restarts (`--lr_num_cycles`); plain cosine always uses 0.5 as in diffusers.
    pub num_cycles: u64,
    /// Exponent of polynomial (`--lr_power`).
    pub power: f64,
    /// Final lr of polynomial (diffusers' fixed 1e-7).
    pub lr_end: f64,
}

impl LrSchedule {
    /// A schedule with diffusers' `lr_end` = 1e-7; checks what diffusers checks (polynomial: base_lr > lr_end)
    /// plus a decay phase for polynomial (diffusers divides by total − warmup).
    pub fn new(
        kind: LrScheduleKind,
        base_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
        num_cycles: u64,
        power: f64,
    ) -> Result<Self> {
        let schedule = Self {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
            num_cycles,
            power,
            lr_end: 1e-7,
        };
        if kind == LrScheduleKind::Polynomial {
            if base_lr <= schedule.lr_end {
                return Err(Error::Arg(format!(
                    "polynomial lr schedule: lr_end ({}) must be smaller than the initial lr ({base_lr})",
                    schedule.lr_end
                )));
            }
            if total_steps <= warmup_steps {
                return Err(Error::Arg(format!(
                    "polynomial lr schedule needs more training steps ({total_steps}) than warm-up steps ({warmup_steps})"
                )));
            }
        }
        Ok(schedule)
    }

    /// The learning rate after `step` scheduler steps: base_lr × the diffusers lr_lambda(step).
    pub fn lr_at(&self, step: u64) -> f64 {
        let warmup = self.warmup_steps;
        let total = self.total_steps;
        let warmup_factor = step as f64 / warmup.max(1) as f64;
        let progress = (step as f64 - warmup as f64) / (total.saturating_sub(warmup)).max(1) as f64;
        let factor = match self.kind {
            LrScheduleKind::Constant => 1.0,
            LrScheduleKind::ConstantWithWarmup if step < warmup => warmup_factor,
            LrScheduleKind::ConstantWithWarmup => 1.0,
            _ if step < warmup => warmup_factor,
            LrScheduleKind::Linear => {
                let remaining =
                    (total as f64 - step as f64) / total.saturating_sub(warmup).max(1) as f64;
                remaining.max(0.0)
            }
            LrScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
            LrScheduleKind::CosineWithRestarts if progress >= 1.0 => 0.0,
            LrScheduleKind::CosineWithRestarts => {
                let phase = (self.num_cycles as f64 * progress) % 1.0;
                (0.5 * (1.0 + (std::f64::consts::PI * phase).cos())).max(0.0)
            }
            LrScheduleKind::Polynomial if step > total => self.lr_end / self.base_lr,
            LrScheduleKind::Polynomial => {
                let lr_range = self.base_lr - self.lr_end;
                let decay_steps = (total - warmup) as f64;
                let pct_remaining = 1.0 - (step - warmup) as f64 / decay_steps;
                (lr_range * pct_remaining.powf(self.power) + self.lr_end) / self.base_lr
            }
        };
        self.base_lr * factor
    }
}
