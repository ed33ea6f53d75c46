#!/usr/bin/env bash
# Packs what the GPU benchmark (deploy/gpu-check.sh) needs on a CUDA machine that has PyTorch but no
# Rust and no network, into a kit folder (default .gpu-bench/, git-ignored; about 55 MB):
#   the stripped release binary (xz), all-MiniLM-L6-v2 with its weights in fp16 (restored to f32
#   there by `multipos convert`, so both sides train the same weights), InsuranceQA (small) train and
#   corpus, the bundled Bible dev queries, and wheels of the pinned sentence-transformers side.
#
#   deploy/setup.sh && deploy/gpu-bench/pack.sh [KIT_DIR]        (here, from anywhere)
#   bash deploy/gpu-check.sh RESULTS_DIR                          (there, from the project root)
#
# InsuranceQA is research-only and never committed: it is read from $IQA_DIR (default
# ../shared/data/insuranceqa_small beside the checkout).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/deploy/gpu-bench"
K=$(realpath -m "${1:-$ROOT/.gpu-bench}")
CACHE=${MULTIPOS_CACHE:-$HOME/.cache/multipos}
MODEL=${MULTIPOS_MODEL:-$CACHE/models/all-MiniLM-L6-v2}
IQA=${IQA_DIR:-$ROOT/../shared/data/insuranceqa_small}
BIN="$ROOT/target/release/multipos"
[ -x "$BIN" ] || { echo "pack.sh: build first (deploy/setup.sh)" >&2; exit 1; }
[ -f "$IQA/train.jsonl" ] || { echo "pack.sh: no InsuranceQA at $IQA (set IQA_DIR)" >&2; exit 1; }
rm -rf "$K"; mkdir -p "$K/model" "$K/data" "$K/whl"
strip -o "$K/multipos" "$BIN" && xz -T0 -6 "$K/multipos"
(cd "$MODEL" && cp -r $(ls | grep -v '^model.safetensors$' | grep -v README) "$K/model/")
PY=$CACHE/pyref/bin/python
[ -x "$PY" ] && "$PY" -c 'import numpy' 2>/dev/null || { python3 -m venv "$CACHE/gpu-bench-venv"; PY=$CACHE/gpu-bench-venv/bin/python; "$PY" -m pip install -q numpy; }
"$PY" "$HERE/to_f16.py" "$MODEL/model.safetensors" "$K/model/model.safetensors"
cp "$ROOT/deploy/data/bible_paraphrase_small/dev_queries.jsonl" "$K/data/bible_dev_queries.jsonl"
cp "$IQA/train.jsonl" "$K/data/iqa_train.jsonl"
cp "$IQA/corpus.jsonl" "$K/data/iqa_corpus.jsonl"
xz -T0 -6 "$K"/data/*.jsonl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$K/whl" \
  sentence-transformers==6.2.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18
git -C "$ROOT" rev-parse HEAD >"$K/commit" 2>/dev/null || echo unknown >"$K/commit"
du -sh "$K"
echo "packed: $K (there, from the project root: bash deploy/gpu-check.sh RESULTS_DIR)"
