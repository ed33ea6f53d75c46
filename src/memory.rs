//! How much memory this process may still allocate: the kernel's estimate, lowered to what its
//! cgroups (a container's or a job's limit, v1 or v2) have left.
use std::fs;
use std::path::{Path, PathBuf};

/// Bytes this process may still allocate, `None` where nothing says (not Linux).
pub fn available() -> Option<u64> {
    let host = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| meminfo_available(&m));
    let cgroup = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|own| cgroup_available(&own));
    match (host, cgroup) {
        (Some(h), Some(c)) => Some(h.min(c)),
        (h, c) => h.or(c),
    }
}

fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// The files of one cgroup hierarchy: where it is mounted and what its limit and usage are called.
struct Hierarchy {
    roots: &'static [&'static str],
    limit: &'static str,
    usage: &'static str,
    /// The `memory.stat` key of page cache the kernel reclaims before it fails an allocation.
    inactive_file: &'static str,
}

const V2: Hierarchy = Hierarchy {
    roots: &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"],
    limit: "memory.max",
    usage: "memory.current",
    inactive_file: "inactive_file",
};

const V1: Hierarchy = Hierarchy {
    roots: &["/sys/fs/cgroup/memory"],
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    inactive_file: "total_inactive_file",
};

/// The least any cgroup of this process (from `/proc/self/cgroup`) and its ancestors has left:
/// every ancestor's limit applies too.
fn cgroup_available(own: &str) -> Option<u64> {
    let mut least: Option<u64> = None;
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let hierarchy = if controllers.is_empty() {
            &V2
        } else if controllers.split(',').any(|c| c == "memory") {
            &V1
        } else {
            continue;
        };
        for root in hierarchy.roots {
            for dir in ancestors(Path::new(root), path) {
                let read = |name: &str| fs::read_to_string(dir.join(name)).ok();
                let left = read(hierarchy.limit)
                    .zip(read(hierarchy.usage))
                    .and_then(|(l, u)| {
                        cgroup_left(
                            &l,
                            &u,
                            read("memory.stat").as_deref(),
                            hierarchy.inactive_file,
                        )
                    });
                if let Some(left) = left {
                    least = Some(least.map_or(left, |m| m.min(left)));
                }
            }
        }
    }
    least
}

/// `root` joined with each prefix of the cgroup `path`, the process's own cgroup first.
fn ancestors(root: &Path, path: &str) -> Vec<PathBuf> {
    let mut dir = root.to_path_buf();
    let mut out = vec![dir.clone()];
    for part in path.split('/').filter(|p| !p.is_empty() && *p != "..") {
        dir.push(part);
        out.push(dir.clone());
    }
    out.reverse();
    out
}

/// What a cgroup with this limit and usage has left, counting its inactive page cache (which the
/// kernel reclaims first) as free; `None` without a numeric limit ("max": none set).
fn cgroup_left(limit: &str, usage: &str, stat: Option<&str>, inactive_file: &str) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok()?;
    let usage: u64 = usage.trim().parse().ok()?;
    let reclaimable = stat
        .and_then(|s| {
            s.lines().find_map(|l| {
                let (key, value) = l.split_once(' ')?;
                (key == inactive_file).then(|| value.trim().parse::<u64>().ok())?
            })
        })
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(reclaimable)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo() {
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:   1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn cgroup_limits_count_inactive_page_cache_as_free() {
        assert_eq!(cgroup_left("max\n", "100\n", None, "inactive_file"), None);
        assert_eq!(
            cgroup_left("1000\n", "400\n", None, "inactive_file"),
            Some(600)
        );
        assert_eq!(
            cgroup_left("1000\n", "1400\n", None, "inactive_file"),
            Some(0)
        );
        let stat = "anon 300\nfile 100\ninactive_file 80\nactive_file 20\n";
        assert_eq!(
            cgroup_left("1000\n", "400\n", Some(stat), "inactive_file"),
            Some(680)
        );
        let v1 = "cache 100\ninactive_file 5\ntotal_inactive_file 80\n";
        assert_eq!(
            cgroup_left("1000", "400", Some(v1), "total_inactive_file"),
            Some(680)
        );
    }

    #[test]
    fn every_ancestor_of_the_own_cgroup_is_read() {
        assert_eq!(
            ancestors(Path::new("/sys/fs/cgroup/memory"), "/a/b"),
            [
                PathBuf::from("/sys/fs/cgroup/memory/a/b"),
                PathBuf::from("/sys/fs/cgroup/memory/a"),
                PathBuf::from("/sys/fs/cgroup/memory"),
            ]
        );
        assert_eq!(
            ancestors(Path::new("/sys/fs/cgroup"), "/"),
            [PathBuf::from("/sys/fs/cgroup")]
        );
    }

    #[test]
    fn this_linux_machine_reports_available_memory() {
        assert!(available().is_some_and(|b| b > 0));
    }
}
