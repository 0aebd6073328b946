//! One real-width SANA-Sprint 1.6B transformer block on the CPU (D 2240, self-attention 70×32 linear, cross
//! attention 20×112 over 300 caption tokens, FFN 5600 on a 32×32 grid = 1024 tokens, batch 1, f32, random
//! weights): the FFN's widest matmul alone (the matmul library's rate), forward (frozen weights), forward
//! with Var weights (graph kept), forward + JVP (tangents on the tokens and on tmod), forward + backward (Var
//! weights). Prints median times, then the peak memory of each
//! pass, each measured once in a fresh child process (VmHWM from /proc/self/status, reset through
//! /proc/self/clear_refs after the set-up; Linux/glibc).
//! Run: `cargo bench --bench sana_block [-- ITERS] [--only 'forward + backward']` (`--only` times one pass
//! and skips the memory children, for a profiler). The release profile: the FFN's depthwise conv runs this
//! crate's own CPU loops, which the dev profile builds at opt-level 1 (there the pass is ~1.5x slower). The
//! PyTorch counterpart is tools/golden/bench_sana_block.py. Never fails on speed.

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sana_sprint::models::sana::{SanaConfig, SanaTransformerBlock, SelfAttention};
use sana_sprint::nn::dual::Dual;

const GRID: usize = 32;
const CAPTION_TOKENS: usize = 300;
const VALID_CAPTION_TOKENS: usize = 120;
/// Set in the child processes that measure the peak memory of one pass.
const MEMORY_PASS_ENV: &str = "SANA_BLOCK_MEMORY_PASS";

#[derive(Clone, Copy, Debug)]
enum Pass {
    /// Frozen weights: no graph.
    Forward,
    /// Var weights: the graph (every intermediate) stays alive with the output.
    ForwardGraph,
    ForwardJvp,
    ForwardBackward,
}

impl Pass {
    const ALL: [Pass; 4] = [
        Pass::Forward,
        Pass::ForwardGraph,
        Pass::ForwardJvp,
        Pass::ForwardBackward,
    ];

    fn label(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::ForwardGraph => "forward (graph kept)",
            Pass::ForwardJvp => "forward + JVP",
            Pass::ForwardBackward => "forward + backward",
        }
    }

    fn from_label(label: &str) -> Option<Pass> {
        Self::ALL.into_iter().find(|p| p.label() == label)
    }
}

/// The block twice (trainable `Var`s and a frozen view of the same storage) and its inputs.
struct Bench {
    trained: SanaTransformerBlock,
    frozen: SanaTransformerBlock,
    params: usize,
    x: Tensor,
    x_dot: Tensor,
    caption: Dual,
    bias: Tensor,
    tmod: Tensor,
    tmod_dot: Tensor,
}

impl Bench {
    fn new() -> anyhow::Result<Self> {
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
        let params = varmap.all_vars().iter().map(|v| v.elem_count()).sum();

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
        Ok(Self {
            trained,
            frozen,
            params,
            x,
            x_dot,
            caption,
            bias,
            tmod,
            tmod_dot,
        })
    }

    fn block(&self, block: &SanaTransformerBlock, x: &Dual, tmod: &Dual) -> Dual {
        block
            .forward(
                x,
                &self.caption,
                Some(&self.bias),
                tmod,
                GRID,
                GRID,
                SelfAttention::Linear,
            )
            .expect("block forward")
    }

    /// Runs one pass; returns what it produced so that nothing is freed before the caller is done with it.
    fn run(&self, pass: Pass) -> (Dual, Option<candle_core::backprop::GradStore>) {
        match pass {
            Pass::Forward => (
                self.block(
                    &self.frozen,
                    &Dual::constant(self.x.clone()),
                    &Dual::constant(self.tmod.clone()),
                ),
                None,
            ),
            Pass::ForwardGraph => (
                self.block(
                    &self.trained,
                    &Dual::constant(self.x.clone()),
                    &Dual::constant(self.tmod.clone()),
                ),
                None,
            ),
            Pass::ForwardJvp => (
                self.block(
                    &self.frozen,
                    &Dual::with_tangent(self.x.clone(), self.x_dot.clone()),
                    &Dual::with_tangent(self.tmod.clone(), self.tmod_dot.clone()),
                ),
                None,
            ),
            Pass::ForwardBackward => {
                let out = self.block(
                    &self.trained,
                    &Dual::constant(self.x.clone()),
                    &Dual::constant(self.tmod.clone()),
                );
                let grads = out
                    .primal
                    .sqr()
                    .and_then(|s| s.sum_all())
                    .and_then(|l| l.backward())
                    .expect("backward");
                (out, Some(grads))
            }
        }
    }
}

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

