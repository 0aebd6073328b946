//! sana-sprint: distil SANA text-to-image models into one-step SANA-Sprint models.
//!
//! Module map:
pub mod buckets; // aspect-ratio buckets: the SANA multi-scale tables, nearest bucket
pub mod cli; // sprint-prep and sprint-train flags: defaults filled from the library options
pub mod device; // --device and --mixed_precision: parsing, defaults, compute dtypes
pub mod dist; // multi-process runs: torchrun / Slurm variables, the CPU ring collective
pub mod error; // typed errors that say what to do
pub mod hub; // resolve models and dataset files: local folder | HF cache | download
pub mod image; // decode + preprocess images as PIL/torchvision do
pub mod models; // SANA transformer, DC-AE, Gemma-2, discriminator heads, weight loading
pub mod nn; // ops candle lacks
pub mod prep; // parquet shards -> decode -> encode -> latent store
pub mod profile; // --profile: device-synchronised stage timers (training steps, the DC-AE encoder)
pub mod rng; // the one seedable generator (init, per-step draws, shuffles)
pub mod sample; // sprint-sample: images from a student as SanaSprintPipeline makes them
pub mod stop; // SIGTERM / SIGINT: stop at the next safe point, exit 0
pub mod store; // the Lance latent store (docs/STORE.md)
pub mod synth; // random models and data of real shapes for benches, tests and the GPU check
pub mod system; // process facts: memory high-water marks
pub mod tensorboard; // TensorBoard event files (scalars, PNG images) written without TensorFlow
pub mod text; // prompt encoding as SanaPipeline.encode_prompt
pub mod train; // SANA-Sprint distillation: loader, step maths, loop, checkpoints, validation

pub use error::{Error, Result};
