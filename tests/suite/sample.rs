//! sprint-sample: the resolution binning against diffusers (`classify_height_width_bin` over
//! `ASPECT_RATIO_1024_BIN` for 1,305 sizes, exact; `resize_and_crop_tensor` on down- and up-scales, f32, 1e-5
//! abs; fixtures from tools/golden/make_sample_fixtures.py), and the binary end to end on a student trained
//! for one step: PNGs of the requested size with their prompt, seed and settings in text chunks, the same
//! bytes for the same seed, other bytes for another.

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use sana_sprint::sample::{classify_1024_bin, resize_and_crop};
use sana_sprint::train::trainer;

use crate::common::fixture_path;
use crate::train_loop::{options, small_store, tiny_model};

#[derive(serde::Deserialize)]
struct Resize {
    name: String,
    from: [usize; 2],
    to: [usize; 2],
}

#[derive(serde::Deserialize)]
struct Reference {
    choices: Vec<[usize; 4]>,
    resizes: Vec<Resize>,
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixture_path("sample_bins_ref.json")).unwrap())
        .unwrap()
}

#[test]
fn resolution_binning_matches_diffusers() {
    let r = reference();
    let wrong: Vec<String> = r
        .choices
        .iter()
        .filter(|[h, w, bh, bw]| classify_1024_bin(*h, *w) != (*bh, *bw))
        .map(|[h, w, bh, bw]| {
            format!(
                "{h}x{w}: ours {:?}, diffusers {bh}x{bw}",
                classify_1024_bin(*h, *w)
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {}: {:?}",
        wrong.len(),
        r.choices.len(),
        &wrong[..wrong.len().min(5)]
    );

    let t =
        candle_core::safetensors::load(fixture_path("sample_bins_ref.safetensors"), &Device::Cpu)
            .unwrap();
    for c in &r.resizes {
        let x: Vec<f32> = t[&format!("{}.in", c.name)]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = t[&format!("{}.out", c.name)]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = resize_and_crop(&x, (c.from[0], c.from[1]), (c.to[0], c.to[1]));
        assert_eq!(got.len(), want.len(), "{}", c.name);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{}: max abs {worst:.3e}", c.name);
    }
}

fn png_text(path: &Path) -> (u32, u32, Vec<(String, String)>, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();
    let info = reader.info();
    let text = info
        .utf8_text
        .iter()
        .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
        .collect();
    (info.width, info.height, text, buf)
}

#[test]
fn sprint_sample_writes_pngs_of_the_requested_size_with_their_settings() {
    // a student trained for one step on the tiny pipeline
    let run = tempfile::tempdir().unwrap();
    let mut o = options(run.path());
    o.latents = small_store().to_path_buf();
    o.max_train_steps = Some(1);
    trainer::run(&o).unwrap();

    let sample = |out: &Path, seed: &str, extra: &[&str]| {
        let r = Command::new(env!("CARGO_BIN_EXE_sprint-sample"))
            .arg("--pretrained_model_name_or_path")
            .arg(tiny_model())
            .arg("--student")
            .arg(run.path())
            .arg("--output_dir")
            .arg(out)
            .args([
                "--prompt",
                "a red cube",
                "--prompt",
                "a blue ball on grass",
                "--height",
                "64",
                "--width",
            ])
            .args([
                "96",
                "--num_images_per_prompt",
                "2",
                "--seed",
                seed,
                "--device",
                "cpu",
                "--no_progress",
            ])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let mut files: Vec<_> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    };
    let d = tempfile::tempdir().unwrap();
    let a = sample(&d.path().join("a"), "3", &["--num_inference_steps", "1"]);
    assert_eq!(a.len(), 4);
    let (w, h, text, pixels_a) = png_text(&a[2]);
    assert_eq!((w, h), (96, 64));
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get("prompt"), "a blue ball on grass");
    assert_eq!(get("seed"), "3");
    let params: serde_json::Value = serde_json::from_str(&get("parameters")).unwrap();
    let max_t = sana_sprint::train::validation::MAX_TIMESTEP;
    assert_eq!(params["timesteps"], serde_json::json!([max_t, 0.0]));
    assert_eq!(params["sampled_at"], serde_json::json!([64, 96]));
    // the same seed again: the same image; another seed or step count: another
    let again = sample(&d.path().join("b"), "3", &["--num_inference_steps", "1"]);
    assert_eq!(png_text(&again[2]).3, pixels_a);
    let other = sample(&d.path().join("c"), "4", &["--num_inference_steps", "1"]);
    assert_ne!(png_text(&other[2]).3, pixels_a);
    let four = sample(&d.path().join("e"), "3", &["--num_inference_steps", "4"]);
    let (_, _, text4, pixels4) = png_text(&four[2]);
    assert_ne!(pixels4, pixels_a);
    assert!(
        text4
            .iter()
            .any(|(k, v)| k == "parameters" && v.contains("0.3927")),
        "{text4:?}"
    );

    // a wrong student folder and an impossible step count say what to do
    let bad = Command::new(env!("CARGO_BIN_EXE_sprint-sample"))
        .arg("--pretrained_model_name_or_path")
        .arg(tiny_model())
        .arg("--student")
        .arg(d.path())
        .args(["--prompt", "x", "--device", "cpu", "--no_progress"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("exported transformer/ folder"));
    let steps = Command::new(env!("CARGO_BIN_EXE_sprint-sample"))
        .args(["--demo", "--num_inference_steps", "5"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&steps.stderr).contains("1 to 4 steps"));
}
