//! SANA-Sprint distillation: the store loader, the step maths, the training loop, checkpoints, validation.

pub mod checkpoint; // checkpoint-N folders: write atomically, prune, find latest, resume
pub mod loader; // shuffled, prefetched batches from the latent store
pub mod loss; // sCM loss, tangent normalisation, hinge loss, timestep sampling
pub mod optim; // AdamW with f32 master weights, lr schedules, clipping
pub mod options; // TrainOptions: every sprint-train tunable and its default
pub mod step; // one G or D phase as pure maths with injected draws
pub mod trainer; // the loop: accumulation, clipping, NaN skips, logging, checkpoints, export
pub mod validation; // few-step SCM sampling, DC-AE decode, PNG grids
