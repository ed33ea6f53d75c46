//! From a validated config to the run's components: output directory, tasks, plan, model,
//! step options, schedule and trainer. The same builders serve `multipos train`, the coordinator,
//! every cluster worker and the benchmarks.
use std::fs;
use std::path::PathBuf;

use serde_json::json;

use super::metrics::MetricsLog;
use super::optim::{AdamWConfig, LinearSchedule};
use super::plan::RunPlan;
use super::state::TrainState;
use super::step::StepOptions;
use super::task::{Task, TaskSpec, data_fingerprint, load_tasks};
use super::trainer::Trainer;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::io::atomic;
use crate::model::SentenceModel;
use crate::model::masks::MaskGenerator;

/// Rows per forward pass when `train.micro_batch` is unset: small on the CPU, where padding costs
/// most; larger on a GPU, where each pass is a train of kernel launches.
fn default_micro_batch(device: tch::Device) -> usize {
    if device == tch::Device::Cpu { 8 } else { 64 }
}

/// Step options a config describes, for a model on `device`. New runs draw dropout masks with the
/// current generator; a resumed run sets the one its checkpoint recorded.
pub(crate) fn step_options(cfg: &RunConfig, device: tch::Device) -> StepOptions {
    StepOptions {
        dropout: cfg.train.dropout,
        seed: cfg.train.seed,
        max_grad_norm: cfg.train.max_grad_norm,
        micro_batch: cfg
            .train
            .micro_batch
            .unwrap_or_else(|| default_micro_batch(device)),
        mini_batch_size: cfg.train.mini_batch_size,
        masks: MaskGenerator::CURRENT,
        wire: cfg.cluster.grad_dtype,
        bucket_bytes: cfg.cluster.bucket_mib << 20,
    }
}

/// The learning-rate schedule of a run of `total` steps; a warmup longer than the run is refused.
pub(crate) fn schedule_for(cfg: &RunConfig, total: u64) -> Result<LinearSchedule> {
    let warmup = cfg.warmup_steps(total);
    if warmup > total {
        return Err(Error::Usage(format!(
            "warmup of {warmup} steps exceeds the run's {total} steps"
        )));
    }
    Ok(LinearSchedule {
        peak: cfg.train.lr,
        warmup,
        total,
    })
}

/// A trainer for `model` and `tasks` as the config describes (loss heads, optimizer, schedule,
/// step options), for a run of `total` steps: the same in one process and on every worker.
pub fn trainer_for(
    cfg: &RunConfig,
    model: SentenceModel,
    tasks: &[TaskSpec],
    total: u64,
) -> Result<Trainer> {
    let adamw = AdamWConfig {
        weight_decay: cfg.train.weight_decay,
        ..Default::default()
    };
    let device = model.device();
    let mut state = TrainState::new(model, tasks, cfg.train.seed)?;
    if let Some(decay) = cfg.train.ema_decay {
        state.start_ema(decay);
    }
    Ok(Trainer::new(
        state,
        adamw,
        schedule_for(cfg, total)?,
        step_options(cfg, device),
    ))
}

/// The plan of the run a config describes.
pub fn plan_for(cfg: &RunConfig, tasks: &[Task]) -> Result<RunPlan> {
    RunPlan::new(
        tasks,
        cfg.train.batch_size,
        cfg.train.seed,
        cfg.train.sampler,
        cfg.train.epochs,
        cfg.train.max_steps,
    )
}

/// Creates the run directory and records the resolved configuration in it; returns that TOML. A
/// `cluster.token` is left out: the file and the copies workers receive carry no secret.
/// An output directory this run created, removed again unless the run gets as far as
/// [`FreshOutput::keep`]: a run refused at start-up leaves nothing behind (docs/design.md §13).
pub(crate) struct FreshOutput(Option<PathBuf>);

impl FreshOutput {
    /// Watches `cfg.output.dir` if it does not exist yet.
    pub(crate) fn watch(cfg: &RunConfig) -> Self {
        let dir = &cfg.output.dir;
        Self((!dir.exists()).then(|| dir.clone()))
    }

    /// The run started: the directory is its output now.
    pub(crate) fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for FreshOutput {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

pub(crate) fn prepare_output(cfg: &RunConfig) -> Result<String> {
    let out_dir = &cfg.output.dir;
    let earlier = [out_dir.join("model"), out_dir.join("checkpoints")]
        .into_iter()
        .find(|p| p.exists());
    if let Some(earlier) = earlier
        && cfg.train.resume.is_none()
        && !cfg.output.overwrite
    {
        return Err(Error::Usage(format!(
            "output.dir {} holds an earlier run ({} exists): continue it with --resume, replace it \
             with --set output.overwrite=true, or choose another output.dir",
            out_dir.display(),
            earlier.display()
        )));
    }
    // A fresh run over an earlier one: its checkpoints would be taken for this run's on --resume.
    let stale = out_dir.join("checkpoints");
    if cfg.train.resume.is_none() && stale.exists() {
        fs::remove_dir_all(&stale).map_err(Error::io("remove the earlier run's", &stale))?;
    }
    fs::create_dir_all(out_dir).map_err(Error::io("create directory", out_dir))?;
    let text = toml::to_string_pretty(&cfg.without_token())
        .map_err(|e| Error::Usage(format!("cannot serialise the config: {e}")))?;
    atomic::write_file(&out_dir.join("config.toml"), text.as_bytes())?;
    Ok(text)
}

/// Loads the tasks a config names and records what loading did in `log`: the tasks as loaded
/// (what re-mining starts from; kept only when the run re-mines) and as trained on (with mined
/// negatives under `train.mine`).
pub(crate) fn load_training_data(
    cfg: &RunConfig,
    log: &mut MetricsLog,
) -> Result<(Option<Vec<Task>>, Vec<Task>)> {
    let mut tasks = load_tasks(&cfg.tasks())?;
    let source = cfg.train.remine_every_epochs.map(|_| tasks.clone());
    super::mining::apply(cfg, &mut tasks, log)?;
    for event in data_events(&tasks) {
        log.write(&event)?;
    }
    Ok((source, tasks))
}

/// The `data` events of the tasks a run trains on: each task, then their joint fingerprint.
pub(crate) fn data_events(tasks: &[Task]) -> Vec<serde_json::Value> {
    tasks
        .iter()
        .map(|t| json!({"event": "data", "task": t.name, "description": t.describe(), "size": t.size(), "fingerprint": format!("{:016x}", t.fingerprint())}))
        .chain(std::iter::once(json!({"event": "data", "fingerprint": data_fingerprint(tasks)})))
        .collect()
}
