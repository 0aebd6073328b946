//! DC-AE (diffusers `AutoencoderDC`, docs/ALGORITHM.md §3.10): a deterministic convolutional autoencoder with 2^(stages-1)
//! spatial compression (32 for SANA). Encoder and decoder are loaded from a diffusers `vae/` folder by their
//! real key names; `encode` returns the raw latent (the caller applies `scaling_factor`).

use std::path::Path;

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::models::weights::Weights;
use crate::nn::conv::{
    channel_group_mean, conv2d, grouped_conv1x1, pixel_shuffle, pixel_unshuffle,
    pixel_unshuffle_group_mean, pointwise_conv, repeat_interleave_channels,
};
use crate::nn::depthwise::depthwise_conv2d;
use crate::nn::norm::rms_norm_channels;
use crate::profile;

/// Every DC-AE norm (RMSNorm and BatchNorm2d) uses this epsilon.
const NORM_EPS: f64 = 1e-5;
/// Denominator guard of the ReLU linear attention (`SanaMultiscaleLinearAttention.eps`).
const ATTENTION_EPS: f64 = 1e-15;

/// A stage's block type (`encoder_block_types` / `decoder_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum BlockType {
    ResBlock,
    EfficientViTBlock,
}

impl TryFrom<String> for BlockType {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.as_str() {
            "ResBlock" => Ok(Self::ResBlock),
            "EfficientViTBlock" => Ok(Self::EfficientViTBlock),
            _ => Err(format!(
                "unsupported DC-AE block type {s:?} (supported: \"ResBlock\", \"EfficientViTBlock\")"
            )),
        }
    }
}

/// A decoder stage's norm (`decoder_norm_types`); BatchNorm runs in eval mode from its running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum NormType {
    RmsNorm,
    BatchNorm,
}

impl TryFrom<String> for NormType {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.as_str() {
            "rms_norm" => Ok(Self::RmsNorm),
            "batch_norm" => Ok(Self::BatchNorm),
            _ => Err(format!(
                "unsupported DC-AE norm type {s:?} (supported: \"rms_norm\", \"batch_norm\")"
            )),
        }
    }
}

/// An activation of diffusers' `get_activation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Activation {
    Silu,
    Relu,
    /// `nn.GELU()`: the exact (erf) form.
    Gelu,
}

impl TryFrom<String> for Activation {
    type Error = String;
    /// diffusers `get_activation` lower-cases the name before looking it up (`models/activations.py`).
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.to_lowercase().as_str() {
            "silu" | "swish" => Ok(Self::Silu),
            "relu" => Ok(Self::Relu),
            "gelu" => Ok(Self::Gelu),
            _ => Err(format!(
                "unsupported DC-AE activation {s:?} (supported, in any case: \"silu\", \"swish\", \"relu\", \"gelu\")"
            )),
        }
    }
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
        }
    }
}

/// `downsample_block_type`: a conv followed by pixel_unshuffle when the value is exactly `"pixel_unshuffle"`,
/// otherwise a stride-2 conv (SANA spells it `"Conv"`). diffusers `Encoder.__init__` (`autoencoder_dc.py`) only
/// tests `downsample_block_type == "pixel_unshuffle"`, so any other spelling builds the strided conv.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum DownsampleType {
    Conv,
    PixelUnshuffle,
}

impl From<String> for DownsampleType {
    fn from(s: String) -> Self {
        if s == "pixel_unshuffle" {
            Self::PixelUnshuffle
        } else {
            Self::Conv
        }
    }
}

/// `upsample_block_type`: nearest x2 then conv when the value is exactly `"interpolate"` (SANA), otherwise a
/// conv followed by pixel_shuffle. diffusers `Decoder.__init__` (`autoencoder_dc.py`) only tests
/// `upsample_block_type == "interpolate"`, so any other spelling builds the pixel-shuffle block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum UpsampleType {
    Interpolate,
    PixelShuffle,
}

impl From<String> for UpsampleType {
    fn from(s: String) -> Self {
        if s == "interpolate" {
            Self::Interpolate
        } else {
            Self::PixelShuffle
        }
    }
}

/// A config value given either once for all stages (a string) or per stage (a list).
#[derive(Debug, Clone, PartialEq)]
pub enum PerStage<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Copy> PerStage<T> {
    /// The value of each of `stages` stages.
    pub fn resolve(&self, stages: usize, field: &str) -> std::result::Result<Vec<T>, String> {
        match self {
            Self::All(v) => Ok(vec![*v; stages]),
            Self::Each(v) if v.len() == stages => Ok(v.clone()),
            Self::Each(v) => Err(format!(
                "{field} lists {} values but the model has {stages} stages",
                v.len()
            )),
        }
    }
}

