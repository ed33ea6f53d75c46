#!/usr/bin/env bash
# The README's main command: installs what is missing (idempotent), then fine-tunes all-MiniLM-L6-v2
# on the bundled public-domain Bible paraphrases with a local cluster of 2 worker processes
# (configs/local-2workers.toml) and prints retrieval metrics on the held-out dev books before and after.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/deploy/setup.sh"
cd "$ROOT"
BIN=target/release/multipos
DATA=deploy/data/bible_paraphrase_small
EVAL=(--queries "$DATA/dev_queries.jsonl" --corpus "$DATA/corpus.jsonl" --qrels "$DATA/dev_qrels.tsv" --max-seq-length 64)
METRICS='^(ndcg@10|mrr@10|map@100|recall@10|accuracy@1) '

echo "== before fine-tuning (all-MiniLM-L6-v2 as shipped)"
"$BIN" eval "${EVAL[@]}" | grep -E "$METRICS"
echo "== fine-tuning with 2 local workers"
# The demo replaces its own earlier run; `multipos train`/`launch` refuse that unless told to.
"$BIN" launch --config configs/local-2workers.toml --set output.overwrite=true "$@"
echo "== after fine-tuning (runs/local-2workers/model)"
"$BIN" eval --model runs/local-2workers/model "${EVAL[@]}" | grep -E "$METRICS"
