//! Walking a directory tree.
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// A relative path from the outside (a network peer, a manifest) that is safe to join under a
/// directory: plain names only — no root, `..`, `.` or prefix — and none hidden (staging directories
/// and skipped files start with `.`). The one check every received name goes through.
pub(crate) fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let plain = |c: Component<'_>| match c {
        Component::Normal(n) => !n.to_string_lossy().starts_with('.'),
        _ => false,
    };
    (!path.is_empty() && !path.contains('\\') && p.components().all(plain)).then(|| p.to_path_buf())
}

/// Regular files under `dir`, relative to it, sorted; hidden entries (names starting with `.`,
/// such as a model snapshot's `.gitattributes` or a staging directory) are skipped.
pub(crate) fn relative_files(dir: &Path) -> Result<Vec<PathBuf>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_accepted() {
        assert!(safe_relative("1_Pooling/config.json").is_some());
        for bad in [
            "",
            "../x",
            "/etc/passwd",
            "a/../../b",
            "./a",
            ".multipos-x/y",
            "a/.hidden",
            "a\\b",
        ] {
            assert!(safe_relative(bad).is_none(), "{bad}");
        }
    }
}
