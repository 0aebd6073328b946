//! Store damage is found when a store is opened, named (the file, the remedy), and never made worse by the
//! check: a deleted, a truncated and a corrupted data file, a deleted latest manifest (found through the
//! commit marker, and through Lance's version hint in a store without one), an older store without `_sprint/`
//! files, rows with wrong shapes / lengths / values / ids (`sprint-prep --verify`), and storage errors met
//! after the store was opened (the loader's path).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sana_sprint::store::verify::{self, reasons, VerifyReport};
use sana_sprint::store::{
    FloatEncoding, LatentRow, LatentStore, OpenMode, StoreConfig, StoreWriter,
};
use sana_sprint::train::loader::{LoaderOptions, LoaderPosition, StoreLoader};

const D: usize = 16;
const L: usize = 8;
const SHAPE: [i32; 3] = [4, 8, 8];
/// Rows per commit (= per fragment and data file) of [`store`].
const PER_FRAGMENT: usize = 10;

fn config() -> StoreConfig {
    let mut c = crate::common::small_store_config(D, L, &[0.0; D]);
    c.latent_shape = SHAPE.map(|v| v as usize);
    c
}

/// Deterministic values that zstd cannot squeeze to nothing (so the data pages fill the files).
fn noise(seed: usize, n: usize) -> Vec<f32> {
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn row(i: usize) -> LatentRow {
    let len = 1 + i % L;
    LatentRow {
        id: format!("s.parquet#{i}"),
        caption: format!("caption {i}"),
        latent: noise(i, SHAPE.iter().product::<i32>() as usize),
        latent_shape: SHAPE,
        prompt_embeds: noise(1000 + i, len * D),
        prompt_len: len as i32,
    }
}

fn writer(path: &Path) -> StoreWriter {
    StoreWriter::open(
        path,
        config(),
        OpenMode::CreateOrAppend,
        FloatEncoding::default(),
    )
    .unwrap()
}

/// 3 commits of [`PER_FRAGMENT`] rows: fragments 0, 1, 2 (one data file each), Lance versions 1 (create) to 4.
fn store(dir: &Path) -> PathBuf {
    let path = dir.join("s.lance");
    let mut w = writer(&path);
    for c in 0..3 {
        for k in 0..PER_FRAGMENT {
            w.push(row(c * PER_FRAGMENT + k));
        }
        w.commit().unwrap();
    }
    path
}

/// The data file of fragment `k`, relative to the store (`data/<name>.lance`).
fn data_file(path: &Path, k: usize) -> String {
    let st = LatentStore::open(path).unwrap();
    let f = &st.dataset().manifest().fragments[k];
    assert_eq!(f.files.len(), 1);
    format!("data/{}", f.files[0].path)
}

/// Every file of the store with its bytes (to show that a check changes nothing).
fn snapshot(path: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(path, path, &mut out);
    out
}

fn sprint_prep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sprint-prep"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn open_error(path: &Path) -> String {
    match LatentStore::open(path) {
        Ok(_) => panic!("{} opened despite the damage", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(what: &str, text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{what}: {p:?} not in:\n{text}");
    }
    assert!(
        !text.contains(".rs:"),
        "{what}: a source location in:\n{text}"
    );
}

/// Opening, `--inspect` and `--verify` (library and binary) all fail naming `parts`; the store is unchanged.
/// Returns `--verify`'s report.
fn all_refuse(path: &Path, parts: &[&str]) -> VerifyReport {
    let before = snapshot(path);
    assert_contains("open", &open_error(path), parts);
    let p = path.to_str().unwrap();
    let inspect = sprint_prep(&["--inspect", p]);
    assert!(!inspect.status.success(), "{}", text(&inspect));
    assert_contains("--inspect", &text(&inspect), parts);
    let verified = sprint_prep(&["--verify", p, "--no_progress"]);
    assert!(!verified.status.success(), "{}", text(&verified));
    assert_contains("--verify", &text(&verified), &[parts[0]]);
    assert!(
        text(&verified).contains("verification failed"),
        "{}",
        text(&verified)
    );
    let report = verify::verify(path, false).unwrap();
    assert!(!report.is_ok(), "{report:#?}");
    assert_eq!(snapshot(path), before, "a check changed the store");
    report
}

fn file_remedy(path: &Path) -> String {
    format!("sprint-prep --verify {}", path.display())
}

#[test]
fn a_deleted_data_file_is_named_at_open_inspect_and_verify() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    let rel = data_file(&path, 1);
    let file = path.join(&rel);
    std::fs::remove_file(&file).unwrap();
    let file_s = file.display().to_string();
    let report = all_refuse(
        &path,
        &[
            &file_s,
            "is missing",
            "fragment 1, rows 10..=19",
            &file_remedy(&path),
            "--overwrite",
        ],
    );
    // the rows of the missing file are the unreadable ones (their ids were in it)
    let unreadable: Vec<String> = (10..20).map(|r| format!("row {r}")).collect();
    assert_eq!(report.bad_rows[reasons::UNREADABLE], unreadable);
    assert_eq!(report.bad_rows.len(), 1, "{:#?}", report.bad_rows);
    assert_eq!((report.rows_checked, report.rows_bad), (30, 10));
    let bad_files: Vec<_> = report.files.iter().filter(|f| f.status != "ok").collect();
    assert_eq!(bad_files.len(), 1);
    assert_eq!(bad_files[0].file, file);
    // the writer refuses to append to it too (prep's append)
    let e = StoreWriter::open(
        &path,
        config(),
        OpenMode::CreateOrAppend,
        FloatEncoding::default(),
    )
    .err()
    .expect("appending to a damaged store");
    assert_contains("append", &e.to_string(), &[&file_s, "is missing"]);
}

#[test]
fn a_truncated_data_file_is_named_at_open_inspect_and_verify() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    let file = path.join(data_file(&path, 2));
    let size = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let file_s = file.display().to_string();
    let report = all_refuse(
        &path,
        &[
            &file_s,
            &format!(
                "has {} bytes, the manifest records {size}: it was truncated",
                size / 2
            ),
            &file_remedy(&path),
        ],
    );
    assert_eq!(report.bad_rows[reasons::UNREADABLE].len(), PER_FRAGMENT);
    assert_eq!(report.rows_bad, PER_FRAGMENT as u64);
}

