//! `multipos launch`: a coordinator and N local worker processes from one config. Their output is
//! streamed with a prefix; Ctrl-C or any process failing stops all of them, and the launch exits
//! non-zero unless the run finished.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::config::{RunConfig, TOKEN_ENV};
use crate::error::{Error, Result};

/// The line a coordinator prints on stdout once it listens.
pub const ANNOUNCE: &str = "MULTIPOS_COORDINATOR=";

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub config: PathBuf,
    pub sets: Vec<String>,
    /// Overrides `cluster.workers`.
    pub workers: Option<usize>,
}

enum Event {
    Line(String, String),
    Exited(String, std::io::Result<std::process::ExitStatus>),
}

fn spawn(
    name: String,
    mut cmd: Command,
    events: mpsc::UnboundedSender<Event>,
) -> Result<tokio::sync::oneshot::Sender<()>> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child: Child = cmd
        .spawn()
        .map_err(Error::io("start", PathBuf::from(&name)))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    {
        let (events, name) = (events.clone(), name.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = events.send(Event::Line(name.clone(), line));
            }
        });
    }
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = kill_rx => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let _ = events.send(Event::Exited(name, status));
    });
    Ok(kill_tx)
}

/// How one attempt ended.
enum Attempt {
    Finished,
    Failed(String),
    Interrupted,
}

/// Runs the whole local cluster; Ok only when the coordinator finished the run. When a process
/// fails, everything is stopped and (up to `cluster.max_restarts` times) started again from the
/// newest checkpoint, so no global batch is lost or applied twice.
pub async fn launch(opts: LaunchOptions) -> Result<()> {
    let mut sets = opts.sets.clone();
    if let Some(n) = opts.workers {
        sets.push(format!("cluster.workers={n}"));
    }
    let cfg = RunConfig::load(&opts.config, &sets)?;
    // A token for this launch alone unless the user set one; children get it by environment,
    // never on a command line where other users could read it.
    let token = match cfg.cluster.resolve_token()? {
        Some(t) => t,
        None => super::auth::Token::random().expose().to_string(),
    };
    let mut attempt = 0;
    loop {
        match run_once(&opts, &cfg, &sets, &token).await? {
            Attempt::Finished => return Ok(()),
            Attempt::Interrupted => return Err(Error::Usage("interrupted".into())),
            Attempt::Failed(why) if attempt < cfg.cluster.max_restarts => {
                attempt += 1;
                eprintln!(
                    "[launch] {why}: restarting every process from the newest checkpoint (restart {attempt} of {})",
                    cfg.cluster.max_restarts
                );
                if !sets.iter().any(|s| s.starts_with("train.resume=")) {
                    sets.push("train.resume=\"latest\"".into());
                }
            }
            Attempt::Failed(why) => return Err(Error::Usage(why)),
        }
    }
}

async fn run_once(
    opts: &LaunchOptions,
    cfg: &RunConfig,
    sets: &[String],
    token: &str,
) -> Result<Attempt> {
    let workers = cfg.cluster.workers;
    let exe = std::env::current_exe().map_err(Error::io("locate", "the multipos executable"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut kills = Vec::new();

    let mut coord = Command::new(&exe);
    coord
        .arg("coordinator")
        .arg("--config")
        .arg(&opts.config)
        .env(TOKEN_ENV, token);
    for s in sets {
        coord.arg("--set").arg(s);
    }
    kills.push(spawn("coordinator".into(), coord, tx.clone())?);

    let threads = if cfg.cluster.threads_per_worker > 0 {
        cfg.cluster.threads_per_worker
    } else {
        (std::thread::available_parallelism().map_or(1, |n| n.get()) / workers).max(1)
    };
    let device = cfg.model.device.clone().unwrap_or_else(|| "auto".into());
    let gpus = tch::Cuda::device_count().max(0) as usize;
    let mut started_workers = false;
    let mut running = 1usize;
    let mut outcome: Option<Attempt> = None;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = &mut interrupt => {
                tracing::warn!("interrupted: stopping every process");
                outcome.get_or_insert(Attempt::Interrupted);
                for k in kills.drain(..) {
                    let _ = k.send(());
                }
                continue;
            }
        };
        let Some(event) = event else { break };
        match event {
            Event::Line(name, line) => {
                if !started_workers
                    && name == "coordinator"
                    && let Some(addr) = line.strip_prefix(ANNOUNCE)
                {
                    started_workers = true;
                    for rank in 0..workers {
                        let mut w = Command::new(&exe);
                        let dev = match device.as_str() {
                            "cuda" | "auto" if gpus > 0 => format!("cuda:{}", rank % gpus),
                            other => other.to_string(),
                        };
                        w.arg("worker")
                            .arg("--coordinator")
                            .arg(addr.trim())
                            .arg("--rank")
                            .arg(rank.to_string());
                        w.arg("--threads")
                            .arg(threads.to_string())
                            .arg("--device")
                            .arg(dev);
                        w.arg("--peer-host").arg(&cfg.cluster.peer_host);
                        if let Some(model) = &cfg.model.path {
                            w.arg("--model").arg(model);
                        }
                        w.env(TOKEN_ENV, token);
                        kills.push(spawn(format!("worker {rank}"), w, tx.clone())?);
                        running += 1;
                    }
                    continue;
                }
                eprintln!("[{name}] {line}");
            }
            Event::Exited(name, status) => {
                running -= 1;
                let ok = matches!(&status, Ok(s) if s.success());
                if !ok && outcome.is_none() {
                    let how = match status {
                        Ok(s) => s.to_string(),
                        Err(e) => e.to_string(),
                    };
                    eprintln!("[launch] {name} failed ({how}): stopping the other processes");
                    outcome = Some(Attempt::Failed(format!("{name} failed ({how})")));
                    for k in kills.drain(..) {
                        let _ = k.send(());
                    }
                } else if ok && name == "coordinator" && outcome.is_none() {
                    outcome = Some(Attempt::Finished);
                    // Workers exit on their own once the coordinator is done; give them a moment.
                    let stragglers = std::mem::take(&mut kills);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        for k in stragglers {
                            let _ = k.send(());
                        }
                    });
                }
                if running == 0 {
                    break;
                }
            }
        }
    }
    Ok(outcome.unwrap_or_else(|| Attempt::Failed("the coordinator never started".into())))
}
