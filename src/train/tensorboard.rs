//! The run's metrics as TensorBoard event files (`output.tensorboard`): every record of
//! `metrics.jsonl` that carries numbers at a step becomes one event of scalar summaries, in
//! TensorFlow's record framing (length, masked CRC-32C of the length, the event, masked CRC-32C
//! of the event). One process and the coordinator write through the same `MetricsLog`, so both
//! log the same scalars.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::pb::tensorboard::{Event, Summary, event, summary};

/// An event file of the run, written as metrics come.
pub(crate) struct Board {
    path: PathBuf,
    out: BufWriter<File>,
}

impl Board {
    /// Starts a new event file in `dir` (made if missing); a resumed run adds a file of its own,
    /// which TensorBoard reads together with the earlier ones.
    pub(crate) fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        let secs = now().floor() as u64;
        let host = file_hostname();
        let path = dir.join(format!(
            "events.out.tfevents.{secs}.{host}.{}.multipos",
            std::process::id()
        ));
        let file = File::create_new(&path).map_err(Error::io("create", &path))?;
        let mut board = Self {
            path,
            out: BufWriter::new(file),
        };
        board.write(&Event {
            wall_time: now(),
            step: 0,
            what: Some(event::What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(board)
    }

    /// Logs the scalars of a metrics record, if it has any.
    pub(crate) fn record(&mut self, record: &Value) -> Result<()> {
        let Some((step, values)) = scalars(record) else {
            return Ok(());
        };
        let value = values
            .into_iter()
            .map(|(tag, v)| summary::Value {
                tag,
                value: Some(summary::value::Value::SimpleValue(v)),
            })
            .collect();
        self.write(&Event {
            wall_time: now(),
            step,
            what: Some(event::What::Summary(Summary { value })),
        })
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        self.out
            .write_all(&frame(&event.encode_to_vec()))
            .and_then(|_| self.out.flush())
            .map_err(Error::io("write", &self.path))
    }
}

/// Removes the event files multipos wrote in `dir` (a fresh run replaces an earlier run's); other
/// files stay.
pub(crate) fn remove_event_files(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read", dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(Error::io("read", dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("events.out.tfevents.") && name.ends_with(".multipos") {
            std::fs::remove_file(&path).map_err(Error::io("remove", &path))?;
        }
    }
    Ok(())
}

/// The step of a metrics record and its scalars by tag: a step's loss (by task), learning rate,
/// gradient norm, rate and the parts of its time; an evaluation's metrics. `None` for a record
/// without numbers at a step.
fn scalars(record: &Value) -> Option<(i64, Vec<(String, f32)>)> {
    let step = record.get("step")?.as_i64()?;
    let mut out = Vec::new();
    match record.get("event")?.as_str()? {
        "step" => {
            let task = record
                .get("task")
                .and_then(Value::as_str)
                .unwrap_or("train");
            let fields = record.as_object()?;
            for (key, value) in fields {
                let Some(v) = value.as_f64() else { continue };
                let tag = match key.as_str() {
                    "loss" => format!("loss/{task}"),
                    "lr" | "grad_norm" | "pairs_per_s" => format!("train/{key}"),
                    "seconds" => "time/step".into(),
                    k => match k.strip_suffix("_seconds") {
                        Some(part) => format!("time/{part}"),
                        None => continue,
                    },
                };
                out.push((tag, v as f32));
            }
        }
        "eval" => leaves("eval", record.get("metrics")?, &mut out),
        _ => return None,
    }
    (!out.is_empty()).then_some((step, out))
}

/// Every number under `value`, tagged by its path below `prefix`.
fn leaves(prefix: &str, value: &Value, out: &mut Vec<(String, f32)>) {
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.push((prefix.to_string(), v as f32));
            }
        }
        Value::Object(fields) => {
            for (k, v) in fields {
                leaves(&format!("{prefix}/{k}"), v, out);
            }
        }
        _ => {}
    }
}

/// One record as TensorFlow frames it.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// CRC-32C, masked as TensorFlow's records mask it (a CRC of data holding CRCs stays useful).
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name as event file names carry it (characters a file name may hold).
fn file_hostname() -> String {
    let name: String = crate::host::hostname()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_are_framed_with_masked_crc32c() {
        // CRC-32C's check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let framed = frame(b"abc");
        assert_eq!(framed.len(), 8 + 4 + 3 + 4);
        assert_eq!(&framed[..8], &3u64.to_le_bytes());
        assert_eq!(
            &framed[8..12],
            &masked_crc(&3u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&framed[12..15], b"abc");
        let crc = crc32c::crc32c(b"abc");
        let unmasked = u32::from_le_bytes(framed[15..19].try_into().unwrap())
            .wrapping_sub(0xa282_ead8)
            .rotate_left(15);
        assert_eq!(unmasked, crc);
    }

    #[test]
    fn steps_and_evaluations_become_tagged_scalars() {
        let step = json!({"event": "step", "step": 3, "task": "qa", "loss": 0.5, "lr": 1e-5,
            "grad_norm": 2.0, "pairs_per_s": 10.0, "seconds": 1.5, "forward_seconds": 0.5,
            "epoch": 0, "batch": 2, "pairs": 32, "elapsed": 9.0});
        let (at, mut s) = scalars(&step).unwrap();
        s.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(at, 3);
        let tags: Vec<&str> = s.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            tags,
            [
                "loss/qa",
                "time/forward",
                "time/step",
                "train/grad_norm",
                "train/lr",
                "train/pairs_per_s"
            ]
        );
        let eval = json!({"event": "eval", "step": 4, "seconds": 2.0,
            "metrics": {"dev": {"ndcg@10": 0.75, "mrr@10": 0.5}}});
        let (at, s) = scalars(&eval).unwrap();
        assert_eq!(at, 4);
        assert!(s.contains(&("eval/dev/ndcg@10".to_string(), 0.75)));
        assert!(scalars(&json!({"event": "skip", "step": 5, "reason": "nan"})).is_none());
        assert!(scalars(&json!({"event": "generation", "generation": 1})).is_none());
    }
}