#[test]
fn a_corrupted_data_file_passes_the_cheap_check_and_is_named_by_verify() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    let file = path.join(data_file(&path, 1));
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xA5;
    }
    std::fs::write(&file, &bytes).unwrap();
    // same size: the open check (metadata only) cannot see it ...
    LatentStore::open(&path).unwrap();
    // ... --verify reads every row and names the file
    let before = snapshot(&path);
    let p = path.to_str().unwrap();
    let verified = sprint_prep(&["--verify", p, "--no_progress"]);
    assert!(!verified.status.success(), "{}", text(&verified));
    let shown = text(&verified);
    println!("{shown}");
    assert_contains("--verify", &shown, &[&file.display().to_string()]);
    let report = verify::verify(&path, false).unwrap();
    assert!(!report.is_ok(), "{report:#?}");
    let bad_files: Vec<_> = report.files.iter().filter(|f| f.status != "ok").collect();
    assert_eq!(bad_files.len(), 1, "{report:#?}");
    assert_eq!(bad_files[0].file, file);
    assert_eq!(bad_files[0].fragment, 1);
    // only rows of fragment 1 are bad
    for ids in report.bad_rows.values() {
        for id in ids {
            let n: usize = id
                .rsplit(['#', ' '])
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap();
            assert!((10..20).contains(&n), "{id} is not in fragment 1");
        }
    }
    assert_eq!(snapshot(&path), before, "--verify changed the store");
}

