#!/bin/sh
# The secrets of a cluster, made once on the operator's machine (idempotent: what exists is kept):
#   deploy/make-secrets.sh OUT COORDINATOR[,ALT...] WORKER[,ALT...] ...
# writes
#   OUT/token                           the cluster token (0600): for the coordinator only
#   OUT/tls/ca.pem                      the run's CA certificate: for every host
#   OUT/tls/ca-key.pem                  the CA's key: signs new hosts; keep it on this machine
#                                       (or offline), never on the cluster
#   OUT/tls/NAME.pem, OUT/tls/NAME-key.pem
#                                       each host's certificate and key (NAME: the first name;
#                                       ALTs are further DNS names or IPs others dial it by)
#   OUT/credentials/NAME                each worker's own credential (instead of the token)
# The binary comes from $MULTIPOS_BIN, else target/release/multipos, else PATH.
set -eu
if [ $# -lt 3 ]; then
  echo "usage: $0 OUT COORDINATOR[,ALT...] WORKER[,ALT...] ..." >&2
  exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${MULTIPOS_BIN:-}
if [ -z "$bin" ]; then
  if [ -x "$here/target/release/multipos" ]; then bin=$here/target/release/multipos; else bin=multipos; fi
fi
out=$1
shift
umask 077
mkdir -p "$out/tls" "$out/credentials"
if [ ! -s "$out/token" ]; then
  od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$out/token.new"
  mv "$out/token.new" "$out/token"
fi
for host in "$@"; do
  name=${host%%,*}
  if [ ! -f "$out/tls/$name.pem" ]; then
    "$bin" certs --out "$out/tls" --host "$host" > /dev/null
  fi
done
shift # the first host is the coordinator's: no credential
for host in "$@"; do
  name=${host%%,*}
  if [ ! -s "$out/credentials/$name" ]; then
    "$bin" credential "$name" --token-file "$out/token" > "$out/credentials/$name.new"
    mv "$out/credentials/$name.new" "$out/credentials/$name"
  fi
done
echo "secrets in $out; keep $out/tls/ca-key.pem off the cluster"