impl<'de, T: TryFrom<String, Error = String>> Deserialize<'de> for PerStage<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::One(s) => T::try_from(s).map(Self::All).map_err(D::Error::custom),
            Raw::Many(v) => v
                .into_iter()
                .map(T::try_from)
                .collect::<std::result::Result<_, _>>()
                .map(Self::Each)
                .map_err(D::Error::custom),
        }
    }
}

/// `vae/config.json` of a diffusers `AutoencoderDC`; every default is that of `AutoencoderDC.__init__`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DcaeConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_block_types")]
    pub encoder_block_types: PerStage<BlockType>,
    #[serde(default = "default_block_types")]
    pub decoder_block_types: PerStage<BlockType>,
    #[serde(default = "default_block_out_channels")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_encoder_layers_per_block")]
    pub encoder_layers_per_block: Vec<usize>,
    #[serde(default = "default_decoder_layers_per_block")]
    pub decoder_layers_per_block: Vec<usize>,
    #[serde(default = "default_qkv_multiscales")]
    pub encoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "default_qkv_multiscales")]
    pub decoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "default_upsample_block_type")]
    pub upsample_block_type: UpsampleType,
    #[serde(default = "default_downsample_block_type")]
    pub downsample_block_type: DownsampleType,
    #[serde(default = "default_decoder_norm_types")]
    pub decoder_norm_types: PerStage<NormType>,
    #[serde(default = "default_decoder_act_fns")]
    pub decoder_act_fns: PerStage<Activation>,
    #[serde(default = "default_true")]
    pub encoder_out_shortcut: bool,
    #[serde(default = "default_true")]
    pub decoder_in_shortcut: bool,
    #[serde(default = "default_decoder_conv_act_fn")]
    pub decoder_conv_act_fn: Activation,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
}

fn default_in_channels() -> usize {
    3
}
fn default_latent_channels() -> usize {
    32
}
fn default_attention_head_dim() -> usize {
    32
}
fn default_block_types() -> PerStage<BlockType> {
    PerStage::All(BlockType::ResBlock)
}
fn default_block_out_channels() -> Vec<usize> {
    vec![128, 256, 512, 512, 1024, 1024]
}
fn default_encoder_layers_per_block() -> Vec<usize> {
    vec![2, 2, 2, 3, 3, 3]
}
fn default_decoder_layers_per_block() -> Vec<usize> {
    vec![3, 3, 3, 3, 3, 3]
}
fn default_qkv_multiscales() -> Vec<Vec<usize>> {
    vec![vec![], vec![], vec![], vec![5], vec![5], vec![5]]
}
fn default_upsample_block_type() -> UpsampleType {
    UpsampleType::PixelShuffle
}
fn default_downsample_block_type() -> DownsampleType {
    DownsampleType::PixelUnshuffle
}
fn default_decoder_norm_types() -> PerStage<NormType> {
    PerStage::All(NormType::RmsNorm)
}
fn default_decoder_act_fns() -> PerStage<Activation> {
    PerStage::All(Activation::Silu)
}
fn default_true() -> bool {
    true
}
fn default_decoder_conv_act_fn() -> Activation {
    Activation::Relu
}
fn default_scaling_factor() -> f64 {
    1.0
}

/// One stage of the encoder or the decoder, with its per-stage settings resolved.
#[derive(Debug, Clone)]
struct Stage {
    channels: usize,
    layers: usize,
    block: BlockType,
    norm: NormType,
    act: Activation,
    multiscales: Vec<usize>,
}

