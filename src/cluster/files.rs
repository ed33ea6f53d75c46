//! Model directories over the wire: fingerprints, and streaming files in chunks into a staged
//! directory that appears whole or not at all.
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tonic::Streaming;

use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;
use crate::io::tree::{relative_files, safe_relative};
use crate::pb::FileChunk;

const CHUNK: usize = 1 << 20;
/// Upper bound on an uploaded model (files together), so a bad peer cannot fill the disk.
const MAX_UPLOAD_BYTES: u64 = 64 << 30;

/// A 64-bit fingerprint of a model directory's files (names and bytes), as hex.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for rel in relative_files(dir)? {
        let path = dir.join(&rel);
        h.update(rel.to_string_lossy().as_bytes());
        h.update(&std::fs::read(&path).map_err(Error::io("read", &path))?);
    }
    Ok(format!("{:016x}", h.digest()))
}

/// Every file of `dir` as chunks of at most 1 MiB (the path on each file's first chunk).
pub fn file_chunks(dir: &Path) -> Result<Vec<FileChunk>> {
    let mut out = Vec::new();
    for rel in relative_files(dir)? {
        let path = dir.join(&rel);
        let bytes = Bytes::from(std::fs::read(&path).map_err(Error::io("read", &path))?);
        push_chunks(&mut out, rel.to_string_lossy().into_owned(), bytes);
    }
    Ok(out)
}

/// Appends one entry as chunks of at most 1 MiB: `path` on the first, `last` on the final one.
pub fn push_chunks(out: &mut Vec<FileChunk>, path: String, data: Bytes) {
    let mut offset = 0;
    loop {
        let end = (offset + CHUNK).min(data.len());
        out.push(FileChunk {
            path: if offset == 0 {
                path.clone()
            } else {
                String::new()
            },
            data: data.slice(offset..end),
            last: end == data.len(),
        });
        offset = end;
        if offset == data.len() {
            return;
        }
    }
}

/// Receives a stream of files into `target`, atomically (staged beside it, renamed at the end).
pub async fn receive_files(mut stream: Streaming<FileChunk>, target: &Path) -> Result<()> {
    let staged = StagedDir::create(target)?;
    let mut current: Option<(PathBuf, Vec<u8>)> = None;
    let mut total = 0u64;
    let mut files = 0;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|e| Error::Usage(format!("model stream broke: {e}")))?
    {
        total += chunk.data.len() as u64;
        if total > MAX_UPLOAD_BYTES {
            return Err(Error::Usage(format!(
                "model upload exceeds {MAX_UPLOAD_BYTES} bytes"
            )));
        }
        if !chunk.path.is_empty() {
            if current.is_some() {
                return Err(Error::Usage(
                    "a new file started before the previous one ended".into(),
                ));
            }
            let rel = safe_relative(&chunk.path).ok_or_else(|| {
                Error::Usage(format!("unsafe path {:?} in model stream", chunk.path))
            })?;
            current = Some((rel, Vec::new()));
        }
        let (rel, buf) = current
            .as_mut()
            .ok_or_else(|| Error::Usage("chunk without a file".into()))?;
        buf.extend_from_slice(&chunk.data);
        if chunk.last {
            let path = staged.path().join(&*rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(Error::io("create directory", parent))?;
            }
            std::fs::write(&path, &buf).map_err(Error::io("write", &path))?;
            current = None;
            files += 1;
        }
    }
    if current.is_some() || files == 0 {
        return Err(Error::Usage(
            "the model stream ended inside a file or carried none".into(),
        ));
    }
    staged.commit()?;
    Ok(())
}
