//! The single-process training run: config in, trained model directory and metrics out.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::checkpoint::{self, CheckpointState};
use super::optim::{AdamWConfig, LinearSchedule};
use super::trainer::{StepOptions, Trainer};
use crate::config::RunConfig;
use crate::data::{
    Dataset, EpochPlan, LoadOptions, Mode, PlanSpec, load_files, plan_epoch, planner,
};
use crate::device;
use crate::error::{Error, Result};
use crate::eval::{IrConfig, IrDataset, evaluate};
use crate::io::atomic;
use crate::loss::MnrlConfig;
use crate::model::SentenceModel;

/// Machine-readable metrics, one JSON object per line, flushed as they come.
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Creates (truncates) the log.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(Error::io("create", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Opens the log for appending (a resumed run continues its predecessor's log).
    pub fn append(path: &Path) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(Error::io("open", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Drops the records `drop` selects, rewriting the file atomically (a run that rolls back to a
    /// checkpoint removes the steps it will run again, so every step stays logged once).
    pub fn remove(&mut self, drop: impl Fn(&serde_json::Value) -> bool) -> Result<usize> {
        self.out.flush().map_err(Error::io("write", &self.path))?;
        let text = fs::read_to_string(&self.path).map_err(Error::io("read", &self.path))?;
        let mut kept = String::with_capacity(text.len());
        let mut removed = 0;
        for line in text.lines() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) if drop(&v) => removed += 1,
                _ => {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        if removed > 0 {
            crate::io::atomic::write_file(&self.path, kept.as_bytes())?;
            *self = Self::append(&self.path)?;
        }
        Ok(removed)
    }

    /// Everything logged so far.
    pub fn contents(&mut self) -> Result<Vec<u8>> {
        self.out.flush().map_err(Error::io("write", &self.path))?;
        fs::read(&self.path).map_err(Error::io("read", &self.path))
    }

    /// Appends one record.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)
            .map_err(|e| Error::io("write", &self.path)(e.into()))?;
        self.out
            .write_all(b"\n")
            .and_then(|_| self.out.flush())
            .map_err(Error::io("write", &self.path))
    }
}

/// What a run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub pairs: u64,
    pub seconds: f64,
    pub pairs_per_s: f64,
    pub final_loss: f64,
    pub eval_before: Option<BTreeMap<String, f64>>,
    pub eval_after: Option<BTreeMap<String, f64>>,
    pub model_dir: PathBuf,
}

/// The plan for a whole run: epochs planned lazily, total steps known up front.
pub struct RunPlan {
    spec: PlanSpec,
    epochs: Vec<EpochPlan>,
    pub total_steps: u64,
}

impl RunPlan {
    /// Plans enough epochs to know the exact step count (`max_steps` wins over `epochs`).
    pub fn new(data: &Dataset, spec: PlanSpec, epochs: u64, max_steps: u64) -> Result<Self> {
        planner::validate(data, &spec).map_err(Error::Usage)?;
        let mut plan = RunPlan {
            spec,
            epochs: Vec::new(),
            total_steps: 0,
        };
        let want_epochs = if max_steps > 0 { u64::MAX } else { epochs };
        let mut total = 0u64;
        while (plan.epochs.len() as u64) < want_epochs && (max_steps == 0 || total < max_steps) {
            let e = plan_epoch(data, &spec, plan.epochs.len() as u64);
            if e.num_batches() == 0 {
                return Err(Error::Usage(format!(
                    "epoch {} has no whole conflict-free batch of {} rows ({} rows left over): lower batch_size",
                    plan.epochs.len(),
                    spec.batch_size,
                    e.leftovers.len()
                )));
            }
            if !e.leftovers.is_empty() {
                tracing::info!(
                    epoch = e.epoch,
                    leftovers = e.leftovers.len(),
                    deferred = e.deferred,
                    "rows that fit no whole conflict-free batch this epoch"
                );
            }
            total += e.num_batches() as u64;
            plan.epochs.push(e);
        }
        plan.total_steps = if max_steps > 0 { max_steps } else { total };
        Ok(plan)
    }

    /// (epoch, batch index) of global step `step` (0-based).
    pub fn locate(&self, step: u64) -> (usize, usize) {
        let mut left = step as usize;
        for (e, plan) in self.epochs.iter().enumerate() {
            if left < plan.num_batches() {
                return (e, left);
            }
            left -= plan.num_batches();
        }
        unreachable!("step {step} beyond the planned {} steps", self.total_steps)
    }

    /// The data cursor after `step` steps: (epoch, batch index in it) of the next global batch,
    /// (epochs, 0) once every planned batch ran.
    pub fn cursor(&self, step: u64) -> (u64, u64) {
        let mut left = step as usize;
        for (e, plan) in self.epochs.iter().enumerate() {
            if left < plan.num_batches() {
                return (e as u64, left as u64);
            }
            left -= plan.num_batches();
        }
        (self.epochs.len() as u64, 0)
    }

    /// The epoch plans.
    pub fn epoch(&self, e: usize) -> &EpochPlan {
        &self.epochs[e]
    }

    /// What was planned.
    pub fn spec(&self) -> &PlanSpec {
        &self.spec
    }
}

/// Builds the plan spec a config describes.
pub fn plan_spec(cfg: &RunConfig) -> PlanSpec {
    PlanSpec {
        batch_size: cfg.train.batch_size,
        mode: cfg.data.mode,
        negatives_per_row: cfg.data.negatives_per_row,
        seed: cfg.train.seed,
    }
}

/// Step options a config describes.
pub fn step_options(cfg: &RunConfig) -> StepOptions {
    StepOptions {
        loss: MnrlConfig {
            scale: cfg.train.scale,
            symmetric: cfg.train.symmetric,
        },
        multi_positive: cfg.data.mode == Mode::All,
        dropout: cfg.train.dropout,
        seed: cfg.train.seed,
        max_grad_norm: cfg.train.max_grad_norm,
        micro_batch: cfg.train.micro_batch,
    }
}

/// The learning-rate schedule of a run of `total` steps; a warmup longer than the run is refused.
pub fn schedule_for(cfg: &RunConfig, total: u64) -> Result<LinearSchedule> {
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

/// A trainer for `model` as the config describes (optimizer, schedule, step options), for a run
/// of `total` steps: the same in one process and on every cluster worker.
pub fn trainer_for(cfg: &RunConfig, model: SentenceModel, total: u64) -> Result<Trainer> {
    let adamw = AdamWConfig {
        weight_decay: cfg.train.weight_decay,
        ..Default::default()
    };
    Ok(Trainer::new(
        model,
        adamw,
        schedule_for(cfg, total)?,
        step_options(cfg),
    ))
}

/// Loads the model a config names onto its device.
pub fn load_model(cfg: &RunConfig) -> Result<SentenceModel> {
    device::set_threads(cfg.model.threads);
    let dev = device::parse_device(cfg.model.device.as_deref().unwrap_or("auto"))?;
    let dir = cfg
        .model
        .path
        .clone()
        .unwrap_or_else(crate::cli::default_model_dir);
    let mut model = SentenceModel::load(&dir, dev)?;
    if let Some(n) = cfg.model.max_seq_length {
        model.set_max_seq_length(n)?;
    }
    Ok(model)
}

fn progress(total: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
        )
        .expect("valid template"),
    );
    bar
}

fn print_metrics(label: &str, m: &BTreeMap<String, f64>) {
    let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    tracing::info!(
        "{label}: ndcg@10 {:.4}  mrr@10 {:.4}  map@100 {:.4}  recall@10 {:.4}  accuracy@1 {:.4}",
        get("ndcg@10"),
        get("mrr@10"),
        get("map@100"),
        get("recall@10"),
        get("accuracy@1")
    );
}

/// Creates the run directory and records the resolved configuration in it; returns that TOML.
pub fn prepare_output(cfg: &RunConfig) -> Result<String> {
    let out_dir = &cfg.output.dir;
    fs::create_dir_all(out_dir).map_err(Error::io("create directory", out_dir))?;
    let text = toml::to_string_pretty(cfg)
        .map_err(|e| Error::Usage(format!("cannot serialise the config: {e}")))?;
    atomic::write_file(&out_dir.join("config.toml"), text.as_bytes())?;
    Ok(text)
}

/// Loads the training files a config names, logs what loading did, and records it in `log`.
pub fn load_training_data(cfg: &RunConfig, log: &mut MetricsLog) -> Result<Dataset> {
    let data = load_files(
        &cfg.data.train.to_vec(),
        LoadOptions {
            skip_invalid: cfg.data.skip_invalid,
        },
    )?;
    tracing::info!("training data: {}", data.stats());
    log.write(&json!({"event": "data", "stats": data.stats(), "fingerprint": format!("{:016x}", data.fingerprint())}))?;
    Ok(data)
}

/// Restores the checkpoint `which` names ("latest" or a path); returns the steps already done.
fn resume(
    ckpt_dir: &Path,
    which: &str,
    cfg: &RunConfig,
    data: &Dataset,
    trainer: &mut Trainer,
) -> Result<u64> {
    let Some((path, state)) = checkpoint::find(ckpt_dir, which)? else {
        tracing::warn!(dir = %ckpt_dir.display(), "no checkpoint to resume from: starting from the beginning");
        return Ok(0);
    };
    checkpoint::check_compatible(&path, &state, &format!("{:016x}", data.fingerprint()), cfg)?;
    checkpoint::restore(&path, &state, &mut trainer.model, &mut trainer.optim)?;
    tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
    Ok(state.step)
}

/// Set when SIGINT or SIGTERM arrives: the loop checkpoints at the next step boundary and stops.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())
            .map_err(Error::io("install a handler for", "SIGINT/SIGTERM"))?;
    }
    Ok(flag)
}

