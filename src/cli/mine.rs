//! `multipos mine`.
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::RuntimeArgs;
use crate::data::{Columns, LoadOptions, Names, load_files};
use crate::device;
use crate::embed::read_inputs;
use crate::io::output::{Kind, Output};
use crate::mine::{Corpus, MineOptions, MineReport, Sampling, cache, mine, write_groups};
use crate::model::SentenceModel;

#[derive(clap::Args, Debug)]
pub struct MineArgs {
    /// Sentence-transformers model directory [default: all-MiniLM-L6-v2 installed by deploy/setup.sh].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: query-grouped or pair files (.jsonl, .csv, .tsv), tables (.parquet, .arrow)
    /// or folders of them; duplicate queries merge.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// A table column's role, as `data.columns` names it: query=NAME, positives=NAME,
    /// negatives=NAME (repeatable), cluster=NAME [default: sentence-transformers' column order].
    #[arg(long = "column", value_name = "ROLE=NAME", value_parser = parse_column)]
    pub columns: Vec<(String, String)>,
    /// Where to write the query-grouped JSONL with "negatives" (atomically).
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing --output file.
    #[arg(long)]
    pub overwrite: bool,
    /// Texts to mine from (.txt, one per line, or .jsonl with "text"); every positive joins them.
    /// Default: the positives of the data.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Skip the first N qualifying candidates.
    #[arg(long, default_value_t = 0)]
    pub range_min: usize,
    /// Consider at most N qualifying candidates [default: as sentence-transformers derives it].
    #[arg(long)]
    pub range_max: Option<usize>,
    /// Drop candidates scoring above this.
    #[arg(long)]
    pub max_score: Option<f32>,
    /// Drop candidates scoring below this.
    #[arg(long)]
    pub min_score: Option<f32>,
    /// Drop candidates whose score + margin exceeds the query's weakest positive score.
    #[arg(long)]
    pub absolute_margin: Option<f32>,
    /// Drop candidates scoring above weakest positive − |weakest positive| · margin.
    #[arg(long)]
    pub relative_margin: Option<f32>,
    /// Negatives per query.
    #[arg(long, default_value_t = 3)]
    pub num_negatives: usize,
    /// Take the best qualifying candidates, or draw them at random (seeded).
    #[arg(long, value_enum, default_value_t = Sampling::Top)]
    pub sampling_strategy: Sampling,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also cluster the queries into K topics (spherical k-means of their embeddings, seeded) and
    /// write each group's "cluster", for training with data.batching = "by_cluster".
    #[arg(long, value_name = "K")]
    pub clusters: Option<usize>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Token cap per text [default: the model's].
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// Directory for cached corpus embeddings [default: $MULTIPOS_CACHE/embeddings].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Embed the corpus afresh and cache nothing.
    #[arg(long)]
    pub no_cache: bool,
    /// Skip malformed records of the data (each is still reported).
    #[arg(long)]
    pub skip_invalid: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn parse_column(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((role, name)) if ["query", "positives", "negatives", "cluster"].contains(&role) => {
            Ok((role.to_string(), name.to_string()))
        }
        Some((role, _)) => Err(format!(
            "unknown role {role:?}: query, positives, negatives or cluster"
        )),
        None => Err("expected ROLE=NAME, e.g. query=question".into()),
    }
}

/// The `--column` flags as `data.columns`, checked as the config checks it.
fn columns(flags: &[(String, String)]) -> anyhow::Result<Option<Columns>> {
    if flags.is_empty() {
        return Ok(None);
    }
    let mut c = Columns::default();
    let mut negatives = Vec::new();
    for (role, name) in flags {
        let slot = match role.as_str() {
            "query" => &mut c.query,
            "positives" => &mut c.positives,
            "cluster" => &mut c.cluster,
            _ => {
                negatives.push(name.clone());
                continue;
            }
        };
        if slot.replace(name.clone()).is_some() {
            anyhow::bail!("--column {role}= is given twice");
        }
    }
    if !negatives.is_empty() {
        c.negatives = Some(Names::Many(negatives));
    }
    c.validate().map_err(|e| anyhow::anyhow!("--column: {e}"))?;
    Ok(Some(c))
}

pub fn run(args: MineArgs) -> anyhow::Result<()> {
    let inputs: Vec<&Path> = args
        .data
        .iter()
        .chain(&args.corpus)
        .map(PathBuf::as_path)
        .collect();
    Output {
        flag: "--output",
        path: &args.output,
        kind: Kind::File,
        overwrite: args.overwrite,
    }
    .check(&inputs)?;
    let opts = options(&args);
    opts.validate().map_err(anyhow::Error::msg)?;
    device::set_threads(args.runtime.threads)?;
    let device = device::parse_device(&args.runtime.device)?;
    let model_dir = args.model.clone().unwrap_or_else(crate::model::default_dir);
    let mut model = SentenceModel::load(&model_dir, device)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    if let Some(n) = args.max_seq_length {
        model.set_max_seq_length(n)?;
    }
    let columns = columns(&args.columns)?;
    let data = load_files(
        &args.data,
        LoadOptions {
            skip_invalid: args.skip_invalid,
            columns: columns.as_ref(),
        },
    )?;
    tracing::info!("data: {}", data.stats());
    let extra: Vec<String> = match &args.corpus {
        Some(p) => read_inputs(p)?.into_iter().map(|t| t.text).collect(),
        None => Vec::new(),
    };
    let corpus = Corpus::new(&data, &extra);
    let cache_dir =
        (!args.no_cache).then(|| args.cache_dir.clone().unwrap_or_else(cache::default_dir));
    let key = cache::model_key(&model_dir, model.max_seq_length())?;
    let start = std::time::Instant::now();
    let show = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (mined, report) = mine(
        &model,
        key,
        &data,
        &corpus,
        &opts,
        cache_dir.as_deref(),
        show,
    )?;
    write_groups(&args.output, &data, &mined)?;
    tracing::info!(
        queries = report.queries,
        negatives = report.negatives_mined,
        short = report.queries_short,
        without = report.queries_without,
        seconds = format!("{:.1}", start.elapsed().as_secs_f64()),
        output = %args.output.display(),
        "mined"
    );
    warn_short(&report, opts.num_negatives);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The mining options the flags ask for.
fn options(args: &MineArgs) -> MineOptions {
    MineOptions {
        range_min: args.range_min,
        range_max: args.range_max,
        max_score: args.max_score,
        min_score: args.min_score,
        absolute_margin: args.absolute_margin,
        relative_margin: args.relative_margin,
        num_negatives: args.num_negatives,
        sampling_strategy: args.sampling_strategy,
        seed: args.seed,
        batch_size: args.batch_size as usize,
        clusters: args.clusters,
        corpus: None,
    }
}

/// Says how many queries found fewer negatives than asked: they are kept with what they found.
fn warn_short(report: &MineReport, wanted: usize) {
    if report.queries_short > 0 {
        tracing::warn!(
            "{} of {} queries found fewer than {} qualifying negatives ({} found none); they are written with what they found",
            report.queries_short,
            report.queries,
            wanted,
            report.queries_without
        );
    }
}
