//! `multipos convert`: rewrite a model directory in multipos' canonical sentence-transformers layout.
use std::path::PathBuf;

use anyhow::Context;
use tch::Device;

use crate::io::output::{Kind, Output};
use crate::model::SentenceModel;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Source model directory (sentence-transformers, or a plain BERT checkpoint with tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write the converted directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing `--output` directory (atomically; it is kept if converting fails).
    #[arg(long)]
    pub overwrite: bool,
}

/// Loads and re-saves: F16/BF16 weights become F32, a `bert.` prefix is dropped, the metadata files
/// are written in the legacy spelling that sentence-transformers 5.x and 6.x both load.
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    Output {
        flag: "--output",
        path: &args.output,
        kind: Kind::Dir,
        overwrite: args.overwrite,
    }
    .check(&[&args.model])?;
    let model = SentenceModel::load(&args.model, Device::Cpu)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    model.save(&args.output)?;
    tracing::info!(output = %args.output.display(), "converted");
    Ok(())
}
