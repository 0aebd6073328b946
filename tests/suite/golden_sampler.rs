//! Few-step SCM sampling (docs/ALGORITHM.md §7; diffusers `SanaSprintPipeline.__call__`, `SCMScheduler.step`) against diffusers `SanaSprintPipeline` + `SCMScheduler` on a tiny student
//! (fixture `sampler_tiny`, generator tools/golden/make_golden_sampler.py), decoded with the tiny pipeline's
//! DC-AE; plus the grid writer and the timestep rules.
//!
//! Tolerances (f32 everywhere): final latent rel ≤ 1e-4 (max |Δ| / max |ref|); uint8 images within 1 level
//! (a value a rounding boundary apart), with at most 1% of the pixels off by one.

use crate::common::{fixture_config, fixture_path, load_fixture, max_abs, max_abs_diff};

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sana_sprint::models::sana::SanaConfig;
use sana_sprint::models::student::Student;
use sana_sprint::models::weights::Weights;
use sana_sprint::train::validation::{
    sample_scm, save_grid, scm_timesteps, validation_path, ImageDecoder, ValidationSettings,
    Validator, MAX_TIMESTEP,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    num_inference_steps: usize,
    intermediate_timesteps: Option<f64>,
    timesteps: Vec<f64>,
}

#[derive(Deserialize)]
struct Meta {
    guidance_scale: f64,
    sigma_data: f64,
    height: usize,
    width: usize,
    max_timesteps: f64,
    cases: Vec<Case>,
}

fn meta() -> Meta {
    serde_json::from_str(&std::fs::read_to_string(fixture_path("sampler_tiny.json")).unwrap())
        .unwrap()
}

fn tiny_vae_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint/vae")
}

fn student() -> Student {
    let config: SanaConfig = fixture_config("sampler_tiny");
    let weights = Weights::from_files(&[fixture_path("sampler_tiny.safetensors")])
        .unwrap()
        .strip_prefix("student.");
    Student::from_weights(&config, weights, &Device::Cpu).unwrap()
}

#[test]
fn sampling_and_decoding_match_the_diffusers_sprint_pipeline() {
    let meta = meta();
    let io = load_fixture("sampler_tiny");
    let student = student();
    let model = student.detached().unwrap();
    let decoder = ImageDecoder::load(&tiny_vae_dir(), DType::F32, &Device::Cpu).unwrap();
    let embeds = &io["io.prompt_embeds"];
    let mask = &io["io.prompt_mask"];
    for case in &meta.cases {
        let timesteps = scm_timesteps(
            case.num_inference_steps,
            Some(meta.max_timesteps),
            case.intermediate_timesteps,
            None,
        )
        .unwrap();
        // the scheduler holds f32 times
        let ours: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let theirs: Vec<f32> = case.timesteps.iter().map(|&t| t as f32).collect();
        assert_eq!(ours.len(), theirs.len(), "{}", case.name);
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() <= 1e-6,
                "{}: timesteps {ours:?} vs {theirs:?}",
                case.name
            );
        }

        let init_noise = &io[&format!("io.{}.init_noise", case.name)];
        let step_noise: Vec<Tensor> = (0..case.num_inference_steps)
            .map(|i| io[&format!("io.{}.step_noise.{i}", case.name)].clone())
            .collect();
        let z = sample_scm(
            &model,
            embeds,
            mask,
            meta.guidance_scale,
            student.config().guidance_embeds_scale,
            &timesteps,
            meta.sigma_data,
            init_noise,
            &step_noise,
        )
        .unwrap();
        let want = &io[&format!("io.{}.latent", case.name)];
        let err = max_abs_diff(&z, want);
        let rel = err / max_abs(want);
        println!("{}: latent max |Δ| {err:.3e}, rel {rel:.3e}", case.name);
        assert!(rel <= 1e-4, "{}: latent rel error {rel}", case.name);

        let images = decoder.decode(&z).unwrap();
        let want = io[&format!("io.{}.image", case.name)]
            .to_dtype(DType::U8)
            .unwrap();
        let (b, h, w, c) = want.dims4().unwrap();
        assert_eq!((images.len(), c), (b, 3));
        assert_eq!((h, w), (meta.height, meta.width));
        let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let ours: Vec<u8> = images.iter().flat_map(|im| im.as_raw().clone()).collect();
        assert_eq!(ours.len(), want.len());
        let worst = ours
            .iter()
            .zip(&want)
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap();
        let off = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        println!(
            "{}: image max |Δ| {worst}/255, {off} of {} values off",
            case.name,
            ours.len()
        );
        assert!(worst <= 1, "{}: image differs by {worst}/255", case.name);
        assert!(
            off * 100 <= ours.len(),
            "{}: {off} values off by one",
            case.name
        );
    }
}

