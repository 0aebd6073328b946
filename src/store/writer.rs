//! Appending rows to a store: one atomic Lance commit per [`StoreWriter::commit`], ids never duplicated.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Int32Builder};
use arrow_array::{
    Array, ArrayRef, Float16Array, Float32Array, Int32Array, ListArray, RecordBatch,
    RecordBatchIterator, StringArray,
};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, SchemaRef};
use futures::TryStreamExt;
use half::f16;
use lance::dataset::{Dataset, WriteMode, WriteParams};

use super::config::{read_config, StoreConfig};
use super::schema::{columns, schema, FloatEncoding, LatentRow, LIST_ITEM};
use super::{runtime_with, uri};
use crate::error::{Error, Result};

fn runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(2)
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
        .with_field(Arc::new(Field::new(LIST_ITEM, DataType::Int32, false)));
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
        float_list(schema, columns::LATENT, latents)?,
        Arc::new(shapes.finish()),
        float_list(schema, columns::PROMPT_EMBEDS, embeds)?,
        Arc::new(Int32Array::from(lens)),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
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
        let exists = super::location::store_exists(path)?;
        let create = |write_mode: WriteMode| -> Result<Dataset> {
            let empty = RecordBatchIterator::new(
                std::iter::empty::<Result<RecordBatch, _>>(),
                schema.clone(),
            );
            let params = WriteParams {
                mode: write_mode,
                ..Default::default()
            };
            Ok(rt.block_on(Dataset::write(empty, uri(path)?.as_str(), Some(params)))?)
        };
        // Several workers may start on a new store at once. Lance records a creation on an existing dataset
        // as an overwrite, which would drop the rows another worker appended meanwhile, so exactly one worker
        // creates the store: the one that makes `_sprint/creating` (an exclusive file create); the others wait
        // until the store opens.
        let created = if !exists && creation_lock(path)? {
            let ds = create(WriteMode::Create);
            remove_creation_marker(path);
            match ds {
                Ok(ds) => Some(ds),
                // another worker created the store and removed its marker between our existence check and
                // our marker: open it as the others do
                Err(_) if super::location::store_exists(path)? => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let (dataset, existing) = if let Some(ds) = created {
            record_commit(path, &rt, &ds, true);
            (ds, HashSet::new())
        } else if mode == OpenMode::Overwrite {
            let ds = create(WriteMode::Overwrite)?;
            record_commit(path, &rt, &ds, true);
            (ds, HashSet::new())
        } else {
            // (a store another worker is creating this instant opens once its first version is committed)
            let waited = std::time::Instant::now();
            let ds = loop {
                match super::verify::open_dataset(&rt, path) {
                    Ok(ds) => break ds,
                    Err(_)
                        if creation_marker_exists(path)
                            && waited.elapsed() < std::time::Duration::from_secs(120) =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    // the creator may have committed and removed its marker between our open and the check
                    Err(e) => match super::verify::open_dataset(&rt, path) {
                        Ok(ds) => break ds,
                        Err(_) => return Err(e),
                    },
                }
            };
            let stored = read_config(path, &ds)?;
            // appending to a damaged store would build on it: the reader's open check first
            rt.block_on(super::verify::check_open(path, &ds))?;
            if let Some(diff) = stored.incompatibility(&config) {
                return Err(Error::store(
                    path,
                    format!(
                        "refusing to mix settings: {diff}. Write to a new --output, or pass --overwrite to replace the store"
                    ),
                ));
            }
            let mut ds = ds;
            if !config.validation_prompts.is_empty()
                && (stored.validation_prompts != config.validation_prompts
                    || stored.validation_max_sequence_length
                        != config.validation_max_sequence_length)
            {
                // not a setting: this run's validation prompts replace the stored ones (one metadata commit)
                let updated = StoreConfig {
                    validation_prompts: config.validation_prompts.clone(),
                    validation_max_sequence_length: config.validation_max_sequence_length,
                    ..stored
                };
                let json = serde_json::to_string(&updated)?;
                let entry = [(super::config::CONFIG_KEY.to_string(), Some(json))];
                rt.block_on(async { ds.update_schema_metadata(entry).await })?;
                record_commit(path, &rt, &ds, false);
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
        // Lance rebases an append on the commits of other writers by itself (its own retries); under heavy
        // contention (many workers committing at once) it can still give up: try again after a jittered pause.
        // A failed commit references none of the files it wrote, so a retry cannot store a row twice.
        let mut attempt = 0u32;
        loop {
            let reader = RecordBatchIterator::new(vec![Ok(batch.clone())], self.schema.clone());
            let params = WriteParams {
                mode: WriteMode::Append,
                ..Default::default()
            };
            match self.rt.block_on(self.dataset.append(reader, Some(params))) {
                Ok(()) => break,
                Err(
                    e @ (lance::Error::CommitConflict { .. }
                    | lance::Error::RetryableCommitConflict { .. }
                    | lance::Error::TooMuchWriteContention { .. }),
                ) if attempt < COMMIT_RETRIES => {
                    attempt += 1;
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos());
                    let pause = 200 * 2u64.pow(attempt) + u64::from(nanos % 500);
                    tracing::warn!(
                        "commit of {n} rows to {} failed ({e}); retrying in {pause} ms ({attempt}/{COMMIT_RETRIES})",
                        self.path.display()
                    );
                    std::thread::sleep(std::time::Duration::from_millis(pause));
                    self.rt.block_on(self.dataset.checkout_latest())?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.rows_written += n;
        record_commit(&self.path, &self.rt, &self.dataset, false);
        Ok(n)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Commits retried after Lance gave up on contention with other writers.
const COMMIT_RETRIES: u32 = 5;

/// Records the version `ds` was just committed as in the store's commit marker (`_sprint/committed.json`,
/// STORE.md), which lets a reader notice a lost latest manifest. The commit stands whatever happens here: a
/// failure is only warned about (the marker then lags, which weakens that check and nothing else).
fn record_commit(path: &Path, rt: &tokio::runtime::Runtime, ds: &Dataset, fresh: bool) {
    let rows = match super::verify::manifest_rows(ds) {
        Some(r) => Ok(r),
        None => rt.block_on(ds.count_rows(None)).map(|r| r as u64),
    };
    let recorded = rows
        .map_err(Error::from)
        .and_then(|rows| super::verify::record_commit(path, ds.version().version, rows, fresh));
    if let Err(e) = recorded {
        tracing::warn!(
            "recording commit {} in {}: {e}",
            ds.version().version,
            super::verify::shown(path, super::verify::COMMIT_MARKER).display()
        );
    }
}

/// Marker of a store being created by one worker (inside the store folder).
const CREATING: &str = "_sprint/creating";

/// Takes the right to create the store at `path`: true for exactly one of several racing workers. A marker left
/// by a creator that died before committing (older than a minute, and still no store) is replaced.
fn creation_lock(path: &Path) -> Result<bool> {
    if let Some(remote) = super::location::remote(path)? {
        return creation_lock_remote(&remote);
    }
    let marker = path.join(CREATING);
    let dir = marker.parent().expect("has a parent");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
        {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let age = std::fs::metadata(&marker)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if age.is_some_and(|a| a > std::time::Duration::from_secs(60))
                    && !path.join("_versions").is_dir()
                {
                    let _ = std::fs::remove_file(&marker);
                    continue;
                }
                return Ok(false);
            }
            Err(e) => return Err(Error::io(&marker, e)),
        }
    }
    Ok(false)
}

/// [`creation_lock`] on an object store: the marker is created with a conditional put (`If-None-Match`); a
/// marker older than a minute with still no store is deleted and the race run again.
fn creation_lock_remote(remote: &super::location::Remote) -> Result<bool> {
    for _ in 0..2 {
        if remote.create(CREATING, b"creating".to_vec())? {
            return Ok(true);
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let old = remote
            .get(CREATING)?
            .is_some_and(|m| now_ms - m.modified_unix_ms > 60_000);
        if old && !remote.any_under("_versions")? {
            remote.delete(CREATING)?;
            continue;
        }
        return Ok(false);
    }
    Ok(false)
}

fn remove_creation_marker(path: &Path) {
    match super::location::remote(path) {
        Ok(None) => {
            let _ = std::fs::remove_file(path.join(CREATING));
        }
        Ok(Some(remote)) => {
            if let Err(e) = remote.delete(CREATING) {
                tracing::warn!("removing the store's creation marker: {e}");
            }
        }
        Err(e) => tracing::warn!("removing the store's creation marker: {e}"),
    }
}

fn creation_marker_exists(path: &Path) -> bool {
    match super::location::remote(path) {
        Ok(None) => path.join(CREATING).exists(),
        Ok(Some(remote)) => remote.get(CREATING).ok().flatten().is_some(),
        Err(_) => false,
    }
}

/// The ids stored at `path` now (a worker taking over another's part re-reads them).
pub fn stored_ids(path: &Path) -> Result<HashSet<String>> {
    let rt = runtime()?;
    let ds = rt.block_on(Dataset::open(&uri(path)?))?;
    rt.block_on(read_ids(&ds))
}

async fn read_ids(ds: &Dataset) -> Result<HashSet<String>> {
    let mut scan = ds.scan();
    scan.project(&[columns::ID])?;
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
