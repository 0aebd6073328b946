//! The Lance latent store (STORE.md, format version 1): schema, settings metadata, writer and reader.
//!
//! Every append is one atomic Lance commit, so a killed writer leaves a valid store; rows are keyed by `id`
//! and a writer never appends an id the store already holds, so reruns are idempotent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Int32Builder};
use arrow_array::types::{Float16Type, Float32Type};
use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, Int32Array, ListArray,
    RecordBatch, RecordBatchIterator, StringArray,
};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use base64::Engine;
use futures::TryStreamExt;
use half::f16;
use lance::dataset::{Dataset, WriteMode, WriteParams};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod compat; // does a store fit a prep run, a teacher folder: settings, fingerprints, shapes

pub const FORMAT_VERSION: u32 = 1;
/// Schema-metadata key holding the JSON settings of the store.
pub const CONFIG_KEY: &str = "sprint.config";

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
        let item = Field::new("item", dt.arrow(), false).with_metadata(encoding.metadata());
        Field::new(name, DataType::List(Arc::new(item)), false).with_metadata(encoding.metadata())
    };
    let fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
        list("latent", config.latent_dtype),
        Field::new(
            "latent_shape",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Int32, false)), 3),
            false,
        ),
        list("prompt_embeds", config.embed_dtype),
        Field::new("prompt_len", DataType::Int32, false),
    ];
    let meta = HashMap::from([(CONFIG_KEY.to_string(), serde_json::to_string(config)?)]);
    Ok(Arc::new(Schema::new(fields).with_metadata(meta)))
}

/// A list column whose item field is exactly the schema's (Arrow compares item fields, metadata included).
fn float_list(schema: &SchemaRef, name: &str, values: Vec<Vec<f32>>) -> Result<ArrayRef> {
    let DataType::List(item) = schema.field_with_name(name)?.data_type().clone() else {
        return Err(Error::store("", format!("column {name} is not a list")));
    };
    let offsets = OffsetBuffer::from_lengths(values.iter().map(Vec::len));
    let flat = values.into_iter().flatten();
    let arr: ArrayRef = match item.data_type() {
        DataType::Float32 => Arc::new(Float32Array::from_iter_values(flat)),
        _ => Arc::new(Float16Array::from_iter_values(flat.map(f16::from_f32))),
    };
    Ok(Arc::new(ListArray::try_new(item, offsets, arr, None)?))
}

fn to_batch(schema: &SchemaRef, rows: Vec<LatentRow>) -> Result<RecordBatch> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut captions = Vec::with_capacity(rows.len());
    let mut latents = Vec::with_capacity(rows.len());
    let mut embeds = Vec::with_capacity(rows.len());
    let mut lens = Vec::with_capacity(rows.len());
    let mut shapes = FixedSizeListBuilder::new(Int32Builder::new(), 3)
        .with_field(Arc::new(Field::new("item", DataType::Int32, false)));
    for r in rows {
        ids.push(r.id);
        captions.push(r.caption);
        latents.push(r.latent);
        embeds.push(r.prompt_embeds);
        lens.push(r.prompt_len);
        shapes.values().append_slice(&r.latent_shape);
        shapes.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(StringArray::from(captions)),
        float_list(schema, "latent", latents)?,
        Arc::new(shapes.finish()),
        float_list(schema, "prompt_embeds", embeds)?,
        Arc::new(Int32Array::from(lens)),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn uri(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(2)
}

fn runtime_with(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))
}

/// Lance decodes on the runtime's workers, so a reader gets one per core (the loader is decode-bound).
fn reader_runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2),
    )
}

