//! Content hashes of files read in bounded chunks: hashing a model of many gigabytes (the cluster's
//! model fingerprint, the mining cache's key) must not hold the whole file in memory.
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};

const CHUNK: usize = 1 << 20;

/// Feeds the bytes of `path` to `h`, a chunk at a time, and returns how many there were; the hash
/// equals that of the whole file's bytes fed at once.
pub(crate) fn update_with_file(h: &mut Xxh3, path: &Path) -> Result<u64> {
    let mut file = File::open(path).map_err(Error::io("open", path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path)(e)),
        }
    }
}

/// A file's length and XXH3-64 hash, equal to `xxh3_64` of its bytes (checkpoint manifests hold it).
pub(crate) fn file_digest(path: &Path) -> Result<(u64, u64)> {
    let mut h = Xxh3::new();
    let len = update_with_file(&mut h, path)?;
    Ok((len, h.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_hashing_equals_hashing_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 7] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            std::fs::write(&path, &bytes).unwrap();
            let mut whole = Xxh3::new();
            whole.update(b"prefix");
            whole.update(&bytes);
            let mut chunked = Xxh3::new();
            chunked.update(b"prefix");
            assert_eq!(update_with_file(&mut chunked, &path).unwrap(), len as u64);
            assert_eq!(chunked.digest(), whole.digest(), "{len} bytes");
            // Manifests written by earlier versions hashed the whole file at once.
            assert_eq!(
                file_digest(&path).unwrap(),
                (len as u64, xxhash_rust::xxh3::xxh3_64(&bytes))
            );
        }
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = update_with_file(
            &mut Xxh3::new(),
            Path::new("/nonexistent/model.safetensors"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/model.safetensors"), "{err}");
    }
}
