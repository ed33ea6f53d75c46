"""Derives scored and labelled pair files from a bundled query-grouped Bible split, for the pointwise
losses (CosineSimilarityLoss, CoSENT, SoftmaxLoss). Standard library only; deterministic.

    python3 deploy/data/make_pairs.py deploy/data/bible_paraphrase_tiny
    python3 deploy/data/make_pairs.py deploy/data/bible_paraphrase_small

From train.jsonl ({"query": WEB verse, "positives": [KJV, ASV]}) it writes:
- scored_pairs.jsonl {"sentence1", "sentence2", "score"}: each verse with its KJV rendering, score 1.0
  (a paraphrase), and with the KJV rendering of a verse drawn at random, scored by the word-set
  Jaccard overlap of the two WEB verses (0.0 to about 0.4): graded similarity, in [0, 1].
- labelled_pairs.jsonl {"premise", "hypothesis", "label"}: each verse with its ASV rendering labelled
  "paraphrase", and with the ASV rendering of a random other verse labelled "unrelated".
All texts stay public domain (WEB, KJV, ASV).
"""
import json
import random
import re
import sys
from pathlib import Path


def words(text):
    return set(re.findall(r"[a-z']+", text.lower()))


def jaccard(a, b):
    a, b = words(a), words(b)
    return len(a & b) / len(a | b) if a | b else 0.0


def main(folder):
    folder = Path(folder)
    groups = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    scored, labelled = [], []
    for i, g in enumerate(groups):
        kjv, asv = g["positives"][0], g["positives"][-1]
        j = rng.randrange(len(groups) - 1)
        other = groups[j + (j >= i)]
        scored.append({"sentence1": g["query"], "sentence2": kjv, "score": 1.0})
        scored.append({"sentence1": g["query"], "sentence2": other["positives"][0],
                       "score": round(jaccard(g["query"], other["query"]), 4)})
        labelled.append({"premise": g["query"], "hypothesis": asv, "label": "paraphrase"})
        labelled.append({"premise": g["query"], "hypothesis": other["positives"][-1], "label": "unrelated"})
    for name, rows in (("scored_pairs.jsonl", scored), ("labelled_pairs.jsonl", labelled)):
        with open(folder / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
