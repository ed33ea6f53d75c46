//! The single-process training run: config in, trained model directory and metrics out. Each step
//! goes through the same pipeline as a cluster worker's ([`Trainer::step`] over [`Solo`]).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::progress::{Progress, Show};
use serde_json::json;

use super::build::{FreshOutput, load_training_data, prepare_output, trainer_for};
use super::checkpoint::{self, CheckpointState};
use super::load::load_model;
use super::metrics::MetricsLog;
use super::nonfinite::{Fate, verdict};
use super::policy::RunPolicy;
use super::prefetch::Prefetch;
use super::prepare::Prepared;
use super::step::StepInput;
use super::task::Task;
use super::trainer::Trainer;
use super::validation::{Tracker, Verdict};
use super::versions::TrainingData;
use crate::collective::Solo;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::eval::{IrConfig, IrDataset, evaluate};

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

/// Restores the checkpoint `which` names ("latest" or a path); returns the steps already done.
fn resume(
    ckpt_dir: &Path,
    which: &str,
    cfg: &RunConfig,
    fingerprint: &str,
    trainer: &mut Trainer,
) -> Result<u64> {
    let Some((path, state)) = checkpoint::find(ckpt_dir, which)? else {
        tracing::warn!(dir = %ckpt_dir.display(), "no checkpoint to resume from: starting from the beginning");
        return Ok(0);
    };
    checkpoint::check_compatible(&path, &state, fingerprint, cfg)?;
    checkpoint::restore(&path, &state, trainer)?;
    tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
    Ok(state.step)
}

/// The loss of the newest step record of a `metrics.jsonl`, NaN without one.
fn last_logged_loss(log: &str) -> f64 {
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("event").and_then(|e| e.as_str()) == Some("step"))
        .and_then(|v| v.get("loss").and_then(serde_json::Value::as_f64))
        .unwrap_or(f64::NAN)
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

/// A run's fixed parts, shared by the loop's helpers.
struct Run<'a> {
    cfg: &'a RunConfig,
    data: TrainingData,
    ckpt_dir: PathBuf,
    eval_set: Option<IrDataset>,
    /// When this invocation started (steps log their wall-clock offset from it).
    started: Instant,
}

