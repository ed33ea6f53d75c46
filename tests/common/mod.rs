//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use multipos::model::tiny::{TinySpec, write_random_model};

/// libtorch's RNG is process-global and tests run on parallel threads: writing a random model
/// seeds it and draws from it, so writers take turns (nothing else in multipos draws from it).
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A temp dir holding a freshly written tiny random model.
pub fn tiny_model(spec: &TinySpec) -> (tempfile::TempDir, PathBuf) {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_random_model(&model, spec).unwrap();
    (dir, model)
}

/// all-MiniLM-L6-v2 as installed by `deploy/setup.sh` (the README's test command runs it first).
pub fn minilm_dir() -> PathBuf {
    let dir = multipos::model::default_dir();
    assert!(
        dir.join("model.safetensors").exists(),
        "all-MiniLM-L6-v2 not found at {}: run deploy/setup.sh first",
        dir.display()
    );
    dir
}

/// Rows of a 2-D float tensor.
pub fn rows(t: &tch::Tensor) -> Vec<Vec<f32>> {
    Vec::<Vec<f32>>::try_from(t).unwrap()
}

/// Every file of a directory, recursively, with its bytes, keyed by relative path.
pub fn dir_files(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// The losses of the `"step"` records of a run's `metrics.jsonl`, in order.
pub fn step_losses(metrics: &Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// The `"event": kind` records of a run's `metrics.jsonl`, in order.
pub fn events(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == kind)
        .collect()
}

/// The step each logged resume of a run continued from.
pub fn resumed_from(out: &Path) -> Vec<u64> {
    events(out, "resume")
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

/// The last loss logged for each step (a resumed run re-logs the steps after its checkpoint).
pub fn losses_by_step(out: &Path) -> std::collections::BTreeMap<u64, f64> {
    events(out, "step")
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// Waits until `out/checkpoints` holds a valid checkpoint (panics after `limit`).
pub fn wait_for_checkpoint(out: &Path, limit: std::time::Duration) {
    let started = std::time::Instant::now();
    while multipos::train::checkpoint::latest_valid(&out.join("checkpoints"))
        .ok()
        .flatten()
        .is_none()
    {
        assert!(
            started.elapsed() < limit,
            "no checkpoint appeared in {}",
            out.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Every tensor a run saved in `model_dir` (`model.safetensors` and each `heads/*.safetensors`), as
/// ("file/name", values), in a fixed order.
pub fn saved_tensors(model_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut files = vec![model_dir.join("model.safetensors")];
    if let Ok(heads) = std::fs::read_dir(model_dir.join("heads")) {
        let mut h: Vec<PathBuf> = heads
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        h.sort();
        files.extend(h);
    }
    let mut out = Vec::new();
    for f in files {
        let mut t = tch::Tensor::read_safetensors(&f).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
        out.extend(t.into_iter().map(|(n, v)| {
            let values = Vec::<f32>::try_from(v.to_kind(tch::Kind::Float).reshape([-1])).unwrap();
            (format!("{stem}/{n}"), values)
        }));
    }
    out
}

/// The same steps with losses within 1e-5 (relative) and every saved tensor within 1e-4: the same
/// run up to summation order. Tensors whose name ends with one of `skip` are not compared.
pub fn assert_same_run(reference: &Path, other: &Path, what: &str, skip: &[&str]) {
    let (a, b) = (losses_by_step(reference), losses_by_step(other));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: steps"
    );
    for (k, x) in &a {
        assert!(
            (x - b[k]).abs() <= 1e-5 * x.abs().max(1e-3),
            "{what}: step {k} loss {} vs reference {x}",
            b[k]
        );
    }
    assert_same_tensors(&reference.join("model"), &other.join("model"), what, skip);
}

/// Every tensor two model directories saved is within 1e-4, except those whose name ends with
/// one of `skip`.
pub fn assert_same_tensors(reference: &Path, other: &Path, what: &str, skip: &[&str]) {
    let (ta, tb) = (saved_tensors(reference), saved_tensors(other));
    assert_eq!(
        ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
        tb.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "{what}: the same tensors saved"
    );
    let (name, max) = ta
        .iter()
        .zip(&tb)
        .filter(|((n, _), _)| !skip.iter().any(|s| n.ends_with(s)))
        .map(|((n, x), (_, y))| {
            let d = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            (n, d)
        })
        .fold((&ta[0].0, 0f32), |a, b| if b.1 > a.1 { b } else { a });
    assert!(
        max <= 1e-4,
        "{what}: final weights differ by up to {max} (in {name})"
    );
}

/// A (rows, columns) f32 tensor from nested f64 rows (as the JSON fixtures store them).
pub fn tensor_f64_rows(rows: &[Vec<f64>]) -> tch::Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    tch::Tensor::from_slice(&flat)
        .view([rows.len() as i64, rows[0].len() as i64])
        .to_kind(tch::Kind::Float)
}

/// Replays the early-stopping rule on logged `eval` events with lower NDCG@10 counted as better:
/// the step where `patience` evaluations in a row brought no new best, and the best (step, value)
/// then.
pub fn first_stop_lower_is_better(
    evals: &[serde_json::Value],
    patience: u64,
) -> Option<(u64, (u64, f64))> {
    let (mut best, mut since) = ((0u64, f64::INFINITY), 0);
    for e in evals {
        let (step, v) = (
            e["step"].as_u64().unwrap(),
            e["metrics"]["ndcg@10"].as_f64().unwrap(),
        );
        if v < best.1 {
            (best, since) = ((step, v), 0);
        } else {
            since += 1;
            if since == patience {
                return Some((step, best));
            }
        }
    }
    None
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), dst).unwrap();
        }
    }
}

