//! Atomic publication of files and directories: write to a temporary sibling, fsync, rename, fsync
//! the parent directory. A crash leaves either the old content or the new, never a torn file.
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Temporary files and staging directories being written, for [`remove_unfinished`].
static UNFINISHED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Keeps a temporary path listed in [`UNFINISHED`] while it lives.
struct Listed(PathBuf);

impl Listed {
    fn new(path: &Path) -> Self {
        lock_unfinished().push(path.to_path_buf());
        Self(path.to_path_buf())
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut list = lock_unfinished();
        if let Some(i) = list.iter().position(|p| *p == self.0) {
            list.swap_remove(i);
        }
    }
}

fn lock_unfinished() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // The list stays valid whatever a panicking holder was doing.
    UNFINISHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes every temporary file and staging directory still being written: for a process about to
/// end on a signal, which runs no destructors (docs/design.md, "Interrupts").
pub(crate) fn remove_unfinished() {
    remove_unfinished_where(|_| true);
}

fn remove_unfinished_where(which: impl Fn(&Path) -> bool) {
    lock_unfinished().retain(|path| {
        if !which(path) {
            return true;
        }
        let _ = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path));
        false
    });
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries (the rename itself) to disk.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("fsync directory", dir))
}

/// A file being written under a temporary name; becomes visible at its final path only on
/// [`AtomicFile::commit`]. Dropped without commit, it disappears.
pub(crate) struct AtomicFile {
    target: PathBuf,
    writer: BufWriter<tempfile::NamedTempFile>,
    _listed: Listed,
}

impl AtomicFile {
    /// Starts writing `target` (its directory must exist), readable as the umask allows.
    pub(crate) fn create(target: impl Into<PathBuf>) -> Result<Self> {
        let file = Self::create_private(target)?;
        let mode = 0o666 & !umask();
        std::fs::set_permissions(
            file.writer.get_ref().path(),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .map_err(Error::io("set permissions of", &file.target))?;
        Ok(file)
    }

    /// Starts writing `target` readable by its owner only (keys, secrets).
    pub(crate) fn create_private(target: impl Into<PathBuf>) -> Result<Self> {
        let target = target.into();
        let dir = parent_of(&target);
        let tmp = tempfile::Builder::new()
            .prefix(".multipos-tmp-")
            .tempfile_in(dir)
            .map_err(Error::io("create a temporary file in", dir))?;
        Ok(Self {
            target,
            _listed: Listed::new(tmp.path()),
            writer: BufWriter::with_capacity(1 << 20, tmp),
        })
    }

    /// The temporary file's path, for writers that take a path instead of [`AtomicFile::writer`].
    pub(crate) fn temp_path(&self) -> &Path {
        self.writer.get_ref().path()
    }

    /// The buffered writer for the content.
    pub(crate) fn writer(&mut self) -> &mut impl Write {
        &mut self.writer
    }

    /// Flushes, fsyncs and renames the file into place.
    pub(crate) fn commit(self) -> Result<()> {
        let target = self.target;
        let tmp = self
            .writer
            .into_inner()
            .map_err(|e| Error::io("write", &target)(e.into_error()))?;
        tmp.as_file()
            .sync_all()
            .map_err(Error::io("fsync", &target))?;
        tmp.persist(&target)
            .map_err(|e| Error::io("rename into place", &target)(e.error))?;
        fsync_dir(parent_of(&target))
    }
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(AtomicFile::create(path)?, path, bytes)
}

/// Writes `bytes` to `path` atomically, readable by its owner only.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(AtomicFile::create_private(path)?, path, bytes)
}

fn write_with(mut f: AtomicFile, path: &Path, bytes: &[u8]) -> Result<()> {
    f.writer()
        .write_all(bytes)
        .map_err(Error::io("write", path))?;
    f.commit()
}

/// The process's umask, read without changing it (`umask(2)` can only set it, racing other
/// threads); 022 where /proc does not say.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// A directory being filled under a temporary name beside its final path.
pub(crate) struct StagedDir {
    target: PathBuf,
    staging: Option<tempfile::TempDir>,
    _listed: Listed,
}

