//! SanaTransformer2DModel (diffusers): teacher and student backbones (docs/ALGORITHM.md §3).
//!
//! Every layer is written over [`Dual`], so the plain forward is the dual forward without tangents and the
//! student's JVP (docs/ALGORITHM.md §6) is the same pass with tangents on the latent and the timestep. Layers are built from
//! differentiable candle primitives (no fused norms/softmax) so reverse mode works through the same code, and
//! the constructor only takes views of the weights it is given (no copies), so a `Var`-backed model trains
//! its variables in place. Internally tokens stay channels-last: (B, N, D) with N = H·W row-major; the FFN's
//! 1×1 convolutions are linears over D and its depthwise 3×3 convolution runs on (B, H, W, C).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;

use crate::models::weights::Weights;
use crate::nn::dual::{self, Dual, Linear};
use crate::nn::{attention, depthwise, fused, norm};
use crate::{Error, Result};

/// Width of the sinusoidal timestep features fed to the timestep MLPs.
const TIMESTEP_FEATURES: usize = 256;
/// eps of the attention q/k RMSNorms and of `caption_norm` (diffusers `Attention` / `RMSNorm` defaults).
const QK_NORM_EPS: f64 = 1e-5;
/// eps of the final modulated LayerNorm (`SanaModulatedNorm`).
const NORM_OUT_EPS: f64 = 1e-6;

/// `transformer/config.json`; defaults are those of diffusers' `SanaTransformer2DModel.__init__`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SanaConfig {
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub num_layers: usize,
    pub num_cross_attention_heads: Option<usize>,
    pub cross_attention_head_dim: Option<usize>,
    pub cross_attention_dim: Option<usize>,
    pub caption_channels: usize,
    pub mlp_ratio: f64,
    pub dropout: f64,
    /// `null` reads as false (diffusers passes it on as `bias=None`, which `nn.Linear` treats as false).
    #[serde(deserialize_with = "null_as_false")]
    pub attention_bias: bool,
    pub sample_size: usize,
    pub patch_size: usize,
    /// `null` reads as false (`nn.LayerNorm(elementwise_affine=None)` has no affine parameters).
    #[serde(deserialize_with = "null_as_false")]
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
    pub interpolation_scale: Option<f64>,
    /// `null` reads as false: diffusers tests `if guidance_embeds:`.
    #[serde(deserialize_with = "null_as_false")]
    pub guidance_embeds: bool,
    /// Read only by the Sprint pipeline (callers pass guidance already scaled); not used by `forward`.
    pub guidance_embeds_scale: f64,
    pub qk_norm: Option<String>,
    /// Read only by `SanaPipeline`; not used by `forward`.
    pub timestep_scale: f64,
}

/// A boolean that Python reads by truthiness: `null` is false.
fn null_as_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

impl Default for SanaConfig {
    fn default() -> Self {
        Self {
            in_channels: 32,
            out_channels: Some(32),
            num_attention_heads: 70,
            attention_head_dim: 32,
            num_layers: 20,
            num_cross_attention_heads: Some(20),
            cross_attention_head_dim: Some(112),
            cross_attention_dim: Some(2240),
            caption_channels: 2304,
            mlp_ratio: 2.5,
            dropout: 0.0,
            attention_bias: false,
            sample_size: 32,
            patch_size: 1,
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            interpolation_scale: None,
            guidance_embeds: false,
            guidance_embeds_scale: 0.1,
            qk_norm: None,
            timestep_scale: 1.0,
        }
    }
}

