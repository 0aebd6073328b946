//! Safetensors checkpoints (single file or sharded with `*.index.json`) exposed as a candle `VarBuilder`.
//!
//! Tensors are memory-mapped, converted to the requested dtype on load, and every failure names the key and
//! the file it came from. An optional key prefix (e.g. `model.` in a `Gemma2ForCausalLM` checkpoint) is
//! stripped so that models can ask for their canonical names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

pub struct Weights {
    files: Vec<PathBuf>,
    mmaps: Vec<memmap2::Mmap>,
    /// Per file: where the data starts and each tensor's dtype/shape/offsets (the header is parsed once).
    headers: Vec<(usize, HashMap<String, safetensors::tensor::TensorInfo>)>,
    /// canonical key -> (file index, stored key)
    index: HashMap<String, (usize, String)>,
}

/// The dtypes weights may be stored in: floats, converted to the compute dtype on load as PyTorch's
/// `load_state_dict` does. Integer, boolean and 8-bit float tensors mean a quantised export (they need scales
/// this loader does not apply) or a damaged file, and are refused.
pub fn is_float_weight(dtype: safetensors::Dtype) -> bool {
    use safetensors::Dtype;
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// PyTorch's integer buffers, stored next to the weights in real checkpoints and never read as weights:
/// BatchNorm's `num_batches_tracked` (I64) and the `position_ids` of older transformers checkpoints.
pub fn is_integer_buffer(name: &str) -> bool {
    name.ends_with("num_batches_tracked") || name.ends_with("position_ids")
}

/// The largest header `safetensors` accepts (100 MB): a larger length field means the file is not one.
const MAX_HEADER: u64 = 100_000_000;

/// Memory-maps a safetensors file and reads its header, checking (from the header and the file size alone, no
/// tensor data is read) that the file is complete: every failure says how the file is damaged and how to get
/// it again.
fn open_safetensors(
    path: &Path,
) -> Result<(
    memmap2::Mmap,
    usize,
    HashMap<String, safetensors::tensor::TensorInfo>,
)> {
    let bad = |what: String| {
        Error::model(
            path,
            format!(
                "{what}; download it again: {}",
                crate::hub::download_command(path)
            ),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(bad(format!(
            "truncated: the file is {len} bytes, too short for the 8-byte header length of a safetensors file"
        )));
    }
    // SAFETY: the file is opened read-only; a concurrent writer would be a user error we cannot prevent.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    if mmap.starts_with(b"version https://git-lfs") {
        return Err(Error::model(
            path,
            format!(
                "this is a Git LFS pointer, not the weights: the folder was cloned without git-lfs; run `git lfs \
                 pull` in the clone, or download the file: {}",
                crate::hub::download_command(path)
            ),
        ));
    }
    let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
    if !(2..=MAX_HEADER).contains(&n) {
        return Err(bad(format!(
            "not a safetensors file: its first 8 bytes give a header length of {n} (an HTML error page or \
             another format saved under this name, or a corrupt file)"
        )));
    }
    if 8 + n > len {
        return Err(bad(format!(
            "truncated inside its header: the header is {n} bytes but the file ends {} bytes after the \
             header length (the file is {len} bytes)",
            len - 8
        )));
    }
    match safetensors::SafeTensors::read_metadata(&mmap) {
        Ok((n, meta)) => {
            let infos = meta
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect();
            Ok((mmap, 8 + n, infos))
        }
        Err(safetensors::SafeTensorError::MetadataIncompleteBuffer) => {
            // the header is valid; its offsets and the file size disagree
            let expected = 8 + n + declared_data_len(&mmap[8..8 + n as usize]).unwrap_or(0);
            if len < expected {
                Err(bad(format!(
                    "truncated: the file is {len} bytes, its header describes {expected} ({:.1}% present; \
                     the download or copy stopped early)",
                    100.0 * len as f64 / expected as f64
                )))
            } else {
                Err(bad(format!(
                    "corrupt: the file is {len} bytes, {} more than its header describes ({expected})",
                    len - expected
                )))
            }
        }
        Err(e) => Err(bad(format!("corrupt header ({e})"))),
    }
}

/// The end of the last tensor's bytes that a (valid JSON) safetensors header declares.
fn declared_data_len(header: &[u8]) -> Option<u64> {
    let json: serde_json::Value = serde_json::from_slice(header).ok()?;
    json.as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
}

impl Weights {
    /// Opens the safetensors weights of a model folder: `<stem>.safetensors`, or the shards listed in
    /// `<stem>.safetensors.index.json` (the first stem that has either). Other files are not read: a folder
    /// with only a `variant` (`<stem>.fp16.safetensors`, …) is refused, naming the file to download. Every
    /// tensor but PyTorch's integer buffers must be stored as a float ([`Self::check_float`]).
    pub fn from_folder(dir: &Path, stems: &[&str]) -> Result<Self> {
        for stem in stems {
            let single = dir.join(format!("{stem}.safetensors"));
            let index = dir.join(format!("{stem}.safetensors.index.json"));
            for path in [&single, &index] {
                if path.is_symlink() && !path.exists() {
                    return Err(Error::Missing {
                        what: "weights (a broken link: the file it points to is gone)".into(),
                        path: path.clone(),
                        hint: format!(
                            "an interrupted or cleaned-up Hugging Face cache download; download it again: {}",
                            crate::hub::download_command(path)
                        ),
                    });
                }
            }
            let weights = if single.is_file() {
                Self::from_files(&[single])?
            } else if index.is_file() {
                Self::from_index(&index)?
            } else {
                continue;
            };
            weights.check_float()?;
            return Ok(weights);
        }
        let expected = dir.join(format!(
            "{}.safetensors",
            stems.first().copied().unwrap_or("model")
        ));
        let mut others: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors") || n.contains(".safetensors.index"))
            .collect();
        others.sort();
        let names = stems
            .iter()
            .map(|s| format!("{s}.safetensors"))
            .collect::<Vec<_>>()
            .join(" or ");
        let get = crate::hub::download_command(&expected);
        let hint = if others.is_empty() {
            format!(
                "the folder holds no weights: expected {names} (or a sharded {}.safetensors.index.json); \
                 download them: {get}",
                stems.first().copied().unwrap_or("model")
            )
        } else {
            format!(
                "the folder holds only {} — a `variant` of the weights (e.g. fp16), which is not loaded; \
                 download the default weights: {get}",
                others.join(", ")
            )
        };
        Err(Error::Missing {
            what: "weights file".into(),
            path: expected,
            hint,
        })
    }

    /// Opens the shards named by a `*.safetensors.index.json` (`{"weight_map": {key: file}}`): every shard must
    /// exist and hold the tensors the index assigns to it.
    pub fn from_index(index: &Path) -> Result<Self> {
        let again = || {
            format!(
                "download the folder again: {}",
                crate::hub::download_folder_command(index.parent().unwrap_or(Path::new(".")))
            )
        };
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::model(
                index,
                format!("invalid index json ({e}): the file is damaged; {}", again()),
            )
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::model(
                    index,
                    format!("index json has no \"weight_map\" object; {}", again()),
                )
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut assigned: Vec<(String, String)> = Vec::with_capacity(map.len());
        for (key, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::model(
                    index,
                    format!("weight_map entry \"{key}\" is not a file name; {}", again()),
                )
            })?;
            assigned.push((key.clone(), file.to_string()));
        }
        let mut names: Vec<&str> = assigned.iter().map(|(_, f)| f.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let files: Vec<PathBuf> = names.iter().map(|f| dir.join(f)).collect();
        for (name, f) in names.iter().zip(&files) {
            if !f.is_file() {
                let count = assigned.iter().filter(|(_, g)| g == name).count();
                return Err(Error::Missing {
                    what: format!(
                        "weight shard {name} (one of the {} shards {} lists; it holds {count} tensors)",
                        names.len(),
                        index.display()
                    ),
                    path: f.clone(),
                    hint: format!(
                        "the download is incomplete; download the shard: {}",
                        crate::hub::download_command(f)
                    ),
                });
            }
        }
        let mut weights = Self::from_files(&files)?;
        // the index decides which shard serves a key; every shard must hold what the index gives it
        for (key, name) in &assigned {
            let i = names.binary_search(&name.as_str()).expect("listed above");
            if !weights.headers[i].1.contains_key(key) {
                let found: Vec<&str> = names
                    .iter()
                    .zip(&weights.headers)
                    .filter(|(_, h)| h.1.contains_key(key))
                    .map(|(n, _)| *n)
                    .collect();
                let elsewhere = if found.is_empty() {
                    "no shard holds it".to_string()
                } else {
                    format!("it is in {}", found.join(", "))
                };
                return Err(Error::model(
                    index,
                    format!(
                        "the index maps tensor \"{key}\" to {name}, which does not hold it ({elsewhere}): the \
                         index and the shards come from different downloads or revisions; {}",
                        again()
                    ),
                ));
            }
            weights.index.insert(key.clone(), (i, key.clone()));
        }
        Ok(weights)
    }

    /// Opens safetensors files (their headers are read and checked against the file sizes; no tensor data is
    /// read until a tensor is loaded). A key in several files is served by the last one.
    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        let mut mmaps = Vec::with_capacity(files.len());
        let mut headers = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let (mmap, start, infos) = open_safetensors(path)?;
            for name in infos.keys() {
                index.insert(name.clone(), (i, name.clone()));
            }
            headers.push((start, infos));
            mmaps.push(mmap);
        }
        Ok(Self {
            files: files.to_vec(),
            mmaps,
            headers,
            index,
        })
    }

    /// Refuses a tensor stored in a dtype that is not a float (see [`is_float_weight`]; PyTorch's integer
    /// buffers, [`is_integer_buffer`], are let through), naming it and its file. Reads only the headers.
    pub fn check_float(&self) -> Result<()> {
        for (i, (_, infos)) in self.headers.iter().enumerate() {
            let mut names: Vec<&String> = infos.keys().collect();
            names.sort();
            if let Some(name) = names
                .into_iter()
                .find(|n| !is_float_weight(infos[*n].dtype) && !is_integer_buffer(n))
            {
                return Err(self.dtype_error(i, name, infos[name].dtype));
            }
        }
        Ok(())
    }

    fn dtype_error(&self, file: usize, name: &str, dtype: safetensors::Dtype) -> Error {
        let path = &self.files[file];
        Error::model(
            path,
            format!(
                "tensor \"{name}\" is stored as {dtype:?}, but model weights must be floats (F32, F16, BF16 or \
                 F64): this is a quantised or otherwise converted export, or a damaged file; download the \
                 default weights: {}",
                crate::hub::download_command(path)
            ),
        )
    }

    /// Makes keys that start with `prefix` also reachable without it (e.g. `model.` of a CausalLM checkpoint).
    pub fn strip_prefix(mut self, prefix: &str) -> Self {
        let extra: Vec<(String, (usize, String))> = self
            .index
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
            .collect();
        for (k, v) in extra {
            self.index.entry(k).or_insert(v);
        }
        self
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file a tensor is read from (the first file when the name is unknown).
    pub fn file_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).map_or(0, |(i, _)| *i);
        self.files.get(i).map_or(Path::new(""), |p| p.as_path())
    }

    /// The stored shape of a tensor, without loading it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (i, key) = self.locate(name)?;
        Ok(self.headers[i].1[key].shape.clone())
    }

    fn locate(&self, name: &str) -> Result<(usize, &str)> {
        match self.index.get(name) {
            Some((i, key)) => Ok((*i, key.as_str())),
            None => Err(Error::model(
                self.files.first().cloned().unwrap_or_default(),
                format!(
                    "missing tensor \"{name}\" (looked in {} file(s)); the checkpoint does not match this model's config",
                    self.files.len()
                ),
            )),
        }
    }

    /// Loads a tensor by name, converted to `dtype` on `device`. A float `dtype` (a weight) must be stored as
    /// a float.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (i, key) = self.locate(name)?;
        let (start, infos) = &self.headers[i];
        let info = &infos[key];
        if dtype.is_float() && !is_float_weight(info.dtype) {
            // a weight stored as integers (a quantised export or a damaged header): no conversion makes it right
            return Err(self.dtype_error(i, key, info.dtype));
        }
        let (a, b) = info.data_offsets;
        let view = safetensors::tensor::TensorView::new(
            info.dtype,
            info.shape.clone(),
            &self.mmaps[i][start + a..start + b],
        )
        .map_err(|e| Error::model(&self.files[i], format!("{name}: {e}")))?;
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| Error::model(&self.files[i], format!("{name}: {e}")))?;
        Ok(t.to_dtype(dtype)?)
    }

    /// A `VarBuilder` over these weights (frozen: tensors, not `Var`s).
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .load(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if t.shape() != &s {
            let (i, _) = self.index[name].clone();
            return Err(candle_core::Error::Msg(format!(
                "model {}: tensor \"{name}\" has shape {:?}, the config expects {:?}",
                self.files[i].display(),
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}
