//! sprint-train on the embedded tiny teacher and a store made from the demo shards: checkpoint contents and
//! pruning, exact resume (bit for bit on CPU f32), NaN/Inf skips, store/teacher mismatch refusal, and the CLI
//! end to end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use sana_sprint::device::MixedPrecision;
use sana_sprint::hub::HubConfig;
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::train::checkpoint;
use sana_sprint::train::trainer::{self, TrainOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_model() -> PathBuf {
    root().join("datasets/tiny-sana-sprint")
}

/// The demo shards encoded once per test binary (64 px: 2×2 latents, 24 rows).
fn demo_store() -> &'static Path {
    static STORE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.lance");
        let opts = PrepOptions {
            pretrained_model_name_or_path: tiny_model().display().to_string(),
            file_path: vec![root()
                .join("datasets/demo/train_*.parquet")
                .display()
                .to_string()],
            output: path.clone(),
            resolution: 64,
            mixed_precision: MixedPrecision::No,
            device: "cpu".into(),
            progress: false,
            ..PrepOptions::default()
        };
        let hub = HubConfig {
            cache_dir: root().join("target/no-hf-cache"),
            offline: true,
            revision: "main".into(),
        };
        prep::run(&opts, &hub).unwrap();
        (dir, path)
    });
    path
}

