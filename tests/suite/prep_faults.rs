//! sprint-prep on bad input: captions that are not UTF-8, empty and huge captions, empty shards, truncated and
//! corrupt shards (footer and data pages), encoders that give NaN/Inf, stores that hold NaN, and a seeded fuzz of
//! the shard reader. Each fault is a clear error naming the file or a counted skip, and nothing already written is
//! lost or stored twice.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::builder::{BinaryDictionaryBuilder, StringDictionaryBuilder};
use arrow_array::types::Int32Type;
use arrow_array::{
    Array, ArrayRef, BinaryArray, BinaryViewArray, BooleanArray, Float64Array, Int32Array,
    LargeBinaryArray, LargeStringArray, ListArray, RecordBatch, StringArray, StringViewArray,
    StructArray,
};
use arrow_schema::{DataType, Field, Fields, Schema};
use candle_core::DType;
use half::f16;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use sana_sprint::prep::report::PrepReport;
use sana_sprint::prep::source::{self, RawRow};
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::store::{
    FloatEncoding, LatentRow, LatentStore, OpenMode, StoreDType, StoreWriter,
};
use sana_sprint::train::loader::{LoaderOptions, LoaderPosition, StoreLoader};

use crate::prep_e2e::{hub, png, root};

const RES: u32 = 64;

fn tiny_model() -> PathBuf {
    root().join("datasets/tiny-sana-sprint")
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

fn write_batch(path: &Path, batch: &RecordBatch, props: Option<WriterProperties>) {
    let f = File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), props).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// A shard of `image` (binary) + `llava` (string) columns.
fn shard(path: &Path, rows: &[(Option<Vec<u8>>, Option<String>)], props: Option<WriterProperties>) {
    let images: ArrayRef = Arc::new(BinaryArray::from_iter(
        rows.iter().map(|(i, _)| i.as_deref()),
    ));
    let caps: ArrayRef = Arc::new(StringArray::from_iter(
        rows.iter().map(|(_, c)| c.as_deref()),
    ));
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Binary, true),
        Field::new("llava", DataType::Utf8, true),
    ]));
    write_batch(
        path,
        &RecordBatch::try_new(schema, vec![images, caps]).unwrap(),
        props,
    );
}

fn good_rows(n: usize, seed: u32) -> Vec<(Option<Vec<u8>>, Option<String>)> {
    (0..n)
        .map(|i| {
            let s = seed + i as u32;
            (
                Some(png(60 + 7 * (i as u32 % 3), 50 + 5 * (i as u32 % 4), s)),
                Some(format!("a photo of object {s} on a table")),
            )
        })
        .collect()
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

fn id_list(name: &str, rows: impl IntoIterator<Item = usize>) -> Vec<String> {
    let mut v: Vec<String> = rows.into_iter().map(|i| format!("{name}#{i}")).collect();
    v.sort();
    v
}

fn reasons(report: &PrepReport) -> Vec<(String, String)> {
    report
        .bad_rows
        .iter()
        .map(|b| (b.id.clone(), b.reason.clone()))
        .collect()
}

/// An image and a caption as raw bytes (`None`: null).
type ForeignRow<'a> = (Option<Vec<u8>>, Option<&'a [u8]>);

/// A shard as a foreign writer (parquet-mr, DuckDB, a C++ tool) makes it: `llava` is a BYTE_ARRAY annotated
/// STRING whose bytes nobody checked. Written with parquet's low-level writer (arrow's refuses invalid UTF-8).
fn foreign_shard(path: &Path, rows: &[ForeignRow]) {
    let schema = Arc::new(
        parse_message_type(
            "message schema { optional binary image; optional binary llava (STRING); }",
        )
        .unwrap(),
    );
    let mut w = SerializedFileWriter::new(
        File::create(path).unwrap(),
        schema,
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut k = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let cells: Vec<Option<&[u8]>> = rows
            .iter()
            .map(|(i, c)| if k == 0 { i.as_deref() } else { *c })
            .collect();
        let values: Vec<ByteArray> = cells
            .iter()
            .flatten()
            .map(|b| ByteArray::from(b.to_vec()))
            .collect();
        let defs: Vec<i16> = cells.iter().map(|c| c.is_some() as i16).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), None)
            .unwrap();
        col.close().unwrap();
        k += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

/// Every batch of a shard through arrow's own reader, as the shard reader read it before.
fn plain_read(path: &Path) -> Result<usize, String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())?;
    let mut n = 0;
    for b in reader {
        n += b.map_err(|e| e.to_string())?.num_rows();
    }
    Ok(n)
}

