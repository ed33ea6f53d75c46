# Shared by the InsuranceQA (small) comparison scripts (sourced, not run): one multipos run and one
# sentence-transformers run (tests/reference/train_st.py) per call, each appending
# "NAME SEED NDCG@10 [MINED_ROWS]" to $OUT/results, and the per-name means. The caller sets LR and
# runs from the repository root.
D=../shared/data/insuranceqa_small
CACHE=${MULTIPOS_CACHE:-$HOME/.cache/multipos}
PY=${MULTIPOS_PYREF:-$CACHE/pyref/bin/python}
MODEL=${MULTIPOS_MODEL:-$CACHE/models/all-MiniLM-L6-v2}
OUT=$(mktemp -d)

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
    | tail -1 | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(sys.argv[1], sys.argv[2], d["after"]["ndcg@10"], d.get("mined_rows") or "")' "$name" "$seed" \
    | tee -a "$OUT/results"
}

summarize() { # NAME...
  "$PY" - "$OUT/results" "$@" <<'PYEOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for who in sys.argv[2:]:
    xs = [float(r[2]) for r in rows if r[0] == who]
    if not xs:
        continue
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    print(f"{who:16s} mean NDCG@10 {statistics.mean(xs):.4f} ± {sd:.4f} over {len(xs)} seeds")
PYEOF
}
