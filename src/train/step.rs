//! One phase of SANA-Sprint distillation as pure maths (docs/ALGORITHM.md §5.5–§5.8, recommended column of ALGORITHM.md §9): the
//! generator (student) loss and the discriminator-head loss of one batch, with every random draw passed in.
//!
//! The trainer draws [`GeneratorDraws`] / [`DiscriminatorDraws`] from its seeded generator (order documented
//! on [`GeneratorDraws::sample`]); the step-parity test injects the draws of the PyTorch statement of the
//! reference maths instead. All time and loss arithmetic is f32 (ALGORITHM.md §9 #10); models may compute in bf16.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::models::discriminator::{self, DiscHeads, Mode};
use crate::models::sana::TextContext;
use crate::models::student::ComputeModels;
use crate::models::trigflow::SanaTrigFlow;
use crate::nn::checkpoint::Recompute;
use crate::nn::dual::Dual;
use crate::profile;
use crate::rng::SeededRng;
use crate::train::loss::{self, TimestepSampler, TANGENT_NORM_CONST};
use crate::{Error, Result};

/// `--largest_timestep` default: the reference's literal 1.5708, slightly above π/2 (kept as given, docs/ALGORITHM.md §7; diffusers `SanaSprintPipeline.__call__` + `SCMScheduler.step`).
#[allow(clippy::approx_constant)]
pub const LARGEST_TIMESTEP: f64 = 1.5708;

/// The step's hyper-parameters (flag names of the reference script).
#[derive(Debug, Clone, PartialEq)]
pub struct StepSettings {
    pub sigma_data: f64,
    pub scm_lambda: f64,
    pub adv_lambda: f64,
    pub tangent_warmup_steps: u64,
    pub guidance_embeds_scale: f64,
    pub student_sampler: TimestepSampler,
    pub disc_sampler: TimestepSampler,
    /// `--scm_cfg_scale`: the CFG scales the teacher velocity is drawn from, uniformly per sample.
    pub scm_cfg_scale: Vec<f64>,
    pub train_largest_timestep: bool,
    pub largest_timestep: f64,
    pub largest_timestep_prob: f64,
    pub misaligned_pairs_d: bool,
}

impl Default for StepSettings {
    fn default() -> Self {
        Self {
            sigma_data: 0.5,
            scm_lambda: 1.0,
            adv_lambda: 0.5,
            tangent_warmup_steps: 4000,
            guidance_embeds_scale: 0.1,
            student_sampler: TimestepSampler::STUDENT,
            disc_sampler: TimestepSampler::DISCRIMINATOR,
            scm_cfg_scale: vec![4.0, 4.5, 5.0],
            train_largest_timestep: false,
            largest_timestep: LARGEST_TIMESTEP,
            largest_timestep_prob: 0.5,
            misaligned_pairs_d: false,
        }
    }
}

/// One batch on the device: `x0` (B, C, H, W) f32 = latent·scaling·σd; prompt embeddings (B, L, D) and masks
/// (B, L) for the prompts and the unconditional prompt.
#[derive(Debug, Clone)]
pub struct Batch {
    pub x0: Tensor,
    pub prompt_embeds: Tensor,
    pub prompt_mask: Tensor,
    pub neg_embeds: Tensor,
    pub neg_mask: Tensor,
}

