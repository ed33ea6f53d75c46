//! `multipos embed`.
use std::path::PathBuf;

use anyhow::Context;

use super::RuntimeArgs;
use crate::device;
use crate::embed::{embed_to_file, read_inputs};
use crate::io::output::{Kind, Output};
use crate::model::SentenceModel;

#[derive(clap::Args, Debug)]
pub struct EmbedArgs {
    /// Sentence-transformers model directory [default: all-MiniLM-L6-v2 installed by deploy/setup.sh].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Texts to embed: .txt, one per line, or .jsonl with a "text" (and optional "id") per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write one {"text", "embedding"} JSON line per input, in input order.
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing --output file.
    #[arg(long)]
    pub overwrite: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    device::set_threads(args.runtime.threads)?;
    let device = device::parse_device(&args.runtime.device)?;
    let model_dir = args.model.unwrap_or_else(crate::model::default_dir);
    Output {
        flag: "--output",
        path: &args.output,
        kind: Kind::File,
        overwrite: args.overwrite,
    }
    .check(&[&args.input])?;
    let inputs = read_inputs(&args.input)?;
    let model = SentenceModel::load(&model_dir, device)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let start = std::time::Instant::now();
    embed_to_file(&model, &inputs, &args.output, args.batch_size as usize)?;
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        texts = inputs.len(),
        seconds = format!("{secs:.2}"),
        texts_per_s = format!("{:.1}", inputs.len() as f64 / secs),
        output = %args.output.display(),
        "embedded"
    );
    Ok(())
}
