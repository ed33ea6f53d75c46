//! The one check of a command's output path, made before any work: an output that is (or would
//! swallow) one of the command's inputs, that exists while the user did not ask to replace it, that
//! is of the other kind, or that cannot be written where it was told fails at once — not after an
//! hour of embedding or mining, and never by replacing what the user kept there.
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What the output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
}

/// An output path as a command was given it, named as its flag (`--output`) in every error.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output<'a> {
    pub flag: &'a str,
    pub path: &'a Path,
    pub kind: Kind,
    /// The user asked for an existing output to be replaced.
    pub overwrite: bool,
}

impl Output<'_> {
    /// Refuses the output when it is one of `inputs` or holds one (even with `overwrite`: the
    /// command would destroy what it reads), exists without `overwrite`, exists as the other kind,
    /// or its directory is missing or not writable.
    pub(crate) fn check(&self, inputs: &[&Path]) -> Result<()> {
        let Output {
            flag,
            path,
            kind,
            overwrite,
        } = *self;
        let shown = path.display();
        if let Ok(out) = fs::canonicalize(path) {
            for input in inputs {
                let Ok(input) = fs::canonicalize(input) else {
                    continue;
                };
                if input == out {
                    return Err(Error::Usage(format!(
                        "{flag} {shown} is also an input of this command; it would be replaced by \
                         what is read from it: choose another {flag}"
                    )));
                }
                if kind == Kind::Dir && input.starts_with(&out) {
                    return Err(Error::Usage(format!(
                        "{flag} {shown} holds the input {}; replacing it would destroy that input: \
                         choose another {flag}",
                        input.display()
                    )));
                }
            }
        }
        match (fs::metadata(path), kind) {
            (Ok(m), Kind::File) if m.is_dir() => {
                return Err(Error::Usage(format!(
                    "{flag} {shown} is a directory; give a file"
                )));
            }
            (Ok(m), Kind::Dir) if !m.is_dir() => {
                return Err(Error::Usage(format!(
                    "{flag} {shown} is a file; give a directory"
                )));
            }
            (Ok(_), _) if !overwrite => {
                return Err(Error::Usage(format!(
                    "{flag} {shown} exists; pass --overwrite to replace it, or choose another {flag}"
                )));
            }
            _ => {}
        }
        writable_parent(flag, path)
    }
}

/// The directory the output will be created in (a temporary sibling, then a rename) must exist
/// and take a new file.
fn writable_parent(flag: &str, path: &Path) -> Result<()> {
    let parent: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Usage(format!(
            "{flag} {}: its directory {} does not exist",
            path.display(),
            parent.display()
        )));
    }
    tempfile::Builder::new()
        .prefix(".multipos-probe-")
        .tempfile_in(&parent)
        .map(drop)
        .map_err(|e| {
            Error::Usage(format!(
                "{flag} {}: cannot create files in {}: {e}",
                path.display(),
                parent.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(path: &Path, kind: Kind, overwrite: bool) -> Output<'_> {
        Output {
            flag: "--output",
            path,
            kind,
            overwrite,
        }
    }

    fn refusal(o: Output<'_>, inputs: &[&Path]) -> String {
        o.check(inputs).unwrap_err().to_string()
    }

    #[test]
    fn each_refusal_names_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.jsonl");
        fs::write(&file, "keep").unwrap();
        let sub = dir.path().join("model");
        fs::create_dir(&sub).unwrap();
        let inner = sub.join("a");
        fs::create_dir(&inner).unwrap();
        let cases = [
            (
                out(&file, Kind::File, true),
                vec![file.as_path()],
                "also an input",
            ),
            (
                out(&sub, Kind::Dir, true),
                vec![inner.as_path()],
                "holds the input",
            ),
            (
                out(&file, Kind::File, false),
                vec![],
                "exists; pass --overwrite",
            ),
            (
                out(&sub, Kind::File, true),
                vec![],
                "is a directory; give a file",
            ),
            (
                out(&file, Kind::Dir, true),
                vec![],
                "is a file; give a directory",
            ),
        ];
        for (o, inputs, why) in cases {
            let err = refusal(o, &inputs);
            assert!(err.contains(why), "{why}: {err}");
        }
        let missing = dir.path().join("no/such/out.jsonl");
        let err = refusal(out(&missing, Kind::File, false), &[]);
        assert!(err.contains("does not exist"), "{err}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
    }

    #[test]
    fn a_new_output_or_an_asked_for_replacement_passes_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("old.jsonl");
        fs::write(&file, "old").unwrap();
        let input = dir.path().join("in.txt");
        fs::write(&input, "in").unwrap();
        out(&dir.path().join("new.jsonl"), Kind::File, false)
            .check(&[&input])
            .unwrap();
        out(&file, Kind::File, true).check(&[&input]).unwrap();
        out(&dir.path().join("model"), Kind::Dir, false)
            .check(&[&input])
            .unwrap();
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "the probe file stays behind");
    }

    #[test]
    fn a_directory_that_takes_no_files_is_refused() {
        // procfs takes no new files, even from root (CI runs as root, where permissions do not bind).
        let err = refusal(out(Path::new("/proc/out.jsonl"), Kind::File, false), &[]);
        assert!(err.contains("cannot create files in /proc"), "{err}");
    }
}
