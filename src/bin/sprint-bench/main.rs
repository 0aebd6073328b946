//! sprint-bench: one-machine measurements of sana-sprint at real model sizes with random weights (no
//! downloads), plus a device-vs-CPU parity check on the tiny pipeline. Each subcommand prints one result line
//! and appends a JSON line to `--out` (the schema of `tools/gpu/reference_bench.py`, which measures the PyTorch
//! reference the same way; `scripts/gpu-check.sh` runs both and prints the comparison, see docs/GPU-CHECK.md).
//!
//! ```text
//! sprint-bench [--device cuda] [--smoke] [--out results.jsonl] [--work_dir DIR] <subcommand>
//!   parity                                   tiny models on the device vs the CPU, f32 and bf16; exit 1 on a FAIL
//!   dcae --batch 1 --resolution 1024         DC-AE f32c32 encoder, f32: images/s
//!   gemma --tokens 300 --batch 8             Gemma-2-2B encoder, bf16: prompts/s
//!   prep --rows 64 --resolution 1024         sprint-prep end to end on generated shards: rows/s
//!   train-step --config 1.6B --batch 1 [--gradient_checkpointing] --mixed_precision bf16 --steps 6
//!                                            s per G and D step, peak GPU memory, GPU busy %
//! ```
//!
//! `--smoke` shrinks every size (tiny resolutions, truncated or tiny models, few iterations) so that the whole
//! set runs on a CPU in a minute or two with the same code paths.

mod gpu;
mod parity;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::{Args, Parser, Subcommand};
use sana_sprint::device::{self, MixedPrecision};
use sana_sprint::hub::HubConfig;
use sana_sprint::models::dcae::{DcaeConfig, DcaeEncoder};
use sana_sprint::models::discriminator::DEFAULT_HEAD_BLOCK_IDS;
use sana_sprint::models::gemma2::{Gemma2Config, Gemma2Encoder};
use sana_sprint::models::sana::SanaConfig;
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::train::trainer::{self, TrainOptions};
use serde_json::{json, Map, Value};

use sana_sprint::synth::{self as random, NormWeights, PipelineSpec};

#[derive(Parser, Debug)]
#[command(
    name = "sprint-bench",
    version,
    rename_all = "snake_case",
    about = "Real-size measurements of sana-sprint with random weights, and a device-vs-CPU parity check \
             (docs/GPU-CHECK.md)",
    long_about = None
)]
struct Cli {
    /// cpu, cuda or cuda:N (cuda by default in CUDA builds).
    #[arg(long, global = true, default_value = device::default_device())]
    device: String,
    /// Tiny sizes and few iterations: the whole set runs on a CPU in a minute or two.
    #[arg(long, global = true)]
    smoke: bool,
    /// Append one JSON line per result to this file.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Where generated models, shards and stores are cached (default: $TMPDIR/sana-sprint-bench).
    #[arg(long, global = true)]
    work_dir: Option<PathBuf>,
    /// train-step: this many seconds after the start, report the steps measured so far and exit.
    #[arg(long, global = true)]
    time_limit: Option<f64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Tiny models on --device vs the CPU in this process, f32 (rel 1e-4) and bf16 (rel 3e-2).
    Parity(ParityArgs),
    /// DC-AE f32c32 encoder throughput in f32 (images/s).
    Dcae(DcaeArgs),
    /// Gemma-2-2B text encoder throughput (prompts/s).
    Gemma(GemmaArgs),
    /// sprint-prep end to end on generated parquet shards with a random real-size encoder pipeline (rows/s).
    Prep(PrepArgs),
    /// sprint-train step times on a random real-size teacher and a random latent store.
    TrainStep(TrainArgs),
    /// The gradient average of a data-parallel run on a world of one: rendezvous, NCCL id exchange and
    /// communicator on candle's stream (`--device cuda`, the `nccl` feature) or the CPU ring, then the bucketed
    /// all-reduce of a full-size student gradient in f32 and in bf16 (s per step).
    AllReduce(AllReduceArgs),
}

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
struct AllReduceArgs {
    /// The student whose gradient is averaged: 1.6B or 0.6B (every tensor at its real size).
    #[arg(long, default_value = "1.6B")]
    config: String,
    /// Timed averages per dtype (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
struct ParityArgs {
    /// The tiny pipeline (default: datasets/tiny-sana-sprint next to the working directory or the binary).
    #[arg(long)]
    tiny: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
struct DcaeArgs {
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 1024)]
    resolution: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Let f32 matmuls use TF32 tensor cores (as PyTorch's cuDNN convolutions do by default).
    #[arg(long)]
    tf32: bool,
    /// After the timed runs, one more pass with device-synchronised timers per block type (`stage_*_s`).
    #[arg(long)]
    profile: bool,
}

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
struct GemmaArgs {
    #[arg(long, default_value_t = 300)]
    tokens: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// bf16 (as the reference) or no (f32).
    #[arg(long, value_enum, default_value_t = MixedPrecision::Bf16)]
    mixed_precision: MixedPrecision,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
struct PrepArgs {
    /// Rows of the measured run (a first run of a quarter of them loads the models and warms up; the
    /// difference of the two runs gives the steady rate).
    #[arg(long, default_value_t = 64)]
    rows: usize,
    #[arg(long, default_value_t = 1024)]
    resolution: u32,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
struct TrainArgs {
    /// 1.6B, 0.6B (random weights at real size) or tiny (the embedded datasets/tiny-sana-sprint teacher).
    #[arg(long, default_value = "1.6B")]
    config: String,
    #[arg(long, default_value_t = 1024)]
    resolution: usize,
    /// An aspect-ratio bucket instead of the square: HxW in pixels (multiples of 32, e.g. 256x1024).
    #[arg(long)]
    bucket: Option<String>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long)]
    gradient_checkpointing: bool,
    #[arg(long, value_enum, default_value_t = MixedPrecision::Bf16)]
    mixed_precision: MixedPrecision,
    /// Global steps (G and D alternate); the first G and D steps are warm-up and not timed.
    #[arg(long, default_value_t = 6)]
    steps: u64,
    /// Keep only the first N transformer blocks (quick runs; --smoke uses 1).
    #[arg(long)]
    layers: Option<usize>,
    /// Time each stage of every step (`sprint-train --profile`: device-synchronised timers) and report the mean
    /// seconds per stage of the timed G and D steps (`g_stage_*`, `d_stage_*`).
    #[arg(long)]
    profile: bool,
}

/// What every measurement needs.
#[derive(Clone)]
struct Ctx {
    device: Device,
    device_name: String,
    card: String,
    smoke: bool,
    out: Option<PathBuf>,
    work: PathBuf,
    /// When the process started (`--time_limit` counts from here).
    started: Instant,
}

/// One result: `key` names what is measured (the same key in the reference's line), `metrics` the numbers.
struct Record {
    bench: &'static str,
    key: String,
    params: Value,
    metrics: Map<String, Value>,
    notes: Vec<String>,
}

impl Ctx {
    /// Appends the JSON line of a result (or of a failure) to `--out`.
    fn emit(&self, bench: &str, key: &str, status: &str, body: Value) -> Result<()> {
        let mut line = json!({
            "schema": 1, "impl": "sprint-bench", "bench": bench, "key": key, "status": status,
            "device": self.device_name, "card": self.card, "smoke": self.smoke,
            "versions": {"sana-sprint": env!("CARGO_PKG_VERSION"), "cuda_feature": cfg!(feature = "cuda")},
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), body) {
            obj.extend(extra);
        }
        if let Some(path) = &self.out {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            writeln!(f, "{line}")?;
        }
        Ok(())
    }

