//! Timing of the real-size SANA DC-AE encoder (random weights, f32, CPU); prints figures, never fails on speed.
//!
//!     cargo bench --profile dev --bench dcae [-- --size 512 --batch 1 --runs 3]
//!
//! Compare with the PyTorch figure of tools/golden/bench_dcae.py, run right before or after on the same machine.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sana_sprint::models::dcae::{DcaeConfig, DcaeEncoder};

/// The SANA 1.0 / 1.1 DC-AE `vae/config.json` (SPEC §1.2).
const SANA_VAE_CONFIG: &str = include_str!("../tests/fixtures/configs/dcae_f32c32_sana_vae.json");

/// PyTorch-like init scale: weights and biases spread over ±1/√fan_in (pseudo-random, from a sine of the
/// element index, because candle's per-element RNG is slow in a dev build), norm weights 1 and biases 0.
struct RandomInit;

impl SimpleBackend for RandomInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if name.contains("norm") {
            let value = if name.ends_with("weight") { 1.0 } else { 0.0 };
            return Tensor::full(value, s, dev)?.to_dtype(dtype);
        }
        let fan_in: usize = if s.rank() > 1 {
            s.dims()[1..].iter().product()
        } else {
            s.elem_count()
        };
        let bound = 1.0 / (fan_in as f64).sqrt();
        let phase = name.bytes().map(f64::from).sum::<f64>();
        Tensor::arange(0u32, s.elem_count() as u32, dev)?
            .to_dtype(DType::F32)?
            .affine(12.9898, phase)?
            .sin()?
            .affine(bound, 0.)?
            .reshape(s)?
            .to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random init: unchecked get of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// CPU seconds used by this process so far (all threads), from /proc/self/stat; `None` off Linux.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (size, batch, runs) = (
        arg(&args, "--size", 512),
        arg(&args, "--batch", 1),
        arg(&args, "--runs", 3),
    );
    let device = Device::Cpu;
    let cfg: DcaeConfig = serde_json::from_str(SANA_VAE_CONFIG)?;
    let vb = VarBuilder::from_backend(Box::new(RandomInit), DType::F32, device.clone());
    let encoder = DcaeEncoder::new(&cfg, vb.pp("encoder"))?;
    let image = Tensor::rand(-1f32, 1., (batch, 3, size, size), &device)?;

    let warm_up = Instant::now();
    let latent = encoder.forward(&image)?;
    let warm_up = warm_up.elapsed().as_secs_f64();
    let (mut wall, mut cpu) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs.max(1) {
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        encoder.forward(&image)?;
        wall.push(start.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu_start, cpu_seconds()) {
            cpu.push(b - a);
        }
    }
    let finite = latent
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    println!(
        "candle DC-AE encoder {batch}x3x{size}x{size} f32 cpu, {} threads: median {:.3} s wall over {} runs ({}), \
         median {} CPU-s per run; warm-up {warm_up:.3} s; latent {:?} (finite: {finite})",
        candle_core::utils::get_num_threads(),
        median(&wall),
        wall.len(),
        wall.iter()
            .map(|t| format!("{t:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        if cpu.is_empty() {
            "?".to_string()
        } else {
            format!("{:.2}", median(&cpu))
        },
        latent.dims(),
    );
    Ok(())
}
