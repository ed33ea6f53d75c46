//! Retrieval evaluation: BEIR-style data and sentence-transformers' IR metrics.
pub mod data;
pub mod ir;

use std::collections::BTreeMap;

pub use data::IrDataset;
pub use ir::{IrConfig, ir_metrics};

use crate::error::Result;
use crate::model::{Role, SentenceModel};

/// Embeds queries and corpus with `model` (each with its prompt, as sentence-transformers'
/// evaluator does) and computes the metrics.
pub fn evaluate(
    model: &SentenceModel,
    set: &IrDataset,
    batch_size: usize,
    cfg: &IrConfig,
) -> Result<BTreeMap<String, f64>> {
    let queries: Vec<&str> = set.queries.iter().map(String::as_str).collect();
    let corpus: Vec<&str> = set.corpus.iter().map(String::as_str).collect();
    let q = model.embed_as(&queries, Role::Query, batch_size)?;
    let c = model.embed_as(&corpus, Role::Document, batch_size)?;
    Ok(ir_metrics(&q, &c, &set.relevant, &set.corpus_ids, cfg))
}