/// Reads the `sprint.config` of an open dataset, refusing unknown format versions.
fn read_config(path: &Path, ds: &Dataset) -> Result<StoreConfig> {
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

/// Appends encoded rows to a store, creating it on first use and refusing incompatible settings.
pub struct StoreWriter {
    path: PathBuf,
    rt: tokio::runtime::Runtime,
    dataset: Dataset,
    schema: SchemaRef,
    config: StoreConfig,
    existing: HashSet<String>,
    pending: Vec<LatentRow>,
    rows_written: usize,
}

/// How an existing store at the output path is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create it, or resume/extend it when its settings match.
    CreateOrAppend,
    /// Replace its contents by an empty store with the new settings (a new Lance version).
    Overwrite,
}

impl StoreWriter {
    pub fn open(
        path: &Path,
        config: StoreConfig,
        mode: OpenMode,
        encoding: FloatEncoding,
    ) -> Result<Self> {
        let rt = runtime()?;
        let schema = schema(&config, encoding)?;
        let exists = path.join("_versions").is_dir();
        let create = |write_mode: WriteMode| -> Result<Dataset> {
            let empty = RecordBatchIterator::new(
                std::iter::empty::<Result<RecordBatch, _>>(),
                schema.clone(),
            );
            let params = WriteParams {
                mode: write_mode,
                ..Default::default()
            };
            Ok(rt.block_on(Dataset::write(empty, uri(path).as_str(), Some(params)))?)
        };
        let (dataset, existing) = if !exists {
            (create(WriteMode::Create)?, HashSet::new())
        } else if mode == OpenMode::Overwrite {
            (create(WriteMode::Overwrite)?, HashSet::new())
        } else {
            let ds = rt.block_on(Dataset::open(&uri(path)))?;
            let stored = read_config(path, &ds)?;
            if let Some(diff) = stored.incompatibility(&config) {
                return Err(Error::store(
                    path,
                    format!(
                        "refusing to mix settings: {diff}. Write to a new --output, or pass --overwrite to replace the store"
                    ),
                ));
            }
            let ids = rt.block_on(read_ids(&ds))?;
            (ds, ids)
        };
        Ok(Self {
            path: path.to_path_buf(),
            rt,
            dataset,
            schema,
            config,
            existing,
            pending: Vec::new(),
            rows_written: 0,
        })
    }

    /// Ids already in the store (skipped by a resumed run).
    pub fn contains(&self, id: &str) -> bool {
        self.existing.contains(id)
    }

    pub fn existing_len(&self) -> usize {
        self.existing.len()
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn rows_written(&self) -> usize {
        self.rows_written
    }

    /// Queues a row; rows whose id is already stored or queued are dropped (returns false).
    pub fn push(&mut self, row: LatentRow) -> bool {
        if !self.existing.insert(row.id.clone()) {
            return false;
        }
        self.pending.push(row);
        true
    }

    /// Writes the queued rows as one atomic Lance commit; returns how many were written.
    pub fn commit(&mut self) -> Result<usize> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let rows = std::mem::take(&mut self.pending);
        let n = rows.len();
        let batch = to_batch(&self.schema, rows)?;
        let reader = RecordBatchIterator::new(vec![Ok(batch)], self.schema.clone());
        let params = WriteParams {
            mode: WriteMode::Append,
            ..Default::default()
        };
        self.rt
            .block_on(self.dataset.append(reader, Some(params)))?;
        self.rows_written += n;
        Ok(n)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

async fn read_ids(ds: &Dataset) -> Result<HashSet<String>> {
    let mut scan = ds.scan();
    scan.project(&["id"])?;
    let mut stream = scan.try_into_stream().await?;
    let mut ids = HashSet::new();
    while let Some(batch) = stream.try_next().await? {
        let col = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::store("", "column id is not utf8"))?;
        ids.extend(col.iter().flatten().map(str::to_string));
    }
    Ok(ids)
}

/// Read access to a store: its settings and rows.
pub struct LatentStore {
    path: PathBuf,
    rt: tokio::runtime::Runtime,
    dataset: Dataset,
    config: StoreConfig,
}

impl LatentStore {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join("_versions").is_dir() {
            return Err(Error::Missing {
                what: "latent store".into(),
                path: path.to_path_buf(),
                hint: "create it with sprint-prep --output <path>".into(),
            });
        }
        let rt = reader_runtime()?;
        let dataset = rt.block_on(Dataset::open(&uri(path)))?;
        let config = read_config(path, &dataset)?;
        Ok(Self {
            path: path.to_path_buf(),
            rt,
            dataset,
            config,
        })
    }