/// Child process: sets up, resets the high-water mark, runs `pass` once and prints
/// `resident <MiB> peak <MiB> reset <bool>`.
fn measure_memory(pass: Pass) -> anyhow::Result<()> {
    let bench = Bench::new()?;
    // warm-up so that one-time allocations (thread pools, gemm packing buffers) are not counted
    drop(bench.run(pass));
    let resident = sana_sprint::system::proc_status_mib("VmRSS:").unwrap_or(f64::NAN);
    // "5" resets VmHWM to the current RSS (Linux ≥ 4.0)
    let reset = sana_sprint::system::reset_peak_rss();
    let produced = bench.run(pass);
    let peak = sana_sprint::system::proc_status_mib("VmHWM:").unwrap_or(f64::NAN);
    drop(produced);
    println!("resident {resident} peak {peak} reset {reset}");
    Ok(())
}

/// Runs `pass` in a child process; returns (resident after set-up, peak during the pass, whether the peak
/// was reset after the set-up) in MiB.
fn child_memory(pass: Pass) -> anyhow::Result<(f64, f64, bool)> {
    let out = Command::new(std::env::current_exe()?)
        .env(MEMORY_PASS_ENV, pass.label())
        // glibc: a fixed mmap threshold returns every freed buffer ≥ 64 KiB to the OS at once, so the resident
        // set tracks the live tensors (the default dynamic threshold keeps freed buffers up to 32 MiB cached)
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.split_whitespace().collect();
    match fields.as_slice() {
        ["resident", r, "peak", p, "reset", reset] => {
            Ok((r.parse()?, p.parse()?, *reset == "true"))
        }
        _ => anyhow::bail!(
            "memory child for {}: unexpected output {text:?} {}",
            pass.label(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn main() -> anyhow::Result<()> {
    if let Ok(label) = std::env::var(MEMORY_PASS_ENV) {
        let pass =
            Pass::from_label(&label).ok_or_else(|| anyhow::anyhow!("unknown pass {label:?}"))?;
        return measure_memory(pass);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iters: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3);
    // `--only LABEL`: time that pass alone and skip the memory children (for profilers)
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| {
            let label = args.get(i + 1).map(String::as_str).unwrap_or("");
            Pass::from_label(label).ok_or_else(|| {
                anyhow::anyhow!("--only takes one of {:?}", Pass::ALL.map(|p| p.label()))
            })
        })
        .transpose()?;
    let bench = Bench::new()?;
    println!(
        "SANA 1.6B block: D {}, {} parameters ({:.0} MiB f32), {} tokens, {CAPTION_TOKENS} caption tokens, f32, {} threads",
        bench.x.dim(2)?,
        bench.params,
        bench.params as f64 * 4.0 / (1 << 20) as f64,
        GRID * GRID,
        candle_core::utils::get_num_threads()
    );

    // the matmul library alone: the FFN's widest product, as a Linear computes it (x · Wᵀ)
    let (a, w) = (
        Tensor::randn(0f32, 1.0, (GRID * GRID, bench.x.dim(2)?), &Device::Cpu)?,
        Tensor::randn(0f32, 1.0, (5600, bench.x.dim(2)?), &Device::Cpu)?,
    );
    let t = time("matmul 1024x2240 * 2240x5600", 3 * iters, || {
        a.matmul(&w.t().expect("transpose")).expect("matmul")
    });
    println!(
        "{:<28} {:.0} GFLOP/s",
        "",
        2.0 * (GRID * GRID * a.dim(1)? * 5600) as f64 / t / 1e9
    );
    drop((a, w));

    if let Some(pass) = only {
        time(pass.label(), iters, || bench.run(pass));
        return Ok(());
    }
    let times: Vec<f64> = Pass::ALL
        .iter()
        .map(|&pass| time(pass.label(), iters, || bench.run(pass)))
        .collect();
    println!(
        "ratios: JVP/forward {:.2}, backward/forward {:.2}",
        times[2] / times[0],
        times[3] / times[0]
    );
    drop(bench);

    println!(
        "peak memory above the resident set-up (weights, inputs), one pass in a fresh process:"
    );
    for pass in Pass::ALL {
        match child_memory(pass) {
            Ok((resident, peak, reset)) => println!(
                "{:<28} +{:>8.0} MiB  (resident after set-up {resident:.0} MiB, peak {peak:.0} MiB{})",
                pass.label(),
                peak - resident,
                if reset {
                    ""
                } else {
                    "; VmHWM could not be reset, the peak may include the set-up"
                }
            ),
            Err(e) => println!("{:<28} not measured: {e}", pass.label()),
        }
    }
    Ok(())
}