impl SanaConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::Missing {
                what: "transformer config".into(),
                hint: format!(
                    "a diffusers SanaTransformer2DModel folder (the `transformer/` folder of a SANA pipeline) holds \
                     config.json and diffusion_pytorch_model.safetensors; download it: {}",
                    crate::hub::download_command(&path)
                ),
                path,
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::model(
                &path,
                format!(
                    "invalid transformer config ({e}): the file is damaged or not a diffusers config; download \
                     it again: {}",
                    crate::hub::download_command(&path)
                ),
            )
        })
    }

    /// Model width D = heads · head_dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// `out_channels or in_channels` (diffusers `SanaTransformer2DModel.__init__`): `null` and 0 both mean
    /// "as many as in_channels".
    pub fn out_channels(&self) -> usize {
        self.out_channels
            .filter(|&c| c != 0)
            .unwrap_or(self.in_channels)
    }

    /// Hidden width of the GLUMBConv FFN, `int(mlp_ratio · D)`.
    pub fn ff_hidden(&self) -> usize {
        (self.mlp_ratio * self.inner_dim() as f64) as usize
    }

    /// Rejects settings this implementation does not cover (none of them occur in SANA-Sprint checkpoints).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.interpolation_scale.is_some() {
            return Err("interpolation_scale is set (sincos positional embedding); only NoPE models (null) are supported".into());
        }
        if self.norm_elementwise_affine {
            return Err(
                "norm_elementwise_affine = true is not supported (SANA-Sprint uses false)".into(),
            );
        }
        if self.dropout != 0.0 {
            return Err(format!(
                "dropout = {} is not supported (SANA-Sprint uses 0.0)",
                self.dropout
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm_across_heads") => {}
            Some(other) => {
                return Err(format!(
                    "qk_norm \"{other}\" is not supported (use \"rms_norm_across_heads\" or null)"
                ))
            }
        }
        if self.cross_attention_dim.is_none()
            || self.num_cross_attention_heads.is_none()
            || self.cross_attention_head_dim.is_none()
        {
            return Err("cross_attention_dim, num_cross_attention_heads and cross_attention_head_dim must be set".into());
        }
        if self.patch_size == 0 {
            return Err("patch_size must be at least 1".into());
        }
        Ok(())
    }
}

/// Which attention the blocks' self-attention (`attn1`) runs (`--self_attention linear | softmax`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SelfAttention {
    /// ReLU linear attention (`SanaLinearAttnProcessor2_0`): the checkpoint's own processor.
    #[default]
    Linear,
    /// Softmax attention (the reference training script's processor swap on the student, docs/ALGORITHM.md §9 #1).
    Softmax,
}

/// PyTorch's default init for Linear/Conv weights and biases: U(±1/√fan_in) (used only for missing keys).
fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

fn linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let init = torch_default_init(in_dim);
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// A 1×1 Conv2d as a Linear over channels (the weight `[out, in, 1, 1]` viewed as `[out, in]`).
fn conv1x1(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let init = torch_default_init(in_dim);
    let weight = vb
        .get_with_hints((out_dim, in_dim, 1, 1), "weight", init)?
        .squeeze(3)?
        .squeeze(2)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

fn norm_weight(vb: &VarBuilder, dim: usize) -> Result<Tensor> {
    Ok(vb.get_with_hints(dim, "weight", Init::Const(1.0))?)
}

/// `scale_shift_table` (rows, D), initialised randn/√D like diffusers.
fn scale_shift_table(vb: &VarBuilder, rows: usize, dim: usize) -> Result<Tensor> {
    let stdev = 1.0 / (dim as f64).sqrt();
    Ok(vb.get_with_hints(
        (rows, dim),
        "scale_shift_table",
        Init::Randn { mean: 0.0, stdev },
    )?)
}

/// (B, N, H·d) → (B, H, N, d), contiguous for batched matmuls.
fn split_heads(x: &Dual, heads: usize) -> Result<Dual> {
    let (b, n, inner) = x.primal.dims3()?;
    Ok(x.reshape((b, n, heads, inner / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// (B, H, N, d) → (B, N, H·d).
fn merge_heads(x: &Dual) -> Result<Dual> {
    let (b, h, n, d) = x.primal.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, n, h * d))?)
}

/// diffusers `TimestepEmbedding(256, D)`: linear_1 → SiLU → linear_2.
#[derive(Clone, Debug)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: &VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(&vb.pp("linear_1"), TIMESTEP_FEATURES, dim, true)?,
            linear_2: linear(&vb.pp("linear_2"), dim, dim, true)?,
        })
    }

    /// Sinusoid features of `t` (f32), cast to `dtype`, through the MLP.
    fn forward(&self, t: &Dual, dtype: DType) -> Result<Dual> {
        let features = dual::timestep_features(t, TIMESTEP_FEATURES)?.to_dtype(dtype)?;
        Ok(self
            .linear_2
            .forward(&self.linear_1.forward(&features)?.silu()?)?)
    }
}

/// The time conditioning module `time_embed` (docs/ALGORITHM.md §3.3).
#[derive(Clone, Debug)]
enum TimeEmbed {
    /// `AdaLayerNormSingle` (teacher, `guidance_embeds = false`).
    Single {
        timestep_embedder: TimestepEmbedding,
        linear: Linear,
    },
    /// `SanaCombinedTimestepGuidanceEmbeddings` (student, `guidance_embeds = true`).
    Guided {
        timestep_embedder: TimestepEmbedding,
        guidance_embedder: TimestepEmbedding,
        linear: Linear,
    },
}

