//! All integration tests in one binary: lance, datafusion and candle are linked once instead of once per file.
//! Run one group with `cargo test --test suite MODULE::` (e.g. `cargo test --test suite train_loop::`).

mod cli;
mod common;
mod configs;
mod distributed;
mod faults;
mod golden_buckets;
mod golden_dcae;
mod golden_disc_loss;
mod golden_gemma2;
mod golden_grads;
mod golden_image;
mod golden_optim;
mod golden_prompt;
mod golden_sampler;
mod golden_sana;
mod grad_checkpoint;
mod loader;
mod model_faults;
mod object_stores;
mod prep_buckets;
mod prep_e2e;
mod prep_faults;
mod prep_parallel;
mod reference_flags;
mod s3;
mod sample;
mod store_damage;
mod store_maintain;
mod student_init;
mod tensorboard;
mod train_loop;
mod train_refusals;
mod train_step;
