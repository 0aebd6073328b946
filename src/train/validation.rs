//! Validation images: few-step SCM sampling with the student (docs/ALGORITHM.md §7), as diffusers'
//! `SanaSprintPipeline.__call__` + `SCMScheduler.step` do it, DC-AE decoding, PNG grids.
//!
//! The sampler runs the TrigFlow wrapper once per step — the recommended form of docs/ALGORITHM.md §5.11 / ALGORITHM.md §9 #8 (the
//! reference script's validation applies the wrapper twice). Noise comes in from the caller, so a seeded
//! [`SeededRng`] makes [`Validator`] images reproducible.

use std::path::{Path, PathBuf};

use ::image::{GenericImage, RgbImage};
use candle_core::{DType, Device, Tensor};

use crate::models::dcae::{DcaeConfig, DcaeDecoder};
use crate::models::trigflow::SanaTrigFlow;
use crate::models::weights::Weights;
use crate::nn::dual::Dual;
use crate::rng::SeededRng;
use crate::text::{PromptEncoder, COMPLEX_HUMAN_INSTRUCTION};
use crate::{Error, Result};

/// Default first TrigFlow time of the Sprint pipeline (slightly above π/2 on purpose).
#[allow(clippy::approx_constant)] // the pipeline's literal, not π/2
pub const MAX_TIMESTEP: f64 = 1.57080;
/// Default middle time of the 2-step schedule.
pub const INTERMEDIATE_TIMESTEP: f64 = 1.3;
/// Default embedded guidance scale of the Sprint pipeline.
pub const GUIDANCE_SCALE: f64 = 4.5;
/// σd of the SCM scheduler.
pub const SIGMA_DATA: f64 = 0.5;
/// Prompt length of the Sprint pipeline (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 300;
/// `SCMScheduler(num_train_timesteps=1000)`: the most inference steps it accepts.
const NUM_TRAIN_TIMESTEPS: usize = 1000;

/// The TrigFlow times of the sampling loop, `SCMScheduler.set_timesteps` (docs/ALGORITHM.md §7 step 3 (diffusers SCMScheduler.set_timesteps, schedulers/scheduling_scm.py)); the loop visits every
/// entry but the last. Exactly one source: `custom` (num_steps + 1 entries, then `max_t` must be `None`),
/// else `[max_t, intermediate, 0]` (only for 2 steps), else `linspace(max_t, 0, num_steps + 1)`.
pub fn scm_timesteps(
    num_steps: usize,
    max_t: Option<f64>,
    intermediate: Option<f64>,
    custom: Option<&[f64]>,
) -> Result<Vec<f64>> {
    if num_steps == 0 {
        return Err(Error::Arg("SCM sampling needs at least one step".into()));
    }
    if num_steps > NUM_TRAIN_TIMESTEPS {
        return Err(Error::Arg(format!(
            "{num_steps} sampling steps is more than the scheduler's {NUM_TRAIN_TIMESTEPS} train timesteps"
        )));
    }
    if let Some(custom) = custom {
        if custom.len() != num_steps + 1 {
            return Err(Error::Arg(format!(
                "custom timesteps must have num_steps + 1 = {} entries, got {}",
                num_steps + 1,
                custom.len()
            )));
        }
        if max_t.is_some() {
            return Err(Error::Arg(
                "custom timesteps were given together with a max timestep; pass only one of them"
                    .into(),
            ));
        }
    }
    if custom.is_none() && max_t.is_none() {
        return Err(Error::Arg(
            "give either custom timesteps or a max timestep".into(),
        ));
    }
    if intermediate.is_some() && num_steps != 2 {
        return Err(Error::Arg(format!(
            "an intermediate timestep is only supported for 2 steps, not {num_steps} (leave it unset)"
        )));
    }
    let timesteps = match (custom, max_t, intermediate) {
        (Some(custom), _, _) => custom.to_vec(),
        (None, Some(max_t), Some(mid)) => vec![max_t, mid, 0.0],
        (None, Some(max_t), None) => (0..=num_steps)
            .map(|i| max_t - max_t * i as f64 / num_steps as f64)
            .collect(),
        (None, None, _) => unreachable!("checked above"),
    };
    if let Some(bad) = timesteps.iter().find(|t| !t.is_finite()) {
        return Err(Error::Arg(format!("timestep {bad} is not finite")));
    }
    Ok(timesteps)
}

