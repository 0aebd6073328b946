//! `sprint-prep`'s flags; every default is [`PrepOptions::default`]'s.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

use super::{datasets_dir, value_name, DEVICE_DEFAULT};
use crate::device::MixedPrecision;
use crate::prep::PrepOptions;
use crate::store::StoreDType;

/// The flags as given; tunables are `None` when not passed and [`PrepArgs::options`] fills them from
/// [`PrepOptions::default`].
#[derive(Parser, Debug, Clone)]
#[command(name = "sprint-prep", version, rename_all = "snake_case", about, long_about = None)]
pub struct PrepArgs {
    /// Diffusers pipeline folder (vae/, text_encoder/, tokenizer/) or a hub id (HF cache first; downloaded only
    /// when HF_HUB_OFFLINE is not set).
    #[arg(long, required_unless_present_any = ["demo", "inspect", "dedupe", "compact", "verify"], help_heading = "Input and model")]
    pub pretrained_model_name_or_path: Option<String>,
    /// Hub dataset that relative --file_path entries belong to (e.g. brivangl/midjourney-v6-llava).
    #[arg(long, help_heading = "Input and model")]
    pub dataset_name: Option<String>,
    /// Parquet shards; glob patterns allowed (data/train_00*.parquet). Local paths first, then --dataset_name.
    #[arg(long, num_args = 1.., required_unless_present_any = ["demo", "inspect", "dedupe", "compact", "verify"], help_heading = "Input and model")]
    pub file_path: Vec<String>,
    /// Output Lance dataset (conventionally *.lance). Rerunning resumes; new shards append only new rows.
    #[arg(long, required_unless_present_any = ["demo", "inspect", "dedupe", "compact", "verify"], help_heading = "Store")]
    pub output: Option<PathBuf>,
    /// Square training resolution (shorter side resized to it, then centre-cropped).
    #[arg(long, help_heading = "Encoding")]
    pub resolution: Option<u32>,
    /// Images encoded per device batch.
    #[arg(long, help_heading = "Encoding")]
    pub batch_size: Option<usize>,
    #[arg(long, help_heading = "Input and model")]
    pub image_column: Option<String>,
    #[arg(long, help_heading = "Input and model")]
    pub caption_column: Option<String>,
    /// `bf16` runs Gemma-2 in bf16 like the reference script; `no` runs it in f32. The VAE always runs in f32.
    #[arg(long, value_enum, help_heading = "Encoding")]
    pub mixed_precision: Option<MixedPrecision>,
    /// cpu, cuda or cuda:N.
    #[arg(long, help_heading = "Device and speed")]
    pub device: Option<String>,
    #[arg(long, help_heading = "Encoding")]
    pub max_sequence_length: Option<usize>,
    /// Encode captions without the complex human instruction (the reference always uses it).
    #[arg(long, help_heading = "Encoding")]
    pub no_complex_human_instruction: bool,
    #[arg(long, value_enum, help_heading = "Store")]
    pub latent_dtype: Option<StoreDType>,
    #[arg(long, value_enum, help_heading = "Store")]
    pub embed_dtype: Option<StoreDType>,
    /// Replace an existing store written with other settings (a new Lance version; old versions stay readable).
    #[arg(long, help_heading = "Store")]
    pub overwrite: bool,
    /// Where to write the JSON run report.
    #[arg(long, help_heading = "Store")]
    pub report: Option<PathBuf>,
    /// Image-decoding threads.
    #[arg(long, help_heading = "Device and speed")]
    pub num_workers: Option<usize>,
    /// Images declaring more pixels are skipped as `image too large`, from their header (PIL's
    /// DecompressionBombError limit by default).
    #[arg(long, help_heading = "Input and model")]
    pub max_image_pixels: Option<u64>,
    /// MiB of decoded images the decode threads may hold at once (a larger image decodes alone).
    #[arg(long, help_heading = "Device and speed")]
    pub decode_memory_mib: Option<u64>,
    /// Rows per Lance commit: a killed run loses at most this many encoded rows (they are redone on rerun).
    #[arg(long, help_heading = "Store")]
    pub commit_every: Option<usize>,
    /// zstd level of the float columns (0: no compression).
    #[arg(long, help_heading = "Store")]
    pub zstd_level: Option<i32>,
    /// Store floats without byte-stream split.
    #[arg(long, help_heading = "Store")]
    pub no_byte_stream_split: bool,
    /// No progress bar (for logs).
    #[arg(long, help_heading = "Device and speed")]
    pub no_progress: bool,
    /// Run on the embedded tiny model and demo shards (datasets/) at 128 px, writing demo-output/demo.lance.
    /// Flags passed explicitly keep their values.
    #[arg(long)]
    pub demo: bool,
    /// Print a store's rows, settings, model fingerprints, bytes per sample and bad rows, then exit.
    #[arg(
        long,
        value_name = "STORE",
        help_heading = "Store maintenance (then exit)"
    )]
    pub inspect: Option<PathBuf>,
    /// This worker's index among --worker_count workers (0-based; default: RANK or SLURM_PROCID when a
    /// launcher set them, else a single worker).
    #[arg(long, requires = "worker_count", help_heading = "Several workers")]
    pub worker_index: Option<usize>,
    /// How many workers share the input (each takes every N-th part; default: WORLD_SIZE or SLURM_NTASKS).
    #[arg(long, requires = "worker_index", help_heading = "Several workers")]
    pub worker_count: Option<usize>,
    /// Rows per part: the unit of work handed to workers and protected by a lease.
    #[arg(long, help_heading = "Several workers")]
    pub part_rows: Option<usize>,
    /// Seconds a part's lease lasts without renewal (renewed every third of it); a dead worker's parts are
    /// taken over after this.
    #[arg(long, help_heading = "Several workers")]
    pub lease_seconds: Option<f64>,
    /// Store the rows of a file whose name the store knows with other content as <name>@<hash8>#<row>
    /// (default: refuse it).
    #[arg(long, help_heading = "Store")]
    pub distinct_shard_ids: bool,
    /// Aspect-ratio buckets (SANA's multi-scale training): each image is resized to cover the nearest bucket of
    /// the --resolution table (512, 1024 or 2048) and centre-cropped to it, instead of a square crop.
    #[arg(long, help_heading = "Encoding")]
    pub multi_scale: bool,
    /// Validation prompts to encode into the store (as sprint-train's validation encodes them), so that
    /// sprint-train draws validation grids without loading the text encoder; replaces the stored ones.
    #[arg(long, num_args = 1.., help_heading = "Encoding")]
    pub validation_prompt: Vec<String>,
    /// Refuse unreadable input files before anything is written, and fail on a corrupt page (default: skip
    /// them, list them in the report, and leave their rows to a rerun).
    #[arg(long, help_heading = "Input and model")]
    pub strict: bool,
    /// Remove extra copies of ids stored more than once (keeping the first), then exit.
    #[arg(long, value_name = "STORE", conflicts_with_all = ["inspect", "compact"], help_heading = "Store maintenance (then exit)")]
    pub dedupe: Option<PathBuf>,
    /// Compact the store's fragments and drop old versions (every row and the row order kept), then exit.
    #[arg(
        long,
        value_name = "STORE",
        conflicts_with = "inspect",
        help_heading = "Store maintenance (then exit)"
    )]
    pub compact: Option<PathBuf>,
    /// Read every row of a store and check it (files, shapes, prompt lengths, finite values, unique ids); print
    /// the bad rows by reason and the damaged files, exit non-zero when anything is bad. Changes nothing.
    #[arg(long, value_name = "STORE", conflicts_with_all = ["inspect", "dedupe", "compact"], help_heading = "Store maintenance (then exit)")]
    pub verify: Option<PathBuf>,
}

