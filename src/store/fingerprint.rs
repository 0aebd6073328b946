//! Fingerprints of model components: a SHA-256 over the config and every weight file, so that a store can
//! say exactly which VAE / text encoder / tokenizer produced it, and the trainer can check its teacher folder.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

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
