//! Resolve a model or dataset: local folder | HF cache | download (only when online and allowed).
//!
//! The cache layout is the standard Hugging Face one (`<cache>/models--org--name/refs/main` holds a commit,
//! `<cache>/models--org--name/snapshots/<commit>/...` holds the files), so folders downloaded by
//! `huggingface-cli` or Python are found as they are.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

use crate::error::{Error, Result};

/// Where to look for cached files and whether the network may be used.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub revision: String,
}

impl HubConfig {
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; offline when `HF_HUB_OFFLINE`
    /// is set to a true value.
    pub fn from_env() -> Self {
        let cache_dir = if let Some(c) = std::env::var_os("HF_HUB_CACHE") {
            PathBuf::from(c)
        } else if let Some(h) = std::env::var_os("HF_HOME") {
            PathBuf::from(h).join("hub")
        } else {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache/huggingface/hub")
        };
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self {
            cache_dir,
            offline,
            revision: "main".to_string(),
        }
    }

    fn repo(&self, id: &str, kind: RepoType) -> Repo {
        Repo::with_revision(id.to_string(), kind, self.revision.clone())
    }

    /// The snapshot folder of a cached repo, if the cache has one for our revision.
    fn snapshot(&self, id: &str, kind: RepoType) -> Option<PathBuf> {
        let repo_dir = self.cache_dir.join(self.repo(id, kind).folder_name());
        let commit = std::fs::read_to_string(repo_dir.join("refs").join(&self.revision)).ok()?;
        let snap = repo_dir.join("snapshots").join(commit.trim());
        snap.is_dir().then_some(snap)
    }

    fn api(&self) -> Result<hf_hub::api::sync::Api> {
        hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(self.cache_dir.clone()))
            .with_progress(true)
            .build()
            .map_err(|e| Error::Arg(format!("cannot start the Hugging Face hub client: {e}")))
    }
}

/// A resolved model folder and a human-readable statement of where it came from.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub root: PathBuf,
    pub origin: String,
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// Resolves `--pretrained_model_name_or_path`: a local diffusers pipeline folder, or a hub id found in the
/// HF cache, or (online only) downloaded. `subfolders` are the components that must be present
/// (e.g. `["vae", "text_encoder", "tokenizer"]`); only their files are downloaded.
pub fn resolve_model(
    name_or_path: &str,
    subfolders: &[&str],
    hub: &HubConfig,
) -> Result<ModelSource> {
    let local = Path::new(name_or_path);
    if local.is_dir() {
        check_pipeline(local, subfolders)?;
        return Ok(ModelSource {
            root: local.to_path_buf(),
            origin: format!("local:{}", canonical(local).display()),
        });
    }
    if !looks_like_repo_id(name_or_path) {
        return Err(Error::Missing {
            what: "model folder".into(),
            path: local.to_path_buf(),
            hint: "pass a local diffusers pipeline folder, or a hub id like Efficient-Large-Model/SANA_Sprint_1.6B_1024px_teacher_diffusers".into(),
        });
    }
    if let Some(snap) = hub.snapshot(name_or_path, RepoType::Model) {
        if subfolders.iter().all(|s| snap.join(s).is_dir()) {
            check_pipeline(&snap, subfolders)?;
            return Ok(ModelSource {
                origin: format!("hf-cache:{name_or_path}@{}", snapshot_commit(&snap)),
                root: snap,
            });
        }
    }
    if hub.offline {
        return Err(Error::Missing {
            what: format!("model {name_or_path} (not a local folder, not in the HF cache, and HF_HUB_OFFLINE is set)"),
            path: hub.cache_dir.clone(),
            hint: format!(
                "download it first: huggingface-cli download {name_or_path} --local-dir <dir>, then pass <dir>; or unset HF_HUB_OFFLINE"
            ),
        });
    }
    let api = hub.api()?;
    let repo = api.repo(hub.repo(name_or_path, RepoType::Model));
    let info = repo.info().map_err(|e| Error::Missing {
        what: format!("model {name_or_path} on the hub ({e})"),
        path: hub.cache_dir.clone(),
        hint: "check the id and your network, or download the folder and pass its path".into(),
    })?;
    let mut root = None;
    for s in &info.siblings {
        let wanted = s.rfilename == "model_index.json"
            || subfolders
                .iter()
                .any(|sub| s.rfilename.starts_with(&format!("{sub}/")));
        if wanted {
            let p = repo.get(&s.rfilename).map_err(|e| Error::Missing {
                what: format!("{} of {name_or_path} ({e})", s.rfilename),
                path: hub.cache_dir.clone(),
                hint: "the download failed; retry, or download the folder with huggingface-cli"
                    .into(),
            })?;
            if s.rfilename == "model_index.json" {
                root = p.parent().map(Path::to_path_buf);
            }
        }
    }
    let root = root
        .or_else(|| hub.snapshot(name_or_path, RepoType::Model))
        .ok_or_else(|| {
            Error::model(
                name_or_path,
                "the hub repo has no model_index.json: not a diffusers pipeline",
            )
        })?;
    check_pipeline(&root, subfolders)?;
    Ok(ModelSource {
        origin: format!("hub:{name_or_path}@{}", info.sha),
        root,
    })
}

