//! Hard-negative mining, multi-positive aware (`multipos mine`; docs/design.md §11): for every query
//! group, the corpus texts closest to the query that are neither one of its positives nor the query
//! itself (by normalised text identity), filtered as sentence-transformers' `mine_hard_negatives`
//! filters them, written back as query-grouped JSONL with a `negatives` field that `train` reads.
//! Search is exact and chunked (bounded memory), corpus embeddings are cached on disk, and every
//! query and positive of the input is written out, with those that found too few negatives counted.
pub mod cache;
pub mod kmeans;
pub mod search;
pub mod select;

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::text::{hash_normalized, normalize};
use crate::data::{Cluster, Dataset};
use crate::error::{Error, Result};
use crate::io::atomic::AtomicFile;
use crate::model::pooling::normalize_l2;
use crate::model::{Role, SentenceModel};
use crate::seed::mix_seed;
pub use select::Skipped;

/// How negatives are picked from the qualifying pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// The highest-scoring ones.
    #[default]
    Top,
    /// Drawn uniformly (seeded), then ordered best first.
    Random,
}

/// sentence-transformers' `mine_hard_negatives` options, names and defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MineOptions {
    /// Skip this many of the best qualifying candidates.
    pub range_min: usize,
    /// Consider only this many best qualifying candidates (default: range_min + num_negatives +
    /// the most positives of a query, ×10 negatives when a margin or max_score filters).
    pub range_max: Option<usize>,
    /// Drop candidates scoring above this.
    pub max_score: Option<f32>,
    /// Drop candidates scoring below this.
    pub min_score: Option<f32>,
    /// Drop candidates with score + margin > the query's weakest positive score.
    pub absolute_margin: Option<f32>,
    /// Drop candidates scoring above weakest − |weakest|·margin.
    pub relative_margin: Option<f32>,
    pub num_negatives: usize,
    pub sampling_strategy: Sampling,
    pub seed: u64,
    /// Texts per forward pass when embedding.
    pub batch_size: usize,
    /// Also cluster the queries into this many topics (spherical k-means of their embeddings,
    /// seeded by `seed`), written as each group's `cluster` label for `data.batching = "by_cluster"`.
    pub clusters: Option<usize>,
    /// More texts to mine from, beside every positive (`train.mine` only; the command takes
    /// `--corpus`): .txt, one per line, or .jsonl with a "text" field.
    pub corpus: Option<std::path::PathBuf>,
}

impl Default for MineOptions {
    fn default() -> Self {
        Self {
            range_min: 0,
            range_max: None,
            max_score: None,
            min_score: None,
            absolute_margin: None,
            relative_margin: None,
            num_negatives: 3,
            sampling_strategy: Sampling::Top,
            seed: 42,
            batch_size: 32,
            clusters: None,
            corpus: None,
        }
    }
}

impl MineOptions {
    /// The pool size: `range_max`, or sentence-transformers' default for it.
    pub fn range_max(&self, max_positives: usize) -> usize {
        self.range_max.unwrap_or_else(|| {
            let filtered = self.absolute_margin.is_some()
                || self.relative_margin.is_some()
                || self.max_score.is_some();
            let per = if filtered { 10 } else { 1 };
            self.range_min + self.num_negatives * per + max_positives
        })
    }

    /// Checks values that cannot work, as sentence-transformers refuses them. Needs no data: the
    /// default `range_max` always leaves `num_negatives` candidates past `range_min`.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.num_negatives == 0 {
            return Err("num_negatives must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        if self.clusters == Some(0) {
            return Err("clusters must be at least 1".into());
        }
        if let Some(range_max) = self.range_max {
            if self.range_min >= range_max {
                return Err(format!(
                    "range_min {} must be smaller than range_max {range_max}",
                    self.range_min
                ));
            }
            if self.num_negatives > range_max - self.range_min {
                return Err(format!(
                    "cannot mine {} negatives per query: only {} candidates remain after skipping range_min = {} of range_max = {range_max}",
                    self.num_negatives,
                    range_max - self.range_min,
                    self.range_min
                ));
            }
        }
        for (name, v) in [
            ("max_score", self.max_score),
            ("min_score", self.min_score),
            ("absolute_margin", self.absolute_margin),
            ("relative_margin", self.relative_margin),
        ] {
            if v.is_some_and(|x| !x.is_finite()) {
                return Err(format!("{name} must be a finite number"));
            }
        }
        Ok(())
    }
}

