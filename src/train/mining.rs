//! `train.mine`: hard negatives mined with the base model before training (docs/design.md §11).
//! The mined data of each MNRL task is recorded as `output.dir/mined/<task>.jsonl`; a resumed run
//! trains on that record rather than mining again, so resume stays exact. A cluster has its workers
//! embed the texts and records the result through the same `record`.
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use super::load::load_model;
use super::metrics::MetricsLog;
use super::task::{Task, TaskData};
use crate::config::RunConfig;
use crate::data::{Dataset, LoadOptions, load_files};
use crate::embed::read_inputs;
use crate::error::{Error, Result};
use crate::mine::{Corpus, MineOptions, MineReport, Mined, cache, mine, write_groups};
use crate::model::SentenceModel;

/// Where a task's mined data is recorded: mined with the base model, or (`epoch`) again before
/// that epoch (0-based; the file names it 1-based, as logs do).
pub(crate) fn record_path(cfg: &RunConfig, task: &str, epoch: Option<usize>) -> PathBuf {
    let name = match epoch {
        None => format!("{task}.jsonl"),
        Some(e) => format!("{task}.epoch-{}.jsonl", e + 1),
    };
    cfg.output.dir.join("mined").join(name)
}

/// Replaces the data of every MNRL task with its mined version: read back from the record when
/// resuming, else mined now with the base model and recorded.
pub(crate) fn apply(cfg: &RunConfig, tasks: &mut [Task], log: &mut MetricsLog) -> Result<()> {
    let Some(opts) = &cfg.train.mine else {
        return Ok(());
    };
    let todo = use_records(cfg, tasks, log)?;
    if todo.is_empty() {
        return Ok(());
    }
    let extra = extra_corpus(opts)?;
    let model = load_model(cfg)?;
    let model_dir = cfg.model.dir();
    let key = cache::model_key(&model_dir, model.max_seq_length())?;
    for i in todo {
        let started = std::time::Instant::now();
        let TaskData::Groups(data) = &tasks[i].data else {
            continue;
        };
        let (mined, report) = mine_task(&model, key, data, &extra, opts)?;
        let event = record(cfg, &mut tasks[i], None, &mined, &report, started.elapsed())?;
        log.write(&event)?;
    }
    Ok(())
}

fn mine_task(
    model: &SentenceModel,
    key: u64,
    data: &Dataset,
    extra: &[String],
    opts: &MineOptions,
) -> Result<(Mined, MineReport)> {
    let corpus = Corpus::new(data, extra);
    mine(
        model,
        key,
        data,
        &corpus,
        opts,
        Some(&cache::default_dir()),
        false,
    )
    .map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!("train.mine: {m}")),
        other => other,
    })
}

/// Puts recorded mined data in place when resuming; returns the indices of the query-grouped
/// tasks that still need mining (every one, for a fresh run).
pub(crate) fn use_records(
    cfg: &RunConfig,
    tasks: &mut [Task],
    log: &mut MetricsLog,
) -> Result<Vec<usize>> {
    let mut todo = Vec::new();
    for (i, task) in tasks.iter_mut().enumerate() {
        if !matches!(task.data, TaskData::Groups(_)) {
            continue;
        }
        let path = record_path(cfg, &task.name, None);
        if cfg.train.resume.is_some() && path.is_file() {
            log.write(&json!({"event": "mine", "task": task.name, "recorded": path.display().to_string()}))?;
            task.data = TaskData::Groups(load_files(&[path], LoadOptions::default())?);
        } else {
            todo.push(i);
        }
    }
    let grouped = tasks
        .iter()
        .filter(|t| matches!(t.data, TaskData::Groups(_)))
        .count();
    if !todo.is_empty() && todo.len() < grouped {
        return Err(Error::Usage(format!(
            "cannot resume exactly: {} is missing beside the other tasks' mined data",
            record_path(cfg, &tasks[todo[0]].name, None).display()
        )));
    }
    Ok(todo)
}

/// The texts of `train.mine.corpus`, which join every task's positives in its corpus.
pub(crate) fn extra_corpus(opts: &MineOptions) -> Result<Vec<String>> {
    Ok(match &opts.corpus {
        Some(p) => read_inputs(p)?.into_iter().map(|t| t.text).collect(),
        None => Vec::new(),
    })
}

/// Records what mining found for `task` (its whole data with the mined negatives, written
/// atomically), says what was short, and makes the task train on the record — the very file a
/// resumed run reads. Returns the `mine` event for the metrics log.
pub(crate) fn record(
    cfg: &RunConfig,
    task: &mut Task,
    epoch: Option<usize>,
    mined: &Mined,
    report: &MineReport,
    took: Duration,
) -> Result<serde_json::Value> {
    let TaskData::Groups(data) = &task.data else {
        return Err(Error::Usage(format!(
            "task {:?}: only query-grouped data is mined",
            task.name
        )));
    };
    let path = record_path(cfg, &task.name, epoch);
    let dir = path.parent().expect("a file in mined/");
    std::fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
    write_groups(&path, data, mined)?;
    tracing::info!(task = %task.name, queries = report.queries, negatives = report.negatives_mined, short = report.queries_short, without = report.queries_without, epoch = epoch.map(|e| e + 1), seconds = format!("{:.1}", took.as_secs_f64()), "mined hard negatives");
    if report.queries_short > 0 {
        let wanted = cfg.train.mine.as_ref().map_or(0, |o| o.num_negatives);
        tracing::warn!(
            "task {}: {} of {} queries found fewer than {wanted} qualifying negatives ({} found none); they keep what they found",
            task.name,
            report.queries_short,
            report.queries,
            report.queries_without
        );
    }
    task.data = TaskData::Groups(load_files(
        std::slice::from_ref(&path),
        LoadOptions::default(),
    )?);
    Ok(
        json!({"event": "mine", "task": task.name, "epoch": epoch.map(|e| e + 1), "report": report, "path": path.display().to_string()}),
    )
}

/// Mines every query-grouped task of `source` (the data as loaded) again with `model` — the
/// weights as trained so far — before epoch `epoch`, and records each; returns the tasks to train
/// on from that epoch and the `mine` events. No embedding cache: the weights changed.
pub(crate) fn remine(
    cfg: &RunConfig,
    model: &SentenceModel,
    source: &[Task],
    epoch: usize,
) -> Result<(Vec<Task>, Vec<serde_json::Value>)> {
    let opts = cfg
        .train
        .mine
        .as_ref()
        .ok_or_else(|| Error::Usage("train.remine_every_epochs needs train.mine".into()))?;
    let extra = extra_corpus(opts)?;
    let mut tasks = source.to_vec();
    let mut events = Vec::new();
    for task in tasks.iter_mut() {
        let TaskData::Groups(data) = &task.data else {
            continue;
        };
        let started = std::time::Instant::now();
        let corpus = Corpus::new(data, &extra);
        let (mined, report) = mine(model, 0, data, &corpus, opts, None, false)?;
        events.push(record(
            cfg,
            task,
            Some(epoch),
            &mined,
            &report,
            started.elapsed(),
        )?);
    }
    Ok((tasks, events))
}
