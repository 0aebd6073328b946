//! The reference script's habits: its command line (flags honoured, checked against the store, or refused with
//! one line saying what to do instead) and its default `--report_to tensorboard`.

use std::process::Command;

use sana_sprint::cli::train::{TrainArgs, REFUSED};
use sana_sprint::cli::CliArgs;
use sana_sprint::train::trainer;
use sana_sprint::Error;

use crate::tensorboard::{python, read_back, values};
use crate::train_loop::{demo_store, metrics, options, tiny_model};

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The error `sprint-train ARGS` gives before any work (parsing + resolving the options).
fn refusal(args: &[&str]) -> String {
    let argv = ["sprint-train", "--device", "cpu"].iter().chain(args);
    let parsed = TrainArgs::try_parse_args(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    match parsed.resolve() {
        Err(Error::Arg(msg)) => msg,
        Err(other) => panic!("{args:?}: not an argument error: {other}"),
        Ok(_) => panic!("{args:?}: accepted"),
    }
}

const REQUIRED: [&str; 4] = [
    "--pretrained_model_name_or_path",
    "teacher",
    "--latents",
    "store",
];

#[test]
fn every_refused_reference_flag_says_what_to_do_instead() {
    for &(name, takes_value, instead) in REFUSED {
        let flag = format!("--{name}");
        let mut args: Vec<&str> = REQUIRED.to_vec();
        args.push(&flag);
        if takes_value {
            args.push("x");
        }
        let msg = refusal(&args);
        assert_eq!(msg, format!("--{name}: {instead}"));
        // "what to do instead": every line names a flag, a command or says to remove it
        assert!(
            instead.contains("--") || instead.contains('`') || instead.contains("remove"),
            "{name}: {instead}"
        );
    }
    let wandb = refusal(&[&REQUIRED[..], &["--report_to", "wandb"]].concat());
    assert!(wandb.contains("--sync-tensorboard"), "{wandb}");
    let prodigy = refusal(&[&REQUIRED[..], &["--optimizer", "prodigy"]].concat());
    assert!(prodigy.contains("AdamW"), "{prodigy}");
    // encoding flags without a store point at sprint-prep
    let msg = refusal(&[
        "--pretrained_model_name_or_path",
        "teacher",
        "--dataset_name",
        "brivangl/midjourney-v6-llava",
        "--file_path",
        "data/train_000.parquet",
    ]);
    assert!(
        msg.contains("sprint-prep") && msg.contains("--latents STORE"),
        "{msg}"
    );
    // accepted spellings of what the reference takes
    let argv = [&["sprint-train", "--device", "cpu"][..], &REQUIRED[..]].concat();
    let ok = [&argv[..], &["--optimizer", "AdamW", "--report_to", "none"]].concat();
    let o = TrainArgs::try_parse_args(ok).unwrap().resolve().unwrap();
    assert_eq!(o.report_to, sana_sprint::train::options::ReportTo::None);
}

/// The README lists every refused flag with the same line `--help` gives.
#[test]
fn readme_lists_the_refused_reference_flags() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("#### Reference flags sprint-train refuses")
        .expect("README section");
    let section = &readme[start..];
    for (name, _, _) in REFUSED {
        assert!(
            section.contains(&format!("`--{name}`")),
            "README does not list --{name}"
        );
    }
}

