//! `sprint-sample`: images from a distilled student, as diffusers' `SanaSprintPipeline` makes them.
//!
//! The student (an exported `transformer/` folder, a training output folder, or a `checkpoint-N/`) samples with
//! the SCM sampler ([`crate::train::validation::sample_scm`], the pipeline's `SCMScheduler` maths) from prompts
//! encoded by the teacher pipeline folder's Gemma-2 (complex human instruction, as the pipeline does), and the
//! folder's DC-AE decodes. With resolution binning (the pipeline's default) a 1024 px student (`sample_size`
//! 32) samples at the nearest size of diffusers' `ASPECT_RATIO_1024_BIN` and the decoded image is resized back
//! to the requested size (`PixArtImageProcessor.resize_and_crop_tensor`: bilinear, `align_corners=False`, then
//! a centre crop). Each PNG carries its prompt, seed and settings in text chunks.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::device::MixedPrecision;
use crate::error::{Error, Result};
use crate::models::sana::SanaConfig;
use crate::models::student::Student;
use crate::models::weights::Weights;
use crate::rng::SeededRng;
use crate::train::validation::{decode_pixels, encode_prompts, pixel_u8, sample_scm, ImageDecoder};

/// diffusers' `ASPECT_RATIO_1024_BIN` (pixart_alpha): (key h/w, height, width). Not the training table of
/// [`crate::buckets`]: 33 keys.
const BIN_1024: [(&str, usize, usize); 33] = [
    ("0.25", 512, 2048),
    ("0.28", 512, 1856),
    ("0.32", 576, 1792),
    ("0.33", 576, 1728),
    ("0.35", 576, 1664),
    ("0.4", 640, 1600),
    ("0.42", 640, 1536),
    ("0.48", 704, 1472),
    ("0.5", 704, 1408),
    ("0.52", 704, 1344),
    ("0.57", 768, 1344),
    ("0.6", 768, 1280),
    ("0.68", 832, 1216),
    ("0.72", 832, 1152),
    ("0.78", 896, 1152),
    ("0.82", 896, 1088),
    ("0.88", 960, 1088),
    ("0.94", 960, 1024),
    ("1.0", 1024, 1024),
    ("1.07", 1024, 960),
    ("1.13", 1088, 960),
    ("1.21", 1088, 896),
    ("1.29", 1152, 896),
    ("1.38", 1152, 832),
    ("1.46", 1216, 832),
    ("1.67", 1280, 768),
    ("1.75", 1344, 768),
    ("2.0", 1408, 704),
    ("2.09", 1472, 704),
    ("2.4", 1536, 640),
    ("2.5", 1600, 640),
    ("3.0", 1728, 576),
    ("4.0", 2048, 512),
];

/// `PixArtImageProcessor.classify_height_width_bin` over `ASPECT_RATIO_1024_BIN`: the `(height, width)` of the
/// first key minimising `|key - height / width|`.
pub fn classify_1024_bin(height: usize, width: usize) -> (usize, usize) {
    let keys = BIN_1024
        .iter()
        .map(|(key, _, _)| key.parse::<f64>().expect("table keys are numbers"));
    let (_, h, w) = BIN_1024[crate::buckets::nearest_key(keys, height as f64, width as f64)];
    (h, w)
}

/// torch's `F.interpolate(mode="bilinear", align_corners=False)` source index and weights of one axis
/// (`area_pixel_compute_source_index` with the scale `in / out`).
fn bilinear_axis(in_size: usize, out_size: usize) -> Vec<(usize, usize, f32)> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(in_size - 1);
            let i1 = (i0 + 1).min(in_size - 1);
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// `PixArtImageProcessor.resize_and_crop_tensor` on one CHW f32 image: when the size differs, bilinear resize
/// (`align_corners=False`) by the larger of the two ratios, then the centre crop `(new_height, new_width)` with
/// floor-halved margins.
pub fn resize_and_crop(
    chw: &[f32],
    (height, width): (usize, usize),
    (new_height, new_width): (usize, usize),
) -> Vec<f32> {
    let c = chw.len() / (height * width);
    if (height, width) == (new_height, new_width) {
        return chw.to_vec();
    }
    let ratio = (new_height as f64 / height as f64).max(new_width as f64 / width as f64);
    let (rw, rh) = (
        (width as f64 * ratio) as usize,
        (height as f64 * ratio) as usize,
    );
    let (ys, xs) = (bilinear_axis(height, rh), bilinear_axis(width, rw));
    let (x0, y0) = ((rw - new_width) / 2, (rh - new_height) / 2);
    let mut out = vec![0f32; c * new_height * new_width];
    for ch in 0..c {
        let plane = &chw[ch * height * width..][..height * width];
        for y in 0..new_height {
            let (a0, a1, ly) = ys[y + y0];
            for x in 0..new_width {
                let (b0, b1, lx) = xs[x + x0];
                let top = plane[a0 * width + b0] * (1.0 - lx) + plane[a0 * width + b1] * lx;
                let bottom = plane[a1 * width + b0] * (1.0 - lx) + plane[a1 * width + b1] * lx;
                out[(ch * new_height + y) * new_width + x] = top * (1.0 - ly) + bottom * ly;
            }
        }
    }
    out
}

