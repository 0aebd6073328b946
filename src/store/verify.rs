//! Store damage, found early and named: a cheap check when a store is opened ([`check_open`]), a full check
//! of every row (`sprint-prep --verify`, [`verify`]), the commit marker that makes a lost latest manifest
//! visible ([`record_commit`]), and the translation of storage errors met later ([`store_error`]).
//!
//! * [`check_open`] reads metadata only: the manifest Lance already read, one listing of `data/` (and of
//!   `_deletions/` when a fragment has a deletion file), the commit marker and Lance's version hint. Every data
//!   file the current version references must exist with the size its manifest records (Lance records sizes
//!   since its 0.2x writers; a file without a recorded size gets its 4-byte footer magic read instead), every
//!   deletion file must exist, and the version must not be older than the last one sprint-prep committed.
//! * `_sprint/committed.json` (`{version, rows}`): written by [`record_commit`] after every commit of a
//!   [`super::StoreWriter`], keeping the highest version (conditional writes, as the leases). It never runs
//!   ahead of the store: a version is recorded only once committed. A latest version older than the marker's
//!   means a manifest was lost. Lance's own `_versions/latest_version_hint.json` (a best-effort hint Lance
//!   writes on local folders and S3 Express) is consulted the same way when there is no marker.
//! * [`verify`] reads every row, fragment by fragment (a read failure is pinned to its fragment's files and,
//!   by reading the rest of the fragment row by row, to the rows it affects).
//!
//! Lance files carry no checksums: damage that still decodes to finite values of the right shapes (a flipped
//! bit in an uncompressed float) cannot be found by reading; it takes a comparison with a backup.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, Int32Type};
use arrow_array::{Array, ListArray, RecordBatch, StringArray};
use futures::{FutureExt, TryStreamExt};
use lance::dataset::Dataset;
use lance::table::format::Fragment;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::config::{read_config, StoreConfig};
use super::location::Files;
use super::schema::columns;
use super::{runtime_with, uri};
use crate::error::{Error, Result};

/// The commit marker, relative to the store.
pub const COMMIT_MARKER: &str = "_sprint/committed.json";

/// Lance's best-effort hint of the latest version (under `_versions/`).
const VERSION_HINT: &str = "latest_version_hint.json";

/// The footer magic of a Lance file (its last 4 bytes).
const LANCE_MAGIC: &[u8; 4] = b"LANC";

/// Rows per scan batch while verifying: real rows are ~1.5 MB.
const VERIFY_BATCH_ROWS: usize = 32;

/// Most ids listed per reason in [`VerifyReport::summary`].
const SHOWN_IDS: usize = 50;

/// What `_sprint/committed.json` holds: the highest version a sprint-prep writer committed and the rows the
/// store held at that version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitMarker {
    pub version: u64,
    pub rows: u64,
}

/// `<store>/<rel>` as the user knows the store: the folder joined, or the URI extended.
pub fn shown(path: &Path, rel: &str) -> PathBuf {
    if super::location::is_remote(path) {
        PathBuf::from(format!(
            "{}/{rel}",
            path.to_string_lossy().trim_end_matches('/')
        ))
    } else {
        path.join(rel)
    }
}

/// The remedy for a missing or damaged data file.
fn file_remedy(path: &Path) -> String {
    format!(
        "Run `sprint-prep --verify {p}` to see which rows are affected; then restore the file from a backup of \
         the store, or rebuild the store (re-run sprint-prep with --overwrite --output {p})",
        p = path.display()
    )
}

/// The store's commit marker, if any (an unreadable one counts as absent, with a warning).
pub fn read_marker(path: &Path) -> Result<Option<CommitMarker>> {
    let files = Files::of_store(path)?;
    Ok(files
        .get(COMMIT_MARKER)?
        .and_then(|r| match serde_json::from_slice(&r.bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", files.display(COMMIT_MARKER).display());
                None
            }
        }))
}