/// The address a coordinator started with piped stdout announces; its stdout is drained from then
/// on, since a closed pipe would kill it at its next print.
pub fn announced_address(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let stdout = child
        .stdout
        .take()
        .expect("the coordinator's stdout is piped");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the coordinator announces its address")
            .unwrap();
        if let Some(a) = line.strip_prefix("MULTIPOS_COORDINATOR=") {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    addr
}

/// Whether the container entry point or `multipos ROLE` reads the environment variable `name`
/// (the entry point names it in its script, the binary in `--help`).
pub fn env_understood(role: &str, name: &str) -> bool {
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/docker/entrypoint.sh"),
    )
    .unwrap();
    script.contains(&format!("${{{name}"))
        || subcommand_help(role).contains(&format!("${name}"))
        || subcommand_help(role).contains(&format!("[env: {name}="))
}

/// Whether `multipos ROLE` takes the flag `flag` (`--name`).
pub fn has_flag(role: &str, flag: &str) -> bool {
    subcommand_help(role).lines().any(|l| {
        l.split_whitespace()
            .take(2)
            .any(|w| w.trim_end_matches(',') == flag)
    })
}

fn subcommand_help(role: &str) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args([role, "--help"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `--set` arguments of a short cluster run of the tiny model on the bundled tiny data: `steps`
/// steps of batch 6, one thread per worker, output in `out`.
pub fn tiny_run_args(model: &Path, out: &Path, steps: u32) -> Vec<String> {
    let data =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/data/bible_paraphrase_tiny/train.jsonl");
    [
        format!("model.path=\"{}\"", model.display()),
        format!("data.train=\"{}\"", data.display()),
        format!("output.dir=\"{}\"", out.display()),
        format!("train.max_steps={steps}"),
        "train.batch_size=6".into(),
        "cluster.threads_per_worker=1".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// Runs `f` on every rank of a `world`-rank gRPC ring over loopback, each rank on a thread of its
/// own (as a worker drives its ring from blocking code); returns the ranks' results in rank order.
pub fn on_ring<T: Send>(
    world: usize,
    f: impl Fn(&mut dyn multipos::collective::Collective) -> T + Sync,
) -> Vec<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rings = rt.block_on(multipos::cluster::peer::loopback_rings(
        world,
        ("loopback-ring-key", "loopback-ring-key"),
        None,
        64 << 10,
        std::time::Duration::from_secs(60),
    ));
    std::thread::scope(|s| {
        let handles: Vec<_> = rings
            .iter()
            .map(|ring| {
                let (rt, f) = (&rt, &f);
                s.spawn(move || {
                    let _ctx = rt.enter();
                    let (_never, abort) = tokio::sync::watch::channel(None);
                    f(&mut multipos::train::exchange::OverHost(
                        multipos::cluster::ring::BlockingRing::new(ring, abort),
                    ))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `--set` values that point `configs/tiny.toml` at `model`, at output `out`, and at the bundled
/// tiny data by absolute path (so the run works from any directory), without evaluating at start.
pub fn tiny_config_sets(model: &Path, out: &Path) -> Vec<String> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/data/bible_paraphrase_tiny");
    vec![
        format!("model.path=\"{}\"", model.display()),
        format!("output.dir=\"{}\"", out.display()),
        format!("data.train=\"{}\"", data.join("train.jsonl").display()),
        format!(
            "eval.queries=\"{}\"",
            data.join("dev_queries.jsonl").display()
        ),
        format!("eval.corpus=\"{}\"", data.join("corpus.jsonl").display()),
        format!("eval.qrels=\"{}\"", data.join("dev_qrels.tsv").display()),
        "eval.at_start=false".into(),
    ]
}

/// multipos's cache folder: `$MULTIPOS_CACHE`, else `~/.cache/multipos` (where deploy/ installs).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MULTIPOS_CACHE").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/multipos"),
        PathBuf::from,
    )
}

/// `multipos ARGS --config configs/tiny.toml --set SETS...` (warnings only, no inherited token),
/// which must succeed; its output.
pub fn run_tiny(args: &[&str], sets: &[String]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"));
    cmd.args(args)
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml"));
    for s in sets {
        cmd.args(["--set", s]);
    }
    let o = cmd
        .env("RUST_LOG", "warn")
        .env_remove("MULTIPOS_CLUSTER_TOKEN")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "multipos {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A child process killed when dropped: a test that fails leaves none behind.
pub struct Reaped(Option<std::process::Child>);

impl Reaped {
    /// Takes care of `child`.
    pub fn new(child: std::process::Child) -> Self {
        Self(Some(child))
    }

    /// The child, while it runs.
    pub fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("not yet handed back")
    }

    /// The child back, to wait for it normally.
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().expect("not yet handed back")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
