//! Neural networks, one file per model, loaded from diffusers/transformers checkpoints by their real key names.

pub mod dcae; // AutoencoderDC encoder + decoder
pub mod discriminator; // LADD heads on the frozen teacher
pub mod gemma2; // Gemma-2 text encoder with padding mask
pub mod sana; // SanaTransformer2DModel (teacher and student)
pub mod student; // trainable student (Vars) initialised from the teacher
pub mod trigflow; // TrigFlow wrapper + logvar head
pub mod weights; // safetensors (single/sharded) -> VarBuilder