#[test]
fn a_deleted_latest_manifest_is_refused_instead_of_reading_an_older_version() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    let st = LatentStore::open(&path).unwrap();
    let (version, manifest) = (
        st.version(),
        st.dataset()
            .manifest_location()
            .path
            .filename()
            .unwrap()
            .to_string(),
    );
    drop(st);
    assert_eq!(version, 4);
    assert_eq!(
        verify::read_marker(&path).unwrap(),
        Some(verify::CommitMarker {
            version: 4,
            rows: 30
        })
    );
    let file = path.join("_versions").join(&manifest);
    std::fs::remove_file(&file).unwrap();
    let file_s = file.display().to_string();
    let marker = path.join("_sprint/committed.json").display().to_string();
    let report = all_refuse(
        &path,
        &[
            &file_s,
            "the store's latest version is 4, 30 rows (recorded by sprint-prep",
            "Lance would read version 3, 20 rows instead",
            "Restore the missing manifest",
            &marker,
        ],
    );
    assert_eq!(report.damage.len(), 1, "{report:#?}");
    // the older version's rows themselves are fine
    assert!(report.bad_rows.is_empty(), "{report:#?}");
    assert_eq!(report.rows_checked, 20);
    // the writer refuses too (a rerun of prep would otherwise build on the older version silently)
    assert!(StoreWriter::open(
        &path,
        config(),
        OpenMode::CreateOrAppend,
        FloatEncoding::default()
    )
    .is_err());

    // the documented way to go on with the older version: delete the marker (and Lance's hint)
    std::fs::remove_file(&marker).unwrap();
    let hint = path.join("_versions/latest_version_hint.json");
    if hint.exists() {
        // without the marker, Lance's hint still tells
        assert_contains(
            "open by hint",
            &open_error(&path),
            &[
                &file_s,
                "according to Lance's _versions/latest_version_hint.json",
            ],
        );
        std::fs::remove_file(&hint).unwrap();
    }
    let st = LatentStore::open(&path).unwrap();
    assert_eq!((st.version(), st.len().unwrap()), (3, 20));
}

#[test]
fn an_unreadable_latest_manifest_is_named() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    let manifest = LatentStore::open(&path)
        .unwrap()
        .dataset()
        .manifest_location()
        .path
        .filename()
        .unwrap()
        .to_string();
    let file = path.join("_versions").join(&manifest);
    let size = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(size / 3)
        .unwrap();
    let before = snapshot(&path);
    let parts = [
        file.display().to_string(),
        "cannot be read".to_string(),
        "Restore it from a backup".to_string(),
        path.join("_sprint/committed.json").display().to_string(),
    ];
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    assert_contains("open", &open_error(&path), &parts);
    let p = path.to_str().unwrap();
    for args in [vec!["--inspect", p], vec!["--verify", p, "--no_progress"]] {
        let o = sprint_prep(&args);
        assert!(!o.status.success(), "{}", text(&o));
        // (Lance's own panic message, printed as it unwinds, may name its source: only ours is checked)
        let err = text(&o);
        let ours = err
            .lines()
            .skip_while(|l| !l.starts_with("error: "))
            .collect::<Vec<_>>()
            .join("\n");
        assert_contains(args[0], &ours, &parts);
    }
    assert_eq!(snapshot(&path), before, "a check changed the store");
}

#[test]
fn a_deleted_manifest_of_a_store_without_sprint_files_is_found_by_lances_hint() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    std::fs::remove_dir_all(path.join("_sprint")).unwrap();
    let hint = path.join("_versions/latest_version_hint.json");
    assert!(
        hint.is_file(),
        "Lance writes its version hint on local folders"
    );
    let manifest = LatentStore::open(&path)
        .unwrap()
        .dataset()
        .manifest_location()
        .path
        .filename()
        .unwrap()
        .to_string();
    let file = path.join("_versions").join(&manifest);
    std::fs::remove_file(&file).unwrap();
    all_refuse(
        &path,
        &[
            &file.display().to_string(),
            "the store's latest version is 4 (according to Lance's",
            "Lance would read version 3, 20 rows instead",
        ],
    );
}