/// diffusers `Attention` with `rms_norm_across_heads` q/k norms (or none), as Sana uses it.
#[derive(Clone, Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: Option<Tensor>,
    norm_k: Option<Tensor>,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: &VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
        qk_norm: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let (norm_q, norm_k) = if qk_norm {
            (
                Some(norm_weight(&vb.pp("norm_q"), inner)?),
                Some(norm_weight(&vb.pp("norm_k"), inner)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            to_q: linear(&vb.pp("to_q"), query_dim, inner, bias)?,
            to_k: linear(&vb.pp("to_k"), context_dim, inner, bias)?,
            to_v: linear(&vb.pp("to_v"), context_dim, inner, bias)?,
            norm_q,
            norm_k,
            to_out: linear(&vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
            head_dim,
        })
    }

    /// Projected, k-normalised, head-split (B, H, L, d) keys and values of `context`.
    fn context_kv(&self, context: &Dual) -> Result<(Dual, Dual)> {
        let mut k = self.to_k.forward(context)?;
        if let Some(w) = &self.norm_k {
            k = norm::rms_norm(&k, w, QK_NORM_EPS)?;
        }
        let v = self.to_v.forward(context)?;
        Ok((split_heads(&k, self.heads)?, split_heads(&v, self.heads)?))
    }

    fn forward(
        &self,
        x: &Dual,
        context: &Dual,
        kind: SelfAttention,
        bias: Option<&Tensor>,
    ) -> Result<Dual> {
        let (k, v) = self.context_kv(context)?;
        self.forward_kv(x, &k, &v, kind, bias)
    }

    /// Attention of x's queries over precomputed keys and values (see [`Self::context_kv`]).
    fn forward_kv(
        &self,
        x: &Dual,
        k: &Dual,
        v: &Dual,
        kind: SelfAttention,
        bias: Option<&Tensor>,
    ) -> Result<Dual> {
        let mut q = self.to_q.forward(x)?;
        if let Some(w) = &self.norm_q {
            q = norm::rms_norm(&q, w, QK_NORM_EPS)?;
        }
        let q = split_heads(&q, self.heads)?;
        let out = match kind {
            SelfAttention::Linear => attention::relu_linear_attention(&q, k, v)?,
            SelfAttention::Softmax => {
                attention::softmax_attention(&q, k, v, 1.0 / (self.head_dim as f64).sqrt(), bias)?
            }
        };
        self.to_out.forward(&merge_heads(&out)?).map_err(Into::into)
    }
}

/// `GLUMBConv(D, D, mlp_ratio, norm_type=None, residual_connection=False)` on channels-last tokens.
#[derive(Clone, Debug)]
struct GluMbConv {
    conv_inverted: Linear,
    conv_depth_weight: Tensor,
    conv_depth_bias: Tensor,
    conv_point: Linear,
    hidden: usize,
}

impl GluMbConv {
    fn new(vb: &VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        let depth = vb.pp("conv_depth");
        // depthwise conv: fan_in = (in / groups) · 3 · 3 = 9
        let depth_init = torch_default_init(9);
        Ok(Self {
            conv_inverted: conv1x1(&vb.pp("conv_inverted"), dim, 2 * hidden, true)?,
            conv_depth_weight: depth.get_with_hints((2 * hidden, 1, 3, 3), "weight", depth_init)?,
            conv_depth_bias: depth.get_with_hints(2 * hidden, "bias", depth_init)?,
            conv_point: conv1x1(&vb.pp("conv_point"), hidden, dim, false)?,
            hidden,
        })
    }

    /// x (B, N, D) on an H×W grid → (B, N, D).
    fn forward(&self, x: &Dual, height: usize, width: usize) -> Result<Dual> {
        let (b, n, _) = x.primal.dims3()?;
        let p = self
            .conv_inverted
            .forward(x)?
            .reshape((b, height, width, 2 * self.hidden))?;
        let gated =
            depthwise::silu_depthwise_glu(&p, &self.conv_depth_weight, &self.conv_depth_bias)?
                .reshape((b, n, self.hidden))?;
        Ok(self.conv_point.forward(&gated)?)
    }
}

/// `SanaTransformerBlock` (docs/ALGORITHM.md §3.8).
#[derive(Clone, Debug)]
pub struct SanaTransformerBlock {
    scale_shift_table: Tensor,
    attn1: Attention,
    attn2: Attention,
    ff: GluMbConv,
    norm_eps: f64,
}

