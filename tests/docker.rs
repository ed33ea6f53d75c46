//! The container files, tested where images cannot be built (no registry here): the entry point runs
//! a real coordinator and two workers with the Compose run's config over mutual TLS, the token on
//! the coordinator only and a credential per worker (secrets from deploy/make-secrets.sh), refuses
//! an unknown role, and passes plain commands through; the Compose file parses, mounts each service
//! its own secrets and asks only for variables the entry point reads and flags the binary has; the
//! Dockerfile has both targets and copies only files that exist.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use multipos::config::RunConfig;
use multipos::model::tiny::TinySpec;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `deploy/docker/entrypoint.sh` with the built binary on PATH and a clean environment.
fn entrypoint(envs: &[(&str, &str)]) -> Command {
    let bin = Path::new(env!("CARGO_BIN_EXE_multipos")).parent().unwrap();
    let mut c = Command::new(repo("deploy/docker/entrypoint.sh"));
    c.env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied());
    c
}

#[test]
fn the_entrypoint_refuses_unknown_roles_and_passes_plain_commands_through() {
    let o = entrypoint(&[("MULTIPOS_ROLE", "trainer")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown MULTIPOS_ROLE 'trainer'"));
    let o = entrypoint(&[]).arg("--version").output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("multipos "));
    let o = entrypoint(&[("MULTIPOS_ROLE", "worker")]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("MULTIPOS_COORDINATOR"));
}

#[test]
fn the_entrypoint_runs_the_compose_cluster_over_mutual_tls_with_worker_credentials() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    // The secrets as the README makes them, with 127.0.0.1 among the names (all run here).
    let secrets = dir.path().join("secrets");
    let made = Command::new(repo("deploy/make-secrets.sh"))
        .arg(&secrets)
        .args([
            "coordinator,127.0.0.1",
            "worker-0,127.0.0.1",
            "worker-1,127.0.0.1",
        ])
        .env("MULTIPOS_BIN", env!("CARGO_BIN_EXE_multipos"))
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = common::free_port();
    let out = dir.path().join("run");
    let secrets_dir = secrets.to_str().unwrap();
    let token_file = secrets.join("token");
    let config = repo("deploy/docker/cluster.toml");
    let mut coordinator = entrypoint(&[
        ("MULTIPOS_ROLE", "coordinator"),
        ("MULTIPOS_CONFIG", config.to_str().unwrap()),
        ("MULTIPOS_SECRETS", secrets_dir),
        ("MULTIPOS_NAME", "coordinator"),
        ("MULTIPOS_TOKEN_FILE", token_file.to_str().unwrap()),
    ]);
    for set in [
        format!("model.path=\"{}\"", model.display()),
        format!(
            "data.train=\"{}\"",
            repo("deploy/data/bible_paraphrase_tiny/train.jsonl").display()
        ),
        format!("output.dir=\"{}\"", out.display()),
        format!("cluster.bind=\"127.0.0.1:{port}\""),
        "train.max_steps=6".into(),
        "train.batch_size=6".into(),
    ] {
        coordinator.arg("--set").arg(set);
    }
    let mut coordinator = coordinator.stdout(Stdio::null()).spawn().unwrap();
    let address = format!("127.0.0.1:{port}");
    // The workers hold no token: only their certificates and credentials.
    let workers: Vec<_> = ["0", "1"]
        .into_iter()
        .map(|rank| {
            entrypoint(&[
                ("MULTIPOS_ROLE", "worker"),
                ("MULTIPOS_COORDINATOR", &address),
                ("MULTIPOS_PEER_HOST", "127.0.0.1"),
                ("MULTIPOS_SECRETS", secrets_dir),
                ("MULTIPOS_NAME", &format!("worker-{rank}")),
                ("RANK", rank),
            ])
            .args(["--threads", "1", "--model"])
            .arg(&model)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    assert!(
        coordinator.wait().unwrap().success(),
        "the coordinator failed"
    );
    for w in workers {
        let o = w.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "a worker failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(out.join("model/model.safetensors").exists());
    assert_eq!(common::step_losses(&out.join("metrics.jsonl")).len(), 6);
    // The run was served over TLS: the recorded configuration says so.
    let recorded: RunConfig =
        toml::from_str(&std::fs::read_to_string(out.join("config.toml")).unwrap()).unwrap();
    let tls = recorded
        .cluster
        .tls
        .expect("the coordinator ran with cluster.tls");
    assert!(tls.cert.ends_with("tls/coordinator.pem"), "{tls:?}");
}

fn load_yaml(path: &str) -> Yaml {
    let text = std::fs::read_to_string(repo(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

#[test]
fn the_compose_file_uses_only_what_the_image_understands() {
    let doc = load_yaml("deploy/docker/compose.yaml");
    let services = doc["services"].as_hash().expect("services");
    let names: Vec<&str> = services.keys().filter_map(Yaml::as_str).collect();
    assert_eq!(names, ["coordinator", "worker-0", "worker-1"]);
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let env = service["environment"].as_hash().expect("environment");
        let role = env[&Yaml::from_str("MULTIPOS_ROLE")].as_str().unwrap();
        for key in env.keys() {
            let key = key.as_str().unwrap();
            assert!(
                common::env_understood(role, key),
                "{name}: {key} is read by nothing"
            );
        }
        for arg in service["command"].as_vec().expect("command") {
            let arg = arg.as_str().unwrap();
            if arg.starts_with("--") {
                assert!(
                    common::has_flag(role, arg),
                    "{name}: multipos {role} has no {arg}"
                );
            }
        }
        // What the entry point reads: the token for the coordinator alone, certificates (and a
        // credential for a worker) under the names the service's host name picks.
        let host = service["hostname"].as_str().unwrap();
        let targets: Vec<String> = service["secrets"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| s["target"].as_str().unwrap().to_string())
            })
            .collect();
        let mut want = vec![
            "tls/ca.pem".to_string(),
            format!("tls/{host}.pem"),
            format!("tls/{host}-key.pem"),
        ];
        if role == "coordinator" {
            want.push("multipos_token".into());
        } else {
            want.push(format!("credentials/{host}"));
            assert!(
                !targets.contains(&"multipos_token".to_string()),
                "{name} holds the token"
            );
        }
        for w in want {
            assert!(targets.contains(&w), "{name} lacks {w}: {targets:?}");
        }
    }
    // Every secret comes from deploy/make-secrets.sh's files, never the CA key.
    for (_, secret) in doc["secrets"].as_hash().unwrap() {
        let file = secret["file"].as_str().unwrap();
        assert!(
            file.starts_with("./secrets/") && !file.contains("ca-key"),
            "{file}"
        );
    }
    // The mounted config is a valid run configuration (its data paths are the container's).
    let text = std::fs::read_to_string(repo("deploy/docker/cluster.toml")).unwrap();
    let cfg: RunConfig = toml::from_str(&text).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.cluster.workers, 2);
    assert!(cfg.cluster.bind.ends_with(":29500"));
}

#[test]
fn the_dockerfile_has_both_targets_and_copies_files_that_exist() {
    let text = std::fs::read_to_string(repo("deploy/docker/Dockerfile")).unwrap();
    for target in ["AS cpu", "AS cuda", "AS build-cpu", "AS build-cuda"] {
        assert!(text.contains(target), "no stage {target}");
    }
    assert!(
        text.contains("deploy/setup.sh --cuda"),
        "the CUDA build installs CUDA libtorch"
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let source = line.split_whitespace().nth(1).unwrap();
        assert!(
            source == "." || repo(source).exists(),
            "{line}: no such file"
        );
    }
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/entrypoint.sh\"]"));
}