impl Batch {
    pub fn len(&self) -> Result<usize> {
        Ok(self.x0.dim(0)?)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// The extra draws of `--train_largest_timestep`.
#[derive(Debug, Clone)]
pub struct LargestTimestepDraws {
    /// Standard normals for a fresh student time t' (generator phase only).
    pub t_normal: Option<Tensor>,
    /// U[0, 1) per sample: the sample takes `largest_timestep` where it is below `largest_timestep_prob`.
    pub uniform: Tensor,
    /// Standard-normal latent noise for the re-noised sample.
    pub noise: Tensor,
}

/// Random inputs of a generator step (all f32; latent-shaped ones (B, C, H, W), the rest (B,)).
#[derive(Debug, Clone)]
pub struct GeneratorDraws {
    pub noise: Tensor,
    pub t_normal: Tensor,
    /// The CFG scale chosen for each sample.
    pub cfg: Tensor,
    pub largest: Option<LargestTimestepDraws>,
    pub t_d_normal: Tensor,
    pub noise_d: Tensor,
}

/// Random inputs of a discriminator step.
#[derive(Debug, Clone)]
pub struct DiscriminatorDraws {
    pub noise: Tensor,
    pub t_normal: Tensor,
    pub cfg: Tensor,
    pub largest: Option<LargestTimestepDraws>,
    pub t_d_normal: Tensor,
    pub noise_fake: Tensor,
    pub noise_real: Tensor,
    /// Time normals and noise of the misaligned pairs (only with `--misaligned_pairs_D` and B > 1).
    pub shift: Option<(Tensor, Tensor)>,
}

/// Host-side draws turned into device tensors.
struct Drawer<'a> {
    rng: &'a mut SeededRng,
    device: &'a Device,
}

impl Drawer<'_> {
    fn normal(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.rng.normal(n), shape, self.device)?)
    }

    fn uniform(&mut self, n: usize) -> Result<Tensor> {
        let u: Vec<f32> = (0..n).map(|_| self.rng.unit() as f32).collect();
        Ok(Tensor::from_vec(u, n, self.device)?)
    }

    fn cfg(&mut self, n: usize, scales: &[f64]) -> Result<Tensor> {
        if scales.is_empty() {
            return Err(Error::Arg(
                "--scm_cfg_scale needs at least one value".into(),
            ));
        }
        let w: Vec<f32> = (0..n)
            .map(|_| scales[(self.rng.next_u64() % scales.len() as u64) as usize] as f32)
            .collect();
        Ok(Tensor::from_vec(w, n, self.device)?)
    }
}

impl Drawer<'_> {
    /// The draws every batch starts with: latent noise, student time normals, CFG scales; then, with
    /// `--train_largest_timestep`, [a fresh time (generator only)], the uniforms and the re-noising latent.
    fn batch_start(
        &mut self,
        latent_shape: &[usize],
        settings: &StepSettings,
        fresh_time: bool,
    ) -> Result<BatchStart> {
        let b = latent_shape[0];
        let noise = self.normal(latent_shape)?;
        let t_normal = self.normal(&[b])?;
        let cfg = self.cfg(b, &settings.scm_cfg_scale)?;
        let largest = if settings.train_largest_timestep {
            Some(LargestTimestepDraws {
                t_normal: fresh_time.then(|| self.normal(&[b])).transpose()?,
                uniform: self.uniform(b)?,
                noise: self.normal(latent_shape)?,
            })
        } else {
            None
        };
        Ok((noise, t_normal, cfg, largest))
    }
}

impl GeneratorDraws {
    /// Draws in this order: noise, t, cfg, [t', uniform, noise'] (largest timestep), t_D, noise_D.
    pub fn sample(
        rng: &mut SeededRng,
        latent_shape: &[usize],
        settings: &StepSettings,
        device: &Device,
    ) -> Result<Self> {
        let b = latent_shape[0];
        let mut d = Drawer { rng, device };
        let (noise, t_normal, cfg, largest) = d.batch_start(latent_shape, settings, true)?;
        Ok(Self {
            noise,
            t_normal,
            cfg,
            largest,
            t_d_normal: d.normal(&[b])?,
            noise_d: d.normal(latent_shape)?,
        })
    }
}

impl DiscriminatorDraws {
    /// Draws in this order: noise, t, cfg, [uniform, noise] (largest timestep), t_D, noise_fake, noise_real,
    /// [t_shift, noise_shift] (misaligned pairs, B > 1).
    pub fn sample(
        rng: &mut SeededRng,
        latent_shape: &[usize],
        settings: &StepSettings,
        device: &Device,
    ) -> Result<Self> {
        let b = latent_shape[0];
        let mut d = Drawer { rng, device };
        let (noise, t_normal, cfg, largest) = d.batch_start(latent_shape, settings, false)?;
        let t_d_normal = d.normal(&[b])?;
        let noise_fake = d.normal(latent_shape)?;
        let noise_real = d.normal(latent_shape)?;
        let shift = if settings.misaligned_pairs_d && b > 1 {
            Some((d.normal(&[b])?, d.normal(latent_shape)?))
        } else {
            None
        };
        Ok(Self {
            noise,
            t_normal,
            cfg,
            largest,
            t_d_normal,
            noise_fake,
            noise_real,
            shift,
        })
    }
}