#[test]
fn guidance_and_noise_reach_the_sample() {
    // the fixture's guidance embedder is non-zero: a different guidance scale must change the latent
    let meta = meta();
    let io = load_fixture("sampler_tiny");
    let student = student();
    let model = student.detached().unwrap();
    let timesteps = scm_timesteps(2, Some(MAX_TIMESTEP), Some(1.3), None).unwrap();
    let noise: Vec<Tensor> = (0..2)
        .map(|i| io[&format!("io.two_steps.step_noise.{i}")].clone())
        .collect();
    let run = |guidance: f64, noise: &[Tensor]| {
        sample_scm(
            &model,
            &io["io.prompt_embeds"],
            &io["io.prompt_mask"],
            guidance,
            0.1,
            &timesteps,
            meta.sigma_data,
            &io["io.two_steps.init_noise"],
            noise,
        )
        .unwrap()
    };
    let base = run(4.5, &noise);
    assert!(max_abs_diff(&run(0.0, &noise), &base) > 1e-2);
    let other = vec![noise[1].clone(), noise[0].clone()];
    assert!(max_abs_diff(&run(4.5, &other), &base) > 1e-2);
    // the last step's noise is multiplied by sin 0 = 0
    let last_zero = vec![noise[0].clone(), noise[1].zeros_like().unwrap()];
    assert_eq!(max_abs_diff(&run(4.5, &last_zero), &base), 0.0);
}

#[test]
fn validator_writes_a_reproducible_grid() {
    let io = load_fixture("sampler_tiny");
    let student = student();
    let model = student.detached().unwrap();
    let decoder = ImageDecoder::load(&tiny_vae_dir(), DType::F32, &Device::Cpu).unwrap();
    let settings = ValidationSettings {
        images_per_prompt: 3,
        height: 32,
        width: 64,
        seed: 7,
        ..ValidationSettings::default()
    };
    let validator = Validator::new(
        io["io.prompt_embeds"].clone(),
        io["io.prompt_mask"].clone(),
        decoder,
        settings,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = validator.run(&model, 42, dir.path()).unwrap();
    assert_eq!(path, dir.path().join("validation/step-000042.png"));
    assert_eq!(path, validation_path(dir.path(), 42));
    let grid = image::open(&path).unwrap().to_rgb8();
    // 2 prompts as rows, 3 images as columns
    assert_eq!(grid.dimensions(), (3 * 64, 2 * 32));
    let again = validator.images(&model).unwrap();
    assert_eq!(again.len(), 6);
    assert_eq!(
        again[4].as_raw(),
        image::imageops::crop_imm(&grid, 64, 32, 64, 32)
            .to_image()
            .as_raw()
    );
    assert_ne!(again[0].as_raw(), again[1].as_raw());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("validation"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
}

#[test]
fn save_grid_writes_a_png_of_the_right_size() {
    let tiles: Vec<image::RgbImage> = (0..5u8)
        .map(|i| image::RgbImage::from_pixel(6, 4, image::Rgb([40 * i, 255 - i, i])))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/grid.png");
    save_grid(&tiles, 2, &path).unwrap();
    let grid = image::open(&path).unwrap().to_rgb8();
    assert_eq!(grid.dimensions(), (2 * 6, 3 * 4));
    assert_eq!(*grid.get_pixel(7, 5), image::Rgb([40 * 3, 252, 3]));
    assert_eq!(*grid.get_pixel(0, 9), image::Rgb([160, 251, 4]));
    // the missing sixth tile stays black
    assert_eq!(*grid.get_pixel(11, 11), image::Rgb([0, 0, 0]));
    assert!(save_grid(&[], 2, &path).is_err());
    assert!(save_grid(&tiles, 0, &path).is_err());
    let mixed = vec![tiles[0].clone(), image::RgbImage::new(3, 3)];
    assert!(save_grid(&mixed, 2, &path).is_err());
}

#[test]
fn scm_timesteps_follow_the_scheduler_rules() {
    assert_eq!(
        scm_timesteps(2, Some(MAX_TIMESTEP), Some(1.3), None).unwrap(),
        vec![MAX_TIMESTEP, 1.3, 0.0]
    );
    assert_eq!(
        scm_timesteps(1, Some(1.5), None, None).unwrap(),
        vec![1.5, 0.0]
    );
    let four = scm_timesteps(4, Some(1.6), None, None).unwrap();
    assert_eq!(four.len(), 5);
    for (t, want) in four.iter().zip([1.6, 1.2, 0.8, 0.4, 0.0]) {
        assert!((t - want).abs() < 1e-12, "{four:?}");
    }
    let custom = [1.5, 1.0, 0.5, 0.0];
    assert_eq!(
        scm_timesteps(3, None, None, Some(&custom)).unwrap(),
        custom.to_vec()
    );
    // intermediate only for 2 steps (1 step needs intermediate = None)
    assert!(scm_timesteps(1, Some(MAX_TIMESTEP), Some(1.3), None).is_err());
    assert!(scm_timesteps(4, Some(MAX_TIMESTEP), Some(1.3), None).is_err());
    // custom: num_steps + 1 entries, and no max timestep alongside
    assert!(scm_timesteps(2, None, None, Some(&custom)).is_err());
    assert!(scm_timesteps(3, Some(MAX_TIMESTEP), None, Some(&custom)).is_err());
    // neither source, no steps, too many steps, non-finite
    assert!(scm_timesteps(2, None, None, None).is_err());
    assert!(scm_timesteps(0, Some(MAX_TIMESTEP), None, None).is_err());
    assert!(scm_timesteps(1001, Some(MAX_TIMESTEP), None, None).is_err());
    assert!(scm_timesteps(1, None, None, Some(&[f64::NAN, 0.0])).is_err());
}