#[test]
fn caption_not_utf8_is_one_bad_row_and_empty_captions_are_encoded() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_utf8.parquet");
    let img = |s| Some(png(70, 50, s));
    let latin1: &[u8] = b"caf\xe9 au lait, latin-1";
    foreign_shard(
        &a,
        &[
            (img(1), Some(b"a red fox in the snow")),
            (img(2), Some(latin1)),
            (img(3), Some(b"")),
            (img(4), None),
            (img(5), Some("ünïcødé ☕ 日本語の説明".as_bytes())),
            (img(6), Some(b"\xff\xfe")),
        ],
    );
    // the shard really is what used to abort every run: arrow's reader fails the whole file on it
    let plain = plain_read(&a).expect_err("arrow's reader refuses the shard");
    assert!(plain.to_lowercase().contains("utf"), "{plain}");

    let out = d.path().join("s.lance");
    let o = opts(&[&a], &out);
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(
        ids(&out),
        id_list("train_utf8.parquet", [0, 2, 4]),
        "the empty caption is encoded; the others are skipped"
    );
    assert_eq!(
        reasons(&report),
        vec![
            ("train_utf8.parquet#1".into(), "invalid caption".into()),
            ("train_utf8.parquet#3".into(), "null caption".into()),
            ("train_utf8.parquet#5".into(), "invalid caption".into()),
        ]
    );
    let detail = &report.bad_rows[0].detail;
    assert!(
        detail.contains("not UTF-8") && detail.contains("0xe9") && detail.contains("byte 3"),
        "{detail}"
    );
    assert_eq!(report.bad_rows_by_reason["invalid caption"], 2);

    // the empty caption is stored as the reference encodes "" (instruction + nothing)
    let enc = prep::load_encoders(&o, &hub()).unwrap();
    let stored = LatentStore::open(&out).unwrap().read_all().unwrap();
    let row = stored
        .iter()
        .find(|r| r.id == "train_utf8.parquet#2")
        .unwrap();
    assert_eq!(row.caption, "");
    let instr = sana_sprint::text::COMPLEX_HUMAN_INSTRUCTION;
    let (emb, mask) = enc
        .text
        .encode(&[String::new()], Some(&instr[..]), 300)
        .unwrap();
    let len = sana_sprint::text::prompt_lens(&mask).unwrap()[0];
    assert!(len > 1, "the instruction's tokens");
    assert_eq!(row.prompt_len as usize, len);
    let want: Vec<f32> = emb
        .narrow(1, 0, len)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in row.prompt_embeds.iter().zip(&want) {
        let b16 = f16::from_f32(*b).to_f32();
        assert!((a - b16).abs() <= 2e-3 * b.abs().max(1.0), "{a} vs {b}");
    }
    let unicode = stored
        .iter()
        .find(|r| r.id == "train_utf8.parquet#4")
        .unwrap();
    assert_eq!(unicode.caption, "ünïcødé ☕ 日本語の説明");

    // a rerun neither fails nor writes
    let again = prep::run(&o, &hub()).unwrap();
    assert_eq!((again.rows_written, again.rows_already_stored), (0, 3));
}

#[test]
fn empty_shards_are_noted_and_an_input_without_rows_creates_no_store() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("train_empty.parquet");
    let empty2 = d.path().join("train_empty2.parquet");
    shard(&empty, &[], None);
    shard(&empty2, &[], None);
    assert_eq!(plain_read(&empty), Ok(0));
    let good = d.path().join("train_good.parquet");
    shard(&good, &good_rows(2, 1), None);

    let out = d.path().join("s.lance");
    let report = prep::run(&opts(&[&empty, &good], &out), &hub()).unwrap();
    assert_eq!(report.rows_written, 2);
    assert_eq!(report.empty_shards, vec![empty.display().to_string()]);
    assert_eq!(report.files.len(), 2, "the empty file is an input file");
    assert!(report.bad_shards.is_empty());
    let summary = report.summary(Path::new("r.json"));
    assert!(summary.contains("hold no rows") && summary.contains("train_empty.parquet"));
    assert_eq!(ids(&out), id_list("train_good.parquet", 0..2));

    // nothing but empty files: said so, and no store
    let none = d.path().join("none.lance");
    let err = prep::run(&opts(&[&empty, &empty2], &none), &hub())
        .unwrap_err()
        .to_string();
    assert!(err.contains("the 2 input files hold no rows"), "{err}");
    assert!(!none.exists(), "no store may be created");
    let err = prep::run(&opts(&[&empty], &none), &hub())
        .unwrap_err()
        .to_string();
    assert!(err.contains("train_empty.parquet holds no rows"), "{err}");
    assert!(!none.exists());
    // nor is an existing store touched
    let v = LatentStore::open(&out).unwrap().version();
    assert!(prep::run(&opts(&[&empty], &out), &hub()).is_err());
    assert_eq!(LatentStore::open(&out).unwrap().version(), v);
    // the empty file's name stays free: the same name with rows later is taken (no identity was recorded)
    shard(&empty, &good_rows(1, 9), None);
    let r = prep::run(&opts(&[&empty, &good], &out), &hub()).unwrap();
    assert_eq!((r.rows_written, r.rows_already_stored), (1, 2));
}