impl LargestTimestepDraws {
    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            t_normal: self
                .t_normal
                .as_ref()
                .map(|t| t.narrow(0, start, len))
                .transpose()?,
            uniform: self.uniform.narrow(0, start, len)?,
            noise: self.noise.narrow(0, start, len)?,
        })
    }
}

type BatchStart = (Tensor, Tensor, Tensor, Option<LargestTimestepDraws>);

/// Samples `start..start + len` of the draws every batch starts with (see [`Drawer::batch_start`]).
fn narrow_batch_start(
    (noise, t_normal, cfg, largest): (&Tensor, &Tensor, &Tensor, &Option<LargestTimestepDraws>),
    start: usize,
    len: usize,
) -> Result<BatchStart> {
    Ok((
        noise.narrow(0, start, len)?,
        t_normal.narrow(0, start, len)?,
        cfg.narrow(0, start, len)?,
        largest.as_ref().map(|l| l.narrow(start, len)).transpose()?,
    ))
}

impl GeneratorDraws {
    /// Samples `start..start + len` of every draw: a data-parallel rank's share of the draws of its global
    /// batch (drawn whole, so that W ranks draw exactly what one process with the global batch draws).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let n = |t: &Tensor| t.narrow(0, start, len);
        let (noise, t_normal, cfg, largest) = narrow_batch_start(
            (&self.noise, &self.t_normal, &self.cfg, &self.largest),
            start,
            len,
        )?;
        Ok(Self {
            noise,
            t_normal,
            cfg,
            largest,
            t_d_normal: n(&self.t_d_normal)?,
            noise_d: n(&self.noise_d)?,
        })
    }
}

impl DiscriminatorDraws {
    /// As [`GeneratorDraws::narrow`]; the misaligned pairs roll within the rank's share (as under DDP in the
    /// reference), so a share of one sample has none.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let n = |t: &Tensor| t.narrow(0, start, len);
        let (noise, t_normal, cfg, largest) = narrow_batch_start(
            (&self.noise, &self.t_normal, &self.cfg, &self.largest),
            start,
            len,
        )?;
        Ok(Self {
            noise,
            t_normal,
            cfg,
            largest,
            t_d_normal: n(&self.t_d_normal)?,
            noise_fake: n(&self.noise_fake)?,
            noise_real: n(&self.noise_real)?,
            shift: match &self.shift {
                Some((t, noise)) if len > 1 => Some((n(t)?, n(noise)?)),
                _ => None,
            },
        })
    }
}

/// The networks a step uses. `student` reads the trainable variables (its passes build a graph);
/// `student_frozen` computes with the same values without a graph (JVP and no-grad passes).
#[derive(Clone, Copy)]
pub struct Models<'a> {
    pub teacher: &'a SanaTrigFlow,
    pub student: &'a SanaTrigFlow,
    pub student_frozen: &'a SanaTrigFlow,
    pub heads: &'a DiscHeads,
    /// Recompute student blocks in backward instead of keeping their activations.
    pub gradient_checkpointing: bool,
    /// The teacher's text context of the batch's negative embeddings, if precomputed: it is the same for every
    /// step of a run.
    pub teacher_negative: Option<&'a TextContext>,
}

impl<'a> Models<'a> {
    /// The teacher, the student's compute models and the heads; no gradient checkpointing, and the teacher's
    /// negative context computed per step.
    pub fn new(
        teacher: &'a SanaTrigFlow,
        student: &'a ComputeModels,
        heads: &'a DiscHeads,
    ) -> Self {
        Self {
            teacher,
            student: &student.tracked,
            student_frozen: &student.frozen,
            heads,
            gradient_checkpointing: false,
            teacher_negative: None,
        }
    }
}

