//! The SANA-Sprint training loop (SPEC §8.6–§8.12): alternating generator and discriminator phases over batches
//! of the latent store, gradient accumulation, global-norm clipping, NaN/Inf skips, the lr schedule, metrics,
//! checkpoints with exact resume, validation images and the final diffusers export.
//!
//! Per data batch the random draws come from a generator seeded by (seed, batches consumed so far), so a resumed
//! run draws exactly what the uninterrupted run would have drawn.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};

use crate::models::discriminator::DiscHeads;
use crate::models::sana::{SanaConfig, SanaTransformer2DModel};
use crate::models::student::Student;
use crate::models::trigflow::SanaTrigFlow;
use crate::models::weights::Weights;
use crate::rng::SeededRng;
use crate::store::{compat, LatentStore};
use crate::train::checkpoint::{self, Phase, TrainerState, CHECKPOINT_VERSION};
use crate::train::loader::{
    batches_per_epoch, negative_batch, LoaderOptions, LoaderPosition, StoreLoader,
};
use crate::train::optim::{clip_grad_norm, AdamW, LrSchedule};
pub use crate::train::options::TrainOptions;
use crate::train::step::{self, Batch, DiscriminatorDraws, GeneratorDraws, Models};
use crate::train::validation::{ValidationSettings, Validator};
use crate::{Error, Result};

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub global_step: u64,
    pub generator_updates: u64,
    pub discriminator_updates: u64,
    pub nan_skips: u64,
    pub batches: u64,
    pub last_scm_loss: Option<f64>,
    pub last_adv_loss: Option<f64>,
    pub last_d_loss: Option<f64>,
    pub elapsed: Duration,
    /// Time blocked on the store loader.
    pub loader_wait: Duration,
    pub checkpoints: Vec<PathBuf>,
    pub export_dir: PathBuf,
    pub validation_images: Vec<PathBuf>,
    pub resumed_from: Option<PathBuf>,
}

/// Latest logged values.
#[derive(Debug, Default, Clone, Copy)]
struct Last {
    scm: Option<f64>,
    adv: Option<f64>,
    d: Option<f64>,
    grad_norm_g: Option<f64>,
    grad_norm_d: Option<f64>,
}

