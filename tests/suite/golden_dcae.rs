//! DC-AE parity against diffusers `AutoencoderDC` (fixtures from tools/golden/make_golden.py and
//! tools/golden/make_golden_dcae_variants.py, torch 2.15 / diffusers 0.42.1, f32 CPU), the real SANA
//! checkpoint's key list, and load errors.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sana_sprint::models::dcae::{
    Activation, AutoencoderDc, BlockType, DcaeConfig, DcaeEncoder, DownsampleType, NormType,
    PerStage, UpsampleType,
};
use sana_sprint::models::weights::Weights;
use sana_sprint::synth;
use sana_sprint::Error;

/// f32 parity tolerance (max abs error) for every output compared here.
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A diffusers-layout `vae/` folder made from a fixture: its config as config.json, its safetensors as
/// diffusion_pytorch_model.safetensors.
fn vae_folder(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap())
            .unwrap();
    std::fs::write(dir.path().join("config.json"), meta["config"].to_string()).unwrap();
    std::fs::copy(
        fixture(&format!("{name}.safetensors")),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dir
}

fn io(name: &str, key: &str) -> Tensor {
    Weights::from_files(&[fixture(&format!("{name}.safetensors"))])
        .unwrap()
        .load(&format!("io.{key}"), DType::F32, &Device::Cpu)
        .unwrap()
}

/// Asserts `got` matches `want` within TOLERANCE (max abs) and prints the error relative to max |ref| too.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let (max_abs, scale) = (common::max_abs_diff(got, want), common::max_abs(want));
    println!(
        "{what}: max abs err {max_abs:.3e}, relative to max |ref| {:.3e} (max |ref| = {scale:.3})",
        max_abs / scale
    );
    assert!(
        max_abs <= f64::from(TOLERANCE),
        "{what}: max abs err {max_abs} > {TOLERANCE}"
    );
}