    fn emit_record(&self, r: &Record, status: &str) -> Result<()> {
        let metrics: Vec<String> = r
            .metrics
            .iter()
            .map(|(k, v)| match v.as_f64() {
                Some(x) => format!("{k} {}", fmt_num(x)),
                None => format!("{k} {v}"),
            })
            .collect();
        println!(
            "[{}] {} on {}: {}{}",
            status,
            r.key,
            self.card,
            metrics.join(", "),
            if r.notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.notes.join("; "))
            }
        );
        self.emit(
            r.bench,
            &r.key,
            status,
            json!({"params": r.params, "metrics": r.metrics, "notes": r.notes}),
        )
    }
}

fn fmt_num(x: f64) -> String {
    if x == 0.0 || (1e-3..1e5).contains(&x.abs()) {
        format!("{:.4}", x)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{x:.3e}")
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Runs `f` once as warm-up, then `iters` times, each followed by a device synchronisation; returns the
/// seconds of the timed runs and the window they spanned.
fn time_runs(
    device: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<(Vec<f64>, Instant, Instant)> {
    drop(f()?);
    device.synchronize()?;
    let start = Instant::now();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        let out = f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
        drop(out);
    }
    Ok((times, start, Instant::now()))
}

/// Adds the sampled device figures (busy % over [from, to], peak memory) to `metrics`.
fn add_device_metrics(
    metrics: &mut Map<String, Value>,
    notes: &mut Vec<String>,
    samples: &gpu::Samples,
    window: Option<(Instant, Instant)>,
) {
    let busy = window.and_then(|(a, b)| samples.busy_pct(a, b));
    metrics.insert(
        "gpu_busy_pct".into(),
        busy.map_or(Value::from("n/a"), Value::from),
    );
    match samples.peak_mem_gib() {
        Some((gib, source)) => {
            metrics.insert("peak_mem_gib".into(), gib.into());
            if let Some(base) = samples.baseline_mem_gib() {
                metrics.insert("mem_before_gib".into(), base.into());
            }
            notes.push(format!("memory: {source}"));
        }
        None => {
            metrics.insert("peak_mem_gib".into(), "n/a".into());
        }
    }
}

/// Resolved DC-AE sizes: (resolution, batch, iterations).
fn dcae_sizes(smoke: bool, a: &DcaeArgs) -> (usize, usize, usize) {
    if smoke {
        (64, a.batch.min(2), 2)
    } else {
        (a.resolution, a.batch, a.iters)
    }
}

fn dcae_key(smoke: bool, a: &DcaeArgs) -> String {
    let (res, batch, _) = dcae_sizes(smoke, a);
    let tf32 = if a.tf32 { " tf32" } else { "" };
    format!("dcae f32 {res}px b{batch}{tf32}{}", variant_suffix())
}

/// The non-default device settings of this process ([`sana_sprint::nn::conv::DEVICE_CONV_ENV`],
/// [`device::POOL_RELEASE_ENV`]) as a key suffix, so that a variant's row never replaces the default's.
fn variant_suffix() -> String {
    let mut suffix = String::new();
    for (var, default, name) in [
        (sana_sprint::nn::conv::DEVICE_CONV_ENV, "taps", "conv"),
        (device::POOL_RELEASE_ENV, "keep", "pool-release"),
    ] {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() && v != default => suffix.push_str(&format!(" {name}={v}")),
            _ => {}
        }
    }
    suffix
}

fn dcae(ctx: &Ctx, a: &DcaeArgs) -> Result<Record> {
    let (res, batch, iters) = dcae_sizes(ctx.smoke, a);
    candle_core::cuda::set_gemm_reduced_precision_f32(a.tf32);
    let cfg: DcaeConfig = serde_json::from_str(random::SANA_VAE_CONFIG)?;
    let vb = VarBuilder::from_backend(
        Box::new(random::DeviceRandom {
            norm: NormWeights::One,
        }),
        DType::F32,
        ctx.device.clone(),
    );
    let encoder = DcaeEncoder::new(&cfg, vb.pp("encoder"))?;
    let image = Tensor::rand(-1f32, 1., (batch, 3, res, res), &ctx.device)?;
    let sampler = gpu::Sampler::start(&ctx.device);
    let (times, from, to) = time_runs(&ctx.device, iters, || Ok(encoder.forward(&image)?))?;
    let samples = sampler.stop();
    let s = median(&times);
    let mut metrics = Map::new();
    metrics.insert("images_per_s".into(), (batch as f64 / s).into());
    if a.profile {
        sana_sprint::profile::start(&ctx.device)?;
        encoder.forward(&image)?;
        for stage in sana_sprint::profile::finish().unwrap_or_default() {
            metrics.insert(format!("stage_{}_s", stage.name), stage.secs.into());
        }
    }
    metrics.insert("s_per_batch".into(), s.into());
    let mut notes = vec![format!("median of {} runs after 1 warm-up", times.len())];
    add_device_metrics(&mut metrics, &mut notes, &samples, Some((from, to)));
    Ok(Record {
        bench: "dcae",
        key: dcae_key(ctx.smoke, a),
        params: json!({"batch": batch, "resolution": res, "dtype": "f32", "iters": times.len(),
                       "model": "DC-AE f32c32 encoder (docs/ALGORITHM.md §2.2), random weights"}),
        metrics,
        notes,
    })
}

/// Resolved Gemma sizes: (layers, vocabulary, tokens, iterations).
fn gemma_sizes(smoke: bool, a: &GemmaArgs) -> (usize, usize, usize, usize) {
    if smoke {
        (1, 2048, a.tokens.min(32), 2)
    } else {
        (26, random::GEMMA_VOCAB, a.tokens, a.iters)
    }
}

fn gemma_key(smoke: bool, a: &GemmaArgs) -> String {
    let (_, _, tokens, _) = gemma_sizes(smoke, a);
    format!(
        "gemma2-2b {} {tokens}tok b{}",
        a.mixed_precision.name(),
        a.batch
    )
}

fn gemma(ctx: &Ctx, a: &GemmaArgs) -> Result<Record> {
    let (layers, vocab, tokens, iters) = gemma_sizes(ctx.smoke, a);
    let dtype = a.mixed_precision.dtype();
    let cfg: Gemma2Config = serde_json::from_value(random::gemma_config(layers, vocab))?;
    let vb = VarBuilder::from_backend(
        Box::new(random::DeviceRandom {
            norm: NormWeights::Zero,
        }),
        dtype,
        ctx.device.clone(),
    );
    let encoder = Gemma2Encoder::new(&cfg, vb)?;
    let mut rng = sana_sprint::rng::SeededRng::new(1);
    let ids: Vec<u32> = (0..a.batch * tokens)
        .map(|i| {
            if i % tokens == 0 {
                2
            } else {
                (5 + rng.next_u64() % (vocab as u64 - 5)) as u32
            }
        })
        .collect();
    let ids = Tensor::from_vec(ids, (a.batch, tokens), &ctx.device)?;
    let mask = Tensor::ones((a.batch, tokens), DType::U32, &ctx.device)?;
    let sampler = gpu::Sampler::start(&ctx.device);
    let (times, from, to) = time_runs(&ctx.device, iters, || Ok(encoder.forward(&ids, &mask)?))?;
    let samples = sampler.stop();
    let s = median(&times);
    let mut metrics = Map::new();
    metrics.insert("prompts_per_s".into(), (a.batch as f64 / s).into());
    metrics.insert("s_per_batch".into(), s.into());
    let mut notes = vec![format!("median of {} runs after 1 warm-up", times.len())];
    add_device_metrics(&mut metrics, &mut notes, &samples, Some((from, to)));
    let dt = a.mixed_precision.name();
    Ok(Record {
        bench: "gemma",
        key: gemma_key(ctx.smoke, a),
        params: json!({"batch": a.batch, "tokens": tokens, "dtype": dt, "layers": layers, "vocab": vocab,
                       "iters": times.len(), "model": "Gemma-2-2B encoder (docs/ALGORITHM.md §2.3), random weights"}),
        metrics,
        notes,
    })
}

/// Resolved prep sizes: (resolution, rows, batch size).
fn prep_sizes(smoke: bool, a: &PrepArgs) -> (u32, usize, usize) {
    if smoke {
        (64, a.rows.min(8), a.batch_size.min(2))
    } else {
        (a.resolution, a.rows, a.batch_size)
    }
}

fn prep_key(smoke: bool, a: &PrepArgs) -> String {
    format!("encoding {}px", prep_sizes(smoke, a).0)
}

fn prep_bench(ctx: &Ctx, a: &PrepArgs) -> Result<Record> {
    let (res, rows, batch_size) = prep_sizes(ctx.smoke, a);
    let spec = if ctx.smoke {
        PipelineSpec::smoke()?
    } else {
        PipelineSpec::real()?
    };
    let warm_rows = (rows / 4)
        .max(batch_size)
        .min(rows.saturating_sub(1))
        .max(1);
    let t = Instant::now();
    let pipeline = random::encoder_pipeline(&ctx.work, &spec)?;
    let shards = |n: usize, files: usize| {
        random::cached_dir(
            &ctx.work.join(format!("shards-{res}px-{n}")),
            &format!("{n} rows, {files} files, {res}px, v1"),
            |d| random::write_shards(d, n, files, res).map(|_| ()),
        )
    };
    let small = shards(warm_rows, 1)?;
    let big = shards(rows, 2)?;
    println!(
        "inputs ready in {:.1} s: {} ({} + {} rows of generated shards)",
        t.elapsed().as_secs_f64(),
        pipeline.display(),
        warm_rows,
        rows
    );
    let run_dir = ctx.work.join(format!("prep-run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let opts = |shard_dir: &Path, name: &str| -> Result<PrepOptions> {
        let mut files: Vec<String> = std::fs::read_dir(shard_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
            .map(|p| p.display().to_string())
            .collect();
        files.sort();
        Ok(PrepOptions {
            pretrained_model_name_or_path: pipeline.display().to_string(),
            file_path: files,
            output: run_dir.join(format!("{name}.lance")),
            resolution: res,
            batch_size,
            device: ctx.device_name.clone(),
            overwrite: true,
            report: Some(run_dir.join(format!("{name}.report.json"))),
            progress: false,
            ..PrepOptions::default()
        })
    };
    let hub = HubConfig::from_env();
    let sampler = gpu::Sampler::start(&ctx.device);
    let first = prep::run(&opts(&small, "warm")?, &hub)?;
    let from = Instant::now();
    let second = prep::run(&opts(&big, "measured")?, &hub)?;
    let to = Instant::now();
    let samples = sampler.stop();
    let _ = std::fs::remove_dir_all(&run_dir);
    anyhow::ensure!(
        second.bad_rows.is_empty() && second.rows_written == rows,
        "prep wrote {} of {rows} rows ({} bad)",
        second.rows_written,
        second.bad_rows.len()
    );
    let steady = (second.rows_encoded as f64 - first.rows_encoded as f64)
        / (second.elapsed_s - first.elapsed_s);
    let mut metrics = Map::new();
    metrics.insert(
        "samples_per_s".into(),
        if steady.is_finite() && steady > 0.0 {
            steady.into()
        } else {
            "n/a".into()
        },
    );
    metrics.insert(
        "rows_per_s_end_to_end".into(),
        (rows as f64 / second.elapsed_s).into(),
    );
    metrics.insert("run_s".into(), second.elapsed_s.into());
    metrics.insert("warm_run_s".into(), first.elapsed_s.into());
    let mut notes = vec![format!(
        "samples_per_s = steady rate: ({rows} - {warm_rows}) rows / (difference of the two runs' times); \
         end to end includes loading and fingerprinting the models"
    )];
    add_device_metrics(&mut metrics, &mut notes, &samples, Some((from, to)));
    Ok(Record {
        bench: "prep",
        key: prep_key(ctx.smoke, a),
        params: json!({"rows": rows, "warm_rows": warm_rows, "resolution": res, "batch_size": batch_size,
                       "mixed_precision": "bf16", "text_encoder": spec.gemma_config["num_hidden_layers"],
                       "vocab": spec.vocab,
                       "what": "sprint-prep: parquet -> decode/resize -> DC-AE f32 + Gemma-2 bf16 (with the \
                                complex human instruction) -> Lance store"}),
        metrics,
        notes,
    })
}

/// (phase, elapsed_s) of each synced step in a run's metrics.jsonl.
fn step_log(path: &Path) -> Vec<(String, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                v.get("phase")?.as_str()?.to_string(),
                v.get("elapsed_s")?.as_f64()?,
            ))
        })
        .collect()
}

