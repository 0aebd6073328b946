//! One SanaTransformer2DModel forward on inputs from a safetensors file (used by tools/verify_export.py).
//!
//! Usage: `cargo run --example sana_forward -- TRANSFORMER_DIR INPUT OUTPUT`
//!
//! TRANSFORMER_DIR is a diffusers `transformer/` folder (config.json + diffusion_pytorch_model*.safetensors;
//! extra keys such as `logvar_linear.*` are ignored). INPUT holds `x` (B, C, H, W), `y` (B, L, caption_channels),
//! `timestep` (B,) flow time τ, and optionally `mask` (B, L) {1 keep, 0 drop} and `guidance` (B,) (already
//! scaled; required by a guidance_embeds model, refused by the others). OUTPUT receives the velocity as `out`
//! (B, C_out, H, W), float32. Everything runs in float32 on the CPU.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use sana_sprint::models::sana::SanaTransformer2DModel;
use sana_sprint::nn::dual::Dual;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, input, output] = args.as_slice() else {
        bail!("usage: sana_forward TRANSFORMER_DIR INPUT OUTPUT");
    };
    let (dir, input, output) = (
        PathBuf::from(dir),
        PathBuf::from(input),
        PathBuf::from(output),
    );
    let device = Device::Cpu;
    let model = SanaTransformer2DModel::load(&dir, DType::F32, &device)
        .with_context(|| format!("loading the transformer from {}", dir.display()))?;
    let inputs = candle_core::safetensors::load(&input, &device)
        .with_context(|| format!("reading {}", input.display()))?;
    let get = |name: &str| -> Result<Tensor> {
        inputs
            .get(name)
            .with_context(|| format!("{} has no tensor `{name}`", input.display()))?
            .to_dtype(DType::F32)
            .map_err(Into::into)
    };
    let optional = |name: &str| inputs.contains_key(name).then(|| get(name)).transpose();

    let x = Dual::constant(get("x")?);
    let timestep = Dual::constant(get("timestep")?);
    let y = get("y")?;
    let mask = optional("mask")?;
    let guidance = optional("guidance")?;
    let out = model.forward(&x, &y, &timestep, guidance.as_ref(), mask.as_ref())?;

    let tensors = HashMap::from([("out".to_string(), out.primal.to_dtype(DType::F32)?)]);
    candle_core::safetensors::save(&tensors, &output)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}
