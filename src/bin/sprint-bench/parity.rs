//! `sprint-bench parity`: the tiny models of `datasets/tiny-sana-sprint` run on the device under test and on
//! the CPU in the same process, in f32 and bf16, and their outputs are compared.
//!
//! Each check runs the same code with the same weights, inputs and random draws on both devices in the same
//! dtype and compares the results by relative L2 error ‖device − cpu‖ / ‖cpu‖ (global over all gradients of a
//! step): f32 within 1e-4, bf16 within 3e-2. For bf16 the distance of the CPU bf16 result from the CPU f32
//! result is printed too (information only: how much bf16 itself moves the result). On `--device cpu` the
//! checks compare the CPU with itself and pass trivially; the bf16-vs-f32 figures are still meaningful.
//!
//! In bf16 the tolerance is the larger of 3e-2 and the CPU's own bf16-vs-f32 distance for that output: two bf16
//! implementations that round in different places can differ by as much as bf16 itself moves the result (the
//! DC-AE decoder, where bf16 alone moves the image by ~5%, differed between an H200 and the CPU by 4.4%).
//!
//! One more exception: the discriminator heads' gradients in bf16 get 0.25. BatchNormLocal over a few tokens
//! cancels most of the gradient reaching the convolutions in front of it, so the rounding of the bf16 teacher
//! features is amplified about 40×: bf16 alone moves these gradients by ~15% on the CPU (`cpu bf16 vs cpu
//! f32`), and two bf16 implementations that round in different places differ by a fraction of that.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use sana_sprint::models::dcae::AutoencoderDc;
use sana_sprint::models::discriminator::{DiscHeads, DEFAULT_HEAD_BLOCK_IDS};
use sana_sprint::models::gemma2::Gemma2Encoder;
use sana_sprint::models::sana::{SanaConfig, SanaTransformer2DModel};
use sana_sprint::models::student::{GuidanceInit, Student};
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::nn::dual::Dual;
use sana_sprint::rng::SeededRng;
use sana_sprint::train::step::{
    self, Batch, DiscriminatorDraws, GeneratorDraws, Models, StepSettings,
};

/// Relative L2 tolerance per dtype.
pub fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-4
    } else {
        3e-2
    }
}

/// The tolerance of one output (see the module notes for the head gradients in bf16).
fn tolerance_of(part: &str, dtype: DType) -> f64 {
    if dtype != DType::F32 && part == HEAD_GRADS {
        0.25
    } else {
        tolerance(dtype)
    }
}

const HEAD_GRADS: &str = "head grads";

/// The outcome of one comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub dtype: String,
    /// ‖device − cpu‖ / ‖cpu‖ (same dtype).
    pub rel: f64,
    pub tol: f64,
    pub pass: bool,
    /// bf16 only: ‖cpu bf16 − cpu f32‖ / ‖cpu f32‖.
    pub bf16_vs_f32: Option<f64>,
}