#[test]
fn unreadable_shards_are_skipped_and_listed_and_the_fixed_shard_is_appended_by_a_rerun() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_a.parquet");
    shard(&a, &good_rows(3, 10), None);
    // the first half of a real shard (an interrupted download) and random bytes named .parquet
    let b = d.path().join("train_b.parquet");
    shard(&b, &good_rows(3, 20), None);
    let whole_b = std::fs::read(&b).unwrap();
    std::fs::write(&b, &whole_b[..whole_b.len() / 2]).unwrap();
    let r = d.path().join("train_random.parquet");
    let mut rng = XorShift::new(7);
    std::fs::write(&r, rng.bytes(3000)).unwrap();

    // --strict: refused up front, naming the files, before anything is written
    let out = d.path().join("s.lance");
    let mut strict = opts(&[&a, &b, &r], &out);
    strict.strict = true;
    let err = prep::run(&strict, &hub()).unwrap_err().to_string();
    assert!(
        err.contains("train_b.parquet")
            && err.contains("train_random.parquet")
            && err.contains("--strict"),
        "{err}"
    );
    assert!(!out.exists(), "--strict must refuse before writing");

    let report_path = d.path().join("report.json");
    let mut o = opts(&[&a, &b, &r], &out);
    o.report = Some(report_path.clone());
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(report.rows_written, 3);
    assert_eq!(ids(&out), id_list("train_a.parquet", 0..3));
    let bad: Vec<&str> = report.bad_shards.iter().map(|b| b.path.as_str()).collect();
    assert_eq!(
        bad,
        vec![b.display().to_string(), r.display().to_string()],
        "{:?}",
        report.bad_shards
    );
    assert!(report
        .bad_shards
        .iter()
        .all(|b| b.error.contains("parquet")));
    assert!(report.bad_rows.is_empty(), "a skipped file has no row ids");
    let on_disk = PrepReport::read(&report_path).unwrap();
    assert_eq!(on_disk.bad_shards, report.bad_shards);
    let summary = report.summary(&report_path);
    assert!(
        summary.contains("2 input file(s) could not be read")
            && summary.contains("train_b.parquet"),
        "{summary}"
    );
    // --strict on the existing store: refused, store unchanged
    let v = LatentStore::open(&out).unwrap().version();
    let mut strict = opts(&[&a, &b], &out);
    strict.strict = true;
    assert!(prep::run(&strict, &hub()).is_err());
    assert_eq!(LatentStore::open(&out).unwrap().version(), v);

    // the file fixed (downloaded again): its rows are appended, the others stay once
    std::fs::write(&b, &whole_b).unwrap();
    let again = prep::run(&opts(&[&a, &b, &r], &out), &hub()).unwrap();
    assert_eq!((again.rows_written, again.rows_already_stored), (3, 3));
    assert_eq!(again.bad_shards.len(), 1);
    let mut want = id_list("train_a.parquet", 0..3);
    want.extend(id_list("train_b.parquet", 0..3));
    assert_eq!(ids(&out), want);
}

/// Overwrites the first page header of row group `rg`'s column `col`: a corrupt data page behind a valid footer.
fn corrupt_column_chunk(path: &Path, rg: usize, col: usize) -> Vec<u8> {
    let whole = std::fs::read(path).unwrap();
    let meta = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .metadata()
        .clone();
    let (start, len) = meta.row_group(rg).column(col).byte_range();
    assert!(len > 16);
    let mut bad = whole.clone();
    for b in &mut bad[start as usize..start as usize + 16] {
        *b = 0xff;
    }
    std::fs::write(path, &bad).unwrap();
    whole
}

