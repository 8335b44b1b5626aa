#!/usr/bin/env bash
# `make test-node`: start the one-node cluster, run the node tests against it, and stop it
# and restore the host whatever happened (a failed start included). Extra arguments go to
# pytest, e.g. `bash tests/node/run.sh -k scale`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"

trap 'bash "$here/cluster.sh" down' EXIT
start=$SECONDS
bash "$here/cluster.sh" up
echo "node tests: cluster up in $((SECONDS - start)) s"
start=$SECONDS
status=0
(cd "$here" && "$python" -m pytest -v -rP -p no:cacheprovider "$@") || status=$?
echo "node tests: ran in $((SECONDS - start)) s"
exit "$status"
