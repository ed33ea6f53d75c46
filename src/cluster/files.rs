//! Model directories over the wire: fingerprints, and streaming files in chunks into a staged
//! directory that appears whole or not at all.
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;
use crate::io::hash::update_with_file;
use crate::io::tree::{relative_files, safe_relative};
use crate::pb::FileChunk;

const CHUNK: usize = 1 << 20;
/// Upper bound on what a worker fetches from its coordinator (files together).
pub(crate) const MAX_FETCH_BYTES: u64 = 64 << 30;
/// Room beyond the expected size of an upload: tokenizer, configs, `state.json`, loss heads.
const UPLOAD_SLACK: u64 = 64 << 20;

/// The most a worker may upload, from the size of the model the run started from: a model saved
/// in f32 is at most twice a 16-bit base (`copies` = 1), a checkpoint holds the weights, two AdamW
/// moments and, with `train.ema_decay`, the moving average and `model-ema/` (`copies` = 5).
pub(crate) fn upload_cap(model_dir_bytes: u64, copies: u64) -> u64 {
    model_dir_bytes
        .saturating_mul(2 * copies)
        .saturating_add(UPLOAD_SLACK)
}

/// Bytes of the files under `dir`.
pub(crate) fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for rel in relative_files(dir)? {
        let path = dir.join(&rel);
        total += std::fs::metadata(&path)
            .map_err(Error::io("read", &path))?
            .len();
    }
    Ok(total)
}

/// A 64-bit fingerprint of a model directory's files (names and bytes), as hex.
pub(crate) fn model_fingerprint(dir: &Path) -> Result<String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for rel in relative_files(dir)? {
        let path = dir.join(&rel);
        h.update(rel.to_string_lossy().as_bytes());
        update_with_file(&mut h, &path)?;
    }
    Ok(format!("{:016x}", h.digest()))
}

/// Every file of `dir` as a stream of chunks of at most 1 MiB (the path on each file's first
/// chunk), read by a blocking thread a few chunks ahead of the consumer: memory stays a few MiB
/// whatever the directory's size, and no file is read on the async threads. A read error ends the
/// stream with it.
pub(crate) fn file_stream(dir: &Path) -> Result<ReceiverStream<Result<FileChunk>>> {
    let files = relative_files(dir)?;
    let dir = dir.to_path_buf();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        for rel in files {
            let path = dir.join(&rel);
            if let Err(e) = send_file(&path, rel.to_string_lossy().into_owned(), &tx) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Sends one file as chunks; stops quietly when the consumer is gone.
fn send_file(
    path: &Path,
    name: String,
    tx: &tokio::sync::mpsc::Sender<Result<FileChunk>>,
) -> Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(Error::io("read", path))?;
    let len = file.metadata().map_err(Error::io("read", path))?.len();
    let mut sent = 0u64;
    let mut first = true;
    loop {
        let want = (len - sent).min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        file.read_exact(&mut buf).map_err(Error::io("read", path))?;
        sent += want as u64;
        let chunk = FileChunk {
            path: if first { name.clone() } else { String::new() },
            data: Bytes::from(buf),
            last: sent == len,
        };
        first = false;
        if tx.blocking_send(Ok(chunk)).is_err() || sent == len {
            return Ok(());
        }
    }
}

/// The chunks of [`file_stream`] for an upload: a read error ends the upload early, which the
/// receiver refuses as a file cut short.
pub fn upload_stream(dir: &Path) -> Result<impl tokio_stream::Stream<Item = FileChunk> + use<>> {
    use tokio_stream::StreamExt;
    Ok(file_stream(dir)?.map_while(|c| {
        c.map_err(|e| tracing::error!(error = %e, "reading a file to upload"))
            .ok()
    }))
}

/// Appends one entry as chunks of at most 1 MiB: `path` on the first, `last` on the final one.
pub(crate) fn push_chunks(out: &mut Vec<FileChunk>, path: String, data: Bytes) {
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

/// Receives a stream of files into `target`, atomically (staged beside it, renamed at the end);
/// each chunk is written as it arrives, so memory holds one chunk. A stream past `limit` bytes is
/// refused before its chunk is written, and the staged files go with it.
pub(crate) async fn receive_files<S>(mut stream: S, target: &Path, limit: u64) -> Result<()>
where
    S: tokio_stream::Stream<Item = std::result::Result<FileChunk, tonic::Status>> + Unpin,
{
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;
    let staged = StagedDir::create(target)?;
    let mut current: Option<(PathBuf, tokio::fs::File)> = None;
    let mut total = 0u64;
    let mut files = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Protocol(format!("model stream broke: {e}")))?;
        total += chunk.data.len() as u64;
        if total > limit {
            return Err(Error::TooLarge(format!(
                "the files sent exceed their cap of {limit} bytes"
            )));
        }
        if !chunk.path.is_empty() {
            if current.is_some() {
                return Err(Error::Protocol(
                    "a new file started before the previous one ended".into(),
                ));
            }
            let rel = safe_relative(&chunk.path).ok_or_else(|| {
                Error::Protocol(format!("unsafe path {:?} in model stream", chunk.path))
            })?;
            let path = staged.path().join(&rel);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(Error::io("create directory", parent))?;
            }
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
                .map_err(Error::io("create", &path))?;
            current = Some((path, file));
        }
        let (path, file) = current
            .as_mut()
            .ok_or_else(|| Error::Protocol("chunk without a file".into()))?;
        file.write_all(&chunk.data)
            .await
            .map_err(Error::io("write", &*path))?;
        if chunk.last {
            let (path, mut file) = current.take().expect("a file is open");
            file.flush().await.map_err(Error::io("write", &path))?;
            files += 1;
        }
    }
    if current.is_some() || files == 0 {
        return Err(Error::Protocol(
            "the model stream ended inside a file or carried none".into(),
        ));
    }
    staged.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(
        path: &str,
        bytes: usize,
        last: bool,
    ) -> std::result::Result<FileChunk, tonic::Status> {
        Ok(FileChunk {
            path: path.into(),
            data: vec![7u8; bytes].into(),
            last,
        })
    }

    #[tokio::test]
    async fn an_upload_past_its_cap_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model");
        let stream = tokio_stream::iter(vec![
            chunk("a.bin", 600, false),
            chunk("", 600, true),
            chunk("b.bin", 10, true),
        ]);
        let e = receive_files(stream, &target, 1000).await.unwrap_err();
        assert!(matches!(e, Error::TooLarge(_)), "{e}");
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "staged files remain"
        );
        // Within the cap: taken whole.
        let stream = tokio_stream::iter(vec![chunk("a.bin", 600, false), chunk("", 400, true)]);
        receive_files(stream, &target, 1000).await.unwrap();
        assert_eq!(std::fs::read(target.join("a.bin")).unwrap().len(), 1000);
    }

    #[test]
    fn caps_grow_with_the_model_and_keep_slack() {
        assert_eq!(upload_cap(0, 5), UPLOAD_SLACK);
        assert_eq!(upload_cap(100, 1), 200 + UPLOAD_SLACK);
        assert_eq!(upload_cap(100, 5), 1000 + UPLOAD_SLACK);
        assert_eq!(upload_cap(u64::MAX, 5), u64::MAX);
    }
}
