//! Parquet shards of image/caption pairs: validation up front, then a streaming row reader.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::basic::Type as PhysicalType;
use parquet::file::metadata::{FileMetaData, ParquetMetaData, ParquetMetaDataBuilder};
use parquet::schema::types::{SchemaDescriptor, Type};

use super::report::BadShard;
use crate::error::{Error, Result};

/// One input row as read from a shard. `None` means the cell was null. The caption is its raw bytes: a caption
/// that is not UTF-8 is one bad row, not a failed read.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub id: String,
    pub caption: Option<Vec<u8>>,
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

fn image_type_ok(dt: &DataType) -> bool {
    match dt {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => true,
        DataType::Dictionary(_, v) => {
            matches!(
                **v,
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView
            )
        }
        DataType::Struct(fields) => fields
            .iter()
            .any(|f| f.name() == "bytes" && image_type_ok(f.data_type())),
        _ => false,
    }
}

fn caption_type_ok(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        // pandas categoricals: read as their values
        DataType::Dictionary(_, v) => caption_type_ok(v),
        _ => false,
    }
}

/// The input files after [`validate_shards`]: the readable ones and those that are not.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub shards: Vec<Shard>,
    /// Files whose footer cannot be read (truncated, not parquet, damaged): skipped, or refused by `--strict`.
    pub bad: Vec<BadShard>,
}

/// Opens every shard's footer and checks the columns before any work is done. A file that is no readable
/// parquet file (truncated, random bytes, a damaged footer, a decoder panic) is returned in [`Inputs::bad`]
/// with its error; a readable file without the columns, with columns of the wrong type, or that cannot be
/// opened at all (permissions) fails the run at once with its name. Two shards with the same file name are
/// refused (ids would collide).
pub fn validate_shards(
    paths: &[PathBuf],
    image_column: &str,
    caption_column: &str,
) -> Result<Inputs> {
    let mut by_name: HashMap<String, PathBuf> = HashMap::new();
    let mut out = Inputs::default();
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
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let builder = match guarded(|| {
            ParquetRecordBatchReaderBuilder::try_new(f)
                .map_err(|e| format!("not a readable parquet file ({e})"))
        })
        .and_then(|b| row_group_rows(b.metadata()).map(|_| b))
        {
            Ok(b) => b,
            Err(error) => {
                out.bad.push(BadShard {
                    path: path.display().to_string(),
                    error,
                });
                continue;
            }
        };
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
        out.shards.push(Shard {
            path: path.clone(),
            name,
            num_rows,
        });
    }
    Ok(out)
}

/// The bytes of cell `i` of a binary or string column, or of the `bytes` field of an image struct; `None` for a
/// null cell.
fn binary_at(a: &ArrayRef, i: usize) -> Option<Vec<u8>> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Binary => Some(a.as_binary::<i32>().value(i).to_vec()),
        DataType::LargeBinary => Some(a.as_binary::<i64>().value(i).to_vec()),
        DataType::BinaryView => Some(a.as_binary_view().value(i).to_vec()),
        DataType::Utf8 => Some(a.as_string::<i32>().value(i).as_bytes().to_vec()),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i).as_bytes().to_vec()),
        DataType::Utf8View => Some(a.as_string_view().value(i).as_bytes().to_vec()),
        DataType::Struct(_) => {
            let s: &StructArray = a.as_struct();
            s.column_by_name("bytes").and_then(|b| binary_at(b, i))
        }
        _ => None,
    }
}

/// The text of a panic caught in the parquet decoder.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs a parquet call on untrusted bytes: a panic inside the decoder (a malformed file it did not expect)
/// becomes an error message like any other read error.
fn guarded<T>(
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "the parquet decoder failed on it ({})",
            panic_text(p)
        )),
    }
}

/// The footer of a shard as the row reader uses it: the caption column is read as plain bytes (its UTF8
/// annotation removed: the arrow reader would fail the whole batch on one caption that is not UTF-8, and each
/// row is checked on its own instead), only the leaves holding image bytes and the caption are read.
struct RowSource {
    meta: ArrowReaderMetadata,
    mask: ProjectionMask,
    /// Rows of each row group.
    rg_rows: Vec<usize>,
}