/// Adds the gradients of `vars` found in `grads` into `acc`.
fn accumulate(acc: &mut GradStore, grads: &GradStore, vars: &[Var]) -> Result<()> {
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let g = g.detach();
            let sum = match acc.get(var.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// The per-batch generator seed: SplitMix64 of the run seed and the batch counter.
fn batch_rng(seed: u64, batch: u64) -> SeededRng {
    let mut mix = SeededRng::new(seed ^ batch.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    SeededRng::new(mix.next_u64())
}

/// Keeps only the metric lines up to `step` (a resume continues the log without duplicates).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

/// Runs the distillation described by `opts`.
pub fn run(opts: &TrainOptions) -> Result<RunSummary> {
    opts.check()?;
    let started = Instant::now();
    let device = &opts.device;
    let dtype = opts.compute_dtype();
    let root = &opts.pretrained_model_name_or_path;
    let teacher_dir = root.join("transformer");
    if !teacher_dir.join("config.json").is_file() {
        return Err(Error::Missing {
            what: "teacher transformer".into(),
            path: teacher_dir,
            hint: "--pretrained_model_name_or_path must be a diffusers pipeline folder with transformer/ \
                   (e.g. SANA_Sprint_1.6B_1024px_teacher_diffusers)"
                .into(),
        });
    }
    let teacher_config = SanaConfig::from_folder(&teacher_dir)?;
    if teacher_config.guidance_embeds {
        return Err(Error::model(
            teacher_dir.join("config.json"),
            "guidance_embeds is true: this is a distilled student, not a teacher; pass the teacher pipeline",
        ));
    }
    if let Some(&bad) = opts
        .head_block_ids
        .iter()
        .find(|&&i| i >= teacher_config.num_layers)
    {
        return Err(Error::Arg(format!(
            "--head_block_ids names block {bad}, but the teacher has {} blocks",
            teacher_config.num_layers
        )));
    }

    // the store, checked against the teacher before loading anything heavy
    let store = LatentStore::open(&opts.latents)?;
    let store_config = store.config().clone();
    let store_rows = store.len()?;
    drop(store);
    compat::check_fits_teacher(
        &store_config,
        &opts.latents,
        root,
        &teacher_config,
        opts.allow_store_mismatch,
    )?;
    let per_epoch = batches_per_epoch(store_rows, opts.train_batch_size, true);
    if per_epoch == 0 {
        return Err(Error::store(
            &opts.latents,
            format!(
                "{store_rows} rows is less than one batch of {} (--train_batch_size)",
                opts.train_batch_size
            ),
        ));
    }
    let updates_per_epoch = per_epoch.div_ceil(opts.gradient_accumulation_steps as u64);
    let max_train_steps = opts
        .max_train_steps
        .unwrap_or(opts.num_train_epochs * updates_per_epoch);

    // resume point
    let resume_dir = match &opts.resume_from_checkpoint {
        Some(arg) => checkpoint::resolve_resume(&opts.output_dir, arg)?,
        None => None,
    };
    if resume_dir.is_none() {
        if let Some(existing) = checkpoint::latest(&opts.output_dir)? {
            return Err(Error::Arg(format!(
                "{} already holds checkpoints (latest: {}); pass --resume_from_checkpoint latest to continue \
                 that run, or use another --output_dir",
                opts.output_dir.display(),
                existing.display()
            )));
        }
    }
    std::fs::create_dir_all(&opts.output_dir).map_err(|e| Error::io(&opts.output_dir, e))?;
    checkpoint::remove_partial(&opts.output_dir)?;
    let resumed = resume_dir
        .as_ref()
        .map(|dir| checkpoint::read_state(dir))
        .transpose()?;
    if let Some(state) = &resumed {
        let dir = resume_dir.as_ref().expect("state read from a folder");
        for (what, saved, now) in [
            ("store rows", state.store_rows, store_rows),
            (
                "--train_batch_size",
                state.train_batch_size,
                opts.train_batch_size,
            ),
            (
                "--gradient_accumulation_steps",
                state.gradient_accumulation_steps,
                opts.gradient_accumulation_steps,
            ),
        ] {
            if saved != now {
                return Err(Error::model(
                    dir,
                    format!(
                        "{what} was {saved} when this checkpoint was written and is {now} now; an exact resume \
                         needs the same store and batch settings"
                    ),
                ));
            }
        }
    }

    // the loader starts first, so that its first batches are ready when the models are
    let (seed, start_position) = resumed
        .as_ref()
        .map_or((opts.seed, LoaderPosition::default()), |s| {
            (s.seed, s.loader)
        });
    let mut loader = StoreLoader::start(
        &opts.latents,
        &LoaderOptions {
            batch_size: opts.train_batch_size,
            seed,
            drop_last: true,
            prefetch: opts.prefetch,
            sigma_data: opts.step.sigma_data as f32,
        },
        start_position,
    )?;
    // models
    let teacher = SanaTrigFlow::new(SanaTransformer2DModel::load(&teacher_dir, dtype, device)?);
    let (student, heads) = match &resume_dir {
        Some(dir) => {
            let files = [
                dir.join(checkpoint::TRANSFORMER_DIR)
                    .join(checkpoint::TRANSFORMER_WEIGHTS),
                dir.join(checkpoint::LOGVAR_FILE),
            ];
            let student =
                Student::from_weights(&teacher_config, Weights::from_files(&files)?, device)?;
            let heads = DiscHeads::load_file(
                &dir.join(checkpoint::HEADS_FILE),
                &opts.head_block_ids,
                device,
            )?;
            (student, heads)
        }
        None => (
            Student::from_teacher(&teacher_dir, opts.guidance_init, opts.seed, device)?,
            DiscHeads::new(
                &opts.head_block_ids,
                teacher_config.inner_dim(),
                opts.seed.wrapping_add(1),
                device,
            )?,
        ),
    };
    let student = student.with_self_attention(opts.self_attention)?;
    if heads.channels() != teacher_config.inner_dim() {
        return Err(Error::Arg(format!(
            "discriminator heads are {}-wide but the teacher's inner dim is {}",
            heads.channels(),
            teacher_config.inner_dim()
        )));
    }
    let student_vars: Vec<Var> = student.named_vars().into_iter().map(|(_, v)| v).collect();
    let head_vars = heads.vars();
    let lr = if opts.scale_lr {
        opts.learning_rate * (opts.gradient_accumulation_steps * opts.train_batch_size) as f64
    } else {
        opts.learning_rate
    };
    let mut opt_g = AdamW::new(student.named_vars(), opts.adam)?;
    let mut opt_d = AdamW::new(heads.named_vars(), opts.adam)?;
    let schedule = LrSchedule::new(
        opts.lr_scheduler,
        lr,
        opts.lr_warmup_steps,
        max_train_steps,
        opts.lr_num_cycles,
        opts.lr_power,
    )?;
    let mut state = match (&resume_dir, resumed) {
        (Some(dir), Some(state)) => {
            opt_g.load_state(dir.join(checkpoint::OPTIM_G_FILE))?;
            opt_d.load_state(dir.join(checkpoint::OPTIM_D_FILE))?;
            state
        }
        _ => TrainerState {
            checkpoint_version: CHECKPOINT_VERSION,
            global_step: 0,
            phase: Phase::Generator,
            generator_updates: 0,
            discriminator_updates: 0,
            batches_consumed: 0,
            loader: LoaderPosition::default(),
            nan_skips: 0,
            seed: opts.seed,
            store_rows,
            train_batch_size: opts.train_batch_size,
            gradient_accumulation_steps: opts.gradient_accumulation_steps,
        },
    };
    let student_config = checkpoint::student_config_json(&teacher_dir)?;

    // output folder: config, metrics continued without duplicates
    let config_path = opts.output_dir.join("train_config.json");
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(&opts.config_json).expect("JSON serialises"),
    )
    .map_err(|e| Error::io(&config_path, e))?;
    let metrics_path = opts.output_dir.join("metrics.jsonl");
    if resume_dir.is_some() {
        truncate_metrics(&metrics_path, state.global_step)?;
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    }
    let mut metrics = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;

    let validator = if opts.validation_prompts.is_empty() {
        None
    } else {
        let mut timesteps = opts.validation_timesteps.clone();
        if timesteps.last() != Some(&0.0) {
            timesteps.push(0.0);
        }
        let res = store_config.resolution as usize;
        Some(Validator::load(
            root,
            &opts.validation_prompts,
            ValidationSettings {
                images_per_prompt: opts.num_validation_images,
                height: res,
                width: res,
                timesteps,
                seed: opts.seed,
                sigma_data: opts.step.sigma_data,
                mixed_precision: opts.mixed_precision,
                ..ValidationSettings::default()
            },
            device,
        )?)
    };

    let (neg, neg_mask) = negative_batch(loader.config(), opts.train_batch_size)?;
    let (l, d) = (
        loader.config().max_sequence_length,
        loader.config().text_hidden_size,
    );
    let neg_embeds = Tensor::from_vec(neg, (opts.train_batch_size, l, d), device)?;
    let neg_mask = Tensor::from_vec(neg_mask, (opts.train_batch_size, l), device)?;

    let bar = if opts.progress {
        let bar = ProgressBar::new(max_train_steps);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps ({per_sec}, ETA {eta}) {msg}",
            )
            .expect("valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    bar.set_position(state.global_step);

    let teacher_negative = teacher.text_context(&neg_embeds, Some(&neg_mask))?;
    let mut compute = student.compute_models(dtype)?;
    let mut acc = GradStore::default();
    let mut micro = 0usize;
    let mut last = Last::default();
    let mut checkpoints = Vec::new();
    let mut validation_images = Vec::new();
    let mut samples_since = 0usize;
    let mut rate_clock = Instant::now();
    let mut samples_per_s = 0.0;

    while state.global_step < max_train_steps {
        let host = loader.next_batch()?;
        let (x0, prompt_embeds, prompt_mask) = host.to_tensors(device)?;
        let batch = Batch {
            x0,
            prompt_embeds,
            prompt_mask,
            neg_embeds: neg_embeds.clone(),
            neg_mask: neg_mask.clone(),
        };
        let latent_shape = batch.x0.dims().to_vec();
        let mut rng = batch_rng(seed, state.batches_consumed);
        let models = Models {
            teacher: &teacher,
            student: &compute.0,
            student_frozen: &compute.1,
            heads: &heads,
            gradient_checkpointing: opts.gradient_checkpointing,
            teacher_negative: Some(&teacher_negative),
        };
        let poison = opts.inject_nan_batches.contains(&state.batches_consumed);
        let scale = 1.0 / opts.gradient_accumulation_steps as f64;
        match state.phase {
            Phase::Generator => {
                let draws = GeneratorDraws::sample(&mut rng, &latent_shape, &opts.step, device)?;
                let out =
                    step::generator_loss(&models, &batch, &draws, &opts.step, state.global_step)?;
                let mut loss = out.loss.affine(scale, 0.0)?;
                if poison {
                    loss = loss.affine(f64::NAN, 0.0)?;
                }
                let mut grads = loss.backward()?;
                out.pending.finish(&mut grads)?;
                accumulate(&mut acc, &grads, &student_vars)?;
                last.scm = Some(out.scm_loss);
                last.adv = Some(out.adv_loss);
            }
            Phase::Discriminator => {
                let draws =
                    DiscriminatorDraws::sample(&mut rng, &latent_shape, &opts.step, device)?;
                let out = step::discriminator_loss(&models, &batch, &draws, &opts.step)?;
                let mut loss = out.loss.affine(scale, 0.0)?;
                if poison {
                    loss = loss.affine(f64::NAN, 0.0)?;
                }
                let grads = loss.backward()?;
                accumulate(&mut acc, &grads, &head_vars)?;
                last.d = Some(out.d_loss);
            }
        }
        state.batches_consumed += 1;
        state.loader = host.position.next(loader.batches_per_epoch());
        samples_since += host.len();
        micro += 1;
        if micro < opts.gradient_accumulation_steps {
            continue;
        }
        micro = 0;

        // a synced step
        let phase = state.phase;
        let vars = match phase {
            Phase::Generator => &student_vars,
            Phase::Discriminator => &head_vars,
        };
        let total_norm = clip_grad_norm(&mut acc, vars, opts.gradient_clip)?;
        let grads = std::mem::take(&mut acc);
        if !total_norm.is_finite() {
            state.nan_skips += 1;
            tracing::warn!(
                "non-finite gradient norm in phase {} at global step {}: step skipped ({} so far)",
                phase.name(),
                state.global_step,
                state.nan_skips
            );
            let line = serde_json::json!({
                "step": state.global_step, "event": "nan_skip", "phase": phase.name(),
                "nan_skips": state.nan_skips, "batch": state.batches_consumed - 1,
            });
            writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
            continue;
        }
        let step_lr = match phase {
            Phase::Generator => {
                let lr_now = schedule.lr_at(state.generator_updates);
                opt_g.step(&grads, lr_now)?;
                state.generator_updates += 1;
                last.grad_norm_g = Some(total_norm);
                if dtype != DType::F32 {
                    compute = student.compute_models(dtype)?;
                }
                lr_now
            }
            Phase::Discriminator => {
                opt_d.step(&grads, lr)?;
                state.discriminator_updates += 1;
                last.grad_norm_d = Some(total_norm);
                lr
            }
        };
        drop(grads);
        state.phase = phase.other();
        state.global_step += 1;

        let since = rate_clock.elapsed().as_secs_f64();
        if since > 0.5 {
            samples_per_s = samples_since as f64 / since;
            samples_since = 0;
            rate_clock = Instant::now();
        }
        let line = serde_json::json!({
            "step": state.global_step,
            "phase": phase.name(),
            "scm_loss": last.scm,
            "adv_loss": last.adv,
            "d_loss": last.d,
            "grad_norm": total_norm,
            "lr": step_lr,
            "lr_g": schedule.lr_at(state.generator_updates),
            "epoch": state.loader.epoch,
            "samples_per_s": samples_per_s,
            "loader_wait_s": loader.waited().as_secs_f64(),
            "elapsed_s": started.elapsed().as_secs_f64(),
            "nan_skips": state.nan_skips,
        });
        writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        bar.set_position(state.global_step);
        bar.set_message(format!(
            "scm {} adv {} d {} |g| {} |d| {} lr {:.2e} {:.1} samples/s",
            fmt_opt(last.scm),
            fmt_opt(last.adv),
            fmt_opt(last.d),
            fmt_opt(last.grad_norm_g),
            fmt_opt(last.grad_norm_d),
            schedule.lr_at(state.generator_updates),
            samples_per_s
        ));

        if state.global_step % opts.checkpointing_steps == 0 {
            let dir = save_checkpoint(
                &opts.output_dir,
                &state,
                &student,
                &student_config,
                &heads,
                &opt_g,
                &opt_d,
            )?;
            if let Some(limit) = opts.checkpoints_total_limit {
                for removed in checkpoint::prune(&opts.output_dir, limit)? {
                    checkpoints.retain(|p| p != &removed);
                }
            }
            bar.println(format!("saved {}", dir.display()));
            checkpoints.push(dir);
        }
        if let (Some(v), Some(every)) = (&validator, opts.validation_steps) {
            if state.global_step % every == 0 && state.global_step < max_train_steps {
                let path = v.run(&compute.1, state.global_step, &opts.output_dir)?;
                bar.println(format!("validation images: {}", path.display()));
                validation_images.push(path);
            }
        }
        if opts.kill_after_step == Some(state.global_step) {
            bar.finish_and_clear();
            return Ok(summary(
                &opts.output_dir,
                &state,
                &last,
                started,
                &loader,
                checkpoints,
                validation_images,
                resume_dir,
            ));
        }
    }
    bar.finish_and_clear();

    // final export
    let export_dtype = if opts.upcast_before_saving {
        DType::F32
    } else {
        dtype
    };
    let export_named: Vec<(String, Tensor)> = student
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    checkpoint::save_student(
        &opts.output_dir,
        &student_config,
        &export_named,
        export_dtype,
    )?;
    let heads_path = opts.output_dir.join(checkpoint::HEADS_FILE);
    heads.save(&heads_path)?;
    if let Some(v) = &validator {
        let path = v.run(&compute.1, state.global_step, &opts.output_dir)?;
        validation_images.push(path);
    }
    Ok(summary(
        &opts.output_dir,
        &state,
        &last,
        started,
        &loader,
        checkpoints,
        validation_images,
        resume_dir,
    ))
}

#[allow(clippy::too_many_arguments)]
fn summary(
    output_dir: &Path,
    state: &TrainerState,
    last: &Last,
    started: Instant,
    loader: &StoreLoader,
    checkpoints: Vec<PathBuf>,
    validation_images: Vec<PathBuf>,
    resumed_from: Option<PathBuf>,
) -> RunSummary {
    RunSummary {
        global_step: state.global_step,
        generator_updates: state.generator_updates,
        discriminator_updates: state.discriminator_updates,
        nan_skips: state.nan_skips,
        batches: state.batches_consumed,
        last_scm_loss: last.scm,
        last_adv_loss: last.adv,
        last_d_loss: last.d,
        elapsed: started.elapsed(),
        loader_wait: loader.waited(),
        checkpoints,
        export_dir: output_dir.join(checkpoint::TRANSFORMER_DIR),
        validation_images,
        resumed_from,
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}

/// Writes `checkpoint-{global_step}` atomically (student f32 master weights, logvar head, heads with buffers,
/// both optimiser states, trainer state).
fn save_checkpoint(
    output_dir: &Path,
    state: &TrainerState,
    student: &Student,
    student_config: &serde_json::Value,
    heads: &DiscHeads,
    opt_g: &AdamW,
    opt_d: &AdamW,
) -> Result<PathBuf> {
    checkpoint::write_atomically(
        output_dir,
        &checkpoint::checkpoint_name(state.global_step),
        |dir| {
            let named: Vec<(String, Tensor)> = student
                .named_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            checkpoint::save_student(dir, student_config, &named, DType::F32)?;
            heads.save(&dir.join(checkpoint::HEADS_FILE))?;
            opt_g.save_state(dir.join(checkpoint::OPTIM_G_FILE))?;
            opt_d.save_state(dir.join(checkpoint::OPTIM_D_FILE))?;
            checkpoint::write_state(dir, state)
        },
    )
}
