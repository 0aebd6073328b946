//! `--device` and `--mixed_precision`, shared by sprint-prep, sprint-train, validation and sprint-bench.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// `--mixed_precision`: the dtype models compute in ([`MixedPrecision::dtype`]). `no` is f32 everywhere. `bf16`
/// means, per binary: sprint-prep runs Gemma-2 in bf16 as the reference script does (the DC-AE encoder always
/// runs in f32, as in the reference); sprint-train runs the teacher and the student in bf16 over f32 master weights
/// and f32 AdamW state (the small discriminator heads stay f32: the teacher's features are cast to f32 for them),
/// and its validation encodes the prompts with Gemma-2 and samples the student in bf16 (the DC-AE decoder stays
/// f32); sprint-bench measures the same work in bf16.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    No,
    Bf16,
}

impl MixedPrecision {
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Bf16 => "bf16",
        }
    }

    /// The compute dtype: f32 for `no`, bf16 for `bf16`.
    pub fn dtype(self) -> DType {
        match self {
            MixedPrecision::No => DType::F32,
            MixedPrecision::Bf16 => DType::BF16,
        }
    }
}

/// `cuda` when built with the CUDA feature, else `cpu`.
pub fn default_device() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "cpu"
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| {
                    n.parse()
                        .map_err(|_| Error::Arg(format!("bad device {s:?}: expected cuda:N")))
                })
                .transpose()?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                return Err(Error::Arg(format!(
                    "--device {s}: this binary was built without CUDA; rebuild with `cargo build --release --features cuda` or use --device cpu"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        _ => Err(Error::Arg(format!(
            "bad device {s:?}: expected cpu, cuda or cuda:N"
        ))),
    }
}
