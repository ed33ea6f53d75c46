"""The Python reference training run: sentence-transformers' Trainer with MultipleNegativesRankingLoss
(scale 20) and the NO_DUPLICATES batch sampler, on (query, positive) pairs expanded from a
query-grouped JSONL file, with InformationRetrievalEvaluator metrics before and after.

    python tests/reference/train_st.py --model DIR --train train.jsonl [--queries Q --corpus C --qrels R]
        [--batch-size 32] [--lr 2e-5] [--warmup-ratio 0.1] [--epochs 1] [--max-steps -1]
        [--max-seq-length 128] [--seed 42] [--threads 2] [--weight-decay 0.01] [--output DIR]
        [--cached-mini-batch N] [--device cpu|cuda] [--mine-negatives N [--relative-margin 0.05]]

With --cached-mini-batch the loss is CachedMultipleNegativesRankingLoss (GradCache) with that
mini_batch_size (used by benches/gradcache.rs). With --mine-negatives the pairs first go through
sentence-transformers' mine_hard_negatives with the base model (N negatives, sampling "top", the given
relative_margin, triplet output, as its documentation suggests) and training runs on the triplets it
returns (used by tests/reference/compare_hardneg.sh).

Prints one JSON line: steps, pairs, train_seconds, pairs_per_s, and the metrics before/after when an
evaluation set is given. Used by configs/insuranceqa-small.toml's comparison and by
benches/train_throughput.rs.
"""
import argparse
import csv
import json
import tempfile
import time

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from sentence_transformers.util import mine_hard_negatives


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluator(args):
    queries = {str(r["id"]): r["text"] for r in read_jsonl(args.queries)}
    corpus = {str(r["id"]): r["text"] for r in read_jsonl(args.corpus)}
    relevant = {}
    with open(args.qrels, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if float(row["score"]) > 0:
                relevant.setdefault(row["query-id"], set()).add(row["corpus-id"])
    return InformationRetrievalEvaluator(queries, corpus, relevant, batch_size=64, write_csv=False, name="dev")


def metrics(ev, model):
    raw = ev(model)
    return {k.removeprefix("dev_cosine_"): v for k, v in raw.items() if k.startswith("dev_cosine_")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--queries")
    p.add_argument("--corpus")
    p.add_argument("--qrels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output")
    p.add_argument("--skip-before", action="store_true", help="do not evaluate before training")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cached-mini-batch", type=int, help="CachedMultipleNegativesRankingLoss with this mini_batch_size")
    p.add_argument("--mine-negatives", type=int, help="mine this many hard negatives per pair first")
    p.add_argument("--relative-margin", type=float, help="mine_hard_negatives' relative_margin")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(args.model, device=args.device)
    model.max_seq_length = args.max_seq_length
    anchors, positives = [], []
    for group in read_jsonl(args.train):
        for pos in group["positives"]:
            anchors.append(group["query"])
            positives.append(pos)
    dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
    mined = None
    if args.mine_negatives:
        dataset = mine_hard_negatives(dataset, model, num_negatives=args.mine_negatives,
                                      relative_margin=args.relative_margin, sampling_strategy="top",
                                      batch_size=32, output_format="triplet", verbose=False)
        mined = len(dataset)
    ev = evaluator(args) if args.queries else None
    before = metrics(ev, model) if ev and not args.skip_before else None

    if args.cached_mini_batch:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.cached_mini_batch)
    else:
        loss = MultipleNegativesRankingLoss(model)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            seed=args.seed,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            use_cpu=args.device == "cpu",
            dataloader_num_workers=0,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=training_args, train_dataset=dataset, loss=loss
        )
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    steps = result.global_step
    after = metrics(ev, model) if ev else None
    if args.output:
        model.save(args.output)
    print(json.dumps({
        "steps": steps,
        "pairs": steps * args.batch_size,
        "mined_rows": mined,
        "train_seconds": seconds,
        "pairs_per_s": steps * args.batch_size / seconds,
        "before": before,
        "after": after,
    }))


if __name__ == "__main__":
    main()
