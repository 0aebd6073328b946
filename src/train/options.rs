//! `TrainOptions`: everything a sprint-train run needs, with the defaults of the reference script.

use std::path::PathBuf;

use candle_core::{DType, Device};

use crate::device::MixedPrecision;
use crate::models::sana::SelfAttention;
use crate::models::student::GuidanceInit;
use crate::train::optim::{AdamWConfig, LrScheduleKind};
use crate::train::step::{self, StepSettings};
use crate::{Error, Result};

/// `--output_dir` when none is given.
pub const DEFAULT_OUTPUT_DIR: &str = "sana-sprint-output";

/// Everything a run needs (the `sprint-train` flags, resolved).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Teacher pipeline folder (`transformer/`, and `vae/` + `text_encoder/` + `tokenizer/` for validation).
    pub pretrained_model_name_or_path: PathBuf,
    pub latents: PathBuf,
    pub output_dir: PathBuf,
    pub train_batch_size: usize,
    pub num_train_epochs: u64,
    pub max_train_steps: Option<u64>,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub scale_lr: bool,
    pub lr_scheduler: LrScheduleKind,
    pub lr_warmup_steps: u64,
    pub lr_num_cycles: u64,
    pub lr_power: f64,
    pub adam: AdamWConfig,
    pub gradient_clip: f64,
    /// Steps in a row with a non-finite gradient norm after which the run stops as diverged (each is skipped
    /// without updating the weights).
    pub max_consecutive_nan_skips: u64,
    pub mixed_precision: MixedPrecision,
    pub seed: u64,
    pub step: StepSettings,
    pub head_block_ids: Vec<usize>,
    pub guidance_init: GuidanceInit,
    pub self_attention: SelfAttention,
    pub gradient_checkpointing: bool,
    pub checkpointing_steps: u64,
    pub checkpoints_total_limit: Option<usize>,
    pub resume_from_checkpoint: Option<String>,
    pub validation_prompts: Vec<String>,
    pub num_validation_images: usize,
    /// Validate every this many global steps (and at the end).
    pub validation_steps: Option<u64>,
    pub validation_timesteps: Vec<f64>,
    /// Validation image sizes `(height, width)` in pixels, one grid each; empty: the store's square resolution.
    pub validation_resolutions: Vec<(usize, usize)>,
    pub upcast_before_saving: bool,
    pub allow_store_mismatch: bool,
    /// Where metrics go besides `metrics.jsonl`.
    pub report_to: ReportTo,
    /// TensorBoard's folder: relative to `output_dir`, or absolute.
    pub logging_dir: PathBuf,
    /// f32 matrix products may use TF32 on CUDA.
    pub allow_tf32: bool,
    /// What the reference-script flags `--resolution`, `--max_sequence_length`, `--file_path` say the store
    /// must hold (checked at start).
    pub expect_store: StoreExpectations,
    pub device: Device,
    pub prefetch: usize,
    pub progress: bool,
    /// Time each stage of every step with device-synchronised timers and write them to `metrics.jsonl`
    /// (`"stages"`, seconds); see [`crate::train::profile`].
    pub profile: bool,
    /// This process's place in a data-parallel run started by torchrun or Slurm (`None`: a single process).
    /// `--device cpu` ranks talk over the CPU ring collective ([`crate::dist::tcp::TcpRing`]).
    pub dist: Option<crate::dist::LaunchEnv>,
    /// The run's full configuration, written to `output_dir/train_config.json`.
    pub config_json: serde_json::Value,
    /// Test hook: batches (by consumption index) whose loss is replaced by NaN.
    #[doc(hidden)]
    pub inject_nan_batches: Vec<u64>,
    /// Test hook: stop right after this global step (and its checkpoint), as if the process were killed.
    #[doc(hidden)]
    pub kill_after_step: Option<u64>,
}

/// `--report_to`: TensorBoard event files (the reference's default), or nothing besides `metrics.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportTo {
    Tensorboard,
    None,
}

impl ReportTo {
    pub fn name(self) -> &'static str {
        match self {
            ReportTo::Tensorboard => "tensorboard",
            ReportTo::None => "none",
        }
    }
}

/// The store a command line copied from the reference script expects (`--resolution`,
/// `--max_sequence_length`, `--file_path`); empty: no expectation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreExpectations {
    pub resolution: Option<u32>,
    pub max_sequence_length: Option<usize>,
    /// Shard file names the store must hold rows of (row ids are `{shard file name}#{row}`).
    pub shards: Vec<String>,
}

