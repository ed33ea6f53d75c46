//! The run's machine-readable log: one JSON object per line (`metrics.jsonl`), flushed as it comes.
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Machine-readable metrics, one JSON object per line, flushed as they come.
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Creates (truncates) the log.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(Error::io("create", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Opens the log for appending (a resumed run continues its predecessor's log).
    pub fn append(path: &Path) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(Error::io("open", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Drops the records `drop` selects, rewriting the file atomically (a run that rolls back to a
    /// checkpoint removes the steps it will run again, so every step stays logged once).
    pub fn remove(&mut self, drop: impl Fn(&serde_json::Value) -> bool) -> Result<usize> {
        self.out.flush().map_err(Error::io("write", &self.path))?;
        let text = fs::read_to_string(&self.path).map_err(Error::io("read", &self.path))?;
        let mut kept = String::with_capacity(text.len());
        let mut removed = 0;
        for line in text.lines() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) if drop(&v) => removed += 1,
                _ => {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        if removed > 0 {
            crate::io::atomic::write_file(&self.path, kept.as_bytes())?;
            *self = Self::append(&self.path)?;
        }
        Ok(removed)
    }

    /// Everything logged so far.
    pub fn contents(&mut self) -> Result<Vec<u8>> {
        self.out.flush().map_err(Error::io("write", &self.path))?;
        fs::read(&self.path).map_err(Error::io("read", &self.path))
    }

    /// Appends one record.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)
            .map_err(|e| Error::io("write", &self.path)(e.into()))?;
        self.out
            .write_all(b"\n")
            .and_then(|_| self.out.flush())
            .map_err(Error::io("write", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A rollback trims the steps that will run again and keeps everything else, in order.
    #[test]
    fn removing_records_rewrites_the_log_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        for step in 1..=5u64 {
            log.write(&json!({"event": "step", "step": step})).unwrap();
        }
        log.write(&json!({"event": "checkpoint", "step": 4}))
            .unwrap();
        let removed = log
            .remove(|v| v["event"] == "step" && v["step"].as_u64().is_some_and(|s| s > 3))
            .unwrap();
        assert_eq!(removed, 2);
        log.write(&json!({"event": "step", "step": 4})).unwrap();
        let kinds: Vec<(String, u64)> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| {
                (
                    v["event"].as_str().unwrap().to_string(),
                    v["step"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, u64)> = [
            ("step", 1),
            ("step", 2),
            ("step", 3),
            ("checkpoint", 4),
            ("step", 4),
        ]
        .iter()
        .map(|(k, s)| (k.to_string(), *s))
        .collect();
        assert_eq!(kinds, want);
        assert_eq!(log.remove(|_| false).unwrap(), 0);
    }
}
