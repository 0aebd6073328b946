//! TrigFlow wrapper (docs/ALGORITHM.md §5.3) and the logvar head.
//!
//! The backbone is a flow-matching model in flow time τ ∈ [0, 1]; the wrapper turns it into a TrigFlow model in
//! t ∈ [0, π/2]: τ = sin t / (cos t + sin t), ρ = √(τ² + (1−τ)²), x_in = ρ·x,
//! F = ((1−2τ)·x_in + (1−2τ+2τ²)·v(x_in, τ)) / ρ. All wrapper arithmetic is f32 (docs/ALGORITHM.md §8) and is written over
//! [`Dual`], so tangents of both x and t flow through τ, ρ and the backbone: `forward` with tangents
//! (v_x, v_t) returns dF, the JVP used by the sCM loss.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::models::sana::{SanaTransformer2DModel, TextContext};
use crate::nn::checkpoint::Recompute;
use crate::nn::dual::{compute_dtype, Dual, Linear};
use crate::Result;

/// A SANA backbone in TrigFlow parameterisation (`SanaTrigFlow`), with the student's logvar head if present.
#[derive(Clone, Debug)]
pub struct SanaTrigFlow {
    transformer: SanaTransformer2DModel,
    logvar_linear: Option<Linear>,
}

/// Flow time τ (B,) and input scale ρ (B,) of TrigFlow time t (B,), in f32 (f64 for f64 t).
pub fn flow_time(t: &Dual) -> Result<(Dual, Dual)> {
    let t = t.to_dtype(compute_dtype(t.dtype()))?;
    let (sin, cos) = (t.sin()?, t.cos()?);
    let tau = sin.div(&cos.add(&sin)?)?;
    let rho = tau.sqr()?.add(&tau.affine(-1.0, 1.0)?.sqr()?)?.sqrt()?;
    Ok((tau, rho))
}

/// F = ((1−2τ)·x_in + (1−2τ+2τ²)·v) / ρ from the scaled input, the velocity and τ, ρ shaped (B, 1, 1, 1).
fn trigflow_output(x_in: &Dual, v: &Dual, tau4: &Dual, rho4: &Dual) -> Result<Dual> {
    let x_coef = tau4.affine(-2.0, 1.0)?;
    let v_coef = tau4.sqr()?.affine(2.0, 0.0)?.add(&x_coef)?;
    Ok(x_coef.mul(x_in)?.add(&v_coef.mul(v)?)?.div(rho4)?)
}

impl SanaTrigFlow {
    /// The wrapper without a logvar head (teacher).
    pub fn new(transformer: SanaTransformer2DModel) -> Self {
        Self {
            transformer,
            logvar_linear: None,
        }
    }

