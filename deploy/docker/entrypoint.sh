#!/bin/sh
# Entry point of the multipos images. MULTIPOS_ROLE picks what the container runs:
#   coordinator  multipos coordinator --config $MULTIPOS_CONFIG [args]
#   worker       multipos worker --coordinator $MULTIPOS_COORDINATOR --peer-host $MULTIPOS_PEER_HOST
#                (default: this container's hostname) [args]
#   (unset)      multipos [args]
# NAME is ${MULTIPOS_NAME:-this container's hostname}: the name in this container's certificate and
# credential (made by deploy/make-secrets.sh). Secrets are read from ${MULTIPOS_SECRETS:-/run/secrets},
# where Compose and Kubernetes mount them:
#   multipos_token        the cluster token (the coordinator's; MULTIPOS_CLUSTER_TOKEN, or the
#                         file MULTIPOS_TOKEN_FILE, take precedence)
#   credentials/NAME      a worker's own credential, presented instead of the cluster token
#   tls/ca.pem, tls/NAME.pem, tls/NAME-key.pem
#                         mutual TLS: the coordinator runs with cluster.tls, a worker with
#                         MULTIPOS_TLS_CA/CERT/KEY; with a certificate it dials no plaintext
# A worker with ${MULTIPOS_PEER_DOMAIN} (a headless Service) tells its peers to dial NAME.DOMAIN,
# the name its certificate carries, while it listens on MULTIPOS_PEER_HOST.
set -eu
secrets=${MULTIPOS_SECRETS:-/run/secrets}
name=${MULTIPOS_NAME:-$(hostname)}
token_file=${MULTIPOS_TOKEN_FILE:-$secrets/multipos_token}
if [ -z "${MULTIPOS_CLUSTER_TOKEN:-}" ] && [ -f "$token_file" ]; then
  MULTIPOS_CLUSTER_TOKEN=$(cat "$token_file")
  export MULTIPOS_CLUSTER_TOKEN
fi
tls=$secrets/tls
has_tls=no
if [ -f "$tls/ca.pem" ] && [ -f "$tls/$name.pem" ] && [ -f "$tls/$name-key.pem" ]; then
  has_tls=yes
fi
case "${MULTIPOS_ROLE:-}" in
  coordinator)
    : "${MULTIPOS_CONFIG:?set MULTIPOS_CONFIG to the run configuration file}"
    if [ "$has_tls" = yes ]; then
      set -- --set "cluster.tls.ca=\"$tls/ca.pem\"" --set "cluster.tls.cert=\"$tls/$name.pem\"" \
        --set "cluster.tls.key=\"$tls/$name-key.pem\"" "$@"
    fi
    exec multipos coordinator --config "$MULTIPOS_CONFIG" "$@"
    ;;
  worker)
    : "${MULTIPOS_COORDINATOR:?set MULTIPOS_COORDINATOR to the coordinator address HOST:PORT}"
    if [ "$has_tls" = yes ]; then
      MULTIPOS_TLS_CA=$tls/ca.pem MULTIPOS_TLS_CERT=$tls/$name.pem MULTIPOS_TLS_KEY=$tls/$name-key.pem
      export MULTIPOS_TLS_CA MULTIPOS_TLS_CERT MULTIPOS_TLS_KEY
    fi
    if [ -z "${MULTIPOS_WORKER_CREDENTIAL_FILE:-}" ] && [ -f "$secrets/credentials/$name" ]; then
      MULTIPOS_WORKER_CREDENTIAL_FILE=$secrets/credentials/$name
      export MULTIPOS_WORKER_CREDENTIAL_FILE
      unset MULTIPOS_CLUSTER_TOKEN
    fi
    if [ -n "${MULTIPOS_PEER_DOMAIN:-}" ] && [ -z "${MULTIPOS_PEER_NAME:-}" ]; then
      MULTIPOS_PEER_NAME=$name.$MULTIPOS_PEER_DOMAIN
      export MULTIPOS_PEER_NAME
    fi
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
