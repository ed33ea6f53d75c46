//! Corpus embeddings on disk, keyed by the model and the corpus content, so a second mining run
//! with the same model and corpus skips the embedding. Written to a temporary file in the cache
//! directory, fsynced and renamed, so a reader never sees a partial file.
use std::path::{Path, PathBuf};

use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::io::atomic::AtomicFile;
use crate::io::hash::update_with_file;

/// A key for a model directory: its weights, configuration and tokenizer files, by content.
pub(crate) fn model_key(dir: &Path, max_seq_length: usize) -> Result<u64> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for name in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "modules.json",
        "1_Pooling/config.json",
        // Its prompts go in front of the texts.
        "config_sentence_transformers.json",
    ] {
        let path = dir.join(name);
        if path.exists() {
            h.update(name.as_bytes());
            update_with_file(&mut h, &path)?;
        }
    }
    h.update(&(max_seq_length as u64).to_le_bytes());
    Ok(h.digest())
}

/// The default cache directory: `$MULTIPOS_CACHE/embeddings`, else `~/.cache/multipos/embeddings`.
pub(crate) fn default_dir() -> PathBuf {
    std::env::var_os("MULTIPOS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/multipos")
        })
        .join("embeddings")
}

fn file(dir: &Path, model_key: u64, corpus_key: u64) -> PathBuf {
    dir.join(format!(
        "corpus-{model_key:016x}-{corpus_key:016x}.safetensors"
    ))
}

/// The cached embeddings, when a whole file of the expected row count exists.
pub(crate) fn load(
    dir: &Path,
    model_key: u64,
    corpus_key: u64,
    rows: usize,
    device: Device,
) -> Result<Option<Tensor>> {
    let path = file(dir, model_key, corpus_key);
    if !path.exists() {
        return Ok(None);
    }
    match Tensor::read_safetensors(&path) {
        Ok(t) => match t.into_iter().find(|(n, _)| n == "embeddings") {
            Some((_, t)) if t.size().first() == Some(&(rows as i64)) => {
                tracing::info!(cache = %path.display(), "corpus embeddings from the cache");
                Ok(Some(t.to_device(device)))
            }
            _ => {
                tracing::warn!(cache = %path.display(), "ignoring a cache file of another shape");
                Ok(None)
            }
        },
        Err(e) => {
            tracing::warn!(cache = %path.display(), error = %e, "ignoring an unreadable cache file");
            Ok(None)
        }
    }
}

/// Stores embeddings for later runs.
pub(crate) fn store(
    dir: &Path,
    model_key: u64,
    corpus_key: u64,
    embeddings: &Tensor,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
    let out = AtomicFile::create(file(dir, model_key, corpus_key))?;
    let cpu = embeddings.to_device(Device::Cpu);
    Tensor::write_safetensors(&[("embeddings", &cpu)], out.temp_path()).map_err(Error::Torch)?;
    out.commit()
}
