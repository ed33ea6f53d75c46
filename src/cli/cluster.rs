//! `multipos coordinator`, `multipos worker`, `multipos launch`.
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{ConfigArgs, ProgressArgs};
use crate::cluster::coordinator::{self, Coordinator, Outcome};
use crate::cluster::launch::{ANNOUNCE, LaunchOptions, launch};
use crate::cluster::signals::Signals;
use crate::cluster::worker::{self, WorkerOptions};
use crate::config::{ClusterConfig, RunConfig, TOKEN_ENV};
use crate::device;
use crate::net::auth::{Credential, Secret, Token};
use crate::net::tls::{Tls, TlsConfig};
use crate::train::build::FreshOutput;

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

/// How to reach a running coordinator: address, token, TLS.
#[derive(clap::Args, Debug)]
pub struct ConnectArgs {
    /// Coordinator address host:port [default: $MASTER_ADDR:$MASTER_PORT].
    #[arg(long)]
    pub coordinator: Option<String>,
    /// File holding the cluster token (as `cluster.token_file`) [default: $MULTIPOS_CLUSTER_TOKEN].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate of the run's TLS (as `cluster.tls.ca`); with --tls-cert and --tls-key.
    #[arg(long, env = "MULTIPOS_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This host's TLS certificate (as `cluster.tls.cert`).
    #[arg(long, env = "MULTIPOS_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This host's TLS private key (as `cluster.tls.key`).
    #[arg(long, env = "MULTIPOS_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

impl ConnectArgs {
    pub(super) fn address(&self) -> anyhow::Result<String> {
        match (
            &self.coordinator,
            std::env::var("MASTER_ADDR"),
            std::env::var("MASTER_PORT"),
        ) {
            (Some(c), _, _) => Ok(c.clone()),
            (None, Ok(a), Ok(p)) => Ok(format!("{a}:{p}")),
            _ => bail!(
                "no coordinator address: pass --coordinator HOST:PORT or set MASTER_ADDR and MASTER_PORT"
            ),
        }
    }

    pub(super) fn token(&self) -> anyhow::Result<Token> {
        Self::token_from_file(self.token_file.clone())
    }

    /// The cluster token from `file`, or from the environment without one.
    pub(super) fn token_from_file(file: Option<PathBuf>) -> anyhow::Result<Token> {
        token(&ClusterConfig {
            token_file: file,
            ..ClusterConfig::default()
        })
    }