/// The teacher's text context of the negative prompt (embeddings (B, L, D), mask (B, L)). It is the same for
/// every step of a run: the trainer computes it once and passes it as [`Models::teacher_negative`].
pub fn negative_context(
    teacher: &SanaTrigFlow,
    neg_embeds: &Tensor,
    neg_mask: &Tensor,
) -> Result<TextContext> {
    teacher.text_context(neg_embeds, Some(neg_mask))
}

/// Student outputs whose gradients still have to be pushed through recomputed blocks after `backward`.
#[derive(Default)]
pub struct PendingRecompute(Vec<(Var, Recompute)>);

impl PendingRecompute {
    /// Completes `grads` (from `loss.backward()`) with the gradients of the checkpointed student passes.
    fn finish(self, grads: &mut GradStore) -> Result<()> {
        for (leaf, recompute) in self.0 {
            if let Some(g) = grads.remove(leaf.as_tensor()) {
                recompute.backward(&g, grads)?;
            }
        }
        Ok(())
    }
}

/// Results of a generator step: the loss with its graph plus detached values for logging and tests.
pub struct GeneratorOutput {
    /// scm_lambda·L_scm + adv_lambda·L_adv (with graph).
    pub loss: Tensor,
    pub scm_loss: f64,
    pub adv_loss: f64,
    pub t: Tensor,
    pub dxt_dt: Tensor,
    pub df: Tensor,
    pub f: Tensor,
    pub logvar: Tensor,
    pub x0_pred: Tensor,
    pub logits: Tensor,
    /// Checkpointed student passes, completed by [`generator_grads`].
    pending: PendingRecompute,
}

/// Results of a discriminator step.
pub struct DiscriminatorOutput {
    /// The hinge loss (with graph into the heads).
    pub loss: Tensor,
    pub d_loss: f64,
    pub logits_fake: Tensor,
    pub logits_real: Tensor,
}

/// A per-sample (B,) tensor viewed (B, 1, 1, 1).
fn col(v: &Tensor) -> Result<Tensor> {
    Ok(v.reshape((v.elem_count(), 1, 1, 1))?)
}

/// cos t·a + sin t·b for per-sample t (B,).
fn trig_mix(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let t = col(t)?;
    Ok(a.broadcast_mul(&t.cos()?)?
        .add(&b.broadcast_mul(&t.sin()?)?)?)
}

/// cos t·x_t − sin t·σd·F: the clean latent predicted from a TrigFlow output.
fn predict_x0(t: &Tensor, x_t: &Tensor, f: &Tensor, sigma_data: f64) -> Result<Tensor> {
    trig_mix(t, x_t, &f.affine(-sigma_data, 0.0)?)
}

/// Where a per-sample uniform is below `prob`, the time becomes `value`.
fn replace_where(t: &Tensor, uniform: &Tensor, prob: f64, value: f64) -> Result<Tensor> {
    let take = uniform.lt(prob)?;
    Ok(take.where_cond(&t.ones_like()?.affine(0.0, value)?, t)?)
}

/// A student pass with graph, F (B, C, H, W) f32, over the student's shared text context; without one
/// (gradient checkpointing) the blocks' activations are dropped and a leaf stands in for F until
/// [`PendingRecompute::finish`].
fn student_pass(
    m: &Models,
    x: &Tensor,
    t: &Tensor,
    batch: &Batch,
    text: Option<&TextContext>,
    guidance: &Tensor,
    pending: &mut PendingRecompute,
) -> Result<Tensor> {
    match text {
        Some(text) => Ok(m
            .student
            .forward_ctx(
                &Dual::constant(x.clone()),
                text,
                &Dual::constant(t.clone()),
                Some(guidance),
            )?
            .primal),
        None => {
            let (f, recompute) = m.student.forward_checkpointed(
                x,
                &batch.prompt_embeds,
                t,
                Some(guidance),
                Some(&batch.prompt_mask),
            )?;
            let leaf = Var::from_tensor(&f)?;
            let f = leaf.as_tensor().clone();
            pending.0.push((leaf, recompute));
            Ok(f)
        }
    }
}