impl Run<'_> {
    /// Writes the checkpoint of `steps_done`; pruning spares the one of the `best` evaluation.
    fn save_checkpoint(
        &self,
        trainer: &Trainer,
        steps_done: u64,
        best: Option<u64>,
        log: &mut MetricsLog,
    ) -> Result<()> {
        let state = CheckpointState::of(
            self.cfg,
            trainer,
            steps_done,
            &self.data.fingerprint,
            self.data.plan.cursor(steps_done),
        );
        let start = Instant::now();
        let path = checkpoint::write(
            &self.ckpt_dir,
            &state,
            &trainer.state,
            &trainer.optim,
            checkpoint::Keep {
                newest: self.cfg.output.keep_checkpoints,
                best,
            },
            &[("metrics.jsonl", &log.contents()?)],
        )?;
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!(checkpoint = %path.display(), seconds = format!("{seconds:.2}"), "checkpoint written");
        log.write(
            &json!({"event": "checkpoint", "step": steps_done, "path": path, "seconds": seconds}),
        )
    }

    fn eval(
        &self,
        trainer: &Trainer,
        step: u64,
        log: &mut MetricsLog,
    ) -> Result<Option<BTreeMap<String, f64>>> {
        let (Some(set), Some(e)) = (&self.eval_set, &self.cfg.eval) else {
            return Ok(None);
        };
        let start = Instant::now();
        let m = evaluate(
            &trainer.state.model,
            set,
            e.batch_size,
            &IrConfig::default(),
        )?;
        log.write(&json!({"event": "eval", "step": step, "seconds": start.elapsed().as_secs_f64(), "metrics": m}))?;
        Ok(Some(m))
    }

    /// Evaluates at `step` and logs it; a new best under `eval.metric` is saved as `model-best/`.
    /// Returns the metrics and whether `eval.patience` says to stop.
    fn validate(
        &self,
        trainer: &Trainer,
        step: u64,
        log: &mut MetricsLog,
        tracker: &mut Option<Tracker>,
    ) -> Result<(Option<BTreeMap<String, f64>>, bool)> {
        let Some(m) = self.eval(trainer, step, log)? else {
            return Ok((None, false));
        };
        let Some(t) = tracker.as_mut() else {
            return Ok((Some(m), false));
        };
        let stop = match t.observe(step, &m).map_err(Error::Usage)? {
            Verdict::Improved => {
                trainer
                    .state
                    .save(&self.cfg.output.dir.join("model-best"))?;
                log.write(&json!({"event": "best", "step": step, "metric": self.cfg.eval.as_ref().map(|e| &e.metric), "value": t.best.map(|b| b.1)}))?;
                // A checkpointed run keeps the best step's checkpoint too, spared by pruning.
                if self.cfg.output.checkpoint_every_steps > 0
                    && step > 0
                    && !self.ckpt_dir.join(checkpoint::name(step)).is_dir()
                {
                    self.save_checkpoint(trainer, step, Some(step), log)?;
                }
                false
            }
            Verdict::NotBetter { stop } => stop,
        };
        Ok((Some(m), stop))
    }

    /// Runs one global step, prepared ahead (`waited` seconds for it), and logs it with its time
    /// profile; `None` when `train.on_nonfinite = "skip"` discarded it (`skipped` counts such steps
    /// in a row).
    fn step(
        &self,
        trainer: &mut Trainer,
        input: &Prepared,
        waited: f64,
        skipped: &mut u64,
        log: &mut MetricsLog,
    ) -> Result<Option<super::trainer::StepStats>> {
        let step = input.step;
        let mut stats = trainer.forward_backward(input, &mut Solo)?;
        stats.times.data = waited;
        match verdict(
            self.cfg.train.on_nonfinite,
            *skipped,
            step,
            &[stats.loss],
            &[stats.grad_norm],
        ) {
            Fate::Apply => {
                stats.times.optimizer += trainer.update(step, input.task)?;
                *skipped = 0;
            }
            Fate::Skip(reason) => {
                trainer.discard();
                *skipped += 1;
                tracing::warn!(%reason, "skipping the step");
                log.write(&json!({"event": "skip", "step": step + 1, "reason": reason}))?;
                return Ok(None);
            }
            Fate::Abort(reason) => return Err(Error::Diverged(reason)),
        }
        let (_, epoch, batch) = self.data.plan.position(step);
        let t = stats.times;
        let seconds = t.total();
        log.write(&json!({
            "event": "step", "step": step + 1, "epoch": epoch, "task": self.data.tasks()[input.task].name,
            "batch": batch, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
            "pairs": stats.pairs, "tokens": stats.tokens, "seconds": seconds,
            "pairs_per_s": stats.pairs as f64 / seconds, "compute_seconds": t.compute(),
            "data_seconds": t.data, "forward_seconds": t.forward, "backward_seconds": t.backward,
            "gather_seconds": t.gather, "reduce_seconds": t.reduce,
            "optimizer_seconds": t.optimizer, "sync_seconds": t.sync,
            "elapsed": self.started.elapsed().as_secs_f64(),
        }))?;
        Ok(Some(stats))
    }
}

impl Run<'_> {
    /// Mines the hard negatives again with the model as trained so far, before epoch `epoch`
    /// (`train.remine_every_epochs`); the epochs from there on train on the new version.
    fn remine(&mut self, trainer: &mut Trainer, epoch: usize, log: &mut MetricsLog) -> Result<()> {
        let source = self
            .data
            .source()
            .ok_or_else(|| Error::Usage("re-mining needs the data as loaded".into()))?;
        tracing::info!(
            epoch = epoch + 1,
            "mining hard negatives again with the model trained so far"
        );
        let (tasks, events) = super::mining::remine(self.cfg, &trainer.state.model, source, epoch)?;
        for event in &events {
            log.write(event)?;
        }
        self.data.remined(epoch, tasks)?;
        trainer.schedule.total = self.data.plan.total_steps;
        Ok(())
    }
}

/// What the training loop carries from step to step.
struct Loop {
    start_step: u64,
    pairs: u64,
    last_loss: f64,
    skipped: u64,
    tracker: Option<Tracker>,
    /// Where the run stopped early, and whether it was evaluated at that step already.
    stopped_at: Option<u64>,
    evaluated_last: bool,
}

impl Loop {
    /// The loop of a run starting at `start_step`. A resumed run reports its newest logged loss
    /// even when no step is left to run.
    fn new(start_step: u64, tracker: Option<Tracker>, log: &mut MetricsLog) -> Result<Self> {
        let last_loss = if start_step > 0 {
            last_logged_loss(&String::from_utf8_lossy(&log.contents()?))
        } else {
            f64::NAN
        };
        Ok(Self {
            start_step,
            pairs: 0,
            last_loss,
            skipped: 0,
            tracker,
            stopped_at: None,
            evaluated_last: false,
        })
    }
}

