//! Training checkpoints (docs/ALGORITHM.md §5.10, recommended layout; ALGORITHM.md §9 #7) and the final export (ALGORITHM.md §5.11).
//!
//! `output_dir/checkpoint-{global_step}/` holds:
//! - `transformer/` — the student backbone in diffusers layout (`config.json` with `guidance_embeds: true` +
//!   `diffusion_pytorch_model.safetensors`, f32 master weights), loadable by `SanaTransformer2DModel`;
//! - `logvar_linear.safetensors` — the logvar head (`logvar_linear.{weight,bias}`);
//! - `disc_heads.safetensors` — every head tensor incl. the spectral-norm `weight_u` / `weight_v` buffers;
//! - `optim_g.safetensors`, `optim_d.safetensors` — AdamW moments and step counts;
//! - `trainer_state.json` — global step, phase, update counts, loader position, RNG counter, NaN skips.
//!
//! A checkpoint is written under a temporary name and renamed when complete, so `latest` never picks a
//! half-written one; only names `checkpoint-<digits>` holding `trainer_state.json` count as checkpoints.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::train::loader::LoaderPosition;
use crate::{Error, Result};

pub const TRANSFORMER_DIR: &str = "transformer";
pub const TRANSFORMER_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
pub const LOGVAR_FILE: &str = "logvar_linear.safetensors";
pub const HEADS_FILE: &str = "disc_heads.safetensors";
pub const OPTIM_G_FILE: &str = "optim_g.safetensors";
pub const OPTIM_D_FILE: &str = "optim_d.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
/// Version of the checkpoint layout written into `trainer_state.json`.
pub const CHECKPOINT_VERSION: u32 = 1;
const TEMP_MARK: &str = ".partial-";

/// Which phase the next synced step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    #[serde(rename = "G")]
    Generator,
    #[serde(rename = "D")]
    Discriminator,
}

impl Phase {
    pub fn other(self) -> Self {
        match self {
            Phase::Generator => Phase::Discriminator,
            Phase::Discriminator => Phase::Generator,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Generator => "G",
            Phase::Discriminator => "D",
        }
    }
}

