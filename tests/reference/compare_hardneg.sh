#!/usr/bin/env bash
# The hard-negative recipes on InsuranceQA (small), per seed, at one learning rate (LR, default
# 2e-5, the recipes'; sentence-transformers' own default is 5e-5): multipos's recipe
# (configs/insuranceqa-small-hardneg.toml after `multipos mine`), multipos's plain run
# (configs/insuranceqa-small.toml), sentence-transformers' mined recipe (mine_hard_negatives with one
# negative, relative_margin 0.05, "top", as its documentation suggests, then MNRL on the triplets;
# tests/reference/train_st.py --mine-negatives 1) and its plain run. Same model, questions, batch,
# lr, warmup, weight decay, max length and seed everywhere.
#   tests/reference/compare_hardneg.sh 42 1 2
#   LR=5e-5 tests/reference/compare_hardneg.sh 42
# Needs deploy/setup.sh, deploy/pyref.sh and ../shared/data/insuranceqa_small (research-only, never
# committed). Prints dev NDCG@10 after one epoch for each run, then the means.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
D=../shared/data/insuranceqa_small
CACHE=${MULTIPOS_CACHE:-$HOME/.cache/multipos}
PY=${MULTIPOS_PYREF:-$CACHE/pyref/bin/python}
MODEL=${MULTIPOS_MODEL:-$CACHE/models/all-MiniLM-L6-v2}
LR=${LR:-2e-5}
OUT=$(mktemp -d)
target/release/multipos mine --model "$MODEL" --data $D/train.jsonl --output "$OUT/mined.jsonl" \
  --relative-margin 0.05 --range-max 400 --num-negatives 3 --max-seq-length 128 2>/dev/null | tail -1

run_multipos() { # NAME SEED CONFIG [--set ...]
  local name=$1 seed=$2 config=$3
  shift 3
  target/release/multipos train --config "$config" --set train.seed="$seed" --set train.lr="$LR" \
    --set eval.at_start=false --set "output.dir=\"$OUT/$name-$seed\"" "$@" 2>/dev/null | tail -1 \
    | "$PY" -c 'import json,sys; print(sys.argv[1], sys.argv[2], json.load(sys.stdin)["eval_after"]["ndcg@10"])' "$name" "$seed" \
    | tee -a "$OUT/results"
}
run_python() { # NAME SEED [train_st.py options]
  local name=$1 seed=$2
  shift 2
  "$PY" tests/reference/train_st.py --model "$MODEL" \
    --train $D/train.jsonl --queries $D/dev_queries.jsonl --corpus $D/corpus.jsonl --qrels $D/dev_qrels.tsv \
    --batch-size 32 --lr "$LR" --warmup-ratio 0.1 --epochs 1 --max-seq-length 128 --seed "$seed" --threads 2 \
    --skip-before "$@" 2>/dev/null \
    | tail -1 | "$PY" -c 'import json,sys; print(sys.argv[1], sys.argv[2], json.load(sys.stdin)["after"]["ndcg@10"])' "$name" "$seed" \
    | tee -a "$OUT/results"
}
for seed in "$@"; do
  run_multipos multipos-recipe "$seed" configs/insuranceqa-small-hardneg.toml --set "data.train=\"$OUT/mined.jsonl\""
  run_multipos multipos-plain "$seed" configs/insuranceqa-small.toml
  run_python python-mined "$seed" --mine-negatives 1 --relative-margin 0.05
  run_python python-plain "$seed"
done
"$PY" - "$OUT/results" <<'PYEOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for who in ("multipos-recipe", "multipos-plain", "python-mined", "python-plain"):
    xs = [float(r[2]) for r in rows if r[0] == who]
    if not xs:
        continue
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    print(f"{who:16s} mean NDCG@10 {statistics.mean(xs):.4f} ± {sd:.4f} over {len(xs)} seeds")
PYEOF