/// What mining did, for the user and for `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MineReport {
    pub queries: u64,
    pub positives: u64,
    pub corpus: u64,
    pub range_max: u64,
    pub negatives_mined: u64,
    /// Queries that found fewer than `num_negatives` qualifying negatives (kept, with what they found).
    pub queries_short: u64,
    /// Queries that found none.
    pub queries_without: u64,
    pub skipped: Skipped,
    /// Whether the corpus embeddings came from the cache.
    pub corpus_cached: bool,
    /// The query clusters, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clusters: Option<ClusterReport>,
}

/// How the queries clustered.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterReport {
    pub count: u64,
    /// Queries in the smallest and in the largest cluster.
    pub smallest: u64,
    pub largest: u64,
    /// Lloyd rounds until no query changed cluster.
    pub rounds: u64,
}

/// What mining found for every group of the data, in group order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mined {
    /// The mined negatives (texts, best first).
    pub negatives: Vec<Vec<String>>,
    /// Each query's cluster, numbered from 0 (`MineOptions::clusters`).
    pub clusters: Option<Vec<u32>>,
}

/// The texts to mine from: `extra` (deduplicated by identity) followed by every positive of `data`.
pub struct Corpus<'a> {
    pub texts: Vec<&'a str>,
    pub hashes: Vec<u64>,
    by_hash: FxHashMap<u64, u32>,
}

impl<'a> Corpus<'a> {
    /// Builds the corpus; positives always join it, as in sentence-transformers.
    pub fn new(data: &'a Dataset, extra: &'a [String]) -> Self {
        let mut c = Corpus {
            texts: Vec::new(),
            hashes: Vec::new(),
            by_hash: FxHashMap::default(),
        };
        for t in extra {
            c.push(t, hash_normalized(&normalize(t)));
        }
        for g in 0..data.len() {
            for &p in data.positives(g) {
                c.push(data.text(p), data.hash(p));
            }
        }
        c
    }

    fn push(&mut self, text: &'a str, hash: u64) {
        if !self.by_hash.contains_key(&hash) {
            self.by_hash.insert(hash, self.texts.len() as u32);
            self.texts.push(text);
            self.hashes.push(hash);
        }
    }

    /// A fingerprint of the corpus content, in order.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for x in &self.hashes {
            h.update(&x.to_le_bytes());
        }
        h.digest()
    }
}

fn bar(len: u64, what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} ({{eta}} left)"
        ))
        .expect("valid template"),
    );
    bar
}

