//! `multipos launch`: a coordinator and N local worker processes from one config. Their output is
//! streamed with a prefix. A process that dies is started again (up to `cluster.max_restarts` in
//! all): a worker re-joins and heals from a live peer, the coordinator comes back with `--resume`
//! on the same address and the workers re-join it. SIGINT/SIGTERM stop the run gracefully (the
//! coordinator checkpoints and stops the workers); the launch exits non-zero unless the run
//! finished.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::cluster::status::StatusClient;
use crate::config::{RunConfig, TOKEN_ENV};
use crate::error::{Error, Result};
use crate::logging;
use crate::net::auth::Token;
use crate::net::tls::Tls;
use crate::progress::{self, Display, Show};

/// The line a coordinator prints on stdout once it listens.
pub(crate) const ANNOUNCE: &str = "MULTIPOS_COORDINATOR=";

/// What to launch.
#[derive(Debug, Clone)]
pub(crate) struct LaunchOptions {
    pub config: PathBuf,
    pub sets: Vec<String>,
    /// Overrides `cluster.workers`.
    pub workers: Option<usize>,
    /// How progress is shown: a bar drawn from the coordinator's `Status`, or its progress lines.
    pub progress: Show,
}

/// The launch's stderr: the processes' lines, and the progress bar below them on a terminal.
struct Console {
    bar: Option<ProgressBar>,
    /// Log lines as JSON (`--log-format json`).
    json: bool,
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Console {
    /// A line of the launch's own.
    fn note(&self, note: impl std::fmt::Display) {
        if self.json {
            self.show(|| tracing::info!(process = "launch", "{note}"));
        } else {
            self.show(|| eprintln!("[launch] {note}"));
        }
    }

    /// A line a process wrote: prefixed with its name, or, as JSON, with a `process` field.
    fn child(&self, role: Role, line: &str) {
        if !self.json {
            return self.show(|| eprintln!("[{role}] {line}"));
        }
        let record = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(mut fields)) => {
                fields.insert("process".into(), role.to_string().into());
                serde_json::Value::Object(fields)
            }
            _ => serde_json::json!({"process": role.to_string(), "message": line}),
        };
        self.show(|| eprintln!("{record}"));
    }

    fn show(&self, print: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

/// Keeps `bar` up to date from the coordinator's `Status` once a second, reconnecting as needed
/// (a restarted coordinator comes back on the same address).
async fn watch(address: String, token: Token, tls: Option<Tls>, bar: ProgressBar) {
    loop {
        let Ok(mut client) =
            StatusClient::connect(&address, &token, tls.as_ref(), Duration::from_secs(5)).await
        else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        while let Ok(s) = client.get().await {
            bar.set_length(s.total_steps);
            bar.set_position(s.step);
            let loss = if s.loss.is_finite() {
                format!("loss {:.4}  ", s.loss)
            } else {
                String::new()
            };
            bar.set_message(format!(
                "{loss}{:.1} pairs/s  {} of {} workers  {}",
                s.pairs_per_s,
                s.members.len(),
                s.workers_wanted,
                s.phase
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Which local process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Coordinator,
    Worker(usize),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Coordinator => write!(f, "coordinator"),
            Role::Worker(r) => write!(f, "worker {r}"),
        }
    }
}

enum Event {
    Line(Role, String),
    Exited(Role, std::io::Result<std::process::ExitStatus>),
}

/// A running child: its pid (for signals) and a way to kill it.
struct Handle {
    pid: Option<u32>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Handle {
    fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
    }

    fn terminate(&self) {
        if let Some(pid) = self.pid {
            // SAFETY: kill(2) with a pid we started and still own (it has not been reaped).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
}

fn spawn(role: Role, mut cmd: Command, events: mpsc::UnboundedSender<Event>) -> Result<Handle> {
    // Children get their own process group: a Ctrl-C in the terminal reaches only the launch,
    // which turns it into an orderly stop through the coordinator.
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let mut child: Child = cmd
        .spawn()
        .map_err(Error::io("start", PathBuf::from(role.to_string())))?;
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
        let events = events.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = events.send(Event::Line(role, line));
            }
        });
    }
    let pid = child.id();
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = kill_rx => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let _ = events.send(Event::Exited(role, status));
    });
    Ok(Handle {
        pid,
        kill: Some(kill_tx),
    })
}

/// Starts processes with the same settings every time.
struct Starter {
    exe: PathBuf,
    config: PathBuf,
    sets: Vec<String>,
    token: String,
    /// `--progress` and `--progress-every-s` for the coordinator.
    progress_args: Vec<String>,
    cfg: RunConfig,
    threads: usize,
    gpus: usize,
    events: mpsc::UnboundedSender<Event>,
}