/// Records that `version` (holding `rows` rows) was committed: the marker keeps the highest version of all
/// writers (a conditional replace, retried). `fresh`: the store was just created, so a marker left by an
/// earlier store at the same path is replaced whatever it says. Only ever called after the commit succeeded,
/// so the marker never names a version the store does not have; under heavy contention it may lag behind
/// (which only weakens the check).
pub fn record_commit(path: &Path, version: u64, rows: u64, fresh: bool) -> Result<()> {
    let files = Files::of_store(path)?;
    let body = serde_json::to_vec(&CommitMarker { version, rows })?;
    for _ in 0..20 {
        match files.get(COMMIT_MARKER)? {
            None => {
                if files.create(COMMIT_MARKER, &body)? {
                    return Ok(());
                }
            }
            Some(read) => {
                let newer = serde_json::from_slice::<CommitMarker>(&read.bytes)
                    .is_ok_and(|m| m.version >= version);
                if newer && !fresh {
                    return Ok(());
                }
                if files.replace(COMMIT_MARKER, &body, &read)? {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Live rows of the dataset's current version from its manifest alone (physical rows minus the deletion
/// files' counts); `None` when a fragment lacks a count.
pub fn manifest_rows(ds: &Dataset) -> Option<u64> {
    ds.manifest()
        .fragments
        .iter()
        .map(fragment_rows)
        .sum::<Option<u64>>()
}

fn fragment_rows(f: &Fragment) -> Option<u64> {
    let deleted = match &f.deletion_file {
        None => 0,
        Some(d) => d.num_deleted_rows? as u64,
    };
    Some((f.physical_rows? as u64).saturating_sub(deleted))
}

/// One thing the open check found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// The file concerned, as the user knows it (`<store>/data/….lance`, `s3://…/_versions/….manifest`).
    pub file: PathBuf,
    /// Fragment id, for data and deletion files.
    pub fragment: Option<u64>,
    /// What is wrong, one sentence.
    pub what: String,
    /// A lost manifest (its remedy differs from a data file's).
    pub manifest: bool,
}

/// A fragment's files and where its rows are (row offsets as `take` addresses them).
struct FragmentInfo {
    fragment: Fragment,
    /// `data/<file>` of each data file.
    files: Vec<String>,
    first_row: Option<u64>,
    rows: Option<u64>,
}

fn fragment_infos(ds: &Dataset) -> Vec<FragmentInfo> {
    let mut next = Some(0u64);
    ds.manifest()
        .fragments
        .iter()
        .map(|f| {
            let rows = fragment_rows(f);
            let info = FragmentInfo {
                fragment: f.clone(),
                files: f.files.iter().map(|d| format!("data/{}", d.path)).collect(),
                first_row: next,
                rows,
            };
            next = match (next, rows) {
                (Some(n), Some(r)) => Some(n + r),
                _ => None,
            };
            info
        })
        .collect()
}

impl FragmentInfo {
    /// "fragment 3, rows 1024..2047" (as far as known).
    fn describe(&self) -> String {
        match (self.first_row, self.rows) {
            (Some(_), Some(0)) => format!("fragment {}, no live rows", self.fragment.id),
            (Some(a), Some(n)) => {
                format!("fragment {}, rows {a}..={}", self.fragment.id, a + n - 1)
            }
            (_, Some(n)) => format!("fragment {}, {n} row(s)", self.fragment.id),
            _ => format!("fragment {}", self.fragment.id),
        }
    }
}

/// The manifest file name of `version` in the naming scheme of the dataset's current manifest.
fn manifest_name(ds: &Dataset, version: u64) -> String {
    let current = ds
        .manifest_location()
        .path
        .filename()
        .unwrap_or_default()
        .to_string();
    if current == format!("{}.manifest", ds.version().version) {
        format!("{version}.manifest")
    } else {
        format!("{:020}.manifest", u64::MAX - version)
    }
}

/// The listing of one folder of the dataset: file name → size.
async fn sizes_under(
    store: &lance::io::ObjectStore,
    dir: &ObjectPath,
) -> lance::Result<HashMap<String, u64>> {
    let listed: Vec<object_store::ObjectMeta> = store.inner.list(Some(dir)).try_collect().await?;
    Ok(listed
        .into_iter()
        .filter_map(|m| Some((m.location.filename()?.to_string(), m.size)))
        .collect())
}

/// Everything [`check_open`] checks, all findings collected (empty: the store looks whole).
pub async fn find_damage(path: &Path, ds: &Dataset) -> Result<Vec<Damage>> {
    let mut out = Vec::new();
    let version = ds.version().version;
    let rows_now = manifest_rows(ds);

    // 1. a lost latest manifest: the marker (or Lance's hint) names a later version than the latest there is.
    // Read through Lance's object store (async: this runs on the caller's runtime, local folder or URI).
    let store = ds
        .object_store(None)
        .await
        .map_err(|e| store_error(path, e))?;
    let base = ds.branch_location().path;
    let marker = COMMIT_MARKER.split('/').fold(base, |p, part| p.join(part));
    let marker: Option<CommitMarker> = match store.inner.get(&marker).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(|e| {
                Error::store(shown(path, COMMIT_MARKER), format!("reading it: {e}"))
            })?;
            match serde_json::from_slice(&bytes) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("ignoring {}: {e}", shown(path, COMMIT_MARKER).display());
                    None
                }
            }
        }
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => {
            return Err(Error::store(
                shown(path, COMMIT_MARKER),
                format!("reading it: {e}"),
            ))
        }
    };
    let hint = match &marker {
        Some(_) => None,
        None => read_hint(&store, &ds.versions_dir()).await,
    };
    let claimed = marker
        .map(|m| (m.version, Some(m.rows), COMMIT_MARKER))
        .or(hint.map(|v| (v, None, "_versions/latest_version_hint.json")));
    if let Some((claimed, claimed_rows, source)) = claimed {
        if claimed > version {
            // another writer may have committed since this dataset was opened: only a latest version below
            // the claimed one is a loss
            let latest = ds
                .latest_version_id()
                .await
                .map_err(|e| store_error(path, e))?;
            if latest < claimed {
                let missing: Vec<String> = (latest + 1..=claimed)
                    .map(|v| {
                        shown(path, &format!("_versions/{}", manifest_name(ds, v)))
                            .display()
                            .to_string()
                    })
                    .collect();
                let names = if missing.len() > 3 {
                    format!("{} … {}", missing[0], missing[missing.len() - 1])
                } else {
                    missing.join(", ")
                };
                let rows = |r: Option<u64>| r.map_or_else(String::new, |r| format!(", {r} rows"));
                out.push(Damage {
                    file: PathBuf::from(&missing[missing.len() - 1]),
                    fragment: None,
                    what: format!(
                        "the store's latest version is {claimed}{} ({}), but {} missing ({names}), so Lance \
                         would read version {latest}{} instead",
                        rows(claimed_rows),
                        if source == COMMIT_MARKER {
                            format!("recorded by sprint-prep in {source}")
                        } else {
                            format!("according to Lance's {source}")
                        },
                        if missing.len() > 1 {
                            format!(
                                "the manifests of versions {}..={claimed} ({} files) are",
                                latest + 1,
                                missing.len()
                            )
                        } else {
                            format!("the manifest of version {claimed} is")
                        },
                        rows(rows_now)
                    ),
                    manifest: true,
                });
            }
        } else if claimed == version && claimed_rows.is_some() && rows_now.is_some() {
            let (want, have) = (claimed_rows.unwrap_or(0), rows_now.unwrap_or(0));
            if want != have {
                out.push(Damage {
                    file: shown(path, &format!("_versions/{}", manifest_name(ds, version))),
                    fragment: None,
                    what: format!(
                        "version {version} holds {have} rows, but sprint-prep committed {want} rows as version \
                         {version} ({COMMIT_MARKER}): the manifest was replaced"
                    ),
                    manifest: true,
                });
            }
        }
    }

    // 2. every data file the current version references, with its recorded size
    let infos = fragment_infos(ds);
    if infos.iter().any(|f| f.fragment.files.is_empty()) {
        // (Lance never writes such a fragment)
        for f in infos.iter().filter(|f| f.fragment.files.is_empty()) {
            out.push(Damage {
                file: shown(path, "_versions"),
                fragment: Some(f.fragment.id),
                what: format!("{} has no data file in the manifest", f.describe()),
                manifest: true,
            });
        }
    }
    let data = sizes_under(&store, &ds.data_dir())
        .await
        .map_err(|e| store_error(path, e))?;
    for f in &infos {
        for (df, rel) in f.fragment.files.iter().zip(&f.files) {
            if df.base_id.is_some() {
                continue; // a file outside the dataset (Lance's multi-base layout); not written by sprint-prep
            }
            let file = shown(path, rel);
            let damage = |what: String| Damage {
                file: file.clone(),
                fragment: Some(f.fragment.id),
                what,
                manifest: false,
            };
            match (data.get(&df.path), df.file_size_bytes.get()) {
                (None, _) => out.push(damage(format!(
                    "data file {} ({}) is missing",
                    file.display(),
                    f.describe()
                ))),
                (Some(&size), Some(want)) if size != want.get() => out.push(damage(format!(
                    "data file {} ({}) has {size} bytes, the manifest records {}: it was {}",
                    file.display(),
                    f.describe(),
                    want.get(),
                    if size < want.get() {
                        "truncated"
                    } else {
                        "changed"
                    }
                ))),
                (Some(_), Some(_)) => {}
                (Some(&size), None) => {
                    // no recorded size (an older Lance writer): the footer magic, 4 bytes
                    let key = ds.data_dir().join(df.path.as_str());
                    let tail = if size < 4 {
                        None
                    } else {
                        store.inner.get_range(&key, size - 4..size).await.ok()
                    };
                    if tail.as_deref() != Some(LANCE_MAGIC.as_slice()) {
                        out.push(damage(format!(
                            "data file {} ({}) does not end with a Lance footer: it was truncated or overwritten",
                            file.display(),
                            f.describe()
                        )));
                    }
                }
            }
        }
    }

    // 3. deletion files (left by --dedupe until --compact)
    if infos.iter().any(|f| f.fragment.deletion_file.is_some()) {
        let deletions = sizes_under(&store, &ds.deletions_dir())
            .await
            .map_err(|e| store_error(path, e))?;
        for f in &infos {
            let Some(d) = &f.fragment.deletion_file else {
                continue;
            };
            if d.base_id.is_some() {
                continue;
            }
            let name = format!(
                "{}-{}-{}.{}",
                f.fragment.id,
                d.read_version,
                d.id,
                d.file_type.suffix()
            );
            if !deletions.contains_key(&name) {
                let file = shown(path, &format!("_deletions/{name}"));
                out.push(Damage {
                    what: format!(
                        "deletion file {} ({}) is missing: the rows it removes would come back",
                        file.display(),
                        f.describe()
                    ),
                    file,
                    fragment: Some(f.fragment.id),
                    manifest: false,
                });
            }
        }
    }
    Ok(out)
}