/// The seed README's command (diffusers' train_sana_sprint_diffusers.sh) with `--latents` added runs as is:
/// `--dataset_name`, `--file_path`, `--resolution` are checked against the store, the rest are the reference's
/// own flags. A `--resolution` or a `--file_path` the store does not match is refused before any work.
#[test]
fn the_reference_command_with_latents_added_runs() {
    let store = demo_store();
    let resolution = sana_sprint::store::LatentStore::open(store)
        .unwrap()
        .config()
        .resolution
        .to_string();
    let out = tempfile::tempdir().unwrap();
    let demo = root().join("datasets/demo");
    let shards: Vec<String> = [
        "train_000.parquet",
        "train_001.parquet",
        "train_002.parquet",
    ]
    .iter()
    .map(|s| demo.join(s).display().to_string())
    .collect();
    let run = |extra: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_sprint-train"))
            .arg(format!(
                "--pretrained_model_name_or_path={}",
                tiny_model().display()
            ))
            .arg(format!("--output_dir={}", out.path().display()))
            .args([
                "--mixed_precision=bf16",
                "--learning_rate=1e-6",
                "--max_train_steps=2",
                "--dataloader_num_workers=8",
                "--dataset_name=brivangl/midjourney-v6-llava",
            ])
            .arg("--file_path")
            .args(&shards)
            .args([
                "--checkpointing_steps=500",
                "--checkpoints_total_limit=10",
                "--train_batch_size=1",
                "--gradient_accumulation_steps=1",
                "--seed=453645634",
                "--train_largest_timestep",
                "--misaligned_pairs_D",
                "--gradient_checkpointing",
                "--resume_from_checkpoint=latest",
                "--no_progress",
                "--device=cpu",
            ])
            .arg(format!("--latents={}", store.display()))
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let ok = run(&[format!("--resolution={resolution}")]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr),
    );
    assert!(ok.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("trained 2 global steps"), "{stdout}");
    assert!(out
        .path()
        .join("transformer/diffusion_pytorch_model.safetensors")
        .is_file());

    // a store of another resolution, or without rows of a named shard: refused before any work
    for (extra, want) in [
        (
            vec!["--resolution=1024".to_string()],
            "--resolution 1024, but the store was encoded at",
        ),
        (
            vec![
                format!("--resolution={resolution}"),
                "--file_path".into(),
                "data/train_007.parquet".into(),
            ],
            "train_007.parquet",
        ),
    ] {
        let bad = run(&extra);
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success(), "{extra:?} accepted");
        assert!(err.contains(want) && err.contains("sprint-prep"), "{err}");
    }
}

/// `--report_to tensorboard` (the default): every scalar of `metrics.jsonl` and the validation grids go to
/// TensorBoard event files under `output_dir/logs`, read back with the tensorboard package. A run killed after
/// step 3 and resumed from checkpoint-2 logs steps 3 and 4 again: TensorBoard shows each step once, with the
/// resumed run's values, exactly those of `metrics.jsonl`.
#[test]
fn training_reports_to_tensorboard_and_a_resume_logs_each_step_once() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.validation_prompts = vec!["a red cube".into()];
    o.num_validation_images = 1;
    o.validation_steps = Some(2);
    o.kill_after_step = Some(3);
    trainer::run(&o).unwrap();
    o.kill_after_step = None;
    o.resume_from_checkpoint = Some("latest".into());
    trainer::run(&o).unwrap();

    let got = read_back(&py, &dir.path().join("logs"));
    let lines = metrics(dir.path());
    assert_eq!(lines.len(), 4);
    for tag in [
        "scm_loss",
        "adv_loss",
        "d_loss",
        "grad_norm",
        "lr",
        "samples_per_s",
    ] {
        // (step, f32 bits): TensorBoard scalars are f32; metrics.jsonl holds the f64 they were made from
        let want: Vec<(i64, u32)> = lines
            .iter()
            .filter_map(|l| {
                let v = l[tag].as_f64()?;
                Some((l["step"].as_i64().unwrap(), (v as f32).to_bits()))
            })
            .collect();
        assert!(!want.is_empty(), "{tag}");
        let read: Vec<(i64, u32)> = got["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no scalar tag {tag}"))
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[2].as_u64().unwrap() as u32))
            .collect();
        assert_eq!(read, want, "{tag}");
        assert_eq!(values(&got, tag).len(), want.len());
    }
    let images = |tag: &str| -> Vec<i64> {
        got["images"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no image tag {tag}: {got}"))
            .iter()
            .map(|i| i[0].as_i64().unwrap())
            .collect()
    };
    assert_eq!(images("validation"), [2]);
    assert_eq!(images("test"), [4]);

    // --report_to none: no event files
    let quiet = tempfile::tempdir().unwrap();
    let mut o = options(quiet.path());
    o.max_train_steps = Some(2);
    o.report_to = sana_sprint::train::options::ReportTo::None;
    trainer::run(&o).unwrap();
    assert!(!quiet.path().join("logs").exists());
}
