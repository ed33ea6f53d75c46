"""Writes tests/fixtures/mnrl_loss.json: sentence-transformers MultipleNegativesRankingLoss values and
gradients w.r.t. the embeddings, on seeded random embeddings.

    python tests/reference/make_loss_fixture.py tests/fixtures/mnrl_loss.json

Cases: plain (anchor, positive); with two hard-negative columns; symmetric (query_to_doc + doc_to_query,
per_direction, the successor of MultipleNegativesSymmetricRankingLoss). The multi-positive masked form
has no sentence-transformers counterpart; its reference is written out below in plain torch.
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss


class _NoModel(torch.nn.Module):
    """MNRL only needs a model for its forward(); compute_loss_from_embeddings never touches it."""


def st_loss(embeddings, **kwargs):
    loss_fn = MultipleNegativesRankingLoss(_NoModel(), scale=20.0, **kwargs)
    leaves = [e.clone().requires_grad_(True) for e in embeddings]
    loss = loss_fn.compute_loss_from_embeddings(leaves, labels=None)
    loss.backward()
    return loss.item(), [leaf.grad.tolist() for leaf in leaves]


def masked_multi_positive(q, docs, groups, scale=20.0):
    """Row i's positive is docs[0][i]; other positives of the same group are removed from its softmax."""
    q = q.clone().requires_grad_(True)
    docs = [d.clone().requires_grad_(True) for d in docs]
    cand = torch.cat(docs, 0)
    scores = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(cand, dim=1).T * scale
    b = q.shape[0]
    g = torch.tensor(groups)
    same = (g[:, None] == g[None, :]) & ~torch.eye(b, dtype=torch.bool)
    mask = torch.cat([same] + [torch.zeros(b, b, dtype=torch.bool)] * (len(docs) - 1), 1)
    scores = scores.masked_fill(mask, float("-inf"))
    loss = torch.nn.functional.cross_entropy(scores, torch.arange(b))
    loss.backward()
    return loss.item(), [q.grad.tolist()] + [d.grad.tolist() for d in docs]


def main(out_path):
    torch.manual_seed(1234)
    b, d = 8, 16
    q, p, n1, n2 = (torch.randn(b, d, dtype=torch.float64) for _ in range(4))
    cases = []
    value, grads = st_loss([q, p])
    cases.append({"name": "plain", "inputs": [q.tolist(), p.tolist()], "loss": value, "grads": grads})
    value, grads = st_loss([q, p, n1, n2])
    cases.append({"name": "negatives", "inputs": [x.tolist() for x in (q, p, n1, n2)], "loss": value, "grads": grads})
    value, grads = st_loss([q, p], directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    cases.append({"name": "symmetric", "inputs": [q.tolist(), p.tolist()], "loss": value, "grads": grads})
    groups = [0, 0, 1, 2, 2, 2, 3, 4]
    value, grads = masked_multi_positive(q, [p, n1], groups)
    cases.append({"name": "multi_positive", "inputs": [q.tolist(), p.tolist(), n1.tolist()], "groups": groups,
                  "loss": value, "grads": grads})
    fixture = {
        "versions": {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__},
        "scale": 20.0,
        "cases": cases,
    }
    with open(out_path, "w") as f:
        json.dump(fixture, f)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
