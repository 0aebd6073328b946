//! The Lance latent store (STORE.md, format version 1).
//!
//! Every append is one atomic Lance commit, so a killed writer leaves a valid store; rows are keyed by `id`
//! and a writer never appends an id the store already holds, so reruns are idempotent.
//!
//! * [`schema`]: column names ([`columns`]), element types, the Arrow schema and the float encoding;
//! * [`config`]: the `sprint.config` metadata ([`StoreConfig`]);
//! * [`writer`]: [`StoreWriter`]; [`reader`]: [`LatentStore`], [`RowReader`];
//! * [`inspect`]: the `--inspect` summary; [`compat`]: does a store fit a prep run or a teacher;
//! * [`maintain`]: `--dedupe` (remove duplicate ids) and `--compact` (merge fragments, drop old versions);
//! * [`location`]: a local folder or an object-store URI (`s3://…`), and the `_sprint/` files on either;
//! * [`verify`]: damage found early: the cheap check at open, `--verify` (every row), the commit marker, and
//!   storage errors translated into messages naming the file and the remedy.
//!
//! Every function taking a store `&Path` accepts a URI there too (`Path::new("s3://bucket/x.lance")`).

use std::path::Path;

use crate::error::{Error, Result};

pub mod compat; // does a store fit a prep run, a teacher folder: settings, fingerprints, shapes
pub mod config;
mod f16;
pub mod inspect;
pub mod location; // local folder or object-store URI; `_sprint/` files on either
pub mod maintain;
pub mod reader;
pub mod schema;
pub mod verify; // damage: the open check, --verify, the commit marker, storage errors named
pub mod writer;

pub use config::{
    BucketInfo, ModelInfo, ModelsInfo, MultiScaleInfo, PreprocessInfo, StoreConfig, StoredPrompt,
    CONFIG_KEY, FORMAT_VERSION, FORMAT_VERSION_MULTI_SCALE,
};
pub use inspect::describe;
pub use reader::{FloatValues, LatentStore, RowReader, StoredRow};
pub use schema::{columns, schema, FloatEncoding, LatentRow, StoreDType};
pub use writer::{OpenMode, StoreWriter};

/// What Lance is given for a store: the path as written, or the URI (`s3://bucket/x.lance`); a URI whose
/// scheme this build lacks is refused naming the cargo feature to build with (`location::check_scheme`).
fn uri(path: &Path) -> Result<String> {
    location::check_scheme(path)?;
    Ok(path.to_string_lossy().into_owned())
}

fn runtime_with(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))
}
