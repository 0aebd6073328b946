//! `sprint-train`'s flags. Names and meanings follow train_sana_sprint_diffusers.py; every default is the
//! library's ([`TrainOptions::new`], [`StepSettings::default`], [`AdamWConfig::default`]).
//!
//! [`StepSettings::default`]: crate::train::step::StepSettings
//! [`AdamWConfig::default`]: crate::train::optim::AdamWConfig

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser};
use serde::Serialize;

use super::{datasets_dir, fill, num, nums, value_name, DEVICE_DEFAULT};
use crate::device::{self, MixedPrecision};
use crate::hub::{self, HubConfig};
use crate::models::sana::SelfAttention;
use crate::models::student::GuidanceInit;
use crate::train::optim::LrScheduleKind;
use crate::train::options::{ReportTo, TrainOptions, DEFAULT_OUTPUT_DIR};
use crate::{Error, Result};

/// The flags as given. Tunables are `None` when not passed; [`TrainArgs::options`] fills them from the
/// library defaults (and writes the filled values back, so `train_config.json` records every value in effect).
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "sprint-train", version, rename_all = "snake_case", about, long_about = None)]
pub struct TrainArgs {
    /// Teacher pipeline folder (transformer/; vae/, text_encoder/, tokenizer/ for validation and the store
    /// check) or a hub id (HF cache first; downloaded only when HF_HUB_OFFLINE is not set).
    #[arg(
        long,
        required_unless_present = "demo",
        help_heading = "Model and data"
    )]
    pub pretrained_model_name_or_path: Option<String>,
    /// The latent store written by sprint-prep (replaces --dataset_name/--file_path: nothing is encoded per step).
    #[arg(long, help_heading = "Model and data")]
    pub latents: Option<PathBuf>,
    /// Checkpoints, the exported student, validation images and metrics.
    #[arg(long, help_heading = "Model and data")]
    pub output_dir: Option<PathBuf>,
    #[arg(long, help_heading = "Batches and length")]
    pub train_batch_size: Option<usize>,
    #[arg(long, help_heading = "Batches and length")]
    pub num_train_epochs: Option<u64>,
    /// Global steps (G and D steps together); overrides --num_train_epochs.
    #[arg(long, help_heading = "Batches and length")]
    pub max_train_steps: Option<u64>,
    #[arg(long, help_heading = "Batches and length")]
    pub gradient_accumulation_steps: Option<usize>,
    /// Recompute student blocks in backward instead of keeping their activations.
    #[arg(long, help_heading = "Batches and length")]
    pub gradient_checkpointing: bool,
    #[arg(long, help_heading = "Optimiser")]
    pub learning_rate: Option<f64>,
    /// lr *= gradient_accumulation_steps * train_batch_size.
    #[arg(long, help_heading = "Optimiser")]
    pub scale_lr: bool,
    /// Learning-rate schedule of the G optimiser (diffusers' get_scheduler names).
    #[arg(long, value_enum, help_heading = "Optimiser")]
    pub lr_scheduler: Option<LrScheduleKind>,
    #[arg(long, help_heading = "Optimiser")]
    pub lr_warmup_steps: Option<u64>,
    #[arg(long, help_heading = "Optimiser")]
    pub lr_num_cycles: Option<u64>,
    #[arg(long, help_heading = "Optimiser")]
    pub lr_power: Option<f64>,
    #[arg(long, help_heading = "Optimiser")]
    pub adam_beta1: Option<f64>,
    #[arg(long, help_heading = "Optimiser")]
    pub adam_beta2: Option<f64>,
    #[arg(long, help_heading = "Optimiser")]
    pub adam_weight_decay: Option<f64>,
    #[arg(long, help_heading = "Optimiser")]
    pub adam_epsilon: Option<f64>,
    /// Max global gradient norm (both phases).
    #[arg(long, help_heading = "Optimiser")]
    pub gradient_clip: Option<f64>,
    /// Stop the run as diverged after this many steps in a row with a NaN/Inf gradient norm (each is skipped);
    /// the error names the last good checkpoint.
    #[arg(long, help_heading = "Optimiser")]
    pub max_consecutive_nan_skips: Option<u64>,
    /// bf16: models compute in bf16 over f32 master weights and f32 optimiser state; no: all f32.
    #[arg(long, value_enum, help_heading = "Device and speed")]
    pub mixed_precision: Option<MixedPrecision>,
    /// Seed of initialisation, shuffling and every per-step draw.
    #[arg(long, help_heading = "Batches and length")]
    pub seed: Option<u64>,
    #[arg(
        long,
        allow_hyphen_values = true,
        help_heading = "Distillation (sCM + LADD)"
    )]
    pub logit_mean: Option<f64>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub logit_std: Option<f64>,
    #[arg(
        long,
        allow_hyphen_values = true,
        help_heading = "Distillation (sCM + LADD)"
    )]
    pub logit_mean_discriminator: Option<f64>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub logit_std_discriminator: Option<f64>,
    /// Teacher blocks read by the discriminator heads.
    #[arg(long, num_args = 1.., help_heading = "Distillation (sCM + LADD)")]
    pub head_block_ids: Option<Vec<usize>>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub adv_lambda: Option<f64>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub scm_lambda: Option<f64>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub sigma_data: Option<f64>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub tangent_warmup_steps: Option<u64>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub guidance_embeds_scale: Option<f64>,
    /// Teacher CFG scales, one drawn uniformly per sample.
    #[arg(long, num_args = 1.., help_heading = "Distillation (sCM + LADD)")]
    pub scm_cfg_scale: Option<Vec<f64>>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub train_largest_timestep: bool,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub largest_timestep: Option<f64>,
    #[arg(long, help_heading = "Distillation (sCM + LADD)")]
    pub largest_timestep_prob: Option<f64>,
    /// Add misaligned (image, prompt) pairs as fakes in the D phase (needs batch > 1).
    #[arg(
        long = "misaligned_pairs_D",
        help_heading = "Distillation (sCM + LADD)"
    )]
    pub misaligned_pairs_d: bool,
    /// Save a checkpoint every this many global steps.
    #[arg(long, help_heading = "Checkpoints and export")]
    pub checkpointing_steps: Option<u64>,
    /// Keep only the newest N checkpoints (default: keep all).
    #[arg(long, help_heading = "Checkpoints and export")]
    pub checkpoints_total_limit: Option<usize>,
    /// `latest` or a checkpoint folder; `latest` with no checkpoint starts fresh.
    #[arg(long, help_heading = "Checkpoints and export")]
    pub resume_from_checkpoint: Option<String>,
    /// Prompts for validation images (each gets --num_validation_images samples).
    #[arg(long, num_args = 1.., help_heading = "Validation")]
    pub validation_prompt: Vec<String>,
    #[arg(long, help_heading = "Validation")]
    pub num_validation_images: Option<usize>,
    /// Validate every this many global steps (always at the end when prompts are given).
    #[arg(long, help_heading = "Validation")]
    pub validation_steps: Option<u64>,
    /// Validation image size HxW in pixels (e.g. 1024x576; a single number is a square); repeat for one grid
    /// per size. Default: the store's resolution, square.
    #[arg(long, value_parser = parse_hw, help_heading = "Validation")]
    pub validation_resolution: Vec<(usize, usize)>,
    /// TrigFlow times of the SCM sampler (1–4 steps; two values = the pipeline's 2 steps).
    #[arg(long, num_args = 1.., help_heading = "Validation")]
    pub validation_timesteps: Option<Vec<f64>>,
    /// Save the final student in f32 (default: the training compute dtype).
    #[arg(long, help_heading = "Checkpoints and export")]
    pub upcast_before_saving: bool,
    /// Train on a store whose VAE/text-encoder fingerprints differ from the teacher folder's.
    #[arg(long, help_heading = "Model and data")]
    pub allow_store_mismatch: bool,
    /// Time every stage of each step (loader wait, teacher CFG, JVP, student forward, LADD, backward,
    /// optimiser, ...) with device-synchronised timers and write them to metrics.jsonl as "stages"; the
    /// synchronisations make profiled steps slightly slower.
    #[arg(long, help_heading = "Device and speed")]
    pub profile: bool,
    /// learnable: linear_1.weight ~ N(0, 0.02), the rest zero (the guidance embedding can learn); zero: all
    /// zero, as the diffusers script (only linear_2.bias ever learns).
    #[arg(long, value_enum, help_heading = "Distillation (sCM + LADD)")]
    pub guidance_init: Option<GuidanceInit>,
    /// linear: ReLU linear attention, as the teacher and inference (recommended); softmax: the diffusers
    /// script's processor swap (for parity studies).
    #[arg(long, value_enum, help_heading = "Distillation (sCM + LADD)")]
    pub self_attention: Option<SelfAttention>,
    /// cpu, cuda or cuda:N.
    #[arg(long, help_heading = "Device and speed")]
    pub device: Option<String>,
    /// Batches prepared ahead by the store loader.
    #[arg(long, help_heading = "Device and speed")]
    pub dataloader_num_workers: Option<usize>,
    /// No progress bar (for logs).
    #[arg(long, help_heading = "Logging")]
    pub no_progress: bool,
    /// Where TensorBoard event files go: a path relative to --output_dir, or absolute.
    #[arg(long, help_heading = "Logging")]
    pub logging_dir: Option<PathBuf>,
    /// tensorboard: event files with every metrics.jsonl scalar and the validation images under --logging_dir;
    /// none: metrics.jsonl only. (wandb and comet_ml import TensorBoard logs; they are not built in.)
    #[arg(long, help_heading = "Logging")]
    pub report_to: Option<String>,
    /// Let f32 matrix products use TF32 on CUDA GPUs (faster, ~1e-3 relative rounding); no effect on the CPU.
    #[arg(long, help_heading = "Device and speed")]
    pub allow_tf32: bool,
    /// Revision (branch, tag or commit) of a hub teacher.
    #[arg(long, help_heading = "Hub")]
    pub revision: Option<String>,
    /// Hugging Face cache folder for a hub teacher (default: HF_HUB_CACHE / HF_HOME, ~/.cache/huggingface/hub).
    #[arg(long, help_heading = "Hub")]
    pub cache_dir: Option<PathBuf>,
    /// AdamW (the only optimiser; the reference's default). Other names are refused.
    #[arg(long, help_heading = "Optimiser")]
    pub optimizer: Option<String>,
    /// Reference-script compatibility: checked against the store (the shard files the store must hold rows of;
    /// encoding itself is sprint-prep's job).
    #[arg(long, num_args = 1.., help_heading = REFERENCE_HEADING)]
    pub file_path: Vec<String>,
    /// Reference-script compatibility: accepted with --latents (the store records what was encoded).
    #[arg(long, help_heading = REFERENCE_HEADING)]
    pub dataset_name: Option<String>,
    /// Reference-script compatibility: must equal the store's resolution.
    #[arg(long, help_heading = REFERENCE_HEADING)]
    pub resolution: Option<u32>,
    /// Reference-script compatibility: must equal the store's max_sequence_length.
    #[arg(long, help_heading = REFERENCE_HEADING)]
    pub max_sequence_length: Option<usize>,
    /// Reference-script compatibility (torchrun's legacy flag): the LOCAL_RANK variable wins, as in the reference.
    #[arg(long, allow_hyphen_values = true, help_heading = REFERENCE_HEADING)]
    pub local_rank: Option<i64>,
    /// Reference flags sprint-train refuses (filled by parsing; see [`REFUSED`]).
    #[arg(skip)]
    #[serde(skip)]
    pub refused: Vec<&'static str>,
    /// Train the embedded tiny teacher on the demo store (run `sprint-prep --demo` first): a few CPU steps
    /// writing checkpoints, validation images and metrics to demo-output/train (a rerun resumes it). Flags
    /// passed explicitly keep their values.
    #[arg(long)]
    pub demo: bool,
}

