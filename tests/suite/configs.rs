//! `config.json` fields read as diffusers / transformers read them. Each fixture under `tests/fixtures/configs/`
//! is a config in a spelling, or with optional fields null or absent, that the reference accepts; what the
//! reference classes resolved it to (and the shape of every weight they build) is in
//! `tests/fixtures/configs/resolved.json`, written by tools/golden/make_config_fixtures.py. `*_refused_*` configs
//! are ones the reference refuses, or builds into a network we do not implement: ours must refuse them by name.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sana_sprint::models::dcae::{
    Activation, AutoencoderDc, BlockType, DcaeConfig, DownsampleType, NormType, UpsampleType,
};
use sana_sprint::models::gemma2::{Gemma2Config, Gemma2Encoder, LayerType};
use sana_sprint::models::sana::{SanaConfig, SanaTransformer2DModel};
use sana_sprint::models::weights::Weights;

use crate::common::{self, fixture_path};

fn config_path(name: &str) -> PathBuf {
    fixture_path("configs").join(name)
}

/// What the reference resolved `name` to.
fn resolved(name: &str) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config_path("resolved.json")).unwrap())
            .unwrap();
    let entry = all[name].clone();
    assert!(entry.is_object(), "no resolved entry for {name}");
    entry
}

/// A VarBuilder holding zeros of exactly the shapes the reference model built from `name` has: building our
/// model from it fails if we read any weight the reference does not have, or read it with another shape.
fn reference_shapes(name: &str) -> VarBuilder<'static> {
    let shapes = resolved(name)["shapes"].as_object().unwrap().clone();
    let tensors: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(k, v)| {
            let dims: Vec<usize> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k, Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap())
        })
        .collect();
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}

fn json_config<T: serde::de::DeserializeOwned>(name: &str) -> T {
    serde_json::from_str(&std::fs::read_to_string(config_path(name)).unwrap()).unwrap()
}

// ------------------------------------------------------------------------------------------------ DC-AE

fn dcae(name: &str) -> DcaeConfig {
    DcaeConfig::from_file(&config_path(name)).unwrap()
}

/// Checks our parse of a DC-AE fixture against the reference's resolution, and builds it from the reference's
/// weight shapes.
fn check_dcae_against_reference(name: &str) -> DcaeConfig {
    let cfg = dcae(name);
    let r = resolved(name);
    assert_eq!(r["built"], true, "{name}: {r}");
    let unshuffle = cfg.downsample_block_type == DownsampleType::PixelUnshuffle;
    assert_eq!(
        r["downsample_pixel_unshuffle"],
        serde_json::json!([unshuffle]),
        "{name}"
    );
    let interpolate = cfg.upsample_block_type == UpsampleType::Interpolate;
    assert_eq!(
        r["upsample_interpolate"],
        serde_json::json!([interpolate]),
        "{name}"
    );
    assert_eq!(r["scaling_factor"].as_f64().unwrap(), cfg.scaling_factor);
    assert_eq!(
        r["spatial_compression"].as_u64().unwrap() as usize,
        cfg.spatial_compression()
    );
    let torch_act = |a: Activation| match a {
        Activation::Silu => "SiLU",
        Activation::Relu => "ReLU",
        Activation::Gelu => "GELU",
    };
    assert_eq!(r["decoder_conv_act"], torch_act(cfg.decoder_conv_act_fn));
    AutoencoderDc::new(cfg.clone(), reference_shapes(name))
        .unwrap_or_else(|e| panic!("{name}: building from the reference's weight shapes: {e}"));
    cfg
}

/// Lower-case `"conv"`, per-stage lists for norms and activations, activation names in any case and unknown
/// keys: diffusers builds the `dcae_tiny` network from it, and so must we (same outputs on its weights).
#[test]
fn dcae_other_spellings_build_the_same_network() {
    let name = "dcae_tiny_spellings.json";
    let cfg = check_dcae_against_reference(name);
    assert_eq!(cfg.downsample_block_type, DownsampleType::Conv);
    assert_eq!(cfg.upsample_block_type, UpsampleType::Interpolate);
    assert_eq!(
        cfg.decoder_act_fns.resolve(3, "decoder_act_fns").unwrap(),
        vec![Activation::Silu; 3]
    );
    assert_eq!(
        cfg.decoder_norm_types
            .resolve(3, "decoder_norm_types")
            .unwrap(),
        vec![NormType::RmsNorm; 3]
    );
    assert_eq!(cfg.decoder_conv_act_fn, Activation::Relu);
    let canonical: DcaeConfig = common::fixture_config("dcae_tiny");
    // Same weights, same outputs as the canonical spelling.
    let weights = || Weights::from_files(&[fixture_path("dcae_tiny.safetensors")]).unwrap();
    let ours = AutoencoderDc::new(cfg, weights().var_builder(DType::F32, &Device::Cpu)).unwrap();
    let reference =
        AutoencoderDc::new(canonical, weights().var_builder(DType::F32, &Device::Cpu)).unwrap();
    let image = weights()
        .load("io.image_32", DType::F32, &Device::Cpu)
        .unwrap();
    let want = weights()
        .load("io.latent_32", DType::F32, &Device::Cpu)
        .unwrap();
    let latent = ours.encode(&image).unwrap();
    common::assert_close("spellings: encode vs diffusers", &latent, &want, 1e-5);
    common::assert_max_abs(
        "spellings: decode vs canonical spelling",
        &ours.decode(&want).unwrap(),
        &reference.decode(&want).unwrap(),
        0.0,
    );
}

