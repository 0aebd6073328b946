//! Store maintenance (`sana_sprint::store::maintain`): duplicate ids left by racing writers are found and
//! removed keeping the first copy, and compaction merges fragments and drops old versions without changing a
//! row, an id or the row order the trainer's loader addresses by offset.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sana_sprint::store::maintain::{self, CompactReport, DedupeReport};
use sana_sprint::store::{
    FloatEncoding, LatentRow, LatentStore, OpenMode, StoreConfig, StoreWriter,
};
use sana_sprint::train::loader::{LoaderOptions, LoaderPosition, StoreLoader};

const D: usize = 4;
const L: usize = 6;

fn config() -> StoreConfig {
    crate::common::small_store_config(D, L, &[0.0; D])
}

/// Row `i`; `copy` > 0 marks a later copy of the same id with different content (a re-encoded duplicate).
fn row(i: usize, copy: usize) -> LatentRow {
    let len = 1 + i % L;
    let base = (i * 100 + copy * 10_000) as f32;
    LatentRow {
        id: format!("s.parquet#{i:03}"),
        caption: format!("caption {i} copy {copy}"),
        latent: (0..8).map(|k| base + k as f32).collect(),
        latent_shape: [2, 2, 2],
        prompt_embeds: (0..len * D).map(|k| base + 0.5 + k as f32).collect(),
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

/// `commits` commits of `per_commit` rows each: one fragment per commit.
fn fragmented_store(dir: &Path, commits: usize, per_commit: usize) -> PathBuf {
    let path = dir.join("frag.lance");
    let mut w = writer(&path);
    for c in 0..commits {
        for k in 0..per_commit {
            w.push(row(c * per_commit + k, 0));
        }
        w.commit().unwrap();
    }
    path
}

/// What racing writers leave: each opened the store before the others committed, so none knew the
/// others' ids (a writer refuses only ids it has seen).
///
/// Row order (fragments), `'` marking later copies:
/// a: [0 1 2 3] [4 5 6 7] [8 9] | b: [3' 5'] [10] | c: [5'' 9' 11] [4'] | e: [12 3''].
/// Duplicates: 3 ×3, 4 ×2, 5 ×3, 9 ×2 (19 rows, 13 ids); [3' 5'] and [4'] hold only later copies.
fn racing_store(dir: &Path) -> PathBuf {
    let path = dir.join("dup.lance");
    writer(&path); // create it, as the first worker does
    let mut a = writer(&path);
    let mut b = writer(&path);
    let mut c = writer(&path);
    let mut e = writer(&path);
    fn write(w: &mut StoreWriter, rows: &[(usize, usize)]) {
        for &(i, copy) in rows {
            assert!(w.push(row(i, copy)));
        }
        w.commit().unwrap();
    }
    write(&mut a, &[(0, 0), (1, 0), (2, 0), (3, 0)]);
    write(&mut a, &[(4, 0), (5, 0), (6, 0), (7, 0)]);
    write(&mut a, &[(8, 0), (9, 0)]);
    write(&mut b, &[(3, 1), (5, 1)]);
    write(&mut b, &[(10, 0)]);
    write(&mut c, &[(5, 2), (9, 1), (11, 0)]);
    write(&mut c, &[(4, 1)]);
    write(&mut e, &[(12, 0), (3, 2)]);
    path
}

fn all_rows(path: &Path) -> Vec<LatentRow> {
    LatentStore::open(path).unwrap().read_all().unwrap()
}

fn ids(rows: &[LatentRow]) -> Vec<String> {
    rows.iter().map(|r| r.id.clone()).collect()
}

/// Lance manifests on disk: one per version kept.
fn store_versions(path: &Path) -> usize {
    std::fs::read_dir(path.join("_versions"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".manifest")
        })
        .count()
}

fn data_files(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(path.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The ids of one shuffled epoch as the trainer's loader yields them for `seed`.
fn epoch_ids(path: &Path, seed: u64) -> Vec<String> {
    let opts = LoaderOptions {
        batch_size: 4,
        seed,
        drop_last: false,
        prefetch: 2,
        sigma_data: 0.5,
        shard: (0, 1),
    };
    let mut l = StoreLoader::start(
        LatentStore::open(path).unwrap(),
        &opts,
        LoaderPosition::default(),
    )
    .unwrap();
    (0..l.batches_per_epoch() as usize)
        .flat_map(|_| l.next_batch().unwrap().ids)
        .collect()
}

#[test]
fn duplicates_are_reported_with_their_counts() {
    let d = tempfile::tempdir().unwrap();
    let path = racing_store(d.path());
    assert_eq!(all_rows(&path).len(), 19);
    let dups = maintain::duplicate_ids(&path).unwrap();
    let want: Vec<(String, usize)> = [(3, 3), (4, 2), (5, 3), (9, 2)]
        .iter()
        .map(|&(i, n)| (format!("s.parquet#{i:03}"), n))
        .collect();
    assert_eq!(dups, want);
    // a store without duplicates reports none
    let clean = fragmented_store(d.path(), 3, 2);
    assert!(maintain::duplicate_ids(&clean).unwrap().is_empty());
}

#[test]
fn dedupe_keeps_the_first_copy_of_each_id_in_one_commit() {
    let d = tempfile::tempdir().unwrap();
    let path = racing_store(d.path());
    let before = all_rows(&path);
    let version_before = LatentStore::open(&path).unwrap().version();
    let report = maintain::dedupe(&path).unwrap();
    assert_eq!(
        report,
        DedupeReport {
            duplicate_ids: 4,
            rows_removed: 6,
            rows_before: 19,
            rows_after: 13,
            version_before,
            version_after: version_before + 1,
        }
    );
    // Exactly the first copy of each id survives, in the original order: the expected rows are `before`
    // with every later copy dropped.
    let mut seen = HashSet::new();
    let want: Vec<LatentRow> = before
        .iter()
        .filter(|r| seen.insert(r.id.clone()))
        .cloned()
        .collect();
    let after = all_rows(&path);
    assert_eq!(after.len(), 13);
    assert_eq!(ids(&after), ids(&want));
    assert_eq!(after, want, "kept rows differ from the first copies");
    for r in &after {
        assert!(r.caption.ends_with("copy 0"), "{} kept a later copy", r.id);
    }
    assert_eq!(after[3], row(3, 0));
    // ... and through the loader's read path (offsets into the deduplicated store)
    let store = LatentStore::open(&path).unwrap();
    assert_eq!(
        store.take(&[12, 3, 0, 10]).unwrap(),
        vec![
            want[12].clone(),
            want[3].clone(),
            want[0].clone(),
            want[10].clone()
        ]
    );
    assert!(maintain::duplicate_ids(&path).unwrap().is_empty());
    // The version before is untouched (a crash before the commit leaves exactly it): Lance time travel reads it.
    let old = store
        .runtime()
        .block_on(store.dataset().checkout_version(version_before))
        .unwrap();
    assert_eq!(store.runtime().block_on(old.count_rows(None)).unwrap(), 19);
    // A second run finds nothing and makes no version.
    let again = maintain::dedupe(&path).unwrap();
    assert_eq!(
        (again.duplicate_ids, again.rows_removed, again.rows_after),
        (0, 0, 13)
    );
    assert_eq!(again.version_before, again.version_after);
    assert_eq!(again.version_after, version_before + 1);
}

#[test]
fn dedupe_leaves_a_store_without_duplicates_untouched() {
    let d = tempfile::tempdir().unwrap();
    let path = fragmented_store(d.path(), 4, 3);
    let (versions, files) = (store_versions(&path), data_files(&path));
    let report = maintain::dedupe(&path).unwrap();
    assert_eq!(report.rows_removed, 0);
    assert_eq!(report.rows_before, 12);
    assert_eq!(report.version_before, report.version_after);
    assert_eq!(store_versions(&path), versions);
    assert_eq!(data_files(&path), files);
    assert!(!path.join("_deletions").exists());
}

#[test]
fn compaction_keeps_rows_ids_and_order_and_drops_old_versions() {
    let d = tempfile::tempdir().unwrap();
    let path = fragmented_store(d.path(), 40, 3);
    let before = all_rows(&path);
    let order_before = epoch_ids(&path, 7);
    let offsets = [0u64, 119, 57, 3, 64];
    let taken_before = LatentStore::open(&path).unwrap().take(&offsets).unwrap();
    assert_eq!(LatentStore::open(&path).unwrap().num_fragments(), 40);
    assert!(maintain::needs_compaction(&path).unwrap());

    let r: CompactReport = maintain::compact(&path).unwrap();
    println!("{r:?}");
    assert_eq!(
        (r.fragments_before, r.fragments_after, r.rows),
        (40, 1, 120)
    );
    // Lance commits a compaction as two versions: fragment ids reserved, then the rewrite.
    assert!(r.version_after > r.version_before, "{r:?}");
    assert_eq!(r.old_versions_removed, r.version_after - 1);
    assert!(r.bytes_after < r.bytes_before, "{r:?}");
    assert_eq!(store_versions(&path), 1, "old versions left");
    assert_eq!(data_files(&path).len(), 1, "old data files left");

    let store = LatentStore::open(&path).unwrap();
    assert_eq!(store.num_fragments(), 1);
    assert_eq!(store.version(), r.version_after);
    let after = store.read_all().unwrap();
    assert_eq!(ids(&after), ids(&before), "row order changed");
    assert_eq!(after, before, "row contents changed");
    assert_eq!(store.take(&offsets).unwrap(), taken_before);
    assert_eq!(
        epoch_ids(&path, 7),
        order_before,
        "same seed, different sample order"
    );
    assert!(!maintain::needs_compaction(&path).unwrap());
    // compacting again: nothing to do, no new version
    let again = maintain::compact(&path).unwrap();
    assert_eq!(again.version_after, again.version_before);
    assert_eq!((again.fragments_after, again.old_versions_removed), (1, 0));
}

#[test]
fn compaction_after_dedupe_drops_the_removed_copies_from_disk() {
    let d = tempfile::tempdir().unwrap();
    let path = racing_store(d.path());
    maintain::dedupe(&path).unwrap();
    let deduped = all_rows(&path);
    // 6 of 19 stored rows are deletion marks: worth compacting
    assert!(maintain::needs_compaction(&path).unwrap());
    let r = maintain::compact(&path).unwrap();
    assert_eq!((r.rows, r.fragments_after), (13, 1));
    let store = LatentStore::open(&path).unwrap();
    let deleted = store
        .runtime()
        .block_on(store.dataset().count_deleted_rows())
        .unwrap();
    assert_eq!(deleted, 0);
    assert_eq!(store.read_all().unwrap(), deduped);
    assert_eq!(store_versions(&path), 1);
    assert!(!maintain::needs_compaction(&path).unwrap());
}

#[test]
fn duplicates_inside_one_fragment_are_removed_and_compacted_away() {
    let d = tempfile::tempdir().unwrap();
    // 40 rows, then id 40 written by three racing writers: 43 rows, 3 copies of id 40
    let path = fragmented_store(d.path(), 2, 20);
    let mut racing: Vec<StoreWriter> = (0..3).map(|_| writer(&path)).collect();
    for (copy, w) in racing.iter_mut().enumerate() {
        assert!(w.push(row(40, copy)));
        w.commit().unwrap();
    }
    let before = all_rows(&path);
    assert_eq!(before.len(), 43);
    // compaction does not deduplicate: one fragment holding all three copies, in order
    let r = maintain::compact(&path).unwrap();
    assert_eq!((r.fragments_after, r.rows), (1, 43));
    assert_eq!(all_rows(&path), before);
    assert_eq!(
        maintain::duplicate_ids(&path).unwrap(),
        vec![("s.parquet#040".to_string(), 3)]
    );
    let report = maintain::dedupe(&path).unwrap();
    assert_eq!((report.rows_removed, report.rows_after), (2, 41));
    let want: Vec<LatentRow> = (0..41).map(|i| row(i, 0)).collect();
    assert_eq!(all_rows(&path), want);
    // 2 deleted rows of 43 (below Lance's default 10% threshold) are still materialised by compact
    let r = maintain::compact(&path).unwrap();
    assert!(r.version_after > r.version_before, "{r:?}");
    let store = LatentStore::open(&path).unwrap();
    let rt = store.runtime();
    assert_eq!(
        rt.block_on(store.dataset().count_deleted_rows()).unwrap(),
        0
    );
    assert_eq!(store.read_all().unwrap(), want);
}

#[test]
fn compaction_leaves_a_single_fragment_store_alone() {
    let d = tempfile::tempdir().unwrap();
    let path = fragmented_store(d.path(), 1, 5);
    let files = data_files(&path);
    let r = maintain::compact(&path).unwrap();
    assert_eq!(r.version_after, r.version_before);
    assert_eq!((r.fragments_before, r.fragments_after, r.rows), (1, 1, 5));
    assert_eq!(data_files(&path), files);
    assert_eq!(
        all_rows(&path),
        (0..5).map(|i| row(i, 0)).collect::<Vec<_>>()
    );
}

#[test]
fn needs_compaction_only_for_many_small_fragments_or_many_deletions() {
    let d = tempfile::tempdir().unwrap();
    // 16 small fragments: not yet "many"
    let a = d.path().join("a");
    std::fs::create_dir(&a).unwrap();
    assert!(!maintain::needs_compaction(&fragmented_store(&a, 16, 2)).unwrap());
    // 17 small ones: compact
    let b = d.path().join("b");
    std::fs::create_dir(&b).unwrap();
    assert!(maintain::needs_compaction(&fragmented_store(&b, 17, 2)).unwrap());
    // 17 fragments of 256 rows (the largest of the "small"): enough rows per fragment, leave it
    let c = d.path().join("c");
    std::fs::create_dir(&c).unwrap();
    assert!(!maintain::needs_compaction(&fragmented_store(&c, 17, 256)).unwrap());
    // the racing store after dedupe has few fragments but a third of its rows deleted (tested above); with
    // one duplicate among many rows the deletions are not worth a rewrite
    let e = d.path().join("e");
    std::fs::create_dir(&e).unwrap();
    let path = fragmented_store(&e, 2, 20);
    let mut w = writer(&path);
    let mut w2 = writer(&path);
    w.push(row(100, 0));
    w.commit().unwrap();
    w2.push(row(100, 1));
    w2.commit().unwrap();
    assert_eq!(maintain::dedupe(&path).unwrap().rows_removed, 1);
    assert!(!maintain::needs_compaction(&path).unwrap());
}

#[test]
fn maintenance_refuses_what_is_not_a_store() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope.lance");
    let err = maintain::compact(&missing).unwrap_err().to_string();
    assert!(
        err.contains("missing latent store") && err.contains("sprint-prep --output"),
        "{err}"
    );
    let err = maintain::dedupe(&missing).unwrap_err().to_string();
    assert!(err.contains("missing latent store"), "{err}");
}
