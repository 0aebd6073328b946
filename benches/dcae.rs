//! Timing of the real-size SANA DC-AE encoder (random weights, f32, CPU); prints figures, never fails on speed.
//!
//!     cargo bench --profile dev --bench dcae [-- --size 512 --batch 1 --runs 3]
//!
//! Compare with the PyTorch figure of tools/golden/bench_dcae.py, run right before or after on the same machine.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sana_sprint::models::dcae::{DcaeConfig, DcaeEncoder};
use sana_sprint::synth::{DeviceRandom, NormWeights, SANA_VAE_CONFIG};

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
    // init-like random weights (U(±1/√fan_in), norm weights 1, biases 0), as sprint-bench uses
    let vb = VarBuilder::from_backend(
        Box::new(DeviceRandom {
            norm: NormWeights::One,
        }),
        DType::F32,
        device.clone(),
    );
    let encoder = DcaeEncoder::new(&cfg, vb.pp("encoder"))?;
    let image = Tensor::rand(-1f32, 1., (batch, 3, size, size), &device)?;

    let warm_up = Instant::now();
    let latent = encoder.forward(&image)?;
    let warm_up = warm_up.elapsed().as_secs_f64();
    let (mut wall, mut cpu) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs.max(1) {
        let (start, cpu_start) = (Instant::now(), sana_sprint::system::cpu_seconds());
        encoder.forward(&image)?;
        wall.push(start.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu_start, sana_sprint::system::cpu_seconds()) {
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
