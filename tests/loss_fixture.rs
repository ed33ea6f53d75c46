//! multipos MNRL vs. sentence-transformers: loss value and gradients w.r.t. every embedding, from
//! the fixture made by `tests/reference/make_loss_fixture.py`.
mod common;

use multipos::loss::{MnrlConfig, mnrl_loss};
use serde::Deserialize;
use tch::Tensor;

#[derive(Deserialize)]
struct Case {
    name: String,
    inputs: Vec<Vec<Vec<f64>>>,
    groups: Option<Vec<u32>>,
    loss: f64,
    grads: Vec<Vec<Vec<f64>>>,
}

#[derive(Deserialize)]
struct Fixture {
    scale: f64,
    cases: Vec<Case>,
}

use common::tensor_f64_rows as tensor;

#[test]
fn loss_and_gradients_match_sentence_transformers() {
    let fx: Fixture = serde_json::from_str(include_str!("fixtures/mnrl_loss.json")).unwrap();
    assert_eq!(fx.cases.len(), 4);
    for case in &fx.cases {
        let leaves: Vec<Tensor> = case
            .inputs
            .iter()
            .map(|m| tensor(m).set_requires_grad(true))
            .collect();
        let cfg = MnrlConfig {
            scale: fx.scale,
            symmetric: case.name == "symmetric",
            ..MnrlConfig::default()
        };
        let loss = mnrl_loss(&leaves[0], &leaves[1..], case.groups.as_deref(), &cfg);
        let value = loss.double_value(&[]);
        assert!(
            (value - case.loss).abs() <= 1e-5 * case.loss.abs().max(1.0),
            "{}: loss {value} vs {}",
            case.name,
            case.loss
        );
        loss.backward();
        for (i, (leaf, want)) in leaves.iter().zip(&case.grads).enumerate() {
            let got = Vec::<Vec<f32>>::try_from(&leaf.grad()).unwrap();
            let max = got
                .iter()
                .flatten()
                .zip(want.iter().flatten())
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(
                max <= 1e-5,
                "{}: gradient of input {i} differs by {max}",
                case.name
            );
        }
    }
}
