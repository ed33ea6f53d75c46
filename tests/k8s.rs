//! The Kubernetes manifests, checked offline: with the secrets `deploy/make-secrets.sh` makes (in a
//! copy of deploy/k8s), `kubectl kustomize` builds them; they hold the coordinator Job and Service,
//! the workers as an Indexed Job with a GPU each behind a headless Service, the config as a
//! ConfigMap (a valid run configuration whose worker count is the Job's parallelism), checkpoints
//! on a PersistentVolumeClaim, and a NetworkPolicy; mutual TLS is on by default: the coordinator
//! mounts the token and its certificate, each worker its certificate (whose names are the ones its
//! peers dial) and its own credential but not the token, and the CA key is in no Secret; every
//! environment variable and flag they pass is one the image's entry point or the binary reads.
mod common;

use std::path::Path;
use std::process::Command;

use multipos::config::RunConfig;
use multipos::net::tls::{Tls, TlsConfig};
use yaml_rust2::{Yaml, YamlLoader};

const WORKER_HOSTS: [&str; 2] = [
    "multipos-workers-0,multipos-workers-0.multipos-workers",
    "multipos-workers-1,multipos-workers-1.multipos-workers",
];

/// The manifests built from a copy of deploy/k8s with its secrets made as the README says.
fn built(dir: &Path) -> Vec<Yaml> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let k8s = dir.join("k8s");
    std::fs::create_dir(&k8s).unwrap();
    for entry in std::fs::read_dir(repo.join("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, k8s.join(path.file_name().unwrap())).unwrap();
        }
    }
    let o = Command::new(repo.join("deploy/make-secrets.sh"))
        .arg(k8s.join("secrets"))
        .arg("multipos-coordinator")
        .args(WORKER_HOSTS)
        .env("MULTIPOS_BIN", env!("CARGO_BIN_EXE_multipos"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("kubectl")
        .arg("kustomize")
        .arg(&k8s)
        .output()
        .expect("kubectl is needed to build the manifests (deploy/test.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    YamlLoader::load_from_str(&String::from_utf8_lossy(&o.stdout)).unwrap()
}

/// The files a pod's Secret volumes put under /run/secrets (relative to it).
fn secret_paths(pod: &Yaml) -> Vec<String> {
    let mounts = pod["containers"][0]["volumeMounts"].as_vec().unwrap();
    let mut out = Vec::new();
    for volume in pod["volumes"].as_vec().unwrap() {
        if volume["secret"].is_badvalue() {
            continue;
        }
        let name = volume["name"].as_str().unwrap();
        let mount = mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("volume {name} is not mounted"));
        let dir = mount["mountPath"].as_str().unwrap();
        let dir = dir
            .strip_prefix("/run/secrets")
            .expect("secrets live under /run/secrets");
        for item in volume["secret"]["items"].as_vec().unwrap() {
            let path = format!("{dir}/{}", item["path"].as_str().unwrap());
            out.push(path.trim_start_matches('/').to_string());
        }
    }
    out
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| {
            d["kind"].as_str() == Some(kind)
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name))
        })
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_manifests_build_and_pass_only_what_the_image_understands() {
    let dir = tempfile::tempdir().unwrap();
    let docs = built(dir.path());
    let config = find(&docs, "ConfigMap", "multipos-config");
    let cfg: RunConfig = toml::from_str(config["data"]["cluster.toml"].as_str().unwrap()).unwrap();
    cfg.validate().unwrap();
    let workers = find(&docs, "Job", "multipos-workers");
    assert_eq!(workers["spec"]["completionMode"].as_str(), Some("Indexed"));
    assert_eq!(
        workers["spec"]["parallelism"].as_i64(),
        Some(cfg.cluster.workers as i64),
        "one worker pod per rank"
    );
    let coordinator = find(&docs, "Job", "multipos-coordinator");
    let service = find(&docs, "Service", "multipos-coordinator");
    let port = service["spec"]["ports"][0]["port"].as_i64().unwrap();
    assert!(
        cfg.cluster.bind.ends_with(&format!(":{port}")),
        "the Service reaches cluster.bind"
    );
    find(&docs, "PersistentVolumeClaim", "multipos-runs");
    for (role, job) in [("coordinator", coordinator), ("worker", workers)] {
        let pod = &job["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let env = container["env"].as_vec().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"MULTIPOS_ROLE"));
        for name in names {
            assert!(
                common::env_understood(role, name),
                "{role}: {name} is read by nothing"
            );
        }
        for arg in container["args"].as_vec().unwrap() {
            let arg = arg.as_str().unwrap();
            if arg.starts_with("--") {
                assert!(common::has_flag(role, arg), "multipos {role} has no {arg}");
            }
        }
    }
    let limits = &workers["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"];
    assert_eq!(limits["nvidia.com/gpu"].as_i64(), Some(1));
    // The worker's rank: the Indexed Job's completion index, which the binary reads.
    assert!(common::env_understood("worker", "JOB_COMPLETION_INDEX"));
    check_secrets(dir.path(), &docs, &cfg, coordinator, workers);
}

/// Mutual TLS and per-worker credentials by default; the CA key and the token stay where they
/// belong.
fn check_secrets(dir: &Path, docs: &[Yaml], cfg: &RunConfig, coordinator: &Yaml, workers: &Yaml) {
    let tls = dir.join("k8s/secrets/tls");
    let env = |pod: &Yaml, name: &str| {
        pod["containers"][0]["env"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .map(|e| e["value"].as_str().unwrap_or("").to_string())
    };
    let pod = &coordinator["spec"]["template"]["spec"];
    let name = env(pod, "MULTIPOS_NAME").expect("the coordinator's certificate name");
    let paths = secret_paths(pod);
    let token = env(pod, "MULTIPOS_TOKEN_FILE").expect("the token file's path");
    for want in [
        token.trim_start_matches("/run/secrets/").to_string(),
        "tls/ca.pem".into(),
        format!("tls/{name}.pem"),
        format!("tls/{name}-key.pem"),
    ] {
        assert!(
            paths.contains(&want),
            "the coordinator lacks {want}: {paths:?}"
        );
    }
    let coordinator_tls = Tls::load(&TlsConfig {
        ca: tls.join("ca.pem"),
        cert: tls.join(format!("{name}.pem")),
        key: tls.join(format!("{name}-key.pem")),
        client_auth: true,
    })
    .unwrap();
    assert_eq!(coordinator_tls.name(), name);
    let service = find(docs, "Service", "multipos-coordinator");
    assert_eq!(
        service["metadata"]["name"].as_str(),
        Some(name.as_str()),
        "workers dial the name in its certificate"
    );

    let pod = &workers["spec"]["template"]["spec"];
    let domain = env(pod, "MULTIPOS_PEER_DOMAIN").expect("workers advertise a DNS name");
    assert_eq!(pod["subdomain"].as_str(), Some(domain.as_str()));
    let headless = find(docs, "Service", &domain);
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    let paths = secret_paths(pod);
    assert!(
        !paths.iter().any(|p| p.contains("token")),
        "workers never hold the token: {paths:?}"
    );
    for rank in 0..cfg.cluster.workers {
        // An Indexed Job's pod is named JOB-INDEX: the entry point picks its own files by it.
        let host = format!("{}-{rank}", workers["metadata"]["name"].as_str().unwrap());
        for want in [
            "tls/ca.pem".to_string(),
            format!("tls/{host}.pem"),
            format!("tls/{host}-key.pem"),
            format!("credentials/{host}"),
        ] {
            assert!(
                paths.contains(&want),
                "worker {rank} lacks {want}: {paths:?}"
            );
        }
        let pem = std::fs::read(tls.join(format!("{host}.pem"))).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = der.parse_x509().unwrap();
        let dns: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            dns.iter().any(|n| n.contains(&format!("{host}.{domain}"))),
            "worker {rank}'s certificate lacks the name its peers dial: {dns:?}"
        );
    }
    // The CA key is in no Secret.
    let ca_key = std::fs::read(tls.join("ca-key.pem")).unwrap();
    let ca_key = String::from_utf8(ca_key).unwrap();
    for secret in docs.iter().filter(|d| d["kind"].as_str() == Some("Secret")) {
        for (key, value) in secret["data"].as_hash().unwrap() {
            let key = key.as_str().unwrap();
            assert!(!key.contains("ca-key"), "{key}");
            let value: String = value.as_str().unwrap().split_whitespace().collect();
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .unwrap();
            assert_ne!(
                decoded,
                ca_key.as_bytes(),
                "the CA key is in Secret data {key}"
            );
        }
    }
    // Metrics: reachable by Prometheus pods only.
    let policy = find(docs, "NetworkPolicy", "multipos");
    let rules = policy["spec"]["ingress"].as_vec().unwrap();
    let metrics = rules
        .iter()
        .find(|r| !r["ports"].is_badvalue())
        .expect("a rule for the metrics port");
    assert_eq!(metrics["ports"][0]["port"].as_i64(), Some(9464));
    let text = format!("{:?}", metrics["from"]);
    assert!(text.contains("prometheus"), "{text}");
}
