//! Log lines on stderr: text (colours only on a terminal, so files and tools read plain text) or
//! one JSON object per line for log shippers; processes started by `launch` log alike.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The environment variable of `--log-format`, inherited by the processes `launch` starts.
pub(crate) const LOG_FORMAT_ENV: &str = "MULTIPOS_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the process's logger (`RUST_LOG` filters; default `info`).
pub fn init(format: LogFormat) {
    if format == LogFormat::Json {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var(LOG_FORMAT_ENV, "json") };
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Whether this process logs JSON.
pub(crate) fn json() -> bool {
    std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v == "json")
}