    pub(super) fn tls(&self) -> anyhow::Result<Option<Tls>> {
        Ok(match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(Tls::load(&TlsConfig {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                client_auth: true,
            })?),
            _ => None,
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Rank to take [default: $RANK, $SLURM_PROCID, $JOB_COMPLETION_INDEX (a Kubernetes Indexed Job),
    /// or any free rank].
    #[arg(long)]
    pub rank: Option<usize>,
    /// Local copy of the model; without it the worker fetches the coordinator's.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda (= cuda:$LOCAL_RANK) or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads for libtorch (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Interface for this worker's peer server, as the other workers reach it.
    #[arg(long, default_value = "127.0.0.1")]
    pub peer_host: String,
    /// The name other workers dial this worker's peer server by, when not --peer-host (a DNS
    /// name that its TLS certificate carries, while --peer-host is the address it listens on).
    #[arg(long, env = "MULTIPOS_PEER_NAME")]
    pub peer_name: Option<String>,
    /// With cluster.collective = "gloo": the network interface Gloo's connections use (unset:
    /// the address of --peer-host, or of --peer-name when --peer-host is 0.0.0.0 or ::).
    #[arg(long, env = "GLOO_SOCKET_IFNAME")]
    pub gloo_interface: Option<String>,
    /// How long to keep trying to reach the coordinator, in seconds.
    #[arg(long, default_value_t = 120)]
    pub connect_timeout_s: u64,
    /// File holding this worker's own credential (`multipos credential NAME` prints it), used
    /// instead of the cluster token, which the worker's host then need not hold.
    #[arg(
        long,
        env = "MULTIPOS_WORKER_CREDENTIAL_FILE",
        conflicts_with = "token_file"
    )]
    pub credential_file: Option<PathBuf>,
}

impl WorkerArgs {
    /// The worker's credential when it has a file of one, else the cluster token.
    fn secret(&self) -> anyhow::Result<Secret> {
        match &self.credential_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let credential = Credential::parse(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                Ok(Secret::Worker(credential))
            }
            None => Ok(Secret::Token(self.connect.token()?)),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// Number of local workers [default: cluster.workers].
    #[arg(long)]
    pub workers: Option<usize>,
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn token(cfg: &ClusterConfig) -> anyhow::Result<Token> {
    let raw = cfg.resolve_token()?;
    let raw = raw.with_context(|| {
        format!("no cluster token: set {TOKEN_ENV}, cluster.token_file or cluster.token")
    })?;
    Token::new(&raw).map_err(anyhow::Error::msg)
}

fn env_usize(keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

pub(crate) fn run_coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config.config, &args.config.overrides())?;
    let token = token(&cfg.cluster)?;
    runtime()?.block_on(async move {
        let fresh = FreshOutput::watch(&cfg);
        let coord = Coordinator::new(cfg.clone(), args.progress.show())?;
        let listener = coordinator::bind(&cfg).await?;
        if let Some(metrics) = coordinator::bind_metrics(&cfg).await? {
            let addr = metrics.local_addr().context("reading the metrics address")?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
            coord.serve_metrics(metrics);
        }
        let addr = listener.local_addr().context("reading the bound address")?;
        if let Some(store) = coord.serve_store(addr)? {
            tracing::info!(%store, "serving the Gloo rendezvous store (cluster.collective = \"gloo\")");
        }
        fresh.keep();
        tracing::info!(%addr, workers = cfg.cluster.workers, steps = coord.total_steps(), "coordinator listening");
        println!("{ANNOUNCE}{addr}");
        let mut signals = Signals::new()?;
        let stop = async move { signals.recv().await };
        let coord_steps = coord.total_steps();
        match coord.serve(listener, token, stop).await? {
            Outcome::Finished { steps, model_dir } => {
                // Whoever read our announcement may be gone; the run's result is on disk either way.
                let _ = writeln!(std::io::stdout(), "finished {steps} steps; model: {}", model_dir.display());
                Ok(())
            }
            Outcome::Stopped {
                steps,
                checkpoint: Some(path),
                as_asked: true,
            } => {
                // A stop the config asked for is a success, as in `multipos train`.
                let _ = writeln!(
                    std::io::stdout(),
                    "stopped after {steps} of {} steps as asked (train.stop_after_steps); checkpoint {}; continue with --resume",
                    coord_steps,
                    path.display()
                );
                Ok(())
            }
            Outcome::Stopped {
                steps, checkpoint, ..
            } => match checkpoint {
                Some(path) => bail!(
                    "stopped by a signal after {steps} steps; checkpoint {}; continue with --resume",
                    path.display()
                ),
                None => bail!("stopped by a signal after {steps} steps, without a new checkpoint"),
            },
            Outcome::Aborted(reason) => bail!("run aborted: {reason}"),
        }
    })
}

pub(crate) fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let coordinator = args.connect.address()?;
    device::set_threads(args.threads)?;
    let rank = args
        .rank
        .or_else(|| env_usize(&["RANK", "SLURM_PROCID", "JOB_COMPLETION_INDEX"]));
    let device_spec = if args.device == "cuda" {
        format!(
            "cuda:{}",
            env_usize(&["LOCAL_RANK", "SLURM_LOCALID"]).unwrap_or(0)
        )
    } else {
        args.device.clone()
    };
    let opts = WorkerOptions {
        coordinator,
        rank,
        secret: args.secret()?,
        model: args.model,
        device: device::parse_device(&device_spec)?,
        threads: args.threads,
        peer_name: args.peer_name.unwrap_or_else(|| args.peer_host.clone()),
        peer_host: args.peer_host,
        gloo_interface: args.gloo_interface.filter(|i| !i.is_empty()),
        connect_timeout: Duration::from_secs(args.connect_timeout_s),
        tls: args.connect.tls()?,
    };
    runtime()?.block_on(worker::run(opts))?;
    Ok(())
}

pub(crate) fn run_launch(args: LaunchArgs) -> anyhow::Result<()> {
    runtime()?.block_on(launch(LaunchOptions {
        sets: args.config.overrides(),
        config: args.config.config,
        workers: args.workers,
        progress: args.progress.show(),
    }))?;
    Ok(())
}