impl DcaeConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        if !path.is_file() {
            return Err(crate::Error::Missing {
                what: "DC-AE config".into(),
                path: path.to_path_buf(),
                hint: format!(
                    "a diffusers AutoencoderDC folder (e.g. the `vae/` folder of a SANA pipeline) holds \
                     config.json and diffusion_pytorch_model.safetensors; download it: {}",
                    crate::hub::download_command(path)
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| {
                crate::Error::model(
                    path,
                    format!(
                        "invalid DC-AE config ({e}): the file is damaged or not a diffusers config; download it \
                         again: {}",
                        crate::hub::download_command(path)
                    ),
                )
            })?;
        cfg.encoder_stages()
            .and_then(|_| cfg.decoder_stages())
            .map_err(|e| crate::Error::model(path, format!("unsupported DC-AE config: {e}")))?;
        Ok(cfg)
    }

    /// Spatial compression of the encoder: 2^(stages - 1).
    pub fn spatial_compression(&self) -> usize {
        1 << self.encoder_block_out_channels.len().saturating_sub(1)
    }

    fn encoder_stages(&self) -> std::result::Result<Vec<Stage>, String> {
        let n = self.encoder_block_out_channels.len();
        let blocks = self.encoder_block_types.resolve(n, "encoder_block_types")?;
        // The encoder always uses RMSNorm and SiLU, whatever the decoder settings.
        let stages = self.stages(
            "encoder",
            &self.encoder_block_out_channels,
            &self.encoder_layers_per_block,
            &self.encoder_qkv_multiscales,
            &blocks,
            &vec![NormType::RmsNorm; n],
            &vec![Activation::Silu; n],
        )?;
        if self.encoder_out_shortcut && !stages[n - 1].channels.is_multiple_of(self.latent_channels)
        {
            return Err(format!(
                "encoder_out_shortcut needs the last stage width {} to be a multiple of latent_channels {}",
                stages[n - 1].channels,
                self.latent_channels
            ));
        }
        Ok(stages)
    }

    fn decoder_stages(&self) -> std::result::Result<Vec<Stage>, String> {
        let n = self.decoder_block_out_channels.len();
        let blocks = self.decoder_block_types.resolve(n, "decoder_block_types")?;
        let norms = self.decoder_norm_types.resolve(n, "decoder_norm_types")?;
        let acts = self.decoder_act_fns.resolve(n, "decoder_act_fns")?;
        let stages = self.stages(
            "decoder",
            &self.decoder_block_out_channels,
            &self.decoder_layers_per_block,
            &self.decoder_qkv_multiscales,
            &blocks,
            &norms,
            &acts,
        )?;
        if self.decoder_in_shortcut && !stages[n - 1].channels.is_multiple_of(self.latent_channels)
        {
            return Err(format!(
                "decoder_in_shortcut needs the last stage width {} to be a multiple of latent_channels {}",
                stages[n - 1].channels,
                self.latent_channels
            ));
        }
        Ok(stages)
    }

    #[allow(clippy::too_many_arguments)]
    fn stages(
        &self,
        side: &str,
        channels: &[usize],
        layers: &[usize],
        multiscales: &[Vec<usize>],
        blocks: &[BlockType],
        norms: &[NormType],
        acts: &[Activation],
    ) -> std::result::Result<Vec<Stage>, String> {
        let n = channels.len();
        if n == 0 {
            return Err(format!("{side}_block_out_channels is empty"));
        }
        if layers.len() != n || multiscales.len() != n {
            return Err(format!(
                "{side}_layers_per_block ({}) and {side}_qkv_multiscales ({}) must list one entry per stage ({n})",
                layers.len(),
                multiscales.len()
            ));
        }
        if self.latent_channels == 0 || self.in_channels == 0 || self.attention_head_dim == 0 {
            return Err(
                "in_channels, latent_channels and attention_head_dim must be positive".into(),
            );
        }
        for i in 0..n {
            if layers[i] == 0 && (i > 0 || n < 2) {
                return Err(format!(
                    "{side}_layers_per_block[{i}] = 0 is only supported for the first of several stages"
                ));
            }
            if channels[i] == 0 {
                return Err(format!("{side}_block_out_channels[{i}] is 0"));
            }
            if blocks[i] == BlockType::EfficientViTBlock {
                if channels[i] < self.attention_head_dim {
                    return Err(format!(
                        "{side} stage {i}: width {} is smaller than attention_head_dim {}",
                        channels[i], self.attention_head_dim
                    ));
                }
                if let Some(k) = multiscales[i].iter().find(|k| k.is_multiple_of(2)) {
                    return Err(format!(
                        "{side} stage {i}: qkv multiscale kernel {k} must be odd"
                    ));
                }
            }
            // Resampling between stages i and i + 1 averages (or repeats) groups of 4·C_i / C_(i+1) channels.
            if i + 1 < n && layers[i] > 0 && !(channels[i] * 4).is_multiple_of(channels[i + 1]) {
                return Err(format!(
                    "{side}: resampling between stages of {} and {} channels needs 4·{} to be a multiple of {}",
                    channels[i],
                    channels[i + 1],
                    channels[i],
                    channels[i + 1]
                ));
            }
        }
        Ok((0..n)
            .map(|i| Stage {
                channels: channels[i],
                layers: layers[i],
                block: blocks[i],
                norm: norms[i],
                act: acts[i],
                multiscales: multiscales[i].clone(),
            })
            .collect())
    }
}

fn config_error(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("unsupported DC-AE config: {msg}"))
}

/// A dense convolution with zero padding `kernel / 2`.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
}

