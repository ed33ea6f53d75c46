//! The run's machine-readable log: one JSON object per line (`metrics.jsonl`), flushed as it comes,
//! and the same numbers as TensorBoard event files when `output.tensorboard` asks.
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::tensorboard::Board;
use crate::config::RunConfig;
use crate::error::{Error, Result};

/// Machine-readable metrics, one JSON object per line, flushed as they come.
pub(crate) struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
    /// TensorBoard's copy of the numbers, when asked for.
    board: Option<Board>,
}

impl MetricsLog {
    /// The run's `metrics.jsonl`: continued when the run resumes, else started afresh; with
    /// TensorBoard event files in `output.dir/tensorboard/` when `output.tensorboard` is set (a
    /// fresh run removes the event files an earlier run there wrote, as it replaces its log).
    pub(crate) fn for_run(cfg: &RunConfig) -> Result<Self> {
        let path = cfg.output.dir.join("metrics.jsonl");
        let resuming = cfg.train.resume.is_some();
        let mut log = if resuming {
            Self::append(&path)?
        } else {
            Self::create(&path)?
        };
        let board_dir = cfg.output.dir.join("tensorboard");
        if !resuming {
            super::tensorboard::remove_event_files(&board_dir)?;
        }
        if cfg.output.tensorboard {
            log.board = Some(Board::create(&board_dir)?);
        }
        Ok(log)
    }

    /// Creates (truncates) the log.
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(Error::io("create", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            board: None,
        })
    }

    /// Opens the log for appending (a resumed run continues its predecessor's log).
    pub(crate) fn append(path: &Path) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(Error::io("open", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            board: None,
        })
    }

    /// Drops the step records (event `step`, or no event: the batch log) after `step`, which a run
    /// rolled back to a checkpoint runs again, so every step stays logged once. Step records are
    /// appended in increasing order, so only the file's tail after the last kept step is read and
    /// rewritten: the cost is that of the steps since the checkpoint, not of the whole run
    /// (docs/design.md §9).
    pub(crate) fn remove_steps_after(&mut self, step: u64) -> Result<usize> {
        self.out.flush().map_err(Error::io("write", &self.path))?;
        let mut file = File::options()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(Error::io("open", &self.path))?;
        let Some((cut, tail)) = self.tail_after(&mut file, step)? else {
            return Ok(0);
        };
        let mut kept = Vec::with_capacity(tail.len());
        let mut removed = 0;
        for line in tail.split_inclusive(|b| *b == b'\n') {
            if step_after(line, step) == Some(true) {
                removed += 1;
            } else {
                kept.extend_from_slice(line);
            }
        }
        file.set_len(cut)
            .and_then(|_| file.seek(SeekFrom::Start(cut)))
            .and_then(|_| file.write_all(&kept))
            .and_then(|_| file.sync_data())
            .map_err(Error::io("rewrite", &self.path))?;
        let board = self.board.take();
        *self = Self::append(&self.path)?;
        self.board = board;
        Ok(removed)
    }

    /// The file's bytes from the first step record after `step` on, and their offset; `None` when
    /// there is none. Reads backwards in growing windows until a step record at or before `step`.
    fn tail_after(&self, file: &mut File, step: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let len = file
            .metadata()
            .map_err(Error::io("stat", &self.path))?
            .len();
        let mut window = 64 * 1024u64;
        loop {
            let start = len.saturating_sub(window);
            let mut bytes = vec![0; (len - start) as usize];
            file.seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(Error::io("read", &self.path))?;
            // The first line of a window that does not start the file may be cut: skip it.
            let skip = if start == 0 {
                0
            } else {
                bytes
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(bytes.len(), |i| i + 1)
            };
            let mut first_dropped = None;
            let mut offset = bytes.len();
            let lines: Vec<&[u8]> = bytes[skip..].split_inclusive(|b| *b == b'\n').collect();
            for line in lines.iter().rev() {
                offset -= line.len();
                match step_after(line, step) {
                    Some(true) => first_dropped = Some(offset),
                    Some(false) => {
                        return Ok(first_dropped.map(|o| (start + o as u64, bytes[o..].to_vec())));
                    }
                    None => {}
                }
            }
            if start == 0 {
                return Ok(first_dropped.map(|o| (o as u64, bytes[o..].to_vec())));
            }
            window *= 4;
        }
    }

    /// Everything logged so far.
    pub(crate) fn contents(&mut self) -> Result<Vec<u8>> {
        self.out.flush().map_err(Error::io("write", &self.path))?;
        fs::read(&self.path).map_err(Error::io("read", &self.path))
    }

    /// Appends one record.
    pub(crate) fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)
            .map_err(|e| Error::io("write", &self.path)(e.into()))?;
        self.out
            .write_all(b"\n")
            .and_then(|_| self.out.flush())
            .map_err(Error::io("write", &self.path))?;
        match &mut self.board {
            Some(board) => board.record(record),
            None => Ok(()),
        }
    }
}

/// Whether a record is a step record after `step`; `None` for a record that is not a step's.
fn step_after(line: &[u8], step: u64) -> Option<bool> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if v.get("event").is_some_and(|e| e != "step") {
        return None;
    }
    Some(v.get("step")?.as_u64()? > step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn records(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A rollback trims the steps that will run again and keeps everything else, in order, also
    /// when the steps to trim reach back past the first window read.
    #[test]
    fn removing_steps_rewrites_the_tail_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        log.write(&json!({"event": "data", "fingerprint": "x"}))
            .unwrap();
        for step in 1..=3000u64 {
            log.write(&json!({"event": "step", "step": step, "loss": 0.5}))
                .unwrap();
            log.write(&json!({"step": step, "rank": 0})).unwrap();
            if step % 700 == 0 {
                log.write(&json!({"event": "checkpoint", "step": step}))
                    .unwrap();
            }
        }
        let before = records(&path);
        let mut removed = 0;
        for cut in [2990, 2100, 5] {
            removed += log.remove_steps_after(cut).unwrap();
            let is_step_after = |v: &serde_json::Value| {
                v.get("event").is_none_or(|e| e == "step") && v["step"].as_u64().unwrap() > cut
            };
            let want: Vec<_> = before
                .iter()
                .filter(|v| !is_step_after(v))
                .cloned()
                .collect();
            assert_eq!(records(&path), want, "cut at {cut}");
            assert_eq!(removed, before.len() - want.len());
        }
        log.write(&json!({"event": "step", "step": 6})).unwrap();
        let last = records(&path).pop().unwrap();
        assert_eq!(last, json!({"event": "step", "step": 6}));
        assert_eq!(log.remove_steps_after(6).unwrap(), 0);
    }
}
