//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! `checkpoints/step-00000040/` holds `model/` (a loadable sentence-transformers directory, with
//! the loss heads in `model/heads/`), `model-ema/` (the same for the weights' moving average, when
//! `train.ema_decay` is set),
//! `optimizer.safetensors` (AdamW moments), `state.json` (steps done, optimizer step count, data
//! cursor, seed, fingerprints of data and config), `metrics.jsonl` (the run's log so far) and
//! `MANIFEST.json` (size and XXH3 of every other file). It is
//! staged beside its final name, fsynced, renamed and the parent fsynced, so a crash leaves either no
//! checkpoint or a whole one; a checkpoint whose files do not match its manifest (truncated, bit
//! flipped) is reported and skipped in favour of the previous one. The data cursor needs no state of
//! its own: the plan is a pure function of (data, seed), so "steps done" locates the next batch.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::optim::AdamW;
use super::state::TrainState;
use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;
use crate::io::hash::file_digest;
use crate::io::json;
use crate::io::tree::safe_relative;
use crate::model::masks::MaskGenerator;

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Global steps completed (the next step to run).
    pub step: u64,
    pub optimizer_steps: u64,
    pub seed: u64,
    pub data_fingerprint: String,
    pub config_fingerprint: String,
    pub multipos_version: String,
    /// The data cursor: epoch and batch index (in that epoch) of the next global batch. Derived
    /// from `step` (the plan is a pure function of data and seed); recorded for people and tools.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub batch: u64,
    /// The settings `config_fingerprint` covers, so a refused resume can name what changed
    /// (absent in checkpoints of older versions).
    #[serde(default)]
    pub settings: serde_json::Value,
    /// The function the run's dropout masks come from; a resumed run keeps it, so it continues
    /// exactly (checkpoints of older versions name none: theirs is the first generator).
    #[serde(default = "MaskGenerator::before_versions")]
    pub dropout_masks: MaskGenerator,
}