/// Phase G (docs/ALGORITHM.md §5.6): teacher CFG velocity, the student's exact JVP, the sCM loss with the logvar head, and
/// the LADD generator loss through the frozen teacher and the heads in eval mode. Only the student's
/// variables should be updated from the returned loss (the heads' gradients are discarded, ALGORITHM.md §9 #4).
pub fn generator_loss(
    m: &Models,
    batch: &Batch,
    draws: &GeneratorDraws,
    s: &StepSettings,
    global_step: u64,
) -> Result<GeneratorOutput> {
    let sd = s.sigma_data;
    let x0 = &batch.x0;
    let t = s.student_sampler.timesteps(&draws.t_normal)?;
    let x_t = trig_mix(&t, x0, &draws.noise.affine(sd, 0.0)?)?;
    let w = draws.cfg.to_dtype(DType::F32)?;
    let guidance = w.affine(s.guidance_embeds_scale, 0.0)?;
    let x_hat = x_t.affine(1.0 / sd, 0.0)?;

    // the text-side work of each model, once for every pass over the same prompts
    let teacher_text = m
        .teacher
        .text_context(&batch.prompt_embeds, Some(&batch.prompt_mask))?;
    let teacher_neg = match m.teacher_negative {
        Some(neg) if neg.batch() == x0.dim(0)? => neg.clone(),
        _ => m
            .teacher
            .text_context(&batch.neg_embeds, Some(&batch.neg_mask))?,
    };
    let student_text = if m.gradient_checkpointing {
        None
    } else {
        Some(
            m.student
                .text_context(&batch.prompt_embeds, Some(&batch.prompt_mask))?,
        )
    };
    let jvp_text = match &student_text {
        Some(text) => text.detach(),
        None => m
            .student_frozen
            .text_context(&batch.prompt_embeds, Some(&batch.prompt_mask))?,
    };
    profile::mark("text_context")?;

    // 1. teacher CFG velocity (unconditional half first)
    let f_teacher = m
        .teacher
        .forward_ctx(
            &Dual::constant(Tensor::cat(&[&x_hat, &x_hat], 0)?),
            &TextContext::cat(&[&teacher_neg, &teacher_text])?,
            &Dual::constant(Tensor::cat(&[&t, &t], 0)?),
            None,
        )?
        .primal
        .affine(sd, 0.0)?;
    let b = x0.dim(0)?;
    let (uncond, cond) = (f_teacher.narrow(0, 0, b)?, f_teacher.narrow(0, b, b)?);
    let dxt_dt = uncond.add(&cond.sub(&uncond)?.broadcast_mul(&col(&w)?)?)?;
    profile::mark("teacher_cfg")?;

    // 2–3. tangents (cos t sin t · dxt_dt/σd, cos t sin t) and the student's JVP dF
    let cos_sin = (t.cos()? * t.sin()?)?;
    let v_x = dxt_dt
        .broadcast_mul(&col(&cos_sin)?)?
        .affine(1.0 / sd, 0.0)?;
    let df = m
        .student_frozen
        .forward_ctx(
            &Dual::with_tangent(x_hat.clone(), v_x),
            &jvp_text,
            &Dual::with_tangent(t.clone(), cos_sin.clone()),
            Some(&guidance),
        )?
        .tangent_or_zeros()?;
    profile::mark("jvp")?;

    // 4. student with graph, logvar head
    let mut pending = PendingRecompute::default();
    let f = student_pass(
        m,
        &x_hat,
        &t,
        batch,
        student_text.as_ref(),
        &guidance,
        &mut pending,
    )?;
    let logvar = m.student.logvar(&t, Some(&guidance))?;
    profile::mark("student_forward")?;

    // 5–9. tangent, normalisation, weighted sCM loss
    let r = loss::tangent_warmup(global_step, s.tangent_warmup_steps);
    let f_minus = f.detach();
    let g = loss::scm_tangent(&x_t, &t, &dxt_dt, &f_minus, &df, sd, r)?;
    let g = loss::normalize_tangent(&g, TANGENT_NORM_CONST)?;
    let scm = loss::scm_loss(&f, &f_minus, &g, &logvar, &t, sd)?;
    profile::mark("scm_loss")?;

    // 10. predicted clean latent (from a fresh student pass at t' with --train_largest_timestep)
    let x0_pred = match &draws.largest {
        Some(largest) => {
            let t_normal = largest.t_normal.as_ref().ok_or_else(|| {
                Error::Arg("largest-timestep draws of a generator step need t_normal".into())
            })?;
            let t_prime = replace_where(
                &s.student_sampler.timesteps(t_normal)?,
                &largest.uniform,
                s.largest_timestep_prob,
                s.largest_timestep,
            )?;
            let x_prime = trig_mix(&t_prime, x0, &largest.noise.affine(sd, 0.0)?)?;
            let f_prime = student_pass(
                m,
                &x_prime.affine(1.0 / sd, 0.0)?,
                &t_prime,
                batch,
                student_text.as_ref(),
                &guidance,
                &mut pending,
            )?;
            predict_x0(&t_prime, &x_prime, &f_prime, sd)?
        }
        None => predict_x0(&t, &x_t, &f, sd)?,
    };
    profile::mark("student_forward")?;

    // 11. adversarial generator loss through the frozen teacher trunk and the heads (eval mode)
    let t_d = s.disc_sampler.timesteps(&draws.t_d_normal)?;
    let x_d = trig_mix(&t_d, &x0_pred, &draws.noise_d.affine(sd, 0.0)?)?;
    let logits = discriminator::logits_ctx(
        m.teacher,
        &x_d.affine(1.0 / sd, 0.0)?,
        &t_d,
        &teacher_text,
        m.heads,
        Mode::Eval,
    )?;
    let adv = loss::generator_adv_loss(&logits)?;
    profile::mark("ladd_forward")?;

    // 12. total
    let total = (scm.affine(s.scm_lambda, 0.0)? + adv.affine(s.adv_lambda, 0.0)?)?;
    Ok(GeneratorOutput {
        scm_loss: scm.to_dtype(DType::F64)?.to_scalar()?,
        adv_loss: adv.to_dtype(DType::F64)?.to_scalar()?,
        loss: total,
        t,
        dxt_dt,
        df,
        f: f_minus,
        logvar: logvar.detach(),
        x0_pred: x0_pred.detach(),
        logits: logits.detach(),
        pending,
    })
}