impl Conv {
    fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_ch, in_ch, kernel, kernel), "weight")?,
            bias: if bias {
                Some(vb.get(out_ch, "bias")?)
            } else {
                None
            },
            stride,
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let padding = self.weight.dim(2)? / 2;
        conv2d(x, &self.weight, self.bias.as_ref(), padding, self.stride)
    }
}

/// A norm over the channel axis of NCHW tensors.
#[derive(Debug, Clone)]
enum ChannelNorm {
    /// diffusers `RMSNorm(C, 1e-5, elementwise_affine=True, bias=True)`.
    Rms { weight: Tensor, bias: Tensor },
    /// `BatchNorm2d` in eval mode, folded into a per-channel scale and shift.
    Batch { scale: Tensor, shift: Tensor },
}

impl ChannelNorm {
    fn new(vb: VarBuilder, kind: NormType, channels: usize) -> Result<Self> {
        Ok(match kind {
            NormType::RmsNorm => Self::Rms {
                weight: vb.get(channels, "weight")?,
                bias: vb.get(channels, "bias")?,
            },
            NormType::BatchNorm => {
                let weight = vb.get(channels, "weight")?;
                let bias = vb.get(channels, "bias")?;
                let mean = vb.get(channels, "running_mean")?;
                let var = vb.get(channels, "running_var")?;
                let scale = (weight / (var + NORM_EPS)?.sqrt()?)?;
                let shift = (bias - (mean * &scale)?)?;
                Self::Batch {
                    scale: scale.reshape((1, channels, 1, 1))?,
                    shift: shift.reshape((1, channels, 1, 1))?,
                }
            }
        })
    }
}

impl Module for ChannelNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Rms { weight, bias } => rms_norm_channels(x, weight, Some(bias), NORM_EPS),
            Self::Batch { scale, shift } => x.broadcast_mul(scale)?.broadcast_add(shift),
        }
    }
}

/// `ResBlock`: conv3x3 -> act -> conv3x3 (no bias) -> norm, plus the input.
#[derive(Debug, Clone)]
struct ResBlock {
    conv1: Conv,
    conv2: Conv,
    norm: ChannelNorm,
    act: Activation,
}

impl ResBlock {
    fn new(vb: VarBuilder, channels: usize, norm: NormType, act: Activation) -> Result<Self> {
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), channels, channels, 3, 1, true)?,
            conv2: Conv::new(vb.pp("conv2"), channels, channels, 3, 1, false)?,
            norm: ChannelNorm::new(vb.pp("norm"), norm, channels)?,
            act,
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.conv1.forward(x)?)?;
        let h = self.norm.forward(&self.conv2.forward(&h)?)?;
        h + x
    }
}

/// One `to_qkv_multiscale.{i}` branch: depthwise kxk conv then a grouped 1x1 conv (3·heads groups).
#[derive(Debug, Clone)]
struct MultiscaleProjection {
    proj_in: Tensor,
    proj_out: Tensor,
    groups: usize,
}

impl Module for MultiscaleProjection {
    fn forward(&self, qkv: &Tensor) -> Result<Tensor> {
        let padding = self.proj_in.dim(2)? / 2;
        let h = depthwise_conv2d(qkv, &self.proj_in, None, padding)?;
        grouped_conv1x1(&h, &self.proj_out, self.groups)
    }
}

/// `SanaMultiscaleLinearAttention` with `SanaMultiscaleAttnProcessor2_0` (docs/ALGORITHM.md §3.10), residual included.
#[derive(Debug, Clone)]
struct MultiscaleAttention {
    /// `to_q`, `to_k`, `to_v` stacked: one matmul yields the concatenated (q, k, v) channels.
    qkv: Tensor,
    multiscale: Vec<MultiscaleProjection>,
    to_out: Tensor,
    norm_out: ChannelNorm,
    head_dim: usize,
}

impl MultiscaleAttention {
    fn new(
        vb: VarBuilder,
        channels: usize,
        head_dim: usize,
        kernels: &[usize],
        norm: NormType,
    ) -> Result<Self> {
        let heads = channels / head_dim;
        let inner = heads * head_dim;
        let qkv = Tensor::cat(
            &[
                vb.get((inner, channels), "to_q.weight")?,
                vb.get((inner, channels), "to_k.weight")?,
                vb.get((inner, channels), "to_v.weight")?,
            ],
            0,
        )?;
        let multiscale = kernels
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let vb = vb.pp("to_qkv_multiscale").pp(i);
                Ok(MultiscaleProjection {
                    proj_in: vb.get((3 * inner, 1, k, k), "proj_in.weight")?,
                    proj_out: vb.get((3 * inner, head_dim, 1, 1), "proj_out.weight")?,
                    groups: 3 * heads,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            qkv,
            multiscale,
            to_out: vb.get((channels, inner * (1 + kernels.len())), "to_out.weight")?,
            norm_out: ChannelNorm::new(vb.pp("norm_out"), norm, channels)?,
            head_dim,
        })
    }