/// `x / value` with the divisor rounded to `x`'s dtype first, as torch divides a tensor by a Python float.
fn div_scalar(x: &Tensor, value: f64) -> Result<Tensor> {
    let divisor = Tensor::new(value, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&divisor)?)
}

/// cos and sin of a scheduler time, which `SCMScheduler` holds as f32.
fn trig_f32(t: f32) -> (f64, f64) {
    let t = f64::from(t);
    (t.cos() as f32 as f64, t.sin() as f32 as f64)
}

/// Few-step SCM sampling (docs/ALGORITHM.md §7 steps 4–7). `init_noise` (B, C, h, w) and `step_noise` (one (B, C, h, w)
/// tensor per step, the last one multiplied by sin 0 = 0 when the schedule ends at 0) are unit normals;
/// `prompt_embeds` (B, L, D) with `prompt_mask` (B, L) 0/1; `timesteps` as from [`scm_timesteps`] (rounded to f32
/// as the scheduler stores them). The guidance input full(B, guidance_scale · guidance_embeds_scale) is passed
/// only to models with a guidance embedder. Returns z = denoised / σd (B, C, h, w) in f32, detached (each
/// step's output is detached; a model from `Student::detached` builds no graph at all).
#[allow(clippy::too_many_arguments)]
pub fn sample_scm(
    model: &SanaTrigFlow,
    prompt_embeds: &Tensor,
    prompt_mask: &Tensor,
    guidance_scale: f64,
    guidance_embeds_scale: f64,
    timesteps: &[f64],
    sigma_data: f64,
    init_noise: &Tensor,
    step_noise: &[Tensor],
) -> Result<Tensor> {
    let steps = timesteps.len().saturating_sub(1);
    if steps == 0 {
        return Err(Error::Arg(format!(
            "SCM sampling needs at least 2 timesteps, got {timesteps:?}"
        )));
    }
    if step_noise.len() != steps {
        return Err(Error::Arg(format!(
            "SCM sampling over {steps} steps needs {steps} step-noise tensors, got {}",
            step_noise.len()
        )));
    }
    let device = prompt_embeds.device();
    let (b, _, _, _) = init_noise.dims4()?;
    if prompt_embeds.dim(0)? != b || prompt_mask.dim(0)? != b {
        return Err(Error::Arg(format!(
            "{b} noise samples but {} prompt embeddings and {} masks",
            prompt_embeds.dim(0)?,
            prompt_mask.dim(0)?
        )));
    }
    let transformer = model.transformer();
    let embeds = prompt_embeds.to_dtype(transformer.dtype())?;
    // the pipeline scales the guidance in f32: full(B, guidance_scale) * guidance_embeds_scale
    let guidance = transformer
        .config()
        .guidance_embeds
        .then(|| {
            Tensor::full(
                guidance_scale as f32 * guidance_embeds_scale as f32,
                b,
                device,
            )
        })
        .transpose()?;
    let sigma = sigma_data as f32 as f64;
    let timesteps: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();

    let mut latents = init_noise
        .to_device(device)?
        .to_dtype(DType::F32)?
        .affine(sigma, 0.0)?;
    let mut denoised = None;
    for (i, pair) in timesteps.windows(2).enumerate() {
        let (s, t_next) = (pair[0], pair[1]);
        let x = div_scalar(&latents, sigma)?;
        let t = Tensor::full(s, b, device)?;
        let flow = model
            .forward(
                &Dual::constant(x),
                &embeds,
                &Dual::constant(t),
                guidance.as_ref(),
                Some(prompt_mask),
            )?
            .primal
            .detach()
            .to_dtype(DType::F32)?
            .affine(sigma, 0.0)?;
        let (cos_s, sin_s) = trig_f32(s);
        let x0 = (latents.affine(cos_s, 0.0)? - flow.affine(sin_s, 0.0)?)?;
        let (cos_t, sin_t) = trig_f32(t_next);
        let noise = step_noise[i]
            .to_device(device)?
            .to_dtype(DType::F32)?
            .affine(sigma, 0.0)?;
        latents = (x0.affine(cos_t, 0.0)? + noise.affine(sin_t, 0.0)?)?;
        denoised = Some(x0);
    }
    div_scalar(&denoised.expect("at least one step ran"), sigma)
}