/// The share of the run's time spent blocked on the store loader, from the last line of its metrics.jsonl.
fn loader_wait_share(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let last: Value = serde_json::from_str(text.lines().last()?).ok()?;
    Some(last.get("loader_wait_s")?.as_f64()? / last.get("elapsed_s")?.as_f64()?)
}

/// Mean G and D step seconds from a step log, leaving out the first G and the first D step (warm-up), and the
/// elapsed time at which the timed steps started.
fn step_times(log: &[(String, f64)]) -> (Vec<f64>, Vec<f64>, Option<f64>) {
    let skip = if log.len() >= 4 { 2 } else { 1 };
    let (mut g, mut d) = (Vec::new(), Vec::new());
    for i in skip.max(1)..log.len() {
        let dt = log[i].1 - log[i - 1].1;
        if log[i].0 == "G" {
            g.push(dt);
        } else {
            d.push(dt);
        }
    }
    (g, d, log.get(skip.max(1) - 1).map(|s| s.1))
}

/// Mean seconds per stage of the timed G and D steps (the `"stages"` of each metrics line, written with
/// `--profile`), leaving out the same warm-up steps as [`step_times`].
fn stage_means(path: &Path) -> (Map<String, Value>, Map<String, Value>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("phase").is_some())
        .collect();
    let skip = if lines.len() >= 4 { 2 } else { 1 };
    let mut sums: [Vec<(String, f64, usize)>; 2] = [Vec::new(), Vec::new()];
    let mut peaks: [Vec<(String, f64)>; 2] = [Vec::new(), Vec::new()];
    for line in lines.iter().skip(skip) {
        let phase = usize::from(line.get("phase").and_then(Value::as_str) != Some("G"));
        // the highest pool memory of each stage over the timed steps
        for (name, gib) in line
            .get("stage_peak_gib")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let gib = gib.as_f64().unwrap_or(0.0);
            match peaks[phase].iter_mut().find(|(n, _)| n == name) {
                Some((_, max)) => *max = max.max(gib),
                None => peaks[phase].push((name.clone(), gib)),
            }
        }
        let Some(stages) = line.get("stages").and_then(Value::as_object) else {
            continue;
        };
        for (name, secs) in stages {
            let secs = secs.as_f64().unwrap_or(0.0);
            match sums[phase].iter_mut().find(|(n, ..)| n == name) {
                Some((_, total, n)) => {
                    *total += secs;
                    *n += 1;
                }
                None => sums[phase].push((name.clone(), secs, 1)),
            }
        }
    }
    let [mut g, mut d] = sums.map(|stages| {
        stages
            .into_iter()
            .map(|(name, total, n)| (name, Value::from(total / n as f64)))
            .collect::<Map<_, _>>()
    });
    let [g_peaks, d_peaks] = peaks;
    for (map, peaks) in [(&mut g, g_peaks), (&mut d, d_peaks)] {
        for (name, gib) in peaks {
            map.insert(format!("{name}_peak_gib"), gib.into());
        }
    }
    (g, d)
}