/// The flags required unless `--demo`.
const REQUIRED: [&str; 2] = ["pretrained_model_name_or_path", "latents"];

/// `--help` heading of the reference script's flags that sprint-train accepts for compatibility.
const REFERENCE_HEADING: &str = "Flags of train_sana_sprint_diffusers.py";

/// `--help` heading of the reference script's flags that sprint-train refuses.
const REFUSED_HEADING: &str = "Flags of train_sana_sprint_diffusers.py that sprint-train refuses";

const ENCODING: &str = "encoding happens in sprint-prep: run `sprint-prep --pretrained_model_name_or_path TEACHER \
                        --file_path SHARDS... --output STORE` (it takes --image_column, --caption_column, \
                        --max_sequence_length and --resolution) and pass `--latents STORE`";
const NO_HUB: &str =
    "sprint-train does not upload: after training, run `hf upload HUB_MODEL_ID OUTPUT_DIR` \
                      (huggingface_hub's CLI)";
const NO_PRODIGY: &str =
    "Prodigy is not available: sprint-train uses AdamW (the reference's default); remove the flag";

/// The reference script's flags that sprint-train refuses: (flag, takes a value, what to do instead). Each is
/// accepted by the parser (so that a copied reference command gets this line, not a generic "unexpected
/// argument") and refused by [`TrainArgs::resolve`].
pub const REFUSED: &[(&str, bool, &str)] = &[
    ("image_column", true, ENCODING),
    ("caption_column", true, ENCODING),
    (
        "center_crop",
        false,
        "unused by the reference script (it always centre-crops, as sprint-prep does); remove the flag",
    ),
    (
        "random_flip",
        false,
        "unused by the reference script (it never flips); remove the flag",
    ),
    (
        "use_fix_crop_and_size",
        false,
        "unused by the reference script; remove the flag",
    ),
    (
        "repeats",
        true,
        "unused by the reference script; lengthen the run with --num_train_epochs or --max_train_steps",
    ),
    (
        "cache_latents",
        false,
        "latents are always cached here: that is the store sprint-prep writes; remove the flag",
    ),
    (
        "sample_batch_size",
        true,
        "unused by the reference script; remove the flag",
    ),
    (
        "validation_epochs",
        true,
        "validation runs every --validation_steps global steps (and at the end); one epoch is \
         ceil(rows / (train_batch_size x gradient_accumulation_steps)) global steps",
    ),
    (
        "ladd_multi_scale",
        false,
        "the reference only reads it when --head_block_ids is empty; choose the teacher blocks with \
         --head_block_ids",
    ),
    (
        "use_8bit_adam",
        false,
        "8-bit Adam (bitsandbytes) is not available: the optimiser state is f32 AdamW; remove the flag",
    ),
    ("prodigy_beta3", true, NO_PRODIGY),
    ("prodigy_decouple", true, NO_PRODIGY),
    ("prodigy_use_bias_correction", true, NO_PRODIGY),
    ("prodigy_safeguard_warmup", true, NO_PRODIGY),
    (
        "max_grad_norm",
        true,
        "the reference ignores it too: gradients are clipped to --gradient_clip (default 0.1)",
    ),
    ("push_to_hub", false, NO_HUB),
    ("hub_token", true, NO_HUB),
    ("hub_model_id", true, NO_HUB),
    (
        "offload",
        false,
        "not needed: training never holds the VAE or the text encoder (sprint-prep used them once; validation \
         loads only the VAE, or the text encoder when prompts are given here); remove the flag",
    ),
    (
        "enable_vae_tiling",
        false,
        "validation decodes whole images (no tiling); remove the flag",
    ),
    (
        "enable_npu_flash_attention",
        false,
        "NPUs are not supported (--device cpu, cuda or cuda:N)",
    ),
    (
        "variant",
        true,
        "sprint-train loads the teacher's default weight files (diffusion_pytorch_model.safetensors); \
         download the pipeline without --variant and remove the flag",
    ),
];

