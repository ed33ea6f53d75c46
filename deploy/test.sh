#!/usr/bin/env bash
# The README's test command: installs what is missing (idempotent), then runs the whole test suite.
# Tests build in the release profile so they share one libtorch/torch-sys build with the binary.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/deploy/setup.sh" "$@"
# What some tests run for real: Prometheus (tests/prometheus.rs), iproute2 (network namespaces),
# kubectl (tests/k8s.rs builds the manifests with `kubectl kustomize`).
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v ip >/dev/null || need+=(iproute2)
command -v kubectl >/dev/null || need+=(kubernetes-client)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: tests need ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cd "$ROOT"
cargo test --release --locked