/// A training run being measured: enough to turn its metrics.jsonl into a result at any moment.
#[derive(Clone)]
struct TrainRun {
    key: String,
    params: Value,
    steps: u64,
    metrics_path: PathBuf,
    started: Instant,
}

impl TrainRun {
    fn record(&self, samples: &gpu::Samples, finished: bool) -> Record {
        let log = step_log(&self.metrics_path);
        let (g, d, timed_from) = step_times(&log);
        let mut metrics = Map::new();
        let put = |m: &mut Map<String, Value>, k: &str, v: Option<f64>| {
            m.insert(k.into(), v.map_or(Value::from("n/a"), Value::from));
        };
        put(&mut metrics, "g_step_s", mean(&g));
        put(
            &mut metrics,
            "loader_wait_share",
            loader_wait_share(&self.metrics_path),
        );
        put(&mut metrics, "d_step_s", mean(&d));
        metrics.insert("g_steps_timed".into(), g.len().into());
        metrics.insert("d_steps_timed".into(), d.len().into());
        let (g_stages, d_stages) = stage_means(&self.metrics_path);
        for (prefix, stages) in [("g_stage_", g_stages), ("d_stage_", d_stages)] {
            for (name, value) in stages {
                let unit = if name.ends_with("_peak_gib") {
                    ""
                } else {
                    "_s"
                };
                metrics.insert(format!("{prefix}{name}{unit}"), value);
            }
        }
        let window = timed_from.and_then(|from| {
            let last = log.last()?.1;
            Some((
                self.started + Duration::from_secs_f64(from),
                self.started + Duration::from_secs_f64(last),
            ))
        });
        let mut notes = vec![
            "first G and D steps are warm-up (not timed); steps include the store loader and the optimiser"
                .to_string(),
        ];
        if !finished {
            notes.push(format!(
                "stopped by --time_limit after {} of {} steps",
                log.len(),
                self.steps
            ));
        }
        add_device_metrics(&mut metrics, &mut notes, samples, window);
        if let Some(rss) = sana_sprint::system::peak_rss_bytes() {
            metrics.insert(
                "peak_host_rss_gib".into(),
                (rss as f64 / 1073741824.0).into(),
            );
        }
        Record {
            bench: "train-step",
            key: self.key.clone(),
            params: self.params.clone(),
            metrics,
            notes,
        }
    }
}