    /// ReLU-kernel linear attention with the "row of ones" normaliser, in f32. q, k, v: (B, G, d, N).
    fn linear_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let d = q.dim(2)?;
        let kt = k.t()?;
        // [v; 1]·kᵀ: the appended row of ones contributes Σ_n k_n.
        let scores = Tensor::cat(&[v.matmul(&kt)?, k.sum_keepdim(3)?.t()?], 2)?;
        let out = scores.matmul(q)?;
        out.narrow(2, 0, d)?
            .broadcast_div(&(out.narrow(2, d, 1)? + ATTENTION_EPS)?)
    }

    /// Quadratic form for maps with at most `head_dim` pixels; scores normalised over the key axis in f32.
    fn quadratic_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let scores = k.t()?.matmul(q)?.to_dtype(DType::F32)?;
        let scores = scores.broadcast_div(&(scores.sum_keepdim(2)? + ATTENTION_EPS)?)?;
        v.matmul(&scores.to_dtype(v.dtype())?)
    }
}

impl Module for MultiscaleAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let (d, n) = (self.head_dim, h * w);
        let qkv = pointwise_conv(x, &self.qkv, None)?;
        let mut branches = vec![qkv.clone()];
        for projection in &self.multiscale {
            branches.push(projection.forward(&qkv)?);
        }
        let all = Tensor::cat(&branches, 1)?;
        let use_linear = n > d;
        let all = if use_linear {
            all.to_dtype(DType::F32)?
        } else {
            all
        };
        // Every consecutive 3·d channels form one group (q, k, v), across the to_q/to_k/to_v boundaries.
        let groups = all.dim(1)? / (3 * d);
        let all = all.reshape((b, groups, 3 * d, n))?;
        let q = all.narrow(2, 0, d)?.relu()?;
        let k = all.narrow(2, d, d)?.relu()?;
        let v = all.narrow(2, 2 * d, d)?;
        let out = if use_linear {
            Self::linear_attention(&q, &k, &v)?.to_dtype(x.dtype())?
        } else {
            Self::quadratic_attention(&q, &k, &v)?
        };
        let out = pointwise_conv(&out.reshape((b, groups * d, h, w))?, &self.to_out, None)?;
        self.norm_out.forward(&out)? + x
    }
}

/// `GLUMBConv(C, C, expand_ratio=4, norm_type="rms_norm", residual_connection=True)`.
#[derive(Debug, Clone)]
struct GluMbConv {
    inverted_weight: Tensor,
    inverted_bias: Tensor,
    depth_weight: Tensor,
    depth_bias: Tensor,
    point_weight: Tensor,
    norm: ChannelNorm,
    hidden: usize,
}

impl GluMbConv {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let hidden = 4 * channels;
        Ok(Self {
            inverted_weight: vb.get((2 * hidden, channels, 1, 1), "conv_inverted.weight")?,
            inverted_bias: vb.get(2 * hidden, "conv_inverted.bias")?,
            depth_weight: vb.get((2 * hidden, 1, 3, 3), "conv_depth.weight")?,
            depth_bias: vb.get(2 * hidden, "conv_depth.bias")?,
            point_weight: vb.get((channels, hidden, 1, 1), "conv_point.weight")?,
            norm: ChannelNorm::new(vb.pp("norm"), NormType::RmsNorm, channels)?,
            hidden,
        })
    }
}

impl Module for GluMbConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = pointwise_conv(x, &self.inverted_weight, Some(&self.inverted_bias))?.silu()?;
        let h = depthwise_conv2d(&h, &self.depth_weight, Some(&self.depth_bias), 1)?;
        let gated =
            (h.narrow(1, 0, self.hidden)? * h.narrow(1, self.hidden, self.hidden)?.silu()?)?;
        let out = pointwise_conv(&gated, &self.point_weight, None)?;
        self.norm.forward(&out)? + x
    }
}

/// `DCDownBlock2d`: halves H and W; the shortcut averages groups of pixel-unshuffled channels.
#[derive(Debug, Clone)]
struct DownBlock {
    conv: Conv,
    unshuffle: bool,
    shortcut_group: Option<usize>,
}

