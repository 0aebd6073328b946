//! Store maintenance (`sprint-prep --dedupe` / `--compact`): find and remove duplicate ids, merge small
//! fragments and reclaim the disk space of old versions.
//!
//! Every change is made of atomic Lance commits, each of which yields a complete, valid version, so a process
//! killed at any moment leaves either the version before or the version after, never a mix:
//!
//! * [`dedupe`] marks the extra copies of each id as deleted: it writes one deletion file per affected
//!   fragment (new files, nothing existing is modified) and then commits one `Delete` transaction that
//!   points the fragments at them. Rows are addressed by their physical row address as scanned, never by a
//!   predicate on `id`, so exactly the later copies go and the first copy of every id stays. The commit is
//!   based on the version that was scanned: if another process rewrote or deleted rows of the same fragments
//!   in between, Lance refuses the commit (nothing is removed) instead of applying stale addresses.
//! * [`compact`] runs Lance compaction: new data files are written first, then Lance commits a
//!   `ReserveFragments` version (fragment ids only, the rows are unchanged) and a `Rewrite` version that swaps
//!   the new fragments in at the position of the ones they replace, so the row order is kept. It then removes
//!   every version older than the new one. Cleanup only deletes files no kept manifest references, so a crash
//!   during it leaves the latest version whole; the next run finishes the removal.
//!
//! Readers that opened an *older* version while [`compact`] runs (a trainer started before it) lose their
//! files when the old versions are removed: compact when no `sprint-train` is reading the store.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use arrow_array::{Array, StringArray, UInt64Array};
use futures::TryStreamExt;
use lance::dataset::cleanup::CleanupPolicy;
use lance::dataset::optimize::{compact_files, CompactionOptions};
use lance::dataset::transaction::{Operation, Transaction};
use lance::dataset::{CommitBuilder, Dataset};
use serde::Serialize;

use super::config::read_config;
use super::runtime_with;
use super::schema::columns;
use crate::error::{Error, Result};

/// Lance's row-address column (fragment id in the high 32 bits, physical offset in the low 32).
const ROW_ADDR: &str = "_rowaddr";

/// Rows per scan batch while compacting: real rows are ~1.5 MB (1024² latent + prompt), and Lance's default
/// batch of 8192 rows would be ~12 GB.
const COMPACT_BATCH_ROWS: usize = 64;

/// [`needs_compaction`]: more fragments than this, …
pub const MANY_FRAGMENTS: usize = 16;
/// … averaging fewer live rows than this (sprint-prep commits 1024 rows at a time by default) …
pub const SMALL_FRAGMENT_ROWS: usize = 256;
/// … or more than this fraction of the stored rows deleted (by [`dedupe`]) and still on disk.
pub const DELETED_FRACTION: f64 = 0.1;

/// What [`dedupe`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DedupeReport {
    /// Ids that were stored more than once.
    pub duplicate_ids: usize,
    /// Extra copies removed (rows_before − rows_after unless another writer appended meanwhile).
    pub rows_removed: usize,
    pub rows_before: usize,
    pub rows_after: usize,
    /// Lance version read; equal to `version_after` when there was nothing to remove.
    pub version_before: u64,
    pub version_after: u64,
}

/// What [`compact`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    pub fragments_before: usize,
    pub fragments_after: usize,
    /// Live rows (unchanged by compaction).
    pub rows: usize,
    /// Bytes of the store's directory before and after (old versions removed).
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Lance version read; equal to `version_after` when no fragment needed rewriting.
    pub version_before: u64,
    pub version_after: u64,
    /// Old Lance versions whose manifests (and files no kept version uses) were removed.
    pub old_versions_removed: u64,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2),
    )
}

/// Opens the store at `path`, refusing anything that is not a sana-sprint latent store.
fn open(rt: &tokio::runtime::Runtime, path: &Path) -> Result<Dataset> {
    if !super::location::store_exists(path)? {
        return Err(Error::Missing {
            what: "latent store".into(),
            path: path.to_path_buf(),
            hint: "pass the directory sprint-prep --output wrote (it holds _versions/)".into(),
        });
    }
    // a damaged store is refused before dedupe or compact commit on top of it
    let ds = super::verify::open_dataset(rt, path)?;
    rt.block_on(super::verify::check_open(path, &ds))?;
    read_config(path, &ds)?;
    Ok(ds)
}

/// Every stored id with the row addresses of its copies, in scan (= offset) order.
struct IdScan {
    rows: usize,
    /// id → row addresses of all its copies, first copy first.
    copies: HashMap<String, Vec<u64>>,
}

