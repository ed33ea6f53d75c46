#!/usr/bin/env bash
# The README's test command: installs what is missing (idempotent), then runs the whole test suite.
# Tests build in the release profile so they share one libtorch/torch-sys build with the binary.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/deploy/setup.sh" "$@"
cd "$ROOT"
cargo test --release --locked
