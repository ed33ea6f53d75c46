//! `multipos eval`.
use std::path::PathBuf;

use anyhow::Context;

use super::RuntimeArgs;
use crate::device;
use crate::eval::{IrConfig, IrDataset, evaluate};
use crate::model::SentenceModel;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Sentence-transformers model directory [default: all-MiniLM-L6-v2 installed by deploy/setup.sh].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Queries, one {"id", "text"} per line.
    #[arg(long)]
    pub queries: PathBuf,
    /// Documents, one {"id", "text"} per line.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Relevance judgements: query-id<TAB>corpus-id<TAB>score (score > 0 = relevant).
    #[arg(long)]
    pub qrels: PathBuf,
    /// Truncate texts to this many tokens (default: the model's max_seq_length).
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Prints the metrics, then (last line of stdout) all of them as one JSON object.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    device::set_threads(args.runtime.threads)?;
    let device = device::parse_device(&args.runtime.device)?;
    let set = IrDataset::load(&args.queries, &args.corpus, &args.qrels)?;
    let model_dir = args.model.unwrap_or_else(crate::model::default_dir);
    let mut model = SentenceModel::load(&model_dir, device)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    if let Some(n) = args.max_seq_length {
        model.set_max_seq_length(n)?;
    }
    let start = std::time::Instant::now();
    let metrics = evaluate(&model, &set, args.batch_size.max(1), &IrConfig::default())?;
    println!(
        "{} queries, {} documents, {:.1} s ({})",
        set.queries.len(),
        set.corpus.len(),
        start.elapsed().as_secs_f64(),
        model_dir.display()
    );
    for (name, value) in &metrics {
        println!("{name:<14} {value:.4}");
    }
    println!("{}", serde_json::to_string(&metrics)?);
    Ok(())
}
