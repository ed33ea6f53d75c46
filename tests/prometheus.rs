//! A real Prometheus server (Debian's `prometheus`, installed by `deploy/test.sh`) scrapes the
//! coordinator of a 2-worker run on `cluster.metrics_bind`, and its HTTP API answers for the run's
//! step counter and ring size.
mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The body of `GET path` on `127.0.0.1:port`, when it answers 200.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1) == Some("200")).then(|| body.to_string())
}

/// The value of a Prometheus instant query, when it has exactly one series.
fn query(port: u16, promql: &str) -> Option<f64> {
    let body = get(port, &format!("/api/v1/query?query={promql}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGTERM lets launch stop its processes.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn prometheus_scrapes_the_coordinator_of_a_running_cluster() {
    assert!(
        Command::new("prometheus").arg("--version").output().is_ok(),
        "this test runs a real Prometheus server: deploy/test.sh installs it (apt-get install prometheus)"
    );
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let (metrics, web) = (common::free_port(), common::free_port());
    let run = Command::new(env!("CARGO_BIN_EXE_multipos"))
        .arg("launch")
        .arg("--config")
        .arg(repo("configs/local-2workers.toml"))
        .env("RUST_LOG", "warn")
        .args(common::tiny_run_args(&model, &dir.path().join("run"), 2000))
        .args([
            "--set",
            &format!("cluster.metrics_bind=\"127.0.0.1:{metrics}\""),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _run = Killed(run);

    // The exposition itself, straight from the coordinator.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        assert!(Instant::now() < deadline, "no metrics on :{metrics}");
        if let Some(t) = get(metrics, "/metrics")
            && t.lines()
                .any(|l| l.starts_with("multipos_step ") && l != "multipos_step 0")
        {
            break t;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for series in [
        "multipos_loss ",
        "multipos_learning_rate ",
        "multipos_pairs_per_second ",
        "multipos_step_seconds{part=\"compute\"} ",
        "multipos_step_seconds{part=\"all_gather\"} ",
        "multipos_step_seconds{part=\"all_reduce\"} ",
        "multipos_step_seconds{part=\"waiting\"} ",
        "multipos_workers_alive 2",
        "multipos_workers_wanted 2",
        "multipos_rings_formed_total 1",
        "multipos_heals_total 0",
        "multipos_checkpoint_age_seconds ",
        "multipos_total_steps 2000",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(series)),
            "{series} missing:\n{text}"
        );
    }

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: multipos\n    \
             static_configs:\n      - targets: ['127.0.0.1:{metrics}']\n"
        ),
    )
    .unwrap();
    let server = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Killed(server);
    let deadline = Instant::now() + Duration::from_secs(90);
    let first = loop {
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the step counter"
        );
        if let Some(step) = query(web, "multipos_step")
            && step > 0.0
        {
            break step;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(query(web, "up"), Some(1.0));
    assert_eq!(query(web, "multipos_workers_alive"), Some(2.0));
    // Scraped again later, the counter has moved on.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "the step counter never moved past {first}"
        );
        if query(web, "multipos_step").is_some_and(|s| s > first) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