impl IdScan {
    /// Ids with more than one copy, sorted by id.
    fn duplicates(&self) -> BTreeMap<&str, &[u64]> {
        self.copies
            .iter()
            .filter(|(_, a)| a.len() > 1)
            .map(|(id, a)| (id.as_str(), a.as_slice()))
            .collect()
    }
}

/// Reads the `id` column (and, with `addresses`, each row's address) in row order.
async fn scan_ids(path: &Path, ds: &Dataset, addresses: bool) -> Result<IdScan> {
    let mut scan = ds.scan();
    scan.project(&[columns::ID])?;
    scan.scan_in_order(true);
    if addresses {
        scan.with_row_address();
    }
    let mut stream = scan.try_into_stream().await?;
    let mut out = IdScan {
        rows: 0,
        copies: HashMap::new(),
    };
    while let Some(batch) = stream.try_next().await? {
        let ids = batch
            .column_by_name(columns::ID)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| Error::store(path, "column id is missing or not utf8"))?;
        let addrs = if addresses {
            Some(
                batch
                    .column_by_name(ROW_ADDR)
                    .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
                    .ok_or_else(|| {
                        Error::store(path, "Lance returned no row addresses for the id scan")
                    })?,
            )
        } else {
            None
        };
        for i in 0..batch.num_rows() {
            if ids.is_null(i) {
                return Err(Error::store(
                    path,
                    format!(
                        "row {} has a null id (STORE.md: id is never null); the store is damaged",
                        out.rows + i
                    ),
                ));
            }
            let addr = addrs.map_or(0, |a| a.value(i));
            match out.copies.get_mut(ids.value(i)) {
                Some(v) => v.push(addr),
                None => {
                    out.copies.insert(ids.value(i).to_string(), vec![addr]);
                }
            }
        }
        out.rows += batch.num_rows();
    }
    Ok(out)
}

/// Every id stored more than once, with its number of copies, sorted by id. Reads only the `id` column.
pub fn duplicate_ids(path: &Path) -> Result<Vec<(String, usize)>> {
    let rt = runtime()?;
    let ds = open(&rt, path)?;
    let scan = rt.block_on(scan_ids(path, &ds, false))?;
    Ok(scan
        .duplicates()
        .into_iter()
        .map(|(id, a)| (id.to_string(), a.len()))
        .collect())
}

/// Removes the extra copies of every id stored more than once, keeping the first copy in row order (the
/// lowest offset), in one Lance commit. A store without duplicates is left untouched (no new version).
///
/// The removed rows stay on disk as deletion marks until [`compact`] rewrites their fragments.
pub fn dedupe(path: &Path) -> Result<DedupeReport> {
    let rt = runtime()?;
    let ds = open(&rt, path)?;
    let version_before = ds.version().version;
    let scan = rt.block_on(scan_ids(path, &ds, true))?;
    let dups = scan.duplicates();
    let mut report = DedupeReport {
        duplicate_ids: dups.len(),
        rows_removed: 0,
        rows_before: scan.rows,
        rows_after: scan.rows,
        version_before,
        version_after: version_before,
    };
    if dups.is_empty() {
        return Ok(report);
    }
    // fragment id → physical offsets to delete (every copy but the first).
    let mut doomed: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for addrs in dups.values() {
        for &a in &addrs[1..] {
            doomed.entry((a >> 32) as u32).or_default().push(a as u32);
        }
    }
    let removed: usize = doomed.values().map(Vec::len).sum();
    let new_ds = rt
        .block_on(delete_rows(&ds, doomed))
        .map_err(|e| commit_error(path, "deduplicating", e))?;
    let rows_after = rt.block_on(new_ds.count_rows(None))?;
    report.rows_removed = removed;
    report.rows_after = rows_after;
    report.version_after = new_ds.version().version;
    // Another writer may have appended in between (its rows are counted too); fewer rows than expected would
    // mean rows were lost.
    if rows_after < scan.rows - removed {
        return Err(Error::store(
            path,
            format!(
                "after deduplicating (version {}) the store holds {rows_after} rows, expected at least {}; \
                 version {version_before} still holds every row: restore it (Python: \
                 lance.dataset(PATH, version={version_before}).restore())",
                report.version_after,
                scan.rows - removed
            ),
        ));
    }
    Ok(report)
}

