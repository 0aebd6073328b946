//! Gradient checkpointing of the student ([`SanaTrigFlow::forward_checkpointed`] + `Recompute::backward`)
//! against one plain reverse pass through the whole graph of [`SanaTrigFlow::forward`], on a small random
//! guidance-embedding model (3 blocks, D = 16) with a logvar head, CPU.
//!
//! The loss is sum(F ⊙ c) + sum(logvar ⊙ c'): the checkpointed run builds it on a leaf copy of F, backpropagates,
//! and hands dF to the tape, which must add the backbone's gradients to those the logvar term already put on the
//! time embedding. Every parameter gradient must match the plain run per tensor, with the relative error
//! max|Δ| / max|g_plain|: ≤ 1e-5 for f32 weights (linear and softmax self-attention, guidance and caption
//! mask). For a bf16 working copy cast from the f32 `Var`s the bound is also 1e-5 for every tensor whose
//! gradient only depends on the block-to-block cotangents (blocks, patch embedding, final layer, logvar head:
//! the same bf16 ops in the same order), and 2e-2 for the time embedding and caption projection: the tape sums
//! the cotangents of the inputs every block shares (caption, tmod, temb) in f32 where the plain bf16 graph sums
//! them in bf16 (8-bit mantissa, 2^-8 ≈ 4e-3 per rounding).

use crate::common::{max_abs, max_abs_diff};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use sana_sprint::models::sana::{SanaConfig, SanaTransformer2DModel, SelfAttention};
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::nn::dual::Dual;
use sana_sprint::rng::SeededRng;

/// Seed of the random weights and inputs.
const SEED: u64 = 20;

/// Relative error bound per parameter tensor, f32 model.
const F32_REL_TOL: f64 = 1e-5;
/// Relative error bound for the bf16 working copy's tensors upstream of the inputs every block shares.
const BF16_SHARED_INPUT_REL_TOL: f64 = 2e-2;

/// Tensors whose gradients sum the cotangents of the caption, tmod and temb over all blocks.
fn feeds_shared_inputs(name: &str) -> bool {
    name.starts_with("time_embed.") || name.starts_with("caption_")
}

fn small_config() -> SanaConfig {
    SanaConfig {
        in_channels: 8,
        out_channels: Some(8),
        num_attention_heads: 2,
        attention_head_dim: 8,
        num_layers: 3,
        num_cross_attention_heads: Some(2),
        cross_attention_head_dim: Some(8),
        cross_attention_dim: Some(16),
        caption_channels: 12,
        qk_norm: Some("rms_norm_across_heads".into()),
        guidance_embeds: true,
        ..SanaConfig::default()
    }
}

/// A seeded random student-shaped model: every tensor an f32 `Var` of `varmap`, N(0, 1/fan_in) (norm weights
/// N(1, 0.1²)), none of them zero.
fn random_student(varmap: &VarMap, dev: &Device) -> anyhow::Result<()> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, dev);
    let transformer = SanaTransformer2DModel::new(&small_config(), vb.clone())?;
    SanaTrigFlow::with_logvar(transformer, &vb)?;
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let mut rng = SeededRng::for_name(SEED, name);
        let dims = var.dims();
        let value = if name.ends_with("norm_q.weight")
            || name.ends_with("norm_k.weight")
            || name == "caption_norm.weight"
        {
            rng.normal_tensor(dims, 1.0, 0.1, dev)?
        } else {
            let fan_in = dims[1..].iter().product::<usize>().max(dims[0]);
            rng.normal_tensor(dims, 0.0, 1.0 / (fan_in as f64).sqrt(), dev)?
        };
        var.set(&value)?;
    }
    Ok(())
}

/// The model over `varmap` in `dtype` (a `to_dtype` cast of the f32 `Var`s for bf16).
fn model(
    varmap: &VarMap,
    dtype: DType,
    kind: SelfAttention,
    dev: &Device,
) -> anyhow::Result<SanaTrigFlow> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, dtype, dev);
    let transformer =
        SanaTransformer2DModel::new(&small_config(), vb.clone())?.with_self_attention(kind);
    Ok(SanaTrigFlow::with_logvar(transformer, &vb)?)
}

struct Inputs {
    x: Tensor,
    prompt: Tensor,
    t: Tensor,
    guidance: Tensor,
    mask: Tensor,
    f_cotangent: Tensor,
    logvar_cotangent: Tensor,
}

