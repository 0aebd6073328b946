//! End-to-end tests of sprint-prep on the embedded tiny pipeline: fresh run, rerun, added shard, killed run,
//! bad rows, settings refusals (each compared setting), input errors, and the store read back field by field against STORE.md.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BinaryArray, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Schema};
use candle_core::{DType, Tensor};
use half::f16;
use sana_sprint::device::MixedPrecision;
use sana_sprint::hub::HubConfig;
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::store::{columns, LatentRow, LatentStore, StoreConfig, StoreDType, CONFIG_KEY};

const RES: u32 = 64;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_model() -> PathBuf {
    root().join("datasets/tiny-sana-sprint")
}

pub fn hub() -> HubConfig {
    HubConfig {
        cache_dir: root().join("target/no-hf-cache"),
        offline: true,
        revision: "main".into(),
    }
}

pub fn png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 5 + seed * 17) % 256) as u8,
            (((x + y) * 3 + seed) % 256) as u8,
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Writes a shard with an `image` binary column and a `llava` caption column.
fn write_shard(path: &Path, rows: &[(Option<Vec<u8>>, Option<&str>)]) {
    let images: ArrayRef = Arc::new(BinaryArray::from_iter(
        rows.iter().map(|(i, _)| i.as_deref()),
    ));
    let caps: ArrayRef = Arc::new(StringArray::from_iter(rows.iter().map(|(_, c)| *c)));
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Binary, true),
        Field::new("llava", DataType::Utf8, true),
    ]));
    write_batch(
        path,
        RecordBatch::try_new(schema, vec![images, caps]).unwrap(),
    );
}

