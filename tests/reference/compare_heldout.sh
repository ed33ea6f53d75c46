#!/usr/bin/env bash
# Issue 32's honest protocol: every choice (recipe, learning rate) is made on a `choose` split held
# out from InsuranceQA's training questions by question; the reported numbers are on the data set's
# own dev split (1,911 questions, 27,413 answers), which no choice looked at, over several seeds.
#
#   tests/reference/compare_heldout.sh                      # the whole grid (hours on a CPU)
#   SEEDS="12 13 14" LRS="2e-5 5e-5 1e-4" RECIPES="mp_plain st_plain st_mined st_cached mp_recipe" \
#     tests/reference/compare_heldout.sh
#   DATA=../shared/data/insuranceqa_tiny CHOOSE=20 MAX_STEPS=2 SEEDS=12 LRS=5e-5 CLUSTERS=1 \
#     BATCH=8 BIG_BATCH=16 WORK=/tmp/heldout-smoke tests/reference/compare_heldout.sh   # every step, minutes
#
# Recipes: mp_plain (configs/insuranceqa-heldout.toml), mp_recipe (the hard-negative recipe:
# mined with the base model, symmetric, batches by topic), mp_cached (GradCache at BIG_BATCH);
# st_plain, st_mined (mine_hard_negatives as its documentation suggests), st_cached
# (CachedMultipleNegativesRankingLoss at BIG_BATCH) through tests/reference/train_st.py. Every
# model is scored by `multipos eval` (the same numbers as sentence-transformers' evaluator).
# Needs deploy/setup.sh and deploy/pyref.sh; writes under $WORK (default runs/heldout).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DATA=${DATA:-../shared/data/insuranceqa}
WORK=${WORK:-runs/heldout}
CHOOSE=${CHOOSE:-1500}
SEEDS=${SEEDS:-12 13 14}
LRS=${LRS:-2e-5 5e-5 1e-4}
RECIPES=${RECIPES:-mp_plain st_plain st_mined st_cached mp_recipe mp_cached}
BATCH=${BATCH:-32}
BIG_BATCH=${BIG_BATCH:-128}
CLUSTERS=${CLUSTERS:-100}
MAX_STEPS=${MAX_STEPS:-0}
DEVICE=${DEVICE:-cpu}
CACHE=${MULTIPOS_CACHE:-$HOME/.cache/multipos}
PY=${MULTIPOS_PYREF:-$CACHE/pyref/bin/python}
MODEL=${MULTIPOS_MODEL:-$CACHE/models/all-MiniLM-L6-v2}
MP=target/release/multipos
SPLIT=$WORK/split
mkdir -p "$WORK/logs"
RESULTS=$WORK/results.tsv
failed() { # LOG: the step's log, then stop
  echo "failed; the end of $1:" >&2
  tail -5 "$1" >&2
  exit 1
}
[ -f "$SPLIT/split.json" ] || "$PY" tests/reference/heldout_split.py "$DATA" "$SPLIT" --choose "$CHOOSE" >&2
steps=()
st_steps=()
if [ "$MAX_STEPS" -gt 0 ]; then
  steps=(--set "train.max_steps=$MAX_STEPS")
  st_steps=(--max-steps "$MAX_STEPS")
fi

score() { # NAME LR SEED MODEL_DIR: appends the choose and dev NDCG@10 to $RESULTS
  local name=$1 lr=$2 seed=$3 dir=$4 split queries qrels corpus
  for split in choose dev; do
    if [ $split = choose ]; then
      queries=$SPLIT/choose_queries.jsonl qrels=$SPLIT/choose_qrels.tsv corpus=$SPLIT/corpus.jsonl
    else
      queries=$DATA/dev_queries.jsonl qrels=$DATA/dev_qrels.tsv corpus=$DATA/corpus.jsonl
    fi
    local log=$WORK/logs/eval-$name-$lr-$seed-$split.log
    "$MP" eval --model "$dir" --device "$DEVICE" --max-seq-length 128 --queries "$queries" \
      --corpus "$corpus" --qrels "$qrels" >"$log.out" 2>"$log" || failed "$log"
    tail -1 "$log.out" | "$PY" -c 'import json,sys; print("\t".join(sys.argv[1:] + [str(json.load(sys.stdin)["ndcg@10"])]))' \
        "$name" "$lr" "$seed" "$split" | tee -a "$RESULTS"
  done
}

