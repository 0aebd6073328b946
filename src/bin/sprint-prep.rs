//! sprint-prep: parquet shards of image/caption pairs -> a Lance latent store (DC-AE latents + Gemma-2 prompt
//! embeddings, exactly as diffusers' training script computes them).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use sana_sprint::device::{self, MixedPrecision};
use sana_sprint::hub::HubConfig;
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::store::{self, FloatEncoding, StoreDType};

#[derive(Parser, Debug)]
#[command(name = "sprint-prep", version, rename_all = "snake_case", about, long_about = None)]
struct Args {
    /// Diffusers pipeline folder (vae/, text_encoder/, tokenizer/) or a hub id (HF cache first; downloaded only
    /// when HF_HUB_OFFLINE is not set).
    #[arg(long, required_unless_present_any = ["demo", "inspect"])]
    pretrained_model_name_or_path: Option<String>,
    /// Hub dataset that relative --file_path entries belong to (e.g. brivangl/midjourney-v6-llava).
    #[arg(long)]
    dataset_name: Option<String>,
    /// Parquet shards; glob patterns allowed (data/train_00*.parquet). Local paths first, then --dataset_name.
    #[arg(long, num_args = 1.., required_unless_present_any = ["demo", "inspect"])]
    file_path: Vec<String>,
    /// Output Lance dataset (conventionally *.lance). Rerunning resumes; new shards append only new rows.
    #[arg(long, required_unless_present_any = ["demo", "inspect"])]
    output: Option<PathBuf>,
    /// Square training resolution (shorter side resized to it, then centre-cropped).
    #[arg(long, default_value_t = 512)]
    resolution: u32,
    /// Images encoded per device batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value = "image")]
    image_column: String,
    #[arg(long, default_value = "llava")]
    caption_column: String,
    /// `bf16` runs Gemma-2 in bf16 like the reference script; `no` runs it in f32. The VAE always runs in f32.
    #[arg(long, value_enum, default_value_t = MixedPrecision::Bf16)]
    mixed_precision: MixedPrecision,
    /// cpu, cuda or cuda:N (cuda by default in CUDA builds).
    #[arg(long, default_value = device::default_device())]
    device: String,
    #[arg(long, default_value_t = 300)]
    max_sequence_length: usize,
    /// Encode captions without the complex human instruction (the reference always uses it).
    #[arg(long)]
    no_complex_human_instruction: bool,
    #[arg(long, value_enum, default_value_t = StoreDType::Float32)]
    latent_dtype: StoreDType,
    #[arg(long, value_enum, default_value_t = StoreDType::Float16)]
    embed_dtype: StoreDType,
    /// Replace an existing store written with other settings (a new Lance version; old versions stay readable).
    #[arg(long)]
    overwrite: bool,
    /// Where to write the JSON run report (default: <output stem>.report.json next to the store).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Image-decoding threads (default: all cores).
    #[arg(long)]
    num_workers: Option<usize>,
    /// Rows per Lance commit: a killed run loses at most this many encoded rows (they are redone on rerun).
    #[arg(long, default_value_t = 1024)]
    commit_every: usize,
    /// zstd level of the float columns (0: no compression).
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Store floats without byte-stream split.
    #[arg(long)]
    no_byte_stream_split: bool,
    /// No progress bar (for logs).
    #[arg(long)]
    no_progress: bool,
    /// Run on the embedded tiny model and demo shards (datasets/), writing demo-output/demo.lance.
    #[arg(long)]
    demo: bool,
    /// Print a store's rows, settings, model fingerprints, bytes per sample and bad rows, then exit.
    #[arg(long, value_name = "STORE")]
    inspect: Option<PathBuf>,
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

fn options(a: Args) -> PrepOptions {
    let mut o = PrepOptions {
        resolution: a.resolution,
        batch_size: a.batch_size,
        image_column: a.image_column,
        caption_column: a.caption_column,
        mixed_precision: a.mixed_precision,
        device: a.device,
        max_sequence_length: a.max_sequence_length,
        complex_human_instruction: !a.no_complex_human_instruction,
        latent_dtype: a.latent_dtype,
        embed_dtype: a.embed_dtype,
        overwrite: a.overwrite,
        report: a.report,
        commit_every: a.commit_every,
        encoding: FloatEncoding {
            zstd_level: (a.zstd_level > 0).then_some(a.zstd_level),
            byte_stream_split: !a.no_byte_stream_split,
        },
        progress: !a.no_progress,
        dataset_name: a.dataset_name,
        file_path: a.file_path,
        ..PrepOptions::default()
    };
    if let Some(n) = a.num_workers {
        o.num_workers = n;
    }
    if a.demo {
        let d = datasets_dir();
        o.pretrained_model_name_or_path = a
            .pretrained_model_name_or_path
            .unwrap_or_else(|| d.join("tiny-sana-sprint").display().to_string());
        if o.file_path.is_empty() {
            o.file_path = vec![d.join("demo/train_*.parquet").display().to_string()];
        }
        o.output = a
            .output
            .unwrap_or_else(|| PathBuf::from("demo-output/demo.lance"));
        if a.resolution == 512 {
            o.resolution = 128;
        }
    } else {
        o.pretrained_model_name_or_path = a.pretrained_model_name_or_path.unwrap_or_default();
        o.output = a.output.unwrap_or_default();
    }
    o
}

fn inspect(path: &Path, report: Option<&Path>) -> sana_sprint::Result<()> {
    let st = store::LatentStore::open(path)?;
    let s = store::describe(&st)?;
    let c = st.config();
    let get = |k: &str| {
        s.get(k)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!("store            {}", path.display());
    println!("rows             {}", get("rows"));
    println!(
        "lance            version {}, {} fragment(s), {} bytes on disk",
        get("lance_version"),
        get("fragments"),
        get("disk_bytes")
    );
    println!(
        "bytes/sample     {} (raw f16: {}, ratio {})",
        get("bytes_per_sample"),
        get("raw_f16_bytes_per_sample"),
        get("ratio_to_raw_f16")
    );
    println!(
        "resolution       {} -> latent {:?} ({}), vae_scaling_factor {}",
        c.resolution,
        c.latent_shape,
        c.latent_dtype.name(),
        c.vae_scaling_factor
    );
    println!(
        "prompts          max_sequence_length {}, D {}, {} (mean prompt_len {}), instruction: {}",
        c.max_sequence_length,
        c.text_hidden_size,
        c.embed_dtype.name(),
        get("mean_prompt_len"),
        c.complex_human_instruction
            .as_ref()
            .map(|l| format!("{} lines", l.len()))
            .unwrap_or_else(|| "none".into())
    );
    println!("negative prompt  {} token(s)", c.negative_prompt_len);
    println!(
        "preprocess       mixed_precision {}; {}; {}",
        c.preprocess.mixed_precision, c.preprocess.resize, c.preprocess.crop
    );
    for (name, m) in [
        ("vae", &c.models.vae),
        ("text_encoder", &c.models.text_encoder),
        ("tokenizer", &c.models.tokenizer),
    ] {
        println!("{name:<16} {} {}", m.fingerprint, m.origin);
    }
    println!(
        "format_version   {}, written by {}",
        c.format_version, c.writer
    );
    let report_path = report
        .map(Path::to_path_buf)
        .unwrap_or_else(|| prep::default_report_path(path));
    match prep::report::PrepReport::read(&report_path) {
        Ok(r) => {
            println!(
                "bad rows         {} in the last run {:?} ({})",
                r.bad_rows.len(),
                r.bad_rows_by_reason,
                report_path.display()
            );
            for b in &r.bad_rows {
                println!(
                    "    {}: {}{}",
                    b.id,
                    b.reason,
                    if b.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", b.detail)
                    }
                );
            }
        }
        Err(_) => println!(
            "bad rows         no run report at {}",
            report_path.display()
        ),
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = if let Some(store) = args.inspect.clone() {
        inspect(&store, args.report.as_deref())
    } else {
        let opts = options(args);
        if let Some(parent) = opts.output.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Err(e) = std::fs::create_dir_all(parent) {
                eprintln!("error: cannot create {}: {e}", parent.display());
                return ExitCode::from(2);
            }
        }
        prep::run(&opts, &HubConfig::from_env()).map(|report| {
            let path = opts
                .report
                .clone()
                .unwrap_or_else(|| prep::default_report_path(&opts.output));
            println!("{}", report.summary(&path));
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
