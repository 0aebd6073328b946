//! Does a store fit? One home for every check between a store and the things that use it:
//!
//! * a prep run writing into an existing store must use the same settings and encoders
//!   ([`StoreConfig::incompatibility`]);
//! * a training run must use a teacher of the store's model family (prompt width, latent channels) and, unless
//!   allowed, the same VAE / text encoder / tokenizer files ([`check_fits_teacher`], [`fingerprint_mismatches`]);
//! * fingerprints themselves: a SHA-256 over a component's config and every weight file ([`fingerprint_folder`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::models::sana::SanaConfig;
use crate::store::StoreConfig;

fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(())
}

/// `sha256:<hex>` over the listed files of `dir` that exist (names are hashed too, so renames count), plus every
/// `*.safetensors` file of the folder in name order.
pub fn fingerprint_folder(dir: &Path, configs: &[&str]) -> Result<String> {
    let mut files: Vec<PathBuf> = configs
        .iter()
        .map(|c| dir.join(c))
        .filter(|p| p.is_file())
        .collect();
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    files.extend(weights);
    if files.is_empty() {
        return Err(Error::Missing {
            what: "files to fingerprint".into(),
            path: dir.to_path_buf(),
            hint: "the model folder is empty or incomplete".into(),
        });
    }
    let mut h = Sha256::new();
    for f in &files {
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update([0u8]);
        hash_file(&mut h, f)?;
    }
    let digest = h.finalize();
    Ok(format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// Compares the store's VAE / text-encoder / tokenizer fingerprints with a teacher pipeline folder; returns
/// one line per difference (empty when they agree).
pub fn fingerprint_mismatches(config: &StoreConfig, teacher_root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (sub, stored, files) in [
        ("vae", &config.models.vae, &["config.json"][..]),
        (
            "text_encoder",
            &config.models.text_encoder,
            &["config.json"][..],
        ),
        (
            "tokenizer",
            &config.models.tokenizer,
            &[
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ][..],
        ),
    ] {
        let dir = teacher_root.join(sub);
        if !dir.is_dir() {
            out.push(format!(
                "{sub}: the teacher folder has no {sub}/ to compare with"
            ));
            continue;
        }
        let now = fingerprint_folder(&dir, files)?;
        if now != stored.fingerprint {
            out.push(format!(
                "{sub}: store was made with {} ({}), teacher folder has {now}",
                stored.origin, stored.fingerprint
            ));
        }
    }
    Ok(out)
}

/// Store checks before any model is loaded: the store must fit the teacher and have been made with the
/// teacher folder's VAE and text encoder (unless explicitly allowed).
pub fn check_fits_teacher(
    store: &StoreConfig,
    store_path: &Path,
    teacher_root: &Path,
    teacher: &SanaConfig,
    allow_mismatch: bool,
) -> Result<()> {
    if store.text_hidden_size != teacher.caption_channels {
        return Err(Error::store(
            store_path,
            format!(
                "prompt embeddings are {}-wide but the teacher's caption_channels is {}: this store was made \
                 for another model family",
                store.text_hidden_size, teacher.caption_channels
            ),
        ));
    }
    if store.latent_shape[0] != teacher.in_channels {
        return Err(Error::store(
            store_path,
            format!(
                "latents have {} channels but the teacher expects {}",
                store.latent_shape[0], teacher.in_channels
            ),
        ));
    }
    let mismatches = fingerprint_mismatches(store, teacher_root)?;
    if !mismatches.is_empty() && !allow_mismatch {
        return Err(Error::store(
            store_path,
            format!(
                "the store was not made with this teacher folder's encoders:\n  {}\nre-run sprint-prep with \
                 --pretrained_model_name_or_path {}, or pass --allow_store_mismatch if you know they are \
                 equivalent",
                mismatches.join("\n  "),
                teacher_root.display()
            ),
        ));
    }
    for m in &mismatches {
        tracing::warn!("store/teacher mismatch allowed: {m}");
    }
    Ok(())
}

impl StoreConfig {
    /// The settings that must agree for two runs to write into one store; returns the first difference.
    pub fn incompatibility(&self, other: &StoreConfig) -> Option<String> {
        let (p, q) = (&self.preprocess, &other.preprocess);
        let buckets = |c: &StoreConfig| {
            c.multi_scale
                .as_ref()
                .map_or("off (square)".to_string(), |m| {
                    format!("the {} px aspect-ratio table ({})", m.table, m.filter)
                })
        };
        let pairs: [(&str, String, String); 14] = [
            ("multi_scale", buckets(self), buckets(other)),
            (
                "format_version",
                self.format_version.to_string(),
                other.format_version.to_string(),
            ),
            (
                "resolution",
                self.resolution.to_string(),
                other.resolution.to_string(),
            ),
            (
                "max_sequence_length",
                self.max_sequence_length.to_string(),
                other.max_sequence_length.to_string(),
            ),
            (
                "complex_human_instruction",
                format!("{:?}", self.complex_human_instruction),
                format!("{:?}", other.complex_human_instruction),
            ),
            (
                "latent_dtype",
                self.latent_dtype.name().into(),
                other.latent_dtype.name().into(),
            ),
            (
                "embed_dtype",
                self.embed_dtype.name().into(),
                other.embed_dtype.name().into(),
            ),
            (
                "vae fingerprint",
                self.models.vae.fingerprint.clone(),
                other.models.vae.fingerprint.clone(),
            ),
            (
                "text_encoder fingerprint",
                self.models.text_encoder.fingerprint.clone(),
                other.models.text_encoder.fingerprint.clone(),
            ),
            (
                "tokenizer fingerprint",
                self.models.tokenizer.fingerprint.clone(),
                other.models.tokenizer.fingerprint.clone(),
            ),
            // Every `preprocess` field by name: `mixed_precision` changes the stored embeddings (bf16 vs f32
            // Gemma-2), the others the latents.
            (
                "preprocess.mixed_precision",
                p.mixed_precision.clone(),
                q.mixed_precision.clone(),
            ),
            ("preprocess.resize", p.resize.clone(), q.resize.clone()),
            ("preprocess.crop", p.crop.clone(), q.crop.clone()),
            (
                "preprocess.normalize",
                p.normalize.clone(),
                q.normalize.clone(),
            ),
        ];
        pairs
            .into_iter()
            .find(|(_, a, b)| a != b)
            .map(|(what, a, b)| format!("{what} differs: store has {a}, this run has {b}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_with_weights_and_config() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{\"a\":1}").unwrap();
        std::fs::write(d.path().join("w.safetensors"), [1u8, 2, 3]).unwrap();
        let a = fingerprint_folder(d.path(), &["config.json"]).unwrap();
        assert!(a.starts_with("sha256:") && a.len() == 7 + 64);
        assert_eq!(a, fingerprint_folder(d.path(), &["config.json"]).unwrap());
        std::fs::write(d.path().join("w.safetensors"), [1u8, 2, 4]).unwrap();
        let b = fingerprint_folder(d.path(), &["config.json"]).unwrap();
        assert_ne!(a, b);
        std::fs::write(d.path().join("config.json"), "{\"a\":2}").unwrap();
        assert_ne!(b, fingerprint_folder(d.path(), &["config.json"]).unwrap());
    }
}
