//! The SANA-Sprint training loop (docs/ALGORITHM.md §5.5–§5.11): alternating generator and discriminator phases over batches
//! of the latent store, gradient accumulation, global-norm clipping, NaN/Inf skips, the lr schedule, metrics,
//! checkpoints with exact resume, validation images and the final diffusers export.
//!
//! Per data batch the random draws come from a generator seeded by (seed, batches consumed so far), so a resumed
//! run draws exactly what the uninterrupted run would have drawn.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};

use crate::dist::group::ProcessGroup;
use crate::dist::timeout_from_env;
use crate::models::discriminator::DiscHeads;
use crate::models::sana::{SanaConfig, SanaTransformer2DModel, TextContext};
use crate::models::student::{ComputeModels, Student};
use crate::models::trigflow::SanaTrigFlow;
use crate::models::weights::Weights;
use crate::profile;
use crate::rng::SeededRng;
use crate::store::{compat, LatentStore};
use crate::tensorboard::EventWriter;
use crate::train::checkpoint::{self, Phase, TrainerState, CHECKPOINT_VERSION};
use crate::train::loader::{
    LoaderOptions, LoaderPosition, NegativePrompt, StoreLoader, TrainBatch,
};
use crate::train::optim::{clip_grad_norm, AdamW, LrSchedule};
use crate::train::options::ReportTo;
pub use crate::train::options::TrainOptions;
use crate::train::step::{self, DiscriminatorDraws, GeneratorDraws, Models};
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
    /// Per latent shape (one per aspect-ratio bucket; one for a square store): the steps of this process, their
    /// mean wall time and the peak memory of any of them — the largest bucket's peak is what the run needs.
    pub buckets: Vec<BucketUse>,
    /// The signal (`"SIGTERM"`, `"SIGINT"`) that stopped the run early, after checkpointing its last step
    /// (see [`crate::stop`]); `None` for a run that finished.
    pub stopped_by: Option<&'static str>,
}

/// What the steps of one latent shape (bucket) took: see [`RunSummary::buckets`].
#[derive(Debug, Clone, PartialEq)]
pub struct BucketUse {
    /// `[C, H, W]` of the latents.
    pub latent_shape: [usize; 3],
    pub steps: u64,
    /// Mean wall seconds of a global step (data wait included).
    pub mean_step_s: f64,
    /// Largest peak of one step: the CUDA memory pool's in-use high-water mark on a GPU, the process's resident
    /// high-water mark on the CPU; `None` where neither can be read (or under `--profile`, whose stage timers
    /// reset the marks: their `stage_peak_gib` then has the figures).
    pub peak_bytes: Option<u64>,
}

/// Restarts the memory high-water mark a step's peak is read from ([`step_peak_bytes`]).
fn reset_step_peak(device: &candle_core::Device) -> Result<()> {
    if device.is_cuda() {
        crate::device::reset_pool_peaks(device)
    } else {
        crate::system::reset_peak_rss();
        Ok(())
    }
}

/// The memory high-water mark since [`reset_step_peak`]: the CUDA pool's bytes in use, or the host RSS.
fn step_peak_bytes(device: &candle_core::Device) -> Result<Option<u64>> {
    if device.is_cuda() {
        Ok(crate::device::pool_stats(device)?.map(|p| p.used_high_bytes))
    } else {
        Ok(crate::system::peak_rss_bytes())
    }
}

/// Latest logged values.
#[derive(Debug, Default, Clone, Copy)]
struct Last {
    scm: Option<f64>,
    adv: Option<f64>,
    d: Option<f64>,
    grad_norm_g: Option<f64>,
    grad_norm_d: Option<f64>,
    /// `[C, H, W]` of the last batch's latents (a bucketed store's batches differ).
    latent_shape: Option<[usize; 3]>,
    /// Wall seconds and memory peak of the last global step.
    step_s: Option<f64>,
    step_peak: Option<u64>,
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
    Trainer::setup(opts)?.train()
}

/// The metrics log, `metrics.jsonl`: one JSON object per line.
struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `output_dir/metrics.jsonl`: continued up to `resumed_step` on resume, started afresh otherwise.
    fn open(output_dir: &Path, resumed_step: Option<u64>) -> Result<Self> {
        let path = output_dir.join("metrics.jsonl");
        match resumed_step {
            Some(step) => truncate_metrics(&path, step)?,
            None if path.exists() => {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?
            }
            None => {}
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { file, path })
    }

    fn write(&mut self, line: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").map_err(|e| Error::io(&self.path, e))
    }
}

/// Samples per second, measured over windows of at least half a second.
struct SampleRate {
    samples: usize,
    clock: Instant,
    per_s: f64,
}

impl SampleRate {
    fn new() -> Self {
        Self {
            samples: 0,
            clock: Instant::now(),
            per_s: 0.0,
        }
    }

    /// Counts `n` more samples.
    fn add(&mut self, n: usize) {
        self.samples += n;
    }

    /// The rate of the last window, starting a new window when the current one is long enough.
    fn per_s(&mut self) -> f64 {
        let since = self.clock.elapsed().as_secs_f64();
        if since > 0.5 {
            self.per_s = self.samples as f64 / since;
            self.samples = 0;
            self.clock = Instant::now();
        }
        self.per_s
    }
}

/// An applied optimiser step: its phase, the pre-clip gradient norm and the learning rate it used.
struct SyncedStep {
    phase: Phase,
    grad_norm: f64,
    lr: f64,
}

