//! multipos vs. Python sentence-transformers on all-MiniLM-L6-v2, from the committed fixture made by
//! `tests/reference/make_embedding_fixture.py`.
mod common;

use multipos::SentenceModel;
use serde::Deserialize;
use tch::Device;

#[derive(Deserialize)]
struct Fixture {
    texts: Vec<String>,
    embeddings: Vec<Vec<f32>>,
    token_counts: Vec<usize>,
    max_seq_length: usize,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("fixtures/minilm_embeddings.json")).unwrap()
}

fn assert_matches(got: &[Vec<f32>], fx: &Fixture, what: &str) {
    assert_eq!(got.len(), fx.embeddings.len());
    for (i, (g, want)) in got.iter().zip(&fx.embeddings).enumerate() {
        assert_eq!(g.len(), want.len());
        let max_diff = g
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let dot: f64 = g.iter().zip(want).map(|(a, b)| *a as f64 * *b as f64).sum();
        let na: f64 = g.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        assert!(
            max_diff <= 1e-5 && cos >= 0.99999,
            "{what}: text {i} {:?}: max |Δ| {max_diff:e}, cosine {cos}",
            fx.texts[i].chars().take(40).collect::<String>()
        );
    }
}

#[test]
fn embeddings_match_sentence_transformers_and_survive_save_reload() {
    tch::set_num_threads(2);
    let fx = fixture();
    let model = SentenceModel::load(&common::minilm_dir(), Device::Cpu).unwrap();
    assert_eq!(model.max_seq_length(), fx.max_seq_length);
    let texts: Vec<&str> = fx.texts.iter().map(String::as_str).collect();
    assert_eq!(
        model.tokenizer().lengths(&texts).unwrap(),
        fx.token_counts,
        "token counts differ"
    );

    let first = common::rows(&model.embed(&texts, 8).unwrap());
    assert_matches(&first, &fx, "loaded");
    // Two threads embed in two single-threaded streams; one thread in one stream, the same bits.
    tch::set_num_threads(1);
    let one_stream = common::rows(&model.embed(&texts, 8).unwrap());
    tch::set_num_threads(2);
    assert_eq!(first, one_stream, "streams changed the embeddings");

    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved");
    model.save(&saved).unwrap();
    let reloaded = SentenceModel::load(&saved, Device::Cpu).unwrap();
    let again = common::rows(&reloaded.embed(&texts, 8).unwrap());
    assert_matches(&again, &fx, "saved and reloaded");
    assert_eq!(
        first, again,
        "reloaded model must give bit-identical embeddings"
    );

    for (name, var) in model.var_store().variables() {
        let other = &reloaded.var_store().variables()[&name];
        assert!(
            var.equal(other),
            "parameter {name} changed in the round trip"
        );
    }
}

#[test]
fn batch_composition_does_not_change_embeddings() {
    tch::set_num_threads(2);
    let fx = fixture();
    let model = SentenceModel::load(&common::minilm_dir(), Device::Cpu).unwrap();
    let texts: Vec<&str> = fx.texts.iter().map(String::as_str).collect();
    let one_by_one: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| common::rows(&model.embed(&[t], 1).unwrap()).remove(0))
        .collect();
    assert_matches(&one_by_one, &fx, "batch size 1");
}
