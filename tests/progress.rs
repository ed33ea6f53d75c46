//! Watching a cluster run: `launch` draws a bar on a terminal (read through a real pseudo-terminal)
//! and writes plain progress lines otherwise; `multipos status` reports the live run as text and
//! JSON; `--log-format json` writes one JSON object per line.
mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use multipos::model::tiny::TinySpec;

const TOKEN: &str = "progress-test-token";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `multipos launch` of a 2-worker run of `steps` steps with the tiny model, and `extra` args.
fn launch(model: &Path, out: &Path, steps: u32, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_multipos"));
    c.arg("launch")
        .arg("--config")
        .arg(repo("configs/local-2workers.toml"))
        .args(extra)
        .env("MULTIPOS_CLUSTER_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .current_dir(repo(""))
        .args(common::tiny_run_args(model, out, steps));
    c
}

fn succeeded(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

#[test]
fn launch_on_a_terminal_draws_a_bar() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors we then own.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just opened and are owned here only.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = launch(&model, &dir.path().join("run"), 60, &[])
        .stdin(Stdio::null())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut screen = Vec::new();
        // Reading ends with EIO once the last process holding the terminal is gone.
        let _ = std::fs::File::from(master).read_to_end(&mut screen);
        String::from_utf8_lossy(&screen).into_owned()
    });
    assert!(child.wait().unwrap().success());
    let screen = reader.join().unwrap();
    let bar = shows_a_bar(&screen);
    assert!(bar, "no progress bar on the terminal:\n{screen}");
    assert!(screen.contains("pairs/s"), "{screen}");
    assert!(screen.contains('\x1b'), "a bar redraws with escape codes");
}

/// A bar line: `N/60 steps` with N counting up.
fn shows_a_bar(screen: &str) -> bool {
    screen
        .split(['\r', '\n', '\x1b'])
        .filter_map(|l| l.find("/60 steps").map(|i| &l[..i]))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u32>().ok())
        .any(|n| n > 0)
}

#[test]
fn launch_without_a_terminal_writes_plain_progress_lines_and_json_logs_on_request() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let o = launch(
        &model,
        &dir.path().join("run"),
        40,
        &["--progress-every-s", "1"],
    )
    .output()
    .unwrap();
    let err = succeeded(&o);
    assert!(!err.contains('\x1b'), "escape codes in a file:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(" progress ")).collect();
    assert!(!lines.is_empty(), "no progress lines:\n{err}");
    assert!(
        lines.iter().any(|l| l.contains("step=40/40")),
        "the last step is reported:\n{err}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains("pairs_per_s=") && l.contains("eta="))
    );

    let o = launch(
        &model,
        &dir.path().join("run-json"),
        10,
        &["--log-format", "json", "--progress-every-s", "1"],
    )
    .output()
    .unwrap();
    let err = succeeded(&o);
    // Every line is one JSON object: launch's own, and its processes' with a `process` field.
    let records: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(records.iter().all(|v| v.is_object()));
    assert!(
        records.iter().any(|v| v["process"] == "coordinator"
            && v["fields"]["message"] == "progress"
            && v["fields"]["step"] == "10/10"),
        "{err}"
    );
    assert!(
        records
            .iter()
            .any(|v| v["process"] == "worker 1" && v["level"] == "INFO"),
        "{err}"
    );
}

fn status(address: &str, token: &str, json: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_multipos"));
    c.args(["status", "--coordinator", address, "--timeout-s", "2"])
        .env("MULTIPOS_CLUSTER_TOKEN", token);
    if json {
        c.arg("--json");
    }
    c.output().unwrap()
}

#[test]
fn status_reports_the_live_run_as_text_and_json() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let address = format!("127.0.0.1:{}", common::free_port());
    let bind = format!("cluster.bind=\"{address}\"");
    let mut run = launch(&model, &dir.path().join("run"), 400, &["--set", &bind])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        assert!(Instant::now() < deadline, "the run never showed progress");
        let o = status(&address, TOKEN, true);
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if v["phase"] == "training" && v["step"].as_u64().unwrap() >= 3 {
                break v;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(seen["total_steps"], 400);
    assert_eq!(seen["workers_wanted"], 2);
    let members = seen["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{seen}");
    assert_eq!(members[1]["rank"], 1);
    assert!(seen["loss"].as_f64().unwrap().is_finite());
    assert!(seen["pairs_per_s"].as_f64().unwrap() > 0.0, "{seen}");
    assert!(seen["eta_s"].as_f64().unwrap() > 0.0, "{seen}");

    let text = status(&address, TOKEN, false);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("run: training"), "{text}");
    assert!(text.contains("workers: 2 of 2 in the ring"), "{text}");
    assert!(text.contains("rank 1"), "{text}");

    let refused = status(&address, "not-the-token-of-this-run", true);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("wrong cluster token"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // SAFETY: kill(2) on our own child; launch turns SIGTERM into an orderly stop.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    run.wait().unwrap();
}

#[test]
fn train_in_one_process_writes_the_same_progress_lines() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let o = Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args([
            "train",
            "--config",
            "configs/tiny.toml",
            "--progress",
            "lines",
        ])
        .args(["--progress-every-s", "1"])
        .arg("--set")
        .arg(format!("model.path=\"{}\"", model.display()))
        .arg("--set")
        .arg(format!(
            "output.dir=\"{}\"",
            dir.path().join("run").display()
        ))
        .args(["--set", "train.max_steps=5", "--set", "eval.at_start=false"])
        .current_dir(repo(""))
        .output()
        .unwrap();
    let err = succeeded(&o);
    assert!(!err.contains('\x1b'), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains(" progress ") && l.contains("step=5/5")),
        "{err}"
    );
}
