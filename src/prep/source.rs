//! Parquet shards of image/caption pairs: validation up front, then a streaming row reader.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::{Error, Result};

/// One input row as read from a shard. `None` means the cell was null.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub id: String,
    pub caption: Option<String>,
    pub image: Option<Vec<u8>>,
}

/// A validated shard: its path, its name (the id prefix) and its row count.
#[derive(Debug, Clone)]
pub struct Shard {
    pub path: PathBuf,
    pub name: String,
    pub num_rows: usize,
}

impl Shard {
    pub fn id(&self, row: usize) -> String {
        format!("{}#{row}", self.name)
    }
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| Error::data(path, format!("not a readable parquet file ({e})")))
}

fn image_type_ok(dt: &DataType) -> bool {
    match dt {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => true,
        DataType::Struct(fields) => fields
            .iter()
            .any(|f| f.name() == "bytes" && image_type_ok(f.data_type())),
        _ => false,
    }
}

fn caption_type_ok(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// Opens every shard's footer and checks the columns before any work is done, so that a bad shard fails the
/// run at once with its name. Two shards with the same file name are refused (ids would collide).
pub fn validate_shards(
    paths: &[PathBuf],
    image_column: &str,
    caption_column: &str,
) -> Result<Vec<Shard>> {
    let mut by_name: HashMap<String, PathBuf> = HashMap::new();
    let mut shards = Vec::with_capacity(paths.len());
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::data(path, "not a file path"))?;
        if let Some(prev) = by_name.insert(name.clone(), path.clone()) {
            return Err(Error::data(
                path,
                format!(
                    "two input files share the name {name} ({} and {}); row ids are <file name>#<row>, so rename one",
                    prev.display(),
                    path.display()
                ),
            ));
        }
        let builder = open(path)?;
        let schema = builder.schema();
        let found = || {
            schema
                .fields()
                .iter()
                .map(|f| format!("{} ({})", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (col, ok, flag) in [
            (
                image_column,
                image_type_ok as fn(&DataType) -> bool,
                "--image_column",
            ),
            (caption_column, caption_type_ok, "--caption_column"),
        ] {
            match schema.field_with_name(col) {
                Err(_) => {
                    return Err(Error::data(
                        path,
                        format!(
                            "no column \"{col}\"; columns found: {}. Choose one with {flag}",
                            found()
                        ),
                    ))
                }
                Ok(f) if !ok(f.data_type()) => {
                    return Err(Error::data(
                        path,
                        format!(
                            "column \"{col}\" has type {}, expected {}",
                            f.data_type(),
                            if flag == "--image_column" {
                                "binary, large_binary or an image struct {bytes, path}"
                            } else {
                                "a string"
                            }
                        ),
                    ))
                }
                Ok(_) => {}
            }
        }
        let num_rows = builder.metadata().file_metadata().num_rows() as usize;
        shards.push(Shard {
            path: path.clone(),
            name,
            num_rows,
        });
    }
    Ok(shards)
}

fn binary_at(a: &ArrayRef, i: usize) -> Option<Vec<u8>> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Binary => Some(a.as_binary::<i32>().value(i).to_vec()),
        DataType::LargeBinary => Some(a.as_binary::<i64>().value(i).to_vec()),
        DataType::BinaryView => Some(a.as_binary_view().value(i).to_vec()),
        DataType::Struct(_) => {
            let s: &StructArray = a.as_struct();
            s.column_by_name("bytes").and_then(|b| binary_at(b, i))
        }
        _ => None,
    }
}

fn string_at(a: &ArrayRef, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(a.as_string_view().value(i).to_string()),
        _ => None,
    }
}

/// Streams the rows of `shard` (only the two columns), calling `f` for each row whose id `keep` accepts.
/// Stops early and returns `Ok(false)` when `f` returns false (the consumer went away).
pub fn read_rows(
    shard: &Shard,
    image_column: &str,
    caption_column: &str,
    keep: &dyn Fn(&str) -> bool,
    f: &mut dyn FnMut(RawRow) -> bool,
) -> Result<bool> {
    read_rows_range(
        shard,
        0,
        shard.num_rows,
        image_column,
        caption_column,
        keep,
        f,
    )
}

/// [`read_rows`] over rows `[start, start + len)` of the shard only (parquet skips the pages before).
pub fn read_rows_range(
    shard: &Shard,
    start: usize,
    len: usize,
    image_column: &str,
    caption_column: &str,
    keep: &dyn Fn(&str) -> bool,
    f: &mut dyn FnMut(RawRow) -> bool,
) -> Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let builder = open(&shard.path)?;
    let parquet_schema = builder.parquet_schema();
    let roots: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, fd)| fd.name() == image_column || fd.name() == caption_column)
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(parquet_schema, roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(64)
        .with_offset(start)
        .with_limit(len)
        .build()
        .map_err(|e| Error::data(&shard.path, format!("cannot read parquet: {e}")))?;
    let mut row = start;
    for batch in reader {
        let batch: RecordBatch =
            batch.map_err(|e| Error::data(&shard.path, format!("cannot read parquet: {e}")))?;
        let img = batch
            .column_by_name(image_column)
            .ok_or_else(|| Error::data(&shard.path, format!("column {image_column} vanished")))?;
        let cap = batch
            .column_by_name(caption_column)
            .ok_or_else(|| Error::data(&shard.path, format!("column {caption_column} vanished")))?;
        for i in 0..batch.num_rows() {
            let id = shard.id(row);
            row += 1;
            if !keep(&id) {
                continue;
            }
            let r = RawRow {
                id,
                caption: string_at(cap, i),
                image: binary_at(img, i),
            };
            if !f(r) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}
