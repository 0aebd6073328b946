//! Where a store lives — a local folder or an object-store URI (`s3://bucket/path.lance`, and
//! `az://container/path.lance` in a build with `--features azure`) — and the files sana-sprint keeps there next
//! to Lance's own (`_sprint/`: leases, shard identities, the creation marker).
//!
//! Lance reads and writes both kinds itself; everything else goes through this module, which has two
//! back ends:
//!
//! * **local folder** (any plain path): the callers keep their `std::fs` code (exclusive create = a complete
//!   temporary file hard-linked to the name, update = temporary file + rename); this module only answers
//!   "is it local" ([`remote`] returns `None`) and sizes folders.
//! * **object store** ([`Remote`], any `scheme://` URI): the object store Lance itself opens
//!   for the URI (`lance::io::ObjectStore`), so credentials, endpoint and region come from the same place as
//!   Lance's: the `AWS_*` variables, profiles and instance roles for `s3://`, the `AZURE_STORAGE_*` variables
//!   for `az://` ([`settings_hint`] names them in messages). Create-if-absent is a conditional put
//!   (`PutMode::Create`: `If-None-Match: *` on S3 and Azure), an update is a conditional put on the e-tag read
//!   (`PutMode::Update`, `If-Match`), a folder is a `list` of its prefix.
//! * **a scheme this build lacks** (`az://` without `--features azure`, `gs://`, …) is refused by
//!   [`check_scheme`] with the cargo feature to build with, before Lance would answer with its generic
//!   "no object store provider" message.
//!
//! An endpoint that ignores conditional writes would make both of two racing creates succeed: leases would
//! not be exclusive, and neither would Lance's own commits (they rely on `If-None-Match` too).
//! [`Remote::conditional_writes`] probes for that once per store; `sprint-prep` refuses several workers on
//! such an endpoint and warns a single one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use futures::{StreamExt, TryStreamExt};
use lance::io::{ObjectStore, ObjectStoreParams, ObjectStoreRegistry, StorageOptionsAccessor};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::error::{Error, Result};

/// True when `path` is a URI (`s3://…`; also `az://`, `memory://`, `file://`, … — [`check_scheme`] says
/// whether this build opens it): `scheme://` with a scheme of letters, digits, `+`, `-`, `.` starting with a
/// letter. Plain paths are local folders.
pub fn is_remote(path: &Path) -> bool {
    scheme(path).is_some()
}

/// The scheme of a URI (`s3` for `s3://bucket/x`), `None` for a local path.
pub fn scheme(path: &Path) -> Option<&str> {
    let (scheme, _) = path.to_str()?.split_once("://")?;
    let well_formed = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    well_formed.then_some(scheme)
}

/// Refuses a URI whose scheme this build cannot open, saying how to get one that can: `az://` needs
/// `--features azure`; `gs://` is not offered (see [`refusal`]). Local paths and the schemes this build's
/// Lance registers pass.
pub fn check_scheme(path: &Path) -> Result<()> {
    let Some(scheme) = scheme(path) else {
        return Ok(());
    };
    let registry = ObjectStoreRegistry::default();
    match refusal(scheme, |s| registry.get_provider(s).is_some()) {
        None => Ok(()),
        Some(why) => Err(Error::store(path, why)),
    }
}

/// Why `scheme://` stores cannot be opened by a build whose Lance has a provider for the schemes `built_in`
/// accepts; `None` when they can.
fn refusal(scheme: &str, built_in: impl Fn(&str) -> bool) -> Option<String> {
    if built_in(scheme) {
        return None;
    }
    let mut offered = vec!["local folders", "s3://"];
    if built_in("az") {
        offered.push("az://");
    }
    let offered = offered.join(", ");
    Some(match scheme {
        "az" | "abfss" | "azure" | "abfs" | "adl" => format!(
            "{scheme}:// stores (Azure Blob Storage) need a build with `--features azure` (cargo build --release \
             --features azure); this build opens {offered} stores"
        ),
        "gs" | "gcs" => format!(
            "{scheme}:// stores (Google Cloud Storage) are not offered: no GCS emulator at hand honours the \
             conditional writes that the store's leases and Lance's commits rely on, so that back end is \
             untested (README, \"Stores on object storage\"). This build opens {offered} stores"
        ),
        _ => format!("{scheme}:// stores are not supported: this build opens {offered} stores"),
    })
}