impl Starter {
    fn coordinator(&self, extra_sets: &[String]) -> Result<Handle> {
        let mut c = Command::new(&self.exe);
        c.arg("coordinator")
            .arg("--config")
            .arg(&self.config)
            .args(&self.progress_args)
            .env(TOKEN_ENV, &self.token);
        for s in self.sets.iter().chain(extra_sets) {
            c.arg("--set").arg(s);
        }
        spawn(Role::Coordinator, c, self.events.clone())
    }

    fn worker(&self, rank: usize, coordinator: &str) -> Result<Handle> {
        let device = self.cfg.model.device.as_deref().unwrap_or("auto");
        let dev = match device {
            "cuda" | "auto" if self.gpus > 0 => format!("cuda:{}", rank % self.gpus),
            other => other.to_string(),
        };
        let mut w = Command::new(&self.exe);
        w.arg("worker")
            .arg("--coordinator")
            .arg(coordinator)
            .arg("--rank")
            .arg(rank.to_string())
            .arg("--threads")
            .arg(self.threads.to_string())
            .arg("--device")
            .arg(dev)
            .arg("--peer-host")
            .arg(&self.cfg.cluster.peer_host)
            .env(TOKEN_ENV, &self.token);
        if let Some(model) = &self.cfg.model.path {
            w.arg("--model").arg(model);
        }
        if let Some(tls) = &self.cfg.cluster.tls {
            w.arg("--tls-ca")
                .arg(&tls.ca)
                .arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key);
        }
        spawn(Role::Worker(rank), w, self.events.clone())
    }
}

/// How the launch is ending.
enum Ending {
    Finished,
    Failed(String),
    Interrupted,
}

/// Runs the whole local cluster; Ok only when the coordinator finished the run.
pub(crate) async fn launch(opts: LaunchOptions) -> Result<()> {
    let (starter, console, mut rx) = prepare(&opts)?;
    let mut run = Running {
        coordinator: starter.coordinator(&[])?,
        handles: (0..starter.cfg.cluster.workers).map(|_| None).collect(),
        address: None,
        running: 1,
        restarts: 0,
        ending: None,
        starter,
        console,
    };
    let mut signals = super::signals::Signals::new()?;
    let mut signalled = false;
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = signals.recv() => {
                run.signal(signalled);
                signalled = true;
                continue;
            }
        };
        let Some(event) = event else { break };
        match event {
            Event::Line(Role::Coordinator, line) if line.starts_with(ANNOUNCE) => {
                run.announced(line[ANNOUNCE.len()..].trim())?;
            }
            Event::Line(role, line) => run.console.child(role, &line),
            Event::Exited(role, status) => {
                run.running -= 1;
                let ok = matches!(&status, Ok(s) if s.success());
                let how = match &status {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                match role {
                    Role::Coordinator => run.coordinator_exited(ok, &how)?,
                    Role::Worker(rank) => run.worker_exited(rank, ok, &how)?,
                }
                if run.running == 0 {
                    break;
                }
            }
        }
    }
    match run.ending {
        Some(Ending::Finished) => Ok(()),
        Some(Ending::Interrupted) => Err(Error::Interrupted(
            "stopped by a signal; continue with --resume".into(),
        )),
        Some(Ending::Failed(why)) => Err(Error::Usage(why)),
        None => Err(Error::Usage("the coordinator never started".into())),
    }
}

/// The launch's config, token, console and process starter, and the channel its children's
/// events arrive on.
fn prepare(opts: &LaunchOptions) -> Result<(Starter, Console, mpsc::UnboundedReceiver<Event>)> {
    let mut sets = opts.sets.clone();
    if let Some(n) = opts.workers {
        sets.push(format!("cluster.workers={n}"));
    }
    let cfg = RunConfig::load(&opts.config, &sets)?;
    // A token for this launch alone unless the user set one; children get it by environment,
    // never on a command line where other users could read it.
    let token = match cfg.cluster.resolve_token()? {
        Some(t) => t,
        None => crate::net::auth::Token::random().expose().to_string(),
    };
    let display = opts.progress.resolved();
    let console = Console {
        bar: (display == Display::Bar).then(|| progress::bar(0)),
        json: logging::json(),
    };
    // The launch draws the bar itself; the coordinator shows nothing then, or its lines.
    let progress_args = vec![
        "--progress".to_string(),
        if display == Display::Lines {
            "lines"
        } else {
            "off"
        }
        .into(),
        "--progress-every-s".into(),
        opts.progress.every.as_secs().max(1).to_string(),
    ];
    let workers = cfg.cluster.workers;
    let (tx, rx) = mpsc::unbounded_channel();
    let starter = Starter {
        exe: std::env::current_exe().map_err(Error::io("locate", "the multipos executable"))?,
        config: opts.config.clone(),
        sets,
        token,
        progress_args,
        threads: if cfg.cluster.threads_per_worker > 0 {
            cfg.cluster.threads_per_worker
        } else {
            (std::thread::available_parallelism().map_or(1, |n| n.get()) / workers).max(1)
        },
        gpus: crate::device::cuda_devices(),
        events: tx,
        cfg,
    };
    Ok((starter, console, rx))
}

