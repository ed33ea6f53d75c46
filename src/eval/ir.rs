//! Retrieval metrics with sentence-transformers' `InformationRetrievalEvaluator` definitions:
//! cosine scores, ranking by (score descending, corpus id ascending), binary relevance.
//!
//! For a query with relevant set R and ranked list h_1..h_k:
//! accuracy@k = [any h_i ∈ R]; precision@k = |R ∩ top k| / k; recall@k = |R ∩ top k| / |R|;
//! MRR@k = 1 / (first rank in R) or 0; NDCG@k = Σ_i [h_i ∈ R] / log2(i+1) divided by the same sum for
//! min(|R|, k) hits; MAP@k = Σ_{i: h_i ∈ R} (hits up to i / i) / min(k, |R|). Each is averaged over
//! the queries that have at least one relevant document.
use std::collections::{BTreeMap, BTreeSet};

use tch::Tensor;

use crate::model::pooling::normalize_l2;

/// Which cut-offs to report (sentence-transformers' defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrConfig {
    pub accuracy_at: Vec<usize>,
    pub precision_recall_at: Vec<usize>,
    pub mrr_at: Vec<usize>,
    pub ndcg_at: Vec<usize>,
    pub map_at: Vec<usize>,
}

impl Default for IrConfig {
    fn default() -> Self {
        Self {
            accuracy_at: vec![1, 3, 5, 10],
            precision_recall_at: vec![1, 3, 5, 10],
            mrr_at: vec![10],
            ndcg_at: vec![10],
            map_at: vec![100],
        }
    }
}

impl IrConfig {
    fn max_k(&self) -> usize {
        [
            &self.accuracy_at,
            &self.precision_recall_at,
            &self.mrr_at,
            &self.ndcg_at,
            &self.map_at,
        ]
        .iter()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(10)
    }
}

/// Top `k` corpus indices of one score row, by (score desc, corpus id asc).
fn top_k(scores: &[f32], corpus_ids: &[String], k: usize) -> Vec<usize> {
    let cmp = |a: &usize, b: &usize| {
        scores[*b]
            .total_cmp(&scores[*a])
            .then_with(|| corpus_ids[*a].cmp(&corpus_ids[*b]))
    };
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let k = k.min(idx.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

fn dcg(hits: impl Iterator<Item = bool>) -> f64 {
    hits.enumerate()
        .filter(|(_, h)| *h)
        .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
        .sum()
}

/// Metrics keyed like `"ndcg@10"`, from query (Q, d) and corpus (C, d) embeddings.
pub fn ir_metrics(
    query_emb: &Tensor,
    corpus_emb: &Tensor,
    relevant: &[BTreeSet<usize>],
    corpus_ids: &[String],
    cfg: &IrConfig,
) -> BTreeMap<String, f64> {
    let max_k = cfg.max_k();
    let corpus = normalize_l2(&corpus_emb.to_kind(tch::Kind::Float)).transpose(0, 1);
    let queries = normalize_l2(&query_emb.to_kind(tch::Kind::Float));
    let n_corpus = corpus_ids.len();
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut add = |name: String, v: f64| *sums.entry(name).or_default() += v;
    // Score a slice of queries at a time so a large corpus never needs a Q×C matrix at once.
    let chunk = (1 << 24) / n_corpus.max(1) + 1;
    let n_queries = relevant.len();
    for start in (0..n_queries).step_by(chunk) {
        let len = chunk.min(n_queries - start);
        let scores = queries
            .narrow(0, start as i64, len as i64)
            .matmul(&corpus)
            .to_device(tch::Device::Cpu)
            .contiguous();
        let mut flat = vec![0f32; len * n_corpus];
        scores.copy_data(&mut flat, len * n_corpus);
        for (row, rel) in flat
            .chunks_exact(n_corpus)
            .zip(&relevant[start..start + len])
        {
            let ranked = top_k(row, corpus_ids, max_k);
            let hit: Vec<bool> = ranked.iter().map(|i| rel.contains(i)).collect();
            let hits_at = |k: usize| hit.iter().take(k).filter(|h| **h).count() as f64;
            for &k in &cfg.accuracy_at {
                add(format!("accuracy@{k}"), f64::from(hits_at(k) > 0.0));
            }
            for &k in &cfg.precision_recall_at {
                add(format!("precision@{k}"), hits_at(k) / k as f64);
                add(format!("recall@{k}"), hits_at(k) / rel.len() as f64);
            }
            for &k in &cfg.mrr_at {
                let first = hit.iter().take(k).position(|h| *h);
                add(
                    format!("mrr@{k}"),
                    first.map_or(0.0, |r| 1.0 / (r + 1) as f64),
                );
            }
            for &k in &cfg.ndcg_at {
                let ideal = dcg(std::iter::repeat_n(true, rel.len().min(k)));
                add(
                    format!("ndcg@{k}"),
                    dcg(hit.iter().take(k).copied()) / ideal,
                );
            }
            for &k in &cfg.map_at {
                let mut correct = 0.0;
                let mut sum = 0.0;
                for (r, h) in hit.iter().take(k).enumerate() {
                    if *h {
                        correct += 1.0;
                        sum += correct / (r + 1) as f64;
                    }
                }
                add(format!("map@{k}"), sum / k.min(rel.len()) as f64);
            }
        }
    }
    sums.into_iter()
        .map(|(k, v)| (k, v / n_queries as f64))
        .collect()
}
