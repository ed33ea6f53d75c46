//! `memory::available` inside a real cgroup with a memory limit, as in a container or a Slurm job
//! with `--mem`: it must report what the limit leaves, not the host's free memory, since inference
//! sizes its streams by it. Needs root (as CI is); its own test binary because it moves the whole
//! process into the cgroup for a moment.
use std::fs;
use std::path::{Path, PathBuf};

const LIMIT: u64 = 256 << 20;

/// The process's memory cgroup directory, its limit file and its process list file: cgroup v1's
/// memory hierarchy when mounted, else v2's unified one.
fn memory_cgroup() -> (PathBuf, &'static str) {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    for line in own.lines() {
        let fields: Vec<&str> = line.splitn(3, ':').collect();
        if fields[1].split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(fields[2].trim_start_matches('/'));
            return (dir, "memory.limit_in_bytes");
        }
    }
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup");
    let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|r| Path::new(r).join("cgroup.controllers").exists())
        .expect("cgroup v2 mounted");
    (
        Path::new(root).join(path.trim_start_matches('/')),
        "memory.max",
    )
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {text:?} to {}: {e}", path.display()));
}

#[test]
fn a_cgroup_memory_limit_bounds_available_memory() {
    let before = multipos::memory::available().expect("Linux reports available memory");
    assert!(
        before > 4 * LIMIT,
        "the host has more than the test's limit free: {before}"
    );

    let (parent, limit_file) = memory_cgroup();
    if limit_file == "memory.max" {
        // v2 lets a cgroup's children limit memory only when it delegates the controller.
        let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory");
    }
    let child = parent.join(format!("multipos-test-{}", std::process::id()));
    fs::create_dir(&child).unwrap_or_else(|e| panic!("create {}: {e}", child.display()));
    write(&child.join(limit_file), &LIMIT.to_string());
    let pid = std::process::id().to_string();
    write(&child.join("cgroup.procs"), &pid);

    let inside = multipos::memory::available();

    write(&parent.join("cgroup.procs"), &pid);
    fs::remove_dir(&child).unwrap();
    let inside = inside.expect("available memory inside the cgroup");
    assert!(
        inside <= LIMIT,
        "inside a {LIMIT}-byte cgroup, {inside} bytes reported available"
    );
    assert!(inside > 0);
}