async fn read_hint(store: &lance::io::ObjectStore, versions: &ObjectPath) -> Option<u64> {
    let got = store
        .inner
        .get(&versions.clone().join(VERSION_HINT))
        .await
        .ok()?;
    let bytes = got.bytes().await.ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("version")?
        .as_u64()
}

/// The message of [`check_open`]'s refusal: each finding, then the remedy.
fn damage_message(path: &Path, damage: &[Damage]) -> String {
    let mut msg = String::from("the store is damaged:");
    for d in damage.iter().take(10) {
        msg.push_str("\n  - ");
        msg.push_str(&d.what);
    }
    if damage.len() > 10 {
        msg.push_str(&format!("\n  - … and {} more", damage.len() - 10));
    }
    if damage.iter().any(|d| d.manifest) {
        msg.push_str(&format!("\n  {}", manifest_remedy(path)));
    }
    if damage.iter().any(|d| !d.manifest) {
        msg.push_str(&format!("\n  {}", file_remedy(path)));
    }
    msg
}

/// The remedy for a lost (or unreadable) latest manifest.
fn manifest_remedy(path: &Path) -> String {
    format!(
        "Restore the missing manifest from a backup of the store. Or, to go on with the older version (a rerun \
         of sprint-prep on the same inputs encodes the rows that are missing again), delete {} and {} \
         (where present)",
        shown(path, COMMIT_MARKER).display(),
        shown(path, &format!("_versions/{VERSION_HINT}")).display()
    )
}