#[test]
fn corrupt_page_mid_shard_keeps_the_rows_read_and_the_rerun_adds_the_others_once() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("train_c.parquet");
    // 12 rows in row groups of 4; parts of 6 rows, so the corrupt row group (rows 4-7) straddles two parts
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(4))
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    shard(&c, &good_rows(12, 40), Some(props));
    let whole = corrupt_column_chunk(&c, 1, 0);
    assert!(
        plain_read(&c).is_err(),
        "the page must really be unreadable"
    );

    let out = d.path().join("s.lance");
    let mut o = opts(&[&c], &out);
    o.part_rows = 6;
    o.lease_seconds = 1.0;
    // --strict fails on it, naming the shard (what was encoded before stays committed)
    let strict_out = d.path().join("strict.lance");
    let mut strict = opts(&[&c], &strict_out);
    strict.strict = true;
    let err = prep::run(&strict, &hub()).unwrap_err().to_string();
    assert!(
        err.contains("train_c.parquet") && err.contains("unreadable") && err.contains("--strict"),
        "{err}"
    );

    let report = prep::run(&o, &hub()).unwrap();
    let mut read = id_list("train_c.parquet", (0..4).chain(8..12));
    assert_eq!(
        ids(&out),
        read,
        "the row groups around the corrupt one are encoded"
    );
    assert_eq!(report.rows_written, 8);
    assert_eq!(
        reasons(&report),
        id_list("train_c.parquet", 4..8)
            .into_iter()
            .map(|id| (id, "unreadable shard".to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(report.bad_shards.len(), 1);
    assert_eq!(report.bad_shards[0].path, c.display().to_string());
    assert!(
        report.bad_shards[0].error.contains("row group 1"),
        "{:?}",
        report.bad_shards
    );

    // the shard fixed: the next run takes the unfinished parts over and adds exactly the missing rows
    std::fs::write(&c, &whole).unwrap();
    let again = prep::run(&o, &hub()).unwrap();
    assert_eq!(again.rows_written, 4, "{:?}", again.bad_rows);
    assert!(again.bad_shards.is_empty() && again.bad_rows.is_empty());
    read.extend(id_list("train_c.parquet", 4..8));
    read.sort();
    assert_eq!(ids(&out), read);
    assert_eq!(again.duplicate_ids, 0);
    // and now every part is finished: a third run has nothing to do
    let third = prep::run(&o, &hub()).unwrap();
    assert_eq!((third.rows_written, third.parts_done_by_others), (0, 2));
}

#[test]
fn a_hundred_thousand_character_caption_is_truncated_as_the_reference_does() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_long.parquet");
    let words = [
        "a", "very", "long", "caption", "about", "red", "foxes", "and", "snow",
    ];
    let mut long = String::new();
    let mut k = 0;
    while long.len() < 100_000 {
        long.push_str(words[k % words.len()]);
        long.push(' ');
        k += 1;
    }
    long.truncate(100_000);
    let mut rows = good_rows(2, 70);
    rows[1].1 = Some(long.clone());
    shard(&a, &rows, None);
    let out = d.path().join("s.lance");
    let o = opts(&[&a], &out);
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(report.rows_written, 2, "{:?}", report.bad_rows);
    let stored = LatentStore::open(&out).unwrap().read_all().unwrap();
    let row = stored.iter().find(|r| r.id.ends_with("#1")).unwrap();
    assert_eq!(row.caption.len(), 100_000, "the caption is stored whole");
    assert!(row.prompt_len as usize <= o.max_sequence_length);
    // exactly the reference's truncation: the encoder's own length for that caption (all 300 kept)
    let enc = prep::load_encoders(&o, &hub()).unwrap();
    let instr = sana_sprint::text::COMPLEX_HUMAN_INSTRUCTION;
    let (_, mask) = enc
        .text
        .encode(&[long], Some(&instr[..]), o.max_sequence_length)
        .unwrap();
    let len = sana_sprint::text::prompt_lens(&mask).unwrap()[0];
    assert_eq!(len, o.max_sequence_length);
    assert_eq!(row.prompt_len as usize, len);
}

/// A copy of the tiny pipeline with the values of `tensor` in `file` (under the pipeline) replaced by
/// `poison(index, old bytes)`.
fn poisoned_pipeline(
    dir: &Path,
    file: &str,
    tensor: &str,
    poison: &dyn Fn(usize, &mut [u8]),
) -> PathBuf {
    let model = dir.join(format!("model-{}", tensor.replace('.', "_")));
    copy_dir(&tiny_model(), &model);
    let path = model.join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    let (start, len, elem) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(tensor).unwrap();
        let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        (start, view.data().len(), view.dtype().bitsize() / 8)
    };
    for (i, chunk) in bytes[start..start + len].chunks_mut(elem).enumerate() {
        poison(i, chunk);
    }
    std::fs::write(&path, bytes).unwrap();
    model
}

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

#[test]
fn non_finite_latents_are_bad_rows_and_never_stored() {
    let d = tempfile::tempdir().unwrap();
    // one NaN weight in the encoder's first convolution: every latent is NaN
    let model = poisoned_pipeline(
        d.path(),
        "vae/diffusion_pytorch_model.safetensors",
        "encoder.conv_in.weight",
        &|i, v| {
            if i == 0 {
                v.copy_from_slice(&f32::NAN.to_le_bytes())
            }
        },
    );
    let a = d.path().join("train_nan.parquet");
    shard(&a, &good_rows(4, 80), None);
    let out = d.path().join("s.lance");
    let mut o = opts(&[&a], &out);
    o.pretrained_model_name_or_path = model.display().to_string();
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(
        (report.rows_total, report.rows_written, report.rows_encoded),
        (4, 0, 0)
    );
    assert_eq!(report.bad_rows_by_reason["non-finite latent"], 4);
    assert!(
        report.bad_rows[0].detail.contains("NaN"),
        "{:?}",
        report.bad_rows[0]
    );
    assert_eq!(report.status, "finished");
    assert!(ids(&out).is_empty(), "no row with NaN may be stored");
}

