//! The row schema (STORE.md "Rows"): column names, element types and the on-disk float encoding.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use super::config::{StoreConfig, CONFIG_KEY};
use crate::error::Result;

/// The column names of a store, used by the writer, the reader, `--inspect` and the tests.
pub mod columns {
    /// utf8, unique: `<parquet file name>#<row index>`.
    pub const ID: &str = "id";
    /// utf8: the caption as read.
    pub const CAPTION: &str = "caption";
    /// list<float32|float16>: the raw DC-AE latent, C·H·W row-major.
    pub const LATENT: &str = "latent";
    /// fixed_size_list<int32>[3]: `[C, H, W]` of the latent.
    pub const LATENT_SHAPE: &str = "latent_shape";
    /// list<float16|float32>: the first `prompt_len` token rows of the prompt embedding.
    pub const PROMPT_EMBEDS: &str = "prompt_embeds";
    /// int32: number of unmasked prompt tokens.
    pub const PROMPT_LEN: &str = "prompt_len";
}

/// The item field name of Arrow list columns.
pub(super) const LIST_ITEM: &str = "item";

/// Element type of a stored float column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreDType {
    Float32,
    Float16,
}

impl StoreDType {
    pub fn arrow(self) -> DataType {
        match self {
            StoreDType::Float32 => DataType::Float32,
            StoreDType::Float16 => DataType::Float16,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            StoreDType::Float32 => 4,
            StoreDType::Float16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            StoreDType::Float32 => "float32",
            StoreDType::Float16 => "float16",
        }
    }
}

/// One encoded sample, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentRow {
    pub id: String,
    pub caption: String,
    /// Raw DC-AE encoder output, C·H·W row-major.
    pub latent: Vec<f32>,
    pub latent_shape: [i32; 3],
    /// The first `prompt_len` token rows of the prompt embedding, flattened `prompt_len · D`.
    pub prompt_embeds: Vec<f32>,
    pub prompt_len: i32,
}

/// How the float columns are encoded on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloatEncoding {
    /// zstd level; `None` stores the floats uncompressed.
    pub zstd_level: Option<i32>,
    /// Byte-stream split: groups the bytes of each float by significance before compression (exponent bytes
    /// compress well, mantissa bytes hardly), which is what makes zstd worthwhile on floats.
    pub byte_stream_split: bool,
}

impl Default for FloatEncoding {
    /// zstd 3 + byte-stream split: the smallest store without slower reads (`cargo bench --bench store`).
    fn default() -> Self {
        Self {
            zstd_level: Some(3),
            byte_stream_split: true,
        }
    }
}

impl FloatEncoding {
    /// Arrow field metadata that selects this encoding in Lance.
    fn metadata(self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        if let Some(level) = self.zstd_level {
            m.insert("lance-encoding:compression".to_string(), "zstd".to_string());
            m.insert(
                "lance-encoding:compression-level".to_string(),
                level.to_string(),
            );
        }
        m.insert(
            "lance-encoding:bss".to_string(),
            if self.byte_stream_split { "on" } else { "off" }.to_string(),
        );
        m
    }
}

/// The Arrow schema of a store with the given dtypes; `config` goes into the schema metadata.
pub fn schema(config: &StoreConfig, encoding: FloatEncoding) -> Result<SchemaRef> {
    let list = |name: &str, dt: StoreDType| {
        let item = Field::new(LIST_ITEM, dt.arrow(), false).with_metadata(encoding.metadata());
        Field::new(name, DataType::List(Arc::new(item)), false).with_metadata(encoding.metadata())
    };
    let fields = vec![
        Field::new(columns::ID, DataType::Utf8, false),
        Field::new(columns::CAPTION, DataType::Utf8, false),
        list(columns::LATENT, config.latent_dtype),
        Field::new(
            columns::LATENT_SHAPE,
            DataType::FixedSizeList(Arc::new(Field::new(LIST_ITEM, DataType::Int32, false)), 3),
            false,
        ),
        list(columns::PROMPT_EMBEDS, config.embed_dtype),
        Field::new(columns::PROMPT_LEN, DataType::Int32, false),
    ];
    let meta = HashMap::from([(CONFIG_KEY.to_string(), serde_json::to_string(config)?)]);
    Ok(Arc::new(Schema::new(fields).with_metadata(meta)))
}
