//! `multipos plot`: draw runs' metrics to PNG and SVG.
use std::path::PathBuf;

use crate::plot::{RunCurves, plot};

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Run directory (its `metrics.jsonl`).
    #[arg(long)]
    pub run: PathBuf,
    /// More runs drawn beside it (repeatable).
    #[arg(long)]
    pub compare: Vec<PathBuf>,
    /// Where `training.png` and `training.svg` go [default: RUN/plots].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let runs = std::iter::once(&args.run)
        .chain(&args.compare)
        .map(|dir| RunCurves::read(dir))
        .collect::<Result<Vec<_>, _>>()?;
    let out = args.out.unwrap_or_else(|| args.run.join("plots"));
    for path in plot(&runs, &out)? {
        println!("{}", path.display());
    }
    Ok(())
}