#[test]
fn non_finite_prompt_embeddings_are_bad_rows_and_a_nan_negative_prompt_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("train_emb.parquet");
    let mut rows = good_rows(4, 90);
    rows[2].1 = Some("a photo of a qzxjv wkpf".into());
    shard(&a, &rows, None);
    let out = d.path().join("s.lance");
    let o = opts(&[&a], &out);
    // a token that only the third caption holds (not the instruction, not the empty prompt)
    let enc = prep::load_encoders(&o, &hub()).unwrap();
    let instr = sana_sprint::text::COMPLEX_HUMAN_INSTRUCTION;
    let tok = |caps: &[String], with: bool| -> HashSet<u32> {
        enc.text
            .tokenize(caps, with.then_some(&instr[..]), 300)
            .unwrap()
            .input_ids
            .concat()
            .into_iter()
            .collect()
    };
    let others: Vec<String> = [0, 1, 3]
        .iter()
        .map(|&i| rows[i].1.clone().unwrap())
        .collect();
    let mut common = tok(&others, true);
    common.extend(tok(&[String::new()], false));
    let poison_id = *tok(&[rows[2].1.clone().unwrap()], true)
        .difference(&common)
        .next()
        .expect("a token of its own");
    let hidden = enc.text.text_encoder().hidden_size();
    drop(enc);
    let nan_row = |target: usize| {
        move |i: usize, v: &mut [u8]| {
            if i / hidden == target {
                v.copy_from_slice(&0x7fc0u16.to_le_bytes()) // bf16 NaN
            }
        }
    };
    let model = poisoned_pipeline(
        d.path(),
        "text_encoder/model-00001-of-00002.safetensors",
        "embed_tokens.weight",
        &nan_row(poison_id as usize),
    );
    let mut o = opts(&[&a], &out);
    o.pretrained_model_name_or_path = model.display().to_string();
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(
        reasons(&report),
        vec![(
            "train_emb.parquet#2".to_string(),
            "non-finite prompt embedding".to_string()
        )]
    );
    assert_eq!(ids(&out), id_list("train_emb.parquet", [0, 1, 3]));

    // NaN for the BOS token: the negative prompt itself is NaN, refused before the store is made
    std::fs::remove_dir_all(d.path().join("model-embed_tokens_weight")).unwrap();
    let model = poisoned_pipeline(
        d.path(),
        "text_encoder/model-00001-of-00002.safetensors",
        "embed_tokens.weight",
        &nan_row(2),
    );
    let out2 = d.path().join("s2.lance");
    let mut o = opts(&[&a], &out2);
    o.pretrained_model_name_or_path = model.display().to_string();
    let err = prep::run(&o, &hub()).unwrap_err().to_string();
    assert!(err.contains("empty prompt") && err.contains("NaN"), "{err}");
    assert!(!out2.exists());
}

#[test]
fn values_beyond_float16_storage_count_as_non_finite() {
    let mut cfg = crate::common::small_store_config(2, 4, &[0.0, 0.0]);
    let row = |latent: f32, emb: f32| LatentRow {
        id: "s.parquet#0".into(),
        caption: "c".into(),
        latent: vec![0.5, latent, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        latent_shape: [2, 2, 2],
        prompt_embeds: vec![1.0, emb],
        prompt_len: 1,
    };
    assert!(
        prep::non_finite(&row(1.0, 7e4), &cfg).is_none(),
        "f32 store"
    );
    cfg.embed_dtype = StoreDType::Float16;
    let bad = prep::non_finite(&row(1.0, 7e4), &cfg).unwrap();
    assert_eq!(bad.reason, "non-finite prompt embedding");
    assert!(
        bad.detail.contains("float16") && bad.detail.contains("value 1"),
        "{}",
        bad.detail
    );
    assert!(
        prep::non_finite(&row(1.0, 65504.0), &cfg).is_none(),
        "f16's largest value is fine"
    );
    let bad = prep::non_finite(&row(f32::INFINITY, 1.0), &cfg).unwrap();
    assert_eq!(bad.reason, "non-finite latent");
    assert!(bad.detail.contains("1 of 8"), "{}", bad.detail);
    assert!(
        prep::non_finite(&row(f32::NAN, f32::NAN), &cfg)
            .unwrap()
            .reason
            == "non-finite latent"
    );
}

#[test]
fn the_loader_refuses_a_stored_row_with_nan_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("old.lance");
    let cfg = crate::common::small_store_config(2, 4, &[0.0, 0.0]);
    let mut w = StoreWriter::open(
        &path,
        cfg,
        OpenMode::CreateOrAppend,
        FloatEncoding::default(),
    )
    .unwrap();
    for i in 0..4 {
        let mut latent = vec![0.25f32; 8];
        let mut emb = vec![0.5f32; 2];
        if i == 2 {
            latent[5] = f32::NAN; // as an older sprint-prep could have written it
        }
        if i == 3 {
            emb[1] = f32::INFINITY;
        }
        w.push(LatentRow {
            id: format!("old.parquet#{i}"),
            caption: format!("c{i}"),
            latent,
            latent_shape: [2, 2, 2],
            prompt_embeds: emb,
            prompt_len: 1,
        });
    }
    w.commit().unwrap();
    let opts = LoaderOptions {
        batch_size: 1,
        prefetch: 1,
        ..LoaderOptions::default()
    };
    let mut loader = StoreLoader::start(
        LatentStore::open(&path).unwrap(),
        &opts,
        LoaderPosition::default(),
    )
    .unwrap();
    // batches of one: the good rows come, the bad one stops the loader with its id
    let mut seen = Vec::new();
    let mut err = None;
    for _ in 0..40 {
        match loader.next_batch() {
            Ok(b) => seen.push(b.ids[0].clone()),
            Err(e) => {
                err = Some(e.to_string());
                break;
            }
        }
    }
    let err = err.unwrap_or_else(|| panic!("10 epochs without an error: {seen:?}"));
    let named = ["old.parquet#2", "old.parquet#3"]
        .iter()
        .find(|id| err.contains(*id))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        err.contains("non-finite") && err.contains("old.lance"),
        "{err}"
    );
    assert!(!seen.contains(&named.to_string()));
    assert!(
        seen.iter()
            .all(|id| id.ends_with("#0") || id.ends_with("#1")),
        "{seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Fuzz: random tables and random bytes through the shard reader's entry points.

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Up to `max` random bytes.
    fn some_bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }
}