impl CheckpointState {
    /// The record of `trainer` after `step` steps of the run `cfg` describes, on data of
    /// `data_fingerprint`, with the plan's cursor `(epoch, batch)` of that step. The one place a
    /// checkpoint's record is made, by `multipos train` and by a cluster's rank 0 alike.
    pub(crate) fn of(
        cfg: &crate::config::RunConfig,
        trainer: &Trainer,
        step: u64,
        data_fingerprint: &str,
        (epoch, batch): (u64, u64),
    ) -> Self {
        Self {
            step,
            optimizer_steps: trainer.optim.steps_taken(),
            seed: cfg.train.seed,
            data_fingerprint: data_fingerprint.to_string(),
            config_fingerprint: config_fingerprint(cfg),
            settings: resume_settings(cfg),
            multipos_version: env!("CARGO_PKG_VERSION").into(),
            epoch,
            batch,
            dropout_masks: trainer.opts.masks,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileEntry {
    bytes: u64,
    xxh3: String,
}

impl FileEntry {
    fn of(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.len() as u64,
            xxh3: checksum(bytes),
        }
    }

    /// The entry of a file on disk, read in chunks: a checkpoint holds the optimizer's moments,
    /// twice the model's size, which need not pass through memory at once.
    fn of_file(path: &Path) -> Result<Self> {
        let (bytes, hash) = file_digest(path)?;
        Ok(Self {
            bytes,
            xxh3: hex(hash),
        })
    }
}

/// Adds what the writer of a checkpoint did not know (the coordinator's data cursor and metrics
/// so far) to a checkpoint that is not yet in place and that [`verify`] found whole with `state`:
/// edits `state.json` with `edit`, adds `files` (relative path, contents), and updates the
/// manifest, each file fsynced. Returns the edited state.
pub fn annotate(
    ckpt: &Path,
    mut state: CheckpointState,
    edit: impl FnOnce(&mut CheckpointState),
    files: &[(&str, &[u8])],
) -> Result<CheckpointState> {
    edit(&mut state);
    let manifest_path = ckpt.join("MANIFEST.json");
    let mut manifest: BTreeMap<String, FileEntry> = json::read(&manifest_path)?;
    let state_json = json::to_pretty(&state);
    for (rel, bytes) in
        std::iter::once(("state.json", state_json.as_slice())).chain(files.iter().copied())
    {
        crate::io::atomic::write_file(&ckpt.join(rel), bytes)?;
        manifest.insert(rel.to_string(), FileEntry::of(bytes));
    }
    crate::io::atomic::write_file(&manifest_path, &json::to_pretty(&manifest))?;
    Ok(state)
}

fn checksum(bytes: &[u8]) -> String {
    hex(xxhash_rust::xxh3::xxh3_64(bytes))
}

fn hex(hash: u64) -> String {
    format!("{hash:016x}")
}

/// Which checkpoints pruning keeps: the newest `newest`, and the one of step `best` (the best
/// validation so far) however old.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keep {
    pub newest: usize,
    pub best: Option<u64>,
}

/// The directory name of the checkpoint after `step` steps.
pub fn name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint into `dir` (created if needed), with `extra` files (relative path,
/// contents) beside the tensors, and prunes the others as `keep` says.
pub(crate) fn write(
    dir: &Path,
    state: &CheckpointState,
    train: &TrainState,
    optim: &AdamW,
    keep: Keep,
    extra: &[(&str, &[u8])],
) -> Result<PathBuf> {
    let staged = StagedDir::create(dir.join(name(state.step)))?;
    let root = staged.path().to_path_buf();
    for (rel, bytes) in extra {
        fs::write(root.join(rel), bytes).map_err(Error::io("write", root.join(rel)))?;
    }
    train.write_dir(&root.join("model"))?;
    if train.ema.is_some() {
        train.write_ema_dir(&root.join("model-ema"))?;
    }
    let tensors: Vec<(String, Tensor)> = optim
        .state()
        .into_iter()
        .map(|(n, t)| (n, t.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&tensors, root.join("optimizer.safetensors"))
        .map_err(Error::Torch)?;
    fs::write(root.join("state.json"), json::to_pretty(state))
        .map_err(Error::io("write", root.join("state.json")))?;
    let mut manifest = BTreeMap::new();
    for rel in crate::io::tree::relative_files(&root)? {
        let entry = FileEntry::of_file(&root.join(&rel))?;
        manifest.insert(rel.to_string_lossy().into_owned(), entry);
    }
    fs::write(root.join("MANIFEST.json"), json::to_pretty(&manifest))
        .map_err(Error::io("write", root.join("MANIFEST.json")))?;
    let path = staged.commit()?;
    prune(dir, keep)?;
    Ok(path)
}

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(Error::io("read directory", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Moves a received checkpoint directory (verified, with `state`) to its place under `dir`,
/// replacing any older copy of the same step, and prunes; returns its final path.
pub(crate) fn adopt(
    dir: &Path,
    received: &Path,
    state: CheckpointState,
    keep: Keep,
) -> Result<(PathBuf, CheckpointState)> {
    let target = dir.join(name(state.step));
    if target.exists() {
        fs::remove_dir_all(&target).map_err(Error::io("remove", &target))?;
    }
    fs::rename(received, &target).map_err(Error::io("rename into place", &target))?;
    crate::io::atomic::fsync_dir(dir)?;
    prune(dir, keep)?;
    Ok((target, state))
}

/// Finds the checkpoint a `resume` setting names: "latest" in `dir`, or an explicit path.
pub(crate) fn find(dir: &Path, which: &str) -> Result<Option<(PathBuf, CheckpointState)>> {
    if which == "latest" {
        return latest_valid(dir);
    }
    let path = PathBuf::from(which);
    let state = verify(&path)?;
    Ok(Some((path, state)))
}

/// Checks that a checkpoint belongs to this data and configuration.
pub(crate) fn check_compatible(
    path: &Path,
    state: &CheckpointState,
    data_fingerprint: &str,
    cfg: &crate::config::RunConfig,
) -> Result<()> {
    if state.data_fingerprint != data_fingerprint {
        return Err(Error::invalid(
            path,
            format!(
                "was made on other data (fingerprint {}, now {data_fingerprint})",
                state.data_fingerprint
            ),
        ));
    }
    if state.config_fingerprint != config_fingerprint(cfg) {
        let mut changed = Vec::new();
        differences(&state.settings, &resume_settings(cfg), "", &mut changed);
        let what = if state.settings.is_null() || changed.is_empty() {
            "other model/data/train settings".to_string()
        } else {
            changed.join(", ")
        };
        return Err(Error::invalid(
            path,
            format!("was made with other settings ({what}): resume with the same configuration"),
        ));
    }
    Ok(())
}

/// The prefix of directories that receive uploaded checkpoints (removed when the upload ends).
pub(crate) const INCOMING: &str = ".multipos-incoming-";

/// Removes what uploads left behind when their process died; only at start, when none is running.
pub(crate) fn remove_incoming(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(INCOMING) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn prune(dir: &Path, keep: Keep) -> Result<()> {
    // Staging directories of writes that a crash interrupted are garbage: nothing refers to them.
    // Uploads still being received are not: they clean up after themselves.
    for entry in fs::read_dir(dir)
        .map_err(Error::io("read directory", dir))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".multipos-") && !name.starts_with(INCOMING) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let all = list(dir)?;
    let best = keep.best.map(name);
    for old in all
        .iter()
        .take(all.len().saturating_sub(keep.newest.max(1)))
    {
        if best
            .as_deref()
            .is_some_and(|b| old.file_name().is_some_and(|n| n == b))
        {
            continue;
        }
        fs::remove_dir_all(old).map_err(Error::io("remove old checkpoint", old))?;
    }
    Ok(())
}

/// Checks a checkpoint against its manifest and reads its state.
pub fn verify(ckpt: &Path) -> Result<CheckpointState> {
    let manifest: BTreeMap<String, FileEntry> = json::read(&ckpt.join("MANIFEST.json"))?;
    for (rel, want) in &manifest {
        // A checkpoint may come from the network: its names stay inside it, each a regular file
        // (not a link, not a device), read only once its size is what the manifest says.
        let path = safe_relative(rel)
            .filter(|r| r.as_os_str() != "MANIFEST.json")
            .map(|r| ckpt.join(r))
            .ok_or_else(|| {
                Error::invalid(
                    ckpt.join("MANIFEST.json"),
                    format!("names {rel:?}, which is not a plain path inside the checkpoint"),
                )
            })?;
        let meta = fs::symlink_metadata(&path).map_err(Error::io("read", &path))?;
        if !meta.is_file() {
            return Err(Error::invalid(&path, "is not a regular file"));
        }
        if meta.len() != want.bytes {
            return Err(Error::invalid(
                &path,
                format!(
                    "{} bytes, the manifest says {} (truncated?)",
                    meta.len(),
                    want.bytes
                ),
            ));
        }
        let got = FileEntry::of_file(&path)?;
        if got.bytes != want.bytes {
            return Err(Error::invalid(&path, "changed while it was read"));
        }
        if got.xxh3 != want.xxh3 {
            return Err(Error::invalid(&path, "checksum mismatch (corrupted)"));
        }
    }
    for required in [
        "state.json",
        "optimizer.safetensors",
        "model/model.safetensors",
    ] {
        if !manifest.contains_key(required) {
            return Err(Error::invalid(
                ckpt,
                format!("the manifest lacks {required}"),
            ));
        }
    }
    json::read(&ckpt.join("state.json"))
}

/// The newest checkpoint of `dir` that verifies; damaged newer ones are reported and skipped.
pub fn latest_valid(dir: &Path) -> Result<Option<(PathBuf, CheckpointState)>> {
    for ckpt in list(dir)?.into_iter().rev() {
        match verify(&ckpt) {
            Ok(state) => return Ok(Some((ckpt, state))),
            Err(e) => {
                tracing::warn!(checkpoint = %ckpt.display(), error = %e, "skipping a damaged checkpoint")
            }
        }
    }
    Ok(None)
}

/// Loads a checkpoint's weights and loss heads, its AdamW moments and its dropout generator into
/// `trainer`.
pub(crate) fn restore(ckpt: &Path, state: &CheckpointState, trainer: &mut Trainer) -> Result<()> {
    let train = &mut trainer.state;
    train.load_dir(&ckpt.join("model"))?;
    if train.ema.is_some() {
        let ema = ckpt.join("model-ema");
        if !ema.is_dir() {
            return Err(Error::invalid(
                ckpt,
                "has no model-ema/: it was written without train.ema_decay",
            ));
        }
        train.load_ema_dir(&ema)?;
    }
    let path = ckpt.join("optimizer.safetensors");
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
        .map_err(Error::Torch)?
        .into_iter()
        .collect();
    trainer
        .optim
        .load_state(state.optimizer_steps, |name| {
            tensors.get(name).map(Tensor::shallow_clone)
        })
        .map_err(|reason| Error::invalid(&path, reason))?;
    trainer.opts.masks = state.dropout_masks;
    Ok(())
}

/// The identity of a run that a worker's in-memory state must belong to before the coordinator
/// adopts it: the config fingerprint and the data fingerprint.
pub(crate) fn run_fingerprint(cfg: &crate::config::RunConfig, data_fingerprint: &str) -> String {
    format!("{}-{data_fingerprint}", config_fingerprint(cfg))
}

/// A fingerprint of the settings that must not change across a resume (model, data, training).
pub(crate) fn config_fingerprint(cfg: &crate::config::RunConfig) -> String {
    checksum(resume_settings(cfg).to_string().as_bytes())
}

/// Every `path (was → now)` where two settings trees differ.
fn differences(
    was: &serde_json::Value,
    now: &serde_json::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (was, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let null = Value::Null;
                differences(
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    &join(k),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} → {b}")),
        _ => {}
    }
}

/// The settings that must not change across a resume (model, data, training).
pub(crate) fn resume_settings(cfg: &crate::config::RunConfig) -> serde_json::Value {
    serde_json::json!({"model": cfg.model.max_seq_length, "tasks": cfg.tasks(), "train": {
        "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "sampler": cfg.train.sampler, "ema_decay": cfg.train.ema_decay,
        "seed": cfg.train.seed, "dropout": cfg.train.dropout, "weight_decay": cfg.train.weight_decay,
        "max_grad_norm": cfg.train.max_grad_norm, "epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps,
        "warmup_steps": cfg.train.warmup_steps, "warmup_ratio": cfg.train.warmup_ratio,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint directory whose manifest names `entry` (with the size and checksum of `bytes`).
    fn with_manifest(entry: &str, bytes: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let manifest = BTreeMap::from([(entry.to_string(), FileEntry::of(bytes))]);
        fs::write(dir.path().join("MANIFEST.json"), json::to_pretty(&manifest)).unwrap();
        dir
    }

    #[test]
    fn a_manifest_cannot_name_files_outside_its_checkpoint() {
        let outside = tempfile::NamedTempFile::new().unwrap();
        fs::write(outside.path(), b"secret").unwrap();
        let up = format!(
            "../{}",
            outside.path().file_name().unwrap().to_string_lossy()
        );
        for entry in [
            up.as_str(),
            "/dev/zero",
            "/etc/hostname",
            "MANIFEST.json",
            ".hidden",
        ] {
            let dir = with_manifest(entry, b"secret");
            let err = verify(dir.path()).unwrap_err().to_string();
            assert!(err.contains("not a plain path"), "{entry}: {err}");
        }
        // A link or a device inside the checkpoint is not read either.
        let dir = with_manifest("state.json", b"secret");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("state.json")).unwrap();
        let err = verify(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let dir = with_manifest("zero", b"");
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();
        assert!(verify(dir.path()).is_err());
    }
}