#[test]
fn an_older_store_without_sprint_files_opens_inspects_and_verifies() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    std::fs::remove_dir_all(path.join("_sprint")).unwrap();
    let before = snapshot(&path);
    let st = LatentStore::open(&path).unwrap();
    assert_eq!(st.len().unwrap(), 30);
    assert_eq!(st.read_all().unwrap().len(), 30);
    drop(st);
    let p = path.to_str().unwrap();
    let inspect = sprint_prep(&["--inspect", p]);
    assert!(inspect.status.success(), "{}", text(&inspect));
    let verified = sprint_prep(&["--verify", p, "--no_progress"]);
    assert!(verified.status.success(), "{}", text(&verified));
    assert_contains(
        "--verify",
        &text(&verified),
        &[
            "rows checked     30 of 30: 30 good, 0 bad",
            "bad rows         none",
        ],
    );
    assert_eq!(snapshot(&path), before, "a check changed the store");
    // the next commit records the marker again
    let mut w = writer(&path);
    w.push(row(99));
    w.commit().unwrap();
    assert_eq!(
        verify::read_marker(&path).unwrap(),
        Some(verify::CommitMarker {
            version: 5,
            rows: 31
        })
    );
}

#[test]
fn a_reader_opened_before_another_commit_is_not_mistaken_for_a_lost_manifest() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    let st = LatentStore::open(&path).unwrap();
    let mut w = writer(&path);
    w.push(row(99));
    w.commit().unwrap();
    assert_eq!(verify::read_marker(&path).unwrap().unwrap().version, 5);
    // the reader still sees version 4; the marker says 5, whose manifest is there
    assert_eq!(st.version(), 4);
    st.runtime()
        .block_on(verify::check_open(&path, st.dataset()))
        .unwrap();
    // the marker keeps the highest version: an older writer's record does not lower it
    verify::record_commit(&path, 3, 20, false).unwrap();
    assert_eq!(verify::read_marker(&path).unwrap().unwrap().version, 5);
}

#[test]
fn storage_errors_met_after_opening_name_the_store_the_file_and_the_remedy() {
    let d = tempfile::tempdir().unwrap();
    let path = store(d.path());
    let file = path.join(data_file(&path, 1));
    let file_s = file.display().to_string();
    // opened whole, damaged while in use (the trainer's case: the file vanishes mid-run)
    let st = LatentStore::open(&path).unwrap();
    let opts = LoaderOptions {
        batch_size: 30,
        seed: 0,
        drop_last: true,
        prefetch: 1,
        sigma_data: 0.5,
        shard: (0, 1),
    };
    let mut loader = StoreLoader::start(
        LatentStore::open(&path).unwrap(),
        &opts,
        LoaderPosition { epoch: 1, batch: 0 },
    )
    .unwrap();
    std::fs::remove_file(&file).unwrap();
    let store_s = format!("latent store {}", path.display());
    let parts = [
        store_s.as_str(),
        &file_s,
        "the file is missing",
        &file_remedy(&path),
    ];
    let e = st.take(&[15]).unwrap_err().to_string();
    assert_contains("take", &e, &parts);
    let e = st.read_all().unwrap_err().to_string();
    assert_contains("read_all", &e, &parts);
    // the loader's batch (epoch 1: the prefetch of epoch 0's batch may have read the file before it went)
    let e = (0..10)
        .find_map(|_| loader.next_batch().err())
        .expect("the loader read a deleted file")
        .to_string();
    assert_contains("loader", &e, &parts);
}

