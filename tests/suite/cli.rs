//! The command lines: every default comes from the library options, `--demo` only fills flags the user did not
//! pass, `train_config.json` records every value in effect, and the README's flag tables match the binaries.

use sana_sprint::cli::CliArgs;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sana_sprint::cli::prep::{self, PrepArgs};
use sana_sprint::cli::train::{self, TrainArgs};
use sana_sprint::prep::PrepOptions;
use sana_sprint::train::optim::LrScheduleKind;
use sana_sprint::train::options::{TrainOptions, DEFAULT_OUTPUT_DIR};

fn train(args: &[&str]) -> TrainOptions {
    let argv = ["sprint-train", "--device", "cpu"].iter().chain(args);
    TrainArgs::try_parse_args(argv)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .resolve()
        .unwrap()
}

fn prep(args: &[&str]) -> PrepOptions {
    let argv = ["sprint-prep"].iter().chain(args);
    PrepArgs::try_parse_args(argv)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .options()
}

const TRAIN_REQUIRED: [&str; 4] = [
    "--pretrained_model_name_or_path",
    "teacher",
    "--latents",
    "store",
];

#[test]
fn train_flags_left_out_take_the_library_defaults() {
    let got = train(&TRAIN_REQUIRED);
    let mut want = TrainOptions::new(
        PathBuf::from("teacher"),
        PathBuf::from("store"),
        PathBuf::from(DEFAULT_OUTPUT_DIR),
    );
    want.progress = true; // --no_progress not given
    want.config_json = got.config_json.clone();
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
}

#[test]
fn train_demo_fills_only_flags_not_passed() {
    let demo = train(&["--demo"]);
    assert_eq!(demo.train_batch_size, 2);
    assert_eq!(demo.learning_rate, 1e-3);
    assert_eq!(demo.checkpointing_steps, 2);
    assert_eq!(demo.num_validation_images, 2);
    assert_eq!(demo.max_train_steps, Some(6));
    assert_eq!(demo.output_dir, Path::new("demo-output/train"));
    assert_eq!(demo.latents, Path::new("demo-output/demo.lance"));
    assert!(demo.step.train_largest_timestep && demo.step.misaligned_pairs_d);

    // Each value equal to the library default: before, --demo could not tell it from "not passed".
    let d = TrainOptions::new(PathBuf::new(), PathBuf::new(), PathBuf::new());
    let explicit = train(&[
        "--demo",
        "--train_batch_size",
        &d.train_batch_size.to_string(),
        "--learning_rate",
        &d.learning_rate.to_string(),
        "--checkpointing_steps",
        &d.checkpointing_steps.to_string(),
        "--num_validation_images",
        &d.num_validation_images.to_string(),
        "--max_train_steps",
        "10",
        "--output_dir",
        DEFAULT_OUTPUT_DIR,
    ]);
    assert_eq!(explicit.train_batch_size, d.train_batch_size);
    assert_eq!(explicit.learning_rate, d.learning_rate);
    assert_eq!(explicit.checkpointing_steps, d.checkpointing_steps);
    assert_eq!(explicit.num_validation_images, d.num_validation_images);
    assert_eq!(explicit.max_train_steps, Some(10));
    assert_eq!(explicit.output_dir, Path::new(DEFAULT_OUTPUT_DIR));
}

#[test]
fn train_config_json_records_every_flag_with_its_value() {
    let o = train(&["--demo", "--lr_scheduler", "cosine_with_restarts"]);
    let json = o.config_json.as_object().expect("an object").clone();
    let keys: BTreeSet<&str> = json.keys().map(String::as_str).collect();
    let ids: BTreeSet<String> = train::command()
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .filter(|id| id != "help" && id != "version")
        // the refused reference flags are never in effect
        .filter(|id| !train::REFUSED.iter().any(|(n, _, _)| n == id))
        .collect();
    assert_eq!(keys, ids.iter().map(String::as_str).collect());
    // only the flags that default to nothing stay null
    let nulls: BTreeSet<&str> = json
        .iter()
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        nulls,
        BTreeSet::from([
            "checkpoints_total_limit",
            "validation_steps",
            // hub and reference-compatibility flags: nothing unless given
            "revision",
            "cache_dir",
            "optimizer",
            "dataset_name",
            "resolution",
            "max_sequence_length",
            "local_rank",
        ])
    );
    let expect = serde_json::json!({
        "train_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "cosine_with_restarts",
        "mixed_precision": "no", "guidance_init": "learnable", "self_attention": "linear",
        "misaligned_pairs_d": true, "head_block_ids": [2, 8, 14, 19], "scm_cfg_scale": [4.0, 4.5, 5.0],
        "device": "cpu", "dataloader_num_workers": 4,
        "output_dir": "demo-output/train", "resume_from_checkpoint": "latest", "demo": true,
        "logit_mean_discriminator": -0.6, "adam_epsilon": 1e-8, "adam_weight_decay": 1e-4,
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&json[k], v, "train_config.json key {k}");
    }
}

