//! Image decoding + preprocessing against the real PIL + torchvision transform.
//!
//! Fixtures: tests/fixtures/images/* (encoded bytes) and tests/fixtures/images_ref.{safetensors,json},
//! written by tools/golden/make_image_fixtures.py (Pillow 13.0.0, torchvision 0.29.2). The reference
//! tensors are f32 CHW in [-1, 1]; one uint8 step is 2/255 there. Errors below are reported in uint8
//! steps of the [0, 1] scale (|diff| * 255 / 2).

use crate::common::fixture_path;

use std::collections::BTreeMap;

use image::RgbImage;
use safetensors::{Dtype, SafeTensors};
use sana_sprint::image::{decode_rgb, load_preprocessed, preprocess};
use sana_sprint::Error;

#[derive(serde::Deserialize)]
struct Entry {
    file: String,
    pil_mode: String,
    has_rgb: bool,
    resolutions: Vec<u32>,
}

struct Reference {
    manifest: BTreeMap<String, Entry>,
    tensors: Vec<u8>,
}

impl Reference {
    fn load() -> Self {
        let manifest = std::fs::read_to_string(fixture_path("images_ref.json")).unwrap();
        let tensors = std::fs::read(fixture_path("images_ref.safetensors")).unwrap();
        Reference {
            manifest: serde_json::from_str(&manifest).unwrap(),
            tensors,
        }
    }

    fn bytes(&self, entry: &Entry) -> Vec<u8> {
        std::fs::read(fixture_path("images").join(&entry.file)).unwrap()
    }

    /// PIL's `convert("RGB")` pixels of a fixture.
    fn pil_rgb(&self, name: &str) -> RgbImage {
        let st = SafeTensors::deserialize(&self.tensors).unwrap();
        let t = st.tensor(&format!("{name}.rgb")).unwrap();
        assert_eq!(t.dtype(), Dtype::U8);
        let (h, w) = (t.shape()[0] as u32, t.shape()[1] as u32);
        RgbImage::from_raw(w, h, t.data().to_vec()).unwrap()
    }

    /// The reference transform's output at `res` (f32 [3, res, res]).
    fn transformed(&self, name: &str, res: u32) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.tensors).unwrap();
        let t = st.tensor(&format!("{name}.r{res}")).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(t.shape(), [3, res as usize, res as usize]);
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

fn kind(entry: &Entry) -> &'static str {
    match entry.file.rsplit('.').next().unwrap() {
        "png" => "png",
        "jpg" => "jpeg",
        _ if entry.file.contains("lossless") => "webp-lossless",
        _ => "webp-lossy",
    }
}

/// Max |a - b| in uint8 steps of the [0, 1] scale for [-1, 1] tensors, and the mean.
fn tensor_error(ours: &[f32], reference: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), reference.len());
    let diffs = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs() * 255.0 / 2.0);
    let (max, sum) = diffs.fold((0f32, 0f32), |(m, s), d| (m.max(d), s + d));
    (max, sum / ours.len() as f32)
}

fn pixel_error(ours: &RgbImage, reference: &RgbImage) -> (u8, f32) {
    assert_eq!(ours.dimensions(), reference.dimensions());
    let diffs = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| a.abs_diff(*b));
    let (max, sum) = diffs.fold((0u8, 0u64), |(m, s), d| (m.max(d), s + u64::from(d)));
    (max, sum as f32 / ours.as_raw().len() as f32)
}

/// Allowed (max, mean) error per format, in uint8 steps, for decoded pixels and for the transformed
/// tensor. PNG and lossless WebP must be bit-exact. JPEG differs by the decoder (zune-jpeg vs
/// libjpeg-turbo): IDCT/colour rounding inside the image (<= 3 steps), and chroma upsampling in the
/// last pixel row/column of 4:2:x images whose size is not a multiple of the MCU (up to 14 steps
/// there); the resize and centre crop average or cut most of that away. Lossy WebP (image-webp vs libwebp) is exact on the fixtures;
/// one step of rounding slack is allowed.
struct Bounds {
    decode: (f32, f32),
    transform: (f32, f32),
}

fn bounds(kind: &str) -> Bounds {
    match kind {
        "png" | "webp-lossless" => Bounds {
            decode: (0.0, 0.0),
            transform: (0.0, 0.0),
        },
        "jpeg" => Bounds {
            decode: (16.0, 0.5),
            transform: (4.0, 0.5),
        },
        _ => Bounds {
            decode: (1.0, 0.05),
            transform: (1.0, 0.05),
        },
    }
}