/// Where the endpoint, region and credentials of `scheme://` stores come from, for messages.
pub fn settings_hint(scheme: &str) -> &'static str {
    match scheme {
        "s3" | "s3+ddb" => {
            "the endpoint, region and credentials come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, \
             AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL (with AWS_ALLOW_HTTP=true for http://), AWS_PROFILE \
             or the instance role"
        }
        "az" | "abfss" => {
            "the account and credentials come from AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY \
             (or AZURE_STORAGE_SAS_TOKEN, AZURE_STORAGE_TOKEN, AZURE_STORAGE_CLIENT_ID / \
             AZURE_STORAGE_CLIENT_SECRET / AZURE_STORAGE_TENANT_ID, a managed identity), another endpoint from \
             AZURE_STORAGE_ENDPOINT (with AZURE_ALLOW_HTTP=true for http://); Azurite: \
             AZURE_STORAGE_USE_EMULATOR=true and AZURITE_BLOB_STORAGE_URL"
        }
        _ => "the settings come from the variables Lance reads for this scheme",
    }
}

/// Services known to honour conditional writes for `scheme://` stores, for messages.
pub fn conditional_write_services(scheme: &str) -> &'static str {
    match scheme {
        "az" | "abfss" => "Azure Blob Storage, Azurite, ...",
        _ => "AWS S3, MinIO, Cloudflare R2, moto, ...",
    }
}

/// The store at `path` on its object store, or `None` for a local folder.
pub fn remote(path: &Path) -> Result<Option<Arc<Remote>>> {
    if !is_remote(path) {
        return Ok(None);
    }
    let uri = path.to_string_lossy().trim_end_matches('/').to_string();
    static OPEN: OnceLock<Mutex<HashMap<String, Arc<Remote>>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .expect("remote stores lock");
    if let Some(r) = open.get(&uri) {
        return Ok(Some(r.clone()));
    }
    let r = Arc::new(Remote::open(&uri)?);
    open.insert(uri, r.clone());
    Ok(Some(r))
}

/// Whether a Lance dataset exists at `path` (it has a `_versions/` folder).
pub fn store_exists(path: &Path) -> Result<bool> {
    match remote(path)? {
        None => Ok(path.join("_versions").is_dir()),
        Some(r) => r.any_under("_versions"),
    }
}

/// Total bytes of the store's files: the folder's files, or the sizes of the objects under the URI.
pub fn store_bytes(path: &Path) -> Result<u64> {
    match remote(path)? {
        None => Ok(dir_size(path)),
        Some(r) => Ok(r.list("")?.iter().map(|m| m.size).sum()),
    }
}

/// Bytes of the files under a local folder (0 when it cannot be read).
pub fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Removes the folder `rel` (relative to the store) and everything in it; nothing when absent.
pub fn remove_dir(path: &Path, rel: &str) -> Result<()> {
    match remote(path)? {
        None => {
            let dir = path.join(rel);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
            Ok(())
        }
        Some(r) => {
            for m in r.list(rel)? {
                r.delete_path(&m.location)?;
            }
            Ok(())
        }
    }
}

/// An object read from the store: its bytes, the version to pass to [`Remote::update`], when it was written.
pub struct Object {
    pub bytes: Vec<u8>,
    pub version: UpdateVersion,
    pub modified_unix_ms: i64,
}

/// A store on an object store: the store Lance opens for its URI, the store's path inside it, and a small
/// runtime of its own (callers are synchronous: prep's reader thread, the lease heartbeat).
pub struct Remote {
    uri: String,
    store: Arc<ObjectStore>,
    base: ObjectPath,
    rt: tokio::runtime::Runtime,
    conditional: OnceLock<bool>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("uri", &self.uri).finish()
    }
}

impl Remote {
    fn open(uri: &str) -> Result<Remote> {
        Remote::open_with(uri, HashMap::new())
    }

    /// The store at `uri` opened with explicit Lance storage options (`azure_storage_endpoint`, …; the
    /// environment's settings fill in the rest), bypassing the per-process cache of [`remote`]: each call is
    /// a client of its own, like another process.
    pub fn open_with(uri: &str, options: HashMap<String, String>) -> Result<Remote> {
        check_scheme(Path::new(uri))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store-bookkeeping")
            .enable_all()
            .build()
            .map_err(|e| Error::io("tokio runtime", e))?;
        let params = ObjectStoreParams {
            storage_options_accessor: (!options.is_empty())
                .then(|| Arc::new(StorageOptionsAccessor::with_static_options(options))),
            ..Default::default()
        };
        let (store, base) = rt
            .block_on(ObjectStore::from_uri_and_params(
                Arc::new(ObjectStoreRegistry::default()),
                uri,
                &params,
            ))
            .map_err(|e| open_error(uri, e))?;
        Ok(Remote {
            uri: uri.to_string(),
            store,
            base,
            rt,
            conditional: OnceLock::new(),
        })
    }

