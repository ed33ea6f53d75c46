//! `multipos embed`.
use std::path::PathBuf;

use anyhow::Context;

use super::RuntimeArgs;
use crate::device;
use crate::embed::{embed_to_file, read_inputs};
use crate::io::output::{Kind, Output};
use crate::model::{Role, SentenceModel};

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
    /// What the texts are, for the model's prompts (as sentence-transformers' encode_query,
    /// encode_document, encode): query, document, or text (the model's default prompt, if any).
    #[arg(long = "as", value_enum, default_value_t = TextRole::Text)]
    pub role: TextRole,
    /// A prompt to put in front of every text instead of the model's.
    #[arg(long, conflicts_with = "role")]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `--as`: what the texts are.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextRole {
    Query,
    Document,
    Text,
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
    let role = match args.role {
        TextRole::Query => Role::Query,
        TextRole::Document => Role::Document,
        TextRole::Text => Role::Plain,
    };
    let prompt = args.prompt.as_deref().or(model.prompt(role));
    if let Some(p) = prompt {
        tracing::info!(prompt = p, "each text gets the prompt in front");
    }
    let start = std::time::Instant::now();
    embed_to_file(
        &model,
        &inputs,
        prompt,
        &args.output,
        args.batch_size as usize,
    )?;
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