/// Marks the given physical rows deleted: one new deletion file per fragment, then one `Delete` commit read
/// at `ds`'s version.
async fn delete_rows(ds: &Dataset, doomed: BTreeMap<u32, Vec<u32>>) -> lance::Result<Dataset> {
    let mut updated_fragments = Vec::new();
    let mut deleted_fragment_ids = Vec::new();
    for (frag_id, offsets) in doomed {
        let fragment = ds.get_fragment(frag_id as usize).ok_or_else(|| {
            lance::Error::internal(format!("fragment {frag_id} vanished during the scan"))
        })?;
        match fragment.extend_deletions(offsets).await? {
            Some(f) => updated_fragments.push(f.metadata().clone()),
            None => deleted_fragment_ids.push(frag_id as u64),
        }
    }
    let operation = Operation::Delete {
        updated_fragments,
        deleted_fragment_ids,
        predicate: "sana-sprint dedupe: every copy of an id but the first".into(),
    };
    let transaction = Transaction::new(ds.version().version, operation, None);
    CommitBuilder::new(Arc::new(ds.clone()))
        .execute(transaction)
        .await
}

/// A commit refused because another process changed the same fragments is safe (nothing was applied) and
/// worth a retry; say so.
fn commit_error(path: &Path, what: &str, e: lance::Error) -> Error {
    match e {
        lance::Error::CommitConflict { .. }
        | lance::Error::RetryableCommitConflict { .. }
        | lance::Error::IncompatibleTransaction { .. }
        | lance::Error::TooMuchWriteContention { .. } => Error::store(
            path,
            format!(
                "another process changed the store while {what}; nothing was changed. Run it again once \
                 other writers (sprint-prep, --dedupe, --compact) are done ({e})"
            ),
        ),
        e => e.into(),
    }
}

fn compaction_options() -> CompactionOptions {
    CompactionOptions {
        target_rows_per_fragment: 1024 * 1024,
        materialize_deletions: true,
        // Any deletion left by dedupe is rewritten away: reclaiming that space is what --compact is for.
        materialize_deletions_threshold: 0.0,
        batch_size: Some(COMPACT_BATCH_ROWS),
        ..Default::default()
    }
}

/// Merges small fragments and drops deleted rows (Lance compaction, row order kept), then removes every
/// older version so the disk space is reclaimed; only the latest version is kept.
///
/// A store with nothing to rewrite (one fragment, or large ones, and no deletions) gets no new version;
/// its old versions, if any, are still removed.
pub fn compact(path: &Path) -> Result<CompactReport> {
    let rt = runtime()?;
    let mut ds = open(&rt, path)?;
    let version_before = ds.version().version;
    let fragments_before = ds.count_fragments();
    let rows = rt.block_on(ds.count_rows(None))?;
    let bytes_before = super::location::store_bytes(path)?;
    rt.block_on(compact_files(&mut ds, compaction_options(), None))
        .map_err(|e| commit_error(path, "compacting", e))?;
    let rows_after = rt.block_on(ds.count_rows(None))?;
    if rows_after < rows {
        return Err(Error::store(
            path,
            format!(
                "compaction left {rows_after} rows of {rows}; old versions were kept: restore version \
                 {version_before} (Python: lance.dataset(PATH, version={version_before}).restore())"
            ),
        ));
    }
    let policy = CleanupPolicy {
        before_version: Some(ds.version().version),
        // A tagged version is kept, not an error: someone pinned it on purpose.
        error_if_tagged_old_versions: false,
        // Files in no manifest may be another writer's commit in progress: left alone (Lance removes them
        // after 7 days).
        delete_unverified: false,
        ..Default::default()
    };
    let removed = rt.block_on(ds.cleanup_with_policy(policy))?;
    Ok(CompactReport {
        fragments_before,
        fragments_after: ds.count_fragments(),
        rows: rows_after,
        bytes_before,
        bytes_after: super::location::store_bytes(path)?,
        version_before,
        version_after: ds.version().version,
        old_versions_removed: removed.old_versions,
    })
}

/// Whether [`compact`] pays: more than [`MANY_FRAGMENTS`] fragments averaging fewer than
/// [`SMALL_FRAGMENT_ROWS`] live rows, or more than [`DELETED_FRACTION`] of the stored rows deleted.
/// Reads only the manifest (and deletion files whose counts it lacks).
pub fn needs_compaction(path: &Path) -> Result<bool> {
    let rt = runtime()?;
    let ds = open(&rt, path)?;
    let fragments = ds.count_fragments();
    let live = rt.block_on(ds.count_rows(None))?;
    let deleted = rt.block_on(ds.count_deleted_rows())?;
    let many_small = fragments > MANY_FRAGMENTS && live < SMALL_FRAGMENT_ROWS * fragments;
    let wasteful = deleted as f64 > DELETED_FRACTION * (live + deleted) as f64;
    Ok(many_small || wasteful)
}
