//! The library's error type. Every variant names the file (and line or field) a user must fix.
use std::path::PathBuf;

/// Errors from loading, running and saving models and from reading user data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on `path` failed. The OS error is part of the message, not a separate
    /// cause: printed once.
    #[error("{action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file exists but its content is not what multipos expects.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// One line of a user's input file is bad.
    #[error("{path}:{line}: {reason}")]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// One row of a user's table (Parquet or Arrow) is bad.
    #[error("{path}: {place}{}: {reason}", column.as_ref().map(|c| format!(", column {c:?}")).unwrap_or_default())]
    BadRow {
        path: PathBuf,
        /// The row counted from 0 and, in Parquet, its row group.
        place: String,
        column: Option<String>,
        reason: String,
    },
    /// The model directory describes something multipos does not support.
    #[error("{path}: unsupported {what}: {reason}")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    /// A libtorch call failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The tokenizer failed on some input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A run stopped as asked (`stop_after_steps`), with a checkpoint to resume from.
    #[error("stopped after {steps_done} of {total} steps as asked; continue with --resume")]
    Stopped { steps_done: u64, total: u64 },
    /// A collective of a cluster step failed; the step is abandoned, never half-applied.
    #[error("collective: {0}")]
    Collective(#[from] crate::collective::CollectiveError),
    /// A request the caller made cannot be satisfied (bad device, bad option value).
    #[error("{0}")]
    Usage(String),
    /// A peer (the coordinator, a worker, a donor) broke the protocol: a malformed message or
    /// stream, an unsafe path, an answer that contradicts this process's state.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The run was aborted because its numbers are not finite (`train.on_nonfinite = "abort"`),
    /// here or, in a cluster, as the coordinator decided.
    #[error("{0}")]
    Diverged(String),
    /// The run was interrupted (Ctrl-C, SIGTERM) before it could finish or save a checkpoint.
    #[error("{0}")]
    Interrupted(String),
    /// A listener, a connection or a server failed (the address and the cause are in the text).
    #[error("{0}")]
    Network(String),
    /// Something received over the network passed its cap.
    #[error("{0}")]
    TooLarge(String),
    /// An invariant of multipos itself does not hold: a bug to report, not an input to fix.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done and to which path.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |error| Error::Io {
            action,
            path,
            error,
        }
    }

    /// An invalid-content error for `path`.
    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
