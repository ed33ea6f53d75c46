//! The cluster with real processes over loopback: W workers give the same losses and weights as one
//! process, in-batch negatives really cross workers, global batches are conflict-free across
//! shards, tokens are enforced, and a killed worker fails the launch quickly.
mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use multipos::model::tiny::TinySpec;

/// The tests of this file start many processes each; on a small machine, running them at once
/// would starve heartbeats and make timing-dependent checks flaky, so they take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_multipos"))
}

/// Settings shared by every run: tiny model, bundled tiny data, short run, small timeouts.
fn sets(model: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("model.path=\"{}\"", model.display()),
        format!("output.dir=\"{}\"", out.display()),
        format!(
            "data.train=\"{}\"",
            repo("deploy/data/bible_paraphrase_tiny/train.jsonl").display()
        ),
        "train.max_steps=10".into(),
        "train.batch_size=8".into(),
        "train.micro_batch=3".into(),
        "cluster.heartbeat_timeout_ms=4000".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// `multipos CMD --config CONFIG [--set ...] EXTRA_ARGS`, quiet, without an inherited token.
fn command(cmd: &str, config: &Path, sets: &[String], extra_args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg(cmd)
        .arg("--config")
        .arg(config)
        .args(extra_args)
        .env("RUST_LOG", "warn")
        .env_remove("MULTIPOS_CLUSTER_TOKEN");
    for s in sets {
        c.arg("--set").arg(s);
    }
    c
}

fn run(cmd: &str, config: &Path, sets: &[String], extra_args: &[&str]) -> Output {
    command(cmd, config, sets, extra_args).output().unwrap()
}

/// `multipos launch`, which must succeed.
fn launch_ok(config: &Path, sets: &[String], extra_args: &[&str]) {
    let out = run("launch", config, sets, extra_args);
    assert!(
        out.status.success(),
        "launch {extra_args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn losses(out: &Path) -> Vec<f64> {
    common::step_losses(&out.join("metrics.jsonl"))
}

#[test]
fn two_and_four_workers_match_one_process_with_and_without_dropout() {
    let _serial = serial();
    workers_match_one_process(&["false", "true"], "grpc");
}

#[test]
fn gloo_rings_of_one_two_and_four_match_one_process_with_dropout() {
    let _serial = serial();
    workers_match_one_process(&["true"], "gloo");
}

/// W = 1, 2 and 4 workers on data plane `collective` train as one process does.
fn workers_match_one_process(dropouts: &[&str], collective: &str) {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let cfg = repo("configs/local-2workers.toml");
    for dropout in dropouts {
        let single = dir.path().join(format!("single-{dropout}"));
        let extra = [format!("train.dropout={dropout}")];
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = run("train", &cfg, &sets(&model, &single, &extra), &[]);
        assert!(
            out.status.success(),
            "single: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(losses(&single).len(), 10, "reference steps");
        let plane = format!("cluster.collective=\"{collective}\"");
        for workers in ["1", "2", "4"] {
            let dst = dir.path().join(format!("w{workers}-{dropout}"));
            let mut s = sets(&model, &dst, &extra);
            s.push(plane.clone());
            launch_ok(&cfg, &s, &["--workers", workers]);
            for g in common::events(&dst, "generation") {
                assert_eq!(g["collective"], collective, "{g}");
            }
            common::assert_same_run(
                &single,
                &dst,
                &format!("W={workers} over {collective}, dropout {dropout}"),
                &[],
            );
        }
    }
}

#[test]
fn cluster_loss_is_the_global_batch_loss_not_the_mean_of_shard_losses() {
    let _serial = serial();
    use multipos::config::RunConfig;
    use multipos::loss::Targets;
    use multipos::train::build::{plan_for, trainer_for};
    use multipos::train::load::load_model;
    use multipos::train::task::{Task, load_tasks};

    let (dir, model) = common::tiny_model(&TinySpec::default());
    let cfg_path = repo("configs/local-2workers.toml");
    let out = dir.path().join("w2");
    let s = sets(&model, &out, &["train.dropout=false"]);
    launch_ok(&cfg_path, &s, &["--workers", "2"]);
    let cluster_first = losses(&out)[0];

    // Step 1 by hand at the initial weights: the whole global batch, and each shard on its own.
    let cfg = RunConfig::load(&cfg_path, &s).unwrap();
    let tasks = load_tasks(&cfg.tasks()).unwrap();
    let plan = plan_for(&cfg, &tasks).unwrap();
    let batch = plan.batch(&tasks, 0);
    let specs: Vec<_> = tasks.iter().map(Task::spec).collect();
    let trainer = trainer_for(&cfg, load_model(&cfg).unwrap(), &specs, plan.total_steps).unwrap();
    let loss_of = |columns: &[Vec<&str>], targets: &Targets| {
        let input = multipos::train::StepInput {
            task: 0,
            columns: columns.to_vec(),
            first_row: 0,
            targets: targets.clone(),
        };
        let e = trainer.embed(&trainer.preparer().prepare(&input, 0).unwrap());
        trainer.loss(0, &e, targets).unwrap().double_value(&[])
    };
    let global = loss_of(&batch.columns, &batch.targets);
    let shard_mean = (0..2)
        .map(|r| {
            let (columns, first) = batch.shard(r, 2);
            loss_of(&columns, &batch.targets.slice(first, columns[0].len()))
        })
        .sum::<f64>()
        / 2.0;
    assert!(
        (cluster_first - global).abs() < 1e-5,
        "cluster {cluster_first} vs global {global}"
    );
    assert!(
        (global - shard_mean).abs() > 0.1,
        "global {global} and shard mean {shard_mean} must differ"
    );
}

#[test]
fn no_text_appears_twice_in_a_global_batch_across_shards() {
    let _serial = serial();
    let (dir, model) = common::tiny_model(&TinySpec::default());
    // 80 questions over 24 answers written with varying whitespace: duplicates everywhere.
    let data = dir.path().join("dup.jsonl");
    let lines: Vec<String> = (0..80)
        .map(|g| {
            let a = |i: usize| {
                if g % 2 == 0 {
                    format!("answer {}", i % 24)
                } else {
                    format!("  answer   {} ", i % 24)
                }
            };
            serde_json::json!({"query": format!("question {g}"), "positives": [a(g), a(g * 7 + 3)]})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("dup-run");
    let mut s = sets(&model, &out, &["train.max_steps=6", "data.mode=\"all\""]);
    s.push(format!("data.train=\"{}\"", data.display()));
    let launched = run(
        "launch",
        &repo("configs/local-2workers.toml"),
        &s,
        &["--workers", "2"],
    );
    assert!(
        launched.status.success(),
        "{}",
        String::from_utf8_lossy(&launched.stderr)
    );
    let batches = std::fs::read_to_string(out.join("batches.jsonl")).unwrap();
    let mut steps = 0;
    for line in batches.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let groups: Vec<u64> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_u64().unwrap())
            .collect();
        let mut seen: HashSet<String> = HashSet::new();
        let mut queries: HashSet<(u64, String)> = HashSet::new();
        let mut row = 0;
        for shard in v["shards"].as_array().unwrap() {
            for texts in shard.as_array().unwrap() {
                let texts: Vec<String> = texts
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap().to_string())
                    .collect();
                // Mode `all`: rows of one group share their query; nothing else may repeat.
                if queries.insert((groups[row], texts[0].clone())) {
                    assert!(
                        seen.insert(texts[0].clone()),
                        "step {}: a query text twice",
                        v["step"]
                    );
                }
                for t in &texts[1..] {
                    assert!(
                        seen.insert(t.clone()),
                        "step {}: text {t} twice across shards",
                        v["step"]
                    );
                }
                row += 1;
            }
        }
        steps += 1;
    }
    assert_eq!(steps, 6);
}

fn start_coordinator(
    model: &Path,
    out: &Path,
    token: &str,
    extra: &[&str],
) -> (std::process::Child, String) {
    let mut c = Command::new(bin());
    c.arg("coordinator")
        .arg("--config")
        .arg(repo("configs/local-2workers.toml"));
    for s in sets(model, out, extra) {
        c.arg("--set").arg(s);
    }
    let mut child = c
        .env("MULTIPOS_CLUSTER_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = common::announced_address(&mut child);
    (child, addr)
}

/// Two workers (ranks 0 and 1, one thread each, the local model) of the coordinator at `addr`.
fn start_workers(addr: &str, token: &str, model: &Path) -> Vec<std::process::Child> {
    (0..2)
        .map(|rank| {
            Command::new(bin())
                .args(["worker", "--coordinator", addr, "--device", "cpu"])
                .args(["--threads", "1", "--rank", &rank.to_string(), "--model"])
                .arg(model)
                .env("MULTIPOS_CLUSTER_TOKEN", token)
                .env("RUST_LOG", "warn")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Waits for every process and asserts each succeeded.
fn wait_ok(children: Vec<std::process::Child>) {
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn calls_without_the_right_token_are_refused() {
    let _serial = serial();
    use multipos::net::auth::Token;
    use multipos::pb::HeartbeatRequest;
    use multipos::pb::coordinator_client::CoordinatorClient;

    let (dir, model) = common::tiny_model(&TinySpec::default());
    let (mut child, addr) =
        start_coordinator(&model, &dir.path().join("out"), "the-right-token-16", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut bare = CoordinatorClient::new(channel.clone());
        let err = bare
            .heartbeat(HeartbeatRequest { member: 0 })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let wrong = Token::new("a-wrong-token-of-16").unwrap();
        let mut client = CoordinatorClient::with_interceptor(channel.clone(), wrong.attach());
        let err = client
            .heartbeat(HeartbeatRequest { member: 0 })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let right = Token::new("the-right-token-16").unwrap();
        let mut client = CoordinatorClient::with_interceptor(channel, right.attach());
        assert!(
            client
                .heartbeat(HeartbeatRequest { member: 0 })
                .await
                .is_ok()
        );
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_worker_that_gives_up_joining_leaves_no_ghost_behind() {
    let _serial = serial();
    use multipos::net::auth::Token;
    use multipos::pb::JoinRequest;
    use multipos::pb::coordinator_client::CoordinatorClient;

    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("out");
    let token = "ghost-test-token-16";
    let (mut coordinator, addr) = start_coordinator(&model, &out, token, &["train.max_steps=3"]);
    // A worker asks for rank 0, then gives up waiting for the ring (its deadline passes).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let own = Token::new(token).unwrap().credential("ghost").unwrap();
        let mut client = CoordinatorClient::with_interceptor(
            channel,
            multipos::net::auth::Secret::Worker(own).attach(),
        );
        let mut req = tonic::Request::new(JoinRequest {
            worker_id: "ghost".into(),
            rank: 0,
            peer_address: "127.0.0.1:9".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        });
        req.set_timeout(Duration::from_millis(300));
        let e = client.join(req).await.unwrap_err();
        assert!(
            matches!(
                e.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "the ghost was a candidate until it gave up: {e}"
        );
    });
    // The two real workers then form the ring by themselves and finish the run.
    let workers = start_workers(&addr, token, &model);
    wait_ok(workers);
    assert!(coordinator.wait().unwrap().success());
    assert_eq!(losses(&out).len(), 3);
    assert!(
        common::events(&out, "generation_end").is_empty(),
        "no ring broke up"
    );
}

#[test]
fn a_worker_without_a_model_fetches_it_from_the_coordinator() {
    let _serial = serial();
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("fetched");
    let token = "fetch-test-token-16";
    let in_config = format!("cluster.token=\"{token}\"");
    let (mut coordinator, addr) = start_coordinator(
        &model,
        &out,
        token,
        &["cluster.workers=1", "train.max_steps=3", &in_config],
    );
    // The worker reads the token from a file (no environment variable).
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let worker = Command::new(bin())
        .args([
            "worker",
            "--coordinator",
            &addr,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--token-file",
        ])
        .arg(&token_file)
        .env_remove("MULTIPOS_CLUSTER_TOKEN")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        worker.status.success(),
        "{}",
        String::from_utf8_lossy(&worker.stderr)
    );
    assert!(coordinator.wait().unwrap().success());
    assert_eq!(losses(&out).len(), 3);
    multipos::SentenceModel::load(&out.join("model"), tch::Device::Cpu).unwrap();
    // The recorded config (also what workers receive) carries no secret.
    let recorded = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(!recorded.contains(token), "{recorded}");

    // A worker that holds only its own credential (no cluster token on its host) trains too.
    let made = Command::new(bin())
        .args(["credential", "trainer-7", "--token-file"])
        .arg(&token_file)
        .env_remove("MULTIPOS_CLUSTER_TOKEN")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let credential_file = dir.path().join("trainer-7.credential");
    std::fs::write(&credential_file, &made.stdout).unwrap();
    let by_credential = dir.path().join("by-credential");
    let (mut coordinator, addr) = start_coordinator(
        &model,
        &by_credential,
        token,
        &["cluster.workers=1", "train.max_steps=3"],
    );
    let worker = Command::new(bin())
        .args([
            "worker",
            "--coordinator",
            &addr,
            "--device",
            "cpu",
            "--threads",
            "1",
        ])
        .arg("--credential-file")
        .arg(&credential_file)
        .env_remove("MULTIPOS_CLUSTER_TOKEN")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&worker.stderr);
    assert!(worker.status.success(), "{log}");
    assert!(
        log.contains("trainer-7:"),
        "the worker id carries its credential's name: {log}"
    );
    assert!(coordinator.wait().unwrap().success());
    assert_eq!(
        losses(&by_credential),
        losses(&out),
        "the same run as with the token"
    );

    // A worker whose local model differs is refused with a reason.
    let other = dir.path().join("other");
    multipos::model::tiny::write_random_model(
        &other,
        &TinySpec {
            seed: 99,
            ..TinySpec::default()
        },
    )
    .unwrap();
    let (mut coordinator, addr) = start_coordinator(
        &model,
        &dir.path().join("refused"),
        token,
        &["cluster.workers=1"],
    );
    let worker = Command::new(bin())
        .args([
            "worker",
            "--coordinator",
            &addr,
            "--device",
            "cpu",
            "--model",
        ])
        .arg(&other)
        .env("MULTIPOS_CLUSTER_TOKEN", token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&worker.stderr);
    assert!(
        !worker.status.success() && err.contains("differs from the coordinator"),
        "{err}"
    );
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
}

#[test]
fn a_cluster_killed_with_sigkill_resumes_exactly_also_on_fewer_workers() {
    let _serial = serial();
    killed_and_resumed("grpc");
}

#[test]
fn on_gloo_a_cluster_killed_with_sigkill_resumes_exactly_also_on_fewer_workers() {
    let _serial = serial();
    killed_and_resumed("gloo");
}

/// On data plane `collective`: every process SIGKILLed once a checkpoint exists; the resumed run
/// equals the uninterrupted one bit for bit on as many workers, up to rounding on fewer.
fn killed_and_resumed(collective: &str) {
    let plane = format!("cluster.collective=\"{collective}\"");
    let extra = [
        "train.batch_size=6",
        "train.max_steps=12",
        "output.checkpoint_every_steps=3",
        "train.micro_batch=2",
        plane.as_str(),
    ];
    let (dir, model, cfg, full) = reference_run(&extra, "3");
    assert_eq!(losses(&full).len(), 12);

    // The same run, SIGKILLed (every process) once a checkpoint exists.
    let killed = dir.path().join("killed");
    let mut launch = command(
        "launch",
        &cfg,
        &sets(&model, &killed, &extra),
        &["--workers", "3"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    common::wait_for_checkpoint(&killed, Duration::from_secs(120));
    // The launch first, so that it cannot start replacements for the others.
    let pids = children(launch.id(), "multipos");
    launch.kill().unwrap();
    launch.wait().unwrap();
    for pid in pids {
        unsafe { libc_kill(pid, 9) };
    }
    let on_two = dir.path().join("on-two");
    common::copy_dir(&killed, &on_two);

    // Resume on the same number of workers: bit-identical to the run that never died.
    launch_ok(
        &cfg,
        &sets(&model, &killed, &extra),
        &["--workers", "3", "--resume"],
    );
    let from = common::resumed_from(&killed);
    assert!(
        from.len() == 1 && from[0] >= 3 && from[0].is_multiple_of(3),
        "resumed from a checkpoint: {from:?}"
    );
    assert_eq!(
        common::losses_by_step(&full),
        common::losses_by_step(&killed)
    );
    assert_eq!(
        std::fs::read(full.join("model/model.safetensors")).unwrap(),
        std::fs::read(killed.join("model/model.safetensors")).unwrap()
    );

    // Resume on fewer workers (3 -> 2): the same global batches re-split; equal up to summation order.
    launch_ok(
        &cfg,
        &sets(&model, &on_two, &extra),
        &["--workers", "2", "--resume"],
    );
    assert_eq!(
        common::resumed_from(&on_two),
        from,
        "resumed from the same checkpoint on two workers"
    );
    common::assert_same_run(&full, &on_two, "resumed on two workers", &[]);
}

#[test]
fn a_cluster_stopped_after_n_steps_as_asked_resumes_exactly() {
    let _serial = serial();
    let extra = [
        "train.batch_size=6",
        "train.max_steps=9",
        "train.micro_batch=2",
    ];
    let (dir, model, cfg, full) = reference_run(&extra, "2");
    // train.stop_after_steps stops the cluster as it stops one process: a checkpoint of step 4,
    // a success, and a resume that ends exactly where the uninterrupted run ends.
    let part = dir.path().join("part");
    let stopped = run(
        "launch",
        &cfg,
        &sets(
            &model,
            &part,
            &[&extra[..], &["train.stop_after_steps=4"]].concat(),
        ),
        &["--workers", "2"],
    );
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert_eq!(losses(&part).len(), 4);
    assert!(
        part.join("checkpoints")
            .join(multipos::train::checkpoint::name(4))
            .is_dir(),
        "the stop wrote the checkpoint of step 4"
    );
    assert!(
        !part.join("model").exists(),
        "no final model before the end"
    );
    launch_ok(
        &cfg,
        &sets(&model, &part, &extra),
        &["--workers", "2", "--resume"],
    );
    assert_eq!(common::resumed_from(&part), vec![4]);
    assert_eq!(common::losses_by_step(&full), common::losses_by_step(&part));
    assert!(
        same_bytes(&full, &part),
        "the resumed model equals the uninterrupted one"
    );
}

/// A `multipos launch` in the background, its stderr collected.
struct Background {
    child: std::process::Child,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Background {
    fn launch(config: &Path, sets: &[String], extra_args: &[&str]) -> Self {
        let mut child = command("launch", config, sets, extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
                .join("\n")
        });
        Self {
            child,
            log: Some(log),
        }
    }

    /// The one child of the launch whose command line contains `needle`.
    fn child(&self, needle: &str) -> i32 {
        let found = children(self.child.id(), needle);
        assert_eq!(found.len(), 1, "one child matching {needle:?}");
        found[0]
    }

    /// Waits for the launch to exit; its status and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        (status, self.log.take().unwrap().join().unwrap())
    }
}

/// Waits until the run has logged at least `n` steps.
fn wait_for_steps(out: &Path, n: usize) {
    let started = Instant::now();
    while !out.join("metrics.jsonl").exists() || losses(out).len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run did not reach step {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The steps of `batches.jsonl` in order: a run that applied every global batch exactly once
/// logs 1..=N, each once.
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

/// A tiny model with dropout, and the failure-free run of `extra` on `workers` to compare with:
/// (temporary directory, model, config, the run's output).
fn reference_run(extra: &[&str], workers: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let cfg = repo("configs/local-2workers.toml");
    let clean = dir.path().join("clean");
    launch_ok(&cfg, &sets(&model, &clean, extra), &["--workers", workers]);
    (dir, model, cfg, clean)
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a.join("model/model.safetensors")).unwrap()
        == std::fs::read(b.join("model/model.safetensors")).unwrap()
}

#[test]
fn a_worker_killed_or_stalled_mid_run_is_replaced_or_left_behind_and_every_batch_is_applied_once() {
    let _serial = serial();
    killed_or_stalled("grpc");
}

#[test]
fn on_gloo_a_worker_killed_or_stalled_mid_run_is_replaced_or_left_behind() {
    let _serial = serial();
    killed_or_stalled("gloo");
}

/// On data plane `collective`: SIGKILL a worker mid-run (a replacement heals from a live peer and
/// the model equals the clean run's bit for bit), then SIGSTOP one (the ring goes on without it,
/// and it comes back when woken).
fn killed_or_stalled(collective: &str) {
    let plane = format!("cluster.collective=\"{collective}\"");
    let extra = [
        "train.batch_size=6",
        "train.max_steps=60",
        "output.checkpoint_every_steps=10",
        plane.as_str(),
    ];
    let (dir, model, cfg, clean) = reference_run(&extra, "3");

    // SIGKILL worker 1 mid-run: launch starts a replacement, the two others keep their replicas,
    // the open step is applied by nobody and re-run, and the replacement heals from a live peer.
    let hit = dir.path().join("replaced");
    let mut s = sets(&model, &hit, &extra);
    s.push("cluster.max_restarts=1".into());
    let launch = Background::launch(&cfg, &s, &["--workers", "3"]);
    wait_for_steps(&hit, 5);
    let survivors = [launch.child("--rank 0"), launch.child("--rank 2")];
    let coordinator = launch.child(" coordinator --config");
    let victim = launch.child("--rank 1");
    let killed_at = Instant::now();
    unsafe { libc_kill(victim, 9) };
    while children(launch.child.id(), "--rank 1")
        .iter()
        .all(|p| *p == victim)
    {
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "no replacement started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        [launch.child("--rank 0"), launch.child("--rank 2")],
        survivors,
        "the other workers keep running"
    );
    assert_eq!(launch.child(" coordinator --config"), coordinator);
    let (status, text) = launch.finish();
    assert!(status.success(), "launch must recover: {text}");
    assert!(text.contains("starting a replacement"), "{text}");
    assert!(
        text.contains("healed from a live peer"),
        "the replacement takes a survivor's state from its Peer server: {text}"
    );
    let recovered = common::events(&hit, "recovered");
    assert_eq!(recovered.len(), 1, "one recovery: {recovered:?}");
    println!(
        "worker SIGKILL -> first step after recovery: {:.2} s after the ring broke up (test total {:.1} s)",
        recovered[0]["seconds"].as_f64().unwrap(),
        killed_at.elapsed().as_secs_f64()
    );
    let generations = common::events(&hit, "generation");
    assert_eq!(generations.len(), 2, "{generations:?}");
    assert_eq!(generations[1]["workers"], 3);
    assert_eq!(generations[1]["healing"], 1, "the replacement heals");
    assert_eq!(batch_steps(&hit), (1..=60).collect::<Vec<_>>());
    // Same global batches, same ring size, state healed bit for bit: the same model.
    assert!(
        same_bytes(&clean, &hit),
        "replaced run differs from the clean run"
    );

    // A worker stalls (SIGSTOP) and no replacement comes, but two workers suffice: the ring
    // re-forms with the two. When the stalled worker wakes up (SIGCONT) it finds its generation
    // over, joins again, heals, and the ring grows back to three at the next step boundary.
    let shrunk = dir.path().join("shrunk");
    let mut s = sets(&model, &shrunk, &extra);
    s.extend([
        "cluster.max_restarts=0".to_string(),
        "cluster.min_workers=2".to_string(),
        "cluster.rejoin_grace_ms=500".to_string(),
    ]);
    let launch = Background::launch(&cfg, &s, &["--workers", "3"]);
    wait_for_steps(&shrunk, 5);
    let stalled = launch.child("--rank 2");
    unsafe { libc_kill(stalled, 19) };
    let started = Instant::now();
    while !common::events(&shrunk, "generation")
        .iter()
        .any(|g| g["workers"] == 2)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the ring did not re-form without the stalled worker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc_kill(stalled, 18) };
    let (status, text) = launch.finish();
    assert!(status.success(), "launch must go on: {text}");
    let sizes: Vec<u64> = common::events(&shrunk, "generation")
        .iter()
        .map(|g| g["workers"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![3, 2, 3], "shrinks, then grows back");
    assert!(
        common::events(&shrunk, "generation_end")[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no heartbeat"),
        "the stall is detected by heartbeats"
    );
    assert_eq!(batch_steps(&shrunk), (1..=60).collect::<Vec<_>>());
    // Two shards instead of three sum the gradient in another order: equal up to rounding.
    common::assert_same_run(&clean, &shrunk, "shrunk to two workers and grown back", &[]);
}

#[test]
fn a_coordinator_killed_mid_run_comes_back_with_resume_and_the_workers_rejoin() {
    let _serial = serial();
    coordinator_killed("grpc");
}

#[test]
fn on_gloo_a_coordinator_killed_mid_run_comes_back_and_the_workers_meet_at_its_new_store() {
    let _serial = serial();
    coordinator_killed("gloo");
}

/// On data plane `collective`: the coordinator SIGKILLed mid-run comes back with `--resume` (a
/// new Gloo store too), the same workers rejoin, and the model equals the clean run's.
fn coordinator_killed(collective: &str) {
    let plane = format!("cluster.collective=\"{collective}\"");
    let extra = [
        "train.batch_size=6",
        "train.max_steps=30",
        "output.checkpoint_every_steps=4",
        plane.as_str(),
    ];
    let (dir, model, cfg, clean) = reference_run(&extra, "3");

    let hit = dir.path().join("hit");
    let mut s = sets(&model, &hit, &extra);
    s.push("cluster.max_restarts=1".into());
    let launch = Background::launch(&cfg, &s, &["--workers", "3"]);
    wait_for_steps(&hit, 6);
    let workers: Vec<i32> = (0..3)
        .map(|r| launch.child(&format!("--rank {r}")))
        .collect();
    unsafe { libc_kill(launch.child(" coordinator --config"), 9) };
    // The same three worker processes finish the run.
    std::thread::sleep(Duration::from_millis(500));
    let still: Vec<i32> = (0..3)
        .map(|r| launch.child(&format!("--rank {r}")))
        .collect();
    assert_eq!(workers, still, "no worker was restarted");
    let (status, text) = launch.finish();
    assert!(status.success(), "launch must recover: {text}");
    assert!(text.contains("restarting it with --resume"), "{text}");
    assert_eq!(common::resumed_from(&hit).len(), 1);
    assert_eq!(batch_steps(&hit), (1..=30).collect::<Vec<_>>());
    assert!(
        same_bytes(&clean, &hit),
        "the run differs from the clean run"
    );
    let (_, last) = multipos::train::checkpoint::latest_valid(&hit.join("checkpoints"))
        .unwrap()
        .unwrap();
    assert_eq!(last.step, 30, "a checkpoint at the end of the run");
}

#[test]
fn sigterm_checkpoints_stops_every_process_and_the_run_resumes_exactly() {
    let _serial = serial();
    let extra = ["train.batch_size=6", "train.max_steps=40"];
    let (dir, model, cfg, clean) = reference_run(&extra, "2");

    // No periodic checkpoints: the one the stop writes is all there is to resume from.
    let stopped = dir.path().join("stopped");
    let s = sets(&model, &stopped, &extra);
    let launch = Background::launch(&cfg, &s, &["--workers", "2"]);
    wait_for_steps(&stopped, 4);
    // Signal every process at once, as a scheduler ending the job does.
    let pid = launch.child.id();
    let all = children(pid, "multipos");
    assert_eq!(all.len(), 3, "coordinator and two workers");
    unsafe { libc_kill(pid as i32, 15) };
    for child in all {
        unsafe { libc_kill(child, 15) };
    }
    assert_stop_checkpointed_and_resumes_exactly(launch, &cfg, &s, &clean, &stopped);

    // The stop arrives while the ring re-forms (a worker stalled past the heartbeat timeout): the
    // stop waits for the ring to form again, and its rank 0 writes the checkpoint.
    let reforming = dir.path().join("reforming");
    let mut s = sets(&model, &reforming, &extra);
    s.extend([
        "cluster.heartbeat_timeout_ms=1500".to_string(),
        "cluster.rejoin_grace_ms=20000".to_string(),
    ]);
    let launch = Background::launch(&cfg, &s, &["--workers", "2"]);
    wait_for_steps(&reforming, 4);
    let pid = launch.child.id();
    let all = children(pid, "multipos");
    let stalled = launch.child("--rank 1");
    unsafe { libc_kill(stalled, 19) };
    let started = Instant::now();
    while common::events(&reforming, "generation_end").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the stall did not end the ring"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc_kill(pid as i32, 15) };
    for child in all {
        unsafe { libc_kill(child, 15) };
    }
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc_kill(stalled, 18) };
    assert_stop_checkpointed_and_resumes_exactly(launch, &cfg, &s, &clean, &reforming);
}

/// A launch that was signalled stops with a checkpoint of its last committed step (cursor and
/// metrics recorded), and `--resume` ends it equal to the uninterrupted run.
fn assert_stop_checkpointed_and_resumes_exactly(
    launch: Background,
    cfg: &Path,
    s: &[String],
    clean: &Path,
    stopped: &Path,
) {
    let pid = launch.child.id();
    let (status, text) = launch.finish();
    assert!(!status.success(), "a stopped run is not finished: {text}");
    assert!(text.contains("stopped by a signal"), "{text}");
    assert!(children(pid, "multipos").is_empty());
    let steps = losses(stopped).len() as u64;
    assert!(steps < 40, "stopped early");
    let (_, state) = multipos::train::checkpoint::latest_valid(&stopped.join("checkpoints"))
        .unwrap()
        .unwrap_or_else(|| panic!("the stop wrote no checkpoint; the launch said:\n{text}"));
    assert_eq!(state.step, steps, "checkpoint of the last committed step");
    // The coordinator records the data cursor and the metrics so far in the checkpoint.
    let config = multipos::config::RunConfig::load(cfg, s).unwrap();
    let tasks = multipos::train::task::load_tasks(&config.tasks()).unwrap();
    let plan = multipos::train::build::plan_for(&config, &tasks).unwrap();
    assert_eq!((state.epoch, state.batch), plan.cursor(steps));
    let (ckpt, _) = multipos::train::checkpoint::latest_valid(&stopped.join("checkpoints"))
        .unwrap()
        .unwrap();
    let logged = std::fs::read_to_string(ckpt.join("metrics.jsonl")).unwrap();
    assert_eq!(
        logged
            .lines()
            .filter(|l| l.contains("\"event\":\"step\""))
            .count() as u64,
        steps
    );

    launch_ok(cfg, s, &["--workers", "2", "--resume"]);
    assert_eq!(common::resumed_from(stopped), vec![steps]);
    assert_eq!(batch_steps(stopped), (1..=40).collect::<Vec<_>>());
    assert_eq!(
        common::losses_by_step(clean),
        common::losses_by_step(stopped)
    );
    assert!(same_bytes(clean, stopped));
}

/// Pids of processes whose parent is `parent` and whose command line contains `needle`.
fn children(parent: u32, needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read_to_string(entry.path().join("cmdline"))
            .unwrap_or_default()
            .replace('\0', " ");
        if ppid == Some(parent) && cmdline.contains(needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_killed_worker_fails_the_launch_quickly_and_clearly() {
    let _serial = serial();
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("killed");
    let mut launch = command(
        "launch",
        &repo("configs/local-2workers.toml"),
        &sets(
            &model,
            &out,
            &["train.max_steps=3000", "cluster.max_restarts=0"],
        ),
        &["--workers", "2"],
    )
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = launch.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });

    // Wait for training to be under way, then SIGKILL worker 1.
    let started = Instant::now();
    while !out.join("metrics.jsonl").exists() || losses(&out).len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let workers = children(launch.id(), "--rank 1");
    assert_eq!(workers.len(), 1, "one worker with rank 1");
    let killed_at = Instant::now();
    unsafe { libc_kill(workers[0], 9) };

    let status = loop {
        if let Some(s) = launch.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "launch hung after a worker died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = log.join().unwrap();
    assert!(!status.success(), "launch must fail");
    assert!(
        text.contains("worker 1 failed") || text.contains("sent no heartbeat"),
        "{text}"
    );
    assert!(children(launch.id(), "multipos").is_empty());
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A SoftmaxLoss run (one class per query of the tiny data) whose worker is SIGKILLed: the
/// replacement heals the classifier with the rest from a live peer, and the final model and
/// classifier are the clean run's, bit for bit.
#[test]
fn a_replacement_worker_heals_the_classifier_and_the_moving_average_too() {
    let _serial = serial();
    let extra = [
        "train.batch_size=6",
        "train.max_steps=30",
        "train.ema_decay=0.9",
        "loss.type=\"softmax\"",
    ];
    let (dir, model, cfg, clean) = reference_run(&extra, "2");
    assert!(clean.join("model/heads/default.safetensors").exists());
    let hit = dir.path().join("replaced");
    let mut s = sets(&model, &hit, &extra);
    s.push("cluster.max_restarts=1".into());
    let launch = Background::launch(&cfg, &s, &["--workers", "2"]);
    wait_for_steps(&hit, 5);
    let victim = launch.child("--rank 1");
    unsafe { libc_kill(victim, 9) };
    let (status, text) = launch.finish();
    assert!(status.success(), "launch must recover: {text}");
    assert!(text.contains("healed from a live peer"), "{text}");
    assert_eq!(batch_steps(&hit), (1..=30).collect::<Vec<_>>());
    assert!(
        same_bytes(&clean, &hit),
        "the encoder differs from the clean run"
    );
    assert_eq!(
        std::fs::read(clean.join("model/heads/default.safetensors")).unwrap(),
        std::fs::read(hit.join("model/heads/default.safetensors")).unwrap(),
        "the classifier differs from the clean run"
    );
    for file in ["model.safetensors", "heads/default.safetensors"] {
        assert_eq!(
            std::fs::read(clean.join("model-ema").join(file)).unwrap(),
            std::fs::read(hit.join("model-ema").join(file)).unwrap(),
            "the moving average ({file}) differs from the clean run"
        );
    }
}
