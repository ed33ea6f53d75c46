"""Writes tests/fixtures/ir_metrics.json: sentence-transformers InformationRetrievalEvaluator metrics on
fixed random embeddings (with exact score ties, queries without relevant documents, and relevant
documents outside the top 100).

    python tests/reference/make_ir_fixture.py tests/fixtures/ir_metrics.json
"""
import json
import random
import sys

import sentence_transformers
import torch
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import cos_sim


def main(out_path):
    rng = random.Random(7)
    torch.manual_seed(7)
    n_queries, n_corpus, dim = 40, 300, 12
    q_emb = torch.randn(n_queries, dim)
    c_emb = torch.randn(n_corpus, dim)
    # Exact ties: copies of other documents, and queries that equal a document.
    for dst, src in [(11, 10), (12, 10), (57, 3), (200, 199)]:
        c_emb[dst] = c_emb[src]
    for qi, ci in [(0, 10), (5, 57), (9, 199)]:
        q_emb[qi] = c_emb[ci]
    query_ids = [f"q{i}" for i in range(n_queries)]
    corpus_ids = [f"d{i:03d}" if i % 7 else f"doc-{i}" for i in range(n_corpus)]
    relevant = {}
    for i, qid in enumerate(query_ids):
        if i % 9 == 4:
            continue  # no relevant document: skipped by the evaluator
        relevant[qid] = set(rng.sample(corpus_ids, rng.randint(1, 5)))
    relevant["q0"] |= {corpus_ids[11], corpus_ids[12]}
    # Pull most relevant documents towards their query so the metrics land mid-range.
    tied = {3, 10, 11, 12, 57, 199, 200}
    for qi, qid in enumerate(query_ids):
        for cid in sorted(relevant.get(qid, ())):
            ci = corpus_ids.index(cid)
            if ci not in tied and rng.random() < 0.8:
                c_emb[ci] = q_emb[qi] + 1.2 * torch.randn(dim)

    evaluator = InformationRetrievalEvaluator(
        queries={qid: f"query {qid}" for qid in query_ids},
        corpus={cid: f"doc {cid}" for cid in corpus_ids},
        relevant_docs=relevant,
        score_functions={"cosine": cos_sim},
        corpus_chunk_size=64,
        write_csv=False,
    )
    q_index = {f"query {qid}": i for i, qid in enumerate(query_ids)}
    c_index = {f"doc {cid}": i for i, cid in enumerate(corpus_ids)}

    def embed_inputs(model, inputs, encode_fn_name=None, **kwargs):
        if encode_fn_name == "query":
            return q_emb[[q_index[t] for t in inputs]]
        return c_emb[[c_index[t] for t in inputs]]

    evaluator.embed_inputs = embed_inputs
    scores = evaluator.compute_all_metrics(model=None)["cosine"]
    metrics = {
        name.replace("@k", f"@{k}"): float(value)
        for name, per_k in scores.items()
        for k, value in per_k.items()
    }
    fixture = {
        "versions": {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__},
        "queries": [{"id": qid, "embedding": q_emb[i].tolist()} for i, qid in enumerate(query_ids)],
        "corpus": [{"id": cid, "embedding": c_emb[i].tolist()} for i, cid in enumerate(corpus_ids)],
        "qrels": {qid: sorted(docs) for qid, docs in relevant.items()},
        "metrics": metrics,
    }
    with open(out_path, "w") as f:
        json.dump(fixture, f)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
