//! multipos's objectives vs. sentence-transformers: MNRL with hardness weighting, CosineSimilarityLoss,
//! CoSENTLoss and SoftmaxLoss, value and gradient w.r.t. every embedding (and the classifier), from
//! the fixture made by `tests/reference/make_objective_fixture.py`.
mod common;

use multipos::loss::{
    CoSentConfig, CosineConfig, HardnessMode, MnrlConfig, Objective, SoftmaxConfig, SoftmaxHead,
    Targets,
};
use serde::Deserialize;
use tch::{Device, Tensor};

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: String,
    inputs: Vec<Vec<Vec<f64>>>,
    loss: f64,
    grads: Vec<Vec<Vec<f64>>>,
    #[serde(default)]
    hardness_mode: Option<HardnessMode>,
    #[serde(default)]
    hardness_strength: f64,
    #[serde(default)]
    symmetric: bool,
    #[serde(default)]
    scores: Vec<f32>,
    #[serde(default)]
    labels: Vec<i64>,
    #[serde(default)]
    num_labels: usize,
    #[serde(default)]
    multiplication: bool,
    #[serde(default)]
    weight: Vec<Vec<f64>>,
    #[serde(default)]
    bias: Vec<f64>,
    #[serde(default)]
    weight_grad: Vec<Vec<f64>>,
    #[serde(default)]
    bias_grad: Vec<f64>,
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

use common::tensor_f64_rows as tensor;

fn max_diff(got: &Tensor, want: &[Vec<f64>]) -> f64 {
    let got = Vec::<f32>::try_from(got.reshape([-1])).unwrap();
    got.iter()
        .zip(want.iter().flatten())
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
}

fn objective(case: &Case) -> (Objective, Targets) {
    match case.kind.as_str() {
        "mnrl" => (
            Objective::Mnrl {
                cfg: MnrlConfig {
                    scale: 20.0,
                    symmetric: case.symmetric,
                    hardness_mode: case.hardness_mode,
                    hardness_strength: case.hardness_strength,
                },
                multi_positive: false,
            },
            Targets::Groups((0..case.inputs[0].len() as u32).collect()),
        ),
        "cosine_similarity" => (
            Objective::CosineSimilarity(CosineConfig::default()),
            Targets::Scores(case.scores.clone()),
        ),
        "cosent" => (
            Objective::Cosent(CoSentConfig::default()),
            Targets::Scores(case.scores.clone()),
        ),
        "softmax" => {
            let cfg = SoftmaxConfig {
                concatenation_sent_multiplication: case.multiplication,
                ..Default::default()
            };
            let labels = (0..case.num_labels).map(|i| i.to_string()).collect();
            let head =
                SoftmaxHead::new(cfg, case.inputs[0][0].len() as i64, labels, Device::Cpu, 0);
            for (name, mut var) in head.parameters() {
                let value = if name.ends_with("weight") {
                    tensor(&case.weight)
                } else {
                    tensor(std::slice::from_ref(&case.bias)).view([-1])
                };
                tch::no_grad(|| var.copy_(&value));
            }
            (
                Objective::Softmax(head),
                Targets::Labels(case.labels.clone()),
            )
        }
        other => panic!("unknown case kind {other}"),
    }
}

#[test]
fn objectives_match_sentence_transformers() {
    let fx: Fixture = serde_json::from_str(include_str!("fixtures/objectives.json")).unwrap();
    assert_eq!(fx.cases.len(), 8);
    for case in &fx.cases {
        let leaves: Vec<Tensor> = case
            .inputs
            .iter()
            .map(|m| tensor(m).set_requires_grad(true))
            .collect();
        let (obj, targets) = objective(case);
        let loss = obj.loss(&leaves, &targets).unwrap();
        let value = loss.double_value(&[]);
        assert!(
            (value - case.loss).abs() <= 1e-5 * case.loss.abs().max(1.0),
            "{}: loss {value} vs {}",
            case.name,
            case.loss
        );
        loss.backward();
        for (i, (leaf, want)) in leaves.iter().zip(&case.grads).enumerate() {
            let d = max_diff(&leaf.grad(), want);
            assert!(
                d <= 1e-5,
                "{}: gradient of input {i} differs by {d}",
                case.name
            );
        }
        for (name, var) in obj.parameters() {
            let want = if name.ends_with("weight") {
                case.weight_grad.clone()
            } else {
                vec![case.bias_grad.clone()]
            };
            let d = max_diff(&var.grad(), &want);
            assert!(
                d <= 1e-5,
                "{}: gradient of {name} differs by {d}",
                case.name
            );
        }
    }
}