    /// The store's URI (`s3://bucket/path.lance`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The URI's scheme (`s3`, `az`).
    pub fn scheme(&self) -> &str {
        self.uri.split("://").next().unwrap_or("")
    }

    /// `<uri>/<rel>`, for messages.
    pub fn display(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("{}/{rel}", self.uri))
    }

    fn key(&self, rel: &str) -> ObjectPath {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.base.clone(), |p, part| p.join(part))
    }

    fn err(&self, rel: &str, e: object_store::Error) -> Error {
        let denied = matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        );
        let mut msg = e.to_string();
        if denied {
            msg = format!("{msg} ({})", settings_hint(self.scheme()));
        }
        Error::store(self.display(rel), msg)
    }

    /// The object `rel`, or `None` when absent.
    pub fn get(&self, rel: &str) -> Result<Option<Object>> {
        let key = self.key(rel);
        self.rt.block_on(async {
            let got = match self.store.inner.get(&key).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.err(rel, e)),
            };
            let meta = got.meta.clone();
            let bytes = got.bytes().await.map_err(|e| self.err(rel, e))?;
            Ok(Some(Object {
                bytes: bytes.to_vec(),
                version: UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                },
                modified_unix_ms: meta.last_modified.timestamp_millis(),
            }))
        })
    }

    async fn put(&self, rel: &str, body: Vec<u8>, mode: PutMode) -> object_store::Result<()> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.store
            .inner
            .put_opts(&self.key(rel), PutPayload::from(body), opts)
            .await
            .map(|_| ())
    }

    /// Writes `rel` only if no object has that name (`If-None-Match: *`); false when one exists.
    pub fn create(&self, rel: &str, body: Vec<u8>) -> Result<bool> {
        match self.rt.block_on(self.put(rel, body, PutMode::Create)) {
            Ok(()) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Replaces `rel` only if it is still the version read (`If-Match: <e-tag>`); false when it changed or
    /// was deleted since.
    pub fn update(&self, rel: &str, body: Vec<u8>, version: &UpdateVersion) -> Result<bool> {
        match self
            .rt
            .block_on(self.put(rel, body, PutMode::Update(version.clone())))
        {
            Ok(()) => Ok(true),
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => Ok(false),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Deletes `rel` (nothing when absent).
    pub fn delete(&self, rel: &str) -> Result<()> {
        self.delete_path(&self.key(rel))
    }

    fn delete_path(&self, key: &ObjectPath) -> Result<()> {
        match self.rt.block_on(self.store.inner.delete(key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(
                format!("{}/{key}", self.uri.split("://").next().unwrap_or("")),
                e.to_string(),
            )),
        }
    }

    /// Every object under the folder `rel` ("" = the whole store), at any depth.
    pub fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = self.key(rel);
        self.rt
            .block_on(self.store.inner.list(Some(&prefix)).try_collect())
            .map_err(|e| self.err(rel, e))
    }

    /// Whether any object lies under the folder `rel` (one list request).
    pub fn any_under(&self, rel: &str) -> Result<bool> {
        let prefix = self.key(rel);
        self.rt.block_on(async {
            match self.store.inner.list(Some(&prefix)).next().await {
                None => Ok(false),
                Some(Ok(_)) => Ok(true),
                Some(Err(e)) => Err(self.err(rel, e)),
            }
        })
    }

    /// The file name of an object listed by [`Remote::list`] (percent-decoded as it was given).
    pub fn file_name(meta: &ObjectMeta) -> Option<String> {
        meta.location.parts().next_back().map(|p| {
            let raw = p.as_ref().to_string();
            percent_decode(&raw)
        })
    }

    /// Whether the endpoint honours conditional writes: a second create of an object must fail, and so must
    /// an update naming an e-tag the object does not have. Probed once per store (4 small requests under
    /// `_sprint/`); an endpoint that rejects them as unimplemented counts as not honouring them.
    pub fn conditional_writes(&self) -> Result<bool> {
        if let Some(&known) = self.conditional.get() {
            return Ok(known);
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let rel = format!(
            "_sprint/.probe-{}-{}-{nanos:x}",
            hostname_hint(),
            std::process::id()
        );
        let unsupported = |r: &object_store::Result<()>| {
            matches!(
                r,
                Err(object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. })
            )
        };
        let first = self
            .rt
            .block_on(self.put(&rel, b"probe".to_vec(), PutMode::Create));
        if unsupported(&first) {
            let _ = self.conditional.set(false);
            return Ok(false);
        }
        first.map_err(|e| self.err(&rel, e))?;
        let second = self
            .rt
            .block_on(self.put(&rel, b"probe 2".to_vec(), PutMode::Create));
        let stale = UpdateVersion {
            e_tag: Some("\"0123456789abcdef0123456789abcdef\"".into()),
            version: None,
        };
        let third = self
            .rt
            .block_on(self.put(&rel, b"probe 3".to_vec(), PutMode::Update(stale)));
        self.delete(&rel)?;
        let ok = match (&second, &third) {
            (
                Err(object_store::Error::AlreadyExists { .. }),
                Err(object_store::Error::Precondition { .. }),
            ) => true,
            (Err(e), _) | (_, Err(e))
                if !(unsupported(&second)
                    || unsupported(&third)
                    || second.is_ok()
                    || third.is_ok()) =>
            {
                return Err(Error::store(
                    self.display(&rel),
                    format!("probing conditional writes: {e}"),
                ))
            }
            _ => false,
        };
        let _ = self.conditional.set(ok);
        Ok(ok)
    }
}

/// The bookkeeping files of one store (`_sprint/…`, paths relative to the store), on a local folder or an
/// object store, with the three writes the leases and shard records need:
///
/// | operation | local folder | object store |
/// |---|---|---|
/// | [`Files::create`] (only if absent) | complete temporary file hard-linked to the name | `If-None-Match: *` |
/// | [`Files::replace`] (only if unchanged since read) | compare, then rename over (atomic replace) | `If-Match: <e-tag>` |
/// | [`Files::take_over`] (one racing caller wins) | rename away, compare, create | `If-Match: <e-tag>` |
///
/// Locally `replace` compares and renames in two steps: two processes replacing the same file at the same
/// moment could both succeed. The leases only replace their own file (renewals), so this cannot happen there;
/// taking over another worker's file goes through `take_over`, which is exclusive on both back ends.
#[derive(Clone, Debug)]
pub enum Files {
    Local(PathBuf),
    Remote(Arc<Remote>),
}

/// A file read through [`Files::get`]: its bytes, when it was written, and what a conditional write compares.
#[derive(Debug, Clone)]
pub struct Read {
    pub bytes: Vec<u8>,
    pub modified_unix_ms: i64,
    version: Option<UpdateVersion>,
}

impl Files {
    /// The files of the store at `store` (a folder or a URI).
    pub fn of_store(store: &Path) -> Result<Files> {
        Ok(match remote(store)? {
            None => Files::Local(store.to_path_buf()),
            Some(r) => Files::Remote(r),
        })
    }

    /// `<store>/<rel>`, for messages.
    pub fn display(&self, rel: &str) -> PathBuf {
        match self {
            Files::Local(root) => root.join(rel),
            Files::Remote(r) => r.display(rel),
        }
    }

    /// The file `rel`, or `None` when absent.
    pub fn get(&self, rel: &str) -> Result<Option<Read>> {
        match self {
            Files::Local(root) => {
                let path = root.join(rel);
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        let modified_unix_ms = std::fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_millis() as i64);
                        Ok(Some(Read {
                            bytes,
                            modified_unix_ms,
                            version: None,
                        }))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io(&path, e)),
                }
            }
            Files::Remote(r) => Ok(r.get(rel)?.map(|o| Read {
                bytes: o.bytes,
                modified_unix_ms: o.modified_unix_ms,
                version: Some(o.version),
            })),
        }
    }

    /// Writes `rel` only if it does not exist; false when it does.
    pub fn create(&self, rel: &str, bytes: &[u8]) -> Result<bool> {
        match self {
            Files::Local(root) => {
                let path = root.join(rel);
                let tmp = local_tmp(&path, "tmp")?;
                write_file(&tmp, bytes)?;
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(Error::io(&path, e)),
                }
            }
            Files::Remote(r) => r.create(rel, bytes.to_vec()),
        }
    }

    /// Replaces `rel` with `bytes` if it still holds what `read` saw; false when it changed or vanished.
    pub fn replace(&self, rel: &str, bytes: &[u8], read: &Read) -> Result<bool> {
        match self {
            Files::Local(root) => {
                let path = root.join(rel);
                match std::fs::read(&path) {
                    Ok(now) if now == read.bytes => {}
                    Ok(_) => return Ok(false),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(Error::io(&path, e)),
                }
                let tmp = local_tmp(&path, "tmp")?;
                write_file(&tmp, bytes)?;
                std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
                Ok(true)
            }
            Files::Remote(r) => match &read.version {
                Some(v) => r.update(rel, bytes.to_vec(), v),
                None => Ok(false),
            },
        }
    }

    /// Replaces `rel` (read as `read`) with `bytes` so that exactly one of several callers racing on the same
    /// `read` succeeds; false for the others, and when the file changed since `read`.
    pub fn take_over(&self, rel: &str, bytes: &[u8], read: &Read) -> Result<bool> {
        match self {
            Files::Local(root) => {
                let path = root.join(rel);
                let stale = local_tmp(&path, "stale")?;
                let _ = std::fs::remove_file(&stale);
                match std::fs::rename(&path, &stale) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(Error::io(&path, e)),
                }
                let moved = std::fs::read(&stale).map_err(|e| Error::io(&stale, e))?;
                if moved != read.bytes {
                    // changed between our read and our rename: put it back (unless a new file appeared)
                    let _ = std::fs::hard_link(&stale, &path);
                    let _ = std::fs::remove_file(&stale);
                    return Ok(false);
                }
                let _ = std::fs::remove_file(&stale);
                self.create(rel, bytes)
            }
            Files::Remote(r) => match &read.version {
                Some(v) => r.update(rel, bytes.to_vec(), v),
                None => Ok(false),
            },
        }
    }

    /// Deletes `rel` (nothing when absent).
    pub fn delete(&self, rel: &str) -> Result<()> {
        match self {
            Files::Local(root) => {
                let path = root.join(rel);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(Error::io(&path, e)),
                }
            }
            Files::Remote(r) => r.delete(rel),
        }
    }

    /// The names of the files directly in the folder `rel` (none when it does not exist), sorted; hidden
    /// names (temporary files) left out.
    pub fn names(&self, rel: &str) -> Result<Vec<String>> {
        let mut out = match self {
            Files::Local(root) => {
                let dir = root.join(rel);
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(Error::io(&dir, e)),
                };
                let mut names = Vec::new();
                for e in entries {
                    let e = e.map_err(|e| Error::io(&dir, e))?;
                    if e.file_type()
                        .map_err(|err| Error::io(e.path(), err))?
                        .is_file()
                    {
                        names.push(e.file_name().to_string_lossy().into_owned());
                    }
                }
                names
            }
            Files::Remote(r) => {
                let depth = r.key(rel).parts().count() + 1;
                r.list(rel)?
                    .iter()
                    .filter(|m| m.location.parts().count() == depth)
                    .filter_map(Remote::file_name)
                    .collect()
            }
        };
        out.retain(|n| !n.starts_with('.'));
        out.sort();
        Ok(out)
    }
}

