#!/usr/bin/env bash
# Installs the pinned Python reference (sentence-transformers on CPU) used by the fixture scripts and
# benchmarks into $MULTIPOS_CACHE/pyref (idempotent). Not needed for building or testing multipos.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MULTIPOS_CACHE:-$HOME/.cache/multipos}
VENV="$CACHE/pyref"
REQ="$ROOT/tests/reference/requirements.txt"
STAMP="$VENV/.requirements"
if [ -f "$STAMP" ] && cmp -s "$STAMP" "$REQ"; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
cp "$REQ" "$STAMP"
echo "[pyref] ready: $VENV/bin/python" >&2