    /// The wrapper with the logvar head `logvar_linear` = Linear(D → 1) read from `vb` (the checkpoint root);
    /// missing keys are initialised as the training script does: Xavier-uniform weight, zero bias.
    pub fn with_logvar(transformer: SanaTransformer2DModel, vb: &VarBuilder) -> Result<Self> {
        let dim = transformer.config().inner_dim();
        let bound = (6.0 / (dim + 1) as f64).sqrt();
        let vb = vb.pp("logvar_linear");
        let weight = vb.get_with_hints(
            (1, dim),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = vb.get_with_hints(1, "bias", Init::Const(0.0))?;
        Ok(Self {
            transformer,
            logvar_linear: Some(Linear::new(weight, Some(bias))),
        })
    }

    pub fn transformer(&self) -> &SanaTransformer2DModel {
        &self.transformer
    }

    pub fn has_logvar(&self) -> bool {
        self.logvar_linear.is_some()
    }

    /// F(x, t) (B, C, H, W) in f32 (f64 when x is f64) for x = x_t/σd (B, C, H, W) and TrigFlow time t (B,);
    /// with tangents on x and/or t the result's tangent is dF. `guidance` (B,) is the student's (already scaled) guidance input.
    pub fn forward(
        &self,
        x: &Dual,
        encoder_hidden_states: &Tensor,
        t: &Dual,
        guidance: Option<&Tensor>,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<Dual> {
        let text = self
            .transformer
            .text_context(encoder_hidden_states, encoder_attention_mask)?;
        self.forward_ctx(x, &text, t, guidance)
    }

    /// [`Self::forward`] over a precomputed [`TextContext`] of the prompts (shared by the passes of a step).
    pub fn forward_ctx(
        &self,
        x: &Dual,
        text: &TextContext,
        t: &Dual,
        guidance: Option<&Tensor>,
    ) -> Result<Dual> {
        let b = x.dims()[0];
        let cdt = compute_dtype(x.dtype());
        let (tau, rho) = flow_time(t)?;
        let (tau4, rho4) = (
            tau.reshape((b, 1, 1, 1))?.to_dtype(cdt)?,
            rho.reshape((b, 1, 1, 1))?.to_dtype(cdt)?,
        );
        let x_in = x.to_dtype(cdt)?.mul(&rho4)?;
        let v = self
            .transformer
            .forward_ctx(&x_in, text, &tau, guidance)?
            .to_dtype(cdt)?;
        trigflow_output(&x_in, &v, &tau4, &rho4)
    }

    /// The text-side work of the backbone for these prompts (see [`TextContext`]).
    pub fn text_context(
        &self,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<TextContext> {
        self.transformer
            .text_context(encoder_hidden_states, encoder_attention_mask)
    }

    /// `forward` for constant inputs (no tangents, no gradient with respect to x, t or the prompt) with
    /// gradient checkpointing: returns F (B, C, H, W) in f32 (f64 when x is f64) without a graph, and the
    /// [`Recompute`] tape whose `backward(dF, grads)` adds to `grads` the gradients of sum(F ⊙ dF) with
    /// respect to every `Var` the model reads (through any cast of them). The tape keeps only the segment
    /// boundaries: each block's input tokens, the caption, `tmod` and `temb`; the forward holds one block's
    /// activations at a time, and so does the backward, which recomputes the blocks one by one in reverse.
    pub fn forward_checkpointed(
        &self,
        x: &Tensor,
        encoder_hidden_states: &Tensor,
        t: &Tensor,
        guidance: Option<&Tensor>,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Recompute)> {
        let (b, _, height, width) = x.dims4()?;
        let cdt = compute_dtype(x.dtype());
        let (tau, rho) = flow_time(&Dual::constant(t.detach()))?;
        let (tau4, rho4) = (
            tau.reshape((b, 1, 1, 1))?.to_dtype(cdt)?,
            rho.reshape((b, 1, 1, 1))?.to_dtype(cdt)?,
        );
        let x_in = Dual::constant(x.detach().to_dtype(cdt)?).mul(&rho4)?;
        let backbone = &self.transformer;
        let mask_bias = encoder_attention_mask
            .map(|m| backbone.mask_bias(m))
            .transpose()?;
        let mut tape = Recompute::new();

        let embed = {
            let (backbone, x_in, tau) = (backbone.clone(), x_in.clone(), tau.clone());
            let (prompt, guidance) = (encoder_hidden_states.detach(), guidance.map(Tensor::detach));
            move |_: &[Tensor]| -> Result<Vec<Tensor>> {
                let e = backbone.embed(&x_in, &prompt, &tau, guidance.as_ref())?;
                Ok(vec![
                    e.hidden.primal,
                    e.caption.primal,
                    e.tmod.primal,
                    e.temb.primal,
                ])
            }
        };
        let &[mut hidden, caption, tmod, temb] = tape.record(&[], embed)?.as_slice() else {
            unreachable!("the embedding segment has four outputs")
        };

        let p = backbone.config().patch_size;
        let (gh, gw) = (height / p, width / p);
        for block in backbone.blocks() {
            let (block, mask_bias, kind) =
                (block.clone(), mask_bias.clone(), backbone.self_attention());
            let run = move |inputs: &[Tensor]| -> Result<Vec<Tensor>> {
                let [hidden, caption, tmod] = inputs else {
                    unreachable!("a block segment has three inputs")
                };
                let out = block.forward(
                    &Dual::constant(hidden.clone()),
                    &Dual::constant(caption.clone()),
                    mask_bias.as_ref(),
                    &Dual::constant(tmod.clone()),
                    gh,
                    gw,
                    kind,
                )?;
                Ok(vec![out.primal])
            };
            hidden = tape.record(&[hidden, caption, tmod], run)?[0];
        }

        let head = {
            let backbone = backbone.clone();
            move |inputs: &[Tensor]| -> Result<Vec<Tensor>> {
                let [hidden, temb] = inputs else {
                    unreachable!("the head segment has two inputs")
                };
                let v = backbone
                    .final_layer(
                        &Dual::constant(hidden.clone()),
                        &Dual::constant(temb.clone()),
                        height,
                        width,
                    )?
                    .to_dtype(cdt)?;
                Ok(vec![trigflow_output(&x_in, &v, &tau4, &rho4)?.primal])
            }
        };
        let out = tape.record(&[hidden, temb], head)?[0];
        Ok((tape.value(out).clone(), tape))
    }

    /// logvar (B, 1) in f32 (f64 for an f64 model): `logvar_linear` on the time embedding `temb` of the TrigFlow time t itself (not τ),
    /// with guidance when given — as the diffusers script does (docs/ALGORITHM.md §5.3 step 6, ALGORITHM.md §9 #9).
    pub fn logvar(&self, t: &Tensor, guidance: Option<&Tensor>) -> Result<Tensor> {
        let head = self.logvar_linear.as_ref().ok_or_else(|| {
            crate::Error::Arg(
                "this TrigFlow model has no logvar head (load it with SanaTrigFlow::with_logvar)"
                    .into(),
            )
        })?;
        let (_, temb) = self
            .transformer
            .time_embed(&Dual::constant(t.clone()), guidance)?;
        Ok(head
            .forward(&temb)?
            .primal
            .to_dtype(compute_dtype(temb.dtype()))?)
    }

    /// The outputs (B, N, D) of the backbone blocks at `taps` (in the order of `taps`) for the wrapped input
    /// (τ conversion and input scaling as in `forward`); stops after the last tapped block.
    pub fn block_outputs(
        &self,
        x: &Tensor,
        encoder_hidden_states: &Tensor,
        t: &Tensor,
        guidance: Option<&Tensor>,
        encoder_attention_mask: Option<&Tensor>,
        taps: &[usize],
    ) -> Result<Vec<Tensor>> {
        let text = self
            .transformer
            .text_context(encoder_hidden_states, encoder_attention_mask)?;
        self.block_outputs_ctx(x, &text, t, guidance, taps)
    }

    /// [`Self::block_outputs`] over a precomputed [`TextContext`] of the prompts.
    pub fn block_outputs_ctx(
        &self,
        x: &Tensor,
        text: &TextContext,
        t: &Tensor,
        guidance: Option<&Tensor>,
        taps: &[usize],
    ) -> Result<Vec<Tensor>> {
        let b = x.dim(0)?;
        let (tau, rho) = flow_time(&Dual::constant(t.clone()))?;
        let cdt = compute_dtype(x.dtype());
        let rho = rho.primal.reshape((b, 1, 1, 1))?.to_dtype(cdt)?;
        let x_in = x.to_dtype(cdt)?.broadcast_mul(&rho)?;
        let features = self.transformer.block_outputs_ctx(
            &Dual::constant(x_in),
            text,
            &tau,
            guidance,
            taps,
        )?;
        Ok(features.into_iter().map(|f| f.primal).collect())
    }
}