/// The flags required unless `--demo` or `--inspect`.
const REQUIRED: [&str; 3] = ["pretrained_model_name_or_path", "file_path", "output"];

/// The library default of every tunable, as `--help` and the README show it (arg id, value).
fn tunables() -> Vec<(&'static str, String)> {
    let o = PrepOptions::default();
    vec![
        ("resolution", o.resolution.to_string()),
        ("batch_size", o.batch_size.to_string()),
        ("image_column", o.image_column.clone()),
        ("caption_column", o.caption_column.clone()),
        ("mixed_precision", value_name(&o.mixed_precision)),
        ("device", DEVICE_DEFAULT.to_string()),
        ("max_sequence_length", o.max_sequence_length.to_string()),
        ("latent_dtype", value_name(&o.latent_dtype)),
        ("embed_dtype", value_name(&o.embed_dtype)),
        ("report", "next to the store".to_string()),
        ("num_workers", "all cores".to_string()),
        ("max_image_pixels", o.max_image_pixels.to_string()),
        ("decode_memory_mib", o.decode_memory_mib.to_string()),
        ("commit_every", o.commit_every.to_string()),
        ("worker_index", "launcher or 0".to_string()),
        ("worker_count", "launcher or 1".to_string()),
        ("part_rows", o.part_rows.to_string()),
        ("lease_seconds", o.lease_seconds.to_string()),
        ("zstd_level", o.encoding.zstd_level.unwrap_or(0).to_string()),
    ]
}