/// The cheap check of a store being opened (metadata and one listing only; see the module doc): refuses a
/// store whose data files are missing or have another size than recorded, or whose latest manifest is lost,
/// naming each file and the remedy.
pub async fn check_open(path: &Path, ds: &Dataset) -> Result<()> {
    let damage = find_damage(path, ds).await?;
    if damage.is_empty() {
        Ok(())
    } else {
        Err(Error::store(path, damage_message(path, &damage)))
    }
}

/// Opens the dataset at `path` (on `rt`), translating a failure into a message that names the file and the
/// remedy. A latest manifest that cannot be read makes Lance fail, or panic (lance 14 subtracts past zero on a
/// truncated one): both are caught, and the message names the manifest.
pub fn open_dataset(rt: &tokio::runtime::Runtime, path: &Path) -> Result<Dataset> {
    let uri = uri(path)?;
    let opened = rt.block_on(AssertUnwindSafe(Dataset::open(&uri)).catch_unwind());
    let (text, panicked, not_found) = match opened {
        Ok(Ok(ds)) => return Ok(ds),
        Ok(Err(e)) => {
            if !matches!(
                e,
                lance::Error::IO { .. }
                    | lance::Error::CorruptFile { .. }
                    | lance::Error::Internal { .. }
                    | lance::Error::Wrapped { .. }
                    | lance::Error::Arrow { .. }
                    | lance::Error::NotFound { .. }
                    | lance::Error::DatasetNotFound { .. }
            ) {
                return Err(store_error(path, e));
            }
            let nf = matches!(
                e,
                lance::Error::NotFound { .. } | lance::Error::DatasetNotFound { .. }
            );
            (e.to_string(), false, nf)
        }
        Err(p) => (panic_text(&p), true, false),
    };
    // the file Lance names, if a manifest; else, when Lance names none, the latest manifest (unless Lance
    // only says something is not there: then the message keeps Lance's words)
    let manifest = match store_file_in(&text).map(|(_, rel)| rel) {
        Some(rel) if rel.starts_with("_versions/") => Some(rel),
        Some(_) => None,
        None if panicked || !not_found => latest_manifest(path).map(|n| format!("_versions/{n}")),
        None => None,
    };
    match manifest {
        Some(rel) => Err(Error::store(
            path,
            format!(
                "the store's latest manifest {} cannot be read ({}). Restore it from a backup of the store. \
                 Or, to go back to the version before it, move it out of _versions/ and delete {} and {} \
                 (where present)",
                shown(path, &rel).display(),
                cleaned_with_file(path, &text),
                shown(path, COMMIT_MARKER).display(),
                shown(path, &format!("_versions/{VERSION_HINT}")).display()
            ),
        )),
        None => Err(Error::store(path, storage_message(path, &text, not_found))),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    format!(
        "Lance panicked: {}",
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "no message".into())
    )
}

/// The file name of the highest version's manifest under `_versions/` (as Lance picks it), when it can be
/// listed. Not called on an async runtime (an object store is listed on its own).
fn latest_manifest(path: &Path) -> Option<String> {
    let names: Vec<String> = match super::location::remote(path).ok()? {
        None => std::fs::read_dir(path.join("_versions"))
            .ok()?
            .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
            .collect(),
        Some(r) => r
            .list("_versions")
            .ok()?
            .iter()
            .filter_map(super::location::Remote::file_name)
            .collect(),
    };
    names
        .into_iter()
        .filter_map(|n| {
            let stem = n.strip_suffix(".manifest")?;
            let v: u64 = stem.parse().ok()?;
            // V2 names are 20 digits of u64::MAX - version, V1 names the version itself
            let version = if stem.len() == 20 { u64::MAX - v } else { v };
            Some((version, n))
        })
        .max()
        .map(|(_, n)| n)
}

/// A Lance error met while reading the store at `path`, as a message that names the store, the file when the
/// error names one (as the user knows it: the store's own path or URI, not Lance's object key), and the
/// remedy; Lance's source locations are left out. Errors that are not about reading (commit conflicts,
/// invalid arguments) keep their own message.
pub fn store_error(path: &Path, e: lance::Error) -> Error {
    match e {
        lance::Error::CommitConflict { .. }
        | lance::Error::RetryableCommitConflict { .. }
        | lance::Error::TooMuchWriteContention { .. }
        | lance::Error::IncompatibleTransaction { .. }
        | lance::Error::InvalidInput { .. }
        | lance::Error::SchemaMismatch { .. }
        | lance::Error::DatasetAlreadyExists { .. } => e.into(),
        e => {
            let not_found = matches!(
                e,
                lance::Error::NotFound { .. } | lance::Error::DatasetNotFound { .. }
            );
            Error::store(path, storage_message(path, &e.to_string(), not_found))
        }
    }
}