/// The library default of every tunable, as `--help` and the README show it (arg id, value).
fn tunables() -> Vec<(&'static str, String)> {
    let o = TrainOptions::new(
        PathBuf::new(),
        PathBuf::new(),
        PathBuf::from(DEFAULT_OUTPUT_DIR),
    );
    let s = &o.step;
    vec![
        ("output_dir", DEFAULT_OUTPUT_DIR.to_string()),
        ("train_batch_size", o.train_batch_size.to_string()),
        ("num_train_epochs", o.num_train_epochs.to_string()),
        (
            "gradient_accumulation_steps",
            o.gradient_accumulation_steps.to_string(),
        ),
        ("learning_rate", num(o.learning_rate)),
        ("lr_scheduler", value_name(&o.lr_scheduler)),
        ("lr_warmup_steps", o.lr_warmup_steps.to_string()),
        ("lr_num_cycles", o.lr_num_cycles.to_string()),
        ("lr_power", num(o.lr_power)),
        ("adam_beta1", num(o.adam.beta1)),
        ("adam_beta2", num(o.adam.beta2)),
        ("adam_weight_decay", num(o.adam.weight_decay)),
        ("adam_epsilon", num(o.adam.eps)),
        ("gradient_clip", num(o.gradient_clip)),
        (
            "max_consecutive_nan_skips",
            o.max_consecutive_nan_skips.to_string(),
        ),
        ("mixed_precision", value_name(&o.mixed_precision)),
        ("seed", o.seed.to_string()),
        ("logit_mean", num(s.student_sampler.mean)),
        ("logit_std", num(s.student_sampler.std)),
        ("logit_mean_discriminator", num(s.disc_sampler.mean)),
        ("logit_std_discriminator", num(s.disc_sampler.std)),
        (
            "head_block_ids",
            nums(
                &o.head_block_ids
                    .iter()
                    .map(|&b| b as u32)
                    .collect::<Vec<_>>(),
            ),
        ),
        ("adv_lambda", num(s.adv_lambda)),
        ("scm_lambda", num(s.scm_lambda)),
        ("sigma_data", num(s.sigma_data)),
        ("tangent_warmup_steps", s.tangent_warmup_steps.to_string()),
        ("guidance_embeds_scale", num(s.guidance_embeds_scale)),
        ("scm_cfg_scale", nums(&s.scm_cfg_scale)),
        ("largest_timestep", num(s.largest_timestep)),
        ("largest_timestep_prob", num(s.largest_timestep_prob)),
        ("checkpointing_steps", o.checkpointing_steps.to_string()),
        ("num_validation_images", o.num_validation_images.to_string()),
        ("validation_timesteps", nums(&o.validation_timesteps)),
        ("guidance_init", value_name(&o.guidance_init)),
        ("self_attention", value_name(&o.self_attention)),
        ("device", DEVICE_DEFAULT.to_string()),
        ("logging_dir", o.logging_dir.display().to_string()),
        ("report_to", o.report_to.name().to_string()),
        ("dataloader_num_workers", o.prefetch.to_string()),
    ]
}