/// diffusers only tests `downsample_block_type == "pixel_unshuffle"`: any other value is the strided conv. A
/// single string for `encoder_block_types` applies to every stage.
#[test]
fn dcae_any_other_downsample_type_is_a_strided_conv() {
    let cfg = check_dcae_against_reference("dcae_any_downsample_is_conv.json");
    assert_eq!(cfg.downsample_block_type, DownsampleType::Conv);
    assert_eq!(
        cfg.encoder_block_types
            .resolve(3, "encoder_block_types")
            .unwrap(),
        vec![BlockType::ResBlock; 3]
    );
}

/// diffusers only tests `upsample_block_type == "interpolate"` (case-sensitive): `"Interpolate"` builds the
/// pixel-shuffle block.
#[test]
fn dcae_capitalised_interpolate_is_pixel_shuffle() {
    let cfg = check_dcae_against_reference("dcae_capitalised_interpolate_is_pixel_shuffle.json");
    assert_eq!(cfg.upsample_block_type, UpsampleType::PixelShuffle);
}

/// Absent optional fields take `AutoencoderDC.__init__`'s defaults (pixel (un)shuffle, RMSNorm, SiLU, ReLU
/// before conv_out, scaling factor 1, both shortcuts).
#[test]
fn dcae_absent_optionals_take_the_diffusers_defaults() {
    let cfg = check_dcae_against_reference("dcae_absent_optionals.json");
    assert_eq!(cfg.in_channels, 3);
    assert_eq!(cfg.downsample_block_type, DownsampleType::PixelUnshuffle);
    assert_eq!(cfg.upsample_block_type, UpsampleType::PixelShuffle);
    assert_eq!(cfg.scaling_factor, 1.0);
    assert!(cfg.encoder_out_shortcut && cfg.decoder_in_shortcut);
}