/// Everything `sprint-sample` needs; its flags map onto it one to one.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// The teacher (or any SANA-Sprint) pipeline folder: `text_encoder/`, `tokenizer/`, `vae/`.
    pub pipeline: PathBuf,
    /// The student: a `transformer/` folder, or a folder holding one (a run's output, a `checkpoint-N/`).
    pub student: PathBuf,
    pub prompts: Vec<String>,
    pub images_per_prompt: usize,
    /// TrigFlow times of the SCM sampler, ending at 0.
    pub timesteps: Vec<f64>,
    pub height: usize,
    pub width: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    /// Images sampled together.
    pub batch_size: usize,
    pub device: Device,
    pub mixed_precision: MixedPrecision,
    pub output_dir: PathBuf,
    pub resolution_binning: bool,
    pub sigma_data: f64,
    pub progress: bool,
}

/// The pipeline's TrigFlow times for `steps` (1–4): its `SCMScheduler.set_timesteps` with the pipeline's
/// intermediate time 1.3 for 2 steps (`[1.5708, 1.3, 0]`), `linspace(1.5708, 0, steps + 1)` otherwise.
pub fn timesteps_for(steps: usize) -> Result<Vec<f64>> {
    if !(1..=4).contains(&steps) {
        return Err(Error::Arg(format!(
            "--num_inference_steps {steps}: SANA-Sprint samples in 1 to 4 steps (or pass --timesteps)"
        )));
    }
    use crate::train::validation::{scm_timesteps, MAX_TIMESTEP};
    scm_timesteps(steps, Some(MAX_TIMESTEP), (steps == 2).then_some(1.3), None)
}

/// The `transformer/` folder of `student` (itself, or its `transformer/` child) and the logvar file beside
/// it, if any.
fn student_files(student: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let dir = if student.join("config.json").is_file() {
        student.to_path_buf()
    } else {
        student.join("transformer")
    };
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    if !weights.is_file() {
        return Err(Error::Missing {
            what: "student weights".into(),
            path: weights,
            hint: "pass an exported transformer/ folder, a sprint-train output folder or a checkpoint-N folder"
                .into(),
        });
    }
    let mut files = vec![weights];
    for logvar in [
        dir.join(crate::train::checkpoint::LOGVAR_FILE),
        dir.parent()
            .map(|p| p.join(crate::train::checkpoint::LOGVAR_FILE))
            .unwrap_or_default(),
    ] {
        if logvar.is_file() {
            files.push(logvar);
            break;
        }
    }
    Ok((dir, files))
}

/// One PNG with text chunks (`prompt`, `seed`, `parameters`), written to a temporary name and renamed.
fn save_png(
    path: &Path,
    (w, h): (usize, usize),
    rgb: &[u8],
    text: &[(&str, String)],
) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        enc.add_itxt_chunk(k.to_string(), v.clone())
            .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))?;
    }
    let mut writer = enc
        .write_header()
        .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))?;
    writer
        .write_image_data(rgb)
        .and_then(|_| writer.finish())
        .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Samples every prompt's images and writes them as `output_dir/NNNN-PPP-III.png` (a running number, the
