#!/usr/bin/env bash
# The GPU benchmark, side by side in one run on one CUDA GPU: multipos against sentence-transformers
# 6.2's own Trainer (MultipleNegativesRankingLoss, and CachedMultipleNegativesRankingLoss for
# GradCache), same model (all-MiniLM-L6-v2, the same f32 weights), data (InsuranceQA small), batch,
# max_seq_length 128, lr 2e-5, warmup 10 %, dropout on unless named. For a machine with a CUDA
# PyTorch and nothing else: no Rust, no network. Prepare the kit here first:
#
#   deploy/setup.sh && deploy/gpu-bench/pack.sh            (a machine with Rust; makes .gpu-bench/)
#   bash deploy/gpu-check.sh [RESULTS_DIR]                  (the GPU machine, from the project root)
#
# Env: KIT (default .gpu-bench), CASES="mp_b256 st_b256 ..." for a subset (names below), STEP_LIMIT_S
# (per case, default 300). Writes RESULTS_DIR/log.txt and results.jsonl (one line per case: pairs/s
# after the first step, multipos's step profile, losses, the GPU's peak memory and mean utilisation,
# sampled every 0.5 s) and prints the table with the targets of docs/design.md §5.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K=$(realpath -m "${KIT:-$ROOT/.gpu-bench}"); O=$(realpath -m "${1:-/tmp/gpu-check}"); S=$(mktemp -d /tmp/gpu-check.XXXXXX)
[ -d "$K/model" ] || { echo "gpu-check.sh: no kit at $K (make it with deploy/gpu-bench/pack.sh)" >&2; exit 2; }
G="$ROOT/deploy/gpu-bench"
mkdir -p "$O" "$S/runs"; : >"$O/results.jsonl"
exec > >(tee -a "$O/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "kit built from commit $(cat "$K/commit" 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
python3 -c 'import torch;print("torch",torch.__version__,"cuda",torch.version.cuda)'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S/site" "$K"/whl/*.whl && export PYTHONPATH=$S/site
python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('$K/multipos.xz'),open('$S/multipos','wb'))"; chmod +x "$S/multipos"
# The binary finds libtorch (and, beside it, libtorch_cuda.so) through the library path.
export LD_LIBRARY_PATH=$TL
B=$S/multipos; D=$S/data; mkdir -p "$D"
"$B" convert --model "$K/model" --output "$S/model" >/dev/null || exit 3
export MULTIPOS_MODEL=$S/model
for f in "$K"/data/*.xz; do python3 -c "import lzma,shutil,sys;shutil.copyfileobj(lzma.open(sys.argv[1]),open(sys.argv[2],'wb'))" "$f" "$D/$(basename "$f" .xz)"; done
( while :; do echo "$EPOCHREALTIME $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits)"; sleep 0.5; done ) >"$S/smi.txt" &
SMI=$!; trap 'kill $SMI 2>/dev/null' EXIT
rec() { # case start json: adds the GPU's peak memory and mean utilisation over the case
  python3 - "$1" "$2" "$3" "$S/smi.txt" >>"$O/results.jsonl" <<'PY'
import json, sys
name, t0, j, smi = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = [l.replace(",", " ").split() for l in open(smi)]
rows = [(float(r[0]), float(r[1]), float(r[2])) for r in rows if len(r) == 3 and float(r[0]) >= t0]
try: r = json.loads(j)
except Exception: r = {"error": j[-300:]}
r.pop("losses", None)
if rows: r["gpu_peak_mib"] = max(x[2] for x in rows); r["gpu_util_mean"] = round(sum(x[1] for x in rows) / len(rows), 1)
print(json.dumps({"case": name, **r}))
PY
  tail -1 "$O/results.jsonl"; }
want() { [ -z "${CASES:-}" ] || [[ " $CASES " == *" $1 "* ]]; }
LIMIT=${STEP_LIMIT_S:-300}
M() { local n=$1; shift; want "$n" || return 0; echo "=== $n"; local t=$EPOCHREALTIME
  timeout "$LIMIT" "$B" "$@" --config "$G/iqa.toml" --progress off --set model.device=\"cuda\" \
    --set "data.train=\"$D/iqa_train.jsonl\"" --set output.dir=\""$S/runs/$n"\" >"$S/$n.log" 2>&1 || tail -5 "$S/$n.log"
  rec "$n" "$t" "$(python3 "$G/rate.py" "$S/runs/$n/metrics.jsonl" 2>&1)"; }
P() { local n=$1; shift; want "$n" || return 0; echo "=== $n"; local t=$EPOCHREALTIME
  timeout "$LIMIT" python3 "$G/st_train.py" --model "$S/model" --train "$D/iqa_train.jsonl" "$@" >"$S/$n.log" 2>&1 || tail -5 "$S/$n.log"
  rec "$n" "$t" "$(grep '^{' "$S/$n.log" | tail -1)"; }

# CUDA must be found by the binary as built (docs/design.md §5); a preload is only the fallback, and
# is reported as a failure of that.
if ! "$B" embed --device auto --input "$D/bible_dev_queries.jsonl" --output "$S/e-auto.jsonl" --overwrite 2>"$S/smoke.log" \
   || ! grep -q 'device auto: a GPU is usable' "$S/smoke.log"; then
  echo "CUDA NOT FOUND by the binary as built: $(grep -m1 'device auto' "$S/smoke.log")"; export LD_PRELOAD=$TL/libtorch_cuda.so
fi
grep -m1 'device auto' "$S/smoke.log"
"$B" embed --device cuda --input "$D/bible_dev_queries.jsonl" --output "$S/e-cuda.jsonl" --overwrite 2>/dev/null || exit 3
"$B" embed --device cpu --input "$D/bible_dev_queries.jsonl" --output "$S/e-cpu.jsonl" --overwrite 2>/dev/null
echo "{\"case\":\"parity_cuda_cpu\",\"r\":$(python3 "$G/cmp.py" "$S/e-cpu.jsonl" "$S/e-cuda.jsonl")}" | tee -a "$O/results.jsonl"
M mp_b64 train --set train.max_steps=40
P st_b64 --batch-size 64 --max-steps 40
M mp_b64_bf16 train --set train.max_steps=40 --set model.precision=\"bf16\"
P st_b64_bf16 --batch-size 64 --max-steps 40 --bf16
M mp_b256 train --set train.batch_size=256
P st_b256 --batch-size 256 --max-steps 12
M mp_b256_bf16 train --set train.batch_size=256 --set model.precision=\"bf16\"
P st_b256_bf16 --batch-size 256 --max-steps 12 --bf16
M mp_b256_whole train --set train.batch_size=256 --set train.micro_batch=0
M mp_b256_nodropout train --set train.batch_size=256 --set train.dropout=false
M mp_gc1024 train --set train.batch_size=1024 --set train.mini_batch_size=128 --set train.max_steps=3
P st_gc1024 --batch-size 1024 --max-steps 3 --cached-mini-batch 128
M mp_b64_w2 launch --workers 2 --set train.max_steps=40
M mp_b64_w2_bf16grads launch --workers 2 --set train.max_steps=40 --set cluster.grad_dtype=\"bf16\"
if want embed; then echo "=== embed"; t=$EPOCHREALTIME
  "$B" embed --device cuda --batch-size 128 --input "$D/iqa_corpus.jsonl" --output "$S/c.jsonl" --overwrite 2>&1 | tail -1
  echo "multipos embed process seconds: $(awk "BEGIN{print $EPOCHREALTIME-$t}")"
  python3 "$G/st_embed.py" "$S/model" "$D/iqa_corpus.jsonl" 128 2>/dev/null | tail -1; fi
python3 - "$O/results.jsonl" <<'PY'
import json, sys
r = {x["case"]: x for x in map(json.loads, open(sys.argv[1])) if "case" in x}
rate = lambda c: r.get(c, {}).get("pairs_per_s_after_first")
print(f"{'case':22s} {'multipos':>9s} {'s-t':>9s} {'ratio':>7s} {'target':>7s} {'GPU %':>6s}")
for mp, st, target in [("mp_b64", "st_b64", 1.0), ("mp_b64_bf16", "st_b64_bf16", 1.5), ("mp_b256", "st_b256", 1.5),
                       ("mp_b256_bf16", "st_b256_bf16", 1.5), ("mp_b256_whole", "st_b256", 1.5), ("mp_b256_nodropout", "st_b256", None),
                       ("mp_gc1024", "st_gc1024", 1.0), ("mp_b64_w2", "st_b64", None), ("mp_b64_w2_bf16grads", "st_b64", None)]:
    a, b = rate(mp), rate(st)
    if not a: continue
    ratio = f"{a / b:6.2f}x" if b else "      -"
    goal = f"{target:6.1f}x" if target else "      -"
    print(f"{mp:22s} {a:9.1f} {b or 0:9.1f} {ratio} {goal} {r[mp].get('gpu_util_mean', '-'):>6}")
if rate("mp_b256_bf16") and rate("mp_b256"):
    print(f"multipos bf16 / fp32 at batch 256: {rate('mp_b256_bf16') / rate('mp_b256'):.2f}x (target 1.3x)")
print("step profile (mean seconds per step):")
for name, x in r.items():
    if "profile" in x:
        print(f"  {name:22s} " + "  ".join(f"{k} {v:.4f}" for k, v in x["profile"].items()))
PY
