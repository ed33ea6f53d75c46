//! `multipos average`.
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::RuntimeArgs;
use crate::device;
use crate::eval::{IrConfig, IrDataset, evaluate};
use crate::fusion::{average, greedy_soup, normalize_weights};
use crate::io::output::{Kind, Output};
use crate::model::SentenceModel;
use crate::train::card::write_average_card;

#[derive(clap::Args, Debug)]
pub struct AverageArgs {
    /// Model directories fine-tuned from the same base (same architecture, shapes and tokenizer).
    #[arg(long, required = true, num_args = 2..)]
    pub models: Vec<PathBuf>,
    /// Where to write the averaged model directory.
    #[arg(long)]
    pub output: PathBuf,
    /// One positive weight per model (normalised to sum 1) [default: uniform].
    #[arg(long, num_args = 1.., conflicts_with = "greedy")]
    pub weights: Option<Vec<f64>>,
    /// Greedy soup: rank the models by the dev metric, then add each while the average improves.
    #[arg(long, requires_all = ["queries", "corpus", "qrels"])]
    pub greedy: bool,
    /// Dev queries for --greedy (.jsonl with "id" and "text").
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// Dev corpus for --greedy (.jsonl with "id" and "text").
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Dev relevance judgements for --greedy (BEIR-style TSV).
    #[arg(long)]
    pub qrels: Option<PathBuf>,
    /// The metric --greedy maximises.
    #[arg(long, default_value = "ndcg@10")]
    pub metric: String,
    /// Texts per forward pass when evaluating.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: AverageArgs) -> anyhow::Result<()> {
    let inputs: Vec<&Path> = args
        .models
        .iter()
        .chain(&args.queries)
        .chain(&args.corpus)
        .chain(&args.qrels)
        .map(PathBuf::as_path)
        .collect();
    Output {
        flag: "--output",
        path: &args.output,
        kind: Kind::Dir,
        overwrite: args.overwrite,
    }
    .check(&inputs)?;
    if !args.greedy {
        let weights = normalize_weights(args.models.len(), args.weights.as_deref())?;
        average(&args.models, &weights, &args.output)?;
        let parts: Vec<(PathBuf, f64)> = args
            .models
            .iter()
            .cloned()
            .zip(weights.iter().copied())
            .collect();
        write_average_card(
            &args.output,
            &parts,
            None,
            &std::env::args().collect::<Vec<_>>(),
        )?;
        tracing::info!(models = args.models.len(), ?weights, output = %args.output.display(), "averaged");
        return Ok(());
    }
    device::set_threads(args.runtime.threads)?;
    let device = device::parse_device(&args.runtime.device)?;
    let (q, c, r) = (
        args.queries.as_ref(),
        args.corpus.as_ref(),
        args.qrels.as_ref(),
    );
    let set = IrDataset::load(
        q.expect("clap requires it"),
        c.expect("clap requires it"),
        r.expect("clap requires it"),
    )?;
    let metric = args.metric.clone();
    let score = |dir: &std::path::Path| -> crate::error::Result<f64> {
        let model = SentenceModel::load(dir, device)?;
        let m = evaluate(&model, &set, args.batch_size as usize, &IrConfig::default())?;
        m.get(&metric).copied().ok_or_else(|| {
            crate::error::Error::Usage(format!(
                "unknown metric {metric:?}; known: {}",
                m.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    };
    let (soup, best) = greedy_soup(&args.models, &args.output, score).context("greedy soup")?;
    let weight = 1.0 / soup.len() as f64;
    let parts: Vec<(PathBuf, f64)> = soup.iter().map(|p| (p.clone(), weight)).collect();
    let command: Vec<String> = std::env::args().collect();
    write_average_card(&args.output, &parts, Some((&args.metric, best)), &command)?;
    println!(
        "{}",
        serde_json::json!({"soup": soup, "metric": args.metric, "score": best})
    );
    Ok(())
}
