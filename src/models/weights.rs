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

impl Weights {
    /// Opens the safetensors weights of a model folder: `<stem>.safetensors`, or the shards listed in
    /// `<stem>.safetensors.index.json`, or every `*.safetensors` in the folder.
    pub fn from_folder(dir: &Path, stems: &[&str]) -> Result<Self> {
        for stem in stems {
            let single = dir.join(format!("{stem}.safetensors"));
            if single.is_file() {
                return Self::from_files(&[single]);
            }
            let index = dir.join(format!("{stem}.safetensors.index.json"));
            if index.is_file() {
                return Self::from_index(&index);
            }
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(Error::Missing {
                what: "safetensors weights".into(),
                path: dir.to_path_buf(),
                hint: format!(
                    "expected {} (or a sharded *.safetensors.index.json) in this folder",
                    stems
                        .iter()
                        .map(|s| format!("{s}.safetensors"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            });
        }
        Self::from_files(&found)
    }

    /// Opens the shards named by a `*.safetensors.index.json` (`{"weight_map": {key: file}}`).
    pub fn from_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(index, format!("invalid index json: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::model(index, "index json has no \"weight_map\" object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !f.is_file() {
                return Err(Error::Missing {
                    what: "weight shard listed in the index".into(),
                    path: f.clone(),
                    hint: format!("{} names it; download the missing shard", index.display()),
                });
            }
        }
        Self::from_files(&files)
    }

    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        let mut mmaps = Vec::with_capacity(files.len());
        let mut headers = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only; a concurrent writer would be a user error we cannot prevent.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let bad = |e: &dyn std::fmt::Display| {
                Error::model(
                    path,
                    format!("not a valid safetensors file ({e}); the file may be truncated or corrupt — download it again"),
                )
            };
            // Full validation once (offsets within the file, no overlaps), then keep only the parsed header.
            safetensors::SafeTensors::deserialize(&mmap).map_err(|e| bad(&e))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| bad(&e))?;
            let infos: HashMap<String, safetensors::tensor::TensorInfo> = meta
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect();
            for name in infos.keys() {
                index.insert(name.clone(), (i, name.clone()));
            }
            headers.push((8 + n, infos));
            mmaps.push(mmap);
        }
        Ok(Self {
            files: files.to_vec(),
            mmaps,
            headers,
            index,
        })
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

    /// Loads a tensor by name, converted to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (i, key) = self.locate(name)?;
        let (start, infos) = &self.headers[i];
        let info = &infos[key];
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