#[test]
fn verify_lists_bad_rows_by_reason() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("bad.lance");
    writer(&path); // created first, as the first worker does
                   // two racing writers: neither knows the other's ids, so `b` stores a second copy of row 0
    let mut a = writer(&path);
    let mut b = writer(&path);
    let mut rows: Vec<LatentRow> = (0..8).map(row).collect();
    rows[1].latent[5] = f32::NAN;
    rows[2].prompt_embeds[0] = f32::INFINITY;
    rows[3].latent.pop(); // 255 values for a [4, 8, 8] shape
    rows[4].latent_shape = [4, 4, 16]; // right length, not the store's shape
    rows[5].prompt_len = 0;
    rows[5].prompt_embeds.clear();
    rows[6].prompt_len = L as i32 + 1;
    rows[6].prompt_embeds = noise(6, (L + 1) * D);
    rows[7].prompt_embeds.pop();
    for r in rows {
        assert!(a.push(r));
    }
    a.commit().unwrap();
    let mut copy = row(0);
    copy.caption = "second copy".into();
    assert!(b.push(row(8)));
    assert!(b.push(copy));
    b.commit().unwrap();

    let before = snapshot(&path);
    let report = verify::verify(&path, false).unwrap();
    let ids = |i: &[usize]| -> Vec<String> { i.iter().map(|i| format!("s.parquet#{i}")).collect() };
    let want: BTreeMap<String, Vec<String>> = [
        (reasons::LATENT_NONFINITE, ids(&[1])),
        (reasons::EMBEDS_NONFINITE, ids(&[2])),
        (reasons::LATENT_LEN, ids(&[3])),
        (reasons::LATENT_SHAPE, ids(&[4])),
        (reasons::PROMPT_LEN, ids(&[5, 6])),
        (reasons::EMBEDS_LEN, ids(&[7])),
        (reasons::DUPLICATE_ID, ids(&[0])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(report.bad_rows, want);
    assert_eq!((report.rows_checked, report.rows_bad), (10, 8));
    assert!(report.damage.is_empty());
    let p = path.to_str().unwrap();
    let verified = sprint_prep(&["--verify", p, "--no_progress"]);
    assert!(!verified.status.success(), "{}", text(&verified));
    assert_contains(
        "--verify",
        &text(&verified),
        &[
            "rows checked     10 of 10: 2 good, 8 bad",
            "bad rows         non-finite latent value: 1 row(s): s.parquet#1",
            "bad rows         prompt_len outside 1..=max_sequence_length: 2 row(s): s.parquet#5, s.parquet#6",
            "bad rows         duplicate id: 1 row(s): s.parquet#0",
            &format!("sprint-prep --dedupe {p}"),
        ],
    );
    assert_eq!(snapshot(&path), before, "--verify changed the store");
}

#[test]
fn a_clean_demo_store_verifies_and_opening_it_stays_cheap() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("demo.lance");
    let out = crate::prep_parallel::prep(&path, "train_*.parquet", &[])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let p = path.to_str().unwrap();
    let verified = sprint_prep(&["--verify", p, "--no_progress"]);
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(
        text(&verified).contains("bad rows         none"),
        "{}",
        text(&verified)
    );
    // the cost of the open check: LatentStore::open with it, and the check alone
    const N: u32 = 20;
    let t = std::time::Instant::now();
    for _ in 0..N {
        LatentStore::open(&path).unwrap();
    }
    let open = t.elapsed() / N;
    let st = LatentStore::open(&path).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..N {
        st.runtime()
            .block_on(verify::check_open(&path, st.dataset()))
            .unwrap();
    }
    let check = t.elapsed() / N;
    println!(
        "LatentStore::open of the demo store ({} fragments): {open:?} with the check, of which the check {check:?}",
        st.num_fragments()
    );
    assert!(check < std::time::Duration::from_millis(500), "{check:?}");
}