/// What a fuzz table's image and caption cells hold, as the reader must give them back.
type Expected = Vec<(Option<Vec<u8>>, Option<Vec<u8>>)>;

fn random_string(rng: &mut XorShift) -> String {
    match rng.below(6) {
        0 => String::new(),
        1 => "x".repeat(if rng.chance(20) { 100_000 } else { 300 }),
        2 => "ünï ☕ 日本 🦊".repeat(1 + rng.below(4)),
        _ => (0..rng.below(40))
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect(),
    }
}

fn random_binary(rng: &mut XorShift) -> Vec<u8> {
    match rng.below(4) {
        0 => Vec::new(),
        1 => png(3 + rng.below(5) as u32, 3, rng.below(100) as u32),
        _ => rng.some_bytes(64),
    }
}

/// A random column of `n` rows, mostly of one of the `likely` kinds: (its array, the bytes the reader must return
/// for each cell when it is used as the image or the caption column, or `None` for a null cell).
fn random_column(
    rng: &mut XorShift,
    n: usize,
    likely: &[usize],
) -> (ArrayRef, Vec<Option<Vec<u8>>>) {
    let nulls = rng.chance(50);
    let null = |rng: &mut XorShift| nulls && rng.chance(25);
    let strings: Vec<Option<String>> = (0..n)
        .map(|_| (!null(rng)).then(|| random_string(rng)))
        .collect();
    let binaries: Vec<Option<Vec<u8>>> = (0..n)
        .map(|_| (!null(rng)).then(|| random_binary(rng)))
        .collect();
    let as_bytes = |v: &[Option<String>]| -> Vec<Option<Vec<u8>>> {
        v.iter()
            .map(|s| s.as_ref().map(|s| s.as_bytes().to_vec()))
            .collect()
    };
    let none = vec![None; n];
    let kind = if !likely.is_empty() && rng.chance(75) {
        likely[rng.below(likely.len())]
    } else {
        rng.below(14)
    };
    match kind {
        0 => (
            Arc::new(BinaryArray::from_iter(
                binaries.iter().map(|b| b.as_deref()),
            )),
            binaries.clone(),
        ),
        1 => (
            Arc::new(LargeBinaryArray::from_iter(
                binaries.iter().map(|b| b.as_deref()),
            )),
            binaries.clone(),
        ),
        2 => (
            Arc::new(BinaryViewArray::from_iter(
                binaries.iter().map(|b| b.as_deref()),
            )),
            binaries.clone(),
        ),
        3 => (
            Arc::new(StringArray::from_iter(strings.iter().map(|s| s.as_deref()))),
            as_bytes(&strings),
        ),
        4 => (
            Arc::new(LargeStringArray::from_iter(
                strings.iter().map(|s| s.as_deref()),
            )),
            as_bytes(&strings),
        ),
        5 => (
            Arc::new(StringViewArray::from_iter(
                strings.iter().map(|s| s.as_deref()),
            )),
            as_bytes(&strings),
        ),
        6 => {
            let mut b = StringDictionaryBuilder::<Int32Type>::new();
            for s in &strings {
                b.append_option(s.as_deref());
            }
            (Arc::new(b.finish()), as_bytes(&strings))
        }
        13 => {
            let mut b = BinaryDictionaryBuilder::<Int32Type>::new();
            for v in &binaries {
                b.append_option(v.as_deref());
            }
            (Arc::new(b.finish()), binaries.clone())
        }
        7 => (
            Arc::new(Int32Array::from_iter(
                (0..n).map(|i| (!null(rng)).then_some(i as i32)),
            )),
            none,
        ),
        8 => (
            Arc::new(Float64Array::from_iter((0..n).map(|_| Some(0.5)))),
            none,
        ),
        9 => (
            Arc::new(BooleanArray::from_iter((0..n).map(|_| Some(true)))),
            none,
        ),
        10 => {
            // an HF image struct {bytes, path}, itself nullable, or a struct nested in it
            let bytes: ArrayRef = Arc::new(BinaryArray::from_iter(
                binaries.iter().map(|b| b.as_deref()),
            ));
            let paths: ArrayRef =
                Arc::new(StringArray::from_iter(strings.iter().map(|s| s.as_deref())));
            let nested = rng.chance(30);
            let bytes = if nested {
                let inner = StructArray::from(vec![(
                    Arc::new(Field::new("bytes", DataType::Binary, true)),
                    bytes,
                )]);
                Arc::new(inner) as ArrayRef
            } else {
                bytes
            };
            let struct_nulls: Vec<bool> = (0..n).map(|_| !(nulls && rng.chance(20))).collect();
            let fields = Fields::from(vec![
                Field::new("bytes", bytes.data_type().clone(), true),
                Field::new("path", DataType::Utf8, true),
            ]);
            let s = StructArray::new(
                fields,
                vec![bytes, paths],
                Some(struct_nulls.clone().into()),
            );
            let want = binaries
                .iter()
                .zip(&struct_nulls)
                .map(|(b, &valid)| if valid { b.clone() } else { None })
                .collect();
            (Arc::new(s), want)
        }
        11 => {
            // a struct without `bytes`
            let other: ArrayRef = Arc::new(BinaryArray::from_iter(
                binaries.iter().map(|b| b.as_deref()),
            ));
            let s = StructArray::from(vec![(
                Arc::new(Field::new("data", DataType::Binary, true)),
                other,
            )]);
            (Arc::new(s), none)
        }
        _ => {
            // a list of strings
            let values: ArrayRef =
                Arc::new(StringArray::from_iter(strings.iter().map(|s| s.as_deref())));
            let offsets = arrow_buffer::OffsetBuffer::from_lengths((0..n).map(|_| 1));
            let list = ListArray::new(
                Arc::new(Field::new("item", DataType::Utf8, true)),
                offsets,
                values,
                None,
            );
            (Arc::new(list), none)
        }
    }
}

