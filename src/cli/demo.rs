//! `multipos demo`: the quick start's end-to-end check on bundled public-domain data.
use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

use super::RuntimeArgs;
use crate::device;
use crate::model::{SentenceModel, pooling::cosine_matrix};

const SAMPLE: &str = include_str!("../../deploy/data/bible_paraphrase_tiny/test.jsonl");
const GROUPS: usize = 8;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Sentence-transformers model directory [default: all-MiniLM-L6-v2 installed by deploy/setup.sh].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Deserialize)]
struct Group {
    query: String,
    positives: Vec<String>,
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    device::set_threads(args.runtime.threads)?;
    let device = device::parse_device(&args.runtime.device)?;
    let model_dir = args.model.unwrap_or_else(crate::model::default_dir);
    let model = SentenceModel::load(&model_dir, device)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let groups: Vec<Group> = SAMPLE
        .lines()
        .take(GROUPS)
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("bundled sample is malformed")?;
    let queries: Vec<&str> = groups.iter().map(|g| g.query.as_str()).collect();
    let docs: Vec<&str> = groups.iter().map(|g| g.positives[0].as_str()).collect();
    let sims = cosine_matrix(&model.embed(&queries, 32)?, &model.embed(&docs, 32)?);
    let sims: Vec<Vec<f32>> = Vec::try_from(&sims)?;

    println!("model: {} on {:?}", model_dir.display(), model.device());
    println!("query (World English Bible) -> best match among {GROUPS} King James verses\n");
    let mut correct = 0;
    for (i, row) in sims.iter().enumerate() {
        let (best, score) = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("non-empty row");
        correct += usize::from(best == i);
        let mark = if best == i { "ok  " } else { "MISS" };
        println!("{mark} {score:.3}  {}", clip(queries[i], 60));
        println!("            -> {}", clip(docs[best], 60));
    }
    let diag: f32 = (0..sims.len()).map(|i| sims[i][i]).sum::<f32>() / sims.len() as f32;
    let off: f32 = sims
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.iter()
                .enumerate()
                .filter(move |(j, _)| *j != i)
                .map(|(_, s)| *s)
        })
        .sum::<f32>()
        / (sims.len() * (sims.len() - 1)) as f32;
    println!(
        "\nmatched {correct}/{GROUPS}; mean cosine: paraphrase pairs {diag:.3}, other pairs {off:.3}"
    );
    Ok(())
}
