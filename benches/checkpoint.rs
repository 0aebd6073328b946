//! Gradient checkpointing of the student: time and peak memory of forward + backward of the 0.6B-width
//! SANA-Sprint student in TrigFlow form with and without checkpointing, on the CPU, f32, random weights.
//!
//! Model: the 0.6B config (28 blocks, D 1152 = 36 heads × 32, cross attention 16 × 72 over the caption,
//! caption 2304, mlp_ratio 2.5 → FFN 2880, guidance embedder, logvar head), checked name by name and shape by
//! shape against the real checkpoint's key list (data/keys/sana_sprint_0.6B_student_transformer.txt).
//! Inputs: 256 px (latent 8 × 8 = 64 tokens), batch 1, a 300-token prompt with 120 valid tokens, guidance.
//! Loss sum(F ⊙ c) for a random cotangent c; "plain" backpropagates through the whole graph of `forward`,
//! "checkpointed" runs `forward_checkpointed`, backpropagates the loss to a leaf copy of F and hands dF to the
//! tape (the trainer's use).
//!
//! Peak memory: each pass runs once in a fresh child process after a warm-up pass; the child resets the
//! resident-set high-water mark (VmHWM, /proc/self/status) through /proc/self/clear_refs after the set-up and
//! reads it after the pass (Linux ≥ 4.0), with glibc told to return every freed buffer ≥ 64 KiB to the OS at
//! once (MALLOC_MMAP_THRESHOLD_) so that the resident set tracks the live tensors. The kernel keeps VmHWM at
//! page granularity on every RSS change, so unlike a sampling thread it cannot miss a short peak. The figure
//! is the peak above the resident set after set-up (weights, inputs); it includes the parameter gradients
//! (one f32 tensor per weight, the same in both modes), printed separately.
//!
//! Run: `cargo bench --profile dev --bench checkpoint [-- --layers N] [--grid G] [--iters K] [--check]`
//! (`--layers` fewer blocks for a quick run, `--grid` the latent side, `--check` also compares the two
//! gradient sets, which holds both at once). Never fails on speed.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use sana_sprint::models::sana::{SanaConfig, SanaTransformer2DModel};
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::nn::dual::Dual;
use sana_sprint::synth;

const CAPTION_TOKENS: usize = 300;
const VALID_CAPTION_TOKENS: usize = 120;
/// Set in the child processes that measure the peak memory of one pass.
const MEMORY_PASS_ENV: &str = "CHECKPOINT_BENCH_MEMORY_PASS";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass {
    Plain,
    Checkpointed,
}

impl Pass {
    const ALL: [Pass; 2] = [Pass::Plain, Pass::Checkpointed];

    fn label(self) -> &'static str {
        match self {
            Pass::Plain => "plain",
            Pass::Checkpointed => "checkpointed",
        }
    }

    fn from_label(label: &str) -> Option<Pass> {
        Self::ALL.into_iter().find(|p| p.label() == label)
    }
}

#[derive(Clone, Copy, Debug)]
struct Options {
    layers: usize,
    grid: usize,
    iters: usize,
    check: bool,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut options = Options {
            layers: 28,
            grid: 8,
            iters: 2,
            check: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |name: &str| -> anyhow::Result<usize> {
                let v = args
                    .next()
                    .with_context(|| format!("{name} needs a value"))?;
                v.parse().with_context(|| format!("{name} {v}"))
            };
            match arg.as_str() {
                "--layers" => options.layers = value("--layers")?,
                "--grid" => options.grid = value("--grid")?,
                "--iters" => options.iters = value("--iters")?.max(1),
                "--check" => options.check = true,
                _ => {} // cargo bench passes --bench
            }
        }
        Ok(options)
    }

    /// Forwarded to the memory children.
    fn args(&self) -> Vec<String> {
        vec![
            "--layers".into(),
            self.layers.to_string(),
            "--grid".into(),
            self.grid.to_string(),
        ]
    }
}

/// The SANA-Sprint 0.6B student config (docs/ALGORITHM.md §2.1), with `layers` blocks.
fn config(layers: usize) -> SanaConfig {
    SanaConfig {
        num_attention_heads: 36,
        attention_head_dim: 32,
        num_layers: layers,
        num_cross_attention_heads: Some(16),
        cross_attention_head_dim: Some(72),
        cross_attention_dim: Some(1152),
        caption_channels: 2304,
        mlp_ratio: 2.5,
        qk_norm: Some("rms_norm_across_heads".into()),
        guidance_embeds: true,
        ..SanaConfig::default()
    }
}

