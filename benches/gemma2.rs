//! One real-size Gemma-2-2B decoder layer (D 2304, 8 heads, 4 kv heads, head_dim 256, MLP 9216; random weights)
//! on 512 tokens, batch 1, f32 on the CPU. The embedding table is cut to 256 rows and the final norm is
//! included; both are negligible next to the layer. Compare with tools/golden/bench_gemma2.py (PyTorch, same shape).
//!
//!     cargo bench --profile dev --bench gemma2

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sana_sprint::models::gemma2::{Gemma2Config, Gemma2Encoder};
use sana_sprint::synth::{self, NormWeights};

const TOKENS: usize = 512;
const VOCAB: usize = 256;
const RUNS: usize = 7;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg: Gemma2Config = serde_json::from_value(serde_json::json!({
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
    }))?;
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    // init-like random weights under the names the encoder asks for (norm weights stored as offsets from 1)
    let weights =
        synth::random_tensors(&synth::gemma_keys(&cfg)?, DType::F32, NormWeights::Zero, 1)?;
    let encoder = Gemma2Encoder::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev))?;
    let ids: Vec<u32> = (0..TOKENS as u32)
        .map(|t| (t * 37 + 11) % VOCAB as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (1, TOKENS), &dev)?;
    let mask = Tensor::ones((1, TOKENS), DType::U32, &dev)?;

    encoder.forward(&ids, &mask)?; // warm-up (thread pool, allocations)
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        let out = encoder.forward(&ids, &mask)?;
        out.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "gemma2 layer (D {d}, {h}/{kv} heads x {hd}, MLP {i}), {TOKENS} tokens, batch 1, f32 CPU, \
         {} threads: median {:.1} ms (min {:.1}, max {:.1}, {RUNS} runs)",
        rayon::current_num_threads(),
        times[RUNS / 2],
        times[0],
        times[RUNS - 1]
    );
    Ok(())
}
