//! Reading a store: its settings, whole scans, and single rows in their stored dtype (the loader's path).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type};
use arrow_array::{Array, FixedSizeListArray, Int32Array, ListArray, RecordBatch, StringArray};
use arrow_buffer::ScalarBuffer;
use futures::TryStreamExt;
use half::f16;
use lance::dataset::Dataset;

use super::config::{read_config, StoreConfig};
use super::f16::f16_to_f32;
use super::runtime_with;
use super::schema::{columns, LatentRow};
use super::verify::store_error;
use crate::error::{Error, Result};

/// Lance decodes on the runtime's workers, so a reader gets one per core (the loader is decode-bound).
fn reader_runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2),
    )
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
        if !super::location::store_exists(path)? {
            return Err(Error::Missing {
                what: "latent store".into(),
                path: path.to_path_buf(),
                hint: "create it with sprint-prep --output <path>".into(),
            });
        }
        let rt = reader_runtime()?;
        let dataset = super::verify::open_dataset(&rt, path)?;
        let config = read_config(path, &dataset)?;
        // metadata only: every data file there with its recorded size, no lost latest manifest
        rt.block_on(super::verify::check_open(path, &dataset))?;
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
        self.rt
            .block_on(self.dataset.count_rows(None))
            .map_err(|e| store_error(&self.path, e))
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
        let batches: Vec<RecordBatch> = self
            .rt
            .block_on(async {
                self.dataset
                    .scan()
                    .try_into_stream()
                    .await?
                    .try_collect()
                    .await
            })
            .map_err(|e| store_error(&self.path, e))?;
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

    /// Whether the store is on an object store (`s3://…`) rather than a local folder.
    pub fn is_remote(&self) -> bool {
        super::location::is_remote(&self.path)
    }

    /// Total bytes of the store's files on disk (on an object store: of the objects under its URI; 0 when
    /// they cannot be listed).
    pub fn disk_bytes(&self) -> u64 {
        super::location::store_bytes(&self.path).unwrap_or_else(|e| {
            tracing::warn!("sizing the store: {e}");
            0
        })
    }
}

pub(super) fn column<'a, T: 'static>(path: &Path, b: &'a RecordBatch, name: &str) -> Result<&'a T> {
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
            .await
            .map_err(|e| store_error(&self.path, e))?;
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

/// The six columns of a batch read from a store, typed (an error names the store and the column).
pub(crate) struct RowColumns<'a> {
    pub ids: &'a StringArray,
    pub caps: &'a StringArray,
    pub lat: &'a ListArray,
    pub shp: &'a FixedSizeListArray,
    pub emb: &'a ListArray,
    pub lens: &'a Int32Array,
}

impl<'a> RowColumns<'a> {
    pub(crate) fn of(path: &Path, b: &'a RecordBatch) -> Result<Self> {
        Ok(Self {
            ids: column::<StringArray>(path, b, columns::ID)?,
            caps: column::<StringArray>(path, b, columns::CAPTION)?,
            lat: column::<ListArray>(path, b, columns::LATENT)?,
            shp: column::<FixedSizeListArray>(path, b, columns::LATENT_SHAPE)?,
            emb: column::<ListArray>(path, b, columns::PROMPT_EMBEDS)?,
            lens: column::<Int32Array>(path, b, columns::PROMPT_LEN)?,
        })
    }
}

fn stored_rows(path: &Path, b: &RecordBatch) -> Result<Vec<StoredRow>> {
    let RowColumns {
        ids,
        caps,
        lat,
        shp,
        emb,
        lens,
    } = RowColumns::of(path, b)?;
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