fn write_batch(path: &Path, batch: RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn good_rows(n: usize, seed: u32) -> Vec<(Option<Vec<u8>>, Option<String>)> {
    (0..n)
        .map(|i| {
            let s = seed + i as u32;
            (
                Some(png(70 + 9 * (i as u32 % 4), 50 + 13 * (i as u32 % 3), s)),
                Some(format!(
                    "  A Photo of Object {s} on a TABLE, studio light  "
                )),
            )
        })
        .collect()
}

fn shard_from(path: &Path, rows: &[(Option<Vec<u8>>, Option<String>)]) {
    let r: Vec<(Option<Vec<u8>>, Option<&str>)> = rows
        .iter()
        .map(|(i, c)| (i.clone(), c.as_deref()))
        .collect();
    write_shard(path, &r);
}

fn opts(files: &[&Path], output: &Path) -> PrepOptions {
    PrepOptions {
        pretrained_model_name_or_path: tiny_model().display().to_string(),
        file_path: files.iter().map(|p| p.display().to_string()).collect(),
        output: output.to_path_buf(),
        resolution: RES,
        batch_size: 3,
        commit_every: 4,
        num_workers: 2,
        progress: false,
        device: "cpu".into(),
        ..PrepOptions::default()
    }
}

fn ids(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = LatentStore::open(store)
        .unwrap()
        .read_all()
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    v.sort();
    v
}

fn expected_ids(name: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{name}#{i}")).collect()
}

#[test]
fn fresh_run_matches_the_store_contract_field_by_field() {
    let d = tempfile::tempdir().unwrap();
    let shard = d.path().join("train_000.parquet");
    let rows = good_rows(5, 1);
    shard_from(&shard, &rows);
    let out = d.path().join("s.lance");
    let o = opts(&[&shard], &out);
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(report.rows_written, 5);
    assert!(report.bad_rows.is_empty());

    let store = LatentStore::open(&out).unwrap();
    // Schema exactly as STORE.md.
    let schema = store.dataset().schema();
    let arrow: arrow_schema::Schema = schema.into();
    let ty = |n: &str| arrow.field_with_name(n).unwrap().data_type().clone();
    assert_eq!(ty(columns::ID), DataType::Utf8);
    assert_eq!(ty(columns::CAPTION), DataType::Utf8);
    assert!(
        matches!(ty(columns::LATENT), DataType::List(f) if f.data_type() == &DataType::Float32)
    );
    assert!(
        matches!(ty(columns::LATENT_SHAPE), DataType::FixedSizeList(f, 3) if f.data_type() == &DataType::Int32)
    );
    assert!(
        matches!(ty(columns::PROMPT_EMBEDS), DataType::List(f) if f.data_type() == &DataType::Float16)
    );
    assert_eq!(ty(columns::PROMPT_LEN), DataType::Int32);
    // Metadata: every field STORE.md lists.
    let meta: serde_json::Value = serde_json::from_str(&arrow.metadata[CONFIG_KEY]).unwrap();
    for key in [
        "format_version",
        "resolution",
        "max_sequence_length",
        "complex_human_instruction",
        "vae_scaling_factor",
        "text_hidden_size",
        "latent_dtype",
        "embed_dtype",
        "negative_prompt_len",
        "negative_prompt_embeds_f32le_b64",
        "models",
        "preprocess",
    ] {
        assert!(meta.get(key).is_some(), "sprint.config lacks {key}");
    }
    assert_eq!(meta["format_version"], 1);
    assert_eq!(meta["resolution"], RES);
    assert_eq!(meta["max_sequence_length"], 300);
    assert_eq!(meta["latent_dtype"], "float32");
    assert_eq!(meta["embed_dtype"], "float16");
    assert_eq!(
        meta["complex_human_instruction"].as_array().unwrap().len(),
        8
    );
    for m in ["vae", "text_encoder", "tokenizer"] {
        assert!(meta["models"][m]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"));
        assert!(!meta["models"][m]["origin"].as_str().unwrap().is_empty());
    }
    let cfg = store.config();
    assert_eq!(
        cfg.negative_prompt_len, 1,
        "empty prompt without instruction = [BOS]"
    );
    let neg = cfg.negative_prompt_embeds().unwrap();
    assert_eq!(neg.len(), cfg.text_hidden_size);

    // Rows: recompute every field independently from the library pieces and compare.
    let enc = prep::load_encoders(&o, &hub()).unwrap();
    let stored: HashMap<String, _> = store
        .read_all()
        .unwrap()
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    assert_eq!(stored.len(), 5);
    let f = 32usize;
    for (i, (img, cap)) in rows.iter().enumerate() {
        let r = &stored[&format!("train_000.parquet#{i}")];
        assert_eq!(
            &r.caption,
            cap.as_ref().unwrap(),
            "caption stored as read (no lower/strip)"
        );
        assert_eq!(
            r.latent_shape,
            [32, (RES as usize / f) as i32, (RES as usize / f) as i32]
        );
        let pix = sana_sprint::image::preprocess(
            &sana_sprint::image::decode_rgb(img.as_ref().unwrap()).unwrap(),
            RES,
        );
        let x = Tensor::from_vec(pix, (1, 3, RES as usize, RES as usize), &enc.device).unwrap();
        let lat: Vec<f32> = enc
            .vae
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r.latent.len(), lat.len());
        let max = r
            .latent
            .iter()
            .zip(&lat)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max < 1e-4,
            "latent of row {i} differs by {max} (batching must not change results)"
        );
        let instr = sana_sprint::text::COMPLEX_HUMAN_INSTRUCTION;
        let (emb, mask) = enc
            .text
            .encode(&[cap.clone().unwrap()], Some(&instr[..]), 300)
            .unwrap();
        let len = mask
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as usize;
        assert_eq!(r.prompt_len as usize, len);
        let d = cfg.text_hidden_size;
        let want: Vec<f32> = emb
            .narrow(1, 0, len)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r.prompt_embeds.len(), len * d);
        for (a, b) in r.prompt_embeds.iter().zip(&want) {
            let b16 = f16::from_f32(*b).to_f32();
            assert!(
                (a - b16).abs() <= 2e-3 * b.abs().max(1.0),
                "prompt embeds differ: {a} vs {b}"
            );
        }
    }
}

#[test]
fn rerun_is_idempotent_and_new_shards_append_only_new_ids() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_000.parquet");
    let b = d.path().join("train_001.parquet");
    shard_from(&a, &good_rows(4, 10));
    shard_from(&b, &good_rows(3, 20));
    let out = d.path().join("s.lance");
    prep::run(&opts(&[&a], &out), &hub()).unwrap();
    let v1 = LatentStore::open(&out).unwrap().version();
    let again = prep::run(&opts(&[&a], &out), &hub()).unwrap();
    assert_eq!((again.rows_written, again.rows_already_stored), (0, 4));
    assert_eq!(
        LatentStore::open(&out).unwrap().version(),
        v1,
        "a rerun must not commit"
    );
    let glob = d.path().join("train_00*.parquet");
    let mut o = opts(&[], &out);
    o.file_path = vec![glob.display().to_string()];
    let more = prep::run(&o, &hub()).unwrap();
    assert_eq!((more.rows_written, more.rows_already_stored), (3, 4));
    let mut want = expected_ids("train_000.parquet", 4);
    want.extend(expected_ids("train_001.parquet", 3));
    assert_eq!(ids(&out), want);
}