    /// The runtime the store reads on (one worker per core); [`RowReader`] futures run on it.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// A cheap, cloneable handle that reads single rows concurrently (the loader's read path).
    pub fn row_reader(&self) -> RowReader {
        RowReader {
            path: Arc::from(self.path.as_path()),
            dataset: self.dataset.clone(),
            projection: Arc::new(self.dataset.schema().clone()),
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    pub fn len(&self) -> Result<usize> {
        Ok(self.rt.block_on(self.dataset.count_rows(None))?)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    pub fn version(&self) -> u64 {
        self.dataset.version().version
    }

    pub fn num_fragments(&self) -> usize {
        self.dataset.get_fragments().len()
    }

    /// Every row, converted to f32 (for inspection and tests; the trainer reads batches by index).
    pub fn read_all(&self) -> Result<Vec<LatentRow>> {
        let batches: Vec<RecordBatch> = self.rt.block_on(async {
            self.dataset
                .scan()
                .try_into_stream()
                .await?
                .try_collect()
                .await
        })?;
        let mut rows = Vec::new();
        for b in &batches {
            rows.extend(
                stored_rows(&self.path, b)?
                    .into_iter()
                    .map(StoredRow::into_latent_row),
            );
        }
        Ok(rows)
    }

    /// The rows at the given offsets, in the order given, converted to f32.
    pub fn take(&self, offsets: &[u64]) -> Result<Vec<LatentRow>> {
        Ok(self
            .take_stored(offsets)?
            .into_iter()
            .map(StoredRow::into_latent_row)
            .collect())
    }

    /// The rows at the given offsets, in the order given, as stored (no conversion, no copy).
    pub fn take_stored(&self, offsets: &[u64]) -> Result<Vec<StoredRow>> {
        let reader = self.row_reader();
        self.rt.block_on(futures::future::try_join_all(
            offsets.iter().map(|&o| reader.row(o)),
        ))
    }

    /// Total bytes of the store's files on disk.
    pub fn disk_bytes(&self) -> u64 {
        dir_size(&self.path)
    }
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn column<'a, T: 'static>(path: &Path, b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            Error::store(
                path,
                format!("column {name} is missing or has the wrong type"),
            )
        })
}

/// The values of one row of a float list column, in their stored dtype; shares the decoded Arrow buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum FloatValues {
    F32(ScalarBuffer<f32>),
    F16(ScalarBuffer<f16>),
}

impl FloatValues {
    pub fn len(&self) -> usize {
        match self {
            FloatValues::F32(v) => v.len(),
            FloatValues::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `value · scale` as f32 into `out`, which must hold exactly `len()` values.
    pub fn write_f32(&self, out: &mut [f32], scale: f32) {
        assert_eq!(out.len(), self.len(), "FloatValues::write_f32 length");
        match self {
            FloatValues::F32(v) if scale == 1.0 => out.copy_from_slice(v),
            FloatValues::F32(v) => out
                .iter_mut()
                .zip(v.iter())
                .for_each(|(o, &x)| *o = x * scale),
            FloatValues::F16(v) => {
                f16_to_f32(v, out);
                if scale != 1.0 {
                    out.iter_mut().for_each(|o| *o *= scale);
                }
            }
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            FloatValues::F32(v) => v.to_vec(),
            FloatValues::F16(v) => {
                let mut out = vec![0f32; v.len()];
                self.write_f32(&mut out, 1.0);
                out
            }
        }
    }

    fn of_list_row(path: &Path, list: &ListArray, i: usize) -> Result<Self> {
        let v = list.value(i);
        if let Some(a) = v.as_primitive_opt::<Float32Type>() {
            return Ok(FloatValues::F32(a.values().clone()));
        }
        if let Some(a) = v.as_primitive_opt::<Float16Type>() {
            return Ok(FloatValues::F16(a.values().clone()));
        }
        Err(Error::store(
            path,
            format!(
                "list items of type {} are not float16/float32",
                v.data_type()
            ),
        ))
    }
}

/// f16 → f32 of a whole slice (exact). A sample holds ~0.5 M f16 values; with F16C this costs well under a
/// millisecond in every profile, while half's bulk conversion, inlined into this crate at its dev opt-level
/// with per-chunk debug checks, takes ~2–3 ms.
fn f16_to_f32(src: &[f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU supports F16C and AVX (checked just above).
        unsafe { f16_to_f32_f16c(src, out) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(out);
}

/// Eight values per instruction. Values move as typed arrays (`[f16; 8]` ↔ `__m128i`, `__m256` ↔ `[f32; 8]`):
/// the unaligned load/store intrinsics would go through `ptr::read/write_unaligned`, whose debug precondition
/// checks cost more than the conversion in the dev profile.
///
/// # Safety
/// The CPU must support F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
unsafe fn f16_to_f32_f16c(src: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, __m256, _mm256_cvtph_ps};
    let whole = src.len().min(out.len()) / 8 * 8;
    let mut i = 0;
    while i < whole {
        let h: [f16; 8] = *<&[f16; 8]>::try_from(&src[i..i + 8]).expect("8 values");
        let o = <&mut [f32; 8]>::try_from(&mut out[i..i + 8]).expect("8 values");
        // SAFETY: [f16; 8] and __m128i are both 16 plain bytes; __m256 and [f32; 8] both 32.
        *o = unsafe {
            std::mem::transmute::<__m256, [f32; 8]>(_mm256_cvtph_ps(std::mem::transmute::<
                [f16; 8],
                __m128i,
            >(h)))
        };
        i += 8;
    }
    for (o, h) in out[whole..].iter_mut().zip(&src[whole..]) {
        *o = h.to_f32();
    }
}

/// One row as Lance returned it: the float columns stay in their stored dtype and share the decoded Arrow
/// buffers, so a reader converts each value once, straight into its own buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub id: String,
    pub caption: String,
    /// C·H·W row-major.
    pub latent: FloatValues,
    pub latent_shape: [i32; 3],
    /// `prompt_len · D` values.
    pub prompt_embeds: FloatValues,
    pub prompt_len: i32,
}

impl StoredRow {
    pub fn into_latent_row(self) -> LatentRow {
        LatentRow {
            latent: self.latent.to_f32_vec(),
            prompt_embeds: self.prompt_embeds.to_f32_vec(),
            id: self.id,
            caption: self.caption,
            latent_shape: self.latent_shape,
            prompt_len: self.prompt_len,
        }
    }
}

impl From<LatentRow> for StoredRow {
    fn from(r: LatentRow) -> Self {
        Self {
            id: r.id,
            caption: r.caption,
            latent: FloatValues::F32(r.latent.into()),
            latent_shape: r.latent_shape,
            prompt_embeds: FloatValues::F32(r.prompt_embeds.into()),
            prompt_len: r.prompt_len,
        }
    }
}

/// Reads single rows of a store; clones share the open dataset. Its futures must run on the store's
/// runtime ([`LatentStore::runtime`]).
#[derive(Clone)]
pub struct RowReader {
    path: Arc<Path>,
    dataset: Dataset,
    projection: Arc<lance::datatypes::Schema>,
}

impl RowReader {
    /// The row at `offset`.
    ///
    /// One Lance `take` per row (callers run many concurrently): a multi-row take over list columns whose rows
    /// span several mini-block chunks (every real-size row does) trips an assertion in lance-encoding 14
    /// (lance-format/lance#8558).
    pub async fn row(&self, offset: u64) -> Result<StoredRow> {
        let batch = self
            .dataset
            .take(std::slice::from_ref(&offset), self.projection.clone())
            .await?;
        let mut rows = stored_rows(&self.path, &batch)?;
        if rows.len() != 1 {
            return Err(Error::store(
                &*self.path,
                format!("row {offset}: Lance returned {} rows", rows.len()),
            ));
        }
        Ok(rows.swap_remove(0))
    }
}

use arrow_array::cast::AsArray;

fn stored_rows(path: &Path, b: &RecordBatch) -> Result<Vec<StoredRow>> {
    let ids = column::<StringArray>(path, b, "id")?;
    let caps = column::<StringArray>(path, b, "caption")?;
    let lat = column::<ListArray>(path, b, "latent")?;
    let shp = column::<FixedSizeListArray>(path, b, "latent_shape")?;
    let emb = column::<ListArray>(path, b, "prompt_embeds")?;
    let lens = column::<Int32Array>(path, b, "prompt_len")?;
    (0..b.num_rows())
        .map(|i| {
            let s = shp.value(i);
            let s = s.as_primitive::<arrow_array::types::Int32Type>();
            Ok(StoredRow {
                id: ids.value(i).to_string(),
                caption: caps.value(i).to_string(),
                latent: FloatValues::of_list_row(path, lat, i)?,
                latent_shape: [s.value(0), s.value(1), s.value(2)],
                prompt_embeds: FloatValues::of_list_row(path, emb, i)?,
                prompt_len: lens.value(i),
            })
        })
        .collect()
}

/// A summary of a store for `sprint-prep --inspect`.
pub fn describe(store: &LatentStore) -> Result<BTreeMap<&'static str, serde_json::Value>> {
    let rows = store.len()?;
    let c = store.config();
    let bytes = store.disk_bytes();
    let latent_numel = c.latent_shape.iter().product::<usize>();
    let mut out = BTreeMap::new();
    out.insert(
        "path",
        serde_json::json!(store.path().display().to_string()),
    );
    out.insert("rows", serde_json::json!(rows));
    out.insert("lance_version", serde_json::json!(store.version()));
    out.insert("fragments", serde_json::json!(store.num_fragments()));
    out.insert("disk_bytes", serde_json::json!(bytes));
    if rows > 0 {
        let mean_len = mean_prompt_len(store)?;
        let raw_f16 = 2.0 * (latent_numel as f64 + mean_len * c.text_hidden_size as f64);
        let per = bytes as f64 / rows as f64;
        out.insert("bytes_per_sample", serde_json::json!(per.round()));
        out.insert(
            "raw_f16_bytes_per_sample",
            serde_json::json!(raw_f16.round()),
        );
        out.insert(
            "ratio_to_raw_f16",
            serde_json::json!((per / raw_f16 * 1000.0).round() / 1000.0),
        );
        out.insert(
            "mean_prompt_len",
            serde_json::json!((mean_len * 10.0).round() / 10.0),
        );
    }
    out.insert("config", serde_json::to_value(c)?);
    Ok(out)
}

fn mean_prompt_len(store: &LatentStore) -> Result<f64> {
    let batches: Vec<RecordBatch> = store.rt.block_on(async {
        let mut scan = store.dataset.scan();
        scan.project(&["prompt_len"])?;
        scan.try_into_stream().await?.try_collect().await
    })?;
    let (mut sum, mut n) = (0f64, 0usize);
    for b in &batches {
        let a = column::<Int32Array>(store.path(), b, "prompt_len")?;
        sum += a.values().iter().map(|&v| v as f64).sum::<f64>();
        n += a.len();
    }
    Ok(if n == 0 { 0.0 } else { sum / n as f64 })
}