/// boto3 on the test's moto server: `list PREFIX` (keys, sorted), `delete KEY`, `copy FROM TO`.
fn s3_op(moto: &crate::s3::Moto, py: &Path, args: &[&str]) -> String {
    let script = format!(
        "import boto3, os, sys\n\
         s3 = boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])\n\
         b = '{bucket}'\n\
         op, *a = sys.argv[1:]\n\
         if op == 'list':\n\
         \x20   r = s3.list_objects_v2(Bucket=b, Prefix=a[0])\n\
         \x20   print('\\n'.join(sorted(o['Key'] for o in r.get('Contents', []))))\n\
         elif op == 'delete':\n\
         \x20   s3.delete_object(Bucket=b, Key=a[0])\n\
         elif op == 'copy':\n\
         \x20   s3.copy_object(Bucket=b, Key=a[1], CopySource={{'Bucket': b, 'Key': a[0]}})\n",
        bucket = crate::s3::BUCKET
    );
    let o = moto
        .python(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "boto3 {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn damage_of_an_s3_store_is_named_by_its_uri() {
    let Some(py) = crate::s3::python_or_skip() else {
        return;
    };
    let moto = crate::s3::Moto::start(&py);
    let prefix = "damage/s.lance";
    let uri = format!("s3://{}/{prefix}", crate::s3::BUCKET);
    let made = moto.run(crate::prep_parallel::prep(
        Path::new(&uri),
        "train_*.parquet",
        &[],
    ));
    assert!(made.status.success(), "{}", text(&made));
    let verify_cmd = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sprint-prep"));
        c.args(["--verify", &uri, "--no_progress"]);
        moto.run(c)
    };
    let inspect_cmd = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sprint-prep"));
        c.args(["--inspect", &uri]);
        moto.run(c)
    };
    let clean = verify_cmd();
    assert!(clean.status.success(), "{}", text(&clean));
    assert!(
        text(&clean).contains("bad rows         none"),
        "{}",
        text(&clean)
    );
    let listed = s3_op(&moto, &py, &["list", prefix]);
    assert!(
        listed.contains(&format!("{prefix}/_sprint/committed.json")),
        "{listed}"
    );

    // a deleted data object (kept aside to put it back afterwards)
    let data = s3_op(&moto, &py, &["list", &format!("{prefix}/data/")]);
    let key = data.lines().last().unwrap().to_string();
    s3_op(&moto, &py, &["copy", &key, "aside/data.lance"]);
    s3_op(&moto, &py, &["delete", &key]);
    let file = format!("s3://{}/{key}", crate::s3::BUCKET);
    let o = inspect_cmd();
    assert!(!o.status.success(), "{}", text(&o));
    assert_contains(
        "--inspect",
        &text(&o),
        &[&file, "is missing", &format!("sprint-prep --verify {uri}")],
    );
    let o = verify_cmd();
    assert!(!o.status.success(), "{}", text(&o));
    assert_contains(
        "--verify",
        &text(&o),
        &[&file, "is missing", "Restore the damaged file(s) above"],
    );
    s3_op(&moto, &py, &["copy", "aside/data.lance", &key]);
    assert!(inspect_cmd().status.success());

    // a deleted latest manifest (V2 names: the smallest key is the latest version)
    let versions = s3_op(&moto, &py, &["list", &format!("{prefix}/_versions/")]);
    let latest = versions
        .lines()
        .find(|k| k.ends_with(".manifest"))
        .unwrap()
        .to_string();
    s3_op(&moto, &py, &["delete", &latest]);
    let manifest = format!("s3://{}/{latest}", crate::s3::BUCKET);
    for (what, o) in [("--inspect", inspect_cmd()), ("--verify", verify_cmd())] {
        assert!(!o.status.success(), "{what}: {}", text(&o));
        assert_contains(
            what,
            &text(&o),
            &[
                &manifest,
                "recorded by sprint-prep in _sprint/committed.json",
            ],
        );
    }
}