/// The teacher's transformer folder and config, checked to be a teacher deep enough for `--head_block_ids`.
fn teacher_config(opts: &TrainOptions) -> Result<(PathBuf, SanaConfig)> {
    let teacher_dir = opts.pretrained_model_name_or_path.join("transformer");
    if !teacher_dir.join("config.json").is_file() {
        return Err(Error::Missing {
            what: "teacher transformer".into(),
            path: teacher_dir,
            hint: "--pretrained_model_name_or_path must be a diffusers pipeline folder with transformer/ \
                   (e.g. SANA_Sprint_1.6B_1024px_teacher_diffusers)"
                .into(),
        });
    }
    let config = SanaConfig::from_folder(&teacher_dir)?;
    if config.guidance_embeds {
        return Err(Error::model(
            teacher_dir.join("config.json"),
            "guidance_embeds is true: this is a distilled student, not a teacher; pass the teacher pipeline",
        ));
    }
    if let Some(&bad) = opts
        .head_block_ids
        .iter()
        .find(|&&i| i >= config.num_layers)
    {
        return Err(Error::Arg(format!(
            "--head_block_ids names block {bad}, but the teacher has {} blocks",
            config.num_layers
        )));
    }
    Ok((teacher_dir, config))
}

/// The checkpoint to resume from, if any; refuses to start afresh over an existing run's checkpoints.
fn resume_dir(opts: &TrainOptions) -> Result<Option<PathBuf>> {
    let dir = match &opts.resume_from_checkpoint {
        Some(arg) => checkpoint::resolve_resume(&opts.output_dir, arg)?,
        None => None,
    };
    if dir.is_none() {
        if let Some(existing) = checkpoint::latest(&opts.output_dir)? {
            return Err(Error::Arg(format!(
                "{} already holds checkpoints (latest: {}); pass --resume_from_checkpoint latest to continue \
                 that run, or use another --output_dir",
                opts.output_dir.display(),
                existing.display()
            )));
        }
    }
    Ok(dir)
}

/// The trainer state saved in `dir`, checked to continue with the same store and batch settings.
fn resumed_state(dir: &Path, opts: &TrainOptions, store_rows: usize) -> Result<TrainerState> {
    let state = checkpoint::read_state(dir)?;
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
        ("the number of ranks", state.world_size, world_size(opts)),
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
    Ok(state)
}

/// The state of a run that starts afresh.
fn fresh_state(opts: &TrainOptions, store_rows: usize) -> TrainerState {
    TrainerState {
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
        world_size: world_size(opts),
    }
}

/// (rank, world size) of the ring, `(0, 1)` for a single process.
fn rank_and_world(group: Option<&ProcessGroup>) -> (usize, usize) {
    group.map_or((0, 1), |g| (g.rank(), g.world_size()))
}

/// Ranks of the run (1 for a single process).
fn world_size(opts: &TrainOptions) -> usize {
    opts.dist.as_ref().map_or(1, |d| d.world_size)
}

/// The process group of a multi-process run (the CPU ring, plus NCCL on GPUs); `None` for one process.
fn join_ranks(opts: &TrainOptions) -> Result<Option<ProcessGroup>> {
    let Some(env) = opts.dist.as_ref().filter(|d| d.world_size > 1) else {
        return Ok(None);
    };
    Ok(Some(ProcessGroup::join(
        env,
        &opts.device,
        timeout_from_env()?,
    )?))
}

/// The student and the discriminator heads: from the checkpoint in `resume` or freshly from the teacher.
fn trainable_models(
    opts: &TrainOptions,
    teacher_dir: &Path,
    teacher_config: &SanaConfig,
    resume: Option<&Path>,
) -> Result<(Student, DiscHeads)> {
    let device = &opts.device;
    let (student, heads) = match resume {
        Some(dir) => {
            let files = [
                dir.join(checkpoint::TRANSFORMER_DIR)
                    .join(checkpoint::TRANSFORMER_WEIGHTS),
                dir.join(checkpoint::LOGVAR_FILE),
            ];
            let student =
                Student::from_weights(teacher_config, Weights::from_files(&files)?, device)?;
            let heads = DiscHeads::load_file(
                &dir.join(checkpoint::HEADS_FILE),
                &opts.head_block_ids,
                device,
            )?;
            (student, heads)
        }
        None => (
            Student::from_teacher(teacher_dir, opts.guidance_init, opts.seed, device)?,
            DiscHeads::new(
                &opts.head_block_ids,
                teacher_config.inner_dim(),
                opts.seed.wrapping_add(1),
                device,
            )?,
        ),
    };
    if heads.channels() != teacher_config.inner_dim() {
        return Err(Error::Arg(format!(
            "discriminator heads are {}-wide but the teacher's inner dim is {}",
            heads.channels(),
            teacher_config.inner_dim()
        )));
    }
    Ok((student.with_self_attention(opts.self_attention)?, heads))
}

/// The validation samplers, when `--validation_prompts` are given: one per `--validation_resolution`, or one at
/// the store's square resolution.
fn validators(opts: &TrainOptions, store: &crate::store::StoreConfig) -> Result<Vec<Validator>> {
    let Some(first) = validator(opts, store)? else {
        return Ok(Vec::new());
    };
    if opts.validation_resolutions.is_empty() {
        return Ok(vec![first]);
    }
    opts.validation_resolutions
        .iter()
        .map(|&(h, w)| first.resized(h, w))
        .collect()
}