/// [`store_error`] for an error already in the crate's type: Lance errors are translated, others kept.
pub fn translate(path: &Path, e: Error) -> Error {
    match e {
        Error::Lance(e) => store_error(path, e),
        e => e,
    }
}

/// The message of [`store_error`] from an error's text (also for errors that arrive as text, such as a
/// reading task's panic).
pub fn storage_message(path: &Path, text: &str, not_found: bool) -> String {
    let cleaned = cleaned_with_file(path, text);
    let not_found = not_found || cleaned.contains("Not found") || cleaned.contains("not found");
    match store_file_in(text) {
        Some((_, rel)) => {
            let file = shown(path, &rel);
            let what = if not_found {
                "the file is missing".to_string()
            } else {
                format!("{cleaned}; the file is damaged or unreadable")
            };
            format!(
                "cannot read {}: {what}. {}",
                file.display(),
                file_remedy(path)
            )
        }
        None => format!(
            "reading the store failed: {cleaned}. If a file of the store is missing or damaged, {}",
            lowercase_first(&file_remedy(path))
        ),
    }
}

/// [`clean_message`], with the store file it names (if any) written as the user knows it.
fn cleaned_with_file(path: &Path, text: &str) -> String {
    let cleaned = clean_message(text);
    match store_file_in(text) {
        Some((token, rel)) => cleaned.replace(&token, &shown(path, &rel).display().to_string()),
        None => cleaned,
    }
}

fn lowercase_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Drops the source locations Lance appends to its messages (`, /root/.cargo/registry/…/x.rs:12:5`).
pub fn clean_message(text: &str) -> String {
    let is_location = |t: &str| {
        let t = t.trim().trim_end_matches([')', ']', '}', '.']);
        let mut parts = t.rsplitn(3, ':');
        let (col, line, file) = (parts.next(), parts.next(), parts.next());
        matches!((col, line, file), (Some(c), Some(l), Some(f))
            if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit())
            && !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit())
            && f.ends_with(".rs"))
    };
    text.split(", ")
        .filter(|t| !is_location(t))
        .collect::<Vec<_>>()
        .join(", ")
        .trim()
        .to_string()
}

/// The store file an error text names: the path token as written (Lance's object key, often without its
/// leading `/`) and the file relative to the store (`data/<name>.lance`, `_deletions/…`, `_versions/…`).
pub fn store_file_in(text: &str) -> Option<(String, String)> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    let is_path = |c: char| is_name(c) || c == '/' || c == ':';
    let mut best = None;
    for dir in [
        "data",
        "_deletions",
        "_versions",
        "_indices",
        "_transactions",
    ] {
        let needle = format!("/{dir}/");
        for (at, _) in text.match_indices(&needle) {
            let rest = &text[at + needle.len()..];
            let name: String = rest.chars().take_while(|&c| is_name(c)).collect();
            let after = rest[name.len()..].chars().next();
            if name.is_empty() || after == Some('/') || !name.contains('.') {
                continue;
            }
            let start = text[..at]
                .char_indices()
                .rev()
                .take_while(|&(_, c)| is_path(c))
                .last()
                .map_or(at, |(i, _)| i);
            let token = text[start..at + needle.len() + name.len()].to_string();
            let candidate = (at, token, format!("{dir}/{name}"));
            if best.as_ref().is_none_or(|(b, _, _)| *b < at) {
                best = Some(candidate);
            }
        }
    }
    best.map(|(_, token, rel)| (token, rel))
}

// ---------------------------------------------------------------------------------------------------------
// sprint-prep --verify

/// Why a row is bad (the keys of [`VerifyReport::bad_rows`]).
pub mod reasons {
    pub const UNREADABLE: &str = "unreadable";
    pub const NULL: &str = "null value";
    pub const DUPLICATE_ID: &str = "duplicate id";
    pub const LATENT_SHAPE: &str = "latent_shape not the store's";
    pub const LATENT_LEN: &str = "latent length != product of latent_shape";
    pub const PROMPT_LEN: &str = "prompt_len outside 1..=max_sequence_length";
    pub const EMBEDS_LEN: &str = "prompt_embeds length != prompt_len x D";
    pub const LATENT_NONFINITE: &str = "non-finite latent value";
    pub const EMBEDS_NONFINITE: &str = "non-finite prompt_embeds value";
}

/// One data file and what reading it found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileCheck {
    pub file: PathBuf,
    pub fragment: u64,
    pub rows: Option<u64>,
    /// `ok`, or what is wrong with it.
    pub status: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub store: PathBuf,
    pub version: u64,
    /// Live rows according to the manifest.
    pub rows_expected: Option<u64>,
    /// Rows looked at: read and checked, or found unreadable.
    pub rows_checked: u64,
    /// Rows with at least one problem.
    pub rows_bad: u64,
    /// The open check's findings (lost manifest, missing or resized files), one sentence each.
    pub damage: Vec<String>,
    /// Reason → ids of the rows (`row <offset>` where the id could not be read), in row order.
    pub bad_rows: BTreeMap<String, Vec<String>>,
    pub files: Vec<FileCheck>,
    /// Whether the manifest is what was lost (the remedy differs).
    #[serde(skip)]
    manifest_damage: bool,
}