/// The clap command, with each tunable's library default in its help, and the refused reference flags.
pub fn command() -> clap::Command {
    let mut cmd = super::with_defaults(TrainArgs::command(), &tunables());
    for &(name, takes_value, instead) in REFUSED {
        let arg = clap::Arg::new(name)
            .long(name)
            .help_heading(REFUSED_HEADING)
            .help(instead.split(':').next().unwrap_or(instead).to_string());
        cmd = cmd.arg(if takes_value {
            arg.num_args(0..)
                .allow_hyphen_values(true)
                .action(clap::ArgAction::Append)
        } else {
            arg.num_args(0..=1).action(clap::ArgAction::Append)
        });
    }
    cmd
}

/// Every long flag with the default `--help` shows (library values; `off`, `required`, `–` otherwise); the
/// refused reference flags are not among them (see [`REFUSED`]).
pub fn shown_defaults() -> Vec<(String, String)> {
    let cmd = command();
    let refused: Vec<&str> = REFUSED.iter().map(|(n, _, _)| *n).collect();
    super::defaults_of(&cmd, &tunables(), &REQUIRED)
        .into_iter()
        .filter(|(flag, _)| !refused.contains(&flag.as_str()))
        .collect()
}

impl super::CliArgs for TrainArgs {
    fn command() -> clap::Command {
        command()
    }

