//! sCM and LADD loss arithmetic, timestep sampling (docs/ALGORITHM.md §5.4–§5.7).
//!
//! Pure tensor functions. Training calls them with f32 tensors (docs/ALGORITHM.md §8: time and loss maths in f32); they
//! work in whatever float dtype they are given (tests use f64 for finite differences). Latent-shaped
//! arguments are (B, C, H, W) (any rank ≥ 1 with the batch first); per-sample values t and logvar have B
//! elements and are broadcast over the rest.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The constant c of the tangent normalisation g / (‖g‖₂ + c) (docs/ALGORITHM.md §5.6 step 7).
pub const TANGENT_NORM_CONST: f64 = 0.1;

/// The literal 0.5 of the timestep sampler, kept rather than σd (docs/ALGORITHM.md §9 #13).
const SAMPLER_SCALE: f64 = 0.5;

/// `compute_density_for_timestep_sampling_scm` (docs/ALGORITHM.md §5.4): TrigFlow time t = atan(exp(std·n + mean) / 0.5)
/// in (0, π/2) of standard normal draws n.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimestepSampler {
    pub mean: f64,
    pub std: f64,
}

impl TimestepSampler {
    /// Student / sCM times (`--logit_mean 0.2 --logit_std 1.6`): median 1.1822 rad.
    pub const STUDENT: Self = Self {
        mean: 0.2,
        std: 1.6,
    };
    /// Discriminator times (`--logit_mean_discriminator -0.6 --logit_std_discriminator 1.0`): median 0.8319 rad.
    pub const DISCRIMINATOR: Self = Self {
        mean: -0.6,
        std: 1.0,
    };

    /// t (f32, shape and device of `normal_draws`) for the given standard-normal draws. Computed in f64 on the
    /// host (candle has no atan; these are B scalars) and rounded to f32.
    pub fn timesteps(&self, normal_draws: &Tensor) -> Result<Tensor> {
        let draws = normal_draws
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let t: Vec<f64> = draws
            .iter()
            .map(|n| ((n * self.std + self.mean).exp() / SAMPLER_SCALE).atan())
            .collect();
        Ok(
            Tensor::from_vec(t, normal_draws.shape(), normal_draws.device())?
                .to_dtype(DType::F32)?,
        )
    }
}

/// Tangent warm-up factor r = min(1, global_step / warmup_steps) (docs/ALGORITHM.md §5.6 step 5); global_step counts G and
/// D steps together (ALGORITHM.md §5.9). No warm-up (r = 1) when `warmup_steps` is 0.
pub fn tangent_warmup(global_step: u64, warmup_steps: u64) -> f64 {
    if warmup_steps == 0 {
        1.0
    } else {
        (global_step as f64 / warmup_steps as f64).min(1.0)
    }
}

/// A per-sample tensor (B elements) viewed (B, 1, …, 1) to broadcast against `like`.
fn per_sample(values: &Tensor, like: &Tensor) -> Result<Tensor> {
    let b = like.dim(0)?;
    if values.elem_count() != b {
        return Err(Error::Arg(format!(
            "per-sample tensor of shape {:?} has {} elements, expected one per sample ({b})",
            values.dims(),
            values.elem_count()
        )));
    }
    let mut shape = vec![1; like.rank()];
    shape[0] = b;
    Ok(values.reshape(shape)?)
}

/// The sCM tangent before normalisation (docs/ALGORITHM.md §5.6 step 6):
/// g = −cos²t · (σd·F⁻ − dx_t/dt) − r · (cos t · sin t · x_t + σd · dF).
///
/// `x_t` is the noisy latent in σd units (un-divided), `dxt_dt` the teacher's CFG velocity σd·F_T,
/// `f_minus` = stopgrad(F), `df` the student's JVP along (cos t sin t · dxt_dt/σd, cos t sin t), `r` the
/// warm-up factor. The result carries no graph.
pub fn scm_tangent(
    x_t: &Tensor,
    t: &Tensor,
    dxt_dt: &Tensor,
    f_minus: &Tensor,
    df: &Tensor,
    sigma_data: f64,
    r: f64,
) -> Result<Tensor> {
    let t = per_sample(&t.detach(), x_t)?;
    let (cos, sin) = (t.cos()?, t.sin()?);
    let consistency = f_minus
        .detach()
        .affine(sigma_data, 0.0)?
        .sub(&dxt_dt.detach())?
        .broadcast_mul(&cos.sqr()?)?;
    let tangent = x_t
        .detach()
        .broadcast_mul(&(&cos * &sin)?)?
        .add(&df.detach().affine(sigma_data, 0.0)?)?;
    Ok((consistency.neg()? - tangent.affine(r, 0.0)?)?)
}

/// Tangent normalisation g / (‖g‖₂ + c) with the L2 norm per sample over all non-batch axes (docs/ALGORITHM.md §5.6 step 7;
/// c = [`TANGENT_NORM_CONST`] in the reference).
pub fn normalize_tangent(g: &Tensor, c: f64) -> Result<Tensor> {
    let norm = g.flatten_from(1)?.sqr()?.sum(1)?.sqrt()?;
    Ok(g.broadcast_div(&per_sample(&(norm + c)?, g)?)?)
}

/// The sCM loss (docs/ALGORITHM.md §5.6 steps 8–9), a scalar:
/// mean over all B·C·H·W elements of e^(−logvar)/(σd·tan t) · (F − F⁻ − g)² + logvar.
///
/// `f` is the student output with its graph, `f_minus` the same values (stop-gradient is applied here, as
/// is to `g`), `logvar` (B elements) the logvar head output with its graph. Numerically F − F⁻ = 0, so
/// ∂L/∂F = −2·e^(−logvar)·g / (σd·tan t · B·C·H·W) and
/// ∂L/∂logvar_b ∝ 1 − e^(−logvar_b)·g² / (σd·tan t).
pub fn scm_loss(
    f: &Tensor,
    f_minus: &Tensor,
    g: &Tensor,
    logvar: &Tensor,
    t: &Tensor,
    sigma_data: f64,
) -> Result<Tensor> {
    let t = per_sample(&t.detach(), f)?;
    // 1/(σd·tan t) = cos t / (σd·sin t)
    let inv_sigma = t.cos()?.div(&t.sin()?.affine(sigma_data, 0.0)?)?;
    let logvar = per_sample(logvar, f)?;
    let weight = inv_sigma.mul(&logvar.neg()?.exp()?)?;
    let residual = f.sub(&f_minus.detach())?.sub(&g.detach())?;
    let loss = residual
        .sqr()?
        .broadcast_mul(&weight)?
        .broadcast_add(&logvar)?;
    Ok(loss.mean_all()?)
}

/// Hinge loss of the discriminator heads (docs/ALGORITHM.md §5.7 step 7), a scalar:
/// 0.5 · (mean relu(1 − logits_real) + mean relu(1 + logits_fake)).
pub fn hinge_d_loss(logits_real: &Tensor, logits_fake: &Tensor) -> Result<Tensor> {
    let real = logits_real.affine(-1.0, 1.0)?.relu()?.mean_all()?;
    let fake = logits_fake.affine(1.0, 1.0)?.relu()?.mean_all()?;
    Ok(((real + fake)? * 0.5)?)
}

/// Adversarial generator loss (docs/ALGORITHM.md §5.6 step 11), a scalar: −mean(logits) of the student's noised prediction.
pub fn generator_adv_loss(logits_fake: &Tensor) -> Result<Tensor> {
    Ok(logits_fake.mean_all()?.neg()?)
}