/// Phase D (docs/ALGORITHM.md §5.7, recommended fixes #5 and #6): the student's no-grad prediction re-noised at a
/// discriminator time, real latents at the same time, heads in train mode (one power iteration per spectral
/// convolution and forward: fake first, then real), hinge loss.
pub fn discriminator_loss(
    m: &Models,
    batch: &Batch,
    draws: &DiscriminatorDraws,
    s: &StepSettings,
) -> Result<DiscriminatorOutput> {
    let sd = s.sigma_data;
    let x0 = &batch.x0;
    let w = draws.cfg.to_dtype(DType::F32)?;
    let guidance = w.affine(s.guidance_embeds_scale, 0.0)?;
    let mut t = s.student_sampler.timesteps(&draws.t_normal)?;
    let mut x_t = trig_mix(&t, x0, &draws.noise.affine(sd, 0.0)?)?;
    if let Some(largest) = &draws.largest {
        t = replace_where(
            &t,
            &largest.uniform,
            s.largest_timestep_prob,
            s.largest_timestep,
        )?;
        x_t = trig_mix(&t, x0, &largest.noise.affine(sd, 0.0)?)?;
    }
    let student_text = m
        .student_frozen
        .text_context(&batch.prompt_embeds, Some(&batch.prompt_mask))?;
    let f = m
        .student_frozen
        .forward_ctx(
            &Dual::constant(x_t.affine(1.0 / sd, 0.0)?),
            &student_text,
            &Dual::constant(t.clone()),
            Some(&guidance),
        )?
        .primal;
    let x0_fake = predict_x0(&t, &x_t, &f, sd)?;
    profile::mark("student_forward")?;

    let t_d = s.disc_sampler.timesteps(&draws.t_d_normal)?;
    let x_fake = trig_mix(&t_d, &x0_fake, &draws.noise_fake.affine(sd, 0.0)?)?;
    let x_real = trig_mix(&t_d, x0, &draws.noise_real.affine(sd, 0.0)?)?;
    let teacher_text = m
        .teacher
        .text_context(&batch.prompt_embeds, Some(&batch.prompt_mask))?;
    let (fake, fake_t, fake_text) = match &draws.shift {
        Some((t_shift_normal, noise_shift)) => {
            let b = x0.dim(0)?;
            // sample i is paired with the image of sample i − 1
            let x0_shift = Tensor::cat(&[x0.narrow(0, b - 1, 1)?, x0.narrow(0, 0, b - 1)?], 0)?;
            let t_shift = s.disc_sampler.timesteps(t_shift_normal)?;
            let x_shift = trig_mix(&t_shift, &x0_shift, &noise_shift.affine(sd, 0.0)?)?;
            (
                Tensor::cat(&[&x_fake, &x_shift], 0)?,
                Tensor::cat(&[&t_d, &t_shift], 0)?,
                TextContext::cat(&[&teacher_text, &teacher_text])?,
            )
        }
        None => (x_fake, t_d.clone(), teacher_text.clone()),
    };
    let logits_fake = discriminator::logits_ctx(
        m.teacher,
        &fake.affine(1.0 / sd, 0.0)?,
        &fake_t,
        &fake_text,
        m.heads,
        Mode::Train,
    )?;
    let logits_real = discriminator::logits_ctx(
        m.teacher,
        &x_real.affine(1.0 / sd, 0.0)?,
        &t_d,
        &teacher_text,
        m.heads,
        Mode::Train,
    )?;
    let loss = loss::hinge_d_loss(&logits_real, &logits_fake)?;
    profile::mark("d_forward")?;
    Ok(DiscriminatorOutput {
        d_loss: loss.to_dtype(DType::F64)?.to_scalar()?,
        loss,
        logits_fake: logits_fake.detach(),
        logits_real: logits_real.detach(),
    })
}

