//! The command line: argument definitions (clap derive, doc comments are the help) and dispatch.
mod average;
mod certs;
mod cluster;
mod convert;
mod credential;
mod demo;
mod embed;
mod eval;
mod interrupt;
mod mine;
mod plot;
mod status;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::{LOG_FORMAT_ENV, LogFormat};
use crate::progress::{Display, Show};

/// Fine-tune sentence-embedding models on multi-positive data, on one CPU, one GPU or a cluster.
#[derive(Parser, Debug)]
#[command(name = "multipos", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text (colours on a terminal only) or as one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "text", env = LOG_FORMAT_ENV)]
    pub log_format: LogFormat,
}

/// The run configuration and its overrides, shared by `train`, `launch` and `coordinator`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Run configuration (TOML); see configs/ for examples.
    #[arg(long)]
    pub config: PathBuf,
    /// Override one setting, e.g. --set train.lr=3e-5 --set data.mode='"all"' (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue from the newest valid checkpoint in output.dir/checkpoints (a cluster may resume
    /// on another number of workers: the same global batches are re-split).
    #[arg(long)]
    pub resume: bool,
}

impl ConfigArgs {
    /// The overrides, with `--resume` as `train.resume = "latest"`.
    pub(crate) fn overrides(&self) -> Vec<String> {
        let mut sets = self.sets.clone();
        if self.resume {
            sets.push("train.resume=\"latest\"".into());
        }
        sets
    }
}

/// How a long command shows its progress.
#[derive(clap::Args, Debug, Clone)]
pub struct ProgressArgs {
    /// auto (a bar on a terminal, lines otherwise), bar, lines or off.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: Display,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_every_s: u64,
}

impl ProgressArgs {
    /// As the library takes it.
    pub(crate) fn show(&self) -> Show {
        Show {
            display: self.progress,
            every: std::time::Duration::from_secs(self.progress_every_s),
        }
    }
}

/// Options shared by every command that runs a model.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Where to run: auto (a GPU when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "MULTIPOS_DEVICE")]
    pub device: String,
    /// CPU threads for libtorch (0 = one per core).
    #[arg(long, default_value_t = 0, env = "MULTIPOS_THREADS")]
    pub threads: usize,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune a model in one process from a TOML run configuration.
    Train(train::TrainArgs),
    /// Run a local cluster (coordinator + N worker processes) from one config file.
    Launch(cluster::LaunchArgs),
    /// Serve a cluster run: plan global batches, hand out shards, collect commits, save the model.
    Coordinator(cluster::CoordinatorArgs),
    /// Join a cluster run and train on its shards (one process per GPU or CPU share).
    Worker(cluster::WorkerArgs),
    /// Retrieval metrics (NDCG, MRR, MAP, recall, precision, accuracy @k) of a model on BEIR-style data.
    Eval(eval::EvalArgs),
    /// Average models fine-tuned from one base (uniform, weighted, or a greedy soup on a dev set).
    Average(average::AverageArgs),
    /// Mine hard negatives for query-grouped data: the nearest corpus texts that are not a positive.
    Mine(mine::MineArgs),
    /// Embed texts from a .txt (one per line) or .jsonl ("text" field) file into JSON lines.
    Embed(embed::EmbedArgs),
    /// Embed a bundled sample of Bible verses and their paraphrases and print their similarities.
    Demo(demo::DemoArgs),
    /// Rewrite a model directory in the canonical sentence-transformers layout (F32 safetensors).
    Convert(convert::ConvertArgs),
    /// Draw runs' loss, learning rate, throughput, step time and validation metrics (PNG + SVG).
    Plot(plot::PlotArgs),
    /// How a running cluster goes: members, generation, step, loss, rates (`--json` for tools).
    Status(status::StatusArgs),
    /// Make a private CA and per-host certificates for `cluster.tls`.
    Certs(certs::CertsArgs),
    /// Print workers' own credentials (derived from the cluster token), so worker hosts need not
    /// hold the token itself.
    Credential(credential::CredentialArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // train, launch, coordinator and worker stop at a step boundary with a checkpoint instead.
    if !matches!(
        cli.command,
        Command::Train(_) | Command::Launch(_) | Command::Coordinator(_) | Command::Worker(_)
    ) {
        interrupt::exit_on_signal()?;
    }
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Launch(args) => cluster::run_launch(args),
        Command::Certs(args) => certs::run(args),
        Command::Credential(args) => credential::run(args),
        Command::Status(args) => status::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Coordinator(args) => cluster::run_coordinator(args),
        Command::Worker(args) => cluster::run_worker(args),
        Command::Embed(args) => embed::run(args),
        Command::Mine(args) => mine::run(args),
        Command::Average(args) => average::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Convert(args) => convert::run(args),
    }
}
