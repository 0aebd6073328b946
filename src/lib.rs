//! sana-sprint: distil SANA text-to-image models into one-step SANA-Sprint models.
//!
//! Module map:
pub mod error; // typed errors that say what to do
pub mod hub; // resolve models and dataset files: local folder | HF cache | download
pub mod image; // decode + preprocess images as PIL/torchvision do
pub mod models; // DC-AE, Gemma-2 (and later the SANA transformer), weight loading
pub mod nn; // ops candle lacks
pub mod prep; // parquet shards -> decode -> encode -> latent store
pub mod store; // the Lance latent store (STORE.md)
pub mod text; // prompt encoding as SanaPipeline.encode_prompt
pub mod train; // distillation losses (loop to come)

pub use error::{Error, Result};
