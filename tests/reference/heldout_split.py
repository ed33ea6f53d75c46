"""Splits InsuranceQA's training questions for an honest comparison (issue 32): a `choose` split,
held out by question, on which recipes and learning rates are chosen, and the rest to train on.
The reported numbers come from the data set's own dev split, which no choice looks at.

    python tests/reference/heldout_split.py ../shared/data/insuranceqa OUT [--choose 1500] [--seed 0]

Writes OUT/train.jsonl (the training questions left, in their original order), OUT/choose_queries.jsonl
and OUT/choose_qrels.tsv (the held-out questions, their answers relevant), OUT/corpus.jsonl (the
source corpus, plus any held-out answer it lacks: none in the full InsuranceQA, whose corpus holds
every answer; the small samples lack some) and OUT/split.json (counts, the seed, and a hash of each
file). The dev split is used as it is in the source folder, against the source corpus.
"""
import argparse
import hashlib
import json
import os
import random


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--choose", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    groups = read_jsonl(os.path.join(a.source, "train.jsonl"))
    corpus = read_jsonl(os.path.join(a.source, "corpus.jsonl"))
    doc_id = {}
    for d in corpus:
        doc_id.setdefault(d["text"], str(d["id"]))
    order = list(range(len(groups)))
    random.Random(a.seed).shuffle(order)
    held = set(order[: a.choose])
    os.makedirs(a.out, exist_ok=True)
    train_path = os.path.join(a.out, "train.jsonl")
    with open(train_path, "w", encoding="utf-8") as f:
        for i, g in enumerate(groups):
            if i not in held:
                f.write(json.dumps(g, ensure_ascii=False) + "\n")
    queries_path = os.path.join(a.out, "choose_queries.jsonl")
    qrels_path = os.path.join(a.out, "choose_qrels.tsv")
    added = []
    with open(queries_path, "w", encoding="utf-8") as q, open(qrels_path, "w", encoding="utf-8") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for i in sorted(held):
            g = groups[i]
            qid = f"choose-{i}"
            q.write(json.dumps({"id": qid, "text": g["query"]}, ensure_ascii=False) + "\n")
            for p in g["positives"]:
                if p not in doc_id:
                    doc_id[p] = f"choose-doc-{len(added)}"
                    added.append({"id": doc_id[p], "text": p})
                r.write(f"{qid}\t{doc_id[p]}\t1\n")
    corpus_path = os.path.join(a.out, "corpus.jsonl")
    with open(corpus_path, "w", encoding="utf-8") as f:
        for d in corpus + added:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    split = {
        "source": os.path.basename(os.path.normpath(a.source)),
        "seed": a.seed,
        "train_questions": len(groups) - len(held),
        "choose_questions": len(held),
        "answers_added_to_corpus": len(added),
        "sha256": {os.path.basename(p): sha(p) for p in [train_path, queries_path, qrels_path, corpus_path]},
    }
    with open(os.path.join(a.out, "split.json"), "w") as f:
        json.dump(split, f, indent=1)
    print(json.dumps(split))


if __name__ == "__main__":
    main()
