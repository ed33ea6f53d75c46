//! The Kubernetes manifests, checked offline: `kubectl kustomize deploy/k8s` builds them; they hold
//! the coordinator Job and Service, the workers as an Indexed Job with a GPU each, the config as a
//! ConfigMap (a valid run configuration whose worker count is the Job's parallelism), the token
//! from a Secret, checkpoints on a PersistentVolumeClaim; every environment variable and flag they
//! pass is one the image's entry point or the binary reads.
mod common;

use std::path::Path;
use std::process::Command;

use multipos::config::RunConfig;
use yaml_rust2::{Yaml, YamlLoader};

fn built() -> Vec<Yaml> {
    let o = Command::new("kubectl")
        .args(["kustomize", "deploy/k8s"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("kubectl is needed to build the manifests (deploy/test.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    YamlLoader::load_from_str(&String::from_utf8_lossy(&o.stdout)).unwrap()
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
    let docs = built();
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
        let secret = pod["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|v| !v["secret"].is_badvalue())
            .expect("the token comes from a Secret");
        assert_eq!(
            secret["secret"]["items"][0]["path"].as_str(),
            Some("multipos_token")
        );
    }
    let limits = &workers["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"];
    assert_eq!(limits["nvidia.com/gpu"].as_i64(), Some(1));
    // The worker's rank: the Indexed Job's completion index, which the binary reads.
    assert!(common::env_understood("worker", "JOB_COMPLETION_INDEX"));
}