/// The validation sampler at the store's square resolution: for `--validation_prompts` (encoded now with the
/// teacher folder's text encoder), else for the prompts `sprint-prep --validation_prompt` stored (no text
/// encoder loaded), else none.
fn validator(opts: &TrainOptions, store: &crate::store::StoreConfig) -> Result<Option<Validator>> {
    let mut timesteps = opts.validation_timesteps.clone();
    if timesteps.last() != Some(&0.0) {
        timesteps.push(0.0);
    }
    let resolution = store.resolution as usize;
    let settings = ValidationSettings {
        images_per_prompt: opts.num_validation_images,
        height: resolution,
        width: resolution,
        timesteps,
        seed: opts.seed,
        sigma_data: opts.step.sigma_data,
        mixed_precision: opts.mixed_precision,
        ..ValidationSettings::default()
    };
    if !opts.validation_prompts.is_empty() {
        return Ok(Some(Validator::load(
            &opts.pretrained_model_name_or_path,
            &opts.validation_prompts,
            settings,
            &opts.device,
        )?));
    }
    if store.validation_prompts.is_empty() {
        return Ok(None);
    }
    let (p, d) = (store.validation_prompts.len(), store.text_hidden_size);
    let l = store
        .validation_max_sequence_length
        .unwrap_or(crate::train::validation::MAX_SEQUENCE_LENGTH);
    let mut emb = vec![0f32; p * l * d];
    let mut mask = vec![0f32; p * l];
    for (i, sp) in store.validation_prompts.iter().enumerate() {
        let values =
            crate::store::config::decode_f32le("a stored validation prompt", &sp.embeds_f32le_b64)?;
        if sp.len > l || values.len() != sp.len * d {
            return Err(Error::store(
                &opts.latents,
                format!(
                    "stored validation prompt {:?} holds {} values, not {} x {d}",
                    sp.prompt,
                    values.len(),
                    sp.len
                ),
            ));
        }
        emb[i * l * d..][..values.len()].copy_from_slice(&values);
        mask[i * l..][..sp.len].fill(1.0);
    }
    let device = &opts.device;
    let decoder = crate::train::validation::ImageDecoder::load(
        &opts.pretrained_model_name_or_path.join("vae"),
        candle_core::DType::F32,
        device,
    )?;
    Ok(Some(Validator::new(
        Tensor::from_vec(emb, (p, l, d), device)?,
        Tensor::from_vec(mask, (p, l), device)?,
        decoder,
        settings,
    )?))
}

/// The TensorBoard event file of a run starting after `step`: events after `step` left by an earlier process
/// (a killed or stopped run that went further than its checkpoint) are dropped, as `metrics.jsonl` drops its
/// lines, and a new file is started.
fn open_tensorboard(opts: &TrainOptions, step: u64) -> Result<EventWriter> {
    let dir = opts.tensorboard_dir();
    if dir.is_dir() {
        crate::tensorboard::purge_after(&dir, step as i64)?;
    }
    let mut writer = EventWriter::create(&dir)?;
    writer.start_session(step as i64 + 1, wall_time())?;
    Ok(writer)
}

/// Seconds since the Unix epoch (TensorBoard's wall time).
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The checks a command line copied from the reference script asks for: `--resolution` and
/// `--max_sequence_length` are the store's, and every `--file_path` shard has rows in it.
fn check_expectations(store: &LatentStore, opts: &TrainOptions) -> Result<()> {
    let (want, config) = (&opts.expect_store, store.config());
    let redo = |what: String| {
        Error::store(
            &opts.latents,
            format!(
                "{what}; encode the data again with sprint-prep (e.g. `sprint-prep --pretrained_model_name_or_path \
                 TEACHER --file_path SHARDS... --resolution R --output NEW_STORE`) and pass --latents NEW_STORE"
            ),
        )
    };
    if let Some(r) = want.resolution.filter(|&r| r != config.resolution) {
        return Err(redo(format!(
            "--resolution {r}, but the store was encoded at {}",
            config.resolution
        )));
    }
    if let Some(l) = want
        .max_sequence_length
        .filter(|&l| l != config.max_sequence_length)
    {
        return Err(redo(format!(
            "--max_sequence_length {l}, but the store's prompts were encoded with {}",
            config.max_sequence_length
        )));
    }
    if want.shards.is_empty() {
        return Ok(());
    }
    let ids = crate::store::writer::stored_ids(&opts.latents)?;
    let missing: Vec<&String> = want
        .shards
        .iter()
        .filter(|shard| {
            let prefix = format!("{shard}#");
            !ids.iter().any(|id| id.starts_with(&prefix))
        })
        .collect();
    if !missing.is_empty() {
        return Err(Error::store(
            &opts.latents,
            format!(
                "--file_path names {missing:?}, but the store holds no rows of them; add them with `sprint-prep \
                 --pretrained_model_name_or_path TEACHER --file_path THOSE_FILES --output {}` (it appends only \
                 rows the store lacks)",
                opts.latents.display()
            ),
        ));
    }
    Ok(())
}

/// `output_dir/train_config.json`: the options of the run.
fn write_train_config(opts: &TrainOptions) -> Result<()> {
    let path = opts.output_dir.join("train_config.json");
    let json = serde_json::to_string_pretty(&opts.config_json).expect("JSON serialises");
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))
}