/// Resolved train-step sizes.
struct TrainSizes {
    resolution: usize,
    /// (height, width) in pixels: the square of `resolution` or `--bucket`.
    hw: (usize, usize),
    batch: usize,
    layers: Option<usize>,
    steps: u64,
    /// Prompt tokens of the store (300 as sprint-prep writes).
    seq_len: usize,
}

fn train_sizes(smoke: bool, a: &TrainArgs) -> TrainSizes {
    if smoke {
        TrainSizes {
            resolution: 64,
            hw: (64, 64),
            batch: a.batch.min(2),
            layers: Some(a.layers.unwrap_or(1)),
            steps: a.steps.min(4),
            seq_len: 16,
        }
    } else {
        TrainSizes {
            resolution: a.resolution,
            hw: a
                .bucket
                .as_deref()
                .and_then(|b| {
                    let (h, w) = b.split_once(['x', 'X'])?;
                    Some((h.trim().parse().ok()?, w.trim().parse().ok()?))
                })
                .unwrap_or((a.resolution, a.resolution)),
            batch: a.batch,
            layers: a.layers,
            steps: a.steps,
            seq_len: 300,
        }
    }
}

fn train_key(smoke: bool, a: &TrainArgs) -> String {
    let z = train_sizes(smoke, a);
    let ckpt = if a.gradient_checkpointing {
        " ckpt"
    } else {
        ""
    };
    let size = if z.hw.0 == z.hw.1 {
        format!("{}px", z.hw.0)
    } else {
        format!("{}x{}px", z.hw.0, z.hw.1)
    };
    format!(
        "train-step {} {size} b{} {}{ckpt}{}{}",
        a.config,
        z.batch,
        a.mixed_precision.name(),
        if a.profile { " profiled" } else { "" },
        variant_suffix()
    )
}

