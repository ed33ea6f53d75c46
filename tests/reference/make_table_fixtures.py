"""Writes tests/fixtures/tables/: the bundled tiny Bible paraphrase data as Hugging Face `datasets`
writes tables (Parquet files and shards, a save_to_disk folder), each beside the JSONL that holds the
same records in the same order, and small tables with one flaw each for the error tests.

Run with the pinned versions of requirements.txt (datasets 5.2.0, pyarrow 26.0.1):
    python tests/reference/make_table_fixtures.py deploy/data/bible_paraphrase_tiny tests/fixtures/tables
"""
import json
import os
import shutil
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Features, List, Value


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(src, out):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    groups = read_jsonl(os.path.join(src, "train.jsonl"))
    # One listed negative per group (the next group's first positive) and a topic, so that every
    # role of a column is exercised.
    for i, g in enumerate(groups):
        g["negatives"] = [groups[(i + 1) % len(groups)]["positives"][0]]
        g["cluster"] = i % 4

    # Query groups in list columns under the user's own names, plus a column nobody asked for:
    # read with data.columns = { query = "question", positives = "answers", negatives = "hard_negs",
    # cluster = "topic" }.
    write_jsonl(os.path.join(out, "groups.jsonl"), groups)
    features = Features({
        "question": Value("string"),
        "answers": List(Value("string")),
        "hard_negs": List(Value("string")),
        "topic": Value("int64"),
        "source": Value("string"),
    })
    table = Dataset.from_dict({
        "question": [g["query"] for g in groups],
        "answers": [g["positives"] for g in groups],
        "hard_negs": [g["negatives"] for g in groups],
        "topic": [g["cluster"] for g in groups],
        "source": ["bible"] * len(groups),
    }, features=features)
    # Row groups of 16 rows: the readers must cross row-group boundaries.
    table.to_parquet(os.path.join(out, "groups.parquet"), batch_size=16)
    table.save_to_disk(os.path.join(out, "groups_disk"), num_shards=2)

    # The same data as sentence-transformers' (anchor, positive, negative) triplets, one row per
    # positive, read by column order alone; in Parquet shards of one split, as on the Hub.
    triplets = [
        {"anchor": g["query"], "positive": p, "negative": g["negatives"][0]}
        for g in groups for p in g["positives"]
    ]
    write_jsonl(os.path.join(out, "triplets.jsonl"),
                [{"query": t["anchor"], "positive": t["positive"], "negative": t["negative"]}
                 for t in triplets])
    ds = Dataset.from_list(triplets)
    shards = os.path.join(out, "triplets_shards")
    os.makedirs(shards)
    for k in range(2):
        ds.shard(2, k, contiguous=True).to_parquet(os.path.join(shards, f"train-{k:05d}-of-00002.parquet"))

    # The triplets with their repeated anchors and negatives dictionary-encoded, as pandas'
    # categoricals reach Parquet.
    pq.write_table(pa.table({
        "anchor": pa.array([t["anchor"] for t in triplets]).dictionary_encode(),
        "positive": [t["positive"] for t in triplets],
        "negative": pa.array([t["negative"] for t in triplets]).dictionary_encode(),
    }), os.path.join(out, "triplets_dictionary.parquet"))

    # Scored pairs (CoSENT, CosineSimilarityLoss) and labelled pairs (SoftmaxLoss).
    scored = read_jsonl(os.path.join(src, "scored_pairs.jsonl"))
    write_jsonl(os.path.join(out, "scored.jsonl"), scored)
    Dataset.from_list(scored).to_parquet(os.path.join(out, "scored.parquet"))
    labelled = read_jsonl(os.path.join(src, "labelled_pairs.jsonl"))
    write_jsonl(os.path.join(out, "labelled.jsonl"), labelled)
    Dataset.from_list(labelled).save_to_disk(os.path.join(out, "labelled_disk"))

    # One flaw each. Row groups of 2 rows, so that the errors name a row group other than 0.
    bad = {
        "null_query": {"query": ["q0", "q1", "q2", None], "positive": ["a", "b", "c", "d"]},
        "null_in_list": {"query": ["q0", "q1", "q2"], "positives": [["a"], ["b"], ["c", None]]},
        "int_positive": {"query": ["q0", "q1"], "positive": [1, 2]},
        "null_score": {"sentence1": ["a", "b", "c"], "sentence2": ["d", "e", "f"],
                       "score": [0.5, 1.0, None]},
    }
    for name, columns in bad.items():
        Dataset.from_dict(columns).to_parquet(os.path.join(out, f"bad_{name}.parquet"), batch_size=2)
    # A folder holding two splits' shards, as a Hub repository's data/ folder does.
    mixed = os.path.join(out, "two_splits")
    os.makedirs(mixed)
    for split in ["train", "test"]:
        Dataset.from_list(triplets[:4]).to_parquet(os.path.join(mixed, f"{split}-00000-of-00001.parquet"))
    # A DatasetDict saved whole: the user must name a split.
    datasets.DatasetDict({"train": Dataset.from_list(triplets[:4])}).save_to_disk(os.path.join(out, "dict_disk"))

    # The dev evaluation set in BEIR's layout on the Hub: `_id`, `title`, `text` columns, and qrels
    # with integer scores.
    beir = os.path.join(out, "beir")
    os.makedirs(beir)
    queries = read_jsonl(os.path.join(src, "dev_queries.jsonl"))
    Dataset.from_dict({"_id": [q["id"] for q in queries], "text": [q["text"] for q in queries]}) \
        .to_parquet(os.path.join(beir, "queries.parquet"))
    corpus = read_jsonl(os.path.join(src, "corpus.jsonl"))
    Dataset.from_dict({"_id": [c["id"] for c in corpus], "title": [""] * len(corpus),
                       "text": [c["text"] for c in corpus]}).to_parquet(os.path.join(beir, "corpus.parquet"))
    with open(os.path.join(src, "dev_qrels.tsv"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    Dataset.from_dict({"query-id": [r[0] for r in rows], "corpus-id": [r[1] for r in rows],
                       "score": [int(r[2]) for r in rows]}).to_parquet(os.path.join(beir, "qrels.parquet"))

    with open(os.path.join(out, "VERSIONS"), "w") as f:
        f.write(f"datasets {datasets.__version__}\npyarrow {pa.__version__}\n")
    print(f"wrote {out} with datasets {datasets.__version__}, pyarrow {pa.__version__}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