impl TrainOptions {
    /// The TensorBoard folder of the run.
    pub fn tensorboard_dir(&self) -> PathBuf {
        self.output_dir.join(&self.logging_dir)
    }

    /// Defaults of the reference script for everything but the paths.
    pub fn new(teacher: PathBuf, latents: PathBuf, output_dir: PathBuf) -> Self {
        Self {
            pretrained_model_name_or_path: teacher,
            latents,
            output_dir,
            train_batch_size: 4,
            num_train_epochs: 1,
            max_train_steps: None,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-4,
            scale_lr: false,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 500,
            lr_num_cycles: 1,
            lr_power: 1.0,
            adam: AdamWConfig::default(),
            gradient_clip: 0.1,
            max_consecutive_nan_skips: 10,
            mixed_precision: MixedPrecision::No,
            seed: 0,
            step: StepSettings::default(),
            head_block_ids: crate::models::discriminator::DEFAULT_HEAD_BLOCK_IDS.to_vec(),
            guidance_init: GuidanceInit::Learnable,
            self_attention: SelfAttention::Linear,
            gradient_checkpointing: false,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            validation_prompts: Vec::new(),
            num_validation_images: 4,
            validation_resolutions: Vec::new(),
            validation_steps: None,
            validation_timesteps: vec![step::LARGEST_TIMESTEP, 1.3],
            upcast_before_saving: false,
            allow_store_mismatch: false,
            report_to: ReportTo::Tensorboard,
            logging_dir: PathBuf::from("logs"),
            allow_tf32: false,
            expect_store: StoreExpectations::default(),
            device: Device::Cpu,
            prefetch: 4,
            progress: false,
            profile: false,
            dist: None,
            config_json: serde_json::Value::Null,
            inject_nan_batches: Vec::new(),
            kill_after_step: None,
        }
    }

    pub fn compute_dtype(&self) -> DType {
        self.mixed_precision.dtype()
    }

    pub fn check(&self) -> Result<()> {
        let positive = [
            ("--train_batch_size", self.train_batch_size as u64),
            (
                "--gradient_accumulation_steps",
                self.gradient_accumulation_steps as u64,
            ),
            ("--checkpointing_steps", self.checkpointing_steps),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(Error::Arg(format!("{flag} must be at least 1")));
            }
        }
        if self.checkpoints_total_limit == Some(0) {
            return Err(Error::Arg(
                "--checkpoints_total_limit must be at least 1 (leave it out to keep every checkpoint)"
                    .into(),
            ));
        }
        if self.max_consecutive_nan_skips == 0 {
            return Err(Error::Arg(
                "--max_consecutive_nan_skips must be at least 1".into(),
            ));
        }
        // torch.optim.AdamW's own checks, in its words
        let a = &self.adam;
        let refused = [
            (
                !(self.learning_rate >= 0.0 && self.learning_rate.is_finite()),
                format!(
                    "Invalid learning rate: {:?} (--learning_rate)",
                    self.learning_rate
                ),
            ),
            (
                !(a.eps >= 0.0 && a.eps.is_finite()),
                format!("Invalid epsilon value: {:?} (--adam_epsilon)", a.eps),
            ),
            (
                !(0.0..1.0).contains(&a.beta1),
                format!(
                    "Invalid beta parameter at index 0: {:?} (--adam_beta1 must be in [0, 1))",
                    a.beta1
                ),
            ),
            (
                !(0.0..1.0).contains(&a.beta2),
                format!(
                    "Invalid beta parameter at index 1: {:?} (--adam_beta2 must be in [0, 1))",
                    a.beta2
                ),
            ),
            (
                !(a.weight_decay >= 0.0 && a.weight_decay.is_finite()),
                format!(
                    "Invalid weight_decay value: {:?} (--adam_weight_decay)",
                    a.weight_decay
                ),
            ),
        ];
        if let Some((_, msg)) = refused.into_iter().find(|(bad, _)| *bad) {
            return Err(Error::Arg(msg));
        }
        if self.gradient_clip.is_nan() || self.gradient_clip <= 0.0 {
            return Err(Error::Arg("--gradient_clip must be positive".into()));
        }
        if self.head_block_ids.is_empty() {
            return Err(Error::Arg(
                "--head_block_ids needs at least one block".into(),
            ));
        }
        Ok(())
    }
}