impl SanaTransformerBlock {
    /// Builds block `transformer_blocks.{i}` from `vb` already at that prefix.
    pub fn new(vb: &VarBuilder, cfg: &SanaConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let qk_norm = cfg.qk_norm.is_some();
        let missing = || Error::Arg("cross-attention settings missing from the config".into());
        let cross_heads = cfg.num_cross_attention_heads.ok_or_else(missing)?;
        let cross_head_dim = cfg.cross_attention_head_dim.ok_or_else(missing)?;
        let cross_dim = cfg.cross_attention_dim.ok_or_else(missing)?;
        Ok(Self {
            scale_shift_table: scale_shift_table(vb, 6, dim)?,
            attn1: Attention::new(
                &vb.pp("attn1"),
                dim,
                dim,
                cfg.num_attention_heads,
                cfg.attention_head_dim,
                cfg.attention_bias,
                qk_norm,
            )?,
            attn2: Attention::new(
                &vb.pp("attn2"),
                dim,
                cross_dim,
                cross_heads,
                cross_head_dim,
                true,
                qk_norm,
            )?,
            ff: GluMbConv::new(&vb.pp("ff"), dim, cfg.ff_hidden())?,
            norm_eps: cfg.norm_eps,
        })
    }

    /// x (B, N, D) on a `height`×`width` token grid, caption (B, L, D) (projected and normed), additive mask
    /// bias broadcastable to (B, heads, N, L), tmod (B, 6D) → (B, N, D).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Dual,
        caption: &Dual,
        mask_bias: Option<&Tensor>,
        tmod: &Dual,
        height: usize,
        width: usize,
        self_attention: SelfAttention,
    ) -> Result<Dual> {
        let kv = self.cross_kv(caption)?;
        self.forward_kv(x, &kv, mask_bias, tmod, height, width, self_attention)
    }

    /// The cross-attention keys and values (B, heads, L, d) of a projected caption: the text-side work of the
    /// block, the same for every pass over the same prompts.
    pub fn cross_kv(&self, caption: &Dual) -> Result<(Dual, Dual)> {
        self.attn2.context_kv(caption)
    }

    /// [`Self::forward`] with the cross-attention keys and values already computed ([`Self::cross_kv`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_kv(
        &self,
        x: &Dual,
        kv: &(Dual, Dual),
        mask_bias: Option<&Tensor>,
        tmod: &Dual,
        height: usize,
        width: usize,
        self_attention: SelfAttention,
    ) -> Result<Dual> {
        let (b, _, dim) = x.primal.dims3()?;
        let table = Dual::constant(self.scale_shift_table.unsqueeze(0)?);
        let modulation = tmod.reshape((b, 6, dim))?.add(&table)?.chunk(6, 1)?;
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp] =
            modulation.as_slice()
        else {
            unreachable!("chunk(6) yields six parts")
        };

        let h = norm::layer_norm_modulate(x, shift_msa, scale_msa, self.norm_eps)?;
        let attn = self.attn1.forward(&h, &h, self_attention, None)?;
        let x = fused::gated_residual(x, gate_msa, &attn)?;

        let x =
            x.add(
                &self
                    .attn2
                    .forward_kv(&x, &kv.0, &kv.1, SelfAttention::Softmax, mask_bias)?,
            )?;

        let h = norm::layer_norm_modulate(&x, shift_mlp, scale_mlp, self.norm_eps)?;
        let ff = self.ff.forward(&h, height, width)?;
        Ok(fused::gated_residual(&x, gate_mlp, &ff)?)
    }
}

/// The text-side work of one batch of prompts for one model — caption projection and norm, then every block's
/// cross-attention keys and values, plus the mask bias — computed once ([`SanaTransformer2DModel::text_context`])
/// and shared by every pass over the same prompts (teacher CFG and discriminator passes; student passes and
/// the JVP). The keys and values carry no tangent: the text does not depend on x or t.
#[derive(Clone, Debug)]
pub struct TextContext {
    /// Per block: keys and values (B, heads, L, d).
    pub kv: Vec<(Dual, Dual)>,
    /// Additive cross-attention bias (B, 1, 1, L), if a mask was given.
    pub mask_bias: Option<Tensor>,
}

impl TextContext {
    /// Number of prompt rows.
    pub fn batch(&self) -> usize {
        self.kv.first().map_or(0, |(k, _)| k.dims()[0])
    }