/// A random table written to `path`; returns the expected (image, caption) cells when the `image` and `llava`
/// columns exist (whatever their types).
fn random_shard(rng: &mut XorShift, path: &Path) -> Option<Expected> {
    let n = match rng.below(5) {
        0 => 0,
        1 => 1,
        _ => rng.below(40),
    };
    let mut names: Vec<String> = Vec::new();
    if rng.chance(85) {
        names.push("image".into());
    }
    if rng.chance(85) {
        names.push("llava".into());
    }
    for k in 0..rng.below(3) {
        names.push(format!("extra_{k}"));
    }
    if names.is_empty() {
        names.push("other".into());
    }
    // shuffle
    for i in (1..names.len()).rev() {
        names.swap(i, rng.below(i + 1));
    }
    let mut fields = Vec::new();
    let mut arrays = Vec::new();
    let (mut img, mut cap) = (None, None);
    for name in &names {
        let likely: &[usize] = match name.as_str() {
            "image" => &[0, 1, 2, 10, 13],
            "llava" => &[3, 4, 5, 6],
            _ => &[],
        };
        let (a, want) = random_column(rng, n, likely);
        fields.push(Field::new(name, a.data_type().clone(), true));
        arrays.push(a);
        match name.as_str() {
            "image" => img = Some(want),
            "llava" => cap = Some(want),
            _ => {}
        }
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap();
    let compression = match rng.below(4) {
        0 => Compression::UNCOMPRESSED,
        1 => Compression::SNAPPY,
        2 => Compression::ZSTD(ZstdLevel::default()),
        _ => Compression::LZ4_RAW,
    };
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(1 + rng.below(16)))
        .set_data_page_row_count_limit(1 + rng.below(8))
        .set_write_batch_size(1 + rng.below(8))
        .set_dictionary_enabled(rng.chance(50))
        .set_compression(compression)
        .build();
    let f = File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
    if n > 0 || rng.chance(50) {
        w.write(&batch).unwrap();
    }
    w.close().unwrap();
    Some(img?.into_iter().zip(cap?).collect())
}

/// Garbage named .parquet: random bytes, random bytes behind a plausible footer, or a real shard damaged.
fn damage(rng: &mut XorShift, path: &Path, real: &[u8]) {
    let bytes = match rng.below(6) {
        0 => rng.some_bytes(2000),
        1 => {
            // PAR1 ... <len> PAR1 with a random footer
            let body = rng.some_bytes(400);
            let footer = rng.some_bytes(200);
            let mut v = b"PAR1".to_vec();
            v.extend(&body);
            v.extend(&footer);
            v.extend((footer.len() as u32).to_le_bytes());
            v.extend(b"PAR1");
            v
        }
        2 => real[..rng.below(real.len())].to_vec(),
        3 => {
            // the footer's bytes flipped
            let mut v = real.to_vec();
            let meta_len = u32::from_le_bytes(v[v.len() - 8..v.len() - 4].try_into().unwrap());
            let start = v.len() - 8 - meta_len as usize;
            for _ in 0..1 + rng.below(4) {
                let k = start + rng.below(meta_len as usize);
                v[k] ^= 1 << rng.below(8);
            }
            v
        }
        _ => {
            // data bytes overwritten (pages, page headers)
            let mut v = real.to_vec();
            let end = v.len().saturating_sub(8).max(5);
            for _ in 0..1 + rng.below(6) {
                let k = 4 + rng.below(end - 4);
                v[k] = rng.next() as u8;
            }
            v
        }
    };
    std::fs::write(path, bytes).unwrap();
}

