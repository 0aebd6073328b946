//! Gemma-2 encoder parity with transformers' `Gemma2Model` (fixture `gemma2_tiny`, tools/golden/make_golden.py):
//! 3 layers, GQA (4 query / 2 key-value heads), attention softcap 50, jittered (1 + w) norms, right padding, and a
//! sliding window of 5 < sequence length 8 on layers 0 and 2.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sana_sprint::models::gemma2::{Gemma2Config, Gemma2Encoder, LayerType};
use sana_sprint::models::weights::Weights;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn config() -> Gemma2Config {
    let text = std::fs::read_to_string(fixture("gemma2_tiny.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(json["config"].clone()).unwrap()
}

/// Runs the encoder in `dtype` on the fixture inputs; returns (ours, reference) as f32.
fn run(dtype: DType) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let path = fixture("gemma2_tiny.safetensors");
    let weights = Weights::from_files(std::slice::from_ref(&path)).unwrap();
    let ids = weights.load("io.input_ids", DType::U32, &dev).unwrap();
    let mask = weights.load("io.attention_mask", DType::F32, &dev).unwrap();
    let expected = weights
        .load("io.last_hidden_state", DType::F32, &dev)
        .unwrap();
    let encoder = Gemma2Encoder::new(&config(), weights.var_builder(dtype, &dev)).unwrap();
    let out = encoder.forward(&ids, &mask).unwrap();
    assert_eq!(out.dtype(), dtype);
    (out.to_dtype(DType::F32).unwrap(), expected)
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn mean_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().mean_all().unwrap().to_scalar().unwrap()
}

#[test]
fn config_defaults_and_layer_types() {
    let cfg = config();
    // transformers' default pattern: sliding on even layers
    assert_eq!(cfg.layer_type(0), LayerType::SlidingAttention);
    assert_eq!(cfg.layer_type(1), LayerType::FullAttention);
    assert_eq!(cfg.layer_type(2), LayerType::SlidingAttention);
    assert_eq!(cfg.rope_base(), 10000.0);
    assert_eq!(cfg.hidden_activation, "gelu_pytorch_tanh");
    let explicit: Gemma2Config = serde_json::from_str(
        r#"{"num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}"#,
    )
    .unwrap();
    assert_eq!(explicit.layer_type(0), LayerType::FullAttention);
    assert_eq!(explicit.layer_type(1), LayerType::SlidingAttention);
    assert_eq!(explicit.rope_base(), 500.0);
    assert_eq!(
        (
            explicit.hidden_size,
            explicit.head_dim,
            explicit.sliding_window
        ),
        (2304, 256, Some(4096))
    );
}

/// f32 against transformers f32 (CPU): max abs error ≤ 2e-5 (observed ≈ 1e-6 on values of magnitude ≈ 1–4).
#[test]
fn gemma2_tiny_f32_matches_transformers() {
    let (out, expected) = run(DType::F32);
    assert_eq!(out.dims(), &[2, 8, 32]);
    let err = max_abs(&(&out - &expected).unwrap());
    let scale = max_abs(&expected);
    eprintln!("gemma2_tiny f32: max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= 2e-5, "max abs error {err}");
}

/// bf16 weights and activations (norms, softmax in f32) against the f32 reference: bf16 keeps 8 mantissa bits,
/// so allow max abs error ≤ 0.1 and mean abs error ≤ 0.02 on outputs of magnitude ≈ 1–4.
#[test]
fn gemma2_tiny_bf16_close_to_f32_reference() {
    let (out, expected) = run(DType::BF16);
    let diff = (&out - &expected).unwrap();
    let (err, mean) = (max_abs(&diff), mean_abs(&diff));
    eprintln!("gemma2_tiny bf16: max abs err {err:.3e}, mean abs err {mean:.3e}");
    assert!(err <= 0.1 && mean <= 0.02, "max abs {err}, mean abs {mean}");
}

/// The sliding window must bite: full attention on every layer gives a clearly different output.
#[test]
fn sliding_window_changes_the_output() {
    let dev = Device::Cpu;
    let weights = Weights::from_files(&[fixture("gemma2_tiny.safetensors")]).unwrap();
    let ids = weights.load("io.input_ids", DType::U32, &dev).unwrap();
    let mask = weights.load("io.attention_mask", DType::F32, &dev).unwrap();
    let expected = weights
        .load("io.last_hidden_state", DType::F32, &dev)
        .unwrap();
    let mut cfg = config();
    cfg.sliding_window = None;
    let encoder = Gemma2Encoder::new(&cfg, weights.var_builder(DType::F32, &dev)).unwrap();
    let out = encoder.forward(&ids, &mask).unwrap();
    assert!(max_abs(&(&out - &expected).unwrap()) > 1e-3);
}

#[test]
fn missing_folder_is_a_missing_error() {
    let err = Gemma2Encoder::load(&fixture("no-such-text-encoder"), DType::F32, &Device::Cpu)
        .unwrap_err();
    assert!(matches!(err, sana_sprint::Error::Missing { .. }), "{err}");
}
