//! One real-width SANA-Sprint 1.6B transformer block on the CPU (D 2240, self-attention 70×32 linear, cross
//! attention 20×112 over 300 caption tokens, FFN 5600 on a 32×32 grid = 1024 tokens, batch 1, f32, random
//! weights): forward, forward + JVP (tangents on the tokens and on tmod), forward + backward (Var weights).
//! Run: `cargo bench --profile dev --bench sana_block [-- ITERS]`; the PyTorch counterpart is
//! tools/golden/bench_sana_block.py. Prints figures; never fails on speed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sana_sprint::models::sana::{SanaConfig, SanaTransformerBlock, SelfAttention};
use sana_sprint::nn::dual::Dual;

const GRID: usize = 32;
const CAPTION_TOKENS: usize = 300;
const VALID_CAPTION_TOKENS: usize = 120;

fn time<T>(label: &str, iters: usize, mut f: impl FnMut() -> T) -> f64 {
    f(); // warm-up
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    println!(
        "{label:<28} median {median:>8.3} s  (min {:.3} s, {iters} runs)",
        times[0]
    );
    median
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let dev = Device::Cpu;
    let cfg = SanaConfig {
        num_layers: 1,
        qk_norm: Some("rms_norm_across_heads".into()),
        ..SanaConfig::default()
    };
    let dim = cfg.inner_dim();

    // random weights (PyTorch default init) as Vars, and a frozen copy sharing their storage
    let varmap = VarMap::new();
    let trained =
        SanaTransformerBlock::new(&VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    let frozen_weights = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let frozen = SanaTransformerBlock::new(
        &VarBuilder::from_tensors(frozen_weights, DType::F32, &dev),
        &cfg,
    )?;
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();

    let x = Tensor::randn(0f32, 1.0, (1, GRID * GRID, dim), &dev)?;
    let caption = Dual::constant(Tensor::randn(0f32, 1.0, (1, CAPTION_TOKENS, dim), &dev)?);
    let mask: Vec<f32> = (0..CAPTION_TOKENS)
        .map(|i| {
            if i < VALID_CAPTION_TOKENS {
                0.0
            } else {
                -10000.0
            }
        })
        .collect();
    let bias = Tensor::from_vec(mask, (1, 1, 1, CAPTION_TOKENS), &dev)?;
    let tmod = Tensor::randn(0f32, 0.1, (1, 6 * dim), &dev)?;
    let (x_dot, tmod_dot) = (x.randn_like(0.0, 1.0)?, tmod.randn_like(0.0, 0.1)?);
    println!(
        "SANA 1.6B block: D {dim}, {params} parameters, {} tokens, {CAPTION_TOKENS} caption tokens, f32, {} threads",
        GRID * GRID,
        candle_core::utils::get_num_threads()
    );

    let run = |block: &SanaTransformerBlock, x: &Dual, tmod: &Dual| {
        block
            .forward(
                x,
                &caption,
                Some(&bias),
                tmod,
                GRID,
                GRID,
                SelfAttention::Linear,
            )
            .expect("block forward")
    };
    let forward = time("forward", iters, || {
        run(
            &frozen,
            &Dual::constant(x.clone()),
            &Dual::constant(tmod.clone()),
        )
    });
    let jvp = time("forward + JVP", iters, || {
        run(
            &frozen,
            &Dual::with_tangent(x.clone(), x_dot.clone()),
            &Dual::with_tangent(tmod.clone(), tmod_dot.clone()),
        )
    });
    let backward = time("forward + backward", iters, || {
        let out = run(
            &trained,
            &Dual::constant(x.clone()),
            &Dual::constant(tmod.clone()),
        );
        out.primal
            .sqr()
            .and_then(|s| s.sum_all())
            .and_then(|l| l.backward())
            .expect("backward")
    });
    println!(
        "ratios: JVP/forward {:.2}, backward/forward {:.2}",
        jvp / forward,
        backward / forward
    );
    Ok(())
}
