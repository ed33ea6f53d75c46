#!/usr/bin/env bash
# GPU readiness in one short script, for a machine with an NVIDIA GPU (none of this runs in CI):
#
#   deploy/gpu-check.sh [RESULTS_DIR]
#
# 1. installs the CUDA libtorch (deploy/setup.sh --cuda) and the Python reference (deploy/pyref.sh);
# 2. embeds the bundled dev queries on CUDA and on the CPU: max |difference| must be <= 1e-4 (fp32);
# 3. trains all-MiniLM-L6-v2 for BENCH_STEPS steps (default 30) of batch 64 on the bundled Bible
#    paraphrases, in fp32 and in bf16 mixed precision, and the same run with 2 workers sharing the GPU;
# 4. runs the same training in sentence-transformers (same model, data, batch, steps) and prints
#    pairs/s side by side.
# Each step prints PASS/FAIL or its numbers; the script exits non-zero on the first failure. Results
# (metrics.jsonl of each run, the summary) go to RESULTS_DIR (default: runs/gpu-check).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=$(realpath -m "${1:-runs/gpu-check}")
STEPS=${BENCH_STEPS:-30}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

deploy/setup.sh --cuda
deploy/pyref.sh
BIN=target/release/multipos
PY=${MULTIPOS_PYREF:-${MULTIPOS_CACHE:-$HOME/.cache/multipos}/pyref/bin/python}
DATA=deploy/data/bible_paraphrase_small
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$SUMMARY"

# --- 2. embeddings: CUDA vs CPU ------------------------------------------------------------------
"$BIN" embed --device cpu --input "$DATA/dev_queries.jsonl" --output "$OUT/emb-cpu.jsonl"
"$BIN" embed --device cuda --input "$DATA/dev_queries.jsonl" --output "$OUT/emb-cuda.jsonl"
python3 - "$OUT/emb-cpu.jsonl" "$OUT/emb-cuda.jsonl" <<'EOF' | tee -a "$SUMMARY"
import json, sys
a = [json.loads(l)["embedding"] for l in open(sys.argv[1])]
b = [json.loads(l)["embedding"] for l in open(sys.argv[2])]
assert len(a) == len(b) and a
diff = max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))
print(f"embeddings, {len(a)} texts, CUDA vs CPU: max |diff| {diff:.2e} -> {'PASS' if diff <= 1e-4 else 'FAIL'}")
sys.exit(0 if diff <= 1e-4 else 1)
EOF

# --- 3. training: fp32, bf16, 2 workers on one GPU -------------------------------------------------
common=(--config configs/bible-demo.toml --set model.device=\"cuda\" --set "train.max_steps=$STEPS"
  --set train.batch_size=64 --set model.max_seq_length=128 --set eval.at_start=false)
rate() { # mean pairs/s of a run's steps after the first (CUDA start-up excluded)
  python3 - "$1/metrics.jsonl" <<'EOF'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1])]
s = [r for r in s if r.get("event") == "step"][1:]
print(f"{sum(r['pairs'] for r in s) / sum(r['seconds'] for r in s):.1f}")
EOF
}
"$BIN" train "${common[@]}" --set output.dir=\""$OUT/fp32"\"
say "fp32 training: $(rate "$OUT/fp32") pairs/s"
"$BIN" train "${common[@]}" --set model.precision=\"bf16\" --set output.dir=\""$OUT/bf16"\"
say "bf16 training: $(rate "$OUT/bf16") pairs/s"
"$BIN" launch "${common[@]}" --workers 2 --set output.dir=\""$OUT/cluster"\"
say "2 workers on one GPU: $(rate "$OUT/cluster") pairs/s"
python3 - "$OUT" <<'EOF' | tee -a "$SUMMARY"
import json, sys
def losses(run):
    return [r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{run}/metrics.jsonl")) if r.get("event") == "step"]
f, b, c = losses("fp32"), losses("bf16"), losses("cluster")
print(f"final loss fp32 {f[-1]:.4f}, bf16 {b[-1]:.4f}, cluster {c[-1]:.4f}; "
      f"max step-loss |fp32 - cluster| {max(abs(x - y) for x, y in zip(f, c)):.2e}")
EOF

# --- 4. sentence-transformers, same run ----------------------------------------------------------
MODEL=${MULTIPOS_MODEL:-${MULTIPOS_CACHE:-$HOME/.cache/multipos}/models/all-MiniLM-L6-v2}
"$PY" tests/reference/train_st.py --model "$MODEL" \
  --train "$DATA/train.jsonl" --batch-size 64 --max-steps "$STEPS" --max-seq-length 128 --skip-before \
  --device cuda >"$OUT/st.json"
say "sentence-transformers (fp32, CUDA): $(python3 -c 'import json,sys;print(round(json.load(open(sys.argv[1]))["pairs_per_s"],1))' "$OUT/st.json") pairs/s"
echo "summary in $SUMMARY"
