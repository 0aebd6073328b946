//! The `sprint.config` schema metadata (STORE.md "Schema metadata"): the settings a store was written with.

use std::path::Path;

use base64::Engine;
use lance::dataset::Dataset;
use serde::{Deserialize, Serialize};

use super::schema::StoreDType;
use crate::error::{Error, Result};

/// The format of square stores (every latent `latent_shape`).
pub const FORMAT_VERSION: u32 = 1;
/// The format of aspect-ratio-bucketed stores (`multi_scale` present; rows differ in `latent_shape`).
pub const FORMAT_VERSION_MULTI_SCALE: u32 = 2;
/// Schema-metadata key holding the JSON settings of the store.
pub const CONFIG_KEY: &str = "sprint.config";

/// Where a model component came from and a fingerprint of its config and weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub origin: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsInfo {
    pub vae: ModelInfo,
    pub text_encoder: ModelInfo,
    pub tokenizer: ModelInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreprocessInfo {
    pub resize: String,
    pub crop: String,
    pub normalize: String,
    pub mixed_precision: String,
}

/// One aspect-ratio bucket of a multi-scale store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketInfo {
    /// The table's key (height / width, as written in the table: "0.57").
    pub key: String,
    pub height: u32,
    pub width: u32,
    /// `[C, H, W]` of the latents of this bucket.
    pub latent_shape: [usize; 3],
}

/// A validation prompt encoded by `sprint-prep --validation_prompt`, so that sprint-train needs no text encoder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPrompt {
    pub prompt: String,
    /// Token rows kept (the mask's ones); the trainer pads to `validation_max_sequence_length` with zeros.
    pub len: usize,
    /// base64 of its `len · text_hidden_size` values, little-endian float32.
    pub embeds_f32le_b64: String,
}

/// How a multi-scale store buckets its images (`sprint-prep --multi_scale`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultiScaleInfo {
    /// The resolution of the aspect-ratio table (512, 1024, 2048).
    pub table: u32,
    /// The resampling filter of the transform ("bicubic", "lanczos").
    pub filter: String,
    /// Every bucket of the table, in table order (rows use a subset).
    pub buckets: Vec<BucketInfo>,
}

/// The `sprint.config` metadata (STORE.md "Schema metadata"); extra fields are allowed by the contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreConfig {
    pub format_version: u32,
    pub resolution: u32,
    pub max_sequence_length: usize,
    pub complex_human_instruction: Option<Vec<String>>,
    pub vae_scaling_factor: f64,
    pub text_hidden_size: usize,
    pub latent_dtype: StoreDType,
    pub embed_dtype: StoreDType,
    pub negative_prompt_len: usize,
    pub negative_prompt_embeds_f32le_b64: String,
    pub models: ModelsInfo,
    pub preprocess: PreprocessInfo,
    /// `[C, H, W]` of every latent (extra field); in a multi-scale store, of the square bucket's.
    pub latent_shape: [usize; 3],
    /// The program that wrote the store (extra field).
    pub writer: String,
    /// The aspect-ratio buckets of a multi-scale store (format_version 2); absent in square stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_scale: Option<MultiScaleInfo>,
    /// Validation prompts encoded as the pipeline encodes them (complex human instruction, padded to
    /// `validation_max_sequence_length`); absent unless `sprint-prep --validation_prompt` was given. Not a
    /// setting: a later run may replace them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_prompts: Vec<StoredPrompt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_max_sequence_length: Option<usize>,
}

impl StoreConfig {
    pub fn encode_negative(values: &[f32]) -> String {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// The unconditional embedding `(negative_prompt_len, text_hidden_size)` as f32 values.
    pub fn negative_prompt_embeds(&self) -> Result<Vec<f32>> {
        let values = decode_f32le(
            "negative_prompt_embeds_f32le_b64",
            &self.negative_prompt_embeds_f32le_b64,
        )?;
        if values.len() != self.negative_prompt_len * self.text_hidden_size {
            return Err(Error::store(
                "",
                "negative_prompt_embeds_f32le_b64 does not hold negative_prompt_len x text_hidden_size floats",
            ));
        }
        Ok(values)
    }
}

/// Little-endian f32 values from base64 (the encoding of `negative_prompt_embeds_f32le_b64` and of stored
/// validation prompts).
pub fn decode_f32le(what: &str, b64: &str) -> Result<Vec<f32>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| Error::store("", format!("{what} is not base64: {e}")))?;
    if bytes.len() % 4 != 0 {
        return Err(Error::store(
            "",
            format!("{what} does not hold whole f32 values"),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads the `sprint.config` of an open dataset, refusing unknown format versions.
pub(super) fn read_config(path: &Path, ds: &Dataset) -> Result<StoreConfig> {
    let text = ds.schema().metadata.get(CONFIG_KEY).ok_or_else(|| {
        Error::store(
            path,
            format!("no \"{CONFIG_KEY}\" schema metadata: this Lance dataset was not written by sprint-prep"),
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::store(path, format!("\"{CONFIG_KEY}\" is not valid JSON: {e}")))?;
    let version = value.get("format_version").and_then(|v| v.as_u64());
    if !matches!(version, Some(v) if v == FORMAT_VERSION as u64 || v == FORMAT_VERSION_MULTI_SCALE as u64)
    {
        return Err(Error::store(
            path,
            format!(
                "format_version {version:?} is not supported (this build reads versions {FORMAT_VERSION} and \
                 {FORMAT_VERSION_MULTI_SCALE}); use a matching sana-sprint version"
            ),
        ));
    }
    let config: StoreConfig = serde_json::from_value(value)
        .map_err(|e| Error::store(path, format!("\"{CONFIG_KEY}\" is malformed: {e}")))?;
    let bucketed = config.format_version == FORMAT_VERSION_MULTI_SCALE;
    if bucketed != config.multi_scale.is_some() {
        return Err(Error::store(
            path,
            format!(
                "\"{CONFIG_KEY}\" is malformed: format_version {} {} a \"multi_scale\" entry",
                config.format_version,
                if bucketed {
                    "requires"
                } else {
                    "does not allow"
                }
            ),
        ));
    }
    Ok(config)
}
