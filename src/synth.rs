//! Random models and data of real shapes for benches, tests and the GPU check (`sprint-bench`), without
//! downloads: model folders with random weights under the real key names (the names and shapes a model asks
//! its `VarBuilder` for, checked against the real checkpoints' key lists in `data/keys/`), a word-level
//! tokenizer with Gemma's vocabulary size, parquet shards of generated images and captions, and a latent store
//! of random rows.
//!
//! Every generated folder is cached under the work directory with a marker naming what it holds, written
//! under a temporary name and renamed when complete, so a killed run never leaves a half-written folder.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::models::dcae::{DcaeConfig, DcaeEncoder};
use crate::models::gemma2::{Gemma2Config, Gemma2Encoder};
use crate::models::sana::{SanaConfig, SanaTransformer2DModel};
use crate::rng::SeededRng;
use crate::store::{
    FloatEncoding, LatentRow, ModelInfo, ModelsInfo, OpenMode, PreprocessInfo, StoreConfig,
    StoreDType, StoreWriter,
};
use crate::text::COMPLEX_HUMAN_INSTRUCTION;
use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType as ArrowType, Field, Schema};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// The SANA 1.0/1.1 DC-AE `vae/config.json` (docs/ALGORITHM.md §2.2).
pub const SANA_VAE_CONFIG: &str = include_str!("../data/configs/dcae_f32c32_sana_vae.json");
/// The tiny pipeline's DC-AE config (smoke runs).
pub const TINY_VAE_CONFIG: &str = include_str!("../datasets/tiny-sana-sprint/vae/config.json");
/// The tiny pipeline's Gemma-2 config (smoke runs; its vocabulary is replaced by the generated tokenizer's).
pub const TINY_GEMMA_CONFIG: &str =
    include_str!("../datasets/tiny-sana-sprint/text_encoder/config.json");

/// Key lists (`name<TAB>[shape]`) of the real checkpoints.
pub const KEYS_VAE: &str = include_str!("../data/keys/dcae_f32c32_sana_vae.txt");
pub const KEYS_GEMMA: &str = include_str!("../data/keys/gemma2_2b_text_encoder.txt");
pub const KEYS_TEACHER_1_6B: &str =
    include_str!("../data/keys/sana_sprint_1.6B_teacher_transformer.txt");
pub const KEYS_TEACHER_0_6B: &str =
    include_str!("../data/keys/sana_sprint_0.6B_teacher_transformer.txt");
pub const KEYS_STUDENT_1_6B: &str =
    include_str!("../data/keys/sana_sprint_1.6B_student_transformer.txt");
pub const KEYS_STUDENT_0_6B: &str =
    include_str!("../data/keys/sana_sprint_0.6B_student_transformer.txt");

/// Gemma-2-2B's vocabulary size (docs/ALGORITHM.md §2.3).
pub const GEMMA_VOCAB: usize = 256_000;

/// A tensor a model asks for: its full name and shape.
pub type Key = (String, Vec<usize>);

/// A `VarBuilder` backend that answers every request with a zero-stride placeholder and records the request,
/// so that building a model lists its checkpoint keys without allocating its weights. Names requested more
/// than once are kept apart: a checkpoint holds each name once.
#[derive(Clone, Default)]
struct KeyRecorder {
    keys: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
    repeated: Arc<Mutex<Vec<String>>>,
}