/// Decodes diffusion latents z (B, C, h, w) into 8-bit RGB images (docs/ALGORITHM.md §7 steps 7–8): `vae.decode(z /
/// scaling_factor)` in `vae_dtype` (the decoder's weight dtype), then round(clamp(x·0.5 + 0.5, 0, 1)·255)
/// (half to even, as numpy) computed in f32.
/// One decoded value in [-1, 1] as a byte, as diffusers' postprocess does: `round((x / 2 + 0.5).clamp(0, 1) · 255)`
/// (numpy's round, half to even).
pub fn pixel_u8(x: f32) -> u8 {
    ((x * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

/// The decoded image of one latent `(1, C, h, w)` as CHW f32 in [-1, 1] (before the uint8 conversion), with the
/// decoder's scaling factor and dtype.
pub fn decode_pixels(decoder: &ImageDecoder, z: &Tensor) -> Result<Vec<f32>> {
    let raw = div_scalar(&z.to_dtype(decoder.dtype)?, decoder.config.scaling_factor)?;
    let decoded = decoder.decoder.forward(&raw)?;
    let (_, c, _, _) = decoded.dims4()?;
    if c != 3 {
        return Err(Error::Arg(format!(
            "the DC-AE decodes {c} channels; images need RGB (3)"
        )));
    }
    Ok(decoded
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

pub fn decode_images(
    vae: &DcaeDecoder,
    z: &Tensor,
    scaling_factor: f64,
    vae_dtype: DType,
) -> Result<Vec<RgbImage>> {
    let raw = div_scalar(&z.to_dtype(vae_dtype)?, scaling_factor)?;
    let decoded = vae.forward(&raw)?;
    let (_, c, h, w) = decoded.dims4()?;
    if c != 3 {
        return Err(Error::Arg(format!(
            "the DC-AE decodes {c} channels; validation images need RGB (3)"
        )));
    }
    let pixels = decoded
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes: Vec<u8> = pixels.iter().map(|&x| pixel_u8(x)).collect();
    Ok(bytes
        .chunks_exact(h * w * 3)
        .map(|image| {
            RgbImage::from_raw(w as u32, h as u32, image.to_vec())
                .expect("chunk holds exactly h·w·3 bytes")
        })
        .collect())
}

/// A DC-AE decoder with what decoding needs besides its weights.
#[derive(Debug, Clone)]
pub struct ImageDecoder {
    decoder: DcaeDecoder,
    config: DcaeConfig,
    dtype: DType,
}

impl ImageDecoder {
    /// Loads only the decoder of a diffusers `vae/` folder (`config.json` + safetensors), in `dtype`.
    pub fn load(vae_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = DcaeConfig::from_file(&vae_dir.join("config.json"))?;
        let weights = Weights::from_folder(vae_dir, &["diffusion_pytorch_model"])?;
        let decoder = DcaeDecoder::new(&config, weights.var_builder(dtype, device).pp("decoder"))?;
        Ok(Self {
            decoder,
            config,
            dtype,
        })
    }

    pub fn config(&self) -> &DcaeConfig {
        &self.config
    }

    /// Image pixels per latent pixel along each axis.
    pub fn spatial_compression(&self) -> usize {
        self.config.spatial_compression()
    }

    /// [`decode_images`] with this decoder's scaling factor and dtype, one latent at a time (bounds the
    /// decoder's activation memory at full resolution).
    pub fn decode(&self, z: &Tensor) -> Result<Vec<RgbImage>> {
        let mut images = Vec::with_capacity(z.dim(0)?);
        for i in 0..z.dim(0)? {
            images.extend(decode_images(
                &self.decoder,
                &z.narrow(0, i, 1)?,
                self.config.scaling_factor,
                self.dtype,
            )?);
        }
        Ok(images)
    }
}

/// Writes `images` (all the same size) as one PNG grid, `columns` per row, filled row by row; written to a
/// temporary name next to `path` and then renamed, so a reader never sees a partial file.
pub fn save_grid(images: &[RgbImage], columns: usize, path: &Path) -> Result<()> {
    let first = images
        .first()
        .ok_or_else(|| Error::Arg("no images to put in a grid".into()))?;
    if columns == 0 {
        return Err(Error::Arg("a grid needs at least one column".into()));
    }
    let (w, h) = first.dimensions();
    if let Some(other) = images.iter().find(|im| im.dimensions() != (w, h)) {
        return Err(Error::Arg(format!(
            "grid images differ in size: {}x{} and {}x{}",
            w,
            h,
            other.width(),
            other.height()
        )));
    }
    let columns = columns.min(images.len());
    let rows = images.len().div_ceil(columns);
    let mut grid = RgbImage::new(w * columns as u32, h * rows as u32);
    for (i, image) in images.iter().enumerate() {
        let (row, col) = ((i / columns) as u32, (i % columns) as u32);
        grid.copy_from(image, col * w, row * h)
            .expect("each tile lies inside the grid");
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let saved = grid
        .save_with_format(&tmp, ::image::ImageFormat::Png)
        .map_err(|e| Error::io(path, std::io::Error::other(e)))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if saved.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    saved
}

/// Where [`Validator::run`] writes the grid of training step `step`: `out_dir/validation/step-{step:06}.png`.
pub fn validation_path(out_dir: &Path, step: u64) -> PathBuf {
    out_dir
        .join("validation")
        .join(format!("step-{step:06}.png"))
}

/// The grid of training step `step` at one of several sizes: `out_dir/validation/step-{step:06}-{h}x{w}.png`.
pub fn validation_path_sized(out_dir: &Path, step: u64, (h, w): (usize, usize)) -> PathBuf {
    out_dir
        .join("validation")
        .join(format!("step-{step:06}-{h}x{w}.png"))
}

/// What a validation run samples.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationSettings {
    /// Images per prompt (the grid's columns).
    pub images_per_prompt: usize,
    /// Image height and width in pixels (multiples of the DC-AE compression).
    pub height: usize,
    pub width: usize,
    /// TrigFlow schedule (see [`scm_timesteps`]).
    pub timesteps: Vec<f64>,
    pub guidance_scale: f64,
    pub sigma_data: f64,
    /// Seed of the noise: every run with the same seed draws the same noise.
    pub seed: u64,
    /// `--mixed_precision` of the run (what it means for validation: see [`crate::device::MixedPrecision`]).
    pub mixed_precision: crate::device::MixedPrecision,
}

impl Default for ValidationSettings {
    /// The Sprint pipeline defaults (2 steps [1.5708, 1.3, 0], guidance 4.5, 1024 px) with 4 images per prompt.
    fn default() -> Self {
        Self {
            images_per_prompt: 4,
            height: 1024,
            width: 1024,
            timesteps: vec![MAX_TIMESTEP, INTERMEDIATE_TIMESTEP, 0.0],
            guidance_scale: GUIDANCE_SCALE,
            sigma_data: SIGMA_DATA,
            seed: 0,
            mixed_precision: crate::device::MixedPrecision::No,
        }
    }
}

/// Encodes validation prompts as the Sprint pipeline does (docs/ALGORITHM.md §4.1–§4.2: complex human instruction,
/// [`MAX_SEQUENCE_LENGTH`] tokens) with the text encoder of `pipeline_dir` in `dtype`, which is dropped
/// afterwards. Returns the embeddings (P, 300, D) and the mask (P, 300).
pub fn encode_prompts(
    pipeline_dir: &Path,
    prompts: &[String],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let encoder = PromptEncoder::load(pipeline_dir, dtype, device)?;
    encoder.encode(
        prompts,
        Some(&COMPLEX_HUMAN_INSTRUCTION),
        MAX_SEQUENCE_LENGTH,
    )
}

/// Periodic validation: fixed prompt embeddings, the DC-AE decoder and a seeded noise source.
pub struct Validator {
    prompt_embeds: Tensor,
    prompt_mask: Tensor,
    decoder: ImageDecoder,
    settings: ValidationSettings,
}

impl Validator {
    /// `prompt_embeds` (P, L, D) and `prompt_mask` (P, L) hold one row per prompt (see [`encode_prompts`]).
    pub fn new(
        prompt_embeds: Tensor,
        prompt_mask: Tensor,
        decoder: ImageDecoder,
        settings: ValidationSettings,
    ) -> Result<Self> {
        let (p, l, _) = prompt_embeds.dims3()?;
        if prompt_mask.dims() != [p, l] {
            return Err(Error::Arg(format!(
                "prompt mask has shape {:?}, the embeddings need ({p}, {l})",
                prompt_mask.dims()
            )));
        }
        if p == 0 || settings.images_per_prompt == 0 {
            return Err(Error::Arg(
                "validation needs at least one prompt and one image per prompt".into(),
            ));
        }
        let c = decoder.spatial_compression();
        if settings.height == 0
            || settings.width == 0
            || !settings.height.is_multiple_of(c)
            || !settings.width.is_multiple_of(c)
        {
            return Err(Error::Arg(format!(
                "validation size {}x{} must be a positive multiple of the DC-AE compression {c}",
                settings.height, settings.width
            )));
        }
        if settings.timesteps.len() < 2 {
            return Err(Error::Arg(format!(
                "validation timesteps {:?} need at least 2 entries",
                settings.timesteps
            )));
        }
        Ok(Self {
            prompt_embeds,
            prompt_mask,
            decoder,
            settings,
        })
    }

    /// Encodes `prompts` with the pipeline's text encoder in the run's compute dtype
    /// (`settings.mixed_precision`: f32 for `no`, bf16 for `bf16`, as sprint-prep encodes the store's prompts)
    /// and loads its DC-AE decoder (f32, as the VAE always runs). Sampling runs in the dtype of the student
    /// passed to [`Validator::images`].
    pub fn load(
        pipeline_dir: &Path,
        prompts: &[String],
        settings: ValidationSettings,
        device: &Device,
    ) -> Result<Self> {
        let text_dtype = settings.mixed_precision.dtype();
        let (embeds, mask) = encode_prompts(pipeline_dir, prompts, text_dtype, device)?;
        let decoder = ImageDecoder::load(&pipeline_dir.join("vae"), DType::F32, device)?;
        Self::new(embeds, mask, decoder, settings)
    }

    pub fn settings(&self) -> &ValidationSettings {
        &self.settings
    }

    /// Samples `images_per_prompt` images per prompt with `student` (no graph is built) and decodes them.
    /// Noise is drawn from `SeededRng::new(seed)` prompt by prompt: the initial noise (n, C, h, w), then one
    /// (n, C, h, w) draw per step; so equal seeds and weights give equal images. Returns the images
    /// prompt-major.
    pub fn images(&self, student: &SanaTrigFlow) -> Result<Vec<RgbImage>> {
        let s = &self.settings;
        let config = student.transformer().config();
        let compression = self.decoder.spatial_compression();
        let shape = (
            s.images_per_prompt,
            config.in_channels,
            s.height / compression,
            s.width / compression,
        );
        let device = self.prompt_embeds.device();
        let mut rng = SeededRng::new(s.seed);
        let mut images = Vec::new();
        for p in 0..self.prompt_embeds.dim(0)? {
            let n = s.images_per_prompt;
            let embeds = self.prompt_embeds.narrow(0, p, 1)?.repeat((n, 1, 1))?;
            let mask = self.prompt_mask.narrow(0, p, 1)?.repeat((n, 1))?;
            let init_noise = rng.normal_tensor(shape, 0.0, 1.0, device)?;
            let step_noise = (1..s.timesteps.len())
                .map(|_| rng.normal_tensor(shape, 0.0, 1.0, device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let z = sample_scm(
                student,
                &embeds,
                &mask,
                s.guidance_scale,
                config.guidance_embeds_scale,
                &s.timesteps,
                s.sigma_data,
                &init_noise,
                &step_noise,
            )?;
            images.extend(self.decoder.decode(&z)?);
        }
        Ok(images)
    }

    /// Writes the validation grid of training step `step` (prompts as rows, images as columns) to
    /// [`validation_path`]`(out_dir, step)` and returns that path.
    pub fn run(&self, student: &SanaTrigFlow, step: u64, out_dir: &Path) -> Result<PathBuf> {
        self.run_to(student, &validation_path(out_dir, step))
    }

    /// [`Validator::run`] to `path`.
    pub fn run_to(&self, student: &SanaTrigFlow, path: &Path) -> Result<PathBuf> {
        let images = self.images(student)?;
        save_grid(&images, self.settings.images_per_prompt, path)?;
        Ok(path.to_path_buf())
    }

    /// The same prompts and decoder at another image size (checked as at construction).
    pub fn resized(&self, height: usize, width: usize) -> Result<Self> {
        Self::new(
            self.prompt_embeds.clone(),
            self.prompt_mask.clone(),
            self.decoder.clone(),
            ValidationSettings {
                height,
                width,
                ..self.settings.clone()
            },
        )
    }

    /// `(height, width)` of its images.
    pub fn size(&self) -> (usize, usize) {
        (self.settings.height, self.settings.width)
    }
}