impl Run<'_> {
    /// Runs steps from `step` on, each prepared ahead (`train.prefetch`), until the run ends, stops
    /// early, or must re-mine; returns the next step to run.
    fn segment(
        &self,
        trainer: &mut Trainer,
        log: &mut MetricsLog,
        lp: &mut Loop,
        bar: &Progress,
        stop: &AtomicBool,
        mut step: u64,
    ) -> Result<u64> {
        let first = step;
        let total = self.data.plan.total_steps;
        let preparer = trainer.preparer();
        let data = &self.data;
        std::thread::scope(|scope| {
            let mut batches = Prefetch::start(scope, step..total, self.cfg.train.prefetch, {
                move |k| preparer.prepare(&StepInput::whole(&data.batch(k)), k)
            });
            while step < total {
                if step > first && self.data.remine_due(self.cfg, step).is_some() {
                    break;
                }
                let waiting = Instant::now();
                let input = batches.take(step)?;
                let waited = waiting.elapsed().as_secs_f64();
                if let Some(stats) = self.step(trainer, &input, waited, &mut lp.skipped, log)? {
                    lp.pairs += stats.pairs as u64;
                    lp.last_loss = stats.loss;
                }
                step += 1;
                bar.step(step, lp.last_loss);
                if self.after_step(trainer, log, lp, bar, stop, step)? {
                    lp.stopped_at = Some(step);
                    lp.evaluated_last = true;
                    break;
                }
            }
            Ok(step)
        })
    }

    /// What follows step `done`: checkpoints, a stop by signal or step budget (errors that say how
    /// to continue), validation; returns whether validation says to stop early.
    fn after_step(
        &self,
        trainer: &Trainer,
        log: &mut MetricsLog,
        lp: &mut Loop,
        bar: &Progress,
        stop: &AtomicBool,
        done: u64,
    ) -> Result<bool> {
        let total = self.data.plan.total_steps;
        let policy = RunPolicy::new(self.cfg);
        let budget_spent = policy.budget_spent(lp.start_step, done);
        let signalled = stop.load(std::sync::atomic::Ordering::SeqCst);
        let unfinished = done < total;
        if unfinished && (policy.checkpoint_due(done) || budget_spent || signalled) {
            let best = best_step(&lp.tracker);
            bar.suspend(|| self.save_checkpoint(trainer, done, best, log))?;
        }
        if unfinished && signalled {
            bar.finish();
            return Err(Error::Interrupted(format!(
                "stopped by a signal after step {done}; continue with --resume"
            )));
        }
        if unfinished && budget_spent {
            bar.finish();
            return Err(Error::Stopped {
                steps_done: done,
                total,
            });
        }
        // The end's evaluation comes after the loop, once.
        if !(unfinished && policy.eval_due(done, total)) {
            return Ok(false);
        }
        let (m, stop_early) = bar.suspend(|| self.validate(trainer, done, log, &mut lp.tracker))?;
        if let Some(m) = &m {
            print_metrics(&format!("step {done}"), m);
        }
        if stop_early {
            let best = best_step(&lp.tracker);
            tracing::warn!(step = done, best_step = ?best, "stopping early: eval.patience evaluations without a new best");
            log.write(&json!({"event": "early_stop", "step": done, "best_step": best}))?;
        }
        Ok(stop_early)
    }
}

fn best_step(tracker: &Option<Tracker>) -> Option<u64> {
    tracker.as_ref().and_then(|t| t.best).map(|b| b.0)
}

/// Everything before the first step: output directory, log, model, data, plan, resume.
fn start<'a>(cfg: &'a RunConfig, stop: &AtomicBool) -> Result<(Run<'a>, Trainer, MetricsLog, u64)> {
    let out_dir = &cfg.output.dir;
    prepare_output(cfg)?;
    let mut log = MetricsLog::for_run(cfg)?;
    let model = load_model(cfg)?;
    let (source, tasks) = load_training_data(cfg, &mut log)?;
    let data = TrainingData::new(cfg, source, tasks)?;
    let specs: Vec<_> = data.tasks().iter().map(Task::spec).collect();
    let mut trainer = trainer_for(cfg, model, &specs, data.plan.total_steps)?;
    let mut run = Run {
        cfg,
        data,
        ckpt_dir: out_dir.join("checkpoints"),
        eval_set: match &cfg.eval {
            Some(e) => Some(IrDataset::load(&e.queries, &e.corpus, &e.qrels)?),
            None => None,
        },
        started: Instant::now(),
    };
    let start_step = match &cfg.train.resume {
        Some(which) => {
            let s = resume(
                &run.ckpt_dir,
                which,
                cfg,
                &run.data.fingerprint,
                &mut trainer,
            )?;
            log.write(&json!({"event": "resume", "step": s}))?;
            // The data versions re-mined before the checkpoint, from their records.
            run.data.restore_versions(cfg, s)?;
            trainer.schedule.total = run.data.plan.total_steps;
            s
        }
        None => 0,
    };
    let total = run.data.plan.total_steps;
    tracing::info!(steps = total, start_step, warmup = trainer.schedule.warmup, batch_size = cfg.train.batch_size, device = ?trainer.state.model.device(), "training");
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::Interrupted(
            "interrupted before the first step: nothing was trained or saved".into(),
        ));
    }
    Ok((run, trainer, log, start_step))
}