fn progress_bar(show: bool, steps: u64, position: u64) -> ProgressBar {
    let bar = if show {
        let bar = ProgressBar::new(steps);
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
    bar.set_position(position);
    bar
}

/// A training run: the models, optimisers, loader and outputs, and where the run stands.
struct Trainer<'a> {
    opts: &'a TrainOptions,
    started: Instant,
    dtype: DType,
    max_train_steps: u64,
    /// The seed of the run (from the checkpoint on resume).
    seed: u64,
    resumed_from: Option<PathBuf>,
    loader: StoreLoader,
    negative: NegativePrompt,
    teacher: SanaTrigFlow,
    /// The teacher's text context of `negative`, computed once per run.
    teacher_negative: TextContext,
    student: Student,
    student_vars: Vec<Var>,
    student_config: serde_json::Value,
    compute: ComputeModels,
    heads: DiscHeads,
    head_vars: Vec<Var>,
    opt_g: AdamW,
    opt_d: AdamW,
    /// The generator's learning rate by generator update.
    schedule: LrSchedule,
    /// The discriminator's constant learning rate (scaled with `--scale_lr`).
    lr_d: f64,
    state: TrainerState,
    /// One per validation size (none without validation prompts).
    validators: Vec<Validator>,
    /// Rank 0's `metrics.jsonl` (`None` on the other ranks).
    metrics: Option<MetricsLog>,
    bar: ProgressBar,
    /// Gradients accumulated over the micro-steps of the current update.
    acc: GradStore,
    micro: usize,
    last: Last,
    rate: SampleRate,
    checkpoints: Vec<PathBuf>,
    validation_images: Vec<PathBuf>,
    /// The other ranks of a data-parallel run (`None`: a single process).
    group: Option<ProcessGroup>,
    /// Steps skipped in a row for a non-finite gradient norm.
    consecutive_skips: u64,
    /// When the current global step started.
    step_started: Instant,
    /// Per latent shape: (steps, seconds, peak bytes).
    buckets: std::collections::BTreeMap<[usize; 3], (u64, f64, Option<u64>)>,
    /// Rank 0's TensorBoard event file (`--report_to tensorboard`).
    tensorboard: Option<EventWriter>,
    /// The global step the newest checkpoint on disk holds (the resumed one, or the last written).
    checkpointed_step: Option<u64>,
    stopped_by: Option<&'static str>,
}

impl<'a> Trainer<'a> {
    /// Rank 0 (or the only process) writes every file.
    fn is_main(&self) -> bool {
        self.group.as_ref().is_none_or(|g| g.rank() == 0)
    }

    fn world(&self) -> (usize, usize) {
        rank_and_world(self.group.as_ref())
    }