impl VerifyReport {
    /// Data files some rows of which could not be read.
    pub fn damaged_files(&self) -> usize {
        self.files.iter().filter(|f| f.status != "ok").count()
    }

    /// Whether the latest manifest was lost (or replaced): the store is read at an older version.
    pub fn lost_manifest(&self) -> bool {
        self.manifest_damage
    }

    /// Nothing wrong.
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
            && self.rows_bad == 0
            && self.rows_expected.is_none_or(|n| n == self.rows_checked)
    }

    /// The summary `sprint-prep --verify` prints, one line per entry.
    pub fn summary(&self) -> Vec<String> {
        let mut out = vec![format!(
            "store            {} (Lance version {}, {} data file(s))",
            self.store.display(),
            self.version,
            self.files.len()
        )];
        let expected = self
            .rows_expected
            .map_or_else(|| "?".to_string(), |n| n.to_string());
        out.push(format!(
            "rows checked     {} of {expected}: {} good, {} bad",
            self.rows_checked,
            self.rows_checked - self.rows_bad,
            self.rows_bad
        ));
        if self.damage.is_empty() {
            out.push("damage           none found by the open check".into());
        }
        for d in &self.damage {
            out.push(format!("damage           {d}"));
        }
        if self.bad_rows.is_empty() {
            out.push("bad rows         none".into());
        }
        for (reason, ids) in &self.bad_rows {
            let mut shown: Vec<&str> = ids.iter().take(SHOWN_IDS).map(String::as_str).collect();
            let more = ids.len().saturating_sub(SHOWN_IDS);
            let more = if more > 0 {
                format!(" … and {more} more")
            } else {
                String::new()
            };
            shown.dedup();
            out.push(format!(
                "bad rows         {reason}: {} row(s): {}{more}",
                ids.len(),
                shown.join(", ")
            ));
        }
        let ok = self.files.len() - self.damaged_files();
        out.push(format!(
            "files            {ok} of {} data file(s) read whole{}",
            self.files.len(),
            if ok < self.files.len() {
                "; damaged:"
            } else {
                ""
            }
        ));
        for f in self.files.iter().filter(|f| f.status != "ok") {
            out.push(format!(
                "    {} (fragment {}, {} row(s)): {}",
                f.file.display(),
                f.fragment,
                f.rows.map_or_else(|| "?".to_string(), |n| n.to_string()),
                f.status
            ));
        }
        if !self.is_ok() {
            out.push(format!("remedy           {}", self.remedy()));
        }
        out
    }

    /// What to do about what was found.
    pub fn remedy(&self) -> String {
        let p = self.store.display();
        let mut r = Vec::new();
        if self.manifest_damage {
            r.push(manifest_remedy(&self.store));
        }
        let unreadable =
            self.damaged_files() > 0 || self.bad_rows.contains_key(reasons::UNREADABLE);
        if unreadable {
            r.push(format!(
                "Restore the damaged file(s) above from a backup of the store, or rebuild the store (re-run \
                 sprint-prep with --overwrite --output {p})"
            ));
        }
        if self.bad_rows.contains_key(reasons::DUPLICATE_ID) {
            r.push(format!(
                "`sprint-prep --dedupe {p}` removes the extra copies of duplicate ids"
            ));
        }
        if self
            .bad_rows
            .keys()
            .any(|k| k != reasons::UNREADABLE && k != reasons::DUPLICATE_ID)
        {
            r.push(format!(
                "Rows with wrong shapes or values were written so by the encoder: rebuild the store (sprint-prep \
                 --overwrite --output {p}) from the inputs of the ids listed"
            ));
        }
        r.join(". ")
    }
}

/// Checks of each row against the store's settings.
struct RowChecker<'a> {
    config: &'a StoreConfig,
    seen: HashMap<String, u64>,
    report: &'a mut VerifyReport,
}