/// Unit-length embeddings of `texts` on the model's device, in chunks so a bar can follow.
fn embed_all(
    model: &SentenceModel,
    texts: &[&str],
    role: Role,
    batch_size: usize,
    what: &str,
    show: bool,
) -> Result<Tensor> {
    let bar = bar(texts.len() as u64, what, show);
    let mut parts = Vec::new();
    for chunk in texts.chunks(4096) {
        parts.push(model.embed_as(chunk, role, batch_size)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(normalize_l2(&Tensor::cat(&parts, 0)).to_device(model.device()))
}

/// Mines every group of `data` against `corpus`; returns the mined negatives of each group (texts,
/// best first) and the report. `cache`, when given, is a directory for corpus embeddings keyed by
/// `model_key` and the corpus content.
pub fn mine(
    model: &SentenceModel,
    model_key: u64,
    data: &Dataset,
    corpus: &Corpus<'_>,
    opts: &MineOptions,
    cache: Option<&Path>,
    show_progress: bool,
) -> Result<(Mined, MineReport)> {
    opts.validate().map_err(Error::Usage)?;
    let cached = match cache {
        Some(dir) => cache::load(
            dir,
            model_key,
            corpus.fingerprint(),
            corpus.texts.len(),
            model.device(),
        )?,
        None => None,
    };
    let corpus_cached = cached.is_some();
    let corpus_emb = match cached {
        Some(t) => t,
        None => {
            let t = embed_all(
                model,
                &corpus.texts,
                Role::Document,
                opts.batch_size,
                "corpus",
                show_progress,
            )?;
            if let Some(dir) = cache {
                cache::store(dir, model_key, corpus.fingerprint(), &t)?;
            }
            t
        }
    };
    let query_emb = embed_all(
        model,
        &query_texts(data),
        Role::Query,
        opts.batch_size,
        "queries",
        show_progress,
    )?;
    let (mined, mut report) =
        mine_embedded(data, corpus, &query_emb, &corpus_emb, opts, show_progress)?;
    report.corpus_cached = corpus_cached;
    Ok((mined, report))
}

/// The query of every group of `data`, in group order: the texts whose embeddings `mine_embedded`
/// takes as `query_emb`.
pub(crate) fn query_texts(data: &Dataset) -> Vec<&str> {
    (0..data.len()).map(|g| data.text(data.query(g))).collect()
}

/// The most positives a group of `data` has.
pub(crate) fn max_positives(data: &Dataset) -> usize {
    (0..data.len())
        .map(|g| data.positives(g).len())
        .max()
        .unwrap_or(0)
}

/// Mines every group of `data` from embeddings already made: `query_emb` of `query_texts(data)`
/// and `corpus_emb` of `corpus.texts`, unit rows on one device (in a cluster the workers embed
/// them; `mine` embeds them itself).
pub(crate) fn mine_embedded(
    data: &Dataset,
    corpus: &Corpus<'_>,
    query_emb: &Tensor,
    corpus_emb: &Tensor,
    opts: &MineOptions,
    show_progress: bool,
) -> Result<(Mined, MineReport)> {
    let max_positives = max_positives(data);
    check_inputs(data, query_emb, corpus_emb, opts)?;
    let range_max = opts.range_max(max_positives);
    let mut report = MineReport {
        queries: data.len() as u64,
        positives: data.pair_count() as u64,
        corpus: corpus.texts.len() as u64,
        range_max: range_max as u64,
        ..Default::default()
    };
    // A query's own text and its positives can be anywhere among its best candidates: look that
    // much further.
    let k = range_max + max_positives + 1;
    let progress = bar(data.len() as u64, "search", show_progress);
    let ranked = search::top_k(query_emb, corpus_emb, k, |n| progress.inc(n));
    progress.finish_and_clear();

    let mut mined = Vec::with_capacity(data.len());
    for (g, candidates) in ranked.iter().enumerate() {
        let own: Vec<u64> = std::iter::once(data.hash(data.query(g)))
            .chain(data.positives(g).iter().map(|&p| data.hash(p)))
            .collect();
        let positive_rows: Vec<i64> = data
            .positives(g)
            .iter()
            .map(|&p| corpus.by_hash[&data.hash(p)] as i64)
            .collect();
        let weakest = weakest_positive(&query_emb.get(g as i64), corpus_emb, &positive_rows);
        let picked = select::select(
            candidates,
            |i| own.contains(&corpus.hashes[i as usize]),
            weakest,
            opts,
            range_max,
            mix_seed(&[opts.seed, g as u64]),
            &mut report.skipped,
        );
        report.negatives_mined += picked.len() as u64;
        report.queries_short += u64::from(picked.len() < opts.num_negatives);
        report.queries_without += u64::from(picked.is_empty());
        mined.push(
            picked
                .into_iter()
                .map(|(i, _)| corpus.texts[i as usize].to_string())
                .collect(),
        );
    }
    let clusters = opts
        .clusters
        .map(|k| cluster_queries(query_emb, k, opts.seed, &mut report));
    let mined = Mined {
        negatives: mined,
        clusters,
    };
    Ok((mined, report))
}

/// Refuses options out of range, embeddings of unequal dimension, and more clusters than queries.
fn check_inputs(
    data: &Dataset,
    query_emb: &Tensor,
    corpus_emb: &Tensor,
    opts: &MineOptions,
) -> Result<()> {
    opts.validate().map_err(Error::Usage)?;
    let (q, c) = (query_emb.size(), corpus_emb.size());
    if q.get(1) != c.get(1) {
        return Err(Error::Usage(format!(
            "query embeddings of shape {q:?} and corpus embeddings of shape {c:?} differ in \
             dimension (a corrupt embedding cache file?)"
        )));
    }
    if let Some(k) = opts.clusters
        && k > data.len()
    {
        return Err(Error::Usage(format!(
            "cannot cluster {} queries into clusters = {k}: lower clusters",
            data.len()
        )));
    }
    Ok(())
}

/// The similarity of `query` to its least similar positive (the corpus rows `positive_rows`):
/// what a negative may not exceed.
fn weakest_positive(query: &Tensor, corpus_emb: &Tensor, positive_rows: &[i64]) -> f32 {
    tch::no_grad(|| {
        corpus_emb
            .index_select(
                0,
                &Tensor::from_slice(positive_rows).to_device(corpus_emb.device()),
            )
            .matmul(&query.unsqueeze(1))
            .min()
            .double_value(&[])
    }) as f32
}

/// The queries' topic labels from a spherical k-means into `k` clusters, reported in `report`.
fn cluster_queries(query_emb: &Tensor, k: usize, seed: u64, report: &mut MineReport) -> Vec<u32> {
    let c = kmeans::cluster(query_emb, k, seed);
    let sizes = c.sizes(k);
    report.clusters = Some(ClusterReport {
        count: k as u64,
        smallest: sizes.iter().copied().min().unwrap_or(0),
        largest: sizes.iter().copied().max().unwrap_or(0),
        rounds: c.rounds as u64,
    });
    c.labels
}

#[derive(Serialize)]
struct GroupLine<'a> {
    query: &'a str,
    positives: Vec<&'a str>,
    negatives: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<Cluster>,
}

/// Writes every group of `data` with its negatives — those the input listed, then the mined ones not
/// already among them — and its cluster — the mined one, else the input's label — as query-grouped
/// JSONL, atomically.
pub(crate) fn write_groups(path: &Path, data: &Dataset, mined: &Mined) -> Result<()> {
    let mut out = AtomicFile::create(path)?;
    for (g, extra) in mined.negatives.iter().enumerate() {
        let mut negatives: Vec<&str> = data.negatives(g).iter().map(|&n| data.text(n)).collect();
        let mut seen: Vec<u64> = data.negatives(g).iter().map(|&n| data.hash(n)).collect();
        for t in extra {
            let h = hash_normalized(&normalize(t));
            if !seen.contains(&h) {
                seen.push(h);
                negatives.push(t);
            }
        }
        let line = GroupLine {
            query: data.text(data.query(g)),
            positives: data.positives(g).iter().map(|&p| data.text(p)).collect(),
            negatives,
            cluster: match &mined.clusters {
                Some(labels) => Some(Cluster::Id(u64::from(labels[g]))),
                None => data.cluster(g).map(|c| data.cluster_label(c).clone()),
            },
        };
        serde_json::to_writer(out.writer(), &line)
            .map_err(|e| Error::io("write", path)(e.into()))?;
        std::io::Write::write_all(out.writer(), b"\n").map_err(Error::io("write", path))?;
    }
    out.commit()
}