/// Named result tensors of one check.
type Outputs = Vec<(&'static str, Tensor)>;

/// ‖a − b‖ / ‖b‖ in f64 on the CPU, over several tensors at once (‖b‖ = 0: absolute).
fn rel_l2(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (a, b) in a.iter().zip(b) {
        let a = a
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?;
        let b = b
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?;
        anyhow::ensure!(
            a.dims() == b.dims(),
            "shape {:?} vs {:?}",
            a.dims(),
            b.dims()
        );
        diff += (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        norm += b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    let (diff, norm) = (diff.sqrt(), norm.sqrt());
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

fn normal(rng: &mut SeededRng, shape: &[usize], scale: f64) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rng.normal(n), shape, &Device::Cpu)?.affine(scale, 0.0)?)
}

/// Host inputs shared by the transformer and step checks: B = 2, 32×8×8 latents, 12 caption tokens of width
/// 64 (the tiny caption channels), the second prompt padded after 7 tokens.
struct Inputs {
    x: Tensor,
    vx: Tensor,
    t: Tensor,
    vt: Tensor,
    y: Tensor,
    mask: Tensor,
    guidance: Tensor,
}

fn inputs() -> Result<Inputs> {
    let mut rng = SeededRng::new(42);
    let t = Tensor::new(&[0.4f32, 1.2], &Device::Cpu)?;
    let mut mask = vec![1f32; 24];
    mask[12 + 7..].iter_mut().for_each(|m| *m = 0.0);
    Ok(Inputs {
        x: normal(&mut rng, &[2, 32, 8, 8], 1.0)?,
        vx: normal(&mut rng, &[2, 32, 8, 8], 0.5)?,
        vt: (t.cos()? * t.sin()?)?,
        t,
        y: normal(&mut rng, &[2, 12, 64], 1.0)?,
        mask: Tensor::from_vec(mask, (2, 12), &Device::Cpu)?,
        guidance: Tensor::new(&[0.4f32, 0.5], &Device::Cpu)?,
    })
}

fn dev(t: &Tensor, device: &Device) -> Result<Tensor> {
    Ok(t.to_device(device)?)
}

/// Teacher F = SanaTrigFlow(x, y, t) (no tangents).
fn teacher_forward(tiny: &Path, dtype: DType, device: &Device) -> Result<Outputs> {
    let i = inputs()?;
    let teacher = SanaTransformer2DModel::load(&tiny.join("transformer"), dtype, device)
        .map(SanaTrigFlow::new)?;
    let f = teacher.forward(
        &Dual::constant(dev(&i.x, device)?),
        &dev(&i.y, device)?,
        &Dual::constant(dev(&i.t, device)?),
        None,
        Some(&dev(&i.mask, device)?),
    )?;
    Ok(vec![("F", f.primal)])
}

/// Student F and its JVP dF along (vx, vt), with the guidance input, as the G step computes them.
fn student_jvp(tiny: &Path, dtype: DType, device: &Device) -> Result<Outputs> {
    let i = inputs()?;
    let student = Student::from_teacher(
        &tiny.join("transformer"),
        GuidanceInit::Learnable,
        0,
        device,
    )?;
    let out = student.compute_models(dtype)?.frozen.forward(
        &Dual::with_tangent(dev(&i.x, device)?, dev(&i.vx, device)?),
        &dev(&i.y, device)?,
        &Dual::with_tangent(dev(&i.t, device)?, dev(&i.vt, device)?),
        Some(&dev(&i.guidance, device)?),
        Some(&dev(&i.mask, device)?),
    )?;
    Ok(vec![
        ("F", out.primal.clone()),
        ("dF", out.tangent_or_zeros()?),
    ])
}

/// DC-AE encode of a 64×64 image and decode of a fixed latent.
fn dcae(tiny: &Path, dtype: DType, device: &Device) -> Result<Outputs> {
    let vae = AutoencoderDc::load(&tiny.join("vae"), dtype, device)?;
    let mut rng = SeededRng::new(7);
    let image = Tensor::from_vec(rng.uniform(3 * 64 * 64, 1.0), (1, 3, 64, 64), &Device::Cpu)?;
    let latent = normal(&mut rng, &[1, 32, 2, 2], 1.0)?;
    let encoded = vae.encode(&dev(&image, device)?.to_dtype(dtype)?)?;
    let decoded = vae.decode(&dev(&latent, device)?.to_dtype(dtype)?)?;
    Ok(vec![("encode", encoded), ("decode", decoded)])
}

/// Gemma-2 hidden states of 2 × 24 tokens, the second prompt padded after 15 tokens.
fn gemma(tiny: &Path, dtype: DType, device: &Device) -> Result<Outputs> {
    let encoder = Gemma2Encoder::load(&tiny.join("text_encoder"), dtype, device)?;
    let vocab = encoder.config().vocab_size as u64;
    let mut rng = SeededRng::new(9);
    let ids: Vec<u32> = (0..48)
        .map(|i| {
            if i % 24 == 0 {
                2
            } else {
                (5 + rng.next_u64() % (vocab - 5)) as u32
            }
        })
        .collect();
    let mut mask = vec![1u32; 48];
    mask[24 + 15..].iter_mut().for_each(|m| *m = 0);
    let out = encoder.forward(
        &Tensor::from_vec(ids, (2, 24), device)?,
        &Tensor::from_vec(mask, (2, 24), device)?,
    )?;
    Ok(vec![("hidden", out)])
}

/// Teacher, student (f32 master variables) and heads of the tiny pipeline on `device`.
struct StepModels {
    teacher: SanaTrigFlow,
    student: Student,
    heads: DiscHeads,
}

fn step_models(tiny: &Path, dtype: DType, device: &Device) -> Result<StepModels> {
    let dir = tiny.join("transformer");
    let cfg = SanaConfig::from_folder(&dir)?;
    Ok(StepModels {
        teacher: SanaTransformer2DModel::load(&dir, dtype, device).map(SanaTrigFlow::new)?,
        student: Student::from_teacher(&dir, GuidanceInit::Learnable, 0, device)?,
        heads: DiscHeads::new(&DEFAULT_HEAD_BLOCK_IDS, cfg.inner_dim(), 1, device)?,
    })
}

fn step_settings() -> StepSettings {
    StepSettings {
        train_largest_timestep: true,
        misaligned_pairs_d: true,
        ..StepSettings::default()
    }
}

/// A batch of 2 (the second prompt padded after 7 tokens; negative prompt: BOS only).
fn batch(device: &Device) -> Result<Batch> {
    let i = inputs()?;
    let mut rng = SeededRng::new(11);
    let mut neg_mask = vec![0f32; 24];
    neg_mask[0] = 1.0;
    neg_mask[12] = 1.0;
    Ok(Batch {
        x0: dev(&i.x.affine(0.5, 0.0)?, device)?,
        prompt_embeds: dev(&i.y, device)?,
        prompt_mask: dev(&i.mask, device)?,
        neg_embeds: dev(&normal(&mut rng, &[2, 12, 64], 1.0)?, device)?,
        neg_mask: Tensor::from_vec(neg_mask, (2, 12), device)?,
    })
}

/// Gradients of `vars` in order (zeros where none arrived).
fn grads_of(
    grads: &candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| {
            Ok(match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            })
        })
        .collect()
}