impl DownBlock {
    fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kind: DownsampleType,
        shortcut: bool,
    ) -> Result<Self> {
        let unshuffle = kind == DownsampleType::PixelUnshuffle;
        let conv = if unshuffle {
            if !out_ch.is_multiple_of(4) {
                return Err(config_error(format!(
                    "pixel_unshuffle downsampling to {out_ch} channels needs a multiple of 4"
                )));
            }
            Conv::new(vb.pp("conv"), in_ch, out_ch / 4, 3, 1, true)?
        } else {
            Conv::new(vb.pp("conv"), in_ch, out_ch, 3, 2, true)?
        };
        Ok(Self {
            conv,
            unshuffle,
            shortcut_group: shortcut.then_some(in_ch * 4 / out_ch),
        })
    }
}

impl Module for DownBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let main = self.conv.forward(x)?;
        let main = if self.unshuffle {
            pixel_unshuffle(&main, 2)?
        } else {
            main
        };
        match self.shortcut_group {
            Some(group) => main + pixel_unshuffle_group_mean(x, group)?,
            None => Ok(main),
        }
    }
}

/// `DCUpBlock2d`: doubles H and W; the shortcut repeats channels then pixel-shuffles them.
#[derive(Debug, Clone)]
struct UpBlock {
    conv: Conv,
    interpolate: bool,
    shortcut_repeats: Option<usize>,
}

impl UpBlock {
    fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kind: UpsampleType,
        shortcut: bool,
    ) -> Result<Self> {
        let interpolate = kind == UpsampleType::Interpolate;
        let conv_out = if interpolate { out_ch } else { out_ch * 4 };
        Ok(Self {
            conv: Conv::new(vb.pp("conv"), in_ch, conv_out, 3, 1, true)?,
            interpolate,
            shortcut_repeats: shortcut.then_some(out_ch * 4 / in_ch),
        })
    }
}

impl Module for UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let main = if self.interpolate {
            self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?
        } else {
            pixel_shuffle(&self.conv.forward(x)?, 2)?
        };
        match self.shortcut_repeats {
            Some(r) => main + pixel_shuffle(&repeat_interleave_channels(x, r)?, 2)?,
            None => Ok(main),
        }
    }
}

/// `EfficientViTBlock`: multiscale linear attention then GLUMBConv, each with its residual.
#[derive(Debug, Clone)]
struct EfficientVitBlock {
    attn: MultiscaleAttention,
    conv_out: GluMbConv,
}

#[derive(Debug, Clone)]
enum Block {
    Conv(Conv),
    Res(ResBlock),
    EfficientVit(EfficientVitBlock),
    Down(DownBlock),
    Up(UpBlock),
}

impl Block {
    fn stage_block(vb: VarBuilder, stage: &Stage, head_dim: usize) -> Result<Self> {
        Ok(match stage.block {
            BlockType::ResBlock => {
                Self::Res(ResBlock::new(vb, stage.channels, stage.norm, stage.act)?)
            }
            BlockType::EfficientViTBlock => Self::EfficientVit(EfficientVitBlock {
                attn: MultiscaleAttention::new(
                    vb.pp("attn"),
                    stage.channels,
                    head_dim,
                    &stage.multiscales,
                    stage.norm,
                )?,
                conv_out: GluMbConv::new(vb.pp("conv_out"), stage.channels)?,
            }),
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // `--profile` stages (no-ops unless a profile runs on this thread)
        let mark = |y: Tensor, stage: &'static str| -> Result<Tensor> {
            profile::mark(stage).map_err(candle_core::Error::wrap)?;
            Ok(y)
        };
        match self {
            Self::Conv(c) => mark(c.forward(x)?, "dcae_conv"),
            Self::Res(b) => mark(b.forward(x)?, "dcae_resblock"),
            Self::EfficientVit(b) => {
                let h = mark(b.attn.forward(x)?, "dcae_attention")?;
                mark(b.conv_out.forward(&h)?, "dcae_glumbconv")
            }
            Self::Down(b) => mark(b.forward(x)?, "dcae_down"),
            Self::Up(b) => mark(b.forward(x)?, "dcae_up"),
        }
    }
}

fn run(blocks: &[Block], x: Tensor) -> Result<Tensor> {
    blocks.iter().try_fold(x, |x, block| block.forward(&x))
}

/// The DC-AE encoder (`encoder.*` keys): image (B, in_channels, H, W) in [-1, 1] -> raw latent.
#[derive(Debug, Clone)]
pub struct DcaeEncoder {
    conv_in: Block,
    /// `down_blocks.{i}`: the stage's blocks then its downsampling block.
    down_blocks: Vec<Vec<Block>>,
    conv_out: Conv,
    out_shortcut_group: Option<usize>,
    in_channels: usize,
    compression: usize,
}

impl DcaeEncoder {
    /// Builds the encoder from `vb` rooted at the encoder (`vb.pp("encoder")` of a full checkpoint).
    pub fn new(cfg: &DcaeConfig, vb: VarBuilder) -> Result<Self> {
        let stages = cfg.encoder_stages().map_err(config_error)?;
        let n = stages.len();
        let conv_in = if stages[0].layers > 0 {
            Block::Conv(Conv::new(
                vb.pp("conv_in"),
                cfg.in_channels,
                stages[0].channels,
                3,
                1,
                true,
            )?)
        } else {
            Block::Down(DownBlock::new(
                vb.pp("conv_in"),
                cfg.in_channels,
                stages[1].channels,
                cfg.downsample_block_type,
                false,
            )?)
        };
        let mut down_blocks = Vec::with_capacity(n);
        for (i, stage) in stages.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let mut blocks = (0..stage.layers)
                .map(|j| Block::stage_block(vb.pp(j), stage, cfg.attention_head_dim))
                .collect::<Result<Vec<_>>>()?;
            if i + 1 < n && stage.layers > 0 {
                blocks.push(Block::Down(DownBlock::new(
                    vb.pp(stage.layers),
                    stage.channels,
                    stages[i + 1].channels,
                    cfg.downsample_block_type,
                    true,
                )?));
            }
            down_blocks.push(blocks);
        }
        let last = stages[n - 1].channels;
        Ok(Self {
            conv_in,
            down_blocks,
            conv_out: Conv::new(vb.pp("conv_out"), last, cfg.latent_channels, 3, 1, true)?,
            out_shortcut_group: cfg
                .encoder_out_shortcut
                .then_some(last / cfg.latent_channels),
            in_channels: cfg.in_channels,
            compression: cfg.spatial_compression(),
        })
    }

