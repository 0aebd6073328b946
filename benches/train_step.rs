//! sprint-train step time, peak memory and loader wait on random data (never fails on speed).
//!
//! `cargo bench --profile dev --bench train_step -- [--config tiny|0.6B|1.6B] [--resolution 256] [--steps 6]
//!  [--batch 1] [--layers N] [--gradient_checkpointing] [--mixed_precision no|bf16] [--device cpu|cuda]`
//!
//! - `tiny`: the embedded tiny teacher (datasets/tiny-sana-sprint).
//! - `0.6B` / `1.6B`: a teacher folder with random weights under the real key names and shapes
//!   (tests/fixtures/keys), written once to `$TMPDIR/sana-sprint-bench/` in bf16; `--layers` keeps the first N
//!   blocks for quick runs (the head blocks are clamped to the kept ones).
//!
//! The store holds random latents and prompt embeddings (prompt lengths 120–300 of 300) shaped for the
//! resolution, written once next to the teacher. The run trains `--steps` global steps (G and D alternating,
//! `--train_largest_timestep` and `--misaligned_pairs_D` on, as the README run), then prints mean seconds per
//! G and D step (the first two steps are warm-up and excluded when there are at least 6), the peak RSS of
//! the process (one configuration per process: VmHWM never decreases) and the share of time spent waiting
//! on the loader.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sana_sprint::nn::rng::InitRng;
use sana_sprint::prep::MixedPrecision;
use sana_sprint::store::{
    FloatEncoding, LatentRow, ModelInfo, ModelsInfo, OpenMode, PreprocessInfo, StoreConfig,
    StoreDType, StoreWriter,
};
use sana_sprint::train::trainer::{self, TrainOptions};

struct Args {
    config: String,
    resolution: usize,
    steps: u64,
    batch: usize,
    layers: Option<usize>,
    checkpointing: bool,
    mixed: MixedPrecision,
    device: String,
}

fn args() -> Args {
    let mut a = Args {
        config: "tiny".into(),
        resolution: 256,
        steps: 6,
        batch: 1,
        layers: None,
        checkpointing: false,
        mixed: MixedPrecision::No,
        device: "cpu".into(),
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = |i: usize| v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--config" => a.config = next(i),
            "--resolution" => a.resolution = next(i).parse().expect("--resolution N"),
            "--steps" => a.steps = next(i).parse().expect("--steps N"),
            "--batch" => a.batch = next(i).parse().expect("--batch N"),
            "--layers" => a.layers = Some(next(i).parse().expect("--layers N")),
            "--device" => a.device = next(i),
            "--mixed_precision" => {
                a.mixed = match next(i).as_str() {
                    "bf16" => MixedPrecision::Bf16,
                    _ => MixedPrecision::No,
                }
            }
            "--gradient_checkpointing" => {
                a.checkpointing = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn real_config(name: &str, layers: Option<usize>) -> serde_json::Value {
    let (heads, layers_full, cross_heads, cross_hd) = match name {
        "0.6B" => (36, 28, 16, 72),
        "1.6B" => (70, 20, 20, 112),
        other => panic!("unknown --config {other} (tiny, 0.6B, 1.6B)"),
    };
    let dim = heads * 32;
    serde_json::json!({
        "_class_name": "SanaTransformer2DModel",
        "in_channels": 32, "out_channels": 32,
        "num_attention_heads": heads, "attention_head_dim": 32,
        "num_layers": layers.unwrap_or(layers_full),
        "num_cross_attention_heads": cross_heads, "cross_attention_head_dim": cross_hd,
        "cross_attention_dim": dim, "caption_channels": 2304, "mlp_ratio": 2.5,
        "dropout": 0.0, "attention_bias": false, "sample_size": 32, "patch_size": 1,
        "norm_elementwise_affine": false, "norm_eps": 1e-6, "interpolation_scale": null,
        "guidance_embeds": false, "guidance_embeds_scale": 0.1,
        "qk_norm": "rms_norm_across_heads", "timestep_scale": 1.0
    })
}

/// A teacher pipeline folder (`transformer/` only) with random bf16 weights under the real key list.
fn random_teacher(name: &str, layers: Option<usize>, dir: &Path) -> PathBuf {
    let root = dir.join(format!(
        "teacher-{name}-{}",
        layers.map_or("all".into(), |l| format!("{l}l"))
    ));
    let tdir = root.join("transformer");
    let weights = tdir.join("diffusion_pytorch_model.safetensors");
    if weights.is_file() {
        return root;
    }
    std::fs::create_dir_all(&tdir).unwrap();
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "tests/fixtures/keys/sana_sprint_{name}_teacher_transformer.txt"
    ));
    let text = std::fs::read_to_string(&keys).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (key, shape) = line.split_once('\t').expect("key<TAB>shape");
        if let (Some(l), Some(rest)) = (layers, key.strip_prefix("transformer_blocks.")) {
            let block: usize = rest.split('.').next().unwrap().parse().unwrap();
            if block >= l {
                continue;
            }
        }
        let shape: Vec<usize> = shape
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().unwrap())
            .collect();
        let n: usize = shape.iter().product();
        let values = if key.contains("norm") && key.ends_with("weight") {
            vec![1.0f32; n]
        } else if key.ends_with("bias") {
            vec![0.0f32; n]
        } else {
            InitRng::for_name(1, key)
                .normal(n)
                .into_iter()
                .map(|v| v * 0.02)
                .collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        tensors.insert(key.to_string(), t);
    }
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    std::fs::write(
        tdir.join("config.json"),
        real_config(name, layers).to_string(),
    )
    .unwrap();
    root
}