/// One generator step (draws made on the host, so both devices see the same): losses, F, dF, the head logits
/// and every student gradient.
fn generator_step(tiny: &Path, dtype: DType, device: &Device) -> Result<Outputs> {
    let m = step_models(tiny, dtype, device)?;
    let s = step_settings();
    let b = batch(device)?;
    // drawn on the host whatever the device, so both devices see the same values
    let draws = GeneratorDraws::sample(&mut SeededRng::new(3), b.x0.dims(), &s, device)?;
    let compute = m.student.compute_models(dtype)?;
    let models = Models::new(&m.teacher, &compute, &m.heads);
    let vars: Vec<_> = m.student.named_vars().into_iter().map(|(_, v)| v).collect();
    let (grads, out) = step::generator_grads(&models, &b, &draws, &s, 1000, &vars, 1.0)?;
    let scalars = Tensor::new(&[out.scm_loss as f32, out.adv_loss as f32], &Device::Cpu)?;
    let mut outputs: Outputs = vec![
        ("losses", scalars),
        ("F", out.f),
        ("dF", out.df),
        ("logits", out.logits),
    ];
    let g = grads_of(&grads, &vars)?;
    let flat = Tensor::cat(
        &g.iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?;
    outputs.push(("student grads", flat));
    Ok(outputs)
}

/// One discriminator step: the hinge loss, both logit sets and every head gradient.
fn discriminator_step(tiny: &Path, dtype: DType, device: &Device) -> Result<Outputs> {
    let m = step_models(tiny, dtype, device)?;
    let s = step_settings();
    let b = batch(device)?;
    let draws = DiscriminatorDraws::sample(&mut SeededRng::new(4), b.x0.dims(), &s, device)?;
    let compute = m.student.compute_models(dtype)?;
    let models = Models::new(&m.teacher, &compute, &m.heads);
    let (grads, out) = step::discriminator_grads(&models, &b, &draws, &s, &m.heads.vars(), 1.0)?;
    // the biases of the convolutions in front of a per-channel normalisation have a mathematically zero
    // gradient: both sides hold rounding noise there, so they are left out
    let vars: Vec<_> = m
        .heads
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !(n.ends_with("main.0.0.bias") || n.ends_with("main.1.fn.0.bias")))
        .map(|(_, v)| v)
        .collect();
    let g = grads_of(&grads, &vars)?;
    let flat = Tensor::cat(
        &g.iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?;
    Ok(vec![
        ("d_loss", Tensor::new(&[out.d_loss as f32], &Device::Cpu)?),
        ("logits_fake", out.logits_fake),
        ("logits_real", out.logits_real),
        (HEAD_GRADS, flat),
    ])
}

type CheckFn = fn(&Path, DType, &Device) -> Result<Outputs>;

/// The checks: (name, function).
pub const CHECKS: [(&str, CheckFn); 6] = [
    ("sana teacher forward", teacher_forward),
    ("sana student jvp", student_jvp),
    ("dcae encode/decode", dcae),
    ("gemma2 encoder", gemma),
    ("train G step", generator_step),
    ("train D step", discriminator_step),
];

/// Runs every check on `device` against the CPU; `report` is called with each result as it is known.
pub fn run(tiny: &Path, device: &Device, mut report: impl FnMut(&Check)) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (name, f) in CHECKS {
        let cpu_f32 = f(tiny, DType::F32, &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let cpu = if dtype == DType::F32 {
                cpu_f32.clone()
            } else {
                f(tiny, dtype, &Device::Cpu)?
            };
            let on_device = f(tiny, dtype, device)?;
            for ((part, d), (_, c)) in on_device.iter().zip(&cpu) {
                let rel = rel_l2(std::slice::from_ref(d), std::slice::from_ref(c))?;
                let bf16_vs_f32 = (dtype != DType::F32)
                    .then(|| {
                        let reference = &cpu_f32.iter().find(|(p, _)| p == part)?.1;
                        rel_l2(std::slice::from_ref(c), std::slice::from_ref(reference)).ok()
                    })
                    .flatten();
                // in bf16, a device that rounds elsewhere may differ from the CPU by as much as bf16 itself
                // moves the result
                let tol = tolerance_of(part, dtype).max(bf16_vs_f32.unwrap_or(0.0));
                let check = Check {
                    name: format!("{name}: {part}"),
                    dtype: format!("{dtype:?}").to_lowercase(),
                    rel,
                    tol,
                    pass: rel.is_finite() && rel <= tol,
                    bf16_vs_f32,
                };
                report(&check);
                checks.push(check);
            }
        }
    }
    Ok(checks)
}