/// Everything besides tensors that a resume needs to continue exactly where the run stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub checkpoint_version: u32,
    /// Synced G and D steps together (docs/ALGORITHM.md §5.9).
    pub global_step: u64,
    pub phase: Phase,
    /// Generator updates = lr-scheduler steps.
    pub generator_updates: u64,
    pub discriminator_updates: u64,
    /// Data batches consumed so far (the per-batch random draws are derived from the seed and this count).
    pub batches_consumed: u64,
    /// The next batch the loader yields.
    pub loader: LoaderPosition,
    pub nan_skips: u64,
    pub seed: u64,
    /// Rows of the store the run reads (a resume on another store is refused).
    pub store_rows: usize,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Ranks of a data-parallel run (1 for checkpoints written before multi-process runs existed).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// `checkpoint-{step}`.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Complete checkpoints of `output_dir`, oldest first (by step number).
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(output_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = checkpoint_step(&name) {
            let path = entry.path();
            if path.join(STATE_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The highest-numbered complete checkpoint, if any.
pub fn latest(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// `--resume_from_checkpoint`: `latest` (None when there is none yet: a fresh start) or a checkpoint folder
/// (absolute, or a name inside `output_dir`), which must be complete.
pub fn resolve_resume(output_dir: &Path, arg: &str) -> Result<Option<PathBuf>> {
    if arg == "latest" {
        return latest(output_dir);
    }
    let given = PathBuf::from(arg);
    let path = if given.is_dir() {
        given
    } else {
        output_dir.join(arg)
    };
    if !path.join(STATE_FILE).is_file() {
        return Err(Error::Missing {
            what: "checkpoint".into(),
            path: path.clone(),
            hint: format!(
                "--resume_from_checkpoint must be `latest` or a checkpoint folder with {STATE_FILE} \
                 (e.g. {}/checkpoint-500)",
                output_dir.display()
            ),
        });
    }
    Ok(Some(path))
}

/// Deletes the oldest complete checkpoints so that at most `limit` remain; returns the deleted folders.
pub fn prune(output_dir: &Path, limit: usize) -> Result<Vec<PathBuf>> {
    let all = list_checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(limit);
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Removes temporary folders left by an interrupted save.
pub fn remove_partial(output_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(TEMP_MARK) {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Writes `output_dir/name` by filling a temporary sibling folder with `fill` and renaming it into place (an
/// existing `name` is replaced only after the new one is complete).
pub fn write_atomically(
    output_dir: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let tmp = output_dir.join(format!("{name}{TEMP_MARK}{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        // nothing of a failed save is left behind (a full disk gets its space back)
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dest = output_dir.join(name);
    if dest.exists() {
        let old = output_dir.join(format!("{name}{TEMP_MARK}old-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    }
    Ok(dest)
}

/// The student's `config.json`: the teacher's config with `guidance_embeds: true`, as a diffusers
/// `SanaTransformer2DModel`.
pub fn student_config_json(teacher_transformer_dir: &Path) -> Result<serde_json::Value> {
    let path = teacher_transformer_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::model(&path, e.to_string()))?;
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Error::model(&path, "config.json is not a JSON object"))?;
    obj.insert("guidance_embeds".into(), true.into());
    obj.insert("_class_name".into(), "SanaTransformer2DModel".into());
    Ok(config)
}

/// Writes `path` through `path.tmp` and a rename: the file is whole or absent (an earlier version stays
/// until the new one is complete), and a failed write leaves no temporary file.
pub fn write_file_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let written =
        write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes named tensors (cast to `dtype`) as one safetensors file (atomically: see [`write_file_atomically`]).
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)], dtype: DType) -> Result<()> {
    let map = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), t.to_dtype(dtype)?.contiguous()?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    write_file_atomically(path, |tmp| {
        candle_core::safetensors::save(&map, tmp)
            .map_err(|e| Error::model(path, format!("cannot write safetensors: {e}")))
    })
}

/// Writes the student: `dir/transformer/` (diffusers layout, backbone tensors only) and `dir/logvar_linear.safetensors`.
pub fn save_student(
    dir: &Path,
    config: &serde_json::Value,
    named: &[(String, Tensor)],
    dtype: DType,
) -> Result<()> {
    let (logvar, backbone): (Vec<_>, Vec<_>) = named
        .iter()
        .cloned()
        .partition(|(name, _)| name.starts_with("logvar_linear."));
    let tdir = dir.join(TRANSFORMER_DIR);
    std::fs::create_dir_all(&tdir).map_err(|e| Error::io(&tdir, e))?;
    let cpath = tdir.join("config.json");
    let text = serde_json::to_string_pretty(config).expect("a JSON value serialises");
    write_file_atomically(&cpath, |tmp| {
        std::fs::write(tmp, text).map_err(|e| Error::io(&cpath, e))
    })?;
    save_tensors(&tdir.join(TRANSFORMER_WEIGHTS), &backbone, dtype)?;
    save_tensors(&dir.join(LOGVAR_FILE), &logvar, dtype)
}

pub fn write_state(dir: &Path, state: &TrainerState) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state).expect("the state serialises");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::model(&path, format!("unreadable trainer state: {e}")))?;
    if state.checkpoint_version != CHECKPOINT_VERSION {
        return Err(Error::model(
            &path,
            format!(
                "checkpoint version {} is not supported (this build reads version {CHECKPOINT_VERSION})",
                state.checkpoint_version
            ),
        ));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_checkpoint(dir: &Path, step: u64) {
        let p = dir.join(checkpoint_name(step));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join(STATE_FILE), "{}").unwrap();
    }

    #[test]
    fn latest_ignores_partial_and_foreign_folders() {
        let dir = tempfile::tempdir().unwrap();
        for step in [2, 10, 4] {
            fake_checkpoint(dir.path(), step);
        }
        // a half-written save of a later step, a folder without state, and unrelated names
        std::fs::create_dir_all(dir.path().join(format!("checkpoint-12{TEMP_MARK}77"))).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoint-14")).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoint-x")).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoints")).unwrap();
        let steps: Vec<u64> = list_checkpoints(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![2, 4, 10]);
        assert_eq!(
            latest(dir.path()).unwrap().unwrap(),
            dir.path().join("checkpoint-10")
        );
        remove_partial(dir.path()).unwrap();
        assert!(!dir
            .path()
            .join(format!("checkpoint-12{TEMP_MARK}77"))
            .exists());
    }

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for step in [2, 4, 6, 8] {
            fake_checkpoint(dir.path(), step);
        }
        let removed = prune(dir.path(), 2).unwrap();
        assert_eq!(removed.len(), 2);
        let steps: Vec<u64> = list_checkpoints(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![6, 8]);
    }

    #[test]
    fn resume_argument() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve_resume(dir.path(), "latest").unwrap(), None);
        fake_checkpoint(dir.path(), 3);
        assert_eq!(
            resolve_resume(dir.path(), "checkpoint-3").unwrap().unwrap(),
            dir.path().join("checkpoint-3")
        );
        let err = resolve_resume(dir.path(), "checkpoint-9").unwrap_err();
        assert!(err.to_string().contains("checkpoint"), "{err}");
    }

    #[test]
    fn atomic_write_replaces_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "checkpoint-1", |p| {
            std::fs::write(p.join(STATE_FILE), "first").map_err(|e| Error::io(p, e))
        })
        .unwrap();
        let failed = write_atomically(dir.path(), "checkpoint-1", |_| {
            Err(Error::Arg("disk full".into()))
        });
        assert!(failed.is_err());
        let kept =
            std::fs::read_to_string(dir.path().join("checkpoint-1").join(STATE_FILE)).unwrap();
        assert_eq!(kept, "first");
    }
}