    /// Loads only the encoder of a diffusers `vae/` folder (about half the memory of the full autoencoder).
    pub fn load(vae_dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let (cfg, vb) = open_vae_folder(vae_dir, dtype, device)?;
        Ok(Self::new(&cfg, vb.pp("encoder"))?)
    }

    /// Image (B, in_channels, H, W), H and W multiples of the spatial compression -> raw latent.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != self.in_channels {
            bail!(
                "DC-AE encode: input has {c} channels, the model expects {}",
                self.in_channels
            )
        }
        if !h.is_multiple_of(self.compression)
            || !w.is_multiple_of(self.compression)
            || h == 0
            || w == 0
        {
            bail!(
                "DC-AE encode: image size {h}x{w} must be a positive multiple of the spatial compression {}",
                self.compression
            )
        }
        let mut hidden = self.conv_in.forward(x)?;
        profile::mark("dcae_conv_in").map_err(candle_core::Error::wrap)?;
        for blocks in &self.down_blocks {
            hidden = run(blocks, hidden)?;
        }
        let out = self.conv_out.forward(&hidden)?;
        let out = match self.out_shortcut_group {
            Some(group) => (out + channel_group_mean(&hidden, group)?)?,
            None => out,
        };
        profile::mark("dcae_conv_out").map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
}

/// The DC-AE decoder (`decoder.*` keys): raw latent (B, latent_channels, h, w) -> image in about [-1, 1].
#[derive(Debug, Clone)]
pub struct DcaeDecoder {
    conv_in: Conv,
    in_shortcut_repeats: Option<usize>,
    /// `up_blocks.{i}`: the upsampling block into stage i then the stage's blocks; run from the last to the
    /// first stage.
    up_blocks: Vec<Vec<Block>>,
    norm_out: ChannelNorm,
    conv_act: Activation,
    conv_out: Block,
    latent_channels: usize,
}