#[test]
fn killed_run_then_rerun_has_every_row_exactly_once() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_000.parquet");
    shard_from(&a, &good_rows(9, 30));
    let out = d.path().join("s.lance");
    let bin = env!("CARGO_BIN_EXE_sprint-prep");
    let model = tiny_model();
    let args = [
        "--pretrained_model_name_or_path",
        model.to_str().unwrap(),
        "--file_path",
        a.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--resolution",
        "64",
        "--batch_size",
        "2",
        "--commit_every",
        "2",
        "--device",
        "cpu",
        "--no_progress",
    ];
    let status = Command::new(bin)
        .args(args)
        .env("SPRINT_PREP_KILL_AFTER_COMMITS", "2")
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap();
    assert!(!status.success(), "the run must have been killed");
    let partial = ids(&out);
    assert!(
        !partial.is_empty() && partial.len() < 9,
        "killed mid-way: {} rows",
        partial.len()
    );
    let status = Command::new(bin)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap();
    assert!(status.success());
    let all = ids(&out);
    assert_eq!(
        all.len(),
        all.iter().collect::<HashSet<_>>().len(),
        "duplicates"
    );
    let mut want = expected_ids("train_000.parquet", 9);
    want.sort();
    assert_eq!(all, want);
}

#[test]
fn bad_rows_are_skipped_counted_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_bad.parquet");
    let good = png(80, 60, 3);
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    write_shard(
        &a,
        &[
            (Some(good.clone()), Some("fine")),
            (Some(b"definitely not an image".to_vec()), Some("corrupt")),
            (Some(Vec::new()), Some("empty")),
            (None, Some("null image")),
            (Some(good.clone()), None),
            (Some(truncated), Some("truncated")),
            (Some(good), Some("fine too")),
        ],
    );
    let out = d.path().join("s.lance");
    let report_path = d.path().join("bad.json");
    let mut o = opts(&[&a], &out);
    o.report = Some(report_path.clone());
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(report.rows_written, 2);
    assert_eq!(
        ids(&out),
        vec![
            "train_bad.parquet#0".to_string(),
            "train_bad.parquet#6".to_string()
        ]
    );
    let by: Vec<(String, String)> = report
        .bad_rows
        .iter()
        .map(|b| (b.id.clone(), b.reason.clone()))
        .collect();
    assert_eq!(
        by,
        vec![
            (
                "train_bad.parquet#1".into(),
                "unsupported image format".into()
            ),
            ("train_bad.parquet#2".into(), "empty image bytes".into()),
            ("train_bad.parquet#3".into(), "null image".into()),
            ("train_bad.parquet#4".into(), "null caption".into()),
            ("train_bad.parquet#5".into(), "corrupt image".into()),
        ]
    );
    let on_disk = prep::report::PrepReport::read(&report_path).unwrap();
    assert_eq!(on_disk.bad_rows_by_reason["corrupt image"], 1);
    assert_eq!(on_disk.bad_rows_by_reason["unsupported image format"], 1);
    assert_eq!(on_disk.bad_rows.len(), 5);
}

#[test]
fn image_struct_column_and_other_column_names_work() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_struct.parquet");
    let bytes: ArrayRef = Arc::new(BinaryArray::from_iter(vec![
        Some(png(64, 64, 1)),
        Some(png(90, 64, 2)),
    ]));
    let paths: ArrayRef = Arc::new(StringArray::from(vec![Some("a.png"), None]));
    let img = StructArray::from(vec![
        (Arc::new(Field::new("bytes", DataType::Binary, true)), bytes),
        (Arc::new(Field::new("path", DataType::Utf8, true)), paths),
    ]);
    let caps: ArrayRef = Arc::new(StringArray::from(vec!["one", "two"]));
    let schema = Arc::new(Schema::new(vec![
        Field::new("picture", img.data_type().clone(), true),
        Field::new("text", DataType::Utf8, true),
    ]));
    write_batch(
        &a,
        RecordBatch::try_new(schema, vec![Arc::new(img), caps]).unwrap(),
    );
    let out = d.path().join("s.lance");
    let mut o = opts(&[&a], &out);
    o.image_column = "picture".into();
    o.caption_column = "text".into();
    o.embed_dtype = StoreDType::Float32;
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(report.rows_written, 2);
}

