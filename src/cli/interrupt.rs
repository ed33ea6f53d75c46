//! Ctrl-C for the commands that write their output once, at the end (`embed`, `eval`, `mine`,
//! `average`, `convert`, `demo`, `certs`): the process exits at once with 128 + the signal, whatever
//! SIGINT disposition it inherited (a shell starts background jobs with SIGINT ignored). Their
//! outputs are written under a temporary name and renamed, so an interrupted command leaves no
//! partial file under the output's name.
use signal_hook::consts::{SIGINT, SIGTERM};

/// Installs the handlers.
pub fn exit_on_signal() -> anyhow::Result<()> {
    for sig in [SIGINT, SIGTERM] {
        // SAFETY: `_exit` is async-signal-safe; the closure touches nothing else.
        unsafe { signal_hook::low_level::register(sig, move || libc::_exit(128 + sig)) }?;
    }
    Ok(())
}
