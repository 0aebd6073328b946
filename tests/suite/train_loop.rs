//! sprint-train on the embedded tiny teacher and a store made from the demo shards: checkpoint contents and
//! pruning, exact resume (bit for bit on CPU f32, also with gradient accumulation), NaN/Inf skips, bf16
//! compute against f32, accumulation averaging, store/teacher mismatch refusal, and the CLI end to end.
//! The setup helpers here (stores, options, teacher copies, fresh initialisations) are shared with
//! `train_refusals`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use sana_sprint::device::MixedPrecision;
use sana_sprint::hub::HubConfig;
use sana_sprint::models::discriminator::DiscHeads;
use sana_sprint::models::sana::SanaConfig;
use sana_sprint::models::student::Student;
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::train::checkpoint;
use sana_sprint::train::optim::LrScheduleKind;
use sana_sprint::train::trainer::{self, TrainOptions};

use crate::common::{l2_norm, max_abs_diff};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn tiny_model() -> PathBuf {
    root().join("datasets/tiny-sana-sprint")
}

/// Encodes the demo shards matching `pattern` (64 px: 2×2 latents, 8 rows per shard) into a new store.
fn prep_store(pattern: &str) -> (tempfile::TempDir, PathBuf) {
    prep_store_with(pattern, 64, false)
}

/// [`prep_store`] at `resolution`, square or with aspect-ratio buckets.
fn prep_store_with(
    pattern: &str,
    resolution: u32,
    multi_scale: bool,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.lance");
    let opts = PrepOptions {
        pretrained_model_name_or_path: tiny_model().display().to_string(),
        file_path: vec![root()
            .join("datasets/demo")
            .join(pattern)
            .display()
            .to_string()],
        output: path.clone(),
        resolution,
        multi_scale,
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
}

/// The three demo shards encoded once per test binary (24 rows).
pub(crate) fn demo_store() -> &'static Path {
    static STORE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &STORE.get_or_init(|| prep_store("train_*.parquet")).1
}

/// The three demo shards in aspect-ratio buckets of the 512 table (`--multi_scale`), once per test binary.
pub(crate) fn bucketed_store() -> &'static Path {
    static STORE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &STORE
        .get_or_init(|| prep_store_with("train_*.parquet", 512, true))
        .1
}

/// The first demo shard alone, encoded once per test binary (8 rows: same teacher, fewer rows).
pub(crate) fn small_store() -> &'static Path {
    static STORE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &STORE.get_or_init(|| prep_store("train_000.parquet")).1
}

/// A short CPU f32 run: 4 global steps of batch 2, a checkpoint every 2, linear schedule with one warm-up update.
pub(crate) fn options(out: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(tiny_model(), demo_store().to_path_buf(), out.to_path_buf());
    o.train_batch_size = 2;
    o.max_train_steps = Some(4);
    o.checkpointing_steps = 2;
    o.learning_rate = 1e-3;
    o.seed = 7;
    o.step.train_largest_timestep = true;
    o.step.misaligned_pairs_d = true;
    o.step.tangent_warmup_steps = 3;
    o.lr_scheduler = LrScheduleKind::Linear;
    o.lr_warmup_steps = 1;
    o
}

pub(crate) fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A copy of the tiny teacher pipeline (every component folder), to be edited by a test.
pub(crate) fn copy_teacher() -> tempfile::TempDir {
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
    other
}