fn random_store(path: &Path, resolution: usize, hidden: usize, rows: usize) {
    if path.join("_versions").is_dir() {
        return;
    }
    let m = ModelInfo {
        origin: "bench".into(),
        fingerprint: "sha256:bench".into(),
    };
    let h = resolution / 32;
    let config = StoreConfig {
        format_version: 1,
        resolution: resolution as u32,
        max_sequence_length: 300,
        complex_human_instruction: None,
        vae_scaling_factor: 0.41407,
        text_hidden_size: hidden,
        latent_dtype: StoreDType::Float32,
        embed_dtype: StoreDType::Float16,
        negative_prompt_len: 1,
        negative_prompt_embeds_f32le_b64: StoreConfig::encode_negative(&vec![0.1; hidden]),
        models: ModelsInfo {
            vae: m.clone(),
            text_encoder: m.clone(),
            tokenizer: m,
        },
        preprocess: PreprocessInfo {
            resize: "bench".into(),
            crop: "bench".into(),
            normalize: "bench".into(),
            mixed_precision: "bf16".into(),
        },
        latent_shape: [32, h, h],
        writer: "bench".into(),
    };
    let mut writer = StoreWriter::open(
        path,
        config,
        OpenMode::CreateOrAppend,
        FloatEncoding {
            zstd_level: Some(3),
            byte_stream_split: true,
        },
    )
    .unwrap();
    let mut rng = InitRng::new(5);
    for i in 0..rows {
        let len = 120 + (i * 37) % 181;
        writer.push(LatentRow {
            id: format!("bench#{i}"),
            caption: "a bench caption".into(),
            latent: rng.normal(32 * h * h),
            latent_shape: [32, h as i32, h as i32],
            prompt_embeds: rng.normal(len * hidden),
            prompt_len: len as i32,
        });
    }
    writer.commit().unwrap();
}

fn main() {
    let a = args();
    let dir = std::env::temp_dir().join("sana-sprint-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let (teacher, hidden, num_layers) = if a.config == "tiny" {
        (
            Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint"),
            64,
            20,
        )
    } else {
        let full = if a.config == "0.6B" { 28 } else { 20 };
        (
            random_teacher(&a.config, a.layers, &dir),
            2304,
            a.layers.unwrap_or(full),
        )
    };
    let store = dir.join(format!("store-{hidden}-{}.lance", a.resolution));
    random_store(&store, a.resolution, hidden, 64);
    let out = dir.join(format!(
        "run-{}-{}-{}",
        a.config,
        a.resolution,
        std::process::id()
    ));
    let mut o = TrainOptions::new(teacher, store, out.clone());
    o.train_batch_size = a.batch;
    o.max_train_steps = Some(a.steps);
    o.checkpointing_steps = u64::MAX;
    o.allow_store_mismatch = true;
    o.gradient_checkpointing = a.checkpointing;
    o.mixed_precision = a.mixed;
    o.learning_rate = 1e-6;
    o.step.train_largest_timestep = true;
    o.step.misaligned_pairs_d = true;
    o.head_block_ids = [2usize, 8, 14, 19]
        .iter()
        .map(|&b| b.min(num_layers - 1))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    o.device = sana_sprint::prep::parse_device(&a.device).unwrap();
    let summary = trainer::run(&o).unwrap();

    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let elapsed: Vec<(String, f64)> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["phase"].as_str().unwrap_or("?").to_string(),
                v["elapsed_s"].as_f64().unwrap(),
            )
        })
        .collect();
    let skip = if elapsed.len() >= 6 { 2 } else { 0 };
    let mut times = (Vec::new(), Vec::new());
    for i in skip.max(1)..elapsed.len() {
        let dt = elapsed[i].1 - elapsed[i - 1].1;
        if elapsed[i].0 == "G" {
            times.0.push(dt);
        } else {
            times.1.push(dt);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "config {} ({} layers) {}px batch {} {:?} checkpointing {} device {}",
        a.config, num_layers, a.resolution, a.batch, a.mixed, a.checkpointing, a.device
    );
    println!(
        "G step {:.3} s (n={}), D step {:.3} s (n={}), total {:.1} s for {} steps",
        mean(&times.0),
        times.0.len(),
        mean(&times.1),
        times.1.len(),
        summary.elapsed.as_secs_f64(),
        summary.global_step
    );
    println!(
        "loader wait {:.4} s = {:.3}% of the run",
        summary.loader_wait.as_secs_f64(),
        100.0 * summary.loader_wait.as_secs_f64() / summary.elapsed.as_secs_f64()
    );
    if let Some(peak) = trainer::peak_rss_bytes() {
        println!("peak RSS {:.0} MiB", peak as f64 / 1048576.0);
    }
    let _ = std::fs::remove_dir_all(&out);
}
