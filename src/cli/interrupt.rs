//! Ctrl-C for the commands that write their output once, at the end (`embed`, `eval`, `mine`,
//! `average`, `convert`, `demo`, `certs`): the process removes the temporary files it was writing
//! and exits at once with 128 + the signal, whatever SIGINT disposition it inherited (a shell starts
//! background jobs with SIGINT ignored). Their outputs are written under a temporary name and
//! renamed, so an interrupted command leaves neither a partial output nor a temporary file.
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::io::atomic;

/// Installs the handlers: a thread that waits for the first signal.
pub(crate) fn exit_on_signal() -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                atomic::remove_unfinished();
                // SAFETY: ends the process without running other threads' destructors, which may
                // be in the middle of writing what was just removed.
                unsafe { libc::_exit(128 + sig) };
            }
        })?;
    Ok(())
}