/// Runs training as the config says; `show_progress` draws a bar on stderr.
pub fn run(cfg: &RunConfig, show_progress: bool) -> Result<RunSummary> {
    let out_dir = &cfg.output.dir;
    prepare_output(cfg)?;
    let resuming = cfg.train.resume.is_some();
    let metrics_path = out_dir.join("metrics.jsonl");
    let mut log = if resuming {
        MetricsLog::append(&metrics_path)?
    } else {
        MetricsLog::create(&metrics_path)?
    };
    let model = load_model(cfg)?;
    let data = load_training_data(cfg, &mut log)?;

    let plan = RunPlan::new(&data, plan_spec(cfg), cfg.train.epochs, cfg.train.max_steps)?;
    let mut trainer = trainer_for(cfg, model, plan.total_steps)?;
    let warmup = trainer.schedule.warmup;
    let ckpt_dir = out_dir.join("checkpoints");
    let start_step = match &cfg.train.resume {
        Some(which) => resume(&ckpt_dir, which, cfg, &data, &mut trainer)?,
        None => 0,
    };
    if cfg.train.resume.is_some() {
        log.write(&json!({"event": "resume", "step": start_step}))?;
    }
    tracing::info!(steps = plan.total_steps, start_step, warmup, batch_size = cfg.train.batch_size, device = ?trainer.model.device(), "training");
    let stop = stop_flag()?;
    let save_checkpoint = |trainer: &Trainer,
                           steps_done: u64,
                           log: &mut MetricsLog|
     -> Result<()> {
        let (epoch, batch) = plan.cursor(steps_done);
        let state = CheckpointState {
            step: steps_done,
            optimizer_steps: trainer.optim.steps_taken(),
            seed: cfg.train.seed,
            data_fingerprint: format!("{:016x}", data.fingerprint()),
            config_fingerprint: checkpoint::config_fingerprint(cfg),
            multipos_version: env!("CARGO_PKG_VERSION").into(),
            epoch,
            batch,
        };
        let start = Instant::now();
        let path = checkpoint::write(
            &ckpt_dir,
            &state,
            &trainer.model,
            &trainer.optim,
            cfg.output.keep_checkpoints,
            &[("metrics.jsonl", &log.contents()?)],
        )?;
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!(checkpoint = %path.display(), seconds = format!("{seconds:.2}"), "checkpoint written");
        log.write(
            &json!({"event": "checkpoint", "step": steps_done, "path": path, "seconds": seconds}),
        )
    };

    let eval_set = match &cfg.eval {
        Some(e) => Some((IrDataset::load(&e.queries, &e.corpus, &e.qrels)?, e.clone())),
        None => None,
    };
    let run_eval = |trainer: &Trainer,
                    step: u64,
                    log: &mut MetricsLog|
     -> Result<BTreeMap<String, f64>> {
        let (set, e) = eval_set.as_ref().expect("called only with an eval set");
        let start = Instant::now();
        let m = evaluate(&trainer.model, set, e.batch_size, &IrConfig::default())?;
        log.write(&json!({"event": "eval", "step": step, "seconds": start.elapsed().as_secs_f64(), "metrics": m}))?;
        Ok(m)
    };
    let eval_before = match &eval_set {
        Some((_, e)) if e.at_start && start_step == 0 => {
            let m = run_eval(&trainer, 0, &mut log)?;
            print_metrics("before training", &m);
            Some(m)
        }
        _ => None,
    };

    let bar = progress(plan.total_steps, show_progress);
    bar.set_position(start_step);
    let start = Instant::now();
    let mut pairs = 0u64;
    let mut last_loss = f64::NAN;
    for step in start_step..plan.total_steps {
        let (epoch, index) = plan.locate(step);
        let batch = plan.epoch(epoch).batch(index);
        let stats = trainer.step(&data, &batch, step)?;
        if !stats.loss.is_finite() {
            return Err(Error::Usage(format!(
                "loss became {} at step {}: lower train.lr",
                stats.loss,
                step + 1
            )));
        }
        pairs += stats.pairs as u64;
        last_loss = stats.loss;
        let rate = stats.pairs as f64 / stats.seconds;
        log.write(&json!({
            "event": "step", "step": step + 1, "epoch": epoch, "batch": index, "loss": stats.loss, "lr": stats.lr,
            "grad_norm": stats.grad_norm, "pairs": stats.pairs, "tokens": stats.tokens, "seconds": stats.seconds,
            "pairs_per_s": rate,
        }))?;
        bar.set_message(format!(
            "loss {:.4}  {:.1} pairs/s  lr {:.2e}",
            stats.loss, rate, stats.lr
        ));
        bar.inc(1);
        let done = step + 1;
        let every = cfg.output.checkpoint_every_steps;
        let budget_spent =
            cfg.train.stop_after_steps > 0 && done - start_step >= cfg.train.stop_after_steps;
        let signalled = stop.load(std::sync::atomic::Ordering::SeqCst);
        let unfinished = done < plan.total_steps;
        if unfinished && ((every > 0 && done % every == 0) || budget_spent || signalled) {
            bar.suspend(|| save_checkpoint(&trainer, done, &mut log))?;
        }
        if unfinished && signalled {
            bar.finish_and_clear();
            return Err(Error::Usage(format!(
                "stopped by a signal after step {done}; continue with --resume"
            )));
        }
        if unfinished && budget_spent {
            bar.finish_and_clear();
            return Err(Error::Stopped {
                steps_done: done,
                total: plan.total_steps,
            });
        }
        if let Some((_, e)) = &eval_set
            && e.every_steps > 0
            && (step + 1) % e.every_steps == 0
            && step + 1 < plan.total_steps
        {
            let m = bar.suspend(|| run_eval(&trainer, step + 1, &mut log))?;
            print_metrics(&format!("step {}", step + 1), &m);
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    let eval_after = match &eval_set {
        Some(_) => {
            let m = run_eval(&trainer, plan.total_steps, &mut log)?;
            print_metrics("after training", &m);
            Some(m)
        }
        None => None,
    };
    let model_dir = out_dir.join("model");
    trainer.model.save(&model_dir)?;
    save_checkpoint(&trainer, plan.total_steps, &mut log)?;
    let summary = RunSummary {
        steps: plan.total_steps,
        pairs,
        seconds,
        pairs_per_s: pairs as f64 / seconds,
        final_loss: last_loss,
        eval_before,
        eval_after,
        model_dir,
    };
    log.write(&json!({"event": "done", "summary": summary}))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rollback trims the steps that will run again and keeps everything else, in order.
    #[test]
    fn removing_records_rewrites_the_log_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        for step in 1..=5u64 {
            log.write(&json!({"event": "step", "step": step})).unwrap();
        }
        log.write(&json!({"event": "checkpoint", "step": 4}))
            .unwrap();
        let removed = log
            .remove(|v| v["event"] == "step" && v["step"].as_u64().is_some_and(|s| s > 3))
            .unwrap();
        assert_eq!(removed, 2);
        log.write(&json!({"event": "step", "step": 4})).unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<(String, u64)> = lines
            .iter()
            .map(|v| {
                (
                    v["event"].as_str().unwrap().to_string(),
                    v["step"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, u64)> = [
            ("step", 1),
            ("step", 2),
            ("step", 3),
            ("checkpoint", 4),
            ("step", 4),
        ]
        .iter()
        .map(|(k, s)| (k.to_string(), *s))
        .collect();
        assert_eq!(kinds, want);
        assert_eq!(log.remove(|_| false).unwrap(), 0);
    }
}