/// prompt's index, the image's index); returns the paths.
pub fn run(opts: &SampleOptions) -> Result<Vec<PathBuf>> {
    if opts.prompts.is_empty() {
        return Err(Error::Arg(
            "no prompts: pass --prompt (repeatable) or --prompts_file".into(),
        ));
    }
    if opts.images_per_prompt == 0 || opts.batch_size == 0 {
        return Err(Error::Arg(
            "--num_images_per_prompt and --batch_size must be at least 1".into(),
        ));
    }
    if opts.timesteps.len() < 2 || opts.timesteps.last() != Some(&0.0) {
        return Err(Error::Arg(format!(
            "--timesteps {:?}: at least two TrigFlow times, the last 0",
            opts.timesteps
        )));
    }
    let (student_dir, files) = student_files(&opts.student)?;
    let config = SanaConfig::from_folder(&student_dir)?;
    // the size sampled at: the pipeline's 1024 bin of the requested size, for 1024 px students
    let binned = opts.resolution_binning && config.sample_size == 32;
    if opts.resolution_binning && !binned {
        tracing::warn!(
            "resolution binning is for 1024 px students (sample_size 32, as SanaSprintPipeline); this one has \
             sample_size {}: sampling at the requested {}x{}",
            config.sample_size,
            opts.height,
            opts.width
        );
    }
    let (sh, sw) = if binned {
        classify_1024_bin(opts.height, opts.width)
    } else {
        (opts.height, opts.width)
    };
    let decoder = ImageDecoder::load(&opts.pipeline.join("vae"), DType::F32, &opts.device)?;
    let f = decoder.spatial_compression();
    if sh % f != 0 || sw % f != 0 || sh == 0 || sw == 0 {
        return Err(Error::Arg(format!(
            "image size {sh}x{sw} must be a positive multiple of the VAE's compression {f} (resolution binning \
             picks such a size for 1024 px students)"
        )));
    }
    let dtype = opts.mixed_precision.dtype();
    let (embeds, mask) = encode_prompts(&opts.pipeline, &opts.prompts, dtype, &opts.device)?;
    let student = Student::from_weights(&config, Weights::from_files(&files)?, &opts.device)?;
    let model = student.compute_models(dtype)?.frozen;
    std::fs::create_dir_all(&opts.output_dir).map_err(|e| Error::io(&opts.output_dir, e))?;

    let total = opts.prompts.len() * opts.images_per_prompt;
    let pb = if opts.progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let shape = |n: usize| (n, config.in_channels, sh / f, sw / f);
    let mut rng = SeededRng::new(opts.seed);
    let mut paths = Vec::with_capacity(total);
    let settings = serde_json::json!({
        "student": opts.student.display().to_string(),
        "pipeline": opts.pipeline.display().to_string(),
        "height": opts.height, "width": opts.width, "sampled_at": [sh, sw],
        "timesteps": opts.timesteps, "guidance_scale": opts.guidance_scale,
        "mixed_precision": opts.mixed_precision.name(), "resolution_binning": binned,
        "writer": format!("sana-sprint {}", env!("CARGO_PKG_VERSION")),
    });
    // images in prompt order; noise drawn batch by batch from one generator: the initial noise, then one draw
    // per step (so equal seeds, batch sizes and weights give equal images)
    let jobs: Vec<(usize, usize)> = (0..opts.prompts.len())
        .flat_map(|p| (0..opts.images_per_prompt).map(move |i| (p, i)))
        .collect();
    for chunk in jobs.chunks(opts.batch_size) {
        let n = chunk.len();
        let rows: Vec<Tensor> = chunk
            .iter()
            .map(|&(p, _)| embeds.narrow(0, p, 1))
            .collect::<candle_core::Result<_>>()?;
        let masks: Vec<Tensor> = chunk
            .iter()
            .map(|&(p, _)| mask.narrow(0, p, 1))
            .collect::<candle_core::Result<_>>()?;
        let (e, m) = (Tensor::cat(&rows, 0)?, Tensor::cat(&masks, 0)?);
        let init = rng.normal_tensor(shape(n), 0.0, 1.0, &opts.device)?;
        let steps = (1..opts.timesteps.len())
            .map(|_| rng.normal_tensor(shape(n), 0.0, 1.0, &opts.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let z = sample_scm(
            &model,
            &e,
            &m,
            opts.guidance_scale,
            config.guidance_embeds_scale,
            &opts.timesteps,
            opts.sigma_data,
            &init,
            &steps,
        )?;
        for (k, &(p, i)) in chunk.iter().enumerate() {
            let chw = decode_pixels(&decoder, &z.narrow(0, k, 1)?)?;
            let chw = resize_and_crop(&chw, (sh, sw), (opts.height, opts.width));
            let plane = opts.height * opts.width;
            let mut rgb = vec![0u8; 3 * plane];
            for (j, px) in rgb.chunks_exact_mut(3).enumerate() {
                for (ch, v) in px.iter_mut().enumerate() {
                    *v = pixel_u8(chw[ch * plane + j]);
                }
            }
            let path = opts
                .output_dir
                .join(format!("{:04}-p{p:03}-i{i:03}.png", paths.len()));
            save_png(
                &path,
                (opts.width, opts.height),
                &rgb,
                &[
                    ("prompt", opts.prompts[p].clone()),
                    ("seed", opts.seed.to_string()),
                    ("parameters", settings.to_string()),
                ],
            )?;
            paths.push(path);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok(paths)
}