/// `md` with the top-level column `caption_column` re-declared as plain BYTE_ARRAY (no string annotation).
fn caption_as_bytes(
    md: &ParquetMetaData,
    caption_column: &str,
) -> std::result::Result<ParquetMetaData, String> {
    let fm = md.file_metadata();
    let root = fm.schema_descr().root_schema();
    let fields = root
        .get_fields()
        .iter()
        .map(|f| {
            if f.name() != caption_column
                || !f.is_primitive()
                || f.get_physical_type() != PhysicalType::BYTE_ARRAY
            {
                return Ok(f.clone());
            }
            let info = f.get_basic_info();
            let mut b = Type::primitive_type_builder(f.name(), PhysicalType::BYTE_ARRAY);
            if info.has_repetition() {
                b = b.with_repetition(info.repetition());
            }
            if info.has_id() {
                b = b.with_id(Some(info.id()));
            }
            b.build().map(Arc::new).map_err(|e| e.to_string())
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    let new_root = Type::group_type_builder(root.name())
        .with_fields(fields)
        .build()
        .map_err(|e| e.to_string())?;
    let file_meta = FileMetaData::new(
        fm.version(),
        fm.num_rows(),
        fm.created_by().map(str::to_string),
        fm.key_value_metadata().cloned(),
        Arc::new(SchemaDescriptor::new(Arc::new(new_root))),
        fm.column_orders().cloned(),
    );
    Ok(ParquetMetaDataBuilder::new(file_meta)
        .set_row_groups(md.row_groups().to_vec())
        .build())
}

/// The row counts of a footer's row groups, checked against its total (a damaged footer must not make up rows).
fn row_group_rows(md: &ParquetMetaData) -> std::result::Result<Vec<usize>, String> {
    let total = md.file_metadata().num_rows();
    let mut rows = Vec::with_capacity(md.num_row_groups());
    for rg in md.row_groups() {
        if rg.num_rows() < 0 {
            return Err(format!(
                "its footer is damaged: a row group of {} rows",
                rg.num_rows()
            ));
        }
        rows.push(rg.num_rows() as usize);
    }
    let sum: usize = rows.iter().sum();
    if total < 0 || sum as i64 != total {
        return Err(format!(
            "its footer is damaged: it says {total} rows, its row groups hold {sum}"
        ));
    }
    Ok(rows)
}

fn open_rows(
    shard: &Shard,
    image_column: &str,
    caption_column: &str,
) -> std::result::Result<RowSource, String> {
    let file = File::open(&shard.path).map_err(|e| e.to_string())?;
    let opts = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
    let loaded =
        guarded(|| ArrowReaderMetadata::load(&file, opts.clone()).map_err(|e| e.to_string()))?;
    let md = caption_as_bytes(loaded.metadata(), caption_column)?;
    let rg_rows = row_group_rows(&md)?;
    if rg_rows.iter().sum::<usize>() != shard.num_rows {
        return Err(format!(
            "it changed since it was checked ({} rows then, {} now)",
            shard.num_rows,
            rg_rows.iter().sum::<usize>()
        ));
    }
    let meta =
        guarded(|| ArrowReaderMetadata::try_new(Arc::new(md), opts).map_err(|e| e.to_string()))?;
    let descr = meta.metadata().file_metadata().schema_descr();
    let leaves = descr
        .columns()
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            let parts = c.path().parts();
            (parts.len() == 1 && parts[0] == caption_column)
                || (parts.first().is_some_and(|p| p == image_column)
                    && parts[1..].iter().all(|p| p == "bytes"))
        })
        .map(|(i, _)| i)
        .collect::<Vec<_>>();
    let mask = ProjectionMask::leaves(descr, leaves);
    Ok(RowSource {
        meta,
        mask,
        rg_rows,
    })
}

/// What [`read_rows_range`] did besides calling back.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    /// The callback asked to stop (the consumer went away).
    pub stopped: bool,
    /// Rows that could not be read (a corrupt page, a file that changed or vanished): the ids of those `keep`
    /// accepted, and the first error met.
    pub unreadable: Option<Unreadable>,
}

#[derive(Debug, Clone)]
pub struct Unreadable {
    pub ids: Vec<String>,
    pub error: String,
}

