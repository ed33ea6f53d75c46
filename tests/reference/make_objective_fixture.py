"""Writes tests/fixtures/objectives.json: sentence-transformers' losses on seeded random embeddings, with
the loss value and its gradient w.r.t. every embedding (and, for SoftmaxLoss, the classifier's weight and
bias), for the objectives beyond plain MNRL that multipos implements.

    python tests/reference/make_objective_fixture.py tests/fixtures/objectives.json

Cases: MNRL with hardness weighting in each mode (two hard-negative columns); MNRL symmetric with
hardness; CosineSimilarityLoss (MSE); CoSENTLoss with tied scores; SoftmaxLoss with and without u*v.
Versions are pinned in tests/reference/requirements.txt and recorded in the fixture.
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers.sentence_transformer.losses import (
    CoSENTLoss,
    CosineSimilarityLoss,
    MultipleNegativesRankingLoss,
    SoftmaxLoss,
)


class _NoModel(torch.nn.Module):
    """The losses' compute_loss_from_embeddings never touch the model (SoftmaxLoss asks its device)."""

    device = torch.device("cpu")


def run(loss_fn, embeddings, labels=None, extra=()):
    leaves = [e.clone().requires_grad_(True) for e in embeddings]
    loss = loss_fn.compute_loss_from_embeddings(leaves, labels)
    loss.backward()
    grads = [leaf.grad.tolist() for leaf in leaves] + [p.grad.tolist() for p in extra]
    return loss.item(), grads


def softmax_case(u, v, labels, num_labels, multiplication):
    torch.manual_seed(99)
    loss_fn = SoftmaxLoss(_NoModel(), embedding_dimension=u.shape[1], num_labels=num_labels,
                          concatenation_sent_multiplication=multiplication).double()
    weight, bias = loss_fn.classifier.weight, loss_fn.classifier.bias
    uu, vv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    # SoftmaxLoss.forward embeds its inputs itself; its body after that is reproduced by calling it
    # with a stand-in model that hands back the given embeddings.
    class Given(torch.nn.Module):
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, features):
            out = [uu, vv][self.i]
            self.i += 1
            return {"sentence_embedding": out}

    loss_fn.model = Given()
    loss = loss_fn([{}, {}], labels)
    loss.backward()
    return {
        "kind": "softmax", "multiplication": multiplication, "num_labels": num_labels,
        "inputs": [u.tolist(), v.tolist()], "labels": labels.tolist(),
        "weight": weight.tolist(), "bias": bias.tolist(), "loss": loss.item(),
        "grads": [uu.grad.tolist(), vv.grad.tolist()], "weight_grad": weight.grad.tolist(),
        "bias_grad": bias.grad.tolist(),
    }


def main(out_path):
    torch.manual_seed(4321)
    b, d = 8, 16
    q, p, n1, n2 = (torch.randn(b, d, dtype=torch.float64) for _ in range(4))
    cases = []
    for mode, alpha in [("in_batch_negatives", 9.0), ("hard_negatives", 5.0), ("all_negatives", 5.0)]:
        value, grads = run(MultipleNegativesRankingLoss(_NoModel(), hardness_mode=mode, hardness_strength=alpha),
                           [q, p, n1, n2])
        cases.append({"kind": "mnrl", "name": f"hardness {mode}", "hardness_mode": mode, "hardness_strength": alpha,
                      "symmetric": False, "inputs": [x.tolist() for x in (q, p, n1, n2)], "loss": value,
                      "grads": grads})
    value, grads = run(MultipleNegativesRankingLoss(_NoModel(), directions=("query_to_doc", "doc_to_query"),
                                                    partition_mode="per_direction", hardness_mode="all_negatives",
                                                    hardness_strength=5.0), [q, p, n1])
    cases.append({"kind": "mnrl", "name": "symmetric hardness", "hardness_mode": "all_negatives",
                  "hardness_strength": 5.0, "symmetric": True, "inputs": [x.tolist() for x in (q, p, n1)],
                  "loss": value, "grads": grads})

    scores = torch.rand(b, dtype=torch.float64)
    # CosineSimilarityLoss casts the scores to float32, so this case runs in float32.
    value, grads = run(CosineSimilarityLoss(_NoModel()), [q.float(), p.float()], scores.float())
    cases.append({"kind": "cosine_similarity", "name": "cosine mse", "inputs": [q.tolist(), p.tolist()],
                  "scores": scores.tolist(), "loss": value, "grads": grads})
    tied = torch.tensor([0.0, 1.0, 0.5, 0.5, 2.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    value, grads = run(CoSENTLoss(_NoModel()), [q, p], tied)
    cases.append({"kind": "cosent", "name": "cosent with ties", "inputs": [q.tolist(), p.tolist()],
                  "scores": tied.tolist(), "loss": value, "grads": grads})

    labels = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1])
    cases.append({"name": "softmax", **softmax_case(q, p, labels, 3, False)})
    cases.append({"name": "softmax with u*v", **softmax_case(q, p, labels, 4, True)})

    fixture = {
        "versions": {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__},
        "cases": cases,
    }
    with open(out_path, "w") as f:
        json.dump(fixture, f)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
