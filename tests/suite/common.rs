//! Helpers shared by the integration tests: where fixtures live and how to load them, and the one set of
//! tensor comparisons (max abs, L2, relative L2) every test uses.
#![allow(dead_code)] // each test module uses its own subset

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// A file under `tests/fixtures/` (tests never read fixtures from anywhere else).
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Every tensor of `tests/fixtures/NAME.safetensors`, on the CPU.
pub fn load_fixture(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_path(&format!("{name}.safetensors")), &Device::Cpu)
        .unwrap()
}

/// The `config` object of `tests/fixtures/NAME.json`, deserialised.
pub fn fixture_config<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path(&format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    serde_json::from_value(json["config"].clone()).unwrap()
}

/// A real checkpoint key list `data/keys/FILE` (`key<TAB>[d0, d1, …]` per line) as name → shape. The key lists
/// are data the crate owns (`sprint-bench` builds them in), not fixtures.
pub fn reference_keys(file: &str) -> std::collections::BTreeMap<String, Vec<usize>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/keys")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    sana_sprint::synth::parse_key_list(&text)
        .unwrap()
        .into_iter()
        .collect()
}

/// Largest |value| of a tensor, in f64.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// L2 norm of a tensor, in f64.
pub fn l2_norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// Largest |got − want|, in f64 (shapes must agree).
pub fn max_abs_diff(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    max_abs(&d)
}

/// ‖got − want‖₂ / ‖want‖₂ in f64 (the absolute error when `want` is all zero; shapes must agree).
pub fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    let (err, norm) = (l2_norm(&d), l2_norm(want));
    if norm == 0.0 {
        err
    } else {
        err / norm
    }
}

/// Asserts `rel_l2(got, want) < tol` and prints both error measures (visible with `--nocapture`).
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let (rel, abs) = (rel_l2(got, want), max_abs_diff(got, want));
    println!("{what}: rel L2 {rel:.3e}, max abs {abs:.3e}");
    assert!(
        rel < tol,
        "{what}: relative L2 error {rel:.3e} >= {tol:.1e} (max abs {abs:.3e})"
    );
}

/// Asserts `max_abs_diff(got, want) <= tol` and prints it.
pub fn assert_max_abs(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let abs = max_abs_diff(got, want);
    println!("{what}: max abs {abs:.3e}");
    assert!(abs <= tol, "{what}: max abs error {abs:.3e} > {tol:.1e}");
}

/// The settings of a small synthetic store (64², latents [2, 2, 2] f32, prompts of up to `max_len` tokens of
/// width `d` in f32) with the given unconditional embedding (`negative.len()` is a multiple of `d`).
pub fn small_store_config(
    d: usize,
    max_len: usize,
    negative: &[f32],
) -> sana_sprint::store::StoreConfig {
    use sana_sprint::store::{ModelInfo, ModelsInfo, PreprocessInfo, StoreConfig, StoreDType};
    let m = |n: &str| ModelInfo {
        origin: format!("test/{n}"),
        fingerprint: format!("sha256:{n}"),
    };
    StoreConfig {
        format_version: 1,
        resolution: 64,
        max_sequence_length: max_len,
        complex_human_instruction: None,
        vae_scaling_factor: 0.41407,
        text_hidden_size: d,
        latent_dtype: StoreDType::Float32,
        embed_dtype: StoreDType::Float32,
        negative_prompt_len: negative.len() / d,
        negative_prompt_embeds_f32le_b64: StoreConfig::encode_negative(negative),
        models: ModelsInfo {
            vae: m("vae"),
            text_encoder: m("te"),
            tokenizer: m("tok"),
        },
        preprocess: PreprocessInfo {
            resize: "r".into(),
            crop: "c".into(),
            normalize: "n".into(),
            mixed_precision: "no".into(),
        },
        latent_shape: [2, 2, 2],
        writer: "test".into(),
        multi_scale: None,
        validation_prompts: Vec::new(),
        validation_max_sequence_length: None,
    }
}

/// Every value of a tensor as f32, flattened (for bit and finiteness checks).
pub fn f32_values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}