/// The processes of a launch and how it is ending.
struct Running {
    starter: Starter,
    console: Console,
    coordinator: Handle,
    handles: Vec<Option<Handle>>,
    /// The coordinator's address, once it announced it.
    address: Option<String>,
    /// Children not yet exited.
    running: usize,
    restarts: usize,
    ending: Option<Ending>,
}

impl Running {
    /// A first signal stops the run gracefully (the coordinator checkpoints); a second kills.
    fn signal(&mut self, again: bool) {
        if again {
            self.console.note("second signal: killing every process");
            self.coordinator.kill();
            for h in self.handles.iter_mut().flatten() {
                h.kill();
            }
        } else {
            self.console
                .note("stopping: the coordinator checkpoints and stops the workers");
            self.coordinator.terminate();
        }
        self.ending = Some(Ending::Interrupted);
    }

    /// The coordinator listens at `addr`: the first time, start the workers (and the bar's
    /// watcher).
    fn announced(&mut self, addr: &str) -> Result<()> {
        if self.address.is_some() {
            return Ok(());
        }
        for (rank, h) in self.handles.iter_mut().enumerate() {
            *h = Some(self.starter.worker(rank, addr)?);
            self.running += 1;
        }
        if let Some(bar) = &self.console.bar {
            let token = Token::new(&self.starter.token).map_err(Error::Usage)?;
            let tls = self
                .starter
                .cfg
                .cluster
                .tls
                .as_ref()
                .map(Tls::load)
                .transpose()?;
            tokio::spawn(watch(addr.to_string(), token, tls, bar.clone()));
        }
        self.address = Some(addr.to_string());
        Ok(())
    }

    /// The coordinator exited: the run is over, or it is restarted with `--resume` (within
    /// `cluster.max_restarts`), or the launch fails.
    fn coordinator_exited(&mut self, ok: bool, how: &str) -> Result<()> {
        if ok {
            self.ending.get_or_insert(Ending::Finished);
            // Workers exit on their own once the run is done; give them a moment.
            let stragglers: Vec<Handle> =
                self.handles.iter_mut().filter_map(Option::take).collect();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                for mut h in stragglers {
                    h.kill();
                }
            });
            return Ok(());
        }
        let max = self.starter.cfg.cluster.max_restarts;
        if self.ending.is_none()
            && self.restarts < max
            && let Some(addr) = &self.address
        {
            self.restarts += 1;
            self.console.note(format!(
                "the coordinator failed ({how}): restarting it with --resume on {addr} (restart {} of {max})",
                self.restarts
            ));
            self.coordinator = self.starter.coordinator(&[
                "train.resume=\"latest\"".into(),
                format!("cluster.bind=\"{addr}\""),
            ])?;
            self.running += 1;
            return Ok(());
        }
        if self.ending.is_none() {
            self.console.note(format!(
                "the coordinator failed ({how}): stopping the workers"
            ));
            self.ending = Some(Ending::Failed(format!("the coordinator failed ({how})")));
        }
        for h in self.handles.iter_mut().flatten() {
            h.kill();
        }
        Ok(())
    }

    /// Worker `rank` exited: done, replaced (within `cluster.max_restarts`), left behind (the
    /// ring may shrink), or the launch fails.
    fn worker_exited(&mut self, rank: usize, ok: bool, how: &str) -> Result<()> {
        self.handles[rank] = None;
        let max = self.starter.cfg.cluster.max_restarts;
        if ok || self.ending.is_some() {
            // Done, stopped, or the launch is ending anyway.
        } else if self.restarts < max
            && let Some(addr) = &self.address
        {
            self.restarts += 1;
            self.console.note(format!(
                "worker {rank} failed ({how}): starting a replacement (restart {} of {max})",
                self.restarts
            ));
            self.handles[rank] = Some(self.starter.worker(rank, addr)?);
            self.running += 1;
        } else if self.starter.cfg.cluster.min_workers() < self.handles.len() {
            self.console.note(format!(
                "worker {rank} failed ({how}): the run goes on with fewer workers"
            ));
        } else {
            self.console.note(format!(
                "worker {rank} failed ({how}): stopping the other processes"
            ));
            self.ending = Some(Ending::Failed(format!("worker {rank} failed ({how})")));
            self.coordinator.kill();
            for h in self.handles.iter_mut().flatten() {
                h.kill();
            }
        }
        Ok(())
    }
}