fn inputs(dev: &Device) -> anyhow::Result<Inputs> {
    let mut rng = SeededRng::new(SEED);
    // a non-square 4×3 latent grid, 5 caption tokens with padding in the first prompt
    Ok(Inputs {
        x: rng.normal_tensor((2, 8, 4, 3), 0.0, 1.0, dev)?,
        f_cotangent: rng.normal_tensor((2, 8, 4, 3), 0.0, 1.0, dev)?,
        prompt: rng.normal_tensor((2, 5, 12), 0.0, 1.0, dev)?,
        t: Tensor::new(&[0.3f32, 1.1], dev)?,
        guidance: Tensor::new(&[0.45f32, 0.3], dev)?,
        mask: Tensor::new(&[[1f32, 1., 1., 0., 0.], [1., 1., 1., 1., 1.]], dev)?,
        logvar_cotangent: Tensor::new(&[[0.7f32], [-1.3]], dev)?,
    })
}

/// Checks the checkpointed gradients of every `Var` against one plain backward; returns the worst tensor and
/// its relative error.
fn compare(
    varmap: &VarMap,
    dtype: DType,
    kind: SelfAttention,
    tolerance: impl Fn(&str) -> f64,
) -> anyhow::Result<(String, f64)> {
    let dev = Device::Cpu;
    let model = model(varmap, dtype, kind, &dev)?;
    let io = inputs(&dev)?;
    let logvar_loss = || -> anyhow::Result<Tensor> {
        let logvar = model.logvar(&io.t, Some(&io.guidance))?;
        Ok((logvar * &io.logvar_cotangent)?.sum_all()?)
    };

    let f_plain = model
        .forward(
            &Dual::constant(io.x.clone()),
            &io.prompt,
            &Dual::constant(io.t.clone()),
            Some(&io.guidance),
            Some(&io.mask),
        )?
        .primal;
    let plain = ((&f_plain * &io.f_cotangent)?.sum_all()? + logvar_loss()?)?.backward()?;

    let (f, recompute) =
        model.forward_checkpointed(&io.x, &io.prompt, &io.t, Some(&io.guidance), Some(&io.mask))?;
    assert!(!f.track_op(), "the checkpointed output carries no graph");
    assert_eq!(f.dtype(), DType::F32);
    assert_eq!(recompute.num_segments(), small_config().num_layers + 2);
    let f_error = max_abs_diff(&f, &f_plain);
    assert_eq!(
        f_error, 0.0,
        "checkpointed F differs from forward's by {f_error:e}"
    );

    let f_leaf = Var::from_tensor(&f)?;
    let mut grads =
        ((f_leaf.as_tensor() * &io.f_cotangent)?.sum_all()? + logvar_loss()?)?.backward()?;
    let df = grads.remove(f_leaf.as_tensor()).expect("dF");
    recompute.backward(&df, &mut grads)?;

    let mut worst = (String::new(), 0.0);
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let want = plain
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient in the plain run"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient from the checkpointed run"));
        assert_eq!(got.dtype(), DType::F32, "{name}: gradient dtype");
        let scale = max_abs(want);
        assert!(scale > 0.0, "{name}: zero reference gradient");
        let rel = max_abs_diff(got, want) / scale;
        let tolerance = tolerance(name);
        assert!(
            rel <= tolerance,
            "{name} ({dtype:?}, {kind:?}): relative gradient error {rel:.2e} > {tolerance:e}"
        );
        if rel >= worst.1 {
            worst = (name.clone(), rel);
        }
    }
    println!(
        "{dtype:?} {kind:?}: max relative gradient error {:.2e} ({})",
        worst.1, worst.0
    );
    Ok(worst)
}

#[test]
fn checkpointed_gradients_match_plain_backward_f32() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    random_student(&varmap, &dev)?;
    for kind in [SelfAttention::Linear, SelfAttention::Softmax] {
        compare(&varmap, DType::F32, kind, |_| F32_REL_TOL)?;
    }
    Ok(())
}

#[test]
fn checkpointed_gradients_reach_f32_vars_through_a_bf16_cast() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    random_student(&varmap, &dev)?;
    for kind in [SelfAttention::Linear, SelfAttention::Softmax] {
        compare(&varmap, DType::BF16, kind, |name| {
            if feeds_shared_inputs(name) {
                BF16_SHARED_INPUT_REL_TOL
            } else {
                F32_REL_TOL
            }
        })?;
    }
    Ok(())
}