    /// The contexts of several prompt batches stacked along the batch (e.g. [negative, prompts] for CFG).
    pub fn cat(parts: &[&TextContext]) -> Result<TextContext> {
        let first = parts
            .first()
            .ok_or_else(|| Error::Arg("no text contexts to concatenate".into()))?;
        let kv = (0..first.kv.len())
            .map(|i| -> Result<(Dual, Dual)> {
                let ks: Vec<&Dual> = parts.iter().map(|p| &p.kv[i].0).collect();
                let vs: Vec<&Dual> = parts.iter().map(|p| &p.kv[i].1).collect();
                Ok((Dual::cat(&ks, 0)?, Dual::cat(&vs, 0)?))
            })
            .collect::<Result<_>>()?;
        let mask_bias = match parts
            .iter()
            .map(|p| p.mask_bias.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(biases) => Some(Tensor::cat(&biases, 0)?),
            None if parts.iter().all(|p| p.mask_bias.is_none()) => None,
            None => {
                return Err(Error::Arg(
                    "cannot concatenate text contexts with and without a mask".into(),
                ))
            }
        };
        Ok(TextContext { kv, mask_bias })
    }

    /// The same values without a graph (for no-grad passes over a context computed with one).
    pub fn detach(&self) -> TextContext {
        TextContext {
            kv: self
                .kv
                .iter()
                .map(|(k, v)| (k.detached_constant(), v.detached_constant()))
                .collect(),
            mask_bias: self.mask_bias.as_ref().map(Tensor::detach),
        }
    }
}

/// The latent-side inputs of the blocks (see [`BlockInputs`]).
struct LatentInputs {
    hidden: Dual,
    tmod: Dual,
    temb: Dual,
    grid: (usize, usize),
}

/// What every block reads, from the part of the forward before the blocks (docs/ALGORITHM.md §3.9 steps 2–4).
#[derive(Clone, Debug)]
pub struct BlockInputs {
    /// Patch-embedded latent tokens (B, N, D): the first block's input.
    pub hidden: Dual,
    /// Projected, normalised caption (B, L, D).
    pub caption: Dual,
    /// Block modulation `tmod` (B, 6D).
    pub tmod: Dual,
    /// Time conditioning `temb` (B, D) driving the final norm.
    pub temb: Dual,
    /// Token grid (height, width): the latent size over the patch size.
    pub grid: (usize, usize),
}

/// diffusers `SanaTransformer2DModel`: the teacher (`guidance_embeds = false`) or the student backbone.
#[derive(Clone, Debug)]
pub struct SanaTransformer2DModel {
    config: SanaConfig,
    dtype: DType,
    self_attention: SelfAttention,
    /// `patch_embed.proj` Conv2d (kernel = stride = p): weight (D, C, p, p) and bias (D,).
    patch_weight: Tensor,
    patch_bias: Tensor,
    time_embed: TimeEmbed,
    caption_linear_1: Linear,
    caption_linear_2: Linear,
    caption_norm: Tensor,
    blocks: Vec<SanaTransformerBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
}

impl SanaTransformer2DModel {
    /// Builds the model from weights under their diffusers key names; the working dtype is `vb`'s.
    pub fn new(cfg: &SanaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|msg| Error::Arg(format!("SanaTransformer2DModel config: {msg}")))?;
        let dim = cfg.inner_dim();
        let p = cfg.patch_size;
        let patch_in = cfg.in_channels * p * p;
        let patch = vb.pp("patch_embed").pp("proj");
        let patch_init = torch_default_init(patch_in);
        let patch_weight =
            patch.get_with_hints((dim, cfg.in_channels, p, p), "weight", patch_init)?;
        let patch_bias = patch.get_with_hints(dim, "bias", patch_init)?;

        let te = vb.pp("time_embed");
        let time_embed = if cfg.guidance_embeds {
            TimeEmbed::Guided {
                timestep_embedder: TimestepEmbedding::new(&te.pp("timestep_embedder"), dim)?,
                guidance_embedder: TimestepEmbedding::new(&te.pp("guidance_embedder"), dim)?,
                linear: linear(&te.pp("linear"), dim, 6 * dim, true)?,
            }
        } else {
            TimeEmbed::Single {
                timestep_embedder: TimestepEmbedding::new(
                    &te.pp("emb").pp("timestep_embedder"),
                    dim,
                )?,
                linear: linear(&te.pp("linear"), dim, 6 * dim, true)?,
            }
        };