/// A hidden scratch name next to `path` unique to this process and call (`.<name>.<pid>.<seq>.<what>`), its
/// folder created.
fn local_tmp(path: &Path, what: &str) -> Result<PathBuf> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().expect("a store file has a folder");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(dir.join(format!(".{name}.{}.{seq}.{what}", std::process::id())))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// The object store and key of an object URI (`s3://bucket/run.report.json`), on a small runtime.
fn object_at(path: &Path) -> Result<(tokio::runtime::Runtime, Arc<ObjectStore>, ObjectPath)> {
    let uri = path.to_string_lossy().into_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))?;
    let (store, key) = rt
        .block_on(ObjectStore::from_uri_and_params(
            Arc::new(ObjectStoreRegistry::default()),
            &uri,
            &ObjectStoreParams::default(),
        ))
        .map_err(|e| open_error(&uri, e))?;
    Ok((rt, store, key))
}

/// Reads a whole file: a local path or an object URI.
pub fn read_whole(path: &Path) -> Result<Vec<u8>> {
    if !is_remote(path) {
        return std::fs::read(path).map_err(|e| Error::io(path, e));
    }
    check_scheme(path)?;
    let (rt, store, key) = object_at(path)?;
    rt.block_on(async {
        let got = store.inner.get(&key).await?;
        got.bytes().await
    })
    .map(|b| b.to_vec())
    .map_err(|e| Error::store(path, e.to_string()))
}

