"""sentence-transformers' mine_hard_negatives on a query-grouped JSONL file (expanded to (anchor, positive)
pairs), timed; used by benches/mine.rs.

    python tests/reference/mine_st.py --model DIR --train train.jsonl [--num-negatives 3]
        [--relative-margin M] [--batch-size 32] [--max-seq-length 128] [--threads 2]

Prints one JSON line: seconds, rows (output triplets), queries (distinct anchors in the output).
"""
import argparse
import json
import time

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--relative-margin", type=float)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.max_seq_length
    anchors, positives = [], []
    with open(args.train, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                g = json.loads(line)
                for pos in g["positives"]:
                    anchors.append(g["query"])
                    positives.append(pos)
    dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
    start = time.perf_counter()
    out = mine_hard_negatives(dataset, model, num_negatives=args.num_negatives, relative_margin=args.relative_margin,
                              batch_size=args.batch_size, verbose=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rows": len(out), "queries": len(set(out["anchor"]))}))


if __name__ == "__main__":
    main()