        let caption = vb.pp("caption_projection");
        let blocks = (0..cfg.num_layers)
            .map(|i| SanaTransformerBlock::new(&vb.pp("transformer_blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            dtype: vb.dtype(),
            self_attention: SelfAttention::Linear,
            patch_weight,
            patch_bias,
            time_embed,
            caption_linear_1: linear(&caption.pp("linear_1"), cfg.caption_channels, dim, true)?,
            caption_linear_2: linear(&caption.pp("linear_2"), dim, dim, true)?,
            caption_norm: norm_weight(&vb.pp("caption_norm"), dim)?,
            blocks,
            scale_shift_table: scale_shift_table(&vb, 2, dim)?,
            proj_out: linear(&vb.pp("proj_out"), dim, p * p * cfg.out_channels(), true)?,
        })
    }

    /// Loads `config.json` and `diffusion_pytorch_model*.safetensors` from a diffusers `transformer/` folder,
    /// converting the weights to `dtype`.
    pub fn load(transformer_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = SanaConfig::from_folder(transformer_dir)?;
        cfg.validate()
            .map_err(|msg| Error::model(transformer_dir.join("config.json"), msg))?;
        let vb = Weights::from_folder(transformer_dir, &["diffusion_pytorch_model"])?
            .var_builder(dtype, device);
        Self::new(&cfg, vb)
    }

    /// Selects the self-attention processor (default: the checkpoint's linear attention).
    pub fn with_self_attention(mut self, kind: SelfAttention) -> Self {
        self.self_attention = kind;
        self
    }

    pub fn config(&self) -> &SanaConfig {
        &self.config
    }

    /// The working dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The transformer blocks in order.
    pub fn blocks(&self) -> &[SanaTransformerBlock] {
        &self.blocks
    }

    /// The self-attention processor the blocks run.
    pub fn self_attention(&self) -> SelfAttention {
        self.self_attention
    }

    /// `time_embed(timestep, guidance)` → (`tmod` (B, 6D) driving the blocks, `temb` (B, D) driving the final
    /// norm), in the working dtype. The student (guidance variant) needs `guidance`; the teacher refuses it.
    pub fn time_embed(&self, timestep: &Dual, guidance: Option<&Tensor>) -> Result<(Dual, Dual)> {
        let (cond, linear) = match (&self.time_embed, guidance) {
            (
                TimeEmbed::Single {
                    timestep_embedder,
                    linear,
                },
                None,
            ) => (timestep_embedder.forward(timestep, self.dtype)?, linear),
            (
                TimeEmbed::Guided {
                    timestep_embedder,
                    guidance_embedder,
                    linear,
                },
                Some(g),
            ) => {
                let te = timestep_embedder.forward(timestep, self.dtype)?;
                let ge = guidance_embedder.forward(&Dual::constant(g.clone()), self.dtype)?;
                (te.add(&ge)?, linear)
            }
            (TimeEmbed::Single { .. }, Some(_)) => return Err(Error::Arg(
                "guidance given to a model without a guidance embedder (guidance_embeds = false)"
                    .into(),
            )),
            (TimeEmbed::Guided { .. }, None) => {
                return Err(Error::Arg(
                    "this model has a guidance embedder (guidance_embeds = true): pass guidance"
                        .into(),
                ))
            }
        };
        Ok((linear.forward(&cond.silu()?)?, cond))
    }