impl StagedDir {
    /// Starts staging `target`; its parent is created if missing.
    pub(crate) fn create(target: impl Into<PathBuf>) -> Result<Self> {
        let target = target.into();
        let parent = parent_of(&target).to_path_buf();
        fs::create_dir_all(&parent).map_err(Error::io("create directory", &parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".multipos-staging-")
            .tempdir_in(&parent)
            .map_err(Error::io("create a staging directory in", &parent))?;
        Ok(Self {
            target,
            _listed: Listed::new(staging.path()),
            staging: Some(staging),
        })
    }

    /// Where to write the content before [`StagedDir::commit`].
    pub(crate) fn path(&self) -> &Path {
        self.staging
            .as_ref()
            .expect("staging dir present until commit")
            .path()
    }

    /// Fsyncs every file and directory under the staging dir, then swaps it into place. An existing
    /// target is moved aside first and removed only after the new one is in place.
    pub(crate) fn commit(mut self) -> Result<PathBuf> {
        let staging = self.staging.take().expect("commit called once").keep();
        fsync_tree(&staging)?;
        let parent = parent_of(&self.target).to_path_buf();
        let old = if self.target.exists() {
            let aside = tempfile::Builder::new()
                .prefix(".multipos-old-")
                .tempdir_in(&parent)
                .map_err(Error::io("create a directory in", &parent))?
                .keep();
            fs::remove_dir(&aside).map_err(Error::io("remove", &aside))?;
            fs::rename(&self.target, &aside).map_err(Error::io("move aside", &self.target))?;
            Some(aside)
        } else {
            None
        };
        fs::rename(&staging, &self.target).map_err(Error::io("rename into place", &self.target))?;
        fsync_dir(&parent)?;
        if let Some(old) = old {
            fs::remove_dir_all(&old).map_err(Error::io("remove old directory", &old))?;
        }
        Ok(self.target)
    }
}

fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(Error::io("read directory", dir))? {
        let entry = entry.map_err(Error::io("read directory", dir))?;
        let path = entry.path();
        if entry
            .file_type()
            .map_err(Error::io("stat", &path))?
            .is_dir()
        {
            fsync_tree(&path)?;
        } else {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(Error::io("fsync", &path))?;
        }
    }
    fsync_dir(dir)
}

/// Copies the directory `src` to `dst` atomically (staged beside `dst`, then renamed into place).
pub(crate) fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    let staged = StagedDir::create(dst)?;
    for rel in super::tree::relative_files(src)? {
        let to = staged.path().join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(Error::io("create directory", parent))?;
        }
        fs::copy(src.join(&rel), &to).map_err(Error::io("copy", src.join(&rel)))?;
    }
    staged.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_readable_as_the_umask_allows_and_secrets_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        write_file(&dir.path().join("out"), b"x").unwrap();
        assert_eq!(mode(&dir.path().join("out")), 0o666 & !umask());
        assert_ne!(
            umask() & 0o044,
            0o044,
            "a umask this strict makes the check vacuous"
        );
        write_private_file(&dir.path().join("key"), b"x").unwrap();
        assert_eq!(mode(&dir.path().join("key")), 0o600);
    }

    #[test]
    fn uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.jsonl");
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.writer().write_all(b"partial").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unfinished_files_and_staging_dirs_are_removed_on_demand_and_finished_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done.txt");
        write_file(&done, b"whole").unwrap();
        let mut file = AtomicFile::create(dir.path().join("out.jsonl")).unwrap();
        file.writer().write_all(b"partial").unwrap();
        file.writer().flush().unwrap();
        let staged = StagedDir::create(dir.path().join("model")).unwrap();
        fs::write(staged.path().join("weights"), b"partial").unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
        // What a signal handler does before `_exit` (destructors never run), limited to this
        // test's directory: other tests write files at the same time.
        remove_unfinished_where(|p| p.starts_with(dir.path()));
        std::mem::forget(file);
        std::mem::forget(staged);
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left, vec![done]);
    }

    #[test]
    fn staged_dir_replaces_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("stale"), b"x").unwrap();
        let staged = StagedDir::create(&target).unwrap();
        fs::write(staged.path().join("fresh"), b"y").unwrap();
        staged.commit().unwrap();
        assert!(target.join("fresh").exists());
        assert!(!target.join("stale").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