fn train_step(ctx: &Ctx, a: &TrainArgs, time_limit: Option<f64>) -> Result<Record> {
    let z = train_sizes(ctx.smoke, a);
    let (res, steps) = (z.resolution, z.steps);
    anyhow::ensure!(
        z.hw.0.is_multiple_of(32) && z.hw.1.is_multiple_of(32) && z.hw.0 > 0 && z.hw.1 > 0,
        "--bucket {:?}: HxW in pixels, multiples of 32",
        a.bucket
    );
    let t = Instant::now();
    let teacher = if a.config == "tiny" {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint")
    } else {
        random::teacher_folder(&ctx.work, &a.config, z.layers)?
    };
    let cfg = SanaConfig::from_folder(&teacher.join("transformer"))?;
    let rows = (z.batch * (steps as usize + 2)).max(16);
    let store_dir = random::cached_dir(
        &ctx.work.join(format!(
            "store-{}x{}px-{rows}x{}",
            z.hw.0, z.hw.1, z.seq_len
        )),
        &format!(
            "random store {}x{}px {rows} rows {} tokens v1",
            z.hw.0, z.hw.1, z.seq_len
        ),
        |d| {
            let path = d.join("store.lance");
            random::random_store(&path, z.hw, cfg.caption_channels, rows, z.seq_len)
        },
    )?;
    println!(
        "inputs ready in {:.1} s: {} ({} blocks), store of {rows} rows",
        t.elapsed().as_secs_f64(),
        teacher.display(),
        cfg.num_layers
    );
    let out = ctx.work.join(format!("train-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut o = TrainOptions::new(teacher, store_dir.join("store.lance"), out.clone());
    o.train_batch_size = z.batch;
    o.max_train_steps = Some(steps);
    o.checkpointing_steps = u64::MAX;
    o.allow_store_mismatch = true;
    o.gradient_checkpointing = a.gradient_checkpointing;
    o.mixed_precision = a.mixed_precision;
    o.learning_rate = 1e-6;
    o.step.train_largest_timestep = true;
    o.step.misaligned_pairs_d = true;
    o.head_block_ids = DEFAULT_HEAD_BLOCK_IDS
        .iter()
        .map(|&b| b.min(cfg.num_layers - 1))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    o.device = ctx.device.clone();
    o.profile = a.profile;
    let run = TrainRun {
        key: train_key(ctx.smoke, a),
        params: json!({"config": a.config, "layers": cfg.num_layers, "resolution": res, "batch": z.batch,
                       "height": z.hw.0, "width": z.hw.1,
                       "prompt_tokens": z.seq_len,
                       "gradient_checkpointing": a.gradient_checkpointing,
                       "mixed_precision": a.mixed_precision.name(), "steps": steps,
                       "train_largest_timestep": true, "misaligned_pairs_D": true,
                       "head_block_ids": o.head_block_ids, "profile": a.profile,
                       "cuda_pool_release_threshold": std::env::var(device::POOL_RELEASE_ENV)
                           .unwrap_or_else(|_| "keep".into())}),
        steps,
        metrics_path: out.join("metrics.jsonl"),
        started: Instant::now(),
    };
    let sampler = gpu::Sampler::start(&ctx.device);
    if let Some(limit) = time_limit {
        // when the time is up, report the steps measured so far and exit
        let (ctx, run, out, seen) = (ctx.clone(), run.clone(), out.clone(), sampler.shared());
        std::thread::spawn(move || {
            let deadline = ctx.started + Duration::from_secs_f64(limit);
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            let partial = step_log(&run.metrics_path).len() >= 3;
            let status = if partial { "partial" } else { "timeout" };
            let _ = ctx.emit_record(&run.record(&gpu::snapshot(&seen), false), status);
            let _ = std::fs::remove_dir_all(&out);
            std::process::exit(if partial { 0 } else { 124 });
        });
    }
    let result = trainer::run(&o);
    let samples = sampler.stop();
    let mut record = run.record(&samples, true);
    if let Some(pool) = device::pool_stats(&ctx.device).ok().flatten() {
        let gib = |b: u64| Value::from(b as f64 / 1073741824.0);
        let m = &mut record.metrics;
        // --profile resets the pool's peaks at every stage, so the run's peak is the largest stage peak
        let stage_peak = m
            .iter()
            .filter(|(k, _)| k.contains("_stage_") && k.ends_with("_peak_gib"))
            .filter_map(|(_, v)| v.as_f64())
            .fold(0.0f64, f64::max);
        let used_high = (pool.used_high_bytes as f64 / 1073741824.0).max(stage_peak);
        m.insert("pool_used_high_gib".into(), Value::from(used_high));
        m.insert(
            "pool_reserved_high_gib".into(),
            gib(pool.reserved_high_bytes),
        );
        m.insert("pool_reserved_end_gib".into(), gib(pool.reserved_bytes));
        m.insert(
            "pool_release_threshold".into(),
            if pool.release_threshold_bytes == u64::MAX {
                Value::from("keep")
            } else {
                Value::from(pool.release_threshold_bytes)
            },
        );
    }
    let _ = std::fs::remove_dir_all(&out);
    let summary = result?;
    anyhow::ensure!(
        summary.nan_skips == 0,
        "{} steps were skipped for a non-finite gradient norm",
        summary.nan_skips
    );
    for (name, value) in [
        ("last_scm_loss", summary.last_scm_loss),
        ("last_adv_loss", summary.last_adv_loss),
        ("last_d_loss", summary.last_d_loss),
    ] {
        record
            .metrics
            .insert(name.into(), value.map_or(Value::from("n/a"), Value::from));
    }
    // the trainer restarts the host high-water mark at every step (its per-bucket peaks): the run's peak is the
    // largest of those and of what the mark shows now
    if !ctx.device.is_cuda() {
        let peak = summary
            .buckets
            .iter()
            .filter_map(|b| b.peak_bytes)
            .chain(sana_sprint::system::peak_rss_bytes())
            .max();
        if let Some(peak) = peak {
            record.metrics.insert(
                "peak_host_rss_gib".into(),
                (peak as f64 / 1073741824.0).into(),
            );
        }
    }
    for b in &summary.buckets {
        record.notes.push(format!(
            "latent {:?}: {} steps, {:.3} s/step, peak {}",
            b.latent_shape,
            b.steps,
            b.mean_step_s,
            b.peak_bytes.map_or("-".into(), |p| format!(
                "{:.2} GiB",
                p as f64 / 1073741824.0
            ))
        ));
    }
    Ok(record)
}

/// The tiny pipeline: --tiny, else `datasets/tiny-sana-sprint` in the working directory, next to the binary
/// (or one folder up), or in the source tree the binary was built from.
fn tiny_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.clone());
    }
    let rel = Path::new("datasets/tiny-sana-sprint");
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let mut candidates = vec![rel.to_path_buf()];
    if let Some(d) = exe_dir {
        candidates.push(d.join(rel));
        if let Some(up) = d.parent() {
            candidates.push(up.join(rel));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel));
    candidates
        .into_iter()
        .find(|p| p.join("transformer/config.json").is_file())
        .context("datasets/tiny-sana-sprint not found: pass --tiny DIR")
}

