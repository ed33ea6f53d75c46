//! `multipos convert`: rewrite a model directory in multipos' canonical sentence-transformers layout.
use std::path::PathBuf;

use anyhow::Context;
use tch::Device;

use crate::model::SentenceModel;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Source model directory (sentence-transformers, or a plain BERT checkpoint with tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write the converted directory (replaced atomically if it exists).
    #[arg(long)]
    pub output: PathBuf,
}

/// Loads and re-saves: F16/BF16 weights become F32, a `bert.` prefix is dropped, the metadata files
/// are written in the legacy spelling that sentence-transformers 5.x and 6.x both load.
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let model = SentenceModel::load(&args.model, Device::Cpu)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    model.save(&args.output)?;
    tracing::info!(output = %args.output.display(), "converted");
    Ok(())
}