/// Runs training as the config says, showing progress as `show` says.
/// Writes the run's final models into `out_dir` as the policy says (the model trained, or the
/// best; the moving average's): where the model lies.
fn save_models(out_dir: &Path, policy: &RunPolicy, trainer: &Trainer) -> Result<PathBuf> {
    let model_dir = out_dir.join("model");
    let best_dir = out_dir.join("model-best");
    let outputs = policy.final_outputs();
    if outputs.model_from_best && best_dir.is_dir() {
        crate::io::atomic::copy_dir(&best_dir, &model_dir)?;
    } else {
        trainer.state.save(&model_dir)?;
    }
    if outputs.ema {
        trainer.state.save_ema(&out_dir.join("model-ema"))?;
    }
    Ok(model_dir)
}

pub fn run(cfg: &RunConfig, show: Show) -> Result<RunSummary> {
    // First of all: a signal during start-up (loading, mining, planning) must not be lost.
    let stop = stop_flag()?;
    let out_dir = &cfg.output.dir;
    let fresh = FreshOutput::watch(cfg);
    let (mut run, mut trainer, mut log, start_step) = start(cfg, &stop)?;
    fresh.keep();
    let resumed = (start_step > 0).then_some(start_step);
    let mut tracker = Tracker::resumed(cfg.eval.as_ref(), resumed, &mut log)?;
    let policy = RunPolicy::new(cfg);
    let eval_before = if policy.eval_before_training() && start_step == 0 {
        let (m, _) = run.validate(&trainer, 0, &mut log, &mut tracker)?;
        if let Some(m) = &m {
            print_metrics("before training", m);
        }
        m
    } else {
        None
    };

    let bar = Progress::new(
        show,
        run.data.plan.total_steps,
        start_step,
        cfg.train.batch_size,
    );
    let start = Instant::now();
    let mut lp = Loop::new(start_step, tracker, &mut log)?;
    if start_step >= run.data.plan.total_steps {
        tracing::info!(
            steps = run.data.plan.total_steps,
            "the run was already finished: nothing left to train"
        );
    }
    let mut step = start_step;
    // The step count can change while training: re-mined data is planned anew, and the steps
    // prepared ahead from the old plan are dropped.
    while step < run.data.plan.total_steps && lp.stopped_at.is_none() {
        if let Some(epoch) = run.data.remine_due(cfg, step) {
            bar.suspend(|| run.remine(&mut trainer, epoch, &mut log))?;
            bar.set_total(run.data.plan.total_steps);
        }
        step = run.segment(&mut trainer, &mut log, &mut lp, &bar, &stop, step)?;
    }
    let Loop {
        pairs,
        last_loss,
        mut tracker,
        stopped_at,
        evaluated_last,
        ..
    } = lp;
    // The step the run ends at: the last, or where it stopped early.
    let last = stopped_at.unwrap_or(run.data.plan.total_steps);
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    let eval_after = if evaluated_last {
        None
    } else {
        run.validate(&trainer, last, &mut log, &mut tracker)?.0
    };
    if let Some(m) = &eval_after {
        print_metrics("after training", m);
    }
    let model_dir = save_models(out_dir, &policy, &trainer)?;
    run.save_checkpoint(&trainer, last, best_step(&tracker), &mut log)?;
    let summary = RunSummary {
        steps: last,
        pairs,
        seconds,
        pairs_per_s: pairs as f64 / seconds,
        final_loss: last_loss,
        eval_before,
        eval_after,
        model_dir,
    };
    finish(cfg, &mut log, summary)
}

/// Closes the run's record with its summary, then writes the model cards from that record.
fn finish(cfg: &RunConfig, log: &mut MetricsLog, summary: RunSummary) -> Result<RunSummary> {
    log.write(&json!({"event": "done", "summary": summary}))?;
    let command: Vec<String> = std::env::args().collect();
    super::card::write_cards(cfg, &command)?;
    Ok(summary)
}