/// Rewrites the JSON file at `path` with `edit` applied.
pub(crate) fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Every file under `dir` (relative path → bytes), to show that a refused run changed nothing.
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// The student a fresh run with these options initialises (from the teacher, with the run's seed), by name.
pub(crate) fn fresh_student(o: &TrainOptions) -> HashMap<String, Tensor> {
    let s = Student::from_teacher(
        &o.pretrained_model_name_or_path.join("transformer"),
        o.guidance_init,
        o.seed,
        &Device::Cpu,
    )
    .unwrap();
    s.named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

/// The discriminator heads' parameters a fresh run with these options initialises, by name.
pub(crate) fn fresh_heads(o: &TrainOptions) -> HashMap<String, Tensor> {
    let config =
        SanaConfig::from_folder(&o.pretrained_model_name_or_path.join("transformer")).unwrap();
    let heads = DiscHeads::new(
        &o.head_block_ids,
        config.inner_dim(),
        o.seed.wrapping_add(1),
        &Device::Cpu,
    )
    .unwrap();
    heads
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

/// The student saved in a run or checkpoint folder (backbone and logvar head), by name.
pub(crate) fn saved_student(dir: &Path) -> HashMap<String, Tensor> {
    let mut t = tensors(
        &dir.join(checkpoint::TRANSFORMER_DIR)
            .join(checkpoint::TRANSFORMER_WEIGHTS),
    );
    t.extend(tensors(&dir.join(checkpoint::LOGVAR_FILE)));
    t
}

/// Largest |a − b| over the tensors `a` names (every one must exist in `b`).
fn largest_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    a.iter()
        .map(|(name, x)| {
            let y = b.get(name).unwrap_or_else(|| panic!("{name} missing"));
            max_abs_diff(x, y)
        })
        .fold(0.0, f64::max)
}

/// ‖Δa − Δb‖ / ‖Δb‖ over every tensor of `init`, with Δ = final − init (one vector of all parameters).
pub(crate) fn relative_update_error(
    init: &HashMap<String, Tensor>,
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (name, x0) in init {
        let x0 = x0.to_dtype(candle_core::DType::F64).unwrap();
        let f64_of = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        let da = (f64_of(&a[name]) - &x0).unwrap();
        let db = (f64_of(&b[name]) - &x0).unwrap();
        err += l2_norm(&(da - &db).unwrap()).powi(2);
        norm += l2_norm(&db).powi(2);
    }
    assert!(norm > 0.0, "the reference run did not move the weights");
    (err / norm).sqrt()
}

/// The metric lines of a run, in order.
pub(crate) fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts two safetensors files hold the same names with bit-identical values.
pub(crate) fn assert_identical(a: &Path, b: &Path) {
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
            crate::common::f32_values(t)
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
    assert!(!dir.path().join("checkpoint-2").exists());
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
    // the student moved away from the teacher initialisation (two G updates with lr > 0) ...
    let moved = largest_difference(&fresh_student(&o), &saved_student(&ck));
    assert!(moved > 1e-4, "student did not move: {moved:.3e}");
    // ... and the export equals the last checkpoint
    assert_identical(
        &ck.join("transformer/diffusion_pytorch_model.safetensors"),
        &dir.path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
    );
    assert_identical(
        &ck.join(checkpoint::HEADS_FILE),
        &dir.path().join(checkpoint::HEADS_FILE),
    );
    // a half-written later checkpoint is never picked by `latest` ...
    let partial = dir.path().join("checkpoint-8.partial-123");
    std::fs::create_dir_all(&partial).unwrap();
    assert_eq!(checkpoint::latest(dir.path()).unwrap().unwrap(), ck);
    // a fresh run into a folder holding checkpoints is refused rather than mixing two runs
    let err = trainer::run(&o).unwrap_err().to_string();
    assert!(err.contains("--resume_from_checkpoint latest"), "{err}");
    assert!(partial.exists(), "nothing is touched by a refused run");
    // ... and is cleaned on the next start (a resume from checkpoint-6 with nothing left to train)
    o.resume_from_checkpoint = Some("latest".into());
    let s = trainer::run(&o).unwrap();
    assert_eq!((s.global_step, s.resumed_from), (6, Some(ck)));
    assert!(!partial.exists(), "the partial checkpoint was not cleaned");
}

/// Runs 6 global steps straight, and again split at step 4 (killed right after checkpoint-4, then resumed), and
/// asserts both runs end bit for bit equal. By step 4 the generator has had an update with lr > 0 (the linear
/// warm-up gives update 0 lr = 0), so checkpoint-4's student differs from a fresh initialisation and a resume
/// that rebuilt it from the teacher, or dropped the optimiser state, would end elsewhere.
fn check_exact_resume(accumulation: usize) {
    check_exact_resume_on(demo_store(), accumulation)
}

fn check_exact_resume_on(store: &Path, accumulation: usize) {
    let setup = |out: &Path| {
        let mut o = options(out);
        o.latents = store.to_path_buf();
        o.max_train_steps = Some(6);
        o.gradient_accumulation_steps = accumulation;
        o
    };
    let straight = tempfile::tempdir().unwrap();
    trainer::run(&setup(straight.path())).unwrap();

    let split = tempfile::tempdir().unwrap();
    let mut first = setup(split.path());
    first.kill_after_step = Some(4);
    let s = trainer::run(&first).unwrap();
    assert_eq!(s.global_step, 4);
    assert_eq!(s.batches, 4 * accumulation as u64);
    assert!(
        !split.path().join("transformer").exists(),
        "a killed run exports nothing"
    );
    // the split comes after a generator update with lr > 0 ...
    let lines = metrics(split.path());
    assert_eq!(lines[2]["phase"], "G");
    assert!(lines[2]["lr"].as_f64().unwrap() > 0.0, "{}", lines[2]);
    // ... so the checkpoint's student and heads are not their initialisation
    let ck = split.path().join("checkpoint-4");
    let moved = largest_difference(&fresh_student(&first), &saved_student(&ck));
    assert!(
        moved > 1e-4,
        "checkpoint-4 student is still the initialisation: {moved:.3e}"
    );
    let heads_moved = largest_difference(
        &fresh_heads(&first),
        &tensors(&ck.join(checkpoint::HEADS_FILE)),
    );
    assert!(
        heads_moved > 1e-4,
        "checkpoint-4 heads are still the initialisation: {heads_moved:.3e}"
    );

    let mut second = setup(split.path());
    second.resume_from_checkpoint = Some("latest".into());
    let s = trainer::run(&second).unwrap();
    assert_eq!(s.resumed_from.unwrap(), ck);
    assert_eq!(s.global_step, 6);
    assert_eq!(s.batches, 6 * accumulation as u64);

    for file in [
        "transformer/diffusion_pytorch_model.safetensors",
        checkpoint::LOGVAR_FILE,
        checkpoint::HEADS_FILE,
    ] {
        assert_identical(&straight.path().join(file), &split.path().join(file));
    }
    for file in [checkpoint::OPTIM_G_FILE, checkpoint::OPTIM_D_FILE] {
        assert_identical(
            &straight.path().join("checkpoint-6").join(file),
            &split.path().join("checkpoint-6").join(file),
        );
    }
    // the resumed run trained further: its student is not checkpoint-4's
    let further = largest_difference(&saved_student(&ck), &saved_student(split.path()));
    assert!(
        further > 1e-4,
        "nothing trained after the resume: {further:.3e}"
    );
    // metrics continue without duplicated steps
    let steps: Vec<u64> = metrics(split.path())
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn resume_is_exact() {
    check_exact_resume(1);
}

/// A store of aspect-ratio buckets: batches of several latent shapes, each batch one bucket, and the same
/// exact resume.
#[test]
fn bucketed_training_resumes_exactly() {
    use sana_sprint::store::LatentStore;
    use sana_sprint::train::loader::{LoaderOptions, StoreLoader};
    let store = bucketed_store();
    let mut loader = StoreLoader::start(
        LatentStore::open(store).unwrap(),
        &LoaderOptions {
            batch_size: 2,
            seed: 7,
            ..LoaderOptions::default()
        },
        Default::default(),
    )
    .unwrap();
    let mut shapes = std::collections::BTreeSet::new();
    for _ in 0..loader.batches_per_epoch() {
        shapes.insert(loader.next_batch().unwrap().latent_shape);
    }
    assert!(shapes.len() >= 2, "one epoch's batch shapes: {shapes:?}");
    assert!(shapes.iter().any(|[_, h, w]| h != w), "{shapes:?}");
    check_exact_resume_on(store, 1);
    // metrics name each step's bucket (its latent shape)
    let out = tempfile::tempdir().unwrap();
    let mut o = options(out.path());
    o.latents = store.to_path_buf();
    o.max_train_steps = Some(4);
    let summary = trainer::run(&o).unwrap();
    // the summary's per-bucket figures: every step counted once, under the shape its metrics line names
    let counted: u64 = summary.buckets.iter().map(|b| b.steps).sum();
    assert_eq!(counted, 4, "{:?}", summary.buckets);
    for b in &summary.buckets {
        assert!(shapes.contains(&b.latent_shape), "{b:?}");
        assert!(
            b.mean_step_s > 0.0 && b.peak_bytes.is_some_and(|p| p > 0),
            "{b:?}"
        );
    }
    for line in metrics(out.path()) {
        assert!(line["step_s"].as_f64().is_some_and(|s| s > 0.0), "{line}");
        assert!(
            line["peak_mem_gib"].as_f64().is_some_and(|g| g > 0.0),
            "{line}"
        );
        let shape = line["latent_shape"]
            .as_array()
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            shapes.contains(&[0, 1, 2].map(|i| shape[i].as_u64().unwrap() as usize)),
            "{line}"
        );
    }
}

#[test]
fn resume_is_exact_with_accumulation() {
    check_exact_resume(2);
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
    let lines = metrics(dir.path());
    assert_eq!(lines[1]["event"], "nan_skip");
    assert_eq!(lines[1]["phase"], "D");
    assert_eq!(lines[2]["phase"], "D");
    assert_eq!(lines[2]["step"], 2);
    // no NaN reached the weights
    for (name, t) in saved_student(dir.path())
        .into_iter()
        .chain(tensors(&dir.path().join(checkpoint::HEADS_FILE)))
    {
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
fn profile_writes_each_steps_stages() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.profile = true;
    o.gradient_checkpointing = true;
    o.mixed_precision = MixedPrecision::Bf16;
    trainer::run(&o).unwrap();
    let lines: Vec<_> = metrics(dir.path())
        .into_iter()
        .filter(|l| l.get("phase").is_some())
        .collect();
    assert_eq!(lines.len(), 4);
    let g_stages = [
        "loader_wait",
        "host_to_device",
        "draws",
        "text_context",
        "teacher_cfg",
        "jvp",
        "student_forward",
        "scm_loss",
        "ladd_forward",
        "loss_readback",
        "backward",
        "checkpoint_recompute",
        "accumulate",
        "clip",
        "optimizer",
        "bf16_recast",
    ];
    let d_stages = [
        "loader_wait",
        "host_to_device",
        "draws",
        "student_forward",
        "d_forward",
        "loss_readback",
        "backward",
        "accumulate",
        "clip",
        "optimizer",
    ];
    let mut previous_elapsed = None;
    for line in &lines {
        let stages = line["stages"].as_object().expect("a stages object");
        let names: Vec<&str> = stages.keys().map(String::as_str).collect();
        let expected: &[&str] = if line["phase"] == "G" {
            &g_stages
        } else {
            &d_stages
        };
        let mut sorted_expected = expected.to_vec();
        sorted_expected.sort();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, sorted_expected, "{line}");
        // the stages cover the step: their sum is at most the time between two metrics lines
        let total: f64 = stages.values().map(|v| v.as_f64().unwrap()).sum();
        assert!(stages.values().all(|v| v.as_f64().unwrap() >= 0.0));
        let elapsed = line["elapsed_s"].as_f64().unwrap();
        if let Some(prev) = previous_elapsed {
            assert!(
                total <= elapsed - prev + 1e-3,
                "{total} > {}",
                elapsed - prev
            );
        }
        previous_elapsed = Some(elapsed);
    }
    // without --profile the lines have no stages
    let plain = tempfile::tempdir().unwrap();
    trainer::run(&options(plain.path())).unwrap();
    assert!(metrics(plain.path())
        .iter()
        .all(|l| l.get("stages").is_none()));
}

#[test]
fn store_made_with_other_encoders_is_refused() {
    // a copy of the tiny pipeline whose VAE config differs from the one the store was made with
    let other = copy_teacher();
    edit_json(&other.path().join("vae/config.json"), |v| {
        v["scaling_factor"] = serde_json::json!(0.5)
    });

    let out = tempfile::tempdir().unwrap();
    let mut o = options(out.path().join("run").as_path());
    o.pretrained_model_name_or_path = other.path().to_path_buf();
    o.max_train_steps = Some(2);
    let err = trainer::run(&o).unwrap_err().to_string();
    assert!(
        err.contains("vae") && err.contains("--allow_store_mismatch"),
        "{err}"
    );
    assert!(
        !o.output_dir.exists(),
        "a refused run wrote {}",
        o.output_dir.display()
    );
    o.allow_store_mismatch = true;
    assert_eq!(trainer::run(&o).unwrap().global_step, 2);
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

/// A bf16 or f32 run of 4 G and 4 D updates with 2 micro-batches each at a constant lr; checkpoint-8 holds the
/// f32 master weights either way. AdamW's eps is raised to 1e-3 (gradients here are ~1e-4 per element after
/// clipping to norm 0.1), so that its first updates follow the gradient rather than its sign: with the default
/// 1e-8 every element moves by ±lr, and bf16 rounding that flips the sign of near-zero gradients makes whole
/// updates differ (measured: 18–22% relative for the student), which would hide a real bf16 fault.
fn precision_options(out: &Path, mixed_precision: MixedPrecision) -> TrainOptions {
    let mut o = options(out);
    o.max_train_steps = Some(8);
    o.checkpointing_steps = 8;
    o.gradient_accumulation_steps = 2;
    o.lr_scheduler = LrScheduleKind::Constant;
    o.learning_rate = BF16_LR;
    o.adam.eps = 1e-3;
    o.mixed_precision = mixed_precision;
    o
}

const BF16_LR: f64 = 1e-3;
/// Bound on ‖Δbf16 − Δf32‖ / ‖Δf32‖ (Δ = checkpoint − initialisation) for the student. Measured 0.7–0.8%;
/// a bf16 compute copy not refreshed after each G update gives 7.9%.
const BF16_STUDENT_TOL: f64 = 0.03;
/// The same bound for the discriminator heads, which see bf16 teacher features and a bf16 student's samples:
/// measured 22–27% (their small gradients are the noisiest), so this bound only catches gross faults.
const BF16_HEADS_TOL: f64 = 0.5;

#[test]
fn bf16_training_follows_f32() {
    let dir = tempfile::tempdir().unwrap();
    let o = precision_options(dir.path(), MixedPrecision::Bf16);
    let s = trainer::run(&o).unwrap();
    // a phase lasts two batches
    assert_eq!(s.batches, 16);
    assert_eq!((s.generator_updates, s.discriminator_updates), (4, 4));

    assert!(s.last_scm_loss.unwrap().is_finite() && s.last_d_loss.unwrap().is_finite());
    // bf16 export by default, f32 master weights in the checkpoint
    let export = tensors(
        &dir.path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
    );
    assert!(export
        .values()
        .all(|t| t.dtype() == candle_core::DType::BF16));
    let ck = dir.path().join("checkpoint-8");
    let bf16_student = saved_student(&ck);
    assert!(bf16_student
        .values()
        .all(|t| t.dtype() == candle_core::DType::F32));

    let f32_dir = tempfile::tempdir().unwrap();
    let f = precision_options(f32_dir.path(), MixedPrecision::No);
    trainer::run(&f).unwrap();
    let f32_ck = f32_dir.path().join("checkpoint-8");

    // the bf16 run changed the weights as the f32 run did, to bf16 accuracy: with a compute copy that is not
    // refreshed after each update its gradients would be taken at stale weights, and its updates would drift
    let student = relative_update_error(&fresh_student(&o), &bf16_student, &saved_student(&f32_ck));
    let heads = relative_update_error(
        &fresh_heads(&o),
        &tensors(&ck.join(checkpoint::HEADS_FILE)),
        &tensors(&f32_ck.join(checkpoint::HEADS_FILE)),
    );
    println!("bf16 vs f32 relative update error: student {student:.3e}, heads {heads:.3e}");
    assert!(
        student < BF16_STUDENT_TOL && heads < BF16_HEADS_TOL,
        "bf16 vs f32: ‖Δbf16 − Δf32‖/‖Δf32‖ is {student:.3e} (student, bound {BF16_STUDENT_TOL}), \
         {heads:.3e} (heads, bound {BF16_HEADS_TOL})"
    );
}

/// With accumulation the synced gradient is the mean of the micro-batch gradients, so its norm (logged before
/// clipping) is at most the mean of their norms. A sum instead of a mean is twice as long and breaks that bound
/// unless the two gradients point nearly opposite ways. Each micro-batch gradient is measured alone by a run
/// without accumulation: batch 0 as its first step, batch 1 by skipping batch 0 with an injected NaN (same
/// weights, same global step, same per-batch draws). The bound has 10% slack: the logged norms were seen to
/// differ by up to ~0.05% between processes (the two gradients are nearly parallel, so the exact bound is tight),
/// while a sum would exceed it by ~100%.
#[test]
fn accumulation_averages_micro_batches() {
    let first_grad_norm = |accumulation: usize, nan_batches: Vec<u64>| -> f64 {
        let dir = tempfile::tempdir().unwrap();
        let mut o = options(dir.path());
        o.max_train_steps = Some(1);
        o.gradient_accumulation_steps = accumulation;
        o.inject_nan_batches = nan_batches;
        let s = trainer::run(&o).unwrap();
        assert_eq!(s.generator_updates, 1);
        let line = metrics(dir.path())
            .into_iter()
            .find(|l| l["phase"] == "G" && l.get("event").is_none())
            .unwrap();
        line["grad_norm"].as_f64().unwrap()
    };
    let g0 = first_grad_norm(1, vec![]);
    let g1 = first_grad_norm(1, vec![0]);
    let mean = first_grad_norm(2, vec![]);
    println!("|g0| {g0:.6e}, |g1| {g1:.6e}, |(g0 + g1)/2| {mean:.6e}");
    let bound = 0.5 * (g0 + g1) * 1.1;
    assert!(
        mean <= bound,
        "accumulated gradient norm {mean:.6e} exceeds the mean of the micro-batch norms {bound:.6e}: \
         the micro-batch gradients are summed, not averaged"
    );
    assert!(mean >= 0.5 * (g0 - g1).abs() * 0.9, "{mean} < |g0 - g1|/2");
}

/// `--validation_resolution HxW` (repeatable; a single number is a square): one grid per size, named by it.
#[test]
fn validation_grids_at_several_resolutions() {
    let out = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sprint-train"))
            .args(["--pretrained_model_name_or_path"])
            .arg(tiny_model())
            .arg("--latents")
            .arg(small_store())
            .arg("--output_dir")
            .arg(out.path())
            .args([
                "--max_train_steps",
                "2",
                "--train_batch_size",
                "2",
                "--no_progress",
                "--device",
                "cpu",
                "--validation_prompt",
                "a red cube",
                "--num_validation_images",
                "2",
            ])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let bad = run(&["--validation_resolution", "64x"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not HxW"));
    let ok = run(&[
        "--validation_resolution",
        "64x96",
        "--validation_resolution",
        "96",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v = out.path().join("validation");
    // two images per prompt side by side, one prompt
    for (file, (w, h)) in [
        ("step-000002-64x96.png", (192, 64)),
        ("step-000002-96x96.png", (192, 96)),
    ] {
        let img = image::open(v.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!((img.width(), img.height()), (w, h), "{file}");
    }
    assert!(!v.join("step-000002.png").exists());
}

/// `sprint-prep --validation_prompt` stores the prompts' embeddings; sprint-train then draws its validation
/// grids from them without a text encoder, and the grid equals the one drawn from the same prompt encoded at
/// the start of the run (byte for byte, f32).
#[test]
fn stored_validation_prompts_need_no_text_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("with-prompts.lance");
    let hub = HubConfig {
        cache_dir: root().join("target/no-hf-cache"),
        offline: true,
        revision: "main".into(),
    };
    let prep_opts = PrepOptions {
        pretrained_model_name_or_path: tiny_model().display().to_string(),
        file_path: vec![root()
            .join("datasets/demo/train_000.parquet")
            .display()
            .to_string()],
        output: store.clone(),
        resolution: 64,
        mixed_precision: MixedPrecision::No,
        device: "cpu".into(),
        progress: false,
        validation_prompts: vec!["a red cube".into(), "two green rings".into()],
        ..PrepOptions::default()
    };
    prep::run(&prep_opts, &hub).unwrap();
    let config = sana_sprint::store::LatentStore::open(&store)
        .unwrap()
        .config()
        .clone();
    assert_eq!(config.validation_prompts.len(), 2);
    assert!(config.validation_prompts.iter().all(|p| p.len > 1));

    let grid = |out: &Path, prompts: Vec<String>, teacher: &Path| {
        let mut o = options(out);
        o.latents = store.clone();
        o.pretrained_model_name_or_path = teacher.to_path_buf();
        o.max_train_steps = Some(2);
        o.validation_prompts = prompts;
        o.allow_store_mismatch = true;
        trainer::run(&o).unwrap();
        std::fs::read(out.join("validation/step-000002.png")).unwrap()
    };
    // a teacher folder without a text encoder: the stored prompts are enough
    let no_text = copy_teacher();
    for entry in std::fs::read_dir(no_text.path().join("text_encoder")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::write(&path, b"not weights").unwrap();
        }
    }
    let a = tempfile::tempdir().unwrap();
    let stored = grid(a.path(), Vec::new(), no_text.path());
    let b = tempfile::tempdir().unwrap();
    let encoded = grid(
        b.path(),
        vec!["a red cube".into(), "two green rings".into()],
        &tiny_model(),
    );
    assert_eq!(
        stored, encoded,
        "stored and freshly encoded prompts give the same grid"
    );

    // a later run's prompts replace the stored ones; the rows stay
    let rows = sana_sprint::store::LatentStore::open(&store)
        .unwrap()
        .len()
        .unwrap();
    let again = PrepOptions {
        validation_prompts: vec!["a blue sphere".into()],
        ..prep_opts
    };
    assert_eq!(prep::run(&again, &hub).unwrap().rows_written, 0);
    let reopened = sana_sprint::store::LatentStore::open(&store).unwrap();
    let names: Vec<&str> = reopened
        .config()
        .validation_prompts
        .iter()
        .map(|p| p.prompt.as_str())
        .collect();
    assert_eq!(names, ["a blue sphere"]);
    assert_eq!(reopened.len().unwrap(), rows);
}
