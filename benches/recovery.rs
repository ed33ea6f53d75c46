//! Time to recover from a lost process on all-MiniLM-L6-v2 with 2 local workers (bundled Bible
//! data, batch 16, max_seq_length 64), each killed with SIGKILL half a step after step 6 ends:
//! a worker (launch starts a replacement that heals from a live peer's checkpoint) and the
//! coordinator (launch restarts it with --resume; the workers keep their replicas and re-join).
//! Prints the time from the kill to the first step of the re-formed ring against the step time of
//! the same run, and the size and write time of a checkpoint.
//!
//! Then network partitions between hosts of their own (network namespaces; needs root): a
//! worker's link, and the coordinator's, cut for the heartbeat timeout plus 2 s half a step after
//! step 6, then restored: time to detect (cut → the generation ends) and to recover (link back →
//! the first step of the re-formed ring), in steps.
//!
//!     cargo bench --bench recovery
//! Env: BENCH_KILL_AT (step after which to kill or cut, default 6).
mod common;
#[path = "../tests/netns/mod.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn steps(out: &Path) -> Vec<serde_json::Value> {
    common::events(out, "step")
}

/// The pid of the launch's child whose command line contains `needle`.
fn child(parent: u32, needle: &str) -> i32 {
    let out = Command::new("pgrep")
        .args(["-P", &parent.to_string(), "-f", "--", needle])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("child process")
        .parse()
        .unwrap()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                dir_bytes(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

/// Runs the job, kills `victim` after step `at`, returns (seconds from the kill to the first step
/// of the new ring, mean step seconds, the run's directory).
fn scenario(victim: &str, at: usize, tmp: &Path) -> (f64, f64, PathBuf) {
    let out = tmp.join(victim);
    let mut launch = common::launch_command(2, &out)
        .args([
            "--set",
            "train.batch_size=16",
            "--set",
            "train.max_steps=24",
        ])
        .args(["--set", "output.checkpoint_every_steps=10"])
        .args(["--set", "cluster.max_restarts=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while steps(&out).len() < at {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Kill mid-step (half a step after step `at` is logged), not at a step boundary.
    let so_far = steps(&out);
    let half = so_far[1..]
        .iter()
        .map(|v| v["seconds"].as_f64().unwrap())
        .sum::<f64>()
        / (2 * (so_far.len() - 1)) as f64;
    std::thread::sleep(Duration::from_secs_f64(half));
    let before = steps(&out).last().unwrap()["generation"].clone();
    let needle = if victim == "worker" {
        "--rank 1"
    } else {
        " coordinator --config"
    };
    let pid = child(launch.id(), needle);
    let killed = Instant::now();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    while !steps(&out).iter().any(|s| s["generation"] != before) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let recovery = killed.elapsed().as_secs_f64();
    assert!(launch.wait().unwrap().success(), "{victim} run failed");
    let s = steps(&out);
    assert_eq!(
        s.iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=24).collect::<Vec<_>>(),
        "every step logged once"
    );
    let body = &s[1..];
    let step = body
        .iter()
        .map(|v| v["seconds"].as_f64().unwrap())
        .sum::<f64>()
        / body.len() as f64;
    (recovery, step, out)
}

/// Half the mean step time of the steps logged so far (the first, with warm-up, left out).
fn half_a_step(out: &Path) -> Duration {
    let so_far = steps(out);
    let mean = so_far[1..]
        .iter()
        .map(|v| v["seconds"].as_f64().unwrap())
        .sum::<f64>()
        / (so_far.len() - 1) as f64;
    Duration::from_secs_f64(mean / 2.0)
}

/// Cuts `host`'s link (0: the coordinator, 2: worker 1) half a step after step `at` for the
/// heartbeat timeout plus 2 s; returns (cut → generation end, link back → first step of the new
/// ring, mean step) in seconds.
fn partition(host: usize, at: usize, tmp: &Path) -> (f64, f64, f64) {
    let net = netns::Network::new(40 + host as u8, 3);
    let out = tmp.join(format!("partition-{host}"));
    let logs = tmp.join(format!("logs-{host}"));
    std::fs::create_dir_all(&logs).unwrap();
    let sets = [
        format!("output.dir=\"{}\"", out.display()),
        "train.batch_size=16".into(),
        "train.max_steps=24".into(),
    ];
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/local-2workers.toml");
    let cluster = netns::Cluster::start(&net, &config, &sets, None, &logs, "bench-partition-token");
    while steps(&out).len() < at {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(half_a_step(&out));
    let before = steps(&out).last().unwrap()["generation"].clone();
    let cut = Instant::now();
    net.link(host, false);
    while common::events(&out, "generation_end").is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let detected = cut.elapsed().as_secs_f64();
    // The default heartbeat timeout (5 s) plus 2 s, from the cut.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(cut.elapsed()));
    net.link(host, true);
    let back = Instant::now();
    while !steps(&out).iter().any(|s| s["generation"] != before) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let recovered = back.elapsed().as_secs_f64();
    cluster.finish(&logs, Duration::from_secs(600));
    let s = steps(&out);
    assert_eq!(s.len(), 24, "every step logged once");
    let step = s[1..]
        .iter()
        .map(|v| v["seconds"].as_f64().unwrap())
        .sum::<f64>()
        / 23.0;
    (detected, recovered, step)
}

fn main() {
    let at = common::env_or("BENCH_KILL_AT", 6usize);
    let tmp = tempfile::tempdir().unwrap();
    println!(
        "| process killed after step {at} | kill → first step of the re-formed ring | mean step | ratio |"
    );
    println!("|---|---|---|---|");
    let mut dirs = Vec::new();
    for victim in ["worker", "coordinator"] {
        let (recovery, step, out) = scenario(victim, at, tmp.path());
        println!(
            "| {victim} | {recovery:.2} s | {step:.2} s | {:.1} steps |",
            recovery / step
        );
        dirs.push(out);
    }
    if unsafe { libc::geteuid() } == 0 {
        println!(
            "\n| link cut after step {at} for 7 s | cut → detected | link back → first step | mean step | detected, recovered |"
        );
        println!("|---|---|---|---|---|");
        for (host, who) in [(2, "worker 1"), (0, "coordinator")] {
            let (detected, recovered, step) = partition(host, at, tmp.path());
            println!(
                "| {who} | {detected:.2} s | {recovered:.2} s | {step:.2} s | {:.1} steps, {:.1} steps |",
                detected / step,
                recovered / step
            );
        }
    } else {
        println!("(partitions skipped: network namespaces need root)");
    }
    for out in &dirs {
        for c in common::events(out, "checkpoint") {
            let path = PathBuf::from(c["path"].as_str().unwrap());
            let size = if path.exists() {
                format!("{:.0} MB", dir_bytes(&path) as f64 / 1e6)
            } else {
                "pruned".into()
            };
            println!(
                "checkpoint of step {} ({}): written and received in {:.2} s, {size}",
                c["step"],
                out.file_name().unwrap().to_string_lossy(),
                c["seconds"].as_f64().unwrap()
            );
        }
    }
}
