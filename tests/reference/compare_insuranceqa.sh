#!/usr/bin/env bash
# The InsuranceQA (small) fine-tuning comparison: multipos vs Python sentence-transformers, same
# model, data, batch, lr, warmup, weight decay, max length and seed, for each seed given.
#   tests/reference/compare_insuranceqa.sh 42 1 2
#   LR=5e-5 tests/reference/compare_insuranceqa.sh 42 1 2   (both sides at another learning rate)
# Needs deploy/setup.sh and deploy/pyref.sh, and ../shared/data/insuranceqa_small (research-only
# data, never committed). Prints dev NDCG@10 after one epoch for each run, then the means.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
D=../shared/data/insuranceqa_small
PY=${MULTIPOS_PYREF:-${MULTIPOS_CACHE:-$HOME/.cache/multipos}/pyref/bin/python}
LR=${LR:-2e-5}
OUT=$(mktemp -d)
for seed in "$@"; do
  target/release/multipos train --config configs/insuranceqa-small.toml --set train.seed="$seed" --set train.lr="$LR" \
    --set eval.at_start=false --set "output.dir=\"$OUT/multipos-$seed\"" 2>/dev/null | tail -1 \
    | "$PY" -c 'import json,sys; print("multipos", sys.argv[1], json.load(sys.stdin)["eval_after"]["ndcg@10"])' "$seed" | tee -a "$OUT/results"
  "$PY" tests/reference/train_st.py --model "${MULTIPOS_MODEL:-${MULTIPOS_CACHE:-$HOME/.cache/multipos}/models/all-MiniLM-L6-v2}" \
    --train $D/train.jsonl --queries $D/dev_queries.jsonl --corpus $D/corpus.jsonl --qrels $D/dev_qrels.tsv \
    --batch-size 32 --lr "$LR" --warmup-ratio 0.1 --epochs 1 --max-seq-length 128 --seed "$seed" --threads 2 --skip-before 2>/dev/null \
    | tail -1 | "$PY" -c 'import json,sys; print("python", sys.argv[1], json.load(sys.stdin)["after"]["ndcg@10"])' "$seed" | tee -a "$OUT/results"
done
"$PY" - "$OUT/results" <<'PYEOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for who in ("multipos", "python"):
    xs = [float(r[2]) for r in rows if r[0] == who]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    print(f"{who:9s} mean NDCG@10 {statistics.mean(xs):.4f} ± {sd:.4f} over {len(xs)} seeds")
PYEOF
