//! Gemma-2 text encoder (transformers `Gemma2Model`): final-norm hidden states under a padding mask.
//!
//! candle-transformers' `gemma2` is a language model (last-token logits, causal mask only); SANA needs the
//! hidden states of every position with right padding, so this is the encoder half written out (docs/ALGORITHM.md §3.11).
//! Weights are read by their transformers key names from a `text_encoder/` folder (single or sharded
//! safetensors, optional `model.` prefix of a `Gemma2ForCausalLM` checkpoint).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use crate::models::weights::Weights;
use crate::{Error, Result};

/// Attention pattern of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    SlidingAttention,
    FullAttention,
}

/// `rope_parameters` of transformers ≥ 5 configs, or the legacy `rope_scaling` (which spells the type `type` in
/// old configs). transformers' `rope_config_validation` treats a missing type as `"default"`.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_type", alias = "type")]
    pub rope_type: String,
    /// Absent: the config's top-level `rope_theta`, else 10000.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// `text_encoder/config.json`; defaults are those of transformers' `Gemma2Config` (= google/gemma-2-2b).
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma2Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_num_key_value_heads")]
    pub num_key_value_heads: usize,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// transformers reads `hidden_activation` only (configs also carry an unused `hidden_act`).
    #[serde(default = "default_hidden_activation")]
    pub hidden_activation: String,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Pre-v5 configs store the RoPE base here; v5 configs use `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Legacy (transformers < 5) RoPE scaling; `null` or type `"default"` is plain RoPE.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    /// `null` disables the window (sliding layers then attend like full ones).
    #[serde(default = "default_sliding_window")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<LayerType>>,
    #[serde(default = "default_attn_logit_softcapping")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

fn default_rope_type() -> String {
    "default".into()
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_vocab_size() -> usize {
    256000
}
fn default_hidden_size() -> usize {
    2304
}
fn default_intermediate_size() -> usize {
    9216
}
fn default_num_hidden_layers() -> usize {
    26
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_num_key_value_heads() -> usize {
    4
}
fn default_head_dim() -> usize {
    256
}
fn default_hidden_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
fn default_sliding_window() -> Option<usize> {
    Some(4096)
}
fn default_attn_logit_softcapping() -> Option<f64> {
    Some(50.0)
}

impl Gemma2Config {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| {
            Error::model(
                path,
                format!(
                    "invalid Gemma-2 config ({e}): the file is damaged or not a transformers config; download \
                     it again: {}",
                    crate::hub::download_command(path)
                ),
            )
        })?;
        config.validate().map_err(|msg| Error::model(path, msg))?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(format!(
                    "layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                ));
            }
        }
        for (field, rope) in [
            ("rope_parameters", &self.rope_parameters),
            ("rope_scaling", &self.rope_scaling),
        ] {
            if let Some(rope) = rope {
                if rope.rope_type != "default" {
                    return Err(format!(
                        "{field}.rope_type \"{}\" is not supported (only \"default\")",
                        rope.rope_type
                    ));
                }
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err("use_bidirectional_attention=true is not supported".into());
        }
        self.activation().map(|_| ())
    }

    /// The attention pattern of layer `i`: `layer_types` if given, else sliding on even layers (0, 2, …).
    pub fn layer_type(&self, i: usize) -> LayerType {
        match &self.layer_types {
            Some(types) => types[i],
            None if i.is_multiple_of(2) => LayerType::SlidingAttention,
            None => LayerType::FullAttention,
        }
    }

    /// The RoPE base frequency.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or_else(default_rope_theta)
    }

    /// `ACT2FN[hidden_activation]` (transformers `activations.py`; the lookup is case-sensitive). The
    /// tanh-approximation entries (`gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`) are one function, as are the
    /// exact-erf ones (`gelu`, `gelu_python`).
    fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_activation.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" | "gelu_python" => Ok(Activation::GeluErf),
            "silu" | "swish" => Ok(Activation::Silu),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "hidden_activation \"{other}\" is not supported (supported: gelu_pytorch_tanh, gelu_new, \
                 gelu_fast, gelu, gelu_python, silu, swish, relu)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluTanh,
    GeluErf,
    Silu,
    Relu,
}

/// Gemma's RMSNorm: computed in f32 with the weight stored as an offset from one, `x̂ · (1 + w)`.
#[derive(Debug, Clone)]
struct GemmaRmsNorm {
    one_plus_weight: Tensor,
    eps: f32,
}

impl GemmaRmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?.to_dtype(DType::F32)?;
        Ok(Self {
            one_plus_weight: (weight + 1.0)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y =
            candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.one_plus_weight, self.eps)?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl SelfAttention {
    fn new(cfg: &Gemma2Config, vb: VarBuilder) -> Result<Self> {
        let (d, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        Ok(Self {
            q_proj: linear(d, cfg.num_attention_heads * hd, bias, vb.pp("q_proj"))?,
            k_proj: linear(d, cfg.num_key_value_heads * hd, bias, vb.pp("k_proj"))?,
            v_proj: linear(d, cfg.num_key_value_heads * hd, bias, vb.pp("v_proj"))?,
            o_proj: linear(cfg.num_attention_heads * hd, d, bias, vb.pp("o_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            scale: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
        })
    }

    /// `x` (B,S,D); `cos`/`sin` (S, head_dim/2); `bias` (B,1,S,S) f32 additive mask.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(self.q_proj.forward(x)?, h)?;
        let k = heads(self.k_proj.forward(x)?, kv)?;
        let v = heads(self.v_proj.forward(x)?, kv)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        // GQA without copying k/v: query heads g·kv_head..(g+1)·kv_head share a key head (repeat_kv semantics),
        // so the query heads of one group are stacked along the sequence axis.
        let group = h / kv;
        let q = q.reshape((b, kv, group * s, hd))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, h, s, s))?;
        // Scale, softcap, mask and softmax in f32 (torch rounds the first three to the model dtype in bf16 runs).
        let mut scores = (scores.to_dtype(DType::F32)? * self.scale)?;
        if let Some(cap) = self.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(bias)?)?;
        let probs = probs.to_dtype(x.dtype())?.reshape((b, kv, group * s, s))?;
        let out = probs.matmul(&v)?.reshape((b, h, s, hd))?;
        let out = out.transpose(1, 2)?.reshape((b, s, h * hd))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    fn new(cfg: &Gemma2Config, activation: Activation, vb: VarBuilder) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(d, i, false, vb.pp("gate_proj"))?,
            up_proj: linear(d, i, false, vb.pp("up_proj"))?,
            down_proj: linear(i, d, false, vb.pp("down_proj"))?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let gate = match self.activation {
            Activation::GeluTanh => gate.gelu()?,
            Activation::GeluErf => gate.gelu_erf()?,
            Activation::Silu => gate.silu()?,
            Activation::Relu => gate.relu()?,
        };
        Ok(self
            .down_proj
            .forward(&(gate * self.up_proj.forward(x)?)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: GemmaRmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: GemmaRmsNorm,
    pre_feedforward_layernorm: GemmaRmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: GemmaRmsNorm,
    layer_type: LayerType,
}

impl DecoderLayer {
    fn new(cfg: &Gemma2Config, i: usize, activation: Activation, vb: VarBuilder) -> Result<Self> {
        let norm = |name: &str| GemmaRmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::new(cfg, activation, vb.pp("mlp"))?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            layer_type: cfg.layer_type(i),
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, bias)?;
        let x = (x + self.post_attention_layernorm.forward(&h)?)?;
        let h = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&x)?)?;
        Ok((x + self.post_feedforward_layernorm.forward(&h)?)?)
    }
}

/// The Gemma-2 decoder stack used as a text encoder: returns the final-norm hidden states of every position.
#[derive(Debug, Clone)]
pub struct Gemma2Encoder {
    embed_tokens: Tensor,
    /// sqrt(hidden_size) rounded to the model dtype, as transformers does.
    embed_scale: f64,
    layers: Vec<DecoderLayer>,
    norm: GemmaRmsNorm,
    config: Gemma2Config,
    dtype: DType,
    device: Device,
}

impl Gemma2Encoder {
    /// Opens a `text_encoder/` folder without loading any tensor: `config.json` parsed and checked, the (single
    /// or sharded) `model*.safetensors` headers read and checked (complete files, every shard present, float
    /// dtypes), and the embedding's row count compared with the config's `vocab_size`. Cheap (header reads).
    pub fn open(dir: &Path) -> Result<(Gemma2Config, Weights)> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::Missing {
                what: "Gemma-2 text encoder config".into(),
                hint: format!(
                    "point at a diffusers pipeline folder whose text_encoder/ holds config.json and \
                     model*.safetensors (e.g. Efficient-Large-Model/Sana_1600M_1024px_diffusers); download it: {}",
                    crate::hub::download_command(&config_path)
                ),
                path: config_path,
            });
        }
        let config = Gemma2Config::from_file(&config_path)?;
        let weights = Weights::from_folder(dir, &["model"])?.strip_prefix("model.");
        if weights.contains("embed_tokens.weight") {
            let shape = weights.shape("embed_tokens.weight")?;
            if shape.first() != Some(&config.vocab_size) {
                return Err(Error::model(
                    &config_path,
                    format!(
                        "vocab_size is {} but the weights' embed_tokens.weight has shape {shape:?} ({}): the \
                         config and the weights come from different models; download text_encoder/ again: {}",
                        config.vocab_size,
                        weights.file_of("embed_tokens.weight").display(),
                        crate::hub::download_folder_command(dir)
                    ),
                ));
            }
        }
        Ok((config, weights))
    }

    /// Loads `config.json` and the (single or sharded) `model*.safetensors` of a `text_encoder/` folder,
    /// converting the weights to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (config, weights) = Self::open(dir)?;
        Self::from_weights(&config, weights, dir, dtype, device)
    }

    /// Builds the encoder from weights opened by [`Self::open`] on `dir` (named in errors), in `dtype`.
    pub fn from_weights(
        config: &Gemma2Config,
        weights: Weights,
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new(config, weights.var_builder(dtype, device)).map_err(|e| match e {
            Error::Candle(e) => Error::model(dir, e.to_string()),
            e => e,
        })
    }

    /// Builds the encoder from weights under their transformers names (`embed_tokens.weight`, `layers.{i}.…`,
    /// `norm.weight`); the VarBuilder's dtype is the compute dtype.
    pub fn new(config: &Gemma2Config, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(Error::Arg)?;
        let activation = config.activation().map_err(Error::Arg)?;
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let embed_tokens = vb.get(
            (config.vocab_size, config.hidden_size),
            "embed_tokens.weight",
        )?;
        let embed_scale = Tensor::new((config.hidden_size as f32).sqrt(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(config, i, activation, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = GemmaRmsNorm::new(config.hidden_size, config.rms_norm_eps, vb.pp("norm"))?;
        Ok(Self {
            embed_tokens,
            embed_scale,
            layers,
            norm,
            config: config.clone(),
            dtype,
            device,
        })
    }

    /// The configuration the encoder was built from.
    pub fn config(&self) -> &Gemma2Config {
        &self.config
    }

    /// The width D of the returned hidden states.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The compute (and output) dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the weights (inputs are moved there).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `input_ids` (B,S) u32/i64 and `attention_mask` (B,S) of 0/1 (any dtype, right padding expected) →
    /// final-norm hidden states (B,S,D) in the model dtype, for every position (padded positions included:
    /// they attend to the valid keys before them and are finite).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if attention_mask.dims() != [b, s] {
            return Err(Error::Arg(format!(
                "attention_mask shape {:?} differs from input_ids shape {:?}",
                attention_mask.dims(),
                input_ids.dims()
            )));
        }
        let d = self.config.hidden_size;
        let ids = input_ids.to_device(&self.device)?.flatten_all()?;
        let mut x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, s, d))?
            .affine(self.embed_scale, 0.0)?;
        let (cos, sin) = self.rope_tables(s)?;
        let keep = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let full_bias = self.attention_bias(&keep, None)?;
        let sliding_bias = match self.config.sliding_window {
            Some(w) if w < s => Some(self.attention_bias(&keep, Some(w))?),
            _ => None,
        };
        for layer in &self.layers {
            let bias = match (layer.layer_type, &sliding_bias) {
                (LayerType::SlidingAttention, Some(sliding)) => sliding,
                _ => &full_bias,
            };
            x = layer.forward(&x, &cos, &sin, bias)?;
        }
        self.norm.forward(&x)
    }

    /// cos/sin of position·inv_freq, (S, head_dim/2), computed in f32 and cast to the model dtype.
    fn rope_tables(&self, s: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.config.head_dim;
        let base = self.config.rope_base() as f32;
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|k| 1.0 / base.powf((2 * k) as f32 / hd as f32))
            .collect();
        let angles: Vec<f32> = (0..s)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let table = |f: fn(f32) -> f32| -> Result<Tensor> {
            let values: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Ok(Tensor::from_vec(values, (s, hd / 2), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok((table(f32::cos)?, table(f32::sin)?))
    }

    /// Additive (B,1,S,S) f32 mask: 0 where key k may be seen from query q (k ≤ q, key not padding, and
    /// q − k < window for sliding layers), else the model dtype's most negative finite value (as transformers;
    /// with −inf a fully masked row would turn into NaN instead of uniform attention).
    fn attention_bias(&self, keep: &[Vec<f32>], window: Option<usize>) -> Result<Tensor> {
        let (b, s) = (keep.len(), keep.first().map_or(0, |r| r.len()));
        let min = match self.dtype {
            DType::BF16 => half::bf16::MIN.to_f32(),
            DType::F16 => half::f16::MIN.to_f32(),
            _ => f32::MIN,
        };
        let mut bias = vec![min; b * s * s];
        for (row, keep_row) in keep.iter().enumerate() {
            for q in 0..s {
                let first = window.map_or(0, |w| (q + 1).saturating_sub(w));
                for k in first..=q {
                    if keep_row[k] != 0.0 {
                        bias[(row * s + q) * s + k] = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, s, s), &self.device)?)
    }
}