impl DcaeDecoder {
    /// Builds the decoder from `vb` rooted at the decoder (`vb.pp("decoder")` of a full checkpoint).
    pub fn new(cfg: &DcaeConfig, vb: VarBuilder) -> Result<Self> {
        let stages = cfg.decoder_stages().map_err(config_error)?;
        let n = stages.len();
        let last = stages[n - 1].channels;
        let mut up_blocks = Vec::with_capacity(n);
        for (i, stage) in stages.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let mut blocks = Vec::with_capacity(stage.layers + 1);
            if i + 1 < n && stage.layers > 0 {
                blocks.push(Block::Up(UpBlock::new(
                    vb.pp(0),
                    stages[i + 1].channels,
                    stage.channels,
                    cfg.upsample_block_type,
                    true,
                )?));
            }
            let offset = blocks.len();
            for j in 0..stage.layers {
                blocks.push(Block::stage_block(
                    vb.pp(offset + j),
                    stage,
                    cfg.attention_head_dim,
                )?);
            }
            up_blocks.push(blocks);
        }
        // With an empty first stage the head works at the second stage's width and upsamples itself.
        let head = if stages[0].layers > 0 {
            stages[0].channels
        } else {
            stages[1].channels
        };
        let conv_out = if stages[0].layers > 0 {
            Block::Conv(Conv::new(
                vb.pp("conv_out"),
                head,
                cfg.in_channels,
                3,
                1,
                true,
            )?)
        } else {
            Block::Up(UpBlock::new(
                vb.pp("conv_out"),
                head,
                cfg.in_channels,
                cfg.upsample_block_type,
                false,
            )?)
        };
        Ok(Self {
            conv_in: Conv::new(vb.pp("conv_in"), cfg.latent_channels, last, 3, 1, true)?,
            in_shortcut_repeats: cfg
                .decoder_in_shortcut
                .then_some(last / cfg.latent_channels),
            up_blocks,
            norm_out: ChannelNorm::new(vb.pp("norm_out"), NormType::RmsNorm, head)?,
            conv_act: cfg.decoder_conv_act_fn,
            conv_out,
            latent_channels: cfg.latent_channels,
        })
    }

    /// Raw latent (B, latent_channels, h, w) -> image (B, in_channels, h·compression, w·compression).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = z.dims4()?;
        if c != self.latent_channels {
            bail!(
                "DC-AE decode: latent has {c} channels, the model expects {}",
                self.latent_channels
            )
        }
        let mut hidden = self.conv_in.forward(z)?;
        if let Some(r) = self.in_shortcut_repeats {
            hidden = (hidden + repeat_interleave_channels(z, r)?)?;
        }
        for blocks in self.up_blocks.iter().rev() {
            hidden = run(blocks, hidden)?;
        }
        let hidden = self.conv_act.apply(&self.norm_out.forward(&hidden)?)?;
        self.conv_out.forward(&hidden)
    }
}

/// Reads `config.json` and opens `diffusion_pytorch_model.safetensors` of a diffusers `vae/` folder.
fn open_vae_folder(
    vae_dir: &Path,
    dtype: DType,
    device: &Device,
) -> crate::Result<(DcaeConfig, VarBuilder<'static>)> {
    if !vae_dir.is_dir() {
        return Err(crate::Error::Missing {
            what: "DC-AE (vae) folder".into(),
            path: vae_dir.to_path_buf(),
            hint: "pass the `vae/` folder of a SANA pipeline (e.g. from \
                   Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers) or of \
                   mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
                .into(),
        });
    }
    let cfg = DcaeConfig::from_file(&vae_dir.join("config.json"))?;
    let weights = Weights::from_folder(vae_dir, &["diffusion_pytorch_model"])?;
    Ok((cfg, weights.var_builder(dtype, device)))
}

/// diffusers `AutoencoderDC`: `encode` (image -> raw latent) and `decode` (raw latent -> image).
#[derive(Debug, Clone)]
pub struct AutoencoderDc {
    cfg: DcaeConfig,
    encoder: DcaeEncoder,
    decoder: DcaeDecoder,
}

impl AutoencoderDc {
    /// Loads a diffusers `vae/` folder (`config.json` + `diffusion_pytorch_model.safetensors`), converting
    /// the stored weights to `dtype`.
    pub fn load(vae_dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let (cfg, vb) = open_vae_folder(vae_dir, dtype, device)?;
        Ok(Self::new(cfg, vb)?)
    }

    /// Builds the model from `vb` rooted at the checkpoint (keys `encoder.*`, `decoder.*`).
    pub fn new(cfg: DcaeConfig, vb: VarBuilder) -> Result<Self> {
        let encoder = DcaeEncoder::new(&cfg, vb.pp("encoder"))?;
        let decoder = DcaeDecoder::new(&cfg, vb.pp("decoder"))?;
        Ok(Self {
            cfg,
            encoder,
            decoder,
        })
    }

    /// Image (B, 3, H, W) in [-1, 1], H and W multiples of [`Self::spatial_compression`] -> raw latent
    /// (B, latent_channels, H / c, W / c); not scaled by `scaling_factor`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.encoder.forward(x)
    }

    /// Raw latent (divide a diffusion latent by `scaling_factor` first) -> image (B, 3, H, W), about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(z)
    }

    pub fn config(&self) -> &DcaeConfig {
        &self.cfg
    }

    pub fn encoder(&self) -> &DcaeEncoder {
        &self.encoder
    }

    pub fn decoder(&self) -> &DcaeDecoder {
        &self.decoder
    }

    /// Image pixels per latent pixel along each axis (32 for SANA's DC-AE).
    pub fn spatial_compression(&self) -> usize {
        self.cfg.spatial_compression()
    }
}