/// Checks every variable's name and shape against the real checkpoint's key list (blocks below `layers`).
fn check_against_key_list(varmap: &VarMap, layers: usize) -> anyhow::Result<()> {
    let in_model = |key: &str| match key.strip_prefix("transformer_blocks.") {
        Some(rest) => rest
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < layers),
        None => true,
    };
    let got: Vec<synth::Key> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    synth::check_against_key_list(
        "the bench model (data/keys/sana_sprint_0.6B_student_transformer.txt)",
        &got,
        synth::KEYS_STUDENT_0_6B,
        in_model,
    )
}

struct Bench {
    varmap: VarMap,
    model: SanaTrigFlow,
    x: Tensor,
    prompt: Tensor,
    t: Tensor,
    guidance: Tensor,
    mask: Tensor,
    cotangent: Tensor,
}

impl Bench {
    fn new(options: &Options) -> anyhow::Result<Self> {
        let dev = Device::Cpu;
        let cfg = config(options.layers);
        // random weights (PyTorch default init) as f32 Vars
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = SanaTrigFlow::with_logvar(SanaTransformer2DModel::new(&cfg, vb.clone())?, &vb)?;
        check_against_key_list(&varmap, options.layers)?;

        let g = options.grid;
        let x = Tensor::randn(0f32, 1.0, (1, cfg.in_channels, g, g), &dev)?;
        let mask: Vec<f32> = (0..CAPTION_TOKENS)
            .map(|i| f32::from(u8::from(i < VALID_CAPTION_TOKENS)))
            .collect();
        Ok(Self {
            cotangent: x.randn_like(0.0, 1.0)?,
            x,
            prompt: Tensor::randn(0f32, 1.0, (1, CAPTION_TOKENS, cfg.caption_channels), &dev)?,
            t: Tensor::new(&[0.9f32], &dev)?,
            guidance: Tensor::new(&[0.45f32], &dev)?,
            mask: Tensor::from_vec(mask, (1, CAPTION_TOKENS), &dev)?,
            varmap,
            model,
        })
    }

