#!/usr/bin/env bash
# The README's main command: installs what is missing (idempotent), then fine-tunes all-MiniLM-L6-v2
# on the bundled public-domain Bible paraphrases and prints retrieval metrics before and after.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/deploy/setup.sh"
cd "$ROOT"
exec target/release/multipos train --config configs/bible-demo.toml "$@"