    /// Every rank must hold the same weights (replicated optimiser steps on averaged gradients): each sends a
    /// checksum of its student and heads to all, and any difference is an error on every rank.
    fn check_replicas(&mut self) -> Result<()> {
        let Some(group) = self.group.as_mut() else {
            return Ok(());
        };
        let ring = group.ring();
        let mut sum = 0f64;
        for var in self.student_vars.iter().chain(&self.head_vars) {
            sum += var
                .as_tensor()
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let mut all = vec![0f64; ring.world_size()];
        all[ring.rank()] = sum;
        ring.all_reduce_sum(&mut all)?;
        if all.iter().any(|c| c.to_bits() != all[0].to_bits()) {
            return Err(Error::Dist(format!(
                "rank {}: the ranks' weights differ at step {} (checksums {all:?}); the run cannot continue",
                ring.rank(),
                self.state.global_step
            )));
        }
        Ok(())
    }

    /// Waits for every rank (no-op for one process).
    fn barrier(&mut self) -> Result<()> {
        match self.group.as_mut() {
            Some(group) => group.ring().barrier(),
            None => Ok(()),
        }
    }

    /// Validates the options, opens the store and checks it against the teacher, finds the resume point,
    /// starts the loader, builds the models and optimisers, and prepares the output folder.
    fn setup(opts: &'a TrainOptions) -> Result<Self> {
        opts.check()?;
        let started = Instant::now();
        let group = join_ranks(opts)?;
        let (rank, world) = rank_and_world(group.as_ref());
        let main = rank == 0;
        let (device, dtype) = (&opts.device, opts.compute_dtype());
        let (teacher_dir, teacher_config) = teacher_config(opts)?;

        // the store, checked against the teacher before loading anything heavy
        let store = LatentStore::open(&opts.latents)?;
        // every teacher component this run loads, checked cheaply (configs, weight headers, tokenizer), so that
        // a damaged file is named before the store's fingerprints are compared and before anything is written
        let mut components = vec!["transformer"];
        if !opts.validation_prompts.is_empty() {
            components.extend(["vae", "text_encoder", "tokenizer"]);
        } else if !store.config().validation_prompts.is_empty() {
            components.push("vae");
        }
        crate::hub::check_pipeline(&opts.pretrained_model_name_or_path, &components)?;
        compat::check_fits_teacher(
            store.config(),
            &opts.latents,
            &opts.pretrained_model_name_or_path,
            &teacher_config,
            opts.allow_store_mismatch,
        )?;
        let store_rows = store.len()?;
        check_expectations(&store, opts)?;
        if opts.allow_tf32 {
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }

        let resume_dir = resume_dir(opts)?;
        let resumed = match &resume_dir {
            Some(dir) => Some(resumed_state(dir, opts, store_rows)?),
            None => None,
        };

        // the loader starts first, so that its first batches are ready when the models are
        let (seed, start) = resumed
            .as_ref()
            .map_or((opts.seed, LoaderPosition::default()), |s| {
                (s.seed, s.loader)
            });
        let loader_options = LoaderOptions {
            batch_size: opts.train_batch_size,
            seed,
            drop_last: true,
            prefetch: opts.prefetch,
            sigma_data: opts.step.sigma_data as f32,
            shard: (rank, world),
        };
        let loader = StoreLoader::start(store, &loader_options, start)?;
        // every refusal above writes nothing; from here on the run owns the output folder (rank 0 writes)
        if main {
            std::fs::create_dir_all(&opts.output_dir)
                .map_err(|e| Error::io(&opts.output_dir, e))?;
            checkpoint::remove_partial(&opts.output_dir)?;
        }
        let updates_per_epoch = loader
            .batches_per_epoch()
            .div_ceil(opts.gradient_accumulation_steps as u64);
        let max_train_steps = opts
            .max_train_steps
            .unwrap_or(opts.num_train_epochs * updates_per_epoch);

        let teacher = SanaTrigFlow::new(SanaTransformer2DModel::load(&teacher_dir, dtype, device)?);
        let (student, heads) =
            trainable_models(opts, &teacher_dir, &teacher_config, resume_dir.as_deref())?;
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
        let state = match (&resume_dir, resumed) {
            (Some(dir), Some(state)) => {
                opt_g.load_state(dir.join(checkpoint::OPTIM_G_FILE))?;
                opt_d.load_state(dir.join(checkpoint::OPTIM_D_FILE))?;
                state
            }
            _ => fresh_state(opts, store_rows),
        };
        let student_config = checkpoint::student_config_json(&teacher_dir)?;
        let resumed_step = resume_dir.is_some().then_some(state.global_step);

        // output folder: config, metrics continued without duplicates
        let metrics = if main {
            write_train_config(opts)?;
            Some(MetricsLog::open(
                &opts.output_dir,
                resume_dir.is_some().then_some(state.global_step),
            )?)
        } else {
            None
        };
        let validators = if main {
            validators(opts, loader.config())?
        } else {
            Vec::new()
        };
        let tensorboard = if main && opts.report_to == ReportTo::Tensorboard {
            Some(open_tensorboard(opts, resumed_step.unwrap_or(0))?)
        } else {
            None
        };

        let negative = NegativePrompt::repeated(loader.config(), opts.train_batch_size, device)?;
        let teacher_negative = step::negative_context(&teacher, &negative.embeds, &negative.mask)?;
        Ok(Self {
            opts,
            started,
            dtype,
            max_train_steps,
            seed,
            resumed_from: resume_dir,
            loader,
            negative,
            teacher,
            teacher_negative,
            student_vars: student.named_vars().into_iter().map(|(_, v)| v).collect(),
            compute: student.compute_models(dtype)?,
            student,
            student_config,
            head_vars: heads.vars(),
            heads,
            opt_g,
            opt_d,
            schedule,
            lr_d: lr,
            bar: progress_bar(opts.progress && main, max_train_steps, state.global_step),
            state,
            validators,
            metrics,
            acc: GradStore::default(),
            micro: 0,
            last: Last::default(),
            rate: SampleRate::new(),
            checkpoints: Vec::new(),
            validation_images: Vec::new(),
            group,
            consecutive_skips: 0,
            step_started: Instant::now(),
            buckets: Default::default(),
            tensorboard,
            checkpointed_step: resumed_step,
            stopped_by: None,
        })
    }

    /// The loop: micro-steps, and after every `--gradient_accumulation_steps` of them an optimiser step with
    /// its log line, checkpoint and validation; then the export.
    fn train(mut self) -> Result<RunSummary> {
        while self.state.global_step < self.max_train_steps {
            if self.micro == 0 {
                if let Some(signal) = self.stop_requested()? {
                    return self.stop(signal);
                }
                if self.opts.profile {
                    profile::start(&self.opts.device)?;
                } else {
                    reset_step_peak(&self.opts.device)?;
                }
                self.step_started = Instant::now();
            }
            let batch = self.loader.next_batch()?;
            self.last.latent_shape = Some(batch.latent_shape);
            profile::mark("loader_wait")?;
            if !self.micro_step(&batch)? {
                continue;
            }
            let Some(step) = self.sync_step()? else {
                continue;
            };
            self.record_bucket_use()?;
            self.log(&step)?;
            self.maybe_checkpoint()?;
            self.maybe_validate()?;
            if self.opts.kill_after_step == Some(self.state.global_step) {
                self.bar.finish_and_clear();
                return Ok(self.summary());
            }
        }
        self.bar.finish_and_clear();
        self.export()?;
        Ok(self.summary())
    }

    /// One batch of the current phase: its gradients (scaled by 1/accumulation steps) added to the
    /// accumulator. Returns whether the accumulation is complete.
    fn micro_step(&mut self, host: &TrainBatch) -> Result<bool> {
        let opts = self.opts;
        let device = &opts.device;
        let batch = host.to_batch(&self.negative, device)?;
        profile::mark("host_to_device")?;
        let shape = batch.x0.dims().to_vec();
        // the draws of the whole global batch, from the generator of (seed, batch); this rank keeps its share
        let (rank, world) = self.world();
        let mut global_shape = shape.clone();
        global_shape[0] *= world;
        let share = (rank * shape[0], shape[0]);
        let mut rng = batch_rng(self.seed, self.state.batches_consumed);
        let models = Models {
            gradient_checkpointing: opts.gradient_checkpointing,
            teacher_negative: Some(&self.teacher_negative),
            ..Models::new(&self.teacher, &self.compute, &self.heads)
        };
        // the NaN test hook poisons the loss before backward
        let loss_scale = if opts
            .inject_nan_batches
            .contains(&self.state.batches_consumed)
        {
            f64::NAN
        } else {
            1.0 / opts.gradient_accumulation_steps as f64
        };
        let (s, global_step) = (&opts.step, self.state.global_step);
        match self.state.phase {
            Phase::Generator => {
                let draws = GeneratorDraws::sample(&mut rng, &global_shape, s, device)?
                    .narrow(share.0, share.1)?;
                profile::mark("draws")?;
                let (grads, out) = step::generator_grads(
                    &models,
                    &batch,
                    &draws,
                    s,
                    global_step,
                    &self.student_vars,
                    loss_scale,
                )?;
                accumulate(&mut self.acc, &grads, &self.student_vars)?;
                profile::mark("accumulate")?;
                self.last.scm = Some(out.scm_loss);
                self.last.adv = Some(out.adv_loss);
            }
            Phase::Discriminator => {
                let draws = DiscriminatorDraws::sample(&mut rng, &global_shape, s, device)?
                    .narrow(share.0, share.1)?;
                profile::mark("draws")?;
                let (grads, out) = step::discriminator_grads(
                    &models,
                    &batch,
                    &draws,
                    s,
                    &self.head_vars,
                    loss_scale,
                )?;
                accumulate(&mut self.acc, &grads, &self.head_vars)?;
                profile::mark("accumulate")?;
                self.last.d = Some(out.d_loss);
            }
        }
        self.state.batches_consumed += 1;
        self.state.loader = host.position.next(self.loader.batches_per_epoch());
        self.rate.add(host.len() * world);
        self.micro += 1;
        if self.micro < opts.gradient_accumulation_steps {
            return Ok(false);
        }
        self.micro = 0;
        Ok(true)
    }

    /// Clips the accumulated gradients and applies the phase's optimiser step; a non-finite norm skips the
    /// step (logged) and returns `None`. The phase then alternates.
    fn sync_step(&mut self) -> Result<Option<SyncedStep>> {
        let phase = self.state.phase;
        let vars = match phase {
            Phase::Generator => &self.student_vars,
            Phase::Discriminator => &self.head_vars,
        };
        if let Some(group) = self.group.as_mut() {
            group.average_gradients(&mut self.acc, vars)?;
            profile::mark("all_reduce")?;
        }
        let grad_norm = clip_grad_norm(&mut self.acc, vars, self.opts.gradient_clip)?;
        profile::mark("clip")?;
        let grads = std::mem::take(&mut self.acc);
        if !grad_norm.is_finite() {
            profile::finish();
            self.skip_non_finite(phase)?;
            return Ok(None);
        }
        let lr = match phase {
            Phase::Generator => {
                let lr = self.schedule.lr_at(self.state.generator_updates);
                self.opt_g.step(&grads, lr)?;
                profile::mark("optimizer")?;
                self.state.generator_updates += 1;
                self.last.grad_norm_g = Some(grad_norm);
                if self.dtype != DType::F32 {
                    self.compute = self.student.compute_models(self.dtype)?;
                    profile::mark("bf16_recast")?;
                }
                lr
            }
            Phase::Discriminator => {
                self.opt_d.step(&grads, self.lr_d)?;
                profile::mark("optimizer")?;
                self.state.discriminator_updates += 1;
                self.last.grad_norm_d = Some(grad_norm);
                self.lr_d
            }
        };
        drop(grads);
        self.consecutive_skips = 0;
        self.state.phase = phase.other();
        self.state.global_step += 1;
        Ok(Some(SyncedStep {
            phase,
            grad_norm,
            lr,
        }))
    }

    /// Adds the step just completed to its bucket's figures (time since the step started, memory peak).
    fn record_bucket_use(&mut self) -> Result<()> {
        let Some(shape) = self.last.latent_shape else {
            return Ok(());
        };
        let peak = if self.opts.profile {
            None
        } else {
            step_peak_bytes(&self.opts.device)?
        };
        let secs = self.step_started.elapsed().as_secs_f64();
        let e = self.buckets.entry(shape).or_insert((0, 0.0, None));
        e.0 += 1;
        e.1 += secs;
        e.2 = match (e.2, peak) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.last.step_s = Some(secs);
        self.last.step_peak = peak;
        Ok(())
    }

    /// Whether a stop signal reached this process (or, in a multi-process run, any rank: all stop at the
    /// same step).
    fn stop_requested(&mut self) -> Result<Option<&'static str>> {
        let local = crate::stop::requested();
        let Some(group) = self.group.as_mut() else {
            return Ok(local);
        };
        let mut any = [f64::from(u8::from(local.is_some()))];
        group.ring().all_reduce_sum(&mut any)?;
        Ok((any[0] > 0.0).then_some(local.unwrap_or("a signal to another rank")))
    }

