//! The `sprint.config` schema metadata (STORE.md "Schema metadata"): the settings a store was written with.

use std::path::Path;

use base64::Engine;
use lance::dataset::Dataset;
use serde::{Deserialize, Serialize};

use super::schema::StoreDType;
use crate::error::{Error, Result};

pub const FORMAT_VERSION: u32 = 1;
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
    /// `[C, H, W]` of every latent (extra field).
    pub latent_shape: [usize; 3],
    /// The program that wrote the store (extra field).
    pub writer: String,
}

impl StoreConfig {
    pub fn encode_negative(values: &[f32]) -> String {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// The unconditional embedding `(negative_prompt_len, text_hidden_size)` as f32 values.
    pub fn negative_prompt_embeds(&self) -> Result<Vec<f32>> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.negative_prompt_embeds_f32le_b64)
            .map_err(|e| {
                Error::store(
                    "",
                    format!("negative_prompt_embeds_f32le_b64 is not base64: {e}"),
                )
            })?;
        if bytes.len() != 4 * self.negative_prompt_len * self.text_hidden_size {
            return Err(Error::store(
                "",
                "negative_prompt_embeds_f32le_b64 does not hold negative_prompt_len x text_hidden_size floats",
            ));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
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
    if version != Some(FORMAT_VERSION as u64) {
        return Err(Error::store(
            path,
            format!(
                "format_version {version:?} is not supported (this build reads version {FORMAT_VERSION}); use a matching sana-sprint version"
            ),
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| Error::store(path, format!("\"{CONFIG_KEY}\" is malformed: {e}")))
}
