//! `multipos train`.
use super::{ConfigArgs, ProgressArgs};
use crate::config::RunConfig;
use crate::train;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config.config, &args.config.overrides())?;
    let summary = match train::run(&cfg, args.progress.show()) {
        Ok(s) => s,
        // A stop the user asked for (stop_after_steps) is a success: the checkpoint is written.
        Err(e @ crate::Error::Stopped { .. }) => {
            println!("{e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "trained {} steps ({} pairs) in {:.1} s = {:.1} pairs/s; final loss {:.4}; model: {}",
        summary.steps,
        summary.pairs,
        summary.seconds,
        summary.pairs_per_s,
        summary.final_loss,
        summary.model_dir.display()
    );
    if let (Some(before), Some(after)) = (&summary.eval_before, &summary.eval_after) {
        println!(
            "{:<14} {:>8} {:>8} {:>8}",
            "metric", "before", "after", "change"
        );
        for key in ["ndcg@10", "mrr@10", "map@100", "recall@10", "accuracy@1"] {
            let (b, a) = (before[key], after[key]);
            println!("{key:<14} {b:>8.4} {a:>8.4} {:>+8.4}", a - b);
        }
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