impl SimpleBackend for KeyRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let previous = self
            .keys
            .lock()
            .expect("recorder lock")
            .insert(name.to_string(), s.dims().to_vec());
        if previous.is_some() {
            self.repeated
                .lock()
                .expect("recorder lock")
                .push(name.to_string());
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("key recorder: unchecked get of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The keys (sorted by name) that `build` requests from the `VarBuilder` it is given; fails when `build`
/// requests a name twice.
pub fn record_keys(build: impl FnOnce(VarBuilder) -> anyhow::Result<()>) -> Result<Vec<Key>> {
    let recorder = KeyRecorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    build(vb)?;
    let repeated = recorder.repeated.lock().expect("recorder lock");
    if !repeated.is_empty() {
        bail!(
            "the model requests {} names more than once: {:?}",
            repeated.len(),
            &repeated[..repeated.len().min(5)]
        );
    }
    let keys = recorder.keys.lock().expect("recorder lock");
    Ok(keys.iter().map(|(k, s)| (k.clone(), s.clone())).collect())
}

/// Keys of the DC-AE encoder (`encoder.*`) for a config.
pub fn vae_encoder_keys(cfg: &DcaeConfig) -> Result<Vec<Key>> {
    record_keys(|vb| Ok(DcaeEncoder::new(cfg, vb.pp("encoder")).map(|_| ())?))
}

/// Keys of the Gemma-2 encoder (transformers names without the `model.` prefix) for a config.
pub fn gemma_keys(cfg: &Gemma2Config) -> Result<Vec<Key>> {
    record_keys(|vb| Ok(Gemma2Encoder::new(cfg, vb).map(|_| ())?))
}

/// Keys of a SANA teacher transformer for a config.
pub fn teacher_keys(cfg: &SanaConfig) -> Result<Vec<Key>> {
    record_keys(|vb| Ok(SanaTransformer2DModel::new(cfg, vb).map(|_| ())?))
}

/// Parses a key list (`name<TAB>[d0, d1, …]` per line).
pub fn parse_key_list(text: &str) -> Result<Vec<Key>> {
    let mut keys = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (name, shape) = line
            .split_once('\t')
            .with_context(|| format!("key list line without a tab: {line:?}"))?;
        let dims = shape
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .with_context(|| format!("bad shape in key list line {line:?}"))?;
        keys.push((name.to_string(), dims));
    }
    keys.sort();
    Ok(keys)
}

/// Fails unless `keys` equal the entries of the real key list `list` kept by `keep`, names and shapes.
pub fn check_against_key_list(
    what: &str,
    keys: &[Key],
    list: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<()> {
    let want: Vec<Key> = parse_key_list(list)?
        .into_iter()
        .filter(|(k, _)| keep(k))
        .collect();
    if keys == want.as_slice() {
        return Ok(());
    }
    let have: BTreeMap<_, _> = keys.iter().cloned().collect();
    let need: BTreeMap<_, _> = want.iter().cloned().collect();
    let mut diffs = Vec::new();
    for (k, s) in &need {
        match have.get(k) {
            None => diffs.push(format!("missing {k} {s:?}")),
            Some(h) if h != s => diffs.push(format!("{k}: {h:?} instead of {s:?}")),
            _ => {}
        }
    }
    for k in have.keys().filter(|k| !need.contains_key(*k)) {
        diffs.push(format!("unexpected {k}"));
    }
    bail!(
        "{what}: the model built from the config differs from the real checkpoint's key list ({} differences, \
         first: {})",
        diffs.len(),
        diffs.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
    )
}

/// How a model stores its normalisation weights: as the scale (1 at init) or as an offset from one (Gemma).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormWeights {
    One,
    Zero,
}

/// Init-like random values: matrices and convolutions U(±1/√fan_in) (torch's default layer init), token
/// embeddings U(±0.02·√3) (std 0.02), norm weights per `norm`, other vectors (biases) zero.
fn value_rule(name: &str, dims: &[usize], norm: NormWeights) -> (f32, f32) {
    if dims.len() >= 2 {
        let bound = if name.contains("embed_tokens") {
            0.02 * 3f32.sqrt()
        } else {
            let fan_in: usize = dims[1..].iter().product();
            1.0 / (fan_in.max(1) as f32).sqrt()
        };
        return (0.0, bound);
    }
    let constant = if name.ends_with("weight") && name.contains("norm") && norm == NormWeights::One
    {
        1.0
    } else {
        0.0
    };
    (constant, 0.0)
}

/// `n` values `offset + U(±bound)`, generated in parallel chunks seeded by (`seed`, `name`, chunk), then mapped
/// by `convert` (the element type of the stored tensor).
fn fill<T: Send>(
    name: &str,
    n: usize,
    seed: u64,
    (offset, bound): (f32, f32),
    convert: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    const CHUNK: usize = 1 << 20;
    let base = SeededRng::for_name(seed, name).next_u64();
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .flat_map_iter(|c| {
            let mut rng = SeededRng::new(base ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let len = CHUNK.min(n - c * CHUNK);
            let convert = &convert;
            (0..len).map(move |_| {
                // 24 random bits are plenty for weights and cheap: U(-1, 1) from the top of one draw
                let u = (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                convert(offset + bound * u)
            })
        })
        .collect()
}

/// Random tensors (CPU) for `keys` in `dtype` (f32 or bf16).
pub fn random_tensors(
    keys: &[Key],
    dtype: DType,
    norm: NormWeights,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    keys.iter()
        .map(|(name, dims)| {
            let n: usize = dims.iter().product();
            let rule = value_rule(name, dims, norm);
            let t = match dtype {
                DType::F32 => Tensor::from_vec(
                    fill(name, n, seed, rule, |v| v),
                    dims.as_slice(),
                    &Device::Cpu,
                )?,
                DType::BF16 => Tensor::from_vec(
                    fill(name, n, seed, rule, half::bf16::from_f32),
                    dims.as_slice(),
                    &Device::Cpu,
                )?,
                other => bail!("random weights in {other:?} are not supported (f32, bf16)"),
            };
            Ok((name.clone(), t))
        })
        .collect()
}

/// A `VarBuilder` backend of random values made directly on the device (for in-memory benchmarks): the same
/// value rule as the weight files, drawn with the device's generator.
pub struct DeviceRandom {
    pub norm: NormWeights,
}

impl SimpleBackend for DeviceRandom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let rule = value_rule(name, s.dims(), self.norm);
        let t = if dev.is_cpu() {
            // candle's CPU generator draws one element at a time; the chunked parallel fill is ~100x faster
            Tensor::from_vec(fill(name, s.elem_count(), 1, rule, |v| v), s, dev)?
        } else if rule.1 > 0.0 {
            Tensor::rand(-rule.1, rule.1, s, dev)?
        } else {
            Tensor::full(rule.0, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random backend: unchecked get of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Returns `dir` after building it with `build` unless it already holds a complete build of `spec`.
pub fn cached_dir(
    dir: &Path,
    spec: &str,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let marker = dir.join(".sprint-bench-spec");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(spec) {
        return Ok(dir.to_path_buf());
    }
    let tmp = dir.with_extension("partial");
    for stale in [dir, tmp.as_path()] {
        if stale.exists() {
            std::fs::remove_dir_all(stale)
                .with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    build(&tmp)?;
    std::fs::write(tmp.join(".sprint-bench-spec"), spec)?;
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(dir.to_path_buf())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn save_random(path: &Path, keys: &[Key], dtype: DType, norm: NormWeights) -> Result<()> {
    let tensors = random_tensors(keys, dtype, norm, 1)?;
    candle_core::safetensors::save(&tensors, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// The SANA-Sprint teacher `transformer/config.json` (docs/ALGORITHM.md §2.1) of `name` (1.6B or 0.6B), keeping the first
/// `layers` blocks when given.
pub fn teacher_config(name: &str, layers: Option<usize>) -> Result<serde_json::Value> {
    let (heads, full_layers, cross_heads, cross_head_dim) = match name {
        "1.6B" => (70, 20, 20, 112),
        "0.6B" => (36, 28, 16, 72),
        other => bail!("unknown teacher config {other:?} (1.6B, 0.6B)"),
    };
    let dim = heads * 32;
    Ok(serde_json::json!({
        "_class_name": "SanaTransformer2DModel",
        "in_channels": 32, "out_channels": 32,
        "num_attention_heads": heads, "attention_head_dim": 32,
        "num_layers": layers.unwrap_or(full_layers).min(full_layers),
        "num_cross_attention_heads": cross_heads, "cross_attention_head_dim": cross_head_dim,
        "cross_attention_dim": dim, "caption_channels": 2304, "mlp_ratio": 2.5,
        "dropout": 0.0, "attention_bias": false, "sample_size": 32, "patch_size": 1,
        "norm_elementwise_affine": false, "norm_eps": 1e-6, "interpolation_scale": null,
        "guidance_embeds": false, "guidance_embeds_scale": 0.1,
        "qk_norm": "rms_norm_across_heads", "timestep_scale": 1.0
    }))
}

/// A teacher pipeline folder (`transformer/` only, bf16 like the released checkpoints) with random weights;
/// at full depth its keys are checked against the real checkpoint's key list.
pub fn teacher_folder(work: &Path, name: &str, layers: Option<usize>) -> Result<PathBuf> {
    let config = teacher_config(name, layers)?;
    let cfg: SanaConfig = serde_json::from_value(config.clone())?;
    let dir = work.join(format!("teacher-{name}-{}l", cfg.num_layers));
    cached_dir(&dir, &config.to_string(), |root| {
        let keys = teacher_keys(&cfg)?;
        let full = match name {
            "1.6B" => (20, KEYS_TEACHER_1_6B),
            _ => (28, KEYS_TEACHER_0_6B),
        };
        if cfg.num_layers == full.0 {
            check_against_key_list(&format!("SANA {name} teacher"), &keys, full.1, |_| true)?;
        }
        let t = root.join("transformer");
        std::fs::create_dir_all(&t)?;
        write_json(&t.join("config.json"), &config)?;
        save_random(
            &t.join("diffusion_pytorch_model.safetensors"),
            &keys,
            DType::BF16,
            NormWeights::One,
        )
    })
}

/// The real Gemma-2-2B `text_encoder/config.json` (docs/ALGORITHM.md §2.3) with `layers` decoder layers and `vocab` rows.
pub fn gemma_config(layers: usize, vocab: usize) -> serde_json::Value {
    let layer_types: Vec<&str> = (0..layers)
        .map(|i| {
            if i % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    serde_json::json!({
        "architectures": ["Gemma2Model"], "model_type": "gemma2",
        "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": 50.0,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "dtype": "bfloat16",
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
        "layer_types": layer_types, "max_position_embeddings": 8192,
        "num_attention_heads": 8, "num_hidden_layers": layers, "num_key_value_heads": 4,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": 4096, "tie_word_embeddings": true, "use_cache": true, "vocab_size": vocab
    })
}

/// Sizes of a generated encoder pipeline (`vae/`, `text_encoder/`, `tokenizer/`).
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub vae_config: serde_json::Value,
    pub gemma_config: serde_json::Value,
    pub vocab: usize,
}

impl PipelineSpec {
    /// The real SANA-Sprint encoders: DC-AE f32c32 and Gemma-2-2B with its 256000-token vocabulary.
    pub fn real() -> Result<Self> {
        Ok(Self {
            vae_config: serde_json::from_str(SANA_VAE_CONFIG)?,
            gemma_config: gemma_config(26, GEMMA_VOCAB),
            vocab: GEMMA_VOCAB,
        })
    }

    /// Tiny encoders for CPU smoke runs (the tiny pipeline's configs, a 2048-word vocabulary).
    pub fn smoke() -> Result<Self> {
        let vocab = 2048;
        let mut gemma: serde_json::Value = serde_json::from_str(TINY_GEMMA_CONFIG)?;
        gemma["vocab_size"] = vocab.into();
        Ok(Self {
            vae_config: serde_json::from_str(TINY_VAE_CONFIG)?,
            gemma_config: gemma,
            vocab,
        })
    }

    fn is_real(&self) -> Result<bool> {
        let real = Self::real()?;
        Ok(self.vae_config == real.vae_config && self.gemma_config == real.gemma_config)
    }
}

/// A pipeline folder with `vae/` (encoder weights only, f32), `text_encoder/` (bf16) and `tokenizer/`, random
/// weights; the real sizes are checked against the real checkpoints' key lists.
pub fn encoder_pipeline(work: &Path, spec: &PipelineSpec) -> Result<PathBuf> {
    let id = serde_json::json!({"vae": spec.vae_config, "text_encoder": spec.gemma_config,
                                "vocab": spec.vocab, "tokenizer": "word-level v1"});
    let name = if spec.is_real()? {
        "pipeline-real"
    } else {
        "pipeline-smoke"
    };
    cached_dir(&work.join(name), &id.to_string(), |root| {
        let check = spec.is_real()?;
        let vae_cfg: DcaeConfig = serde_json::from_value(spec.vae_config.clone())?;
        let vae_keys = vae_encoder_keys(&vae_cfg)?;
        let gemma_cfg: Gemma2Config = serde_json::from_value(spec.gemma_config.clone())?;
        let gemma_keys = gemma_keys(&gemma_cfg)?;
        if check {
            check_against_key_list("DC-AE encoder", &vae_keys, KEYS_VAE, |k| {
                k.starts_with("encoder.")
            })?;
            check_against_key_list("Gemma-2-2B", &gemma_keys, KEYS_GEMMA, |_| true)?;
        }
        let vae = root.join("vae");
        std::fs::create_dir_all(&vae)?;
        write_json(&vae.join("config.json"), &spec.vae_config)?;
        save_random(
            &vae.join("diffusion_pytorch_model.safetensors"),
            &vae_keys,
            DType::F32,
            NormWeights::One,
        )?;
        let te = root.join("text_encoder");
        std::fs::create_dir_all(&te)?;
        write_json(&te.join("config.json"), &spec.gemma_config)?;
        save_random(
            &te.join("model.safetensors"),
            &gemma_keys,
            DType::BF16,
            NormWeights::Zero,
        )?;
        write_tokenizer(&root.join("tokenizer"), spec.vocab)?;
        write_json(
            &root.join("model_index.json"),
            &serde_json::json!({"_class_name": "SanaSprintPipeline", "_note": "sprint-bench random weights"}),
        )
    })
}

/// Words of the generated captions (lower case: prompts are lower-cased before tokenisation).
pub const CAPTION_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "of",
    "with",
    "and",
    "in",
    "on",
    "at",
    "by",
    "under",
    "over",
    "near",
    "behind",
    "image",
    "photo",
    "painting",
    "illustration",
    "scene",
    "portrait",
    "landscape",
    "close-up",
    "view",
    "red",
    "orange",
    "yellow",
    "green",
    "teal",
    "blue",
    "purple",
    "pink",
    "white",
    "black",
    "brown",
    "golden",
    "silver",
    "grey",
    "pastel",
    "vivid",
    "soft",
    "warm",
    "cold",
    "bright",
    "dark",
    "glowing",
    "cat",
    "dog",
    "bird",
    "horse",
    "fox",
    "owl",
    "dragon",
    "robot",
    "woman",
    "man",
    "child",
    "knight",
    "city",
    "street",
    "forest",
    "mountain",
    "river",
    "ocean",
    "beach",
    "desert",
    "garden",
    "castle",
    "house",
    "room",
    "window",
    "table",
    "chair",
    "flower",
    "tree",
    "cloud",
    "sky",
    "sun",
    "moon",
    "star",
    "light",
    "shadow",
    "fog",
    "rain",
    "snow",
    "fire",
    "water",
    "stone",
    "glass",
    "metal",
    "wood",
    "small",
    "large",
    "tall",
    "round",
    "fluffy",
    "ancient",
    "modern",
    "futuristic",
    "detailed",
    "cinematic",
    "dramatic",
    "peaceful",
    "busy",
    "quiet",
    "colorful",
    "minimalist",
    "realistic",
    "surreal",
    "standing",
    "sitting",
    "flying",
    "sleeping",
    "walking",
    "reflecting",
    "surrounded",
    "wearing",
    "holding",
    "looking",
    "style",
    "lighting",
    "background",
    "foreground",
    "texture",
    "composition",
    "atmosphere",
    "depth",
    "field",
    "lens",
    "camera",
    "angle",
    "wide",
    "macro",
    "night",
    "dusk",
    "dawn",
    "morning",
    "evening",
    "autumn",
    "winter",
    "spring",
    "summer",
    "highly",
    "sharp",
    "focus",
    "art",
    "digital",
    "oil",
    "watercolor",
    "sketch",
    "render",
    "octane",
    "unreal",
    "engine",
];

/// The pieces Hugging Face's `Whitespace` pre-tokenizer makes of `text` (`\w+|[^\w\s]+`).
fn whitespace_pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut word = None;
    for c in text.chars() {
        if c.is_whitespace() {
            if !current.is_empty() {
                pieces.push(std::mem::take(&mut current));
            }
            word = None;
            continue;
        }
        let is_word = c.is_alphanumeric() || c == '_';
        if word.is_some_and(|w| w != is_word) && !current.is_empty() {
            pieces.push(std::mem::take(&mut current));
        }
        word = Some(is_word);
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

/// `tokenizer/` with a word-level `tokenizer.json` of `vocab` entries: Gemma's special tokens (`<pad>` 0,
/// `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4; BOS prepended like Gemma's post-processor), every piece of the
/// complex human instruction and of the caption words, then filler tokens up to `vocab`. The instruction is
/// one token per word or punctuation run (197 tokens with BOS), close to what a SentencePiece vocabulary makes
/// of plain English, so the text encoder sees a realistic sequence length.
pub fn write_tokenizer(dir: &Path, vocab: usize) -> Result<()> {
    let specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"];
    let mut words: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut seen: std::collections::HashSet<String> = words.iter().cloned().collect();
    let chi = COMPLEX_HUMAN_INSTRUCTION.join("\n");
    let pieces = whitespace_pieces(&chi)
        .into_iter()
        .chain(whitespace_pieces(&chi.to_lowercase()))
        .chain(
            CAPTION_WORDS
                .iter()
                .flat_map(|w| whitespace_pieces(w))
                .chain([",", "."].map(String::from)),
        );
    for p in pieces {
        if seen.insert(p.clone()) {
            words.push(p);
        }
    }
    if words.len() > vocab {
        bail!(
            "a vocabulary of {vocab} cannot hold the {} base tokens",
            words.len()
        );
    }
    let mut filler = 0usize;
    while words.len() < vocab {
        let w = format!("tok{filler}");
        filler += 1;
        if seen.insert(w.clone()) {
            words.push(w);
        }
    }
    let vocab_map: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let bos = serde_json::json!({"SpecialToken": {"id": "<bos>", "type_id": 0}});
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "<unk>"}
    });
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"add_bos_token": true, "add_eos_token": false, "bos_token": "<bos>",
                            "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                            "mask_token": "<mask>", "padding_side": "right",
                            "tokenizer_class": "PreTrainedTokenizerFast"}),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &serde_json::json!({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                            "unk_token": "<unk>", "mask_token": "<mask>"}),
    )
}

/// A caption of 40–120 words from [`CAPTION_WORDS`], like a long LLaVA description.
pub fn caption(rng: &mut SeededRng) -> String {
    let n = 40 + (rng.next_u64() % 81) as usize;
    let mut words = Vec::with_capacity(n);
    for i in 0..n {
        let w = CAPTION_WORDS[(rng.next_u64() % CAPTION_WORDS.len() as u64) as usize];
        let first = i == 0 || words.last().is_some_and(|w: &String| w.ends_with('.'));
        let mut w = if first {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        } else {
            w.to_string()
        };
        match rng.next_u64() % 12 {
            0 => w.push(','),
            1 => w.push('.'),
            _ => {}
        }
        words.push(w);
    }
    let text = words.join(" ");
    text.trim_end_matches([',', '.']).to_string() + "."
}

/// Encoded image bytes: a smooth gradient with rectangles and noise, `width`×`height`, JPEG (quality 90) or
/// PNG.
pub fn image_bytes(seed: u64, width: u32, height: u32, png: bool) -> Result<Vec<u8>> {
    let mut rng = SeededRng::new(seed);
    let mut c = [[0f32; 3]; 2];
    for corner in &mut c {
        for ch in corner.iter_mut() {
            *ch = (rng.next_u64() % 256) as f32;
        }
    }
    let rects: Vec<(u32, u32, u32, u32, [u8; 3])> = (0..3)
        .map(|_| {
            let w = 1 + (rng.next_u64() % (width as u64 / 2).max(1)) as u32;
            let h = 1 + (rng.next_u64() % (height as u64 / 2).max(1)) as u32;
            let x = (rng.next_u64() % (width - w + 1) as u64) as u32;
            let y = (rng.next_u64() % (height - h + 1) as u64) as u32;
            let col = [0, 1, 2].map(|_| (rng.next_u64() % 256) as u8);
            (x, y, w, h, col)
        })
        .collect();
    let mut img = image::RgbImage::new(width, height);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let t = y as f32 / height.max(2) as f32;
        let noise = (rng.next_u64() % 17) as f32 - 8.0;
        let mut rgb = [0u8; 3];
        for (ch, v) in rgb.iter_mut().enumerate() {
            *v = ((1.0 - t) * c[0][ch] + t * c[1][ch] + noise).clamp(0.0, 255.0) as u8;
        }
        for &(rx, ry, rw, rh, col) in &rects {
            if x >= rx && x < rx + rw && y >= ry && y < ry + rh {
                rgb = col;
            }
        }
        *px = image::Rgb(rgb);
    }
    let mut out = Vec::new();
    if png {
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)?;
    } else {
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img)?;
    }
    Ok(out)
}

/// Parquet shards of `rows` generated image/caption pairs (`image` binary, `llava` string, the schema of
/// brivangl/midjourney-v6-llava), split over `shards` files: images with the shorter side between
/// `resolution` and 1.25×`resolution` and aspect ratios up to 1.5, three JPEG for one PNG.
pub fn write_shards(
    dir: &Path,
    rows: usize,
    shards: usize,
    resolution: u32,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let shards = shards.clamp(1, rows.max(1));
    let per = rows.div_ceil(shards);
    let mut paths = Vec::new();
    for s in 0..shards {
        let range = (s * per)..((s + 1) * per).min(rows);
        let made: Vec<(Vec<u8>, String)> = range
            .into_par_iter()
            .map(|i| {
                let mut rng = SeededRng::new(1000 + i as u64);
                let short = resolution + (rng.next_u64() % (resolution as u64 / 4 + 1)) as u32;
                let long = short + (rng.next_u64() % (short as u64 / 2 + 1)) as u32;
                let (w, h) = if i % 2 == 0 {
                    (long, short)
                } else {
                    (short, long)
                };
                let bytes = image_bytes(i as u64, w, h, i % 4 == 3)?;
                Ok((bytes, caption(&mut rng)))
            })
            .collect::<Result<_>>()?;
        let images: ArrayRef = Arc::new(BinaryArray::from_iter_values(
            made.iter().map(|(b, _)| b.as_slice()),
        ));
        let captions: ArrayRef = Arc::new(StringArray::from_iter_values(
            made.iter().map(|(_, c)| c.as_str()),
        ));
        let schema = Arc::new(Schema::new(vec![
            Field::new("image", ArrowType::Binary, true),
            Field::new("llava", ArrowType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(schema.clone(), vec![images, captions])?;
        let path = dir.join(format!("train_{s:03}.parquet"));
        let file = std::fs::File::create(&path)?;
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None)?;
        writer.write(&batch)?;
        writer.close()?;
        paths.push(path);
    }
    Ok(paths)
}

/// A latent store of `rows` random rows for `resolution` (latents 32×(r/32)², prompt embeddings of width
/// `hidden` and lengths from 40% to all of `seq_len` tokens; the real prompts are 300 tokens), as
/// `sprint-prep` would write it for random data.
pub fn random_store(
    path: &Path,
    (height, width): (usize, usize),
    hidden: usize,
    rows: usize,
    seq_len: usize,
) -> Result<()> {
    let m = ModelInfo {
        origin: "sprint-bench".into(),
        fingerprint: "sha256:sprint-bench".into(),
    };
    let (h, w) = (height / 32, width / 32);
    let config = StoreConfig {
        format_version: 1,
        resolution: height.max(width) as u32,
        max_sequence_length: seq_len,
        complex_human_instruction: None,
        vae_scaling_factor: 0.41407,
        text_hidden_size: hidden,
        latent_dtype: StoreDType::Float32,
        embed_dtype: StoreDType::Float16,
        negative_prompt_len: 1,
        negative_prompt_embeds_f32le_b64: StoreConfig::encode_negative(&vec![0.1; hidden]),
        models: ModelsInfo {
            vae: m.clone(),
            text_encoder: m.clone(),
            tokenizer: m,
        },
        preprocess: PreprocessInfo {
            resize: "random".into(),
            crop: "random".into(),
            normalize: "random".into(),
            mixed_precision: "bf16".into(),
        },
        latent_shape: [32, h, w],
        writer: "sprint-bench".into(),
        multi_scale: None,
        validation_prompts: Vec::new(),
        validation_max_sequence_length: None,
    };
    let mut writer = StoreWriter::open(
        path,
        config,
        OpenMode::Overwrite,
        FloatEncoding {
            zstd_level: Some(3),
            byte_stream_split: true,
        },
    )?;
    let mut rng = SeededRng::new(5);
    let shortest = (seq_len * 2 / 5).max(1);
    for i in 0..rows {
        let len = shortest + (i * 37) % (seq_len - shortest + 1);
        writer.push(LatentRow {
            id: format!("bench#{i}"),
            caption: "a random caption".into(),
            latent: rng.normal(32 * h * w),
            latent_shape: [32, h as i32, w as i32],
            prompt_embeds: rng.normal(len * hidden),
            prompt_len: len as i32,
        });
    }
    writer.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_configs_request_exactly_the_real_checkpoint_keys() {
        let vae: DcaeConfig = serde_json::from_str(SANA_VAE_CONFIG).unwrap();
        check_against_key_list("vae", &vae_encoder_keys(&vae).unwrap(), KEYS_VAE, |k| {
            k.starts_with("encoder.")
        })
        .unwrap();
        let gemma: Gemma2Config = serde_json::from_value(gemma_config(26, GEMMA_VOCAB)).unwrap();
        check_against_key_list("gemma", &gemma_keys(&gemma).unwrap(), KEYS_GEMMA, |_| true)
            .unwrap();
        for (name, list) in [("1.6B", KEYS_TEACHER_1_6B), ("0.6B", KEYS_TEACHER_0_6B)] {
            let cfg: SanaConfig =
                serde_json::from_value(teacher_config(name, None).unwrap()).unwrap();
            check_against_key_list(name, &teacher_keys(&cfg).unwrap(), list, |_| true).unwrap();
        }
        // a truncated or resized model is told apart
        let small: Gemma2Config = serde_json::from_value(gemma_config(2, GEMMA_VOCAB)).unwrap();
        assert!(
            check_against_key_list("gemma", &gemma_keys(&small).unwrap(), KEYS_GEMMA, |_| true)
                .is_err()
        );
    }

    #[test]
    fn a_name_requested_twice_is_refused() {
        let once = record_keys(|vb| {
            vb.get((2, 3), "a.weight")?;
            vb.get(4, "a.bias")?;
            Ok(())
        })
        .unwrap();
        assert_eq!(
            once,
            vec![("a.bias".into(), vec![4]), ("a.weight".into(), vec![2, 3])]
        );
        let err = record_keys(|vb| {
            vb.get((2, 3), "a.weight")?;
            vb.get((2, 3), "a.weight")?;
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.weight"), "{err}");
    }

    #[test]
    fn random_values_follow_the_rule_and_are_reproducible() {
        let keys = vec![
            ("a.weight".to_string(), vec![64, 16]),
            ("a.bias".to_string(), vec![64]),
            ("x.norm.weight".to_string(), vec![64]),
        ];
        let t = random_tensors(&keys, DType::F32, NormWeights::One, 1).unwrap();
        let w: Vec<f32> = t["a.weight"].flatten_all().unwrap().to_vec1().unwrap();
        assert!(w.iter().all(|v| v.abs() <= 0.25) && w.iter().any(|v| v.abs() > 0.1));
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!(t["a.bias"]
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
        assert!(t["x.norm.weight"]
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 1.0));
        let again = random_tensors(&keys, DType::F32, NormWeights::Zero, 1).unwrap();
        assert_eq!(
            w,
            again["a.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        assert!(again["x.norm.weight"]
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn whitespace_pieces_split_words_and_punctuation_runs() {
        assert_eq!(
            whitespace_pieces("Hi, 'Enhanced prompt' -> ok: a_b"),
            vec!["Hi", ",", "'", "Enhanced", "prompt", "'", "->", "ok", ":", "a_b"]
        );
    }

    #[test]
    fn generated_tokenizer_covers_the_instruction_and_captions() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path(), 1000).unwrap();
        let tok = crate::text::load_tokenizer(dir.path()).unwrap();
        assert_eq!(tok.get_vocab_size(true), 1000);
        let chi = COMPLEX_HUMAN_INSTRUCTION.join("\n");
        let enc = tok.encode(chi.as_str(), true).unwrap();
        assert_eq!(enc.get_ids()[0], 2, "BOS first");
        assert!(
            !enc.get_ids().contains(&3),
            "no unknown token in the instruction"
        );
        // the reference (tools/gpu/reference_bench.py) builds the same tokenizer: 197 + 300 - 2 = 495 tokens
        assert_eq!(enc.len(), 197, "instruction tokens with BOS");
        let text = caption(&mut SeededRng::new(3)).to_lowercase();
        let enc = tok.encode(text.as_str(), true).unwrap();
        assert!(!enc.get_ids().contains(&3), "no unknown token in {text:?}");
    }
}
