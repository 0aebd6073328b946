//! sprint-sample: PNG images from a distilled SANA-Sprint student (an exported `transformer/`, a sprint-train
//! output folder or a `checkpoint-N/`) with the teacher pipeline folder's text encoder, tokenizer and VAE, as
//! diffusers' `SanaSprintPipeline` samples them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sana_sprint::device::{default_device, parse_device, MixedPrecision};
use sana_sprint::sample::{self, SampleOptions};

#[derive(Debug, Parser)]
#[command(name = "sprint-sample", version, rename_all = "snake_case", about, long_about = None)]
struct Args {
    /// The pipeline folder whose text_encoder/, tokenizer/ and vae/ are used (the teacher's, or a SANA-Sprint
    /// pipeline's).
    #[arg(long, required_unless_present = "demo")]
    pretrained_model_name_or_path: Option<PathBuf>,
    /// The student: an exported transformer/ folder, a sprint-train output folder, or a checkpoint-N folder.
    #[arg(long, required_unless_present = "demo")]
    student: Option<PathBuf>,
    /// A prompt (repeatable).
    #[arg(long)]
    prompt: Vec<String>,
    /// A text file with one prompt per line (blank lines skipped), after the --prompt ones.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    num_images_per_prompt: usize,
    /// Sampling steps, 1 to 4 (the pipeline's default is 2: TrigFlow times 1.5708, 1.3, 0).
    #[arg(long, default_value_t = 2)]
    num_inference_steps: usize,
    /// TrigFlow times instead of --num_inference_steps (e.g. 1.5708 1.0 0; a 0 is appended if missing).
    #[arg(long, num_args = 1..)]
    timesteps: Vec<f64>,
    /// Image height in pixels (a 1024 px student samples at the nearest size of the pipeline's 1024 bin table
    /// and the image is resized back, unless --no_resolution_binning).
    #[arg(long, default_value_t = 1024)]
    height: usize,
    #[arg(long, default_value_t = 1024)]
    width: usize,
    /// Sample exactly at --height x --width (multiples of the VAE's 32).
    #[arg(long)]
    no_resolution_binning: bool,
    /// The student's guidance input (the pipeline's default 4.5).
    #[arg(long, default_value_t = 4.5)]
    guidance_scale: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images sampled together.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// cpu, cuda, cuda:N (default: cuda when built with it).
    #[arg(long)]
    device: Option<String>,
    #[arg(long, value_enum, default_value_t = MixedPrecision::Bf16)]
    mixed_precision: MixedPrecision,
    #[arg(long, default_value = "samples")]
    output_dir: PathBuf,
    #[arg(long)]
    no_progress: bool,
    /// The embedded tiny pipeline and the student of `sprint-train --demo` (demo-output/train), 64x96 images
    /// into demo-output/samples.
    #[arg(long)]
    demo: bool,
}

fn options(mut a: Args) -> sana_sprint::Result<SampleOptions> {
    if a.demo {
        let d = sana_sprint::cli::datasets_dir();
        a.pretrained_model_name_or_path
            .get_or_insert_with(|| d.join("tiny-sana-sprint"));
        a.student
            .get_or_insert_with(|| PathBuf::from("demo-output/train"));
        if a.prompt.is_empty() && a.prompts_file.is_none() {
            a.prompt = vec!["a tiny astronaut hatching from an egg on the moon".into()];
        }
        if a.height == 1024 && a.width == 1024 {
            (a.height, a.width) = (64, 96);
        }
        if a.output_dir.as_os_str() == "samples" {
            a.output_dir = PathBuf::from("demo-output/samples");
        }
        if a.device.is_none() {
            a.device = Some("cpu".into());
        }
        // the tiny student is no 1024 px model: no binning table
        a.no_resolution_binning = true;
    }
    let mut prompts = a.prompt.clone();
    if let Some(file) = &a.prompts_file {
        let text = std::fs::read_to_string(file).map_err(|e| sana_sprint::Error::io(file, e))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    let timesteps = if a.timesteps.is_empty() {
        sample::timesteps_for(a.num_inference_steps)?
    } else {
        let mut t = a.timesteps.clone();
        if t.last() != Some(&0.0) {
            t.push(0.0);
        }
        t
    };
    let device = a.device.unwrap_or_else(|| default_device().to_string());
    Ok(SampleOptions {
        pipeline: a
            .pretrained_model_name_or_path
            .expect("required unless --demo"),
        student: a.student.expect("required unless --demo"),
        prompts,
        images_per_prompt: a.num_images_per_prompt,
        timesteps,
        height: a.height,
        width: a.width,
        guidance_scale: a.guidance_scale,
        seed: a.seed,
        batch_size: a.batch_size,
        device: parse_device(&device)?,
        mixed_precision: a.mixed_precision,
        output_dir: a.output_dir,
        resolution_binning: !a.no_resolution_binning,
        sigma_data: 0.5,
        progress: !a.no_progress,
    })
}

fn main() -> ExitCode {
    sana_sprint::cli::init_logging();
    let result = options(Args::parse()).and_then(|o| sample::run(&o));
    match result {
        Ok(paths) => {
            for p in &paths {
                sana_sprint::outln!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: {}",
                sana_sprint::store::verify::clean_message(&e.to_string())
            );
            ExitCode::from(2)
        }
    }
}