#[test]
fn decoded_pixels_match_pil_convert_rgb() {
    let reference = Reference::load();
    let mut checked = 0;
    for (name, entry) in reference.manifest.iter().filter(|(_, e)| e.has_rgb) {
        let ours = decode_rgb(&reference.bytes(entry))
            .unwrap_or_else(|e| panic!("{name} ({}): {e}", entry.pil_mode));
        let (max, mean) = pixel_error(&ours, &reference.pil_rgb(name));
        let (max_bound, mean_bound) = bounds(kind(entry)).decode;
        println!(
            "decode {name:28} PIL mode {:5} max {max:3} mean {mean:.4}",
            entry.pil_mode
        );
        assert!(
            f32::from(max) <= max_bound && mean <= mean_bound,
            "{name}: decoded pixels differ from PIL by max {max}, mean {mean} (bound {max_bound}, {mean_bound})"
        );
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} fixtures have PIL pixels");
}

#[test]
fn preprocess_of_pil_pixels_is_bit_exact() {
    // isolates the resampling/crop/normalise path from the decoder: same input pixels as PIL
    let reference = Reference::load();
    let mut checked = 0;
    for (name, entry) in reference.manifest.iter().filter(|(_, e)| e.has_rgb) {
        let pixels = reference.pil_rgb(name);
        for &res in &entry.resolutions {
            let ours = preprocess(&pixels, res);
            let (max, _) = tensor_error(&ours, &reference.transformed(name, res));
            assert!(
                max == 0.0,
                "{name} @ {res}: max error {max} uint8 steps, expected bit-exact"
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} cases");
}

#[test]
fn end_to_end_matches_reference_transform() {
    let reference = Reference::load();
    let mut worst: BTreeMap<&str, (f32, f32)> = BTreeMap::new();
    for (name, entry) in &reference.manifest {
        let bytes = reference.bytes(entry);
        for &res in &entry.resolutions {
            let ours = load_preprocessed(&bytes, res).unwrap_or_else(|e| panic!("{name}: {e}"));
            let (max, mean) = tensor_error(&ours, &reference.transformed(name, res));
            let k = kind(entry);
            println!("transform {name:28} @ {res:3}: max {max:.3} mean {mean:.4} (uint8 steps)");
            let (max_bound, mean_bound) = bounds(k).transform;
            assert!(
                max <= max_bound + 1e-3 && mean <= mean_bound,
                "{name} @ {res}: max {max}, mean {mean} uint8 steps (bound {max_bound}, {mean_bound})"
            );
            let w = worst.entry(k).or_default();
            *w = (w.0.max(max), w.1.max(mean));
        }
    }
    for (k, (max, mean)) in &worst {
        println!("worst {k:14}: max {max:.3} uint8 steps, worst mean {mean:.4}");
    }
    assert_eq!(
        worst.len(),
        4,
        "every format family must be covered: {worst:?}"
    );
}

fn data_error(bytes: &[u8]) -> String {
    match decode_rgb(bytes) {
        Err(Error::Data { msg, .. }) => msg,
        Err(other) => panic!("expected a data error, got {other}"),
        Ok(img) => panic!("expected an error, decoded {:?}", img.dimensions()),
    }
}

#[test]
fn bad_inputs_are_data_errors_with_stable_reasons() {
    let reference = Reference::load();
    let file = |name: &str| reference.bytes(&reference.manifest[name]);

    assert_eq!(data_error(&[]), "empty image bytes");
    let noise: Vec<u8> = (0u32..512)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert_eq!(data_error(&noise), "unsupported image format");
    assert!(data_error(b"GIF89a\x01\x00\x01\x00").starts_with("unsupported image format: gif"));
    assert!(
        data_error(b"BM\x00\x00\x00\x00\x00\x00\x00\x00").starts_with("unsupported image format")
    );

    // PIL fails on all of these too ("image file is truncated", "could not create decoder object")
    let jpeg = file("rgb_64x48_jpg");
    for cut in [2, 50, jpeg.len() / 2] {
        let msg = data_error(&jpeg[..jpeg.len() - cut]);
        assert!(msg.starts_with("truncated image"), "jpeg cut {cut}: {msg}");
    }
    let png = file("rgb_37x23_png");
    let msg = data_error(&png[..png.len() / 2]);
    assert!(msg.starts_with("corrupt image"), "{msg}");
    for name in ["rgb_lossy_60x44_webp", "rgb_lossless_39x27_webp"] {
        let webp = file(name);
        let msg = data_error(&webp[..webp.len() / 2]);
        assert!(msg.starts_with("corrupt image"), "{name}: {msg}");
    }
    // a valid header followed by garbage
    let mut garbled = png.clone();
    garbled[40..].iter_mut().for_each(|b| *b = 0x5A);
    assert!(data_error(&garbled).starts_with("corrupt image"));

    // trailing bytes after a complete JPEG are fine (PIL accepts them as well)
    let mut trailing = jpeg.clone();
    trailing.extend_from_slice(b"trailing garbage");
    assert_eq!(decode_rgb(&trailing).unwrap().dimensions(), (64, 48));
}
