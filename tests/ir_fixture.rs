//! multipos IR metrics vs. sentence-transformers' InformationRetrievalEvaluator on fixed embeddings
//! with score ties (fixture from `tests/reference/make_ir_fixture.py`).
use std::collections::{BTreeMap, BTreeSet};

use multipos::eval::{IrConfig, ir_metrics};
use serde::Deserialize;
use tch::Tensor;

#[derive(Deserialize)]
struct Item {
    id: String,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct Fixture {
    queries: Vec<Item>,
    corpus: Vec<Item>,
    qrels: BTreeMap<String, Vec<String>>,
    metrics: BTreeMap<String, f64>,
}

fn matrix(items: &[&Item]) -> Tensor {
    let flat: Vec<f32> = items
        .iter()
        .flat_map(|i| i.embedding.iter().copied())
        .collect();
    Tensor::from_slice(&flat).view([items.len() as i64, -1])
}

#[test]
fn metrics_match_sentence_transformers() {
    let fx: Fixture = serde_json::from_str(include_str!("fixtures/ir_metrics.json")).unwrap();
    let kept: Vec<&Item> = fx
        .queries
        .iter()
        .filter(|q| fx.qrels.contains_key(&q.id))
        .collect();
    assert!(
        kept.len() < fx.queries.len(),
        "the fixture has queries without relevant documents"
    );
    let corpus_ids: Vec<String> = fx.corpus.iter().map(|c| c.id.clone()).collect();
    let relevant: Vec<BTreeSet<usize>> = kept
        .iter()
        .map(|q| {
            fx.qrels[&q.id]
                .iter()
                .map(|d| corpus_ids.iter().position(|c| c == d).unwrap())
                .collect()
        })
        .collect();
    let corpus: Vec<&Item> = fx.corpus.iter().collect();
    let got = ir_metrics(
        &matrix(&kept),
        &matrix(&corpus),
        &relevant,
        &corpus_ids,
        &IrConfig::default(),
    );
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        fx.metrics.keys().collect::<Vec<_>>()
    );
    for (name, want) in &fx.metrics {
        assert!(
            (got[name] - want).abs() <= 1e-6,
            "{name}: {} vs {want}",
            got[name]
        );
    }
}