const PARITY_KEY: &str = "parity tiny models";

fn parity_cmd(ctx: &Ctx, a: &ParityArgs) -> Result<bool> {
    let tiny = tiny_dir(&a.tiny)?;
    println!(
        "parity on {} ({}) vs cpu, tiny pipeline {}; tolerances: relative L2 f32 {:e}, bf16 {:e}",
        ctx.device_name,
        ctx.card,
        tiny.display(),
        parity::tolerance(DType::F32),
        parity::tolerance(DType::BF16)
    );
    let checks = parity::run(&tiny, &ctx.device, |c| {
        println!(
            "{} {:<34} {:<4} rel {:.2e} (tol {:e}){}",
            if c.pass { "PASS" } else { "FAIL" },
            c.name,
            c.dtype,
            c.rel,
            c.tol,
            c.bf16_vs_f32
                .map(|r| format!("; cpu bf16 vs cpu f32 {r:.2e}"))
                .unwrap_or_default()
        );
    })?;
    let failed = checks.iter().filter(|c| !c.pass).count();
    let worst = |dt: &str| {
        checks
            .iter()
            .filter(|c| c.dtype == dt)
            .map(|c| c.rel)
            .fold(0f64, f64::max)
    };
    println!(
        "parity: {} checks, {} failed; worst f32 {:.2e}, worst bf16 {:.2e}",
        checks.len(),
        failed,
        worst("f32"),
        worst("bf16")
    );
    let mut metrics = Map::new();
    metrics.insert("checks".into(), checks.len().into());
    metrics.insert("failed".into(), failed.into());
    metrics.insert("worst_rel_f32".into(), worst("f32").into());
    metrics.insert("worst_rel_bf16".into(), worst("bf16").into());
    ctx.emit(
        "parity",
        PARITY_KEY,
        if failed == 0 { "ok" } else { "fail" },
        json!({"params": {"tiny": tiny.display().to_string(), "tol_f32": parity::tolerance(DType::F32),
                          "tol_bf16": parity::tolerance(DType::BF16)},
               "metrics": metrics, "checks": checks}),
    )?;
    Ok(failed == 0)
}

/// What a subcommand produced: a measurement, or whether the parity checks passed (already reported).
enum Outcome {
    Record(Record),
    Parity(bool),
}

fn run(cli: &Cli) -> Result<bool> {
    let s = cli.smoke;
    let (bench, key) = match &cli.command {
        Command::Parity(_) => ("parity", PARITY_KEY.to_string()),
        Command::Dcae(a) => ("dcae", dcae_key(s, a)),
        Command::Gemma(a) => ("gemma", gemma_key(s, a)),
        Command::Prep(a) => ("prep", prep_key(s, a)),
        Command::TrainStep(a) => ("train-step", train_key(s, a)),
        Command::AllReduce(a) => ("all-reduce", all_reduce_key(s, a)),
    };
    let work = cli
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("sana-sprint-bench"));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let opened = device::parse_device(&cli.device);
    let ctx = Ctx {
        started: Instant::now(),
        card: opened
            .as_ref()
            .map_or_else(|_| "device not available".into(), gpu::card_name),
        device: opened.as_ref().map_or(Device::Cpu, Clone::clone),
        device_name: cli.device.clone(),
        smoke: cli.smoke,
        out: cli.out.clone(),
        work,
    };
    // a line that is never followed by a result means the process was killed (time limit, crash)
    ctx.emit(bench, &key, "started", json!({}))?;
    let result = match (opened, &cli.command) {
        (Err(e), _) => {
            Err(anyhow::Error::from(e).context(format!("opening --device {}", cli.device)))
        }
        (Ok(_), Command::Parity(a)) => parity_cmd(&ctx, a).map(Outcome::Parity),
        (Ok(_), Command::Dcae(a)) => dcae(&ctx, a).map(Outcome::Record),
        (Ok(_), Command::Gemma(a)) => gemma(&ctx, a).map(Outcome::Record),
        (Ok(_), Command::Prep(a)) => prep_bench(&ctx, a).map(Outcome::Record),
        (Ok(_), Command::TrainStep(a)) => train_step(&ctx, a, cli.time_limit).map(Outcome::Record),
        (Ok(_), Command::AllReduce(a)) => all_reduce(&ctx, a).map(Outcome::Record),
    };
    match result {
        Ok(Outcome::Parity(passed)) => Ok(passed),
        Ok(Outcome::Record(record)) => {
            ctx.emit_record(&record, "ok")?;
            Ok(true)
        }
        Err(e) => {
            let msg = format!("{e:#}");
            println!("[error] {key} on {}: {msg}", ctx.card);
            ctx.emit(bench, &key, "error", json!({"error": msg}))?;
            Ok(false)
        }
    }
}