/// `grads` reduced to the gradients of `vars` (detached); the rest are dropped.
fn keep_only(mut grads: GradStore, vars: &[Var]) -> GradStore {
    let mut kept = GradStore::default();
    for var in vars {
        if let Some(g) = grads.remove(var.as_tensor()) {
            kept.insert(var.as_tensor(), g.detach());
        }
    }
    kept
}

/// The gradients of one generator step: [`generator_loss`] times `loss_scale` (1/accumulation steps in the
/// trainer; NaN poisons the step), backward, the checkpointed student passes completed, and only the gradients
/// of `student_vars` kept (the heads' are discarded: the generator step does not update them). The output's
/// `loss` is the unscaled loss.
pub fn generator_grads(
    m: &Models,
    batch: &Batch,
    draws: &GeneratorDraws,
    s: &StepSettings,
    global_step: u64,
    student_vars: &[Var],
    loss_scale: f64,
) -> Result<(GradStore, GeneratorOutput)> {
    let mut out = generator_loss(m, batch, draws, s, global_step)?;
    profile::mark("loss_readback")?;
    let mut grads = out.loss.affine(loss_scale, 0.0)?.backward()?;
    profile::mark("backward")?;
    std::mem::take(&mut out.pending).finish(&mut grads)?;
    profile::mark("checkpoint_recompute")?;
    Ok((keep_only(grads, student_vars), out))
}

/// The gradients of one discriminator step: [`discriminator_loss`] times `loss_scale`, backward, and only the
/// gradients of `head_vars` kept. The output's `loss` is the unscaled loss.
pub fn discriminator_grads(
    m: &Models,
    batch: &Batch,
    draws: &DiscriminatorDraws,
    s: &StepSettings,
    head_vars: &[Var],
    loss_scale: f64,
) -> Result<(GradStore, DiscriminatorOutput)> {
    let out = discriminator_loss(m, batch, draws, s)?;
    profile::mark("loss_readback")?;
    let grads = out.loss.affine(loss_scale, 0.0)?.backward()?;
    profile::mark("backward")?;
    Ok((keep_only(grads, head_vars), out))
}