/// The clap command, with each tunable's library default in its help.
pub fn command() -> clap::Command {
    super::with_defaults(PrepArgs::command(), &tunables())
}

/// Every long flag with the default `--help` shows (library values; `off`, `required`, `–` otherwise).
pub fn shown_defaults() -> Vec<(String, String)> {
    super::defaults_of(&command(), &tunables(), &REQUIRED)
}

/// Replaces `dst` with the user's value, if any.
fn set<T>(dst: &mut T, given: Option<T>) {
    if let Some(v) = given {
        *dst = v;
    }
}

impl super::CliArgs for PrepArgs {
    fn command() -> clap::Command {
        command()
    }
}

impl PrepArgs {
    /// `--demo`: the settings of the demo run, for every flag the user did not pass.
    fn apply_demo(&mut self) {
        if !self.demo {
            return;
        }
        let d = datasets_dir();
        self.pretrained_model_name_or_path
            .get_or_insert_with(|| d.join("tiny-sana-sprint").display().to_string());
        if self.file_path.is_empty() {
            self.file_path = vec![d.join("demo/train_*.parquet").display().to_string()];
        }
        self.output
            .get_or_insert_with(|| PathBuf::from("demo-output/demo.lance"));
        self.resolution.get_or_insert(128);
    }

    /// The run's options: `--demo` settings, then [`PrepOptions::default`] for every flag not passed.
    pub fn options(mut self) -> PrepOptions {
        self.apply_demo();
        let a = self;
        let mut o = PrepOptions::default();
        set(
            &mut o.pretrained_model_name_or_path,
            a.pretrained_model_name_or_path,
        );
        o.dataset_name = a.dataset_name;
        o.file_path = a.file_path;
        set(&mut o.output, a.output);
        set(&mut o.resolution, a.resolution);
        set(&mut o.batch_size, a.batch_size);
        set(&mut o.image_column, a.image_column);
        set(&mut o.caption_column, a.caption_column);
        set(&mut o.mixed_precision, a.mixed_precision);
        set(&mut o.device, a.device);
        set(&mut o.max_sequence_length, a.max_sequence_length);
        o.complex_human_instruction &= !a.no_complex_human_instruction;
        set(&mut o.latent_dtype, a.latent_dtype);
        set(&mut o.embed_dtype, a.embed_dtype);
        o.overwrite |= a.overwrite;
        o.report = a.report;
        set(&mut o.num_workers, a.num_workers);
        set(&mut o.max_image_pixels, a.max_image_pixels);
        set(&mut o.decode_memory_mib, a.decode_memory_mib);
        set(&mut o.commit_every, a.commit_every);
        if let Some(level) = a.zstd_level {
            o.encoding.zstd_level = (level > 0).then_some(level);
        }
        o.encoding.byte_stream_split &= !a.no_byte_stream_split;
        o.progress &= !a.no_progress;
        o.worker_index = a.worker_index;
        o.worker_count = a.worker_count;
        set(&mut o.part_rows, a.part_rows);
        set(&mut o.lease_seconds, a.lease_seconds);
        o.distinct_shard_ids |= a.distinct_shard_ids;
        o.multi_scale |= a.multi_scale;
        o.validation_prompts = a.validation_prompt.clone();
        o.strict |= a.strict;
        o
    }
}
