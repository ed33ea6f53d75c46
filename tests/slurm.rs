//! multipos under a real Slurm: `deploy/slurm/local-cluster.sh` installs Debian's slurm-wlm and
//! munge when missing and starts a one-node cluster (munged, slurmctld, slurmd); the tests submit
//! `deploy/slurm/multipos.sbatch` with the tiny model. One run finishes and its model loads; another
//! is requeued mid-run (`scontrol requeue`, as a preemption does) and its resumed run ends exactly as
//! an uninterrupted one. Both tests share the cluster and run one at a time; the daemons stop when
//! the test binary exits, also after a failure.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Where the test cluster keeps its state: one directory for every run of these tests, so that a
/// start stops whatever an earlier, killed run left behind.
fn cluster_dir() -> PathBuf {
    std::env::temp_dir().join("multipos-slurm")
}

/// Stops the daemons when the test binary exits, whether its tests passed or failed (the harness
/// ends through `exit(3)`, which runs `atexit` handlers; statics are never dropped).
extern "C" fn stop_cluster() {
    let _ = Command::new(repo("deploy/slurm/local-cluster.sh"))
        .arg("stop")
        .arg(cluster_dir())
        .output();
}

/// The running cluster's `SLURM_CONF`, started once for this test binary and stopped at its exit.
fn cluster() -> &'static (PathBuf, Mutex<()>) {
    static CLUSTER: OnceLock<(PathBuf, Mutex<()>)> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "a Slurm cluster needs root to start (CI runs as root)"
        );
        let dir = cluster_dir();
        // SAFETY: registers a plain function with no captured state.
        assert_eq!(unsafe { libc::atexit(stop_cluster) }, 0);
        let o = Command::new(repo("deploy/slurm/local-cluster.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (dir.join("slurm.conf"), Mutex::new(()))
    })
}

fn slurm(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .env("SLURM_CONF", &cluster().0)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Submits the sbatch script with 2 workers; returns the job id.
fn submit(dir: &Path, model: &Path, out: &Path, steps: u32) -> String {
    let bin = env!("CARGO_BIN_EXE_multipos");
    let config = repo("configs/local-2workers.toml");
    let log = dir.join("slurm-%j.out");
    let mut args: Vec<String> = vec![
        "--parsable".into(),
        "--ntasks=2".into(),
        format!("--output={}", log.display()),
        format!("--chdir={}", dir.display()),
        format!(
            "--export=ALL,MULTIPOS_BIN={bin},MULTIPOS_SHARED={},RUST_LOG=warn,MULTIPOS_DEVICE=cpu",
            dir.join(".multipos").display()
        ),
        repo("deploy/slurm/multipos.sbatch").display().to_string(),
        config.display().to_string(),
    ];
    args.extend(common::tiny_run_args(model, out, steps));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    slurm("sbatch", &refs)
}

/// Waits until the job has left the queue.
fn wait_gone(job: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !slurm("squeue", &["-h", "-j", job, "-o", "%T"]).is_empty() {
        assert!(Instant::now() < deadline, "job {job} still queued");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn job_log(dir: &Path, job: &str) -> String {
    std::fs::read_to_string(dir.join(format!("slurm-{job}.out"))).unwrap_or_default()
}

#[test]
fn an_sbatch_run_finishes_and_its_model_loads() {
    let _one = cluster().1.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("run");
    let job = submit(dir.path(), &model, &out, 12);
    wait_gone(&job, Duration::from_secs(180));
    let log = job_log(dir.path(), &job);
    assert!(log.contains("finished 12 steps"), "{log}");
    let loaded =
        multipos::model::SentenceModel::load(&out.join("model"), tch::Device::Cpu).unwrap();
    assert_eq!(loaded.embed(&["in the beginning"], 1).unwrap().size()[0], 1);
    let token = dir.path().join(".multipos/token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the token file is private");
}

#[test]
fn a_requeued_run_resumes_and_ends_as_an_uninterrupted_one() {
    let _one = cluster().1.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let steps = 60;
    let reference = dir.path().join("reference");
    let o = Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args(["launch", "--config"])
        .arg(repo("configs/local-2workers.toml"))
        .args(common::tiny_run_args(&model, &reference, steps))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = dir.path().join("run");
    let job = submit(dir.path(), &model, &out, steps);
    let deadline = Instant::now() + Duration::from_secs(120);
    let metrics = out.join("metrics.jsonl");
    while !metrics.exists() || common::step_losses(&metrics).len() < 10 {
        assert!(Instant::now() < deadline, "the run never reached step 10");
        std::thread::sleep(Duration::from_millis(200));
    }
    slurm("scontrol", &["requeue", &job]);
    // A requeued job waits a while before it may start again; a test need not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while slurm("squeue", &["-h", "-j", &job, "-o", "%T"]) != "PENDING" {
        assert!(Instant::now() < deadline, "the job was never requeued");
        std::thread::sleep(Duration::from_millis(200));
    }
    slurm(
        "scontrol",
        &["update", &format!("JobId={job}"), "StartTime=now"],
    );
    wait_gone(&job, Duration::from_secs(300));
    let log = job_log(dir.path(), &job);
    assert!(log.contains("restart 1"), "the job ran again:\n{log}");
    assert!(log.contains(&format!("finished {steps} steps")), "{log}");
    assert!(
        !common::resumed_from(&out).is_empty(),
        "the second run resumed:\n{log}"
    );
    common::assert_same_run(&reference, &out, "requeued under Slurm", &[]);
}