    fn try_parse_args<I, S>(args: I) -> std::result::Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let mut cmd = command();
        let matches = cmd.try_get_matches_from_mut(args)?;
        let mut parsed = Self::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
        parsed.refused = REFUSED
            .iter()
            .filter(|(name, _, _)| {
                matches.value_source(name) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|(name, _, _)| *name)
            .collect();
        Ok(parsed)
    }
}

impl TrainArgs {
    /// `--demo`: the settings of the demo run, for every flag the user did not pass.
    fn apply_demo(&mut self) {
        if !self.demo {
            return;
        }
        let d = datasets_dir();
        self.pretrained_model_name_or_path
            .get_or_insert_with(|| d.join("tiny-sana-sprint").display().to_string());
        self.latents
            .get_or_insert_with(|| PathBuf::from("demo-output/demo.lance"));
        self.output_dir
            .get_or_insert_with(|| PathBuf::from("demo-output/train"));
        self.max_train_steps.get_or_insert(6);
        self.resume_from_checkpoint
            .get_or_insert_with(|| "latest".into());
        self.checkpointing_steps.get_or_insert(2);
        if self.validation_prompt.is_empty() {
            self.validation_prompt =
                vec!["a tiny astronaut hatching from an egg on the moon".into()];
            self.num_validation_images.get_or_insert(2);
        }
        self.train_batch_size.get_or_insert(2);
        self.learning_rate.get_or_insert(1e-3);
        self.train_largest_timestep = true;
        self.misaligned_pairs_d = true;
    }