#[test]
fn mixing_settings_is_refused_unless_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_000.parquet");
    shard_from(&a, &good_rows(2, 40));
    let out = d.path().join("s.lance");
    prep::run(&opts(&[&a], &out), &hub()).unwrap();
    let mut o = opts(&[&a], &out);
    o.resolution = 96;
    let err = prep::run(&o, &hub()).unwrap_err().to_string();
    assert!(
        err.contains("resolution differs") && err.contains("--overwrite"),
        "{err}"
    );
    o.overwrite = true;
    let r = prep::run(&o, &hub()).unwrap();
    assert_eq!(r.rows_written, 2);
    assert_eq!(LatentStore::open(&out).unwrap().config().resolution, 96);
}

/// Copies a directory tree (a Lance store or a model folder).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// What a refusal must leave untouched: the Lance version, the settings and every row.
fn snapshot(store: &Path) -> (u64, StoreConfig, Vec<LatentRow>) {
    let s = LatentStore::open(store).unwrap();
    let mut rows = s.read_all().unwrap();
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    (s.version(), s.config().clone(), rows)
}

/// A copy of the tiny pipeline whose `<part>/config.json` has the same meaning but other bytes (so another
/// fingerprint): the kind of change a re-downloaded or edited model folder makes.
fn pipeline_with_touched_config(dir: &Path, part: &str) -> PathBuf {
    let model = dir.join(format!("model-{part}"));
    copy_dir(&tiny_model(), &model);
    let cfg = model.join(part).join("config.json");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n\n");
    std::fs::write(&cfg, text).unwrap();
    model
}

#[test]
fn each_compared_setting_is_refused_leaving_the_store_unchanged_and_overwrite_replaces_it() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_000.parquet");
    shard_from(&a, &good_rows(2, 60));
    let base = d.path().join("base.lance");
    prep::run(&opts(&[&a], &base), &hub()).unwrap();
    let base_cfg = LatentStore::open(&base).unwrap().config().clone();
    assert_eq!(base_cfg.preprocess.mixed_precision, "bf16");
    assert_eq!(base_cfg.latent_dtype, StoreDType::Float32);
    assert_eq!(base_cfg.embed_dtype, StoreDType::Float16);
    assert!(base_cfg.complex_human_instruction.is_some());

    let vae_model = pipeline_with_touched_config(d.path(), "vae");
    let te_model = pipeline_with_touched_config(d.path(), "text_encoder");
    type Change = Box<dyn Fn(&mut PrepOptions)>;
    type Applied = fn(&StoreConfig, &StoreConfig) -> bool;
    let cases: Vec<(&str, Change, &str, Applied)> = vec![
        (
            "instruction",
            Box::new(|o| o.complex_human_instruction = false),
            "complex_human_instruction differs",
            |old, new| {
                old.complex_human_instruction.is_some() && new.complex_human_instruction.is_none()
            },
        ),
        (
            "latent dtype",
            Box::new(|o| o.latent_dtype = StoreDType::Float16),
            "latent_dtype differs",
            |_, new| new.latent_dtype == StoreDType::Float16,
        ),
        (
            "embed dtype",
            Box::new(|o| o.embed_dtype = StoreDType::Float32),
            "embed_dtype differs",
            |_, new| new.embed_dtype == StoreDType::Float32,
        ),
        (
            "mixed precision",
            Box::new(|o| o.mixed_precision = MixedPrecision::No),
            "preprocess.mixed_precision differs: store has bf16, this run has no",
            |_, new| new.preprocess.mixed_precision == "no",
        ),
        (
            "vae fingerprint",
            Box::new(move |o| o.pretrained_model_name_or_path = vae_model.display().to_string()),
            "vae fingerprint differs",
            |old, new| {
                old.models.vae.fingerprint != new.models.vae.fingerprint
                    && old.models.text_encoder.fingerprint == new.models.text_encoder.fingerprint
            },
        ),
        (
            "text encoder fingerprint",
            Box::new(move |o| o.pretrained_model_name_or_path = te_model.display().to_string()),
            "text_encoder fingerprint differs",
            |old, new| {
                old.models.text_encoder.fingerprint != new.models.text_encoder.fingerprint
                    && old.models.vae.fingerprint == new.models.vae.fingerprint
            },
        ),
    ];
    for (name, change, says, applied) in cases {
        let out = d.path().join(format!("{}.lance", name.replace(' ', "-")));
        copy_dir(&base, &out);
        let before = snapshot(&out);
        let mut o = opts(&[&a], &out);
        change(&mut o);
        let err = prep::run(&o, &hub())
            .expect_err(&format!("{name}: writing into the store must be refused"))
            .to_string();
        assert!(
            err.contains(says) && err.contains("--overwrite"),
            "{name}: the refusal must name the setting and --overwrite: {err}"
        );
        let after = snapshot(&out);
        assert_eq!(after.0, before.0, "{name}: a refused run must not commit");
        assert_eq!(after.1, before.1, "{name}: settings changed");
        assert!(after.2 == before.2, "{name}: rows changed");

        o.overwrite = true;
        let r = prep::run(&o, &hub()).unwrap();
        assert_eq!((r.rows_written, r.rows_already_stored), (2, 0), "{name}");
        let (version, cfg, rows) = snapshot(&out);
        assert!(
            version > before.0,
            "{name}: --overwrite writes a new Lance version"
        );
        assert!(
            applied(&base_cfg, &cfg),
            "{name}: the new settings were not stored"
        );
        assert_eq!(rows.len(), 2, "{name}");
    }
}

