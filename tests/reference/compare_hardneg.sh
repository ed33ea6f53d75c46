#!/usr/bin/env bash
# The hard-negative recipes on InsuranceQA (small), per seed: multipos's
# (configs/insuranceqa-small-hardneg.toml after `multipos mine`) against sentence-transformers'
# mined recipe (mine_hard_negatives with one negative, relative_margin 0.05, "top", as its
# documentation suggests, then MNRL on the triplets; tests/reference/train_st.py --mine-negatives 1).
# Same model, questions, batch, lr, warmup, weight decay, max length and seed.
#   tests/reference/compare_hardneg.sh 42 1 2
# The plain one-epoch runs of both are tests/reference/compare_insuranceqa.sh. Needs deploy/setup.sh,
# deploy/pyref.sh and ../shared/data/insuranceqa_small (research-only, never committed).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
D=../shared/data/insuranceqa_small
CACHE=${MULTIPOS_CACHE:-$HOME/.cache/multipos}
PY=${MULTIPOS_PYREF:-$CACHE/pyref/bin/python}
MODEL=${MULTIPOS_MODEL:-$CACHE/models/all-MiniLM-L6-v2}
OUT=$(mktemp -d)
target/release/multipos mine --model "$MODEL" --data $D/train.jsonl --output "$OUT/mined.jsonl" \
  --relative-margin 0.05 --range-max 400 --num-negatives 3 --max-seq-length 128 2>/dev/null | tail -1
for seed in "$@"; do
  target/release/multipos train --config configs/insuranceqa-small-hardneg.toml --set train.seed="$seed" \
    --set "data.train=\"$OUT/mined.jsonl\"" --set eval.at_start=false \
    --set "output.dir=\"$OUT/multipos-$seed\"" 2>/dev/null | tail -1 \
    | "$PY" -c 'import json,sys; print("multipos", sys.argv[1], json.load(sys.stdin)["eval_after"]["ndcg@10"])' "$seed" | tee -a "$OUT/results"
  "$PY" tests/reference/train_st.py --model "$MODEL" \
    --train $D/train.jsonl --queries $D/dev_queries.jsonl --corpus $D/corpus.jsonl --qrels $D/dev_qrels.tsv \
    --batch-size 32 --lr 2e-5 --warmup-ratio 0.1 --epochs 1 --max-seq-length 128 --seed "$seed" --threads 2 --skip-before \
    --mine-negatives 1 --relative-margin 0.05 2>/dev/null \
    | tail -1 | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("python", sys.argv[1], d["after"]["ndcg@10"], d["mined_rows"])' "$seed" | tee -a "$OUT/results"
done
"$PY" - "$OUT/results" <<'PYEOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for who in ("multipos", "python"):
    xs = [float(r[2]) for r in rows if r[0] == who]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    print(f"{who:9s} mean NDCG@10 {statistics.mean(xs):.4f} ± {sd:.4f} over {len(xs)} seeds")
PYEOF