impl RowChecker<'_> {
    fn bad(&mut self, reason: &str, label: &str) {
        self.report
            .bad_rows
            .entry(reason.to_string())
            .or_default()
            .push(label.to_string());
    }

    fn shape_ok(&self, s: [i32; 3]) -> bool {
        if s.iter().any(|&v| v <= 0) {
            return false;
        }
        let s = s.map(|v| v as usize);
        match &self.config.multi_scale {
            None => s == self.config.latent_shape,
            Some(ms) => ms.buckets.iter().any(|b| b.latent_shape == s),
        }
    }

    /// Checks every row of a batch whose first row is at `offset`; returns how many rows were bad.
    fn batch(&mut self, path: &Path, b: &RecordBatch, offset: u64) -> Result<u64> {
        let super::reader::RowColumns {
            ids,
            caps,
            lat,
            shp,
            emb,
            lens,
        } = super::reader::RowColumns::of(path, b)?;
        let (max_len, d) = (
            self.config.max_sequence_length,
            self.config.text_hidden_size,
        );
        let mut bad_rows = 0;
        for i in 0..b.num_rows() {
            let label = if ids.is_null(i) {
                format!("row {}", offset + i as u64)
            } else {
                ids.value(i).to_string()
            };
            let mut reasons: Vec<&str> = Vec::new();
            if ids.is_null(i)
                || caps.is_null(i)
                || lat.is_null(i)
                || shp.is_null(i)
                || emb.is_null(i)
                || lens.is_null(i)
            {
                reasons.push(reasons::NULL);
            }
            if !ids.is_null(i) {
                if let Some(first) = self.seen.insert(label.clone(), offset + i as u64) {
                    self.seen.insert(label.clone(), first);
                    reasons.push(reasons::DUPLICATE_ID);
                }
            }
            if !shp.is_null(i) && !lat.is_null(i) {
                let s = shp.value(i);
                let s = s.as_primitive::<Int32Type>();
                let shape = [s.value(0), s.value(1), s.value(2)];
                if !self.shape_ok(shape) {
                    reasons.push(reasons::LATENT_SHAPE);
                }
                let numel: i64 = shape.iter().map(|&v| i64::from(v)).product();
                if numel != lat.value_length(i) as i64 {
                    reasons.push(reasons::LATENT_LEN);
                }
            }
            if !lens.is_null(i) && !emb.is_null(i) {
                let len = lens.value(i);
                if len < 1 || len as usize > max_len {
                    reasons.push(reasons::PROMPT_LEN);
                } else if emb.value_length(i) as usize != len as usize * d {
                    reasons.push(reasons::EMBEDS_LEN);
                }
            }
            if !lat.is_null(i) && !all_finite(lat, i) {
                reasons.push(reasons::LATENT_NONFINITE);
            }
            if !emb.is_null(i) && !all_finite(emb, i) {
                reasons.push(reasons::EMBEDS_NONFINITE);
            }
            if !reasons.is_empty() {
                bad_rows += 1;
                for r in reasons {
                    self.bad(r, &label);
                }
            }
        }
        Ok(bad_rows)
    }
}

/// Whether every value of row `i` of a float list column is finite.
fn all_finite(list: &ListArray, i: usize) -> bool {
    let offsets = list.value_offsets();
    let (a, b) = (offsets[i] as usize, offsets[i + 1] as usize);
    let values = list.values();
    if let Some(v) = values.as_primitive_opt::<Float32Type>() {
        v.values()[a..b].iter().all(|x| x.is_finite())
    } else if let Some(v) = values.as_primitive_opt::<Float16Type>() {
        v.values()[a..b].iter().all(|x| x.is_finite())
    } else {
        false
    }
}

/// Runs `fut` on `rt`, turning a panic inside Lance (damaged bytes can trip its decoders' assertions) into
/// an error message.
fn guarded<T>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = lance::Result<T>>,
) -> std::result::Result<T, String> {
    match rt.block_on(AssertUnwindSafe(fut).catch_unwind()) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(panic_text(&p)),
    }
}