    /// Full forward (docs/ALGORITHM.md §3.9): hidden_states x (B, C, H, W), encoder_hidden_states (B, L, caption_channels),
    /// flow time `timestep` (B,), guidance (B,) (student only, already scaled), encoder_attention_mask (B, L)
    /// {1 keep, 0 drop}. Returns the velocity (B, C_out, H, W) in the working dtype; its tangent is the JVP
    /// along the tangents of `x` and `timestep`.
    pub fn forward(
        &self,
        x: &Dual,
        encoder_hidden_states: &Tensor,
        timestep: &Dual,
        guidance: Option<&Tensor>,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<Dual> {
        let text = self.text_context(encoder_hidden_states, encoder_attention_mask)?;
        self.forward_ctx(x, &text, timestep, guidance)
    }

    /// [`Self::forward`] over a precomputed [`TextContext`] of the prompts.
    pub fn forward_ctx(
        &self,
        x: &Dual,
        text: &TextContext,
        timestep: &Dual,
        guidance: Option<&Tensor>,
    ) -> Result<Dual> {
        let (out, _) = self.run(x, text, timestep, guidance, &[], false)?;
        Ok(out.expect("a full run produces the output"))
    }

    /// `forward`, also returning the outputs (B, N, D) of the blocks at the 0-based indices `taps`, in the
    /// order of `taps`.
    pub fn forward_with_taps(
        &self,
        x: &Dual,
        encoder_hidden_states: &Tensor,
        timestep: &Dual,
        guidance: Option<&Tensor>,
        encoder_attention_mask: Option<&Tensor>,
        taps: &[usize],
    ) -> Result<(Dual, Vec<Dual>)> {
        let text = self.text_context(encoder_hidden_states, encoder_attention_mask)?;
        let (out, features) = self.run(x, &text, timestep, guidance, taps, false)?;
        Ok((out.expect("a full run produces the output"), features))
    }

    /// Only the outputs of the blocks at `taps` (in the order of `taps`); stops after the last one of them.
    pub fn block_outputs(
        &self,
        x: &Dual,
        encoder_hidden_states: &Tensor,
        timestep: &Dual,
        guidance: Option<&Tensor>,
        encoder_attention_mask: Option<&Tensor>,
        taps: &[usize],
    ) -> Result<Vec<Dual>> {
        let text = self.text_context(encoder_hidden_states, encoder_attention_mask)?;
        self.block_outputs_ctx(x, &text, timestep, guidance, taps)
    }

    /// [`Self::block_outputs`] over a precomputed [`TextContext`] of the prompts.
    pub fn block_outputs_ctx(
        &self,
        x: &Dual,
        text: &TextContext,
        timestep: &Dual,
        guidance: Option<&Tensor>,
        taps: &[usize],
    ) -> Result<Vec<Dual>> {
        Ok(self.run(x, text, timestep, guidance, taps, true)?.1)
    }

    /// The caption branch (constant for any JVP): caption_projection (GELU-tanh; candle's `gelu` is the tanh
    /// approximation) → caption_norm, (B, L, D).
    fn caption(&self, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let y = encoder_hidden_states.to_dtype(self.dtype)?;
        let y = self
            .caption_linear_2
            .forward_t(&self.caption_linear_1.forward_t(&y)?.gelu()?)?;
        Ok(norm::rms_norm(&Dual::constant(y), &self.caption_norm, QK_NORM_EPS)?.primal)
    }

    /// The additive cross-attention bias (B, 1, 1, L), in the working dtype, of `encoder_attention_mask` (B, L)
    /// {1 keep, 0 drop}: 0 where kept, −10000 where dropped, broadcast over heads and queries.
    pub fn mask_bias(&self, encoder_attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = encoder_attention_mask.dims2()?;
        Ok(encoder_attention_mask
            .to_dtype(self.dtype)?
            .affine(-1.0, 1.0)?
            .affine(-10000.0, 0.0)?
            .reshape((b, 1, 1, l))?)
    }

    /// The part of `forward` before the blocks: patch embedding of x (B, C, H, W), time embedding of `timestep`
    /// (B,) (and `guidance`, student only), caption projection and norm of `encoder_hidden_states`.
    pub fn embed(
        &self,
        x: &Dual,
        encoder_hidden_states: &Tensor,
        timestep: &Dual,
        guidance: Option<&Tensor>,
    ) -> Result<BlockInputs> {
        let LatentInputs {
            hidden,
            tmod,
            temb,
            grid,
        } = self.embed_latent(x, timestep, guidance)?;
        Ok(BlockInputs {
            hidden,
            caption: Dual::constant(self.caption(encoder_hidden_states)?),
            tmod,
            temb,
            grid,
        })
    }

    /// The text-side work of `forward` for prompts `encoder_hidden_states` (B, L, caption_channels) and mask
    /// (B, L): caption projection + norm, every block's cross-attention keys and values, the mask bias.
    pub fn text_context(
        &self,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<TextContext> {
        let caption = Dual::constant(self.caption(encoder_hidden_states)?);
        Ok(TextContext {
            kv: self
                .blocks
                .iter()
                .map(|block| block.cross_kv(&caption))
                .collect::<Result<_>>()?,
            mask_bias: encoder_attention_mask
                .map(|m| self.mask_bias(m))
                .transpose()?,
        })
    }

    /// Patch embedding and time embedding: the latent-side part of `forward` before the blocks.
    fn embed_latent(
        &self,
        x: &Dual,
        timestep: &Dual,
        guidance: Option<&Tensor>,
    ) -> Result<LatentInputs> {
        let (b, c, height, width) = x.primal.dims4()?;
        let p = self.config.patch_size;
        if c != self.config.in_channels || !height.is_multiple_of(p) || !width.is_multiple_of(p) {
            return Err(Error::Arg(format!(
                "latent of shape {:?} does not fit the transformer (in_channels {}, patch size {p})",
                x.dims(),
                self.config.in_channels
            )));
        }
        if timestep.dims() != [b] {
            return Err(Error::Arg(format!(
                "timestep must have shape [{b}], got {:?}",
                timestep.dims()
            )));
        }
        let (gh, gw) = (height / p, width / p);

        // patch embed: (B, C, H, W) → (B, N, C·p·p) patches → (B, N, D)
        let patches = x
            .to_dtype(self.dtype)?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * p * p))?;
        // the conv as a Linear over flattened (C, p, p) patches (a view of the weight, taken here so that the
        // constructor never copies)
        let patch_embed = Linear::new(
            self.patch_weight.flatten_from(1)?,
            Some(self.patch_bias.clone()),
        );
        let hidden = patch_embed.forward(&patches)?;

        let (tmod, temb) = self.time_embed(timestep, guidance)?;
        Ok(LatentInputs {
            hidden,
            tmod,
            temb,
            grid: (gh, gw),
        })
    }

