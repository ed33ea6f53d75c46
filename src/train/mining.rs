//! `train.mine`: hard negatives mined with the base model before training (docs/design.md §11).
//! The mined data of each MNRL task is recorded as `output.dir/mined/<task>.jsonl`; a resumed run
//! trains on that record rather than mining again, so resume stays exact.
use std::path::PathBuf;

use serde_json::json;

use super::build::load_model;
use super::metrics::MetricsLog;
use super::task::{Task, TaskData};
use crate::config::RunConfig;
use crate::data::{LoadOptions, load_files};
use crate::embed::read_inputs;
use crate::error::{Error, Result};
use crate::mine::{Corpus, cache, mine, write_groups};
use crate::model::SentenceModel;

/// Where a task's mined data is recorded.
pub fn record_path(cfg: &RunConfig, task: &str) -> PathBuf {
    cfg.output.dir.join("mined").join(format!("{task}.jsonl"))
}

/// Replaces the data of every MNRL task with its mined version: read back from the record when
/// resuming, else mined now with the base model and recorded.
pub fn apply(cfg: &RunConfig, tasks: &mut [Task], log: &mut MetricsLog) -> Result<()> {
    let Some(opts) = &cfg.train.mine else {
        return Ok(());
    };
    let extra: Vec<String> = match &opts.corpus {
        Some(p) => read_inputs(p)?.into_iter().map(|t| t.text).collect(),
        None => Vec::new(),
    };
    let mut model: Option<SentenceModel> = None;
    for task in tasks.iter_mut() {
        let TaskData::Groups(data) = &task.data else {
            continue;
        };
        let path = record_path(cfg, &task.name);
        if cfg.train.resume.is_some() && path.is_file() {
            log.write(&json!({"event": "mine", "task": task.name, "recorded": path.display().to_string()}))?;
        } else {
            let model = match &mut model {
                Some(m) => m,
                None => model.insert(load_model(cfg)?),
            };
            let model_dir = cfg
                .model
                .path
                .clone()
                .unwrap_or_else(crate::model::default_dir);
            let key = cache::model_key(&model_dir, model.max_seq_length())?;
            let corpus = Corpus::new(data, &extra);
            let started = std::time::Instant::now();
            let (mined, report) = mine(
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
            })?;
            let dir = path.parent().expect("a file in mined/");
            std::fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
            write_groups(&path, data, &mined)?;
            tracing::info!(task = %task.name, queries = report.queries, negatives = report.negatives_mined, short = report.queries_short, without = report.queries_without, seconds = format!("{:.1}", started.elapsed().as_secs_f64()), "mined hard negatives with the base model");
            if report.queries_short > 0 {
                tracing::warn!(
                    "task {}: {} of {} queries found fewer than {} qualifying negatives ({} found none); they keep what they found",
                    task.name,
                    report.queries_short,
                    report.queries,
                    opts.num_negatives,
                    report.queries_without
                );
            }
            log.write(&json!({"event": "mine", "task": task.name, "report": report, "path": path.display().to_string()}))?;
        }
        task.data = TaskData::Groups(load_files(&[path], LoadOptions::default())?);
    }
    Ok(())
}
