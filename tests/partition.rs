//! Network partitions between real hosts: the coordinator and each worker in its own network
//! namespace with its own address, joined by veth pairs to a bridge in a "switch" namespace. A link
//! is cut (its switch port set down) mid-run and restored; the run finishes, every global batch is
//! applied once, and the model is bit-identical to the undisturbed run on loopback.
//!
//! Needs root and iproute2 (CI runs as root); docs/design.md §9 describes what each side does.
mod common;
mod netns;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{Cluster, Network, dump, require_root_and_ip};

use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_multipos"))
}

/// The run's settings: tiny model, bundled data, heartbeats fast enough that a cut of a few
/// seconds is declared a failure.
fn sets(model: &Path, out: &Path) -> Vec<String> {
    [
        format!("model.path=\"{}\"", model.display()),
        format!("output.dir=\"{}\"", out.display()),
        format!(
            "data.train=\"{}\"",
            repo("deploy/data/bible_paraphrase_tiny/train.jsonl").display()
        ),
        "train.max_steps=80".into(),
        "train.batch_size=6".into(),
        "cluster.heartbeat_interval_ms=200".into(),
        "cluster.heartbeat_timeout_ms=1500".into(),
        "cluster.step_timeout_ms=20000".into(),
        "cluster.join_timeout_ms=60000".into(),
        "cluster.rejoin_timeout_ms=60000".into(),
    ]
    .to_vec()
}

const TOKEN: &str = "partition-test-token";

/// The undisturbed run: `launch` with two workers on loopback.
fn reference(model: &Path, out: &Path) {
    let mut c = Command::new(bin());
    c.arg("launch")
        .arg("--config")
        .arg(repo("configs/local-2workers.toml"));
    for s in sets(model, out) {
        c.arg("--set").arg(s);
    }
    let o = c
        .env("MULTIPOS_CLUSTER_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn steps_logged(out: &Path) -> usize {
    if out.join("metrics.jsonl").exists() {
        common::step_losses(&out.join("metrics.jsonl")).len()
    } else {
        0
    }
}

fn batch_steps(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("batches.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Runs the cluster on its own hosts, cuts `host`'s link for `cut` once 5 steps are logged,
/// restores it, and checks the run against the undisturbed one. Returns the generation ends.
fn partitioned_run(net: u8, host: usize, cut: Duration) -> Vec<serde_json::Value> {
    let net = Network::new(net, 3);
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let clean = dir.path().join("clean");
    reference(&model, &clean);
    let out = dir.path().join("cut");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let cluster = Cluster::start(
        &net,
        &repo("configs/local-2workers.toml"),
        &sets(&model, &out),
        Some(&model),
        &logs,
        TOKEN,
    );
    let started = Instant::now();
    while steps_logged(&out) < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no steps: {}",
            dump(&logs)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    net.link(host, false);
    let at = steps_logged(&out);
    std::thread::sleep(cut);
    assert!(
        steps_logged(&out) <= at + 1,
        "steps went on while a member was cut off: {}",
        dump(&logs)
    );
    net.link(host, true);
    cluster.finish(&logs, Duration::from_secs(120));
    assert_eq!(
        batch_steps(&out),
        (1..=80).collect::<Vec<_>>(),
        "every batch applied once"
    );
    assert_eq!(
        std::fs::read(clean.join("model/model.safetensors")).unwrap(),
        std::fs::read(out.join("model/model.safetensors")).unwrap(),
        "the partitioned run differs from the undisturbed one"
    );
    let recovered = common::events(&out, "recovered");
    println!(
        "link of host {host} cut for {cut:?}: first step after recovery {:.2} s after the ring broke up",
        recovered[0]["seconds"].as_f64().unwrap()
    );
    common::events(&out, "generation_end")
}

#[test]
fn a_worker_cut_off_mid_run_is_declared_dead_rejoins_when_its_link_returns_and_the_model_is_unchanged()
 {
    require_root_and_ip();
    let ends = partitioned_run(1, 2, Duration::from_secs(8));
    assert!(!ends.is_empty(), "the cut was not detected");
    assert!(
        ends[0]["reason"].as_str().unwrap().contains("no heartbeat"),
        "detected by heartbeats: {ends:?}"
    );
}

#[test]
fn a_coordinator_isolated_past_the_heartbeat_timeout_takes_the_workers_back_and_the_model_is_unchanged()
 {
    require_root_and_ip();
    let ends = partitioned_run(2, 0, Duration::from_secs(8));
    assert!(!ends.is_empty(), "the isolation was not detected");
    assert!(
        ends[0]["reason"].as_str().unwrap().contains("no heartbeat"),
        "detected by heartbeats: {ends:?}"
    );
}
