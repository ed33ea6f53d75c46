//! The coordinator's two logs (`metrics.jsonl`, `batches.jsonl`), owned by one writer thread.
//!
//! Handlers only enqueue: no file I/O happens under the state lock or on the async threads, and
//! records land in the order they were sent, a rollback's rewrite included (docs/design.md §9).
//! A step is answered only after `flushed` confirms its records reached the file, so a coordinator
//! killed right after a commit never leaves an applied step unlogged.
use std::sync::mpsc;
use std::thread;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::train::metrics::MetricsLog;

/// Which of the two logs a record goes to.
#[derive(Clone, Copy)]
pub(crate) enum Log {
    /// `metrics.jsonl`: steps and events.
    Metrics,
    /// `batches.jsonl`: which texts each step trained on.
    Batches,
}

enum Op {
    Write(Log, serde_json::Value),
    ForgetStepsAfter(u64),
    Contents(oneshot::Sender<Result<Vec<u8>>>),
    Flush(oneshot::Sender<Result<()>>),
}

/// The sending side of the writer thread; the thread ends when this is dropped.
pub(crate) struct Journal {
    ops: mpsc::Sender<Op>,
}

impl Journal {
    /// Starts the writer thread, which takes both logs over.
    pub(crate) fn start(metrics: MetricsLog, batches: MetricsLog) -> Result<Self> {
        let (ops, rx) = mpsc::channel();
        thread::Builder::new()
            .name("coordinator-logs".into())
            .spawn(move || Writer::new(metrics, batches).run(rx))
            .map_err(|e| Error::Usage(format!("cannot start the coordinator's log writer: {e}")))?;
        Ok(Self { ops })
    }

    /// Queues a record; never blocks.
    pub(crate) fn write(&self, log: Log, record: serde_json::Value) {
        self.send(Op::Write(log, record));
    }

    /// Queues the removal, from both logs, of the step records after `step` (a rollback).
    pub(crate) fn forget_steps_after(&self, step: u64) {
        self.send(Op::ForgetStepsAfter(step));
    }

    /// Waits until everything queued before is written; the first write error since the last
    /// flush, if any.
    pub(crate) async fn flushed(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Flush(tx));
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Everything in `metrics.jsonl` once the records queued before are written (blocking: for
    /// callers off the async threads).
    pub(crate) fn metrics_contents(&self) -> Result<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Contents(tx));
        rx.blocking_recv().unwrap_or_else(|_| Err(gone()))
    }

    fn send(&self, op: Op) {
        // The thread only ends when this sender drops, or it panicked, which the next flush reports.
        let _ = self.ops.send(op);
    }
}

fn gone() -> Error {
    Error::Internal("the coordinator's log writer stopped".into())
}

/// The writer thread's side: the two files and the first error not yet reported by a flush.
struct Writer {
    metrics: MetricsLog,
    batches: MetricsLog,
    failed: Option<Error>,
}

impl Writer {
    fn new(metrics: MetricsLog, batches: MetricsLog) -> Self {
        Self {
            metrics,
            batches,
            failed: None,
        }
    }

    fn run(mut self, ops: mpsc::Receiver<Op>) {
        for op in ops {
            match op {
                Op::Write(log, record) => {
                    let file = match log {
                        Log::Metrics => &mut self.metrics,
                        Log::Batches => &mut self.batches,
                    };
                    note(&mut self.failed, file.write(&record));
                }
                Op::ForgetStepsAfter(step) => {
                    for file in [&mut self.metrics, &mut self.batches] {
                        note(&mut self.failed, file.remove_steps_after(step).map(drop));
                    }
                }
                Op::Contents(reply) => {
                    let _ = reply.send(self.metrics.contents());
                }
                Op::Flush(reply) => {
                    let _ = reply.send(self.failed.take().map_or(Ok(()), Err));
                }
            }
        }
    }
}

/// Logs a failed write and keeps the first one for the next flush to report.
fn note(failed: &mut Option<Error>, result: Result<()>) {
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot write the coordinator's log");
        failed.get_or_insert(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn records_and_rollbacks_land_in_the_order_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (m, b) = (dir.path().join("m.jsonl"), dir.path().join("b.jsonl"));
        let journal = Journal::start(
            MetricsLog::create(&m).unwrap(),
            MetricsLog::create(&b).unwrap(),
        )
        .unwrap();
        for step in 1..=5u64 {
            journal.write(
                Log::Metrics,
                serde_json::json!({"event": "step", "step": step}),
            );
            journal.write(Log::Batches, serde_json::json!({"step": step}));
        }
        journal.forget_steps_after(3);
        journal.write(Log::Metrics, serde_json::json!({"event": "generation"}));
        journal.write(
            Log::Metrics,
            serde_json::json!({"event": "step", "step": 4}),
        );
        journal.flushed().await.unwrap();
        let steps: Vec<_> = lines(&m).iter().map(|v| v["step"].as_u64()).collect();
        assert_eq!(steps, [Some(1), Some(2), Some(3), None, Some(4)]);
        assert_eq!(lines(&b).len(), 3);
        let contents = tokio::task::spawn_blocking(move || journal.metrics_contents())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(contents, std::fs::read(&m).unwrap());
    }

    #[tokio::test]
    async fn a_write_error_is_reported_by_the_next_flush_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.jsonl");
        let log = MetricsLog::create(&m).unwrap();
        std::fs::remove_file(&m).unwrap();
        std::fs::create_dir(&m).unwrap();
        let journal =
            Journal::start(log, MetricsLog::create(&dir.path().join("b")).unwrap()).unwrap();
        journal.forget_steps_after(0);
        let err = journal.flushed().await.unwrap_err().to_string();
        assert!(err.contains("m.jsonl"), "{err}");
        journal.flushed().await.unwrap();
    }
}