/// Reads every row of the store at `path` (a folder or an `s3://` URI) and checks it (`sprint-prep
/// --verify`): the open check's findings, then per row the latent shape (the store's, or one of its
/// buckets) and length, the prompt length (1..=max_sequence_length) and embedding length (prompt_len × D),
/// finiteness of every value, nulls and unique ids. A fragment that cannot be read is pinned to its files and,
/// row by row, to the rows affected. Changes nothing. An error only when the store cannot be opened at all.
pub fn verify(path: &Path, progress: bool) -> Result<VerifyReport> {
    if !super::location::store_exists(path)? {
        return Err(Error::Missing {
            what: "latent store".into(),
            path: path.to_path_buf(),
            hint: "pass the directory sprint-prep --output wrote (it holds _versions/)".into(),
        });
    }
    let rt = runtime_with(
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2),
    )?;
    let ds = open_dataset(&rt, path)?;
    let config = read_config(path, &ds)?;
    let damage = rt.block_on(find_damage(path, &ds))?;
    let mut report = VerifyReport {
        store: path.to_path_buf(),
        version: ds.version().version,
        rows_expected: manifest_rows(&ds),
        manifest_damage: damage.iter().any(|d| d.manifest),
        damage: damage.iter().map(|d| d.what.clone()).collect(),
        ..Default::default()
    };
    let pb = crate::cli::rows_bar(report.rows_expected.unwrap_or(0), progress, "rows verified");
    let infos = fragment_infos(&ds);
    let projection = std::sync::Arc::new(ds.schema().clone());
    let mut checker = RowChecker {
        config: &config,
        seen: HashMap::new(),
        report: &mut report,
    };
    let mut files = Vec::new();
    let mut offset = 0u64;
    for info in &infos {
        let first = info.first_row.unwrap_or(offset);
        let missing: Vec<&Damage> = damage
            .iter()
            .filter(|d| d.fragment == Some(info.fragment.id))
            .collect();
        let mut read = 0u64;
        let mut bad = 0u64;
        // a file known missing or resized: nothing of the fragment is read (its rows are unreadable)
        let failure: Option<String> = if !missing.is_empty() {
            Some(missing[0].what.clone())
        } else {
            let mut scan = ds.scan();
            scan.with_fragments(vec![info.fragment.clone()]);
            scan.batch_size(VERIFY_BATCH_ROWS);
            scan.fragment_readahead(1);
            scan.scan_in_order(true);
            let stream = guarded(&rt, scan.try_into_stream());
            match stream {
                Err(e) => Some(e),
                Ok(mut stream) => loop {
                    match guarded(&rt, stream.try_next()) {
                        Ok(Some(b)) => {
                            bad += checker.batch(path, &b, first + read)?;
                            read += b.num_rows() as u64;
                            pb.inc(b.num_rows() as u64);
                        }
                        Ok(None) => break None,
                        Err(e) => break Some(e),
                    }
                },
            }
        };
        let status = match failure {
            None => "ok".to_string(),
            Some(cause) => {
                // the rest of the fragment, row by row: which rows still read, which do not
                let rows = info.rows.unwrap_or(read);
                let ids = if missing.is_empty() {
                    fragment_ids(&rt, &ds, &info.fragment)
                } else {
                    None
                };
                let mut unreadable = 0u64;
                for k in read..rows {
                    let row = first + k;
                    let got = if missing.is_empty() {
                        guarded(&rt, ds.take(&[row], projection.clone())).ok()
                    } else {
                        None
                    };
                    match got {
                        Some(b) if b.num_rows() == 1 => bad += checker.batch(path, &b, row)?,
                        _ => {
                            let label = ids
                                .as_ref()
                                .and_then(|ids| ids.get(k as usize).cloned())
                                .unwrap_or_else(|| format!("row {row}"));
                            checker.bad(reasons::UNREADABLE, &label);
                            unreadable += 1;
                            bad += 1;
                        }
                    }
                    pb.inc(1);
                }
                read = rows;
                let cause = if missing.is_empty() {
                    format!("{} (the file is damaged)", cleaned_with_file(path, &cause))
                } else {
                    cause
                };
                let ids_note = if ids.is_none() && unreadable > 0 {
                    " (their ids were in the damaged file)"
                } else {
                    ""
                };
                format!("{unreadable} row(s) unreadable{ids_note}: {cause}")
            }
        };
        for rel in &info.files {
            files.push(FileCheck {
                file: shown(path, rel),
                fragment: info.fragment.id,
                rows: info.rows,
                status: status.clone(),
            });
        }
        checker.report.rows_checked += read;
        checker.report.rows_bad += bad;
        offset = first + read;
    }
    pb.finish_and_clear();
    report.files = files;
    Ok(report)
}

/// The ids of a fragment's rows in order, when its `id` column can still be read.
fn fragment_ids(
    rt: &tokio::runtime::Runtime,
    ds: &Dataset,
    fragment: &Fragment,
) -> Option<Vec<String>> {
    let mut scan = ds.scan();
    scan.with_fragments(vec![fragment.clone()]);
    scan.project(&[columns::ID]).ok()?;
    scan.scan_in_order(true);
    let batches: Vec<RecordBatch> = guarded(rt, async {
        scan.try_into_stream().await?.try_collect::<Vec<_>>().await
    })
    .ok()?;
    let mut ids = Vec::new();
    for b in &batches {
        let col = b.column(0).as_any().downcast_ref::<StringArray>()?;
        ids.extend((0..col.len()).map(|i| col.value(i).to_string()));
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lance_messages_are_cleaned_and_their_file_found() {
        let text = "Not found: tmp/dmg/a.lance/data/1110abc.lance, /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/lance-io-14.0.2/src/local.rs:273:40";
        assert_eq!(
            clean_message(text),
            "Not found: tmp/dmg/a.lance/data/1110abc.lance"
        );
        let (token, rel) = store_file_in(text).unwrap();
        assert_eq!(token, "tmp/dmg/a.lance/data/1110abc.lance");
        assert_eq!(rel, "data/1110abc.lance");
        let msg = storage_message(Path::new("/tmp/dmg/a.lance"), text, false);
        assert!(
            msg.starts_with(
                "cannot read /tmp/dmg/a.lance/data/1110abc.lance: the file is missing."
            ),
            "{msg}"
        );
        assert!(
            msg.contains("sprint-prep --verify /tmp/dmg/a.lance"),
            "{msg}"
        );
        assert!(!msg.contains(".rs:"), "{msg}");
        // a store folder that itself lies under a `data/` folder
        let (_, rel) = store_file_in("x: mnt/data/s.lance/data/f.lance, y").unwrap();
        assert_eq!(rel, "data/f.lance");
        // an object key on S3
        let msg = storage_message(
            Path::new("s3://b/runs/s.lance"),
            "Generic S3 error: runs/s.lance/data/f.lance: 404",
            false,
        );
        assert!(
            msg.starts_with("cannot read s3://b/runs/s.lance/data/f.lance: "),
            "{msg}"
        );
        assert!(store_file_in("LanceError(IO): failed to fill whole buffer").is_none());
        assert_eq!(
            clean_message(
                "LanceError(IO): Generic LocalFileSystem error: failed to fill whole buffer, /rustc/59807616e1fa/library/core/src/ops/function.rs:250:5"
            ),
            "LanceError(IO): Generic LocalFileSystem error: failed to fill whole buffer"
        );
    }
}
