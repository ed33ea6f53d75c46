//! Helpers shared by the benchmarks: locating the Python reference and the shared data.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter of the pinned reference environment (`deploy/pyref.sh` installs it).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MULTIPOS_PYREF") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("MULTIPOS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/multipos")
        });
    cache.join("pyref/bin/python")
}

/// Runs a reference script and returns its last stdout line parsed as JSON.
pub fn run_python(script: &str, args: &[String]) -> serde_json::Value {
    let py = python();
    assert!(
        py.exists(),
        "Python reference not found at {}: run deploy/pyref.sh",
        py.display()
    );
    let out = Command::new(&py)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/reference")
                .join(script),
        )
        .args(args)
        .output()
        .expect("start python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON line")
}

/// `../shared/data/<name>` beside the checkout, when present (benchmarks may read it; tests never do).
pub fn shared_data(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(name);
    p.exists().then_some(p)
}

/// A value from the environment, or a default.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `multipos launch --config configs/local-2workers.toml --workers W --set output.dir=OUT`, run
/// from the checkout.
pub fn launch_command(workers: usize, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_multipos"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["launch", "--config", "configs/local-2workers.toml"])
        .args(["--workers", &workers.to_string()])
        .args(["--set", &format!("output.dir=\"{}\"", out.display())])
        .env("RUST_LOG", "warn");
    c
}

/// The records of a run's `metrics.jsonl` with `"event": kind` (empty while it does not exist).
pub fn events(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == kind)
        .collect()
}

/// This process's peak resident memory so far, in MiB (`VmHWM`).
pub fn own_peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Runs `cmd` to completion (it must succeed) and returns its peak resident memory in MiB.
// wait4 reaps the child (clippy does not see it) and reports its resource usage, which wait() does not.
#[allow(clippy::zombie_processes)]
pub fn peak_rss_mib(mut cmd: Command) -> f64 {
    let child = cmd.spawn().expect("start the child process");
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert!(
        pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed"
    );
    usage.ru_maxrss as f64 / 1024.0
}
