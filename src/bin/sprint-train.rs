//! sprint-train: SANA-Sprint distillation (sCM + LADD) reading only a latent store made by sprint-prep.
//! Flag names, meanings and defaults follow train_sana_sprint_diffusers.py (SPEC §8.1).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use sana_sprint::device::{self, MixedPrecision};
use sana_sprint::hub::{self, HubConfig};
use sana_sprint::models::sana::SelfAttention;
use sana_sprint::models::student::GuidanceInit;
use sana_sprint::train::loss::TimestepSampler;
use sana_sprint::train::optim::{AdamWConfig, LrScheduleKind};
use sana_sprint::train::step::{StepSettings, LARGEST_TIMESTEP};
use sana_sprint::train::trainer::{self, TrainOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum GuidanceInitArg {
    /// linear_1.weight ~ N(0, 0.02), the rest zero (NVlabs; the guidance embedding can learn).
    Learnable,
    /// All zero, as the diffusers script (only linear_2.bias ever learns).
    Zero,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum SelfAttentionArg {
    /// ReLU linear attention, as the teacher and inference (recommended).
    Linear,
    /// Softmax self-attention, as the diffusers script's processor swap (for parity studies).
    Softmax,
}

#[derive(Parser, Debug, Serialize)]
#[command(name = "sprint-train", version, rename_all = "snake_case", about, long_about = None)]
struct Args {
    /// Teacher pipeline folder (transformer/; vae/, text_encoder/, tokenizer/ for validation and the store
    /// check) or a hub id (HF cache first; downloaded only when HF_HUB_OFFLINE is not set).
    #[arg(long, required_unless_present = "demo")]
    pretrained_model_name_or_path: Option<String>,
    /// The latent store written by sprint-prep (replaces --dataset_name/--file_path: nothing is encoded per step).
    #[arg(long, required_unless_present = "demo")]
    latents: Option<PathBuf>,
    #[arg(long, default_value = "sana-sprint-output")]
    output_dir: PathBuf,
    #[arg(long, default_value_t = 4)]
    train_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    num_train_epochs: u64,
    /// Global steps (G and D steps together, SPEC §8.10); overrides --num_train_epochs.
    #[arg(long)]
    max_train_steps: Option<u64>,
    #[arg(long, default_value_t = 1)]
    gradient_accumulation_steps: usize,
    /// Recompute student blocks in backward instead of keeping their activations.
    #[arg(long)]
    gradient_checkpointing: bool,
    #[arg(long, default_value_t = 1e-4)]
    learning_rate: f64,
    /// lr *= gradient_accumulation_steps * train_batch_size.
    #[arg(long)]
    scale_lr: bool,
    /// constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial (G optimiser only).
    #[arg(long, default_value = "constant")]
    lr_scheduler: String,
    #[arg(long, default_value_t = 500)]
    lr_warmup_steps: u64,
    #[arg(long, default_value_t = 1)]
    lr_num_cycles: u64,
    #[arg(long, default_value_t = 1.0)]
    lr_power: f64,
    #[arg(long, default_value_t = 0.9)]
    adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    adam_beta2: f64,
    #[arg(long, default_value_t = 1e-4)]
    adam_weight_decay: f64,
    #[arg(long, default_value_t = 1e-8)]
    adam_epsilon: f64,
    /// Max global gradient norm (both phases).
    #[arg(long, default_value_t = 0.1)]
    gradient_clip: f64,
    /// bf16: models compute in bf16 over f32 master weights and f32 optimiser state; no: all f32.
    #[arg(long, value_enum, default_value_t = MixedPrecision::No)]
    mixed_precision: MixedPrecision,
    /// Seed of initialisation, shuffling and every per-step draw (default: 0).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.2, allow_hyphen_values = true)]
    logit_mean: f64,
    #[arg(long, default_value_t = 1.6)]
    logit_std: f64,
    #[arg(long, default_value_t = -0.6, allow_hyphen_values = true)]
    logit_mean_discriminator: f64,
    #[arg(long, default_value_t = 1.0)]
    logit_std_discriminator: f64,
    /// Teacher blocks read by the discriminator heads.
    #[arg(long, num_args = 1.., default_values_t = vec![2usize, 8, 14, 19])]
    head_block_ids: Vec<usize>,
    #[arg(long, default_value_t = 0.5)]
    adv_lambda: f64,
    #[arg(long, default_value_t = 1.0)]
    scm_lambda: f64,
    #[arg(long, default_value_t = 0.5)]
    sigma_data: f64,
    #[arg(long, default_value_t = 4000)]
    tangent_warmup_steps: u64,
    #[arg(long, default_value_t = 0.1)]
    guidance_embeds_scale: f64,
    /// Teacher CFG scales, one drawn uniformly per sample.
    #[arg(long, num_args = 1.., default_values_t = vec![4.0, 4.5, 5.0])]
    scm_cfg_scale: Vec<f64>,
    #[arg(long)]
    train_largest_timestep: bool,
    #[arg(long, default_value_t = LARGEST_TIMESTEP)]
    largest_timestep: f64,
    #[arg(long, default_value_t = 0.5)]
    largest_timestep_prob: f64,
    /// Add misaligned (image, prompt) pairs as fakes in the D phase (needs batch > 1).
    #[arg(long = "misaligned_pairs_D")]
    misaligned_pairs_d: bool,
    /// Save a checkpoint every this many global steps.
    #[arg(long, default_value_t = 500)]
    checkpointing_steps: u64,
    #[arg(long)]
    checkpoints_total_limit: Option<usize>,
    /// `latest` or a checkpoint folder; `latest` with no checkpoint starts fresh.
    #[arg(long)]
    resume_from_checkpoint: Option<String>,
    /// Prompts for validation images (each gets --num_validation_images samples).
    #[arg(long, num_args = 1..)]
    validation_prompt: Vec<String>,
    #[arg(long, default_value_t = 4)]
    num_validation_images: usize,
    /// Validate every this many global steps (always at the end when prompts are given).
    #[arg(long)]
    validation_steps: Option<u64>,
    /// TrigFlow times of the SCM sampler (1–4 steps; default 2 steps: 1.5708 1.3).
    #[arg(long, num_args = 1.., default_values_t = vec![LARGEST_TIMESTEP, 1.3])]
    validation_timesteps: Vec<f64>,
    /// Save the final student in f32 (default: the training compute dtype).
    #[arg(long)]
    upcast_before_saving: bool,
    /// Train on a store whose VAE/text-encoder fingerprints differ from the teacher folder's.
    #[arg(long)]
    allow_store_mismatch: bool,
    #[arg(long, value_enum, default_value_t = GuidanceInitArg::Learnable)]
    guidance_init: GuidanceInitArg,
    #[arg(long, value_enum, default_value_t = SelfAttentionArg::Linear)]
    self_attention: SelfAttentionArg,
    /// cpu, cuda or cuda:N (cuda by default in CUDA builds).
    #[arg(long, default_value = device::default_device())]
    device: String,
    /// Batches prepared ahead by the store loader.
    #[arg(long, default_value_t = 4)]
    dataloader_num_workers: usize,
    /// No progress bar (for logs).
    #[arg(long)]
    no_progress: bool,
    /// Train the embedded tiny teacher on the demo store (run `sprint-prep --demo` first): a few CPU steps
    /// writing a checkpoint, validation images and metrics to demo-output/train (a rerun resumes it).
    #[arg(long)]
    demo: bool,
}

/// The `datasets/` folder: next to the working directory, else the one this binary was built from.
fn datasets_dir() -> PathBuf {
    let local = PathBuf::from("datasets");
    if local.join("tiny-sana-sprint").is_dir() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets")
    }
}

fn options(mut a: Args) -> sana_sprint::Result<TrainOptions> {
    if a.demo {
        let d = datasets_dir();
        a.pretrained_model_name_or_path
            .get_or_insert_with(|| d.join("tiny-sana-sprint").display().to_string());
        a.latents
            .get_or_insert_with(|| PathBuf::from("demo-output/demo.lance"));
        if a.output_dir == Path::new("sana-sprint-output") {
            a.output_dir = PathBuf::from("demo-output/train");
        }
        a.max_train_steps.get_or_insert(6);
        a.resume_from_checkpoint
            .get_or_insert_with(|| "latest".into());
        if a.checkpointing_steps == 500 {
            a.checkpointing_steps = 2;
        }
        if a.validation_prompt.is_empty() {
            a.validation_prompt = vec!["a tiny astronaut hatching from an egg on the moon".into()];
            a.num_validation_images = 2;
        }
        if a.train_batch_size == 4 {
            a.train_batch_size = 2;
        }
        if a.learning_rate == 1e-4 {
            a.learning_rate = 1e-3;
        }
        a.train_largest_timestep = true;
        a.misaligned_pairs_d = true;
    }
    let config_json = serde_json::to_value(&a).expect("the flags serialise");
    let name = a
        .pretrained_model_name_or_path
        .clone()
        .expect("required unless --demo");
    let root = hub::resolve_model(&name, &["transformer"], &HubConfig::from_env())?.root;
    let mut o = TrainOptions::new(
        root,
        a.latents.clone().expect("required unless --demo"),
        a.output_dir.clone(),
    );
    o.train_batch_size = a.train_batch_size;
    o.num_train_epochs = a.num_train_epochs;
    o.max_train_steps = a.max_train_steps;
    o.gradient_accumulation_steps = a.gradient_accumulation_steps;
    o.gradient_checkpointing = a.gradient_checkpointing;
    o.learning_rate = a.learning_rate;
    o.scale_lr = a.scale_lr;
    o.lr_scheduler = a.lr_scheduler.parse::<LrScheduleKind>()?;
    o.lr_warmup_steps = a.lr_warmup_steps;
    o.lr_num_cycles = a.lr_num_cycles;
    o.lr_power = a.lr_power;
    o.adam = AdamWConfig {
        beta1: a.adam_beta1,
        beta2: a.adam_beta2,
        eps: a.adam_epsilon,
        weight_decay: a.adam_weight_decay,
    };
    o.gradient_clip = a.gradient_clip;
    o.mixed_precision = a.mixed_precision;
    o.seed = a.seed;
    o.step = StepSettings {
        sigma_data: a.sigma_data,
        scm_lambda: a.scm_lambda,
        adv_lambda: a.adv_lambda,
        tangent_warmup_steps: a.tangent_warmup_steps,
        guidance_embeds_scale: a.guidance_embeds_scale,
        student_sampler: TimestepSampler {
            mean: a.logit_mean,
            std: a.logit_std,
        },
        disc_sampler: TimestepSampler {
            mean: a.logit_mean_discriminator,
            std: a.logit_std_discriminator,
        },
        scm_cfg_scale: a.scm_cfg_scale.clone(),
        train_largest_timestep: a.train_largest_timestep,
        largest_timestep: a.largest_timestep,
        largest_timestep_prob: a.largest_timestep_prob,
        misaligned_pairs_d: a.misaligned_pairs_d,
    };
    o.head_block_ids = a.head_block_ids.clone();
    o.guidance_init = match a.guidance_init {
        GuidanceInitArg::Learnable => GuidanceInit::Learnable,
        GuidanceInitArg::Zero => GuidanceInit::Zero,
    };
    o.self_attention = match a.self_attention {
        SelfAttentionArg::Linear => SelfAttention::Linear,
        SelfAttentionArg::Softmax => SelfAttention::Softmax,
    };
    o.checkpointing_steps = a.checkpointing_steps;
    o.checkpoints_total_limit = a.checkpoints_total_limit;
    o.resume_from_checkpoint = a.resume_from_checkpoint.clone();
    o.validation_prompts = a.validation_prompt.clone();
    o.num_validation_images = a.num_validation_images;
    o.validation_steps = a.validation_steps;
    o.validation_timesteps = a.validation_timesteps.clone();
    o.upcast_before_saving = a.upcast_before_saving;
    o.allow_store_mismatch = a.allow_store_mismatch;
    o.device = device::parse_device(&a.device)?;
    o.prefetch = a.dataloader_num_workers.max(1);
    o.progress = !a.no_progress;
    o.config_json = config_json;
    Ok(o)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = options(Args::parse()).and_then(|o| {
        let summary = trainer::run(&o)?;
        let secs = summary.elapsed.as_secs_f64();
        println!(
            "trained {} global steps ({} G, {} D updates, {} NaN/Inf skips) over {} batches in {:.1} s",
            summary.global_step,
            summary.generator_updates,
            summary.discriminator_updates,
            summary.nan_skips,
            summary.batches,
            secs
        );
        if let Some(dir) = &summary.resumed_from {
            println!("resumed from     {}", dir.display());
        }
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.5}"));
        println!(
            "last losses      scm {}  adv {}  d {}",
            fmt(summary.last_scm_loss),
            fmt(summary.last_adv_loss),
            fmt(summary.last_d_loss)
        );
        println!(
            "loader wait      {:.3} s ({:.2}% of the run)",
            summary.loader_wait.as_secs_f64(),
            100.0 * summary.loader_wait.as_secs_f64() / secs.max(1e-9)
        );
        if let Some(peak) = sana_sprint::system::peak_rss_bytes() {
            println!("peak memory      {:.0} MiB (host RSS)", peak as f64 / 1048576.0);
        }
        for c in &summary.checkpoints {
            println!("checkpoint       {}", c.display());
        }
        for v in &summary.validation_images {
            println!("validation       {}", v.display());
        }
        println!(
            "student          {} (+ logvar_linear.safetensors, disc_heads.safetensors, metrics.jsonl)",
            summary.export_dir.display()
        );
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
