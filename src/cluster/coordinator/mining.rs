//! `train.mine` on a cluster's workers (docs/design.md §11): before the first step, the ring embeds
//! the queries and corpora of the tasks to mine in pages, as it embeds validation texts (each
//! worker a share, on its own device, with the base model); the coordinator then searches and
//! selects exactly as `multipos mine` does and records each task's mined data, which the run
//! trains on — and a resumed run reads back — as in one process. The first mining (base model)
//! shares the coordinator's corpus-embedding cache with `multipos mine` and one-process runs: a
//! cached corpus is not handed out, and a corpus the workers embedded is stored.
use std::path::PathBuf;
use std::time::Duration;

use tch::{Device, Tensor};

use crate::config::RunConfig;
use crate::data::Batching;
use crate::error::{Error, Result};
use crate::mine::{Corpus, MineOptions, cache, mine_embedded, query_texts};
use crate::model::Role;
use crate::model::config::prompted;
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
    /// Its batching once mined (shuffled until then: the cluster labels may come with mining).
    batching: Batching,
    /// Its corpus's key in the embedding cache.
    corpus_key: u64,
    /// Its corpus's embeddings with the base model, when the cache held them (row-major f32:
    /// tensors are not `Sync`).
    cached: Option<Vec<f32>>,
}

/// Where the first mining's corpus embeddings are cached: the directory and the model's key.
struct CacheAt {
    dir: PathBuf,
    model_key: u64,
}

/// The texts the workers embed for `train.mine`, and how to turn their embeddings into data.
pub(crate) struct MineJob {
    /// Each task's queries, then its corpus, task by task: what a re-mining embeds.
    texts: Vec<String>,
    /// The first mining's texts when a corpus came from the cache: `texts` without it.
    first_texts: Option<Vec<String>>,
    parts: Vec<Part>,
    extra: Vec<String>,
    opts: MineOptions,
    cache: CacheAt,
}

impl MineJob {
    /// The job for every query-grouped task of `tasks` (as loaded, before mining): their queries,
    /// then their corpora, task by task. `first`: the first mining is still to come (a resumed
    /// run only re-mines, so it does not read the cache).
    pub(crate) fn new(cfg: &RunConfig, tasks: &[Task], first: bool) -> Result<Self> {
        let opts = cfg
            .train
            .mine
            .clone()
            .ok_or_else(|| Error::Usage("train.mine is not set".into()))?;
        let extra = extra_corpus(&opts)?;
        let model_dir = cfg.model.dir();
        let max_seq_length =
            crate::model::sentence::max_seq_length_of(&model_dir, cfg.model.max_seq_length)?;
        let cache = CacheAt {
            dir: cache::default_dir(),
            model_key: cache::model_key(&model_dir, max_seq_length)?,
        };
        // As `multipos mine` embeds them: queries and corpus each with the model's prompt.
        let usage = crate::model::config::Usage::load(&model_dir)?;
        let (query_prompt, corpus_prompt) =
            (usage.prompt(Role::Query), usage.prompt(Role::Document));
        let (mut texts, mut parts) = (Vec::new(), Vec::new());
        for (i, task) in tasks.iter().enumerate() {
            let TaskData::Groups(data) = &task.data else {
                continue;
            };
            let queries = query_texts(data);
            let corpus = Corpus::new(data, &extra);
            let corpus_key = corpus.fingerprint();
            let rows = corpus.texts.len();
            let cached = if first {
                cache::load(&cache.dir, cache.model_key, corpus_key, rows, Device::Cpu)?
            } else {
                None
            };
            let cached = cached
                .map(|t| Vec::<f32>::try_from(t.flatten(0, -1)))
                .transpose()
                .map_err(Error::Torch)?;
            parts.push(Part {
                task: i,
                queries: queries.len(),
                corpus: rows,
                negatives_per_row: task.negatives_per_row,
                batching: task.batching,
                corpus_key,
                cached,
            });
            texts.extend(prompted(queries.iter().copied(), query_prompt));
            texts.extend(prompted(corpus.texts.iter().copied(), corpus_prompt));
        }
        let first_texts = parts
            .iter()
            .any(|p| p.cached.is_some())
            .then(|| first_texts(&texts, &parts));
        Ok(Self {
            texts,
            first_texts,
            parts,
            extra,
            opts,
            cache,
        })
    }

    /// Every text to embed, in the order `finish` expects their embeddings: for the first mining
    /// (`first`, with the base model) without the corpora the cache holds.
    pub(crate) fn texts(&self, first: bool) -> &[String] {
        match (&self.first_texts, first) {
            (Some(texts), true) => texts,
            _ => &self.texts,
        }
    }

    /// Mines from the workers' embeddings (`values`: `dim` floats per text of `texts`), records
    /// every mined task as one process does (`epoch`: re-mined before that epoch), and returns the
    /// tasks to train on with the `mine` events for the metrics log. `tasks` are those `new` took,
    /// or `placeholder`s of them.
    pub(crate) fn finish(
        &self,
        cfg: &RunConfig,
        tasks: &[Task],
        values: &[f32],
        dim: usize,
        took: Duration,
        epoch: Option<usize>,
    ) -> Result<(Vec<Task>, Vec<serde_json::Value>)> {
        let first = epoch.is_none();
        let texts = self.texts(first).len();
        if dim == 0 || values.len() != texts * dim {
            return Err(Error::Usage(format!(
                "train.mine: {} values for {texts} texts of dimension {dim}",
                values.len(),
            )));
        }
        let all = Tensor::from_slice(values).view([texts as i64, dim as i64]);
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
            at += nq;
            let cached = part.cached.as_ref().filter(|_| first);
            let corpus_emb = match cached {
                Some(v) if v.len() != part.corpus * dim => {
                    return Err(Error::Usage(format!(
                        "train.mine: the cached corpus embeddings ({}) hold {} values, not {} texts of dimension {dim}",
                        self.cache.dir.display(),
                        v.len(),
                        part.corpus
                    )));
                }
                Some(v) => Tensor::from_slice(v).view([nc, dim as i64]),
                None => {
                    let emb = normalize_l2(&all.narrow(0, at, nc));
                    at += nc;
                    if first {
                        cache::store(&self.cache.dir, self.cache.model_key, part.corpus_key, &emb)?;
                    }
                    emb
                }
            };
            let corpus = Corpus::new(data, &self.extra);
            let (mined, mut report) =
                mine_embedded(data, &corpus, &query_emb, &corpus_emb, &self.opts, false)?;
            report.corpus_cached = cached.is_some();
            task.negatives_per_row = part.negatives_per_row;
            task.batching = part.batching;
            events.push(record(cfg, task, epoch, &mined, &report, took)?);
        }
        Ok((out, events))
    }
}

/// `texts` without the corpora of `parts` that the cache holds.
fn first_texts(texts: &[String], parts: &[Part]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    for part in parts {
        let end = at + part.queries + part.corpus;
        let keep = if part.cached.is_some() {
            at + part.queries
        } else {
            end
        };
        out.extend_from_slice(&texts[at..keep]);
        at = end;
    }
    out
}

/// `tasks` planned without hard negatives (and shuffled, as mining may bring the cluster labels),
/// until the mined data replaces them: the placeholder plan only lets the ring form; no step runs
/// on it.
pub(crate) fn placeholder(tasks: &[Task]) -> Vec<Task> {
    let mut out = tasks.to_vec();
    for t in out.iter_mut() {
        if matches!(t.data, TaskData::Groups(_)) {
            t.negatives_per_row = 0;
            t.batching = Batching::Shuffled;
        }
    }
    out
}