fn options(out: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(tiny_model(), demo_store().to_path_buf(), out.to_path_buf());
    o.train_batch_size = 2;
    o.max_train_steps = Some(4);
    o.checkpointing_steps = 2;
    o.learning_rate = 1e-3;
    o.seed = 7;
    o.step.train_largest_timestep = true;
    o.step.misaligned_pairs_d = true;
    o.step.tangent_warmup_steps = 3;
    o.lr_scheduler = "linear".parse().unwrap();
    o.lr_warmup_steps = 1;
    o
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Asserts two safetensors files hold the same names with bit-identical values.
fn assert_identical(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    let mut names: Vec<_> = ta.keys().cloned().collect();
    names.sort();
    let mut names_b: Vec<_> = tb.keys().cloned().collect();
    names_b.sort();
    assert_eq!(names, names_b, "{} vs {}", a.display(), b.display());
    for name in names {
        let (x, y) = (&ta[&name], &tb[&name]);
        assert_eq!(x.dims(), y.dims(), "{name}");
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        assert!(
            bits(x) == bits(y),
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (ta, tb) = (tensors(a), tensors(b));
    ta.iter()
        .map(|(name, x)| {
            (x - &tb[name])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn checkpoints_contents_limit_and_latest() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.max_train_steps = Some(6);
    o.checkpoints_total_limit = Some(2);
    let summary = trainer::run(&o).unwrap();
    assert_eq!(summary.global_step, 6);
    assert_eq!(
        (summary.generator_updates, summary.discriminator_updates),
        (3, 3)
    );
    // checkpoint-2 was pruned once checkpoint-6 existed
    let kept: Vec<u64> = checkpoint::list_checkpoints(dir.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![4, 6]);
    let ck = dir.path().join("checkpoint-6");
    for file in [
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        checkpoint::LOGVAR_FILE,
        checkpoint::HEADS_FILE,
        checkpoint::OPTIM_G_FILE,
        checkpoint::OPTIM_D_FILE,
        checkpoint::STATE_FILE,
    ] {
        assert!(ck.join(file).is_file(), "checkpoint-6 lacks {file}");
    }
    let state = checkpoint::read_state(&ck).unwrap();
    assert_eq!(state.global_step, 6);
    assert_eq!(state.batches_consumed, 6);
    assert_eq!(state.phase, checkpoint::Phase::Generator);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("transformer/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["guidance_embeds"], true);
    // the backbone file has exactly the diffusers student keys; logvar and the heads' buffers live apart
    let backbone = tensors(&ck.join("transformer/diffusion_pytorch_model.safetensors"));
    assert!(backbone.contains_key("time_embed.guidance_embedder.linear_1.weight"));
    assert!(!backbone.keys().any(|k| k.starts_with("logvar_linear")));
    let heads = tensors(&ck.join(checkpoint::HEADS_FILE));
    assert!(heads.contains_key("3.main.1.fn.0.weight_u") && heads.contains_key("0.cls.weight_v"));
    // the student moved away from the teacher initialisation, and the export equals the last checkpoint
    assert_identical(
        &ck.join("transformer/diffusion_pytorch_model.safetensors"),
        &dir.path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
    );
    assert_identical(
        &ck.join(checkpoint::HEADS_FILE),
        &dir.path().join(checkpoint::HEADS_FILE),
    );
    // a half-written later checkpoint is never picked by `latest`, and is cleaned on the next start
    let partial = dir.path().join("checkpoint-8.partial-123");
    std::fs::create_dir_all(&partial).unwrap();
    assert_eq!(checkpoint::latest(dir.path()).unwrap().unwrap(), ck);
    // a fresh run into a folder holding checkpoints is refused rather than mixing two runs
    let err = trainer::run(&o).unwrap_err().to_string();
    assert!(err.contains("--resume_from_checkpoint latest"), "{err}");
    assert!(partial.exists(), "nothing is touched by a refused run");
}

#[test]
fn resume_is_exact() {
    let straight = tempfile::tempdir().unwrap();
    trainer::run(&options(straight.path())).unwrap();

    let split = tempfile::tempdir().unwrap();
    let mut first = options(split.path());
    first.kill_after_step = Some(2);
    let s = trainer::run(&first).unwrap();
    assert_eq!(s.global_step, 2);
    assert!(
        !split.path().join("transformer").exists(),
        "a killed run exports nothing"
    );
    let mut second = options(split.path());
    second.resume_from_checkpoint = Some("latest".into());
    let s = trainer::run(&second).unwrap();
    assert_eq!(s.resumed_from.unwrap(), split.path().join("checkpoint-2"));
    assert_eq!(s.global_step, 4);

    for file in [
        "transformer/diffusion_pytorch_model.safetensors",
        checkpoint::LOGVAR_FILE,
        checkpoint::HEADS_FILE,
    ] {
        assert_identical(&straight.path().join(file), &split.path().join(file));
    }
    for file in [checkpoint::OPTIM_G_FILE, checkpoint::OPTIM_D_FILE] {
        assert_identical(
            &straight.path().join("checkpoint-4").join(file),
            &split.path().join("checkpoint-4").join(file),
        );
    }
    // the training actually changed the student (so the comparison is not between two untouched copies)
    let init = tempfile::tempdir().unwrap();
    let mut none = options(init.path());
    none.max_train_steps = Some(0);
    trainer::run(&none).unwrap();
    let moved = max_abs_diff(
        &init
            .path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
        &split
            .path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
    );
    assert!(moved > 1e-4, "student did not change: {moved}");
    // metrics continue without duplicated steps
    let steps: Vec<u64> = std::fs::read_to_string(split.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
}

#[test]
fn nan_steps_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    // batch 1 is the first D batch: its step is skipped, the phase stays D for batch 2
    o.inject_nan_batches = vec![1];
    let s = trainer::run(&o).unwrap();
    assert_eq!(s.nan_skips, 1);
    assert_eq!(s.global_step, 4);
    assert_eq!(s.batches, 5);
    assert_eq!((s.generator_updates, s.discriminator_updates), (2, 2));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[1]["event"], "nan_skip");
    assert_eq!(lines[2]["phase"], "D");
    // no NaN reached the weights
    for (name, t) in tensors(
        &dir.path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
    ) {
        let finite = t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite());
        assert!(finite, "{name} has non-finite values");
    }
}

#[test]
fn store_made_with_other_encoders_is_refused() {
    // a copy of the tiny pipeline whose VAE config differs from the one the store was made with
    let other = tempfile::tempdir().unwrap();
    for sub in [
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    ] {
        let src = tiny_model().join(sub);
        let dst = other.path().join(sub);
        std::fs::create_dir_all(&dst).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
    let cfg = other.path().join("vae/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["scaling_factor"] = serde_json::json!(0.5);
    std::fs::write(&cfg, v.to_string()).unwrap();

    let out = tempfile::tempdir().unwrap();
    let mut o = options(out.path());
    o.pretrained_model_name_or_path = other.path().to_path_buf();
    o.max_train_steps = Some(2);
    let err = trainer::run(&o).unwrap_err().to_string();
    assert!(
        err.contains("vae") && err.contains("--allow_store_mismatch"),
        "{err}"
    );
    o.allow_store_mismatch = true;
    trainer::run(&o).unwrap();
}

#[test]
fn cli_end_to_end() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_sprint-train"))
        .args(["--pretrained_model_name_or_path"])
        .arg(tiny_model())
        .arg("--latents")
        .arg(demo_store())
        .arg("--output_dir")
        .arg(out.path())
        .args([
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "2",
            "--train_batch_size",
            "2",
            "--seed",
            "3",
            "--train_largest_timestep",
            "--misaligned_pairs_D",
            "--no_progress",
            "--device",
            "cpu",
            "--validation_prompt",
            "a red cube",
            "--num_validation_images",
            "2",
            "--validation_steps",
            "2",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(stdout.contains("trained 4 global steps"), "{stdout}");
    let o = out.path();
    for file in [
        "train_config.json",
        "metrics.jsonl",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        checkpoint::LOGVAR_FILE,
        checkpoint::HEADS_FILE,
        "checkpoint-2/trainer_state.json",
        "checkpoint-4/trainer_state.json",
        "validation/step-000002.png",
        "validation/step-000004.png",
    ] {
        assert!(o.join(file).is_file(), "missing {file}\n{stdout}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("train_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["max_train_steps"], 4);
    assert_eq!(config["misaligned_pairs_d"], true);
    let metrics = std::fs::read_to_string(o.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        assert_eq!(line["phase"], if i % 2 == 0 { "G" } else { "D" });
        assert!(line["scm_loss"].as_f64().unwrap().is_finite());
        assert!(line["grad_norm"].as_f64().unwrap().is_finite());
    }
    assert!(lines[3]["d_loss"].as_f64().unwrap().is_finite());
    let img = image::open(o.join("validation/step-000004.png")).unwrap();
    assert!(img.width() > 0 && img.height() > 0);

    // a wrong teacher folder gets an actionable error
    let bad = Command::new(env!("CARGO_BIN_EXE_sprint-train"))
        .args(["--pretrained_model_name_or_path"])
        .arg(tiny_model().join("vae"))
        .arg("--latents")
        .arg(demo_store())
        .arg("--output_dir")
        .arg(out.path().join("bad"))
        .args(["--device", "cpu"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("transformer"), "{err}");
}

#[test]
fn accumulation_and_bf16_compute() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.max_train_steps = Some(2);
    o.gradient_accumulation_steps = 2;
    o.mixed_precision = MixedPrecision::Bf16;
    o.checkpointing_steps = 2;
    let s = trainer::run(&o).unwrap();
    // a phase lasts two batches: G on batches 0–1, D on batches 2–3
    assert_eq!(s.batches, 4);
    assert_eq!((s.generator_updates, s.discriminator_updates), (1, 1));
    assert!(s.last_scm_loss.unwrap().is_finite() && s.last_d_loss.unwrap().is_finite());
    // bf16 export by default, f32 master weights in the checkpoint
    let export = tensors(
        &dir.path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
    );
    assert!(export
        .values()
        .all(|t| t.dtype() == candle_core::DType::BF16));
    let ck = tensors(
        &dir.path()
            .join("checkpoint-2/transformer/diffusion_pytorch_model.safetensors"),
    );
    assert!(ck.values().all(|t| t.dtype() == candle_core::DType::F32));
    // the bf16 run trained the same student as an f32 run to bf16 accuracy
    let f32_dir = tempfile::tempdir().unwrap();
    let mut f = options(f32_dir.path());
    f.max_train_steps = Some(2);
    f.gradient_accumulation_steps = 2;
    trainer::run(&f).unwrap();
    let a = tensors(
        &dir.path()
            .join("checkpoint-2/transformer/diffusion_pytorch_model.safetensors"),
    );
    let b = tensors(
        &f32_dir
            .path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
    );
    let mut worst = 0f32;
    for (name, x) in &a {
        let d = (x - &b[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        worst = worst.max(d.to_scalar::<f32>().unwrap());
    }
    // one AdamW step moves each weight by at most ~lr = 1e-3; bf16 compute may flip the direction of some
    // near-zero gradients, so the two runs agree within 2·lr
    assert!(
        worst <= 2.0e-3 * 1.01,
        "bf16 vs f32 run: max weight difference {worst}"
    );
}