/// Streams the rows of `shard` (only the image bytes and the caption), calling `f` for each row whose id
/// `keep` accepts. See [`read_rows_range`].
pub fn read_rows(
    shard: &Shard,
    image_column: &str,
    caption_column: &str,
    keep: &dyn Fn(&str) -> bool,
    f: &mut dyn FnMut(RawRow) -> bool,
) -> Result<ReadOutcome> {
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

/// Reads rows `[rows.start, rows.end)` of row group `rg` (whose first row is `rg_first`) in batches of
/// `batch_size`; `row` is the next row to read (advanced past every row read, whether kept or not).
#[allow(clippy::too_many_arguments)]
fn read_span(
    shard: &Shard,
    src: &RowSource,
    rg: usize,
    rg_first: usize,
    rows: Range<usize>,
    batch_size: usize,
    (image_column, caption_column): (&str, &str),
    keep: &dyn Fn(&str) -> bool,
    f: &mut dyn FnMut(RawRow) -> bool,
    row: &mut usize,
) -> std::result::Result<bool, String> {
    let file = File::open(&shard.path).map_err(|e| e.to_string())?;
    let mut reader = guarded(|| {
        ParquetRecordBatchReaderBuilder::new_with_metadata(file, src.meta.clone())
            .with_projection(src.mask.clone())
            .with_row_groups(vec![rg])
            .with_batch_size(batch_size)
            .with_offset(rows.start - rg_first)
            .with_limit(rows.len())
            .build()
            .map_err(|e| e.to_string())
    })?;
    loop {
        let Some(batch) = guarded(|| Ok(reader.next()))? else {
            break;
        };
        let batch: RecordBatch = batch.map_err(|e| e.to_string())?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| format!("column {name} vanished"))
        };
        let (img, cap) = (column(image_column)?, column(caption_column)?);
        for i in 0..batch.num_rows() {
            let id = shard.id(*row);
            *row += 1;
            if !keep(&id) {
                continue;
            }
            let r = RawRow {
                id,
                caption: binary_at(&cap, i),
                image: binary_at(&img, i),
            };
            if !f(r) {
                return Ok(false);
            }
        }
    }
    if *row < rows.end {
        return Err(format!(
            "its data ends at row {}, its footer says row group {rg} runs to row {}",
            *row,
            rows.end - 1
        ));
    }
    Ok(true)
}

/// [`read_rows`] over rows `[start, start + len)` of the shard only (parquet skips the pages before), one row
/// group at a time. A row group that fails to read (a corrupt page, a damaged file) is re-read one row at a time
/// up to the failing row; its rows from there on are reported in [`ReadOutcome::unreadable`] and the reading
/// goes on with the next row group. Only a failing callback stops it early. Errors only if the range lies past
/// the shard's rows.
pub fn read_rows_range(
    shard: &Shard,
    start: usize,
    len: usize,
    image_column: &str,
    caption_column: &str,
    keep: &dyn Fn(&str) -> bool,
    f: &mut dyn FnMut(RawRow) -> bool,
) -> Result<ReadOutcome> {
    let mut out = ReadOutcome::default();
    if len == 0 {
        return Ok(out);
    }
    let end = start + len;
    if end > shard.num_rows {
        return Err(Error::data(
            &shard.path,
            format!(
                "rows {start}..{end} asked of a shard of {} rows",
                shard.num_rows
            ),
        ));
    }
    let lost = |from: usize, to: usize, error: String, out: &mut ReadOutcome| {
        let ids = (from..to).map(|r| shard.id(r)).filter(|id| keep(id));
        match &mut out.unreadable {
            Some(u) => u.ids.extend(ids),
            None => {
                out.unreadable = Some(Unreadable {
                    ids: ids.collect(),
                    error: format!("rows {from}-{} unreadable: {error}", to - 1),
                })
            }
        }
    };
    let src = match open_rows(shard, image_column, caption_column) {
        Ok(src) => src,
        Err(e) => {
            lost(start, end, e, &mut out);
            return Ok(out);
        }
    };
    let columns = (image_column, caption_column);
    let mut rg_first = 0usize;
    for (rg, &n) in src.rg_rows.iter().enumerate() {
        let first = rg_first;
        rg_first += n;
        let (lo, hi) = (first.max(start), (first + n).min(end));
        if lo >= hi {
            continue;
        }
        let mut row = lo;
        let read = read_span(
            shard,
            &src,
            rg,
            first,
            lo..hi,
            64,
            columns,
            keep,
            f,
            &mut row,
        );
        let read = match read {
            Err(_) => {
                // the rows before the failing one, one at a time (a batch fails whole)
                read_span(
                    shard,
                    &src,
                    rg,
                    first,
                    row..hi,
                    1,
                    columns,
                    keep,
                    f,
                    &mut row,
                )
            }
            ok => ok,
        };
        match read {
            Ok(true) => {}
            Ok(false) => {
                out.stopped = true;
                return Ok(out);
            }
            Err(e) => lost(row, hi, format!("row group {rg}: {e}"), &mut out),
        }
    }
    Ok(out)
}
