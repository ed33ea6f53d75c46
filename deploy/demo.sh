#!/usr/bin/env bash
# The README's main command: installs what is missing (idempotent), then runs the end-to-end job on
# the bundled defaults (all-MiniLM-L6-v2 and the bundled public-domain Bible paraphrases).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/deploy/setup.sh"
exec "$ROOT/target/release/multipos" demo "$@"