/// (config, layers) of the all-reduce bench: the smoke run takes one block of the 0.6B model.
fn all_reduce_sizes(smoke: bool, a: &AllReduceArgs) -> (String, Option<usize>) {
    if smoke {
        ("0.6B".into(), Some(1))
    } else {
        (a.config.clone(), None)
    }
}

fn all_reduce_key(smoke: bool, a: &AllReduceArgs) -> String {
    let (config, layers) = all_reduce_sizes(smoke, a);
    match layers {
        Some(l) => format!("all-reduce {config} {l}l world 1"),
        None => format!("all-reduce {config} world 1"),
    }
}

fn all_reduce(ctx: &Ctx, a: &AllReduceArgs) -> Result<Record> {
    use candle_core::backprop::GradStore;
    use candle_core::Var;
    use sana_sprint::dist::group::{Backend, ProcessGroup};
    use sana_sprint::dist::{LaunchEnv, Launcher};

    let (config, layers) = all_reduce_sizes(ctx.smoke, a);
    let cfg: SanaConfig = serde_json::from_value(random::teacher_config(&config, layers)?)?;
    // a world of one on a free loopback port, as torchrun would describe it
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let env = LaunchEnv {
        launcher: Launcher::Torchrun,
        rank: 0,
        world_size: 1,
        local_rank: 0,
        local_world_size: 1,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let t = Instant::now();
    let mut group = ProcessGroup::join(&env, &ctx.device, Duration::from_secs(120))?;
    let init_s = t.elapsed().as_secs_f64();

    // every tensor of the student at its real size (the teacher's keys: the student adds the guidance
    // embedder and the logvar head, 0.3% more), a random gradient for each
    let keys = random::teacher_keys(&cfg)?;
    let mut vars = Vec::with_capacity(keys.len());
    let mut grads = GradStore::default();
    for (_, shape) in &keys {
        let var = Var::zeros(shape.as_slice(), DType::F32, &ctx.device)?;
        grads.insert(
            var.as_tensor(),
            Tensor::randn(0f32, 1e-3, shape.as_slice(), &ctx.device)?,
        );
        vars.push(var);
    }
    let params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let sampler = gpu::Sampler::start(&ctx.device);
    let mut metrics = Map::new();
    metrics.insert("init_s".into(), init_s.into());
    for dtype in [DType::F32, DType::BF16] {
        let mut times = Vec::new();
        for i in 0..=a.iters.max(1) {
            ctx.device.synchronize()?;
            let t = Instant::now();
            group.average_gradients_as(&mut grads, &vars, dtype)?;
            ctx.device.synchronize()?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let s = median(&times);
        let name = if dtype == DType::F32 { "f32" } else { "bf16" };
        metrics.insert(format!("{name}_s"), s.into());
        let bytes = (params * dtype.size_in_bytes()) as f64;
        metrics.insert(format!("{name}_gb_per_s"), (bytes / s / 1e9).into());
    }
    // the same bytes copied once on the device, for scale
    let flat = Tensor::zeros(params, DType::F32, &ctx.device)?;
    let (copies, _, _) = time_runs(&ctx.device, a.iters, || Ok(flat.copy()?))?;
    metrics.insert("f32_copy_s".into(), median(&copies).into());
    let samples = sampler.stop();
    metrics.insert("params".into(), params.into());
    metrics.insert(
        "gradient_gib_f32".into(),
        ((params * 4) as f64 / 1073741824.0).into(),
    );
    let bucket = group.bucket_bytes();
    let collective = match group.backend() {
        Backend::Nccl => "NCCL's all-reduce is a device-local copy on a world of one",
        Backend::Tcp => "the CPU ring sends nothing on a world of one (the buckets still go to host memory and back)",
    };
    let mut notes = vec![format!(
        "{collective}; the time is the bucketing (flatten, cast, concatenate, divide, slice) plus that; median \
         of {} after 1 warm-up per dtype",
        a.iters.max(1)
    )];
    add_device_metrics(&mut metrics, &mut notes, &samples, None);
    Ok(Record {
        bench: "all-reduce",
        key: all_reduce_key(ctx.smoke, a),
        params: json!({"config": config, "layers": cfg.num_layers, "tensors": vars.len(), "params": params,
                       "backend": group.backend().name(), "world_size": 1,
                       "bucket_mib": bucket as f64 / 1048576.0, "iters": a.iters.max(1)}),
        metrics,
        notes,
    })
}

fn main() -> ExitCode {
    sana_sprint::cli::init_logging_with("warn,sana_sprint::train::trainer=error");
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