    /// The part of `forward` after the blocks: the last block's output `hidden` (B, N, D) and `temb` (B, D)
    /// through the modulated final norm, `proj_out` and unpatchify to the velocity (B, C_out, height, width).
    pub fn final_layer(
        &self,
        hidden: &Dual,
        temb: &Dual,
        height: usize,
        width: usize,
    ) -> Result<Dual> {
        let b = hidden.dims()[0];
        let p = self.config.patch_size;
        let (gh, gw) = (height / p, width / p);
        // shift, scale = scale_shift_table (1, 2, D) + temb (B, 1, D)
        let dim = self.config.inner_dim();
        let table = Dual::constant(self.scale_shift_table.unsqueeze(0)?);
        let shift_scale = temb.reshape((b, 1, dim))?.add(&table)?;
        let (shift, scale) = (shift_scale.narrow(1, 0, 1)?, shift_scale.narrow(1, 1, 1)?);
        let hidden = norm::layer_norm_modulate(hidden, &shift, &scale, NORM_OUT_EPS)?;
        let out = self.proj_out.forward(&hidden)?;

        // unpatchify: (B, N, p·p·C) → (B, H', W', p, p, C) → (B, C, H'·p, W'·p)
        let co = self.config.out_channels();
        Ok(out
            .reshape((b, gh, gw, p, p, co))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, co, height, width))?)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        x: &Dual,
        text: &TextContext,
        timestep: &Dual,
        guidance: Option<&Tensor>,
        taps: &[usize],
        stop_after_taps: bool,
    ) -> Result<(Option<Dual>, Vec<Dual>)> {
        if let Some(&bad) = taps.iter().find(|&&i| i >= self.blocks.len()) {
            return Err(Error::Arg(format!(
                "block index {bad} out of range: the model has {} blocks",
                self.blocks.len()
            )));
        }
        if text.kv.len() != self.blocks.len() {
            return Err(Error::Arg(format!(
                "text context has {} blocks, the model {}",
                text.kv.len(),
                self.blocks.len()
            )));
        }
        let LatentInputs {
            mut hidden,
            tmod,
            temb,
            grid: (gh, gw),
        } = self.embed_latent(x, timestep, guidance)?;

        let last_tap = taps.iter().copied().max();
        let mut tapped: Vec<(usize, Dual)> = Vec::with_capacity(taps.len());
        for (i, (block, kv)) in self.blocks.iter().zip(&text.kv).enumerate() {
            hidden = block.forward_kv(
                &hidden,
                kv,
                text.mask_bias.as_ref(),
                &tmod,
                gh,
                gw,
                self.self_attention,
            )?;
            if taps.contains(&i) {
                tapped.push((i, hidden.clone()));
            }
            if stop_after_taps && Some(i) == last_tap {
                break;
            }
        }
        let features = taps
            .iter()
            .map(|i| {
                tapped
                    .iter()
                    .find(|(j, _)| j == i)
                    .map(|(_, f)| f.clone())
                    .expect("every tap was recorded")
            })
            .collect();
        if stop_after_taps {
            return Ok((None, features));
        }
        let (height, width) = (x.dims()[2], x.dims()[3]);
        let out = self.final_layer(&hidden, &temb, height, width)?;
        Ok((Some(out), features))
    }
}
