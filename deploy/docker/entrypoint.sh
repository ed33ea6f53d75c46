#!/bin/sh
# Entry point of the multipos images. MULTIPOS_ROLE picks what the container runs:
#   coordinator  multipos coordinator --config $MULTIPOS_CONFIG [args]
#   worker       multipos worker --coordinator $MULTIPOS_COORDINATOR --peer-host $MULTIPOS_PEER_HOST
#                (default: this container's hostname) [args]
#   (unset)      multipos [args]
# The cluster token comes from MULTIPOS_CLUSTER_TOKEN or, when that is unset, from the file
# $MULTIPOS_TOKEN_FILE (default /run/secrets/multipos_token, where Compose and Kubernetes mount secrets).
set -eu
token_file=${MULTIPOS_TOKEN_FILE:-/run/secrets/multipos_token}
if [ -z "${MULTIPOS_CLUSTER_TOKEN:-}" ] && [ -f "$token_file" ]; then
  MULTIPOS_CLUSTER_TOKEN=$(cat "$token_file")
  export MULTIPOS_CLUSTER_TOKEN
fi
case "${MULTIPOS_ROLE:-}" in
  coordinator)
    : "${MULTIPOS_CONFIG:?set MULTIPOS_CONFIG to the run configuration file}"
    exec multipos coordinator --config "$MULTIPOS_CONFIG" "$@"
    ;;
  worker)
    : "${MULTIPOS_COORDINATOR:?set MULTIPOS_COORDINATOR to the coordinator address HOST:PORT}"
    exec multipos worker --coordinator "$MULTIPOS_COORDINATOR" \
      --peer-host "${MULTIPOS_PEER_HOST:-$(hostname)}" "$@"
    ;;
  "")
    exec multipos "$@"
    ;;
  *)
    echo "entrypoint: unknown MULTIPOS_ROLE '$MULTIPOS_ROLE' (coordinator, worker, or unset)" >&2
    exit 2
    ;;
esac