#[test]
fn lr_scheduler_takes_the_diffusers_names() {
    for kind in LrScheduleKind::ALL {
        let mut args = TRAIN_REQUIRED.to_vec();
        args.extend(["--lr_scheduler", kind.name()]);
        assert_eq!(train(&args).lr_scheduler, kind);
    }
    let bad = TrainArgs::try_parse_args(
        ["sprint-train", "--lr_scheduler", "cosine-with-restarts"]
            .iter()
            .chain(&TRAIN_REQUIRED),
    );
    assert!(bad.is_err(), "kebab-case is not a diffusers name");
}

#[test]
fn prep_flags_left_out_take_the_library_defaults() {
    let got = prep(&[
        "--pretrained_model_name_or_path",
        "m",
        "--file_path",
        "a.parquet",
        "--output",
        "s.lance",
    ]);
    let want = PrepOptions {
        pretrained_model_name_or_path: "m".into(),
        file_path: vec!["a.parquet".into()],
        output: PathBuf::from("s.lance"),
        ..PrepOptions::default()
    };
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
}

#[test]
fn prep_demo_fills_only_flags_not_passed() {
    let demo = prep(&["--demo"]);
    assert_eq!(demo.resolution, 128);
    assert_eq!(demo.output, Path::new("demo-output/demo.lance"));
    let default = PrepOptions::default().resolution.to_string();
    assert_eq!(
        prep(&["--demo", "--resolution", &default]).resolution,
        PrepOptions::default().resolution
    );
    assert_eq!(prep(&["--demo", "--resolution", "256"]).resolution, 256);
}

#[test]
fn help_shows_the_library_defaults() {
    for (cmd, defaults) in [
        (train::command(), train::shown_defaults()),
        (prep::command(), prep::shown_defaults()),
    ] {
        for (flag, shown) in defaults {
            if ["off", "required", "–"].contains(&shown.as_str()) {
                continue;
            }
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(flag.as_str()))
                .unwrap();
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                help.ends_with(&format!("[default: {shown}]")),
                "--{flag}: help {help:?} does not show the default {shown}"
            );
        }
    }
}

/// The rows of the first table after `heading` in README.md: (flags, defaults), one entry per flag.
fn readme_table(heading: &str) -> Vec<(String, String)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rows = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2); // header and separator
    let mut out = Vec::new();
    for row in rows {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let flags: Vec<String> = cells[0]
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|code| code.split_whitespace().next().unwrap_or("").to_string())
            .collect();
        assert!(
            !flags.is_empty() && flags.iter().all(|f| f.starts_with("--")),
            "README row {row:?}: the first cell must hold `--flag`s"
        );
        let defaults: Vec<&str> = if flags.len() == 1 {
            vec![cells[1]]
        } else if cells[1].contains(" / ") {
            cells[1].split(" / ").collect()
        } else {
            cells[1].split(", ").collect()
        };
        assert_eq!(
            defaults.len(),
            flags.len(),
            "README row {row:?}: one default per flag"
        );
        for (f, d) in flags.iter().zip(defaults) {
            out.push((f.trim_start_matches("--").to_string(), d.to_string()));
        }
    }
    out
}

/// A default as written in the README or shown by `--help`, for comparison.
fn normalise(s: &str) -> String {
    s.replace('`', "").replace('−', "-").trim().to_string()
}

/// Equal as text, or as lists of numbers (`1e-4` = `0.0001`, `1.0` = `1`).
fn same_default(a: &str, b: &str) -> bool {
    let (a, b) = (normalise(a), normalise(b));
    let numbers =
        |s: &str| -> Option<Vec<f64>> { s.split_whitespace().map(|x| x.parse().ok()).collect() };
    a == b || matches!((numbers(&a), numbers(&b)), (Some(x), Some(y)) if !x.is_empty() && x == y)
}

#[test]
fn readme_flag_tables_match_the_binaries() {
    for (heading, binary) in [
        ("### sprint-prep flags", "sprint-prep"),
        ("### sprint-train flags", "sprint-train"),
    ] {
        let readme = readme_table(heading);
        let code = sana_sprint::cli::shown_defaults(binary).unwrap();
        let readme_flags: BTreeSet<&str> = readme.iter().map(|(f, _)| f.as_str()).collect();
        let code_flags: BTreeSet<&str> = code.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            readme_flags.len(),
            readme.len(),
            "{binary}: a flag is listed twice in the README"
        );
        assert!(
            readme_flags == code_flags,
            "{binary}: flags only in the README {:?}, only in the binary {:?}",
            readme_flags.difference(&code_flags).collect::<Vec<_>>(),
            code_flags.difference(&readme_flags).collect::<Vec<_>>()
        );
        for (flag, shown) in &code {
            let (_, written) = readme.iter().find(|(f, _)| f == flag).unwrap();
            assert!(
                same_default(written, shown),
                "{binary} --{flag}: the README says the default is {written:?}, the library {shown:?}"
            );
        }
    }
}