    /// A polite stop: the last completed step is checkpointed (unless it already is) and the run ends without
    /// its export.
    fn stop(mut self, signal: &'static str) -> Result<RunSummary> {
        self.bar.finish_and_clear();
        if self.state.global_step > 0 && self.checkpointed_step != Some(self.state.global_step) {
            self.write_checkpoint()?;
        }
        self.stopped_by = Some(signal);
        Ok(self.summary())
    }

    /// The newest checkpoint in the output folder, for messages.
    fn last_good_checkpoint(&self) -> String {
        match checkpoint::latest(&self.opts.output_dir) {
            Ok(Some(dir)) => format!(
                "the last good checkpoint is {} (continue from it with --resume_from_checkpoint {0} and, \
                 e.g., a lower --learning_rate or --gradient_clip)",
                dir.display()
            ),
            _ => "no checkpoint was written before it (lower --learning_rate or --gradient_clip and start \
                  again)"
                .into(),
        }
    }

    /// Bytes of the student and the heads in `dtype` (what an export writes; a checkpoint writes three times
    /// the f32 size: weights and two AdamW moments).
    fn weight_bytes(&self, dtype: DType) -> u64 {
        let elems: usize = self
            .student_vars
            .iter()
            .chain(&self.head_vars)
            .map(|v| v.as_tensor().elem_count())
            .sum();
        (elems * dtype.size_in_bytes()) as u64
    }

    /// Refuses to write weights that hold NaN/Inf: the run has diverged.
    fn check_finite_weights(&self) -> Result<()> {
        let named = self
            .student
            .named_vars()
            .into_iter()
            .chain(self.heads.named_vars());
        for (name, var) in named {
            let t = var.as_tensor();
            // x - x is 0 for every finite x and NaN for NaN and ±Inf; a sum of zeros is exactly 0
            #[allow(clippy::eq_op)]
            let probe = (t - t)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            if probe != 0.0 {
                return Err(Error::Diverged(format!(
                    "after global step {} the weights hold NaN/Inf (first: {name}); nothing was written; {}",
                    self.state.global_step,
                    self.last_good_checkpoint()
                )));
            }
        }
        Ok(())
    }