/// Refused with the offending value named: a block type diffusers itself rejects (it compares case-sensitively),
/// and a norm / activation diffusers builds into a network we do not implement.
#[test]
fn dcae_unimplemented_or_invalid_values_are_refused_by_name() {
    for (name, needle, reference_builds) in [
        ("dcae_refused_block_case.json", "\"resblock\"", false),
        ("dcae_refused_layer_norm.json", "\"layer_norm\"", true),
        ("dcae_refused_mish.json", "\"mish\"", true),
    ] {
        assert_eq!(resolved(name)["built"], reference_builds, "{name}");
        let msg = DcaeConfig::from_file(&config_path(name))
            .unwrap_err()
            .to_string();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
}

// ------------------------------------------------------------------------------------------------ SANA

fn check_sana_against_reference(name: &str) -> SanaConfig {
    let cfg: SanaConfig = json_config(name);
    let r = resolved(name);
    assert_eq!(r["built"], true, "{name}: {r}");
    assert_eq!(
        r["out_channels"].as_u64().unwrap() as usize,
        cfg.out_channels()
    );
    assert_eq!(r["guidance_embedder"], cfg.guidance_embeds);
    assert_eq!(r["sample_size"].as_u64().unwrap() as usize, cfg.sample_size);
    assert_eq!(r["qk_norm"].as_str(), cfg.qk_norm.as_deref());
    assert_eq!(r["attention_bias"], cfg.attention_bias);
    assert_eq!(r["pos_embed"], cfg.interpolation_scale.is_some());
    cfg
}

/// `null` for `out_channels` (→ in_channels), `guidance_embeds`, `attention_bias`, `norm_elementwise_affine`
/// (falsy) and `interpolation_scale` (no positional embedding), plus unknown keys.
#[test]
fn sana_nulls_read_as_diffusers_reads_them() {
    let name = "sana_nulls.json";
    let cfg = check_sana_against_reference(name);
    assert_eq!(cfg.out_channels, None);
    assert!(!cfg.guidance_embeds && !cfg.attention_bias && !cfg.norm_elementwise_affine);
    SanaTransformer2DModel::new(&cfg, reference_shapes(name))
        .unwrap_or_else(|e| panic!("{name}: building from the reference's weight shapes: {e}"));
}

/// Absent optional fields take `SanaTransformer2DModel.__init__`'s defaults; `out_channels: 0` means
/// `in_channels` (`out_channels or in_channels`).
#[test]
fn sana_absent_optionals_take_the_diffusers_defaults() {
    let name = "sana_absent_optionals.json";
    let cfg = check_sana_against_reference(name);
    assert_eq!(cfg.out_channels(), cfg.in_channels);
    assert_eq!((cfg.sample_size, cfg.patch_size), (32, 1));
    assert_eq!(cfg.qk_norm, None);
    SanaTransformer2DModel::new(&cfg, reference_shapes(name))
        .unwrap_or_else(|e| panic!("{name}: building from the reference's weight shapes: {e}"));
}

/// diffusers builds per-head q/k RMSNorms (`qk_norm: "rms_norm"`) and a sincos positional embedding
/// (`interpolation_scale` set); we implement neither and must say which field.
#[test]
fn sana_unimplemented_values_are_refused_by_name() {
    for (name, needle) in [
        ("sana_refused_qk_norm_per_head.json", "qk_norm"),
        (
            "sana_refused_interpolation_scale.json",
            "interpolation_scale",
        ),
    ] {
        assert_eq!(resolved(name)["built"], true, "{name}");
        let cfg: SanaConfig = json_config(name);
        let msg = cfg.validate().unwrap_err();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
}

// ------------------------------------------------------------------------------------------------ Gemma-2

fn check_gemma2_against_reference(name: &str) -> Gemma2Config {
    let cfg = Gemma2Config::from_file(&config_path(name)).unwrap();
    let r = resolved(name);
    assert_eq!(r["built"], true, "{name}: {r}");
    let types: Vec<&str> = (0..cfg.num_hidden_layers)
        .map(|i| match cfg.layer_type(i) {
            LayerType::SlidingAttention => "sliding_attention",
            LayerType::FullAttention => "full_attention",
        })
        .collect();
    assert_eq!(r["layer_types"], serde_json::json!(types), "{name}");
    assert_eq!(r["rope_type"], "default", "{name}");
    assert_eq!(r["rope_theta"].as_f64().unwrap(), cfg.rope_base(), "{name}");
    assert_eq!(
        r["sliding_window"].as_u64().map(|w| w as usize),
        cfg.sliding_window,
        "{name}"
    );
    assert_eq!(
        r["attn_logit_softcapping"].as_f64(),
        cfg.attn_logit_softcapping,
        "{name}"
    );
    assert_eq!(
        r["query_pre_attn_scalar"].as_f64().unwrap(),
        cfg.query_pre_attn_scalar,
        "{name}"
    );
    assert_eq!(r["hidden_activation"], cfg.hidden_activation, "{name}");
    assert_eq!(r["head_dim"].as_u64().unwrap() as usize, cfg.head_dim);
    cfg
}

/// A transformers-4 style config: top-level `rope_theta`, `rope_scaling: null`, a `hidden_act` that Gemma-2
/// ignores (it reads `hidden_activation`, absent → gelu_pytorch_tanh), null softcaps and window, no
/// `layer_types` (sliding on even layers).
#[test]
fn gemma2_legacy_config_with_nulls() {
    let cfg = check_gemma2_against_reference("gemma2_legacy_nulls.json");
    assert_eq!(cfg.attn_logit_softcapping, None);
    assert_eq!(cfg.sliding_window, None);
    assert_eq!(cfg.rope_base(), 500.0);
}

/// `rope_scaling: {"rope_type": "default"}` is plain RoPE with the top-level `rope_theta`.
#[test]
fn gemma2_legacy_default_rope_scaling() {
    let cfg = check_gemma2_against_reference("gemma2_legacy_rope_scaling_default.json");
    assert_eq!(cfg.rope_base(), 250.0);
}

/// A transformers-5 style config: `rope_parameters`, explicit `layer_types`, exact-erf `gelu`.
#[test]
fn gemma2_v5_config_with_explicit_fields() {
    let cfg = check_gemma2_against_reference("gemma2_v5_explicit.json");
    assert_eq!(cfg.layer_type(0), LayerType::FullAttention);
    assert_eq!(cfg.layer_type(1), LayerType::SlidingAttention);
    assert_eq!(cfg.rope_base(), 1000.0);
}

/// transformers builds linear-scaled RoPE from a legacy `rope_scaling: {"type": "linear"}`; we implement only
/// default RoPE and must refuse by name rather than silently build plain RoPE.
#[test]
fn gemma2_scaled_rope_is_refused_by_name() {
    let name = "gemma2_refused_rope_linear.json";
    let r = resolved(name);
    assert_eq!(
        (r["built"].clone(), r["rope_type"].clone()),
        (true.into(), "linear".into())
    );
    let msg = Gemma2Config::from_file(&config_path(name))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("rope_scaling") && msg.contains("linear"),
        "{msg}"
    );
}

/// Every fixture that the reference builds and we accept also builds our encoder from the reference's shapes
/// (the Gemma-2 fixtures carry no shape list: build from zero weights of the config's own sizes).
#[test]
fn gemma2_accepted_fixtures_build() {
    for name in [
        "gemma2_legacy_nulls.json",
        "gemma2_legacy_rope_scaling_default.json",
        "gemma2_v5_explicit.json",
    ] {
        let cfg = Gemma2Config::from_file(&config_path(name)).unwrap();
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        Gemma2Encoder::new(&cfg, vb).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
