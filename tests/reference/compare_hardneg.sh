#!/usr/bin/env bash
# The hard-negative recipes on InsuranceQA (small), per seed, at one learning rate (LR, default
# 5e-5: the recipe's and sentence-transformers' own default): multipos's recipe
# (configs/insuranceqa-small-hardneg.toml after `multipos mine`), multipos's plain run
# (configs/insuranceqa-small.toml), sentence-transformers' mined recipe (mine_hard_negatives with one
# negative, relative_margin 0.05, "top", as its documentation suggests, then MNRL on the triplets;
# tests/reference/train_st.py --mine-negatives 1) and its plain run. Same model, questions, batch,
# lr, warmup, weight decay, max length and seed everywhere.
#   tests/reference/compare_hardneg.sh 42 1 2
#   LR=2e-5 tests/reference/compare_hardneg.sh 42 1 2   (the plain config's learning rate)
# Needs deploy/setup.sh, deploy/pyref.sh and ../shared/data/insuranceqa_small (research-only, never
# committed). Prints dev NDCG@10 after one epoch for each run (and the mined triplets of
# sentence-transformers' mined recipe), then the means.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
LR=${LR:-5e-5}
source tests/reference/runs.sh
target/release/multipos mine --model "$MODEL" --data $D/train.jsonl --output "$OUT/mined.jsonl" \
  --relative-margin 0.05 --range-max 400 --num-negatives 3 --max-seq-length 128 --clusters 100 2>/dev/null | tail -1
for seed in "$@"; do
  run_multipos multipos-recipe "$seed" configs/insuranceqa-small-hardneg.toml --set "data.train=\"$OUT/mined.jsonl\""
  run_multipos multipos-plain "$seed" configs/insuranceqa-small.toml
  run_python python-mined "$seed" --mine-negatives 1 --relative-margin 0.05
  run_python python-plain "$seed"
done
summarize multipos-recipe multipos-plain python-mined python-plain