    fn params(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// One forward + backward; returns the gradients (kept alive until the caller drops them).
    fn run(&self, pass: Pass) -> anyhow::Result<GradStore> {
        let (x, t) = (&self.x, &self.t);
        let (guidance, mask) = (Some(&self.guidance), Some(&self.mask));
        Ok(match pass {
            Pass::Plain => {
                let f = self
                    .model
                    .forward(
                        &Dual::constant(x.clone()),
                        &self.prompt,
                        &Dual::constant(t.clone()),
                        guidance,
                        mask,
                    )?
                    .primal;
                (f * &self.cotangent)?.sum_all()?.backward()?
            }
            Pass::Checkpointed => {
                let (f, recompute) =
                    self.model
                        .forward_checkpointed(x, &self.prompt, t, guidance, mask)?;
                let f = Var::from_tensor(&f)?;
                let mut grads = (f.as_tensor() * &self.cotangent)?.sum_all()?.backward()?;
                let df = grads.remove(f.as_tensor()).context("no gradient for F")?;
                recompute.backward(&df, &mut grads)?;
                grads
            }
        })
    }

    /// Bytes of the segment boundaries a checkpointed forward keeps.
    fn saved_bytes(&self) -> anyhow::Result<usize> {
        let (_, recompute) = self.model.forward_checkpointed(
            &self.x,
            &self.prompt,
            &self.t,
            Some(&self.guidance),
            Some(&self.mask),
        )?;
        Ok(recompute.saved_bytes())
    }

    /// Largest per-tensor relative difference max|Δ| / max|g| between the two modes' gradients.
    fn compare(&self) -> anyhow::Result<(String, f64)> {
        let plain = self.run(Pass::Plain)?;
        let checkpointed = self.run(Pass::Checkpointed)?;
        let mut worst = (String::new(), 0.0);
        for (name, var) in self.varmap.data().lock().unwrap().iter() {
            // the logvar head is not part of F
            let (want, got) = match (
                plain.get(var.as_tensor()),
                checkpointed.get(var.as_tensor()),
            ) {
                (Some(want), Some(got)) => (want, got),
                (None, None) => continue,
                _ => anyhow::bail!("{name}: a gradient in one mode only"),
            };
            let max = |t: &Tensor| -> anyhow::Result<f64> {
                Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
            };
            let rel = max(&(got - want)?)? / max(want)?.max(f64::MIN_POSITIVE);
            if rel >= worst.1 {
                worst = (name.clone(), rel);
            }
        }
        Ok(worst)
    }
}

fn time(label: &str, iters: usize, mut f: impl FnMut() -> anyhow::Result<GradStore>) -> f64 {
    drop(f().expect(label)); // warm-up
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            drop(std::hint::black_box(f().expect(label)));
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    println!(
        "{label:<14} forward + backward median {median:>7.2} s  (min {:.2} s, {iters} runs)",
        times[0]
    );
    median
}

/// Child process: sets up, warms up, resets the high-water mark, runs `pass` once and prints
/// `resident <MiB> peak <MiB> reset <bool>`.
fn measure_memory(pass: Pass, options: &Options) -> anyhow::Result<()> {
    let bench = Bench::new(options)?;
    drop(bench.run(pass)?);
    let resident = sana_sprint::system::proc_status_mib("VmRSS:").unwrap_or(f64::NAN);
    // "5" resets VmHWM to the current RSS (Linux ≥ 4.0)
    let reset = sana_sprint::system::reset_peak_rss();
    let grads = bench.run(pass)?;
    let peak = sana_sprint::system::proc_status_mib("VmHWM:").unwrap_or(f64::NAN);
    drop(grads);
    println!("resident {resident} peak {peak} reset {reset}");
    Ok(())
}

/// Runs `pass` in a child process; returns (resident after set-up, peak during the pass, whether the peak was
/// reset after the set-up) in MiB.
fn child_memory(pass: Pass, options: &Options) -> anyhow::Result<(f64, f64, bool)> {
    let out = Command::new(std::env::current_exe()?)
        .args(options.args())
        .env(MEMORY_PASS_ENV, pass.label())
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
    let options = Options::parse()?;
    if let Ok(label) = std::env::var(MEMORY_PASS_ENV) {
        let pass =
            Pass::from_label(&label).ok_or_else(|| anyhow::anyhow!("unknown pass {label:?}"))?;
        return measure_memory(pass, &options);
    }
    let bench = Bench::new(&options)?;
    let params = bench.params();
    let mib = |bytes: f64| bytes / (1 << 20) as f64;
    println!(
        "SANA-Sprint 0.6B student, {} blocks (names and shapes match the real key list): {params} parameters \
         ({:.0} MiB f32); latent {g}×{g} ({} tokens), {CAPTION_TOKENS} caption tokens, batch 1, f32, {} threads",
        options.layers,
        mib(params as f64 * 4.0),
        options.grid * options.grid,
        candle_core::utils::get_num_threads(),
        g = options.grid,
    );
    println!(
        "checkpointed forward keeps {:.2} MiB of segment boundaries",
        mib(bench.saved_bytes()? as f64)
    );
    let times: Vec<f64> = Pass::ALL
        .iter()
        .map(|&pass| time(pass.label(), options.iters, || bench.run(pass)))
        .collect();
    println!("time ratio checkpointed / plain {:.2}", times[1] / times[0]);
    if options.check {
        let (name, rel) = bench.compare()?;
        println!("largest relative gradient difference between the modes: {rel:.2e} ({name})");
    }
    drop(bench);

    println!(
        "peak memory above the resident set-up, one pass in a fresh process (includes {:.0} MiB of f32 \
         parameter gradients):",
        mib(params as f64 * 4.0)
    );
    for pass in Pass::ALL {
        match child_memory(pass, &options) {
            Ok((resident, peak, reset)) => println!(
                "{:<14} +{:>7.0} MiB  (+{:.0} MiB besides the gradients; resident after set-up {resident:.0} MiB, \
                 peak {peak:.0} MiB{})",
                pass.label(),
                peak - resident,
                peak - resident - mib(params as f64 * 4.0),
                if reset {
                    ""
                } else {
                    "; VmHWM could not be reset, the peak may include the set-up"
                }
            ),
            Err(e) => println!("{:<14} not measured: {e}", pass.label()),
        }
    }
    Ok(())
}
