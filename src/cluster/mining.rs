//! `train.mine` on a cluster's workers (docs/design.md §11): before the first step, the ring embeds
//! the queries and corpora of the tasks to mine in pages, as it embeds validation texts (each
//! worker a share, on its own device, with the base model); the coordinator then searches and
//! selects exactly as `multipos mine` does and records each task's mined data, which the run
//! trains on — and a resumed run reads back — as in one process.
use std::time::Duration;

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::mine::{Corpus, MineOptions, max_positives, mine_embedded, query_texts};
use crate::model::pooling::normalize_l2;
use crate::train::mining::{extra_corpus, record};
use crate::train::task::{Task, TaskData};

/// One task to mine: where its texts sit in the job's list.
struct Part {
    task: usize,
    queries: usize,
    corpus: usize,
    /// The negatives per row the task is planned with once mined (0 until then).
    negatives_per_row: usize,
}

/// The texts the workers embed for `train.mine`, and how to turn their embeddings into data.
pub struct MineJob {
    texts: Vec<String>,
    parts: Vec<Part>,
    extra: Vec<String>,
    opts: MineOptions,
}

impl MineJob {
    /// The job for every query-grouped task of `tasks` (as loaded, before mining): their queries,
    /// then their corpora, task by task.
    pub fn new(cfg: &RunConfig, tasks: &[Task]) -> Result<Self> {
        let opts = cfg
            .train
            .mine
            .clone()
            .ok_or_else(|| Error::Usage("train.mine is not set".into()))?;
        let extra = extra_corpus(&opts)?;
        let (mut texts, mut parts) = (Vec::new(), Vec::new());
        for (i, task) in tasks.iter().enumerate() {
            let TaskData::Groups(data) = &task.data else {
                continue;
            };
            opts.validate(max_positives(data))
                .map_err(|e| Error::Usage(format!("train.mine: {e}")))?;
            let queries = query_texts(data);
            let corpus = Corpus::new(data, &extra);
            parts.push(Part {
                task: i,
                queries: queries.len(),
                corpus: corpus.texts.len(),
                negatives_per_row: task.negatives_per_row,
            });
            texts.extend(queries.iter().chain(&corpus.texts).map(|t| t.to_string()));
        }
        Ok(Self {
            texts,
            parts,
            extra,
            opts,
        })
    }

    /// Every text to embed, in the order `finish` expects their embeddings.
    pub fn texts(&self) -> &[String] {
        &self.texts
    }

    /// Mines from the workers' embeddings (`values`: `dim` floats per text of `texts`), records
    /// every mined task as one process does (`epoch`: re-mined before that epoch), and returns the
    /// tasks to train on with the `mine` events for the metrics log. `tasks` are those `new` took,
    /// or `placeholder`s of them.
    pub fn finish(
        &self,
        cfg: &RunConfig,
        tasks: &[Task],
        values: &[f32],
        dim: usize,
        took: Duration,
        epoch: Option<usize>,
    ) -> Result<(Vec<Task>, Vec<serde_json::Value>)> {
        if dim == 0 || values.len() != self.texts.len() * dim {
            return Err(Error::Usage(format!(
                "train.mine: {} values for {} texts of dimension {dim}",
                values.len(),
                self.texts.len()
            )));
        }
        let all = tch::Tensor::from_slice(values).view([self.texts.len() as i64, dim as i64]);
        let mut out = tasks.to_vec();
        let mut events = Vec::new();
        let mut at = 0i64;
        for part in &self.parts {
            let task = &mut out[part.task];
            let TaskData::Groups(data) = &task.data else {
                continue;
            };
            let (nq, nc) = (part.queries as i64, part.corpus as i64);
            let query_emb = normalize_l2(&all.narrow(0, at, nq));
            let corpus_emb = normalize_l2(&all.narrow(0, at + nq, nc));
            at += nq + nc;
            let corpus = Corpus::new(data, &self.extra);
            let (mined, report) =
                mine_embedded(data, &corpus, &query_emb, &corpus_emb, &self.opts, false)?;
            task.negatives_per_row = part.negatives_per_row;
            events.push(record(cfg, task, epoch, &mined, &report, took)?);
        }
        Ok((out, events))
    }
}

/// `tasks` planned without hard negatives, until the mined data replaces them: the placeholder
/// plan only lets the ring form; no step runs on it.
pub fn placeholder(tasks: &[Task]) -> Vec<Task> {
    let mut out = tasks.to_vec();
    for t in out.iter_mut() {
        if matches!(t.data, TaskData::Groups(_)) {
            t.negatives_per_row = 0;
        }
    }
    out
}