    /// Records a step skipped for a non-finite gradient norm (the phase stays, the step does not count);
    /// after `--max_consecutive_nan_skips` in a row the run stops as diverged.
    fn skip_non_finite(&mut self, phase: Phase) -> Result<()> {
        self.consecutive_skips += 1;
        if self.consecutive_skips >= self.opts.max_consecutive_nan_skips {
            return Err(Error::Diverged(format!(
                "{} steps in a row had a NaN/Inf gradient norm (phase {}, global step {}; \
                 --max_consecutive_nan_skips {}): the run has diverged; {}",
                self.consecutive_skips,
                phase.name(),
                self.state.global_step,
                self.opts.max_consecutive_nan_skips,
                self.last_good_checkpoint()
            )));
        }
        let state = &mut self.state;
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
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.add_scalar(
                "nan_skips",
                state.global_step as i64,
                state.nan_skips as f64,
                wall_time(),
            )?;
        }
        match self.metrics.as_mut() {
            Some(metrics) => metrics.write(line),
            None => Ok(()),
        }
    }

    /// The step's metrics line and the progress bar.
    fn log(&mut self, step: &SyncedStep) -> Result<()> {
        if let Some(group) = self.group.as_mut() {
            let ring = group.ring();
            // the losses shown and logged are the means over the ranks
            let last = &mut self.last;
            let mut values = [last.scm, last.adv, last.d].map(|v| v.unwrap_or(0.0));
            ring.all_reduce_sum(&mut values)?;
            let w = ring.world_size() as f64;
            for (slot, v) in [&mut last.scm, &mut last.adv, &mut last.d]
                .into_iter()
                .zip(values)
            {
                if slot.is_some() {
                    *slot = Some(v / w);
                }
            }
        }
        let samples_per_s = self.rate.per_s();
        let (state, last) = (&self.state, &self.last);
        let lr_g = self.schedule.lr_at(state.generator_updates);
        let stages = profile::finish();
        let mut line = serde_json::json!({
            "step": state.global_step,
            "phase": step.phase.name(),
            "scm_loss": last.scm,
            "adv_loss": last.adv,
            "d_loss": last.d,
            "grad_norm": step.grad_norm,
            "lr": step.lr,
            "lr_g": lr_g,
            "epoch": state.loader.epoch,
            "samples_per_s": samples_per_s,
            "loader_wait_s": self.loader.waited().as_secs_f64(),
            "elapsed_s": self.started.elapsed().as_secs_f64(),
            "nan_skips": state.nan_skips,
        });
        let bucketed = self.loader.config().multi_scale.is_some();
        if let (true, Some(shape)) = (bucketed, last.latent_shape) {
            line["latent_shape"] = serde_json::json!(shape);
        }
        if let Some(secs) = last.step_s {
            line["step_s"] = secs.into();
        }
        if let Some(peak) = last.step_peak {
            line["peak_mem_gib"] = (peak as f64 / 1073741824.0).into();
        }
        if let Some(stages) = stages {
            let secs: serde_json::Map<_, _> = stages
                .iter()
                .map(|s| (s.name.to_string(), s.secs.into()))
                .collect();
            line["stages"] = secs.into();
            let peaks: serde_json::Map<_, _> = stages
                .iter()
                .filter_map(|s| {
                    Some((
                        s.name.to_string(),
                        (s.peak_bytes? as f64 / 1073741824.0).into(),
                    ))
                })
                .collect();
            if !peaks.is_empty() {
                line["stage_peak_gib"] = peaks.into();
            }
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.add_scalars_from_json(state.global_step as i64, wall_time(), &line)?;
        }
        if let Some(metrics) = self.metrics.as_mut() {
            metrics.write(line)?;
        }
        self.bar.set_position(state.global_step);
        // the bucket of a bucketed store's last batch, in pixels
        let bucket = self
            .loader
            .config()
            .multi_scale
            .as_ref()
            .zip(last.latent_shape)
            .and_then(|(ms, shape)| ms.buckets.iter().find(|b| b.latent_shape == shape))
            .map_or(String::new(), |b| format!("{}x{} ", b.height, b.width));
        self.bar.set_message(format!(
            "{bucket}scm {} adv {} d {} |g| {} |d| {} lr {:.2e} {:.1} samples/s",
            fmt_opt(last.scm),
            fmt_opt(last.adv),
            fmt_opt(last.d),
            fmt_opt(last.grad_norm_g),
            fmt_opt(last.grad_norm_d),
            lr_g,
            samples_per_s
        ));
        Ok(())
    }

    /// Every `--checkpointing_steps`: writes `checkpoint-{step}` (student f32 master weights, logvar head,
    /// heads with buffers, both optimiser states, trainer state) atomically, then prunes to
    /// `--checkpoints_total_limit`.
    fn maybe_checkpoint(&mut self) -> Result<()> {
        if !self
            .state
            .global_step
            .is_multiple_of(self.opts.checkpointing_steps)
        {
            return Ok(());
        }
        self.write_checkpoint()
    }

    /// Writes `checkpoint-{step}` of the current step (rank 0; the other ranks wait for it).
    fn write_checkpoint(&mut self) -> Result<()> {
        self.check_finite_weights()?;
        self.check_replicas()?;
        self.checkpointed_step = Some(self.state.global_step);
        if !self.is_main() {
            // rank 0 writes; the others wait until the checkpoint is complete
            return self.barrier();
        }
        let name = checkpoint::checkpoint_name(self.state.global_step);
        let out = &self.opts.output_dir;
        let previous = checkpoint::latest(out)?;
        let needed = previous
            .as_deref()
            .map(crate::system::dir_bytes)
            .filter(|&b| b > 0)
            .unwrap_or_else(|| 3 * self.weight_bytes(DType::F32));
        let remedy = format!(
            "nothing of it was kept; the newest complete checkpoint is {}. Free some space (or lower \
             --checkpoints_total_limit) and continue with --resume_from_checkpoint latest",
            previous
                .as_deref()
                .map_or_else(|| "none".into(), |p| p.display().to_string())
        );
        let dir = checkpoint::write_atomically(&self.opts.output_dir, &name, |dir| {
            let named = student_tensors(&self.student);
            checkpoint::save_student(dir, &self.student_config, &named, DType::F32)?;
            abort_in_checkpoint_hook();
            self.heads.save(&dir.join(checkpoint::HEADS_FILE))?;
            self.opt_g.save_state(dir.join(checkpoint::OPTIM_G_FILE))?;
            self.opt_d.save_state(dir.join(checkpoint::OPTIM_D_FILE))?;
            checkpoint::write_state(dir, &self.state)
        })
        .map_err(|e| e.on_full_disk(&out.join(&name), Some(needed), &remedy))?;
        if let Some(limit) = self.opts.checkpoints_total_limit {
            for removed in checkpoint::prune(&self.opts.output_dir, limit)? {
                self.checkpoints.retain(|p| p != &removed);
            }
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.flush()?;
        }
        self.bar.println(format!("saved {}", dir.display()));
        self.checkpoints.push(dir);
        self.barrier()
    }

    /// Every `--validation_steps` before the last step: validation images from the current student.
    fn maybe_validate(&mut self) -> Result<()> {
        let Some(every) = self.opts.validation_steps else {
            return Ok(());
        };
        let step = self.state.global_step;
        if step.is_multiple_of(every) && step < self.max_train_steps {
            for path in self.validate(step, "validation")? {
                self.bar
                    .println(format!("validation images: {}", path.display()));
                self.validation_images.push(path);
            }
        }
        Ok(())
    }

    /// Validation grids of the current student at every validation size: `step-NNNNNN.png` at the store's
    /// square resolution by default, `step-NNNNNN-HxW.png` per `--validation_resolution`. TensorBoard gets
    /// each grid under `tag` (the reference's `validation`, or `test` for the final one; `tag/HxW` per size).
    fn validate(&mut self, step: u64, tag: &str) -> Result<Vec<PathBuf>> {
        let out = &self.opts.output_dir;
        let sized = !self.opts.validation_resolutions.is_empty();
        let mut paths = Vec::new();
        for v in &self.validators {
            let path = if sized {
                crate::train::validation::validation_path_sized(out, step, v.size())
            } else {
                crate::train::validation::validation_path(out, step)
            };
            let path = v.run_to(&self.compute.frozen, &path).map_err(|e| {
                e.on_full_disk(
                    &path,
                    None,
                    "no partial image was left; the checkpoints are intact: free some space and continue with \
                     --resume_from_checkpoint latest",
                )
            })?;
            if let Some(tb) = self.tensorboard.as_mut() {
                let png = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                let (w, h) = image::image_dimensions(&path)
                    .map_err(|e| Error::data(&path, format!("cannot read the grid back: {e}")))?;
                let tag = if sized {
                    let (vh, vw) = v.size();
                    format!("{tag}/{vh}x{vw}")
                } else {
                    tag.to_string()
                };
                tb.add_png(&tag, step as i64, &png, h, w, wall_time())?;
                tb.flush()?;
            }
            paths.push(path);
        }
        Ok(paths)
    }

    /// The final diffusers export of the student (f32 with `--upcast_before_saving`, else the compute dtype),
    /// the heads, and the final validation images.
    fn export(&mut self) -> Result<()> {
        self.check_finite_weights()?;
        if !self.is_main() {
            return self.barrier();
        }
        let dtype = if self.opts.upcast_before_saving {
            DType::F32
        } else {
            self.dtype
        };
        let out = &self.opts.output_dir;
        let full = |e: Error| {
            e.on_full_disk(
                out,
                Some(self.weight_bytes(dtype)),
                "every file of the export is written whole or not at all, and the checkpoints are intact; free \
                 some space and run the same command with --resume_from_checkpoint latest (it exports without \
                 training further)",
            )
        };
        checkpoint::save_student(
            out,
            &self.student_config,
            &student_tensors(&self.student),
            dtype,
        )
        .map_err(full)?;
        self.heads
            .save(&out.join(checkpoint::HEADS_FILE))
            .map_err(full)?;
        let paths = self.validate(self.state.global_step, "test")?;
        self.validation_images.extend(paths);
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.flush()?;
        }
        self.barrier()
    }

    fn summary(self) -> RunSummary {
        let (state, last) = (&self.state, &self.last);
        RunSummary {
            global_step: state.global_step,
            generator_updates: state.generator_updates,
            discriminator_updates: state.discriminator_updates,
            nan_skips: state.nan_skips,
            batches: state.batches_consumed,
            last_scm_loss: last.scm,
            last_adv_loss: last.adv,
            last_d_loss: last.d,
            elapsed: self.started.elapsed(),
            loader_wait: self.loader.waited(),
            checkpoints: self.checkpoints,
            export_dir: self.opts.output_dir.join(checkpoint::TRANSFORMER_DIR),
            validation_images: self.validation_images,
            resumed_from: self.resumed_from,
            buckets: self
                .buckets
                .iter()
                .map(|(&latent_shape, &(steps, secs, peak_bytes))| BucketUse {
                    latent_shape,
                    steps,
                    mean_step_s: secs / steps.max(1) as f64,
                    peak_bytes,
                })
                .collect(),
            stopped_by: self.stopped_by,
        }
    }
}

/// Test hook of the chaos test: `SPRINT_TRAIN_ABORT_IN_CHECKPOINT=N` aborts the process (as a kill would) in
/// the middle of its N-th checkpoint write, after the student's weights are written and before the rest.
fn abort_in_checkpoint_hook() {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(n) = std::env::var("SPRINT_TRAIN_ABORT_IN_CHECKPOINT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    if WRITES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
        std::process::abort();
    }
}

/// The student's variables as named tensors (for saving).
fn student_tensors(student: &Student) -> Vec<(String, Tensor)> {
    student
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}
