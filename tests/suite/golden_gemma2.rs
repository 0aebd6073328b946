//! Gemma-2 encoder parity with transformers' `Gemma2Model`:
//! - `gemma2_tiny` (tools/golden/make_golden.py): 3 layers, GQA (4 query / 2 key-value heads), attention softcap
//!   50, jittered (1 + w) norms, right padding, and a sliding window of 5 < sequence length 8 on layers 0 and 2;
//! - `gemma2_softcap_tiny` (tools/golden/make_golden_gemma2_softcap.py): the same shape with softcap 2.0 and q/k
//!   projections scaled ×15, so about a third of the raw attention scores exceed the cap (eager attention).

use candle_core::{DType, Device, Tensor};
use sana_sprint::models::gemma2::{Gemma2Config, Gemma2Encoder, LayerType};
use sana_sprint::models::weights::Weights;

use crate::common::{self, fixture_path};

/// Runs the encoder built from `cfg` in `dtype` on the inputs of fixture `name`; returns (ours, reference) as f32.
fn run_with(name: &str, cfg: &Gemma2Config, dtype: DType) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let path = fixture_path(&format!("{name}.safetensors"));
    let weights = Weights::from_files(std::slice::from_ref(&path)).unwrap();
    let ids = weights.load("io.input_ids", DType::U32, &dev).unwrap();
    let mask = weights.load("io.attention_mask", DType::F32, &dev).unwrap();
    let expected = weights
        .load("io.last_hidden_state", DType::F32, &dev)
        .unwrap();
    let encoder = Gemma2Encoder::new(cfg, weights.var_builder(dtype, &dev)).unwrap();
    let out = encoder.forward(&ids, &mask).unwrap();
    assert_eq!(out.dtype(), dtype);
    (out.to_dtype(DType::F32).unwrap(), expected)
}

fn config() -> Gemma2Config {
    common::fixture_config("gemma2_tiny")
}

/// Runs the `gemma2_tiny` encoder in `dtype`; returns (ours, reference) as f32.
fn run(dtype: DType) -> (Tensor, Tensor) {
    run_with("gemma2_tiny", &config(), dtype)
}

fn mean_abs(a: &Tensor) -> f64 {
    a.abs()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
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
    let err = common::max_abs_diff(&out, &expected);
    let scale = common::max_abs(&expected);
    eprintln!("gemma2_tiny f32: max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= 2e-5, "max abs error {err}");
}

/// bf16 weights and activations (norms, softmax in f32) against the f32 reference: bf16 keeps 8 mantissa bits,
/// so allow max abs error ≤ 0.1 and mean abs error ≤ 0.02 on outputs of magnitude ≈ 1–4.
#[test]
fn gemma2_tiny_bf16_close_to_f32_reference() {
    let (out, expected) = run(DType::BF16);
    let diff = (&out - &expected).unwrap();
    let (err, mean) = (common::max_abs(&diff), mean_abs(&diff));
    eprintln!("gemma2_tiny bf16: max abs err {err:.3e}, mean abs err {mean:.3e}");
    assert!(err <= 0.1 && mean <= 0.02, "max abs {err}, mean abs {mean}");
}

/// The sliding window must bite: full attention on every layer gives a clearly different output.
#[test]
fn sliding_window_changes_the_output() {
    let mut cfg = config();
    cfg.sliding_window = None;
    let (out, expected) = run_with("gemma2_tiny", &cfg, DType::F32);
    assert!(common::max_abs_diff(&out, &expected) > 1e-3);
}

fn softcap_config() -> Gemma2Config {
    common::fixture_config("gemma2_softcap_tiny")
}

/// The fixture is one where the cap bites: its generator recorded raw scores well above the cap.
#[test]
fn softcap_fixture_reaches_the_cap() {
    let cfg = softcap_config();
    assert_eq!(cfg.attn_logit_softcapping, Some(2.0));
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("gemma2_softcap_tiny.json")).unwrap(),
    )
    .unwrap();
    let max_raw = meta["max_abs_raw_score"].as_f64().unwrap();
    let above = meta["fraction_raw_scores_above_cap"].as_f64().unwrap();
    assert!(max_raw > 3.0 * 2.0, "max |raw score| {max_raw}");
    assert!(above > 0.1, "fraction of raw scores above the cap {above}");
}

/// Softcap 2.0 with scores up to ≈ 9.5: ours matches transformers (eager) to max abs error ≤ 2e-5 in f32
/// (same bound as `gemma2_tiny`; outputs of magnitude ≈ 1–4).
#[test]
fn gemma2_softcap_tiny_f32_matches_transformers() {
    let (out, expected) = run_with("gemma2_softcap_tiny", &softcap_config(), DType::F32);
    assert_eq!(out.dims(), &[2, 8, 32]);
    common::assert_max_abs("gemma2_softcap_tiny f32", &out, &expected, 2e-5);
}

/// The softcap must bite: the same weights without the cap give an output far outside the tolerance
/// (transformers: max abs difference ≈ 1.6, recorded as `max_abs_diff_without_softcap`).
#[test]
fn softcap_changes_the_output() {
    let mut cfg = softcap_config();
    cfg.attn_logit_softcapping = None;
    let (out, expected) = run_with("gemma2_softcap_tiny", &cfg, DType::F32);
    let diff = common::max_abs_diff(&out, &expected);
    println!("gemma2_softcap_tiny without softcap: max abs diff {diff:.3e}");
    assert!(
        diff > 0.1,
        "removing the softcap changed the output by only {diff:.3e}"
    );
}

#[test]
fn missing_folder_is_a_missing_error() {
    let err = Gemma2Encoder::load(
        &fixture_path("no-such-text-encoder"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(matches!(err, sana_sprint::Error::Missing { .. }), "{err}");
}
