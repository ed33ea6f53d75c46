//! SIGINT and SIGTERM as one stream: what Ctrl-C, `kill` and schedulers (Slurm, Kubernetes) send
//! before they end a job.
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::error::{Error, Result};

/// Receives SIGINT and SIGTERM (installed for the life of the process once created).
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers; must run inside a tokio runtime.
    pub(crate) fn new() -> Result<Self> {
        let install = |kind| {
            signal(kind).map_err(|e| Error::Usage(format!("cannot install a signal handler: {e}")))
        };
        Ok(Self {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
