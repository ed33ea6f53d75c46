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
LR=${LR:-2e-5}
source tests/reference/runs.sh
for seed in "$@"; do
  run_multipos multipos "$seed" configs/insuranceqa-small.toml
  run_python python "$seed"
done
summarize multipos python
