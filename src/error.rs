//! The library's error type: every variant says what went wrong and, where it can, what to do about it.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file or folder that must exist does not; `hint` says how to get it.
    #[error("missing {what}: {path}\n  hint: {hint}")]
    Missing {
        what: String,
        path: PathBuf,
        hint: String,
    },

    /// A model folder, config or weight file is malformed or does not match the architecture.
    #[error("model {path}: {msg}")]
    Model { path: PathBuf, msg: String },

    /// Bad input data (parquet shards, columns, images).
    #[error("data {path}: {msg}")]
    Data { path: PathBuf, msg: String },

    /// The latent store is malformed, or does not match the requested settings.
    #[error("latent store {path}: {msg}")]
    Store { path: PathBuf, msg: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("invalid argument: {0}")]
    Arg(String),

    /// A multi-process run's ranks could not meet or talk (the message starts with this process's rank).
    #[error("distributed run, {0}")]
    Dist(String),

    /// A write failed because its filesystem is full; `msg` says how much was needed and what to do.
    #[error("no space left on the device writing {path}: {msg}")]
    DiskFull { path: PathBuf, msg: String },

    /// A training run that cannot go on (it diverged, or its weights are no longer finite); the message names
    /// the last good checkpoint.
    #[error("training stopped: {0}")]
    Diverged(String),

    #[error(transparent)]
    Lance(#[from] lance::Error),

    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),

    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// Whether this error comes from a full filesystem (ENOSPC), wherever it was raised: the kind of an I/O
    /// error, or the text of errors from libraries that keep only the message (safetensors, Lance, PNG).
    pub fn is_disk_full(&self) -> bool {
        if let Error::Io { source, .. } = self {
            if source.kind() == std::io::ErrorKind::StorageFull || source.raw_os_error() == Some(28)
            {
                return true;
            }
        }
        let text = self.to_string();
        text.contains("No space left on device") || text.contains("os error 28")
    }

    /// This error, or — when it comes from a full filesystem — an [`Error::DiskFull`] naming `path`, the space
    /// the write needed (when known), the space free there, and `remedy`.
    pub fn on_full_disk(self, path: &std::path::Path, needed: Option<u64>, remedy: &str) -> Self {
        if !self.is_disk_full() {
            return self;
        }
        let free = crate::system::free_bytes(path)
            .map_or_else(|| "an unknown amount".into(), crate::system::human_bytes);
        let needed = needed.map_or_else(String::new, |n| {
            format!("it needs about {}, ", crate::system::human_bytes(n))
        });
        Error::DiskFull {
            path: path.to_path_buf(),
            msg: format!("{needed}{free} is free there; {remedy}"),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn store(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Store {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