mp_train() { # NAME LR SEED CONFIG [--set ...]
  local name=$1 lr=$2 seed=$3 config=$4 out=$WORK/$1-$2-$3
  shift 4
  "$MP" train --config "$config" --set "model.device=\"$DEVICE\"" --set "data.train=\"$SPLIT/train.jsonl\"" \
    --set "train.lr=$lr" --set "train.seed=$seed" --set "train.batch_size=$BATCH" \
    --set "output.dir=\"$out\"" --set output.overwrite=true \
    "${steps[@]}" "$@" >/dev/null 2>"$WORK/logs/$name-$lr-$seed.log" || failed "$WORK/logs/$name-$lr-$seed.log"
  score "$name" "$lr" "$seed" "$out/model"
}

st_train() { # NAME LR SEED [train_st.py options]
  local name=$1 lr=$2 seed=$3 out=$WORK/$1-$2-$3
  shift 3
  "$PY" tests/reference/train_st.py --model "$MODEL" --train "$SPLIT/train.jsonl" --lr "$lr" \
    --seed "$seed" --warmup-ratio 0.1 --epochs 1 --max-seq-length 128 --device "$DEVICE" \
    --output "$out" "${st_steps[@]}" "$@" >/dev/null 2>"$WORK/logs/$name-$lr-$seed.log" \
    || failed "$WORK/logs/$name-$lr-$seed.log"
  score "$name" "$lr" "$seed" "$out"
}

mined=$WORK/mined.jsonl
if [[ " $RECIPES " == *" mp_recipe "* ]] && [ ! -f "$mined" ]; then
  "$MP" mine --data "$SPLIT/train.jsonl" --output "$mined" --relative-margin 0.05 --range-max 400 \
    --num-negatives 3 --max-seq-length 128 --clusters "$CLUSTERS" --device "$DEVICE" >/dev/null \
    2>"$WORK/logs/mine.log" || failed "$WORK/logs/mine.log"
fi
for lr in $LRS; do
  for seed in $SEEDS; do
    for r in $RECIPES; do
      case $r in
        mp_plain) mp_train mp_plain "$lr" "$seed" configs/insuranceqa-heldout.toml ;;
        mp_recipe) mp_train mp_recipe "$lr" "$seed" configs/insuranceqa-heldout.toml \
          --set "data.train=\"$mined\"" --set data.negatives_per_row=1 \
          --set 'data.fill_negatives="random"' --set 'data.batching="by_cluster"' --set train.symmetric=true ;;
        mp_cached) mp_train mp_cached "$lr" "$seed" configs/insuranceqa-heldout.toml \
          --set "train.batch_size=$BIG_BATCH" --set "train.mini_batch_size=$BATCH" ;;
        st_plain) st_train st_plain "$lr" "$seed" --batch-size "$BATCH" ;;
        st_mined) st_train st_mined "$lr" "$seed" --batch-size "$BATCH" --mine-negatives 1 --relative-margin 0.05 ;;
        st_cached) st_train st_cached "$lr" "$seed" --batch-size "$BIG_BATCH" --cached-mini-batch "$BATCH" ;;
        *) echo "unknown recipe $r" >&2; exit 2 ;;
      esac
    done
  done
done
"$PY" - "$RESULTS" <<'PYEOF'
import collections, statistics, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    name, lr, seed, split, ndcg = line.split()
    runs[(name, lr, split)][seed] = float(ndcg)
def stats(xs):
    return statistics.mean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)
print("| recipe | lr | split | NDCG@10 by seed | mean ± s.e. |\n|---|---|---|---|---|")
for (name, lr, split), by in sorted(runs.items()):
    m, se = stats(list(by.values()))
    seeds = " / ".join(f"{s}: {v:.4f}" for s, v in sorted(by.items()))
    print(f"| {name} | {lr} | {split} | {seeds} | {m:.4f} ± {se:.4f} |")
# Each side's choice is made on the choose split alone, then reported on dev.
for side in ("mp_", "st_"):
    cands = [(stats(list(by.values()))[0], name, lr) for (name, lr, split), by in runs.items()
             if split == "choose" and name.startswith(side)]
    if cands:
        _, name, lr = max(cands)
        m, se = stats(list(runs[(name, lr, "dev")].values()))
        print(f"chosen on choose, {side[:-1]}: {name} at lr {lr} -> dev NDCG@10 {m:.4f} ± {se:.4f}")
PYEOF
