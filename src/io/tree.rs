//! Walking a directory tree.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Regular files under `dir`, relative to it, sorted; hidden entries (names starting with `.`,
/// such as a model snapshot's `.gitattributes` or a staging directory) are skipped.
pub fn relative_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(Error::io("read directory", &d))? {
            let entry = entry.map_err(Error::io("read directory", &d))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}
