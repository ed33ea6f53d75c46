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