fn load_tiny(name: &str) -> AutoencoderDc {
    let dir = vae_folder(name);
    AutoencoderDc::load(dir.path(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn tiny_linear_attention_branch_matches_diffusers() {
    // 32x32 image: the EfficientViT stage runs at 8x8 = 64 pixels > head_dim 4 (linear attention).
    let ae = load_tiny("dcae_tiny");
    assert_eq!(ae.spatial_compression(), 4);
    assert_eq!(ae.config().scaling_factor, 0.41407);
    let latent = ae.encode(&io("dcae_tiny", "image_32")).unwrap();
    assert_close("encode 32x32", &latent, &io("dcae_tiny", "latent_32"));
    let decoded = ae.decode(&io("dcae_tiny", "latent_32")).unwrap();
    assert_close(
        "decode 8x8 latent",
        &decoded,
        &io("dcae_tiny", "decoded_32"),
    );
}

#[test]
fn tiny_quadratic_attention_branch_matches_diffusers() {
    // 8x8 image: the EfficientViT stage runs at 2x2 = 4 pixels <= head_dim 4 (quadratic attention).
    let ae = load_tiny("dcae_tiny");
    let latent = ae.encode(&io("dcae_tiny", "image_8")).unwrap();
    assert_close("encode 8x8", &latent, &io("dcae_tiny", "latent_8"));
    let decoded = ae.decode(&io("dcae_tiny", "latent_8")).unwrap();
    assert_close("decode 2x2 latent", &decoded, &io("dcae_tiny", "decoded_8"));
}

#[test]
fn tiny_batched_encode_and_decode_match_per_item_reference() {
    let ae = load_tiny("dcae_tiny");
    let image = io("dcae_tiny", "image_32");
    let flipped = image.flip(&[3]).unwrap();
    let batch = Tensor::cat(&[&image, &flipped], 0).unwrap();
    let latents = ae.encode(&batch).unwrap();
    assert_close(
        "batched encode, item 0",
        &latents.narrow(0, 0, 1).unwrap(),
        &io("dcae_tiny", "latent_32"),
    );
    assert_close(
        "batched encode, item 1",
        &latents.narrow(0, 1, 1).unwrap(),
        &ae.encode(&flipped).unwrap(),
    );
    let decoded = ae.decode(&latents).unwrap();
    assert_close(
        "batched decode, item 0",
        &decoded.narrow(0, 0, 1).unwrap(),
        &io("dcae_tiny", "decoded_32"),
    );
}

#[test]
fn variant_config_paths_match_diffusers() {
    // Empty first stage, pixel (un)shuffle, BatchNorm, relu/gelu, two multiscale kernels, an attention
    // without multiscale branch, no in/out shortcuts, batch of 2, linear and quadratic attention.
    let ae = load_tiny("dcae_variant_tiny");
    let cfg = ae.config();
    assert_eq!(cfg.downsample_block_type, DownsampleType::PixelUnshuffle);
    assert_eq!(cfg.upsample_block_type, UpsampleType::PixelShuffle);
    assert_eq!(ae.spatial_compression(), 8);
    let latent = ae.encode(&io("dcae_variant_tiny", "image")).unwrap();
    assert_close(
        "variant encode (B=2)",
        &latent,
        &io("dcae_variant_tiny", "latent"),
    );
    let decoded = ae.decode(&io("dcae_variant_tiny", "latent")).unwrap();
    assert_close(
        "variant decode (B=2)",
        &decoded,
        &io("dcae_variant_tiny", "decoded"),
    );
}

#[test]
fn encoder_alone_loads_and_matches() {
    let dir = vae_folder("dcae_tiny");
    let encoder = DcaeEncoder::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let latent = encoder.forward(&io("dcae_tiny", "image_32")).unwrap();
    assert_close("encoder-only load", &latent, &io("dcae_tiny", "latent_32"));
}

#[test]
fn indivisible_or_wrong_inputs_are_rejected() {
    let ae = load_tiny("dcae_tiny");
    let odd = Tensor::zeros((1, 3, 30, 32), DType::F32, &Device::Cpu).unwrap();
    let msg = ae.encode(&odd).unwrap_err().to_string();
    assert!(msg.contains("30x32") && msg.contains("4"), "{msg}");
    let gray = Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(ae
        .encode(&gray)
        .unwrap_err()
        .to_string()
        .contains("channels"));
    let latent = Tensor::zeros((1, 5, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(ae
        .decode(&latent)
        .unwrap_err()
        .to_string()
        .contains("channels"));
}

/// The SANA 1.0 / 1.1 DC-AE `vae/config.json` (docs/ALGORITHM.md §2.2).
const SANA_VAE_CONFIG: &str = include_str!("../../data/configs/dcae_f32c32_sana_vae.json");

#[test]
fn sana_config_builds_exactly_the_checkpoint_keys() {
    let cfg: DcaeConfig = serde_json::from_str(SANA_VAE_CONFIG).unwrap();
    assert_eq!(cfg.spatial_compression(), 32);
    assert_eq!(cfg.decoder_norm_types, PerStage::All(NormType::RmsNorm));
    assert_eq!(cfg.decoder_act_fns, PerStage::All(Activation::Silu));
    assert_eq!(cfg.downsample_block_type, DownsampleType::Conv);
    assert_eq!(cfg.upsample_block_type, UpsampleType::Interpolate);
    // synth::record_keys builds the real-size model without allocating it and refuses names requested twice
    let mut spatial = 0;
    let requested = synth::record_keys(|vb| {
        spatial = AutoencoderDc::new(cfg, vb)?.spatial_compression();
        Ok(())
    })
    .unwrap();
    assert_eq!(spatial, 32);
    let built: BTreeMap<String, Vec<usize>> = requested.into_iter().collect();

    let expected = common::reference_keys("dcae_f32c32_sana_vae.txt");
    assert_eq!(expected.len(), 375);
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !built.contains_key(*k))
        .collect();
    let unexpected: Vec<_> = built
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys the model does not load: {missing:?}"
    );
    assert!(
        unexpected.is_empty(),
        "keys not in the checkpoint: {unexpected:?}"
    );
    for (name, shape) in &expected {
        assert_eq!(&built[name], shape, "shape of {name}");
    }
    let params: usize = expected.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 312_250_275);
}

#[test]
fn config_defaults_and_per_stage_lists() {
    let cfg: DcaeConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.in_channels, 3);
    assert_eq!(cfg.latent_channels, 32);
    assert_eq!(cfg.encoder_layers_per_block, vec![2, 2, 2, 3, 3, 3]);
    assert_eq!(cfg.decoder_layers_per_block, vec![3; 6]);
    assert_eq!(cfg.encoder_block_types, PerStage::All(BlockType::ResBlock));
    assert_eq!(cfg.downsample_block_type, DownsampleType::PixelUnshuffle);
    assert_eq!(cfg.upsample_block_type, UpsampleType::PixelShuffle);
    assert_eq!(cfg.decoder_conv_act_fn, Activation::Relu);
    assert!(cfg.encoder_out_shortcut && cfg.decoder_in_shortcut);
    assert_eq!(cfg.scaling_factor, 1.0);
    let listed: DcaeConfig = serde_json::from_str(
        r#"{"decoder_norm_types": ["batch_norm", "rms_norm"], "decoder_act_fns": ["relu", "swish"]}"#,
    )
    .unwrap();
    assert_eq!(
        listed.decoder_norm_types,
        PerStage::Each(vec![NormType::BatchNorm, NormType::RmsNorm])
    );
    assert_eq!(
        listed.decoder_act_fns,
        PerStage::Each(vec![Activation::Relu, Activation::Silu])
    );
    let err = serde_json::from_str::<DcaeConfig>(r#"{"decoder_act_fns": "relu6"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("relu6") && err.contains("supported"), "{err}");
    // diffusers only tests `upsample_block_type == "interpolate"`: any other value builds pixel_shuffle.
    let other =
        serde_json::from_str::<DcaeConfig>(r#"{"upsample_block_type": "ConvPixelShuffle"}"#)
            .unwrap();
    assert_eq!(other.upsample_block_type, UpsampleType::PixelShuffle);
}

#[test]
fn unsupported_config_fails_loudly_at_load() {
    let dir = vae_folder("dcae_tiny");
    // Two decoder norm types for a three-stage model.
    let config = dir.path().join("config.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    meta["decoder_norm_types"] = serde_json::json!(["rms_norm", "rms_norm"]);
    std::fs::write(&config, meta.to_string()).unwrap();
    let err = AutoencoderDc::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Model { .. }), "{msg}");
    assert!(
        msg.contains("config.json") && msg.contains("decoder_norm_types"),
        "{msg}"
    );
}

#[test]
fn missing_folder_config_or_truncated_weights_give_clear_errors() {
    let missing = Path::new("/nonexistent/sana/vae");
    match AutoencoderDc::load(missing, DType::F32, &Device::Cpu) {
        Err(Error::Missing { path, hint, .. }) => {
            assert_eq!(path, missing);
            assert!(hint.contains("vae/"), "{hint}");
        }
        other => panic!("expected a Missing error, got {:?}", other.err()),
    }

    let empty = tempfile::tempdir().unwrap();
    match AutoencoderDc::load(empty.path(), DType::F32, &Device::Cpu) {
        Err(Error::Missing { path, .. }) => assert_eq!(path, empty.path().join("config.json")),
        other => panic!("expected a Missing error, got {:?}", other.err()),
    }

    let dir = vae_folder("dcae_tiny");
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let msg = AutoencoderDc::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );

    // A checkpoint of another config: the error names the tensor and the file.
    let dir = vae_folder("dcae_tiny");
    let config = dir.path().join("config.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    meta["latent_channels"] = serde_json::json!(8);
    std::fs::write(&config, meta.to_string()).unwrap();
    let msg = AutoencoderDc::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("encoder.conv_out.weight")
            && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
}