#[test]
fn input_errors_say_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("s.lance");
    // Missing caption column: the columns found are listed.
    let a = d.path().join("train_000.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Binary, true),
        Field::new("caption", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(BinaryArray::from_iter(vec![Some(png(8, 8, 0))])),
            Arc::new(StringArray::from(vec!["x"])),
        ],
    )
    .unwrap();
    write_batch(&a, batch);
    let err = prep::run(&opts(&[&a], &out), &hub())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no column \"llava\"") && err.contains("caption (Utf8)"),
        "{err}"
    );
    // A file that is not parquet is named.
    let bogus = d.path().join("bogus.parquet");
    std::fs::write(&bogus, b"hello").unwrap();
    let err = prep::run(&opts(&[&bogus], &out), &hub())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bogus.parquet") && err.contains("parquet"),
        "{err}"
    );
    // A model folder without vae/ says which part is missing.
    let model = d.path().join("model");
    std::fs::create_dir_all(model.join("text_encoder")).unwrap();
    let good = d.path().join("train_001.parquet");
    shard_from(&good, &good_rows(1, 50));
    let mut o = opts(&[&good], &out);
    o.pretrained_model_name_or_path = model.display().to_string();
    let err = prep::run(&o, &hub()).unwrap_err().to_string();
    assert!(err.contains("`vae/` folder"), "{err}");
    // Two inputs with the same file name are refused (ids would collide).
    std::fs::create_dir_all(d.path().join("other")).unwrap();
    let dup = d.path().join("other/train_001.parquet");
    std::fs::copy(&good, &dup).unwrap();
    let err = prep::run(&opts(&[&good, &dup], &out), &hub())
        .unwrap_err()
        .to_string();
    assert!(err.contains("share the name"), "{err}");
    assert!(
        !out.exists(),
        "nothing may be written when inputs are invalid"
    );
}

#[test]
fn inspect_and_demo_cli() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo.lance");
    let bin = env!("CARGO_BIN_EXE_sprint-prep");
    let run = Command::new(bin)
        .args([
            "--demo",
            "--no_progress",
            "--resolution",
            "64",
            "--output",
            out.to_str().unwrap(),
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(text.contains("written"), "{text}");
    let insp = Command::new(bin)
        .args(["--inspect", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        insp.status.success(),
        "{}",
        String::from_utf8_lossy(&insp.stderr)
    );
    let text = String::from_utf8_lossy(&insp.stdout);
    for key in [
        "rows             24",
        "bytes/sample",
        "raw f16",
        "vae              sha256:",
        "instruction: 8 lines",
        "bad rows         0 in the last run",
    ] {
        assert!(text.contains(key), "inspect output lacks {key}: {text}");
    }
}