/// Writes a whole file at `path`: a local path, or an object named by a URI (`s3://bucket/run.report.json`,
/// with the same credentials as the stores).
pub fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    if !is_remote(path) {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        return std::fs::write(path, bytes).map_err(|e| Error::io(path, e));
    }
    check_scheme(path)?;
    let (rt, store, key) = object_at(path)?;
    rt.block_on(store.inner.put(&key, PutPayload::from(bytes.to_vec())))
        .map(|_| ())
        .map_err(|e| Error::store(path, e.to_string()))
}

/// Lance could not open the object store of `uri`: its reason, and where the settings come from.
fn open_error(uri: &str, e: lance::Error) -> Error {
    let scheme = uri.split("://").next().unwrap_or("");
    Error::store(
        uri,
        format!(
            "cannot open the object store: {e} ({})",
            settings_hint(scheme)
        ),
    )
}

fn hostname_hint() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| {
            s.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .filter(|s: &String| !s.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// Undoes object_store's percent-encoding of a path part (`%23` → `#`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_paths() {
        for remote in [
            "s3://bucket/x.lance",
            "gs://b/p/x.lance",
            "az://c/x",
            "file:///tmp/x",
        ] {
            assert!(is_remote(Path::new(remote)), "{remote}");
        }
        for local in ["x.lance", "/data/x.lance", "./s3:/x", "weird name://x", ""] {
            assert!(!is_remote(Path::new(local)), "{local}");
        }
        assert_eq!(percent_decode("a%23b%2"), "a#b%2");
        assert_eq!(
            percent_decode("train_000.parquet%230-2.json"),
            "train_000.parquet#0-2.json"
        );
    }

    #[test]
    fn a_scheme_not_built_in_is_refused_naming_the_feature() {
        // this build: what its Lance registers
        for ok in [
            "x.lance",
            "/data/x.lance",
            "s3://b/x.lance",
            "memory://x",
            "file:///tmp/x",
        ] {
            check_scheme(Path::new(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let az = check_scheme(Path::new("az://c/x.lance"));
        if cfg!(feature = "azure") {
            az.unwrap();
        } else {
            let msg = az.unwrap_err().to_string();
            assert!(
                msg.contains(
                    "az:// stores (Azure Blob Storage) need a build with `--features azure`"
                ),
                "{msg}"
            );
        }
        let gs = check_scheme(Path::new("gs://b/x.lance"))
            .unwrap_err()
            .to_string();
        assert!(
            gs.starts_with(
                "latent store gs://b/x.lance: gs:// stores (Google Cloud Storage) are not offered"
            ),
            "{gs}"
        );
        // a remote store, a report URI and Lance's dataset URI all go through the check
        assert!(remote(Path::new("gs://b/x.lance"))
            .unwrap_err()
            .to_string()
            .contains("not offered"));
        assert!(read_whole(Path::new("gs://b/r.json"))
            .unwrap_err()
            .to_string()
            .contains("not offered"));

        // the messages whatever this build has: one with only s3, one with az too
        let s3_only = |s: &str| s == "s3";
        let with_az = |s: &str| s == "s3" || s == "az";
        let msg = refusal("az", s3_only).unwrap();
        assert!(
            msg.contains("`--features azure`")
                && msg.ends_with("opens local folders, s3:// stores"),
            "{msg}"
        );
        assert_eq!(refusal("az", with_az), None);
        let msg = refusal("abfss", with_az).unwrap();
        assert!(msg.contains("`--features azure`"), "{msg}");
        let msg = refusal("gs", with_az).unwrap();
        assert!(
            msg.contains("not offered")
                && msg.ends_with("opens local folders, s3://, az:// stores"),
            "{msg}"
        );
        let msg = refusal("hf", s3_only).unwrap();
        assert_eq!(
            msg,
            "hf:// stores are not supported: this build opens local folders, s3:// stores"
        );
        assert!(settings_hint("az").contains("AZURE_STORAGE_ACCOUNT_NAME"));
        assert!(settings_hint("s3").contains("AWS_ACCESS_KEY_ID"));
    }
}
