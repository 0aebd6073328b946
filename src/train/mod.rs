//! SANA-Sprint distillation: losses (and, to come, the loop, optimiser, checkpoints).

pub mod loader; // shuffled, prefetched batches from the latent store
pub mod loss; // sCM loss, tangent normalisation, hinge loss, timestep sampling
pub mod optim; // AdamW with f32 master weights, lr schedules, clipping
pub mod validation; // few-step SCM sampling, DC-AE decode, PNG grids