fn snapshot_commit(snap: &Path) -> String {
    snap.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Every required component folder exists and has a config (the tokenizer has tokenizer.json).
pub fn check_components(root: &Path, subfolders: &[&str]) -> Result<()> {
    for sub in subfolders {
        let dir = root.join(sub);
        if !dir.is_dir() {
            return Err(Error::Missing {
                what: format!("`{sub}/` folder of the model"),
                path: dir.clone(),
                hint: format!(
                    "{} is not a complete diffusers pipeline folder (it needs {}); download the full pipeline \
                     ({})",
                    root.display(),
                    subfolders.join(", "),
                    download_folder_command(&dir)
                ),
            });
        }
        let needed = if *sub == "tokenizer" {
            "tokenizer.json"
        } else {
            "config.json"
        };
        let path = dir.join(needed);
        if !path.is_file() {
            return Err(Error::Missing {
                what: format!("{sub}/{needed}"),
                hint: format!(
                    "the model folder is incomplete; download it: {}",
                    download_command(&path)
                ),
                path,
            });
        }
    }
    Ok(())
}

/// Checks the named components of a pipeline folder before anything is loaded or written, cheaply (configs
/// parsed, safetensors headers read and compared with the file sizes, the tokenizer read; no tensor data is
/// read): each must exist, parse and be complete. `transformer`, `vae` and `text_encoder` have their config and
/// weights checked (single file or every shard of a sharded index; float dtypes), `tokenizer` its files; with
/// both `tokenizer` and `text_encoder`, every token id must have a row in the text encoder's embedding. Other
/// names (`scheduler`) only need their folder. The first problem found is returned, naming the file and how to
/// get it again.
pub fn check_pipeline(root: &Path, components: &[&str]) -> Result<()> {
    use crate::models::{
        dcae::DcaeConfig, gemma2::Gemma2Encoder, sana::SanaConfig, weights::Weights,
    };
    check_components(root, components)?;
    let mut text_rows = None;
    for sub in components {
        let dir = root.join(sub);
        match *sub {
            "transformer" => {
                let config = SanaConfig::from_folder(&dir)?;
                config
                    .validate()
                    .map_err(|msg| Error::model(dir.join("config.json"), msg))?;
                Weights::from_folder(&dir, &["diffusion_pytorch_model"])?;
            }
            "vae" => {
                DcaeConfig::from_file(&dir.join("config.json"))?;
                Weights::from_folder(&dir, &["diffusion_pytorch_model"])?;
            }
            "text_encoder" => {
                let (config, _weights) = Gemma2Encoder::open(&dir)?;
                text_rows = Some(config.vocab_size);
            }
            _ => {}
        }
    }
    if components.contains(&"tokenizer") {
        let tokenizer = crate::text::load_tokenizer(&root.join("tokenizer"))?;
        crate::text::pad_token_id(&tokenizer, &root.join("tokenizer"))?;
        if let Some(rows) = text_rows {
            crate::text::check_vocab_fits(&tokenizer, root, rows)?;
        }
    }
    Ok(())
}

/// The `hf download` command that fetches the file `path` of a model again: from the repo and revision of the
/// Hugging Face cache snapshot it lies in, else into the local pipeline folder it belongs to (the nearest
/// folder above it with `model_index.json`, else the folder above its component folder), whose repo id is not
/// recorded there and is left as `<repo-id>`.
pub fn download_command(path: &Path) -> String {
    download(path, false)
}

/// [`download_command`] for a whole folder of a model (e.g. `text_encoder/`).
pub fn download_folder_command(dir: &Path) -> String {
    download(dir, true)
}

fn download(path: &Path, folder: bool) -> String {
    let what = |rel: &Path| {
        if folder {
            format!("--include '{}/*'", rel.display())
        } else {
            rel.display().to_string()
        }
    };
    // <cache>/models--org--name/snapshots/<commit>/<rel>
    let parts: Vec<&std::ffi::OsStr> = path.iter().collect();
    if let Some(i) = parts.iter().rposition(|p| *p == "snapshots") {
        let repo = i
            .checked_sub(1)
            .and_then(|r| parts[r].to_str())
            .and_then(|r| r.strip_prefix("models--"))
            .map(|r| r.replace("--", "/"));
        if let (Some(repo), Some(commit)) = (repo, parts.get(i + 1)) {
            let rel: PathBuf = parts[i + 2..].iter().collect();
            return format!(
                "hf download {repo} {} --revision {} --force-download",
                what(&rel),
                commit.to_string_lossy()
            );
        }
    }
    let component = if folder {
        path
    } else {
        path.parent().unwrap_or(path)
    };
    let root = path
        .ancestors()
        .skip(1)
        .take(3)
        .find(|a| a.join("model_index.json").is_file())
        .or_else(|| component.parent())
        .unwrap_or(Path::new(""));
    let rel = path.strip_prefix(root).unwrap_or(path);
    let root = if root.as_os_str().is_empty() {
        Path::new(".")
    } else {
        root
    };
    format!(
        "hf download <repo-id> {} --local-dir {} --force-download (<repo-id>: the hub repo of this pipeline, e.g. \
         Efficient-Large-Model/SANA_Sprint_1.6B_1024px_teacher_diffusers), or check the folder",
        what(rel),
        root.display()
    )
}

/// Resolves `--file_path` entries (globs allowed) to local parquet files, in the order given (matches of one
/// glob sorted by name). Relative paths are looked up locally first, then inside the dataset repo
/// `dataset_name` (HF cache, then download when online).
pub fn resolve_data_files(
    dataset_name: Option<&str>,
    file_paths: &[String],
    hub: &HubConfig,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for fp in file_paths {
        let local = expand_local(fp)?;
        if !local.is_empty() {
            out.extend(local);
            continue;
        }
        let Some(ds) = dataset_name else {
            return Err(Error::Missing {
                what: "data file".into(),
                path: PathBuf::from(fp),
                hint: "no local file matches; pass an existing path, or --dataset_name to find it in a hub dataset".into(),
            });
        };
        out.extend(resolve_in_dataset(ds, fp, hub)?);
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(canonical(p)));
    Ok(out)
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn expand_local(fp: &str) -> Result<Vec<PathBuf>> {
    if !is_glob(fp) {
        let p = PathBuf::from(fp);
        return Ok(if p.is_file() { vec![p] } else { vec![] });
    }
    let mut v: Vec<PathBuf> = glob::glob(fp)
        .map_err(|e| Error::Arg(format!("bad glob pattern {fp:?}: {e}")))?
        .filter_map(|r| r.ok())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    Ok(v)
}

fn resolve_in_dataset(ds: &str, fp: &str, hub: &HubConfig) -> Result<Vec<PathBuf>> {
    if let Some(snap) = hub.snapshot(ds, RepoType::Dataset) {
        let found = expand_local(&snap.join(fp).to_string_lossy())?;
        if !found.is_empty() {
            return Ok(found);
        }
    }
    if hub.offline {
        return Err(Error::Missing {
            what: format!("{fp} of dataset {ds} (not local, not in the HF cache, and HF_HUB_OFFLINE is set)"),
            path: hub.cache_dir.clone(),
            hint: format!(
                "download it first: huggingface-cli download {ds} {fp} --repo-type dataset --local-dir <dir>, then pass <dir>/{fp}"
            ),
        });
    }
    let api = hub.api()?;
    let repo = api.repo(hub.repo(ds, RepoType::Dataset));
    let names: Vec<String> = if is_glob(fp) {
        let pat = glob::Pattern::new(fp)
            .map_err(|e| Error::Arg(format!("bad glob pattern {fp:?}: {e}")))?;
        let info = repo.info().map_err(|e| Error::Missing {
            what: format!("dataset {ds} on the hub ({e})"),
            path: hub.cache_dir.clone(),
            hint: "check the dataset name and your network".into(),
        })?;
        let mut v: Vec<String> = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|n| pat.matches(n))
            .collect();
        v.sort();
        v
    } else {
        vec![fp.to_string()]
    };
    if names.is_empty() {
        return Err(Error::Missing {
            what: format!("files matching {fp} in dataset {ds}"),
            path: PathBuf::from(fp),
            hint: "check the pattern against the dataset's file list".into(),
        });
    }
    names
        .iter()
        .map(|n| {
            repo.get(n).map_err(|e| Error::Missing {
                what: format!("{n} of dataset {ds} ({e})"),
                path: PathBuf::from(n),
                hint: "the download failed; retry, or download it with huggingface-cli".into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_cache(root: &Path, kind: &str, id: &str, files: &[&str]) -> PathBuf {
        let repo = root.join(format!("{kind}--{}", id.replace('/', "--")));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let snap = repo.join("snapshots/abc123");
        for f in files {
            let p = snap.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            // the tiny pipeline's file of that name (resolution checks the components), else a stub
            match std::fs::read(tiny().join(f)) {
                Ok(bytes) => std::fs::write(p, bytes).unwrap(),
                Err(_) => std::fs::write(p, "{}").unwrap(),
            }
        }
        snap
    }

    fn tiny() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint")
    }

    fn offline(cache: &Path) -> HubConfig {
        HubConfig {
            cache_dir: cache.to_path_buf(),
            offline: true,
            revision: "main".into(),
        }
    }

    #[test]
    fn local_folder_wins_and_missing_component_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("vae")).unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(tiny().join("vae").join(f), d.path().join("vae").join(f)).unwrap();
        }
        let hub = offline(d.path());
        let src = resolve_model(d.path().to_str().unwrap(), &["vae"], &hub).unwrap();
        assert_eq!(src.root, d.path());
        let err =
            resolve_model(d.path().to_str().unwrap(), &["vae", "text_encoder"], &hub).unwrap_err();
        assert!(err.to_string().contains("`text_encoder/` folder"), "{err}");
    }

    #[test]
    fn hf_cache_layout_is_found_offline() {
        let d = tempfile::tempdir().unwrap();
        let snap = fake_cache(
            d.path(),
            "models",
            "org/pipe",
            &[
                "model_index.json",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "tokenizer/tokenizer.json",
            ],
        );
        let src = resolve_model("org/pipe", &["vae", "tokenizer"], &offline(d.path())).unwrap();
        assert_eq!(src.root, snap);
        assert!(src.origin.contains("abc123"));
        let err = resolve_model("org/other", &["vae"], &offline(d.path())).unwrap_err();
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn dataset_files_resolve_local_then_cache_with_globs() {
        let d = tempfile::tempdir().unwrap();
        let snap = fake_cache(
            d.path(),
            "datasets",
            "org/data",
            &[
                "data/train_000.parquet",
                "data/train_001.parquet",
                "data/test.parquet",
            ],
        );
        let hub = offline(d.path());
        let got =
            resolve_data_files(Some("org/data"), &["data/train_00*.parquet".into()], &hub).unwrap();
        assert_eq!(
            got,
            vec![
                snap.join("data/train_000.parquet"),
                snap.join("data/train_001.parquet")
            ]
        );
        let local = snap.join("data/test.parquet");
        let got = resolve_data_files(None, &[local.to_string_lossy().into_owned()], &hub).unwrap();
        assert_eq!(got, vec![local]);
        let err =
            resolve_data_files(Some("org/data"), &["data/nope.parquet".into()], &hub).unwrap_err();
        assert!(
            err.to_string().contains("huggingface-cli download"),
            "{err}"
        );
        let err = resolve_data_files(None, &["nope.parquet".into()], &hub).unwrap_err();
        assert!(err.to_string().contains("--dataset_name"), "{err}");
    }
}