    /// The run's options without touching the hub: `--pretrained_model_name_or_path` is taken as a path.
    /// `--demo` settings and then the library defaults fill every tunable not passed; the filled flags are
    /// recorded in `config_json` (`train_config.json`).
    pub fn resolve(mut self) -> Result<TrainOptions> {
        if let Some(name) = self.refused.first() {
            let (_, _, instead) = REFUSED.iter().find(|(n, _, _)| n == name).expect("listed");
            return Err(Error::Arg(format!("--{name}: {instead}")));
        }
        self.apply_demo();
        let a = &mut self;
        if let Some(o) = a
            .optimizer
            .as_deref()
            .filter(|o| !o.eq_ignore_ascii_case("adamw"))
        {
            return Err(Error::Arg(format!(
                "--optimizer {o}: sprint-train trains with AdamW (the reference's default) only"
            )));
        }
        let report_to = match a.report_to.as_deref().unwrap_or("tensorboard") {
            "tensorboard" => ReportTo::Tensorboard,
            "none" => ReportTo::None,
            other => {
                return Err(Error::Arg(format!(
                    "--report_to {other}: sprint-train writes TensorBoard event files (--report_to tensorboard, \
                     the default) and metrics.jsonl; wandb and comet_ml can import TensorBoard logs \
                     (e.g. `wandb sync --sync-tensorboard OUTPUT_DIR/logs`). Use tensorboard or none"
                )))
            }
        };
        a.report_to = Some(report_to.name().into());
        let teacher = a.pretrained_model_name_or_path.clone().ok_or_else(|| {
            Error::Arg("--pretrained_model_name_or_path is required (or --demo)".into())
        })?;
        let latents = match a.latents.clone() {
            Some(latents) => latents,
            None if !a.file_path.is_empty() || a.dataset_name.is_some() => {
                return Err(Error::Arg(format!(
                    "--file_path/--dataset_name without --latents: {ENCODING}"
                )))
            }
            None => {
                return Err(Error::Arg(format!(
                    "--latents STORE is required: {ENCODING}"
                )))
            }
        };
        let output_dir = fill(&mut a.output_dir, &PathBuf::from(DEFAULT_OUTPUT_DIR));
        let mut o = TrainOptions::new(PathBuf::from(teacher), latents, output_dir);
        o.train_batch_size = fill(&mut a.train_batch_size, &o.train_batch_size);
        o.num_train_epochs = fill(&mut a.num_train_epochs, &o.num_train_epochs);
        o.max_train_steps = a.max_train_steps;
        o.gradient_accumulation_steps = fill(
            &mut a.gradient_accumulation_steps,
            &o.gradient_accumulation_steps,
        );
        o.gradient_checkpointing = a.gradient_checkpointing;
        o.learning_rate = fill(&mut a.learning_rate, &o.learning_rate);
        o.scale_lr = a.scale_lr;
        o.lr_scheduler = fill(&mut a.lr_scheduler, &o.lr_scheduler);
        o.lr_warmup_steps = fill(&mut a.lr_warmup_steps, &o.lr_warmup_steps);
        o.lr_num_cycles = fill(&mut a.lr_num_cycles, &o.lr_num_cycles);
        o.lr_power = fill(&mut a.lr_power, &o.lr_power);
        o.adam.beta1 = fill(&mut a.adam_beta1, &o.adam.beta1);
        o.adam.beta2 = fill(&mut a.adam_beta2, &o.adam.beta2);
        o.adam.weight_decay = fill(&mut a.adam_weight_decay, &o.adam.weight_decay);
        o.adam.eps = fill(&mut a.adam_epsilon, &o.adam.eps);
        o.gradient_clip = fill(&mut a.gradient_clip, &o.gradient_clip);
        o.max_consecutive_nan_skips = fill(
            &mut a.max_consecutive_nan_skips,
            &o.max_consecutive_nan_skips,
        );
        o.mixed_precision = fill(&mut a.mixed_precision, &o.mixed_precision);
        o.seed = fill(&mut a.seed, &o.seed);
        let s = &mut o.step;
        s.student_sampler.mean = fill(&mut a.logit_mean, &s.student_sampler.mean);
        s.student_sampler.std = fill(&mut a.logit_std, &s.student_sampler.std);
        s.disc_sampler.mean = fill(&mut a.logit_mean_discriminator, &s.disc_sampler.mean);
        s.disc_sampler.std = fill(&mut a.logit_std_discriminator, &s.disc_sampler.std);
        s.adv_lambda = fill(&mut a.adv_lambda, &s.adv_lambda);
        s.scm_lambda = fill(&mut a.scm_lambda, &s.scm_lambda);
        s.sigma_data = fill(&mut a.sigma_data, &s.sigma_data);
        s.tangent_warmup_steps = fill(&mut a.tangent_warmup_steps, &s.tangent_warmup_steps);
        s.guidance_embeds_scale = fill(&mut a.guidance_embeds_scale, &s.guidance_embeds_scale);
        s.scm_cfg_scale = fill(&mut a.scm_cfg_scale, &s.scm_cfg_scale);
        s.train_largest_timestep = a.train_largest_timestep;
        s.largest_timestep = fill(&mut a.largest_timestep, &s.largest_timestep);
        s.largest_timestep_prob = fill(&mut a.largest_timestep_prob, &s.largest_timestep_prob);
        s.misaligned_pairs_d = a.misaligned_pairs_d;
        o.head_block_ids = fill(&mut a.head_block_ids, &o.head_block_ids);
        o.guidance_init = fill(&mut a.guidance_init, &o.guidance_init);
        o.self_attention = fill(&mut a.self_attention, &o.self_attention);
        o.checkpointing_steps = fill(&mut a.checkpointing_steps, &o.checkpointing_steps);
        o.checkpoints_total_limit = a.checkpoints_total_limit;
        o.resume_from_checkpoint = a.resume_from_checkpoint.clone();
        o.validation_prompts = a.validation_prompt.clone();
        o.num_validation_images = fill(&mut a.num_validation_images, &o.num_validation_images);
        o.validation_steps = a.validation_steps;
        o.validation_timesteps = fill(&mut a.validation_timesteps, &o.validation_timesteps);
        o.validation_resolutions = a.validation_resolution.clone();
        o.upcast_before_saving = a.upcast_before_saving;
        o.allow_store_mismatch = a.allow_store_mismatch;
        o.report_to = report_to;
        o.logging_dir = fill(&mut a.logging_dir, &o.logging_dir);
        o.allow_tf32 = a.allow_tf32;
        o.expect_store = crate::train::options::StoreExpectations {
            resolution: a.resolution,
            max_sequence_length: a.max_sequence_length,
            shards: a
                .file_path
                .iter()
                .map(|f| {
                    std::path::Path::new(f)
                        .file_name()
                        .map_or_else(|| f.clone(), |n| n.to_string_lossy().into_owned())
                })
                .collect(),
        };
        o.profile = a.profile;
        o.dist = crate::dist::LaunchEnv::from_env()?;
        let device = fill(&mut a.device, &device::default_device().to_string());
        // under torchrun / Slurm, `cuda` is this node's GPU of the process's local rank
        let device = match (&o.dist, device.as_str()) {
            (Some(env), "cuda") => format!("cuda:{}", env.local_rank),
            _ => device,
        };
        o.device = device::parse_device(&device)?;
        o.prefetch = fill(&mut a.dataloader_num_workers, &o.prefetch).max(1);
        o.progress = !a.no_progress;
        o.config_json = serde_json::to_value(&self).expect("the flags serialise");
        Ok(o)
    }

    /// [`TrainArgs::resolve`], with the teacher looked up locally, in the HF cache or on the hub.
    pub fn options(self) -> Result<TrainOptions> {
        let mut hubc = HubConfig::from_env();
        if let Some(revision) = &self.revision {
            hubc.revision = revision.clone();
        }
        if let Some(cache) = &self.cache_dir {
            hubc.cache_dir = cache.clone();
        }
        let mut o = self.resolve()?;
        let name = o.pretrained_model_name_or_path.display().to_string();
        o.pretrained_model_name_or_path = hub::resolve_model(&name, &["transformer"], &hubc)?.root;
        Ok(o)
    }
}

/// `HxW` (or `N` for a square) in pixels.
fn parse_hw(s: &str) -> std::result::Result<(usize, usize), String> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{s:?} is not HxW (e.g. 1024x576) or a single positive size"))
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => parse(s).map(|n| (n, n)),
    }
}
