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