/// The shard reader's entry points on one file: validation, then every row. Panics (fails the test) when the
/// outcome is neither an error naming the file, a listed bad shard, nor every row either read or counted.
fn exercise(path: &Path, expected: Option<&Expected>) {
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let inputs = match source::validate_shards(&[path.to_path_buf()], "image", "llava") {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&name), "the error must name the file: {msg}");
            return;
        }
        Ok(inputs) => inputs,
    };
    if let Some(bad) = inputs.bad.first() {
        assert_eq!(bad.path, path.display().to_string());
        assert!(!bad.error.is_empty());
        assert!(inputs.shards.is_empty());
        return;
    }
    let shard = &inputs.shards[0];
    let mut rows: Vec<RawRow> = Vec::new();
    let outcome = source::read_rows(shard, "image", "llava", &|_| true, &mut |r| {
        rows.push(r);
        true
    });
    let outcome = match outcome {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&name), "the error must name the file: {msg}");
            return;
        }
        Ok(o) => o,
    };
    assert!(!outcome.stopped);
    let lost = outcome.unreadable.as_ref().map_or(0, |u| u.ids.len());
    assert_eq!(
        rows.len() + lost,
        shard.num_rows,
        "every row is read or counted as unreadable"
    );
    let mut all: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    all.extend(
        outcome
            .unreadable
            .iter()
            .flat_map(|u| u.ids.iter().cloned()),
    );
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a row twice");
    if let Some(u) = &outcome.unreadable {
        assert!(!u.error.is_empty());
    }
    if let Some(want) = expected {
        assert!(
            outcome.unreadable.is_none(),
            "an intact file: {:?}",
            outcome.unreadable
        );
        assert_eq!(rows.len(), want.len());
        for (i, (r, (img, cap))) in rows.iter().zip(want).enumerate() {
            assert_eq!(r.id, format!("{name}#{i}"));
            assert_eq!(&r.image, img, "image of row {i}");
            assert_eq!(&r.caption, cap, "caption of row {i}");
        }
    }
}

/// [`exercise`] on its own thread with a deadline: a hang fails the test instead of stalling it.
fn exercise_in_time(path: &Path, expected: Option<Expected>, case: &str) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        exercise(&p, expected.as_ref());
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => {}
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => panic!("{case}: hangs"),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            panic!("{case}: panicked (see above)")
        }
    }
}

#[test]
fn shard_reader_fuzz_never_panics_hangs_or_loses_a_row() {
    let d = tempfile::tempdir().unwrap();
    let cases: u64 = std::env::var("PREP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed0: u64 = std::env::var("PREP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut intact_read = 0;
    for seed in seed0..seed0 + cases {
        let mut rng = XorShift::new(seed);
        let path = d.path().join(format!("fuzz_{seed}.parquet"));
        let expected = random_shard(&mut rng, &path);
        // an intact table with both columns of usable types is read back cell for cell
        let usable = expected.is_some()
            && source::validate_shards(std::slice::from_ref(&path), "image", "llava")
                .is_ok_and(|i| i.bad.is_empty());
        intact_read += usable as usize;
        exercise_in_time(
            &path,
            if usable { expected } else { None },
            &format!("seed {seed} (table)"),
        );
        let real = std::fs::read(&path).unwrap();
        for k in 0..3 {
            let bad = d.path().join(format!("fuzz_{seed}_{k}.parquet"));
            damage(&mut rng, &bad, &real);
            exercise_in_time(&bad, None, &format!("seed {seed} (damaged {k})"));
        }
    }
    assert!(
        intact_read > cases as usize / 10,
        "too few usable tables: {intact_read}"
    );
}

/// Hostile images: large declared sizes in tiny files (8000² PNGs of one colour, ~200 KB each; 192 MB once
/// decoded). With 4 decode threads and no budget they are decoded at once; `--decode_memory_mib 200` holds
/// them to one at a time, so the run's peak resident memory is lower by about the other decodes. Images over
/// `--max_image_pixels` are skipped from their header.
#[test]
fn decode_memory_is_bounded_under_hostile_images() {
    let d = tempfile::tempdir().unwrap();
    let big = {
        let img = image::RgbImage::from_pixel(8000, 8000, image::Rgb([200, 40, 90]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    assert!(big.len() < 2 << 20, "{} bytes", big.len());
    let mut rows: Vec<(Option<Vec<u8>>, Option<String>)> = (0..6)
        .map(|i| (Some(big.clone()), Some(format!("a huge flat image {i}"))))
        .collect();
    rows.extend(good_rows(2, 7));
    let file = d.path().join("hostile.parquet");
    shard(&file, &rows, None);
    let run = |name: &str, extra: &[&str]| -> PrepReport {
        let store = d.path().join(format!("{name}.lance"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sprint-prep"))
            .arg("--pretrained_model_name_or_path")
            .arg(tiny_model())
            .arg("--file_path")
            .arg(&file)
            .arg("--output")
            .arg(&store)
            .args([
                "--resolution",
                "64",
                "--device",
                "cpu",
                "--no_progress",
                "--num_workers",
                "4",
            ])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PrepReport::read(&prep::default_report_path(&store)).unwrap()
    };
    let free = run("unbounded", &["--decode_memory_mib", "100000"]);
    let bounded = run("bounded", &["--decode_memory_mib", "200"]);
    assert_eq!((free.rows_written, bounded.rows_written), (8, 8));
    let (free_mib, bounded_mib) = (free.peak_rss_mib.unwrap(), bounded.peak_rss_mib.unwrap());
    eprintln!("peak RSS: {free_mib} MiB unbounded, {bounded_mib} MiB with --decode_memory_mib 200");
    // one 8000² decode is 183 MiB of RGB: the unbounded run held at least two more at once
    assert!(
        bounded_mib + 300.0 < free_mib,
        "bounded {bounded_mib} MiB vs unbounded {free_mib} MiB"
    );
    // a pixel limit below their size skips them from the header
    let limited = run("limited", &["--max_image_pixels", "1000000"]);
    assert_eq!(limited.rows_written, 2);
    assert_eq!(limited.bad_rows_by_reason.get("image too large"), Some(&6));
}
